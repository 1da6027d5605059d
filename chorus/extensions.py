"""permessage-deflate negotiation (RFC 7692), sans-I/O: an offer header in, a response out.

The gateway compresses each broadcast batch once and sends the same bytes to every viewer
that negotiated deflate, so it always answers with ``server_no_context_takeover`` (a
compressor per connection would cost 30-300 KiB each). It also always asks for
``client_no_context_takeover`` (RFC 7692 7.1.1.2 lets the server add it) so each client
message inflates on its own with one shared inflater and no window per connection.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DeflateParams", "negotiate_deflate", "parse_extensions"]

MIN_WINDOW_BITS = 9  # zlib cannot make raw deflate streams with an 8-bit window


@dataclass(frozen=True, slots=True)
class DeflateParams:
    server_window_bits: int  # the LZ77 window our compressed frames may use (9-15)

    def response_header(self, default_bits: int) -> str:
        parts = ["permessage-deflate", "server_no_context_takeover", "client_no_context_takeover"]
        if self.server_window_bits < default_bits:
            parts.append(f"server_max_window_bits={self.server_window_bits}")
        return "; ".join(parts)


def parse_extensions(header: str) -> list[tuple[str, dict[str, str | None]]]:
    """``Sec-WebSocket-Extensions`` as [(name, {param: value or None})] in offer order."""
    offers = []
    for item in header.split(","):
        parts = [p.strip() for p in item.split(";") if p.strip()]
        if not parts:
            continue
        params: dict[str, str | None] = {}
        for param in parts[1:]:
            key, eq, value = param.partition("=")
            params[key.strip().lower()] = value.strip().strip('"') if eq else None
        offers.append((parts[0].lower(), params))
    return offers


def _accept(params: dict[str, str | None], default_bits: int) -> DeflateParams | None:
    """Our answer to one offer, or None to decline it (RFC 7692 7.1)."""
    known = {"server_no_context_takeover", "client_no_context_takeover", "server_max_window_bits",
             "client_max_window_bits"}
    if not set(params) <= known:
        return None
    for flag in ("server_no_context_takeover", "client_no_context_takeover"):
        if flag in params and params[flag] is not None:
            return None  # these flags take no value
    bits = default_bits
    if "server_max_window_bits" in params:
        raw = params["server_max_window_bits"]
        if raw is None or not raw.isdigit() or not 8 <= int(raw) <= 15:
            return None
        bits = min(bits, int(raw))
        if bits < MIN_WINDOW_BITS:
            return None
    client_bits = params.get("client_max_window_bits")
    if client_bits is not None and (not client_bits.isdigit() or not 8 <= int(client_bits) <= 15):
        return None
    return DeflateParams(bits)


def negotiate_deflate(header: str | None, default_bits: int = 15) -> DeflateParams | None:
    """The first acceptable permessage-deflate offer, or None (no compression)."""
    if not header:
        return None
    for name, params in parse_extensions(header):
        if name == "permessage-deflate":
            accepted = _accept(params, default_bits)
            if accepted is not None:
                return accepted
    return None
