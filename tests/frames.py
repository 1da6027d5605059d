"""Client frames built by hand for tests, independent of the code under test (RFC 6455 5.2)."""

from __future__ import annotations

__all__ = ["MASK", "client_frame"]

MASK = b"\x37\xfa\x21\x3d"  # the RFC 6455 5.7 examples' mask


def client_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = MASK,
    length: int | None = None,
) -> bytes:
    """A client frame; ``length`` may lie about the payload and ``mask=None`` leaves it unmasked."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | rsv << 4 | opcode
    mask_bit = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes([b0, mask_bit | n])
    elif n < 0x10000:
        head = bytes([b0, mask_bit | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([b0, mask_bit | 127]) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
