"""Type stubs for the compiled ``chorus.native._wsframe`` (C++, pybind11); it mirrors ``codec_pure``.

The parser and encoder are the hub's own (native/src/wsframe.cpp). ``ProtocolError`` is
``codec_pure.ProtocolError`` itself, whichever module parses.
"""

from typing import Final

from chorus.native.codec_pure import ProtocolError as ProtocolError

__all__ = [
    "CLOSE_INVALID_DATA",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_TOO_BIG",
    "COMPRESSED",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "FrameParser",
    "ProtocolError",
    "encode_close",
    "encode_frame",
    "encode_frames",
    "validate_utf8",
]

OP_CONT: Final[int]
OP_TEXT: Final[int]
OP_BINARY: Final[int]
OP_CLOSE: Final[int]
OP_PING: Final[int]
OP_PONG: Final[int]
COMPRESSED: Final[int]
CLOSE_PROTOCOL_ERROR: Final[int]
CLOSE_INVALID_DATA: Final[int]
CLOSE_TOO_BIG: Final[int]

def validate_utf8(data: bytes | bytearray | memoryview) -> bool: ...
def encode_frame(
    opcode: int, payload: bytes | bytearray | memoryview, fin: bool = True, rsv1: bool = False
) -> bytes: ...
def encode_frames(opcode: int, payloads: list[bytes]) -> bytes: ...
def encode_close(code: int, reason: str = "") -> bytes: ...

class FrameParser:
    @property
    def max_message_size(self) -> int: ...
    @property
    def max_fragments(self) -> int: ...
    @property
    def require_mask(self) -> bool: ...
    @property
    def allow_rsv1(self) -> bool: ...
    def __init__(
        self,
        max_message_size: int = 65536,
        max_fragments: int = 64,
        require_mask: bool = True,
        allow_rsv1: bool = False,
    ) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]: ...
