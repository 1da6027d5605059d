"""The RFC 6455 frame codec and the hub: chooses the C++ modules or their pure-Python twins.

The codec is ``chorus.native._wsframe``, the hub's own C++ parser and encoder (native/src/
wsframe.cpp) behind ``codec_pure``'s API, so there is one native frame parser: the one that
serves traffic. This is the one place that chooses. It loads ``_wsframe`` unless ``CHORUS_PURE`` is
set to a non-empty value other than "0", or the extension is not built (then the import error is
kept in ``NATIVE_IMPORT_ERROR``). ``IMPLEMENTATION`` says which one is in use; tests assert it
so a broken build cannot silently test the fallback. Everyone else imports from here.
"""

from __future__ import annotations

if __name__ != "chorus.native":  # one import name: the folder is installed as chorus.native
    raise ImportError(f"import chorus.native, not {__name__} (pip install -e . maps native/ to chorus.native)")

import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = [
    "CLOSE_INVALID_DATA",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_TOO_BIG",
    "COMPRESSED",
    "IMPLEMENTATION",
    "NATIVE_IMPORT_ERROR",
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

NATIVE_IMPORT_ERROR: str | None = None  # why the native module did not load, if it did not


def _choose(native: str, pure: str) -> tuple[ModuleType, str]:
    """The native module unless CHORUS_PURE is set or it does not import (the reason is kept)."""
    global NATIVE_IMPORT_ERROR
    if os.environ.get("CHORUS_PURE", "") not in ("", "0"):
        return importlib.import_module(f"chorus.native.{pure}"), "pure"
    try:
        return importlib.import_module(f"chorus.native.{native}"), "native"
    except ImportError as exc:
        NATIVE_IMPORT_ERROR = f"{NATIVE_IMPORT_ERROR or ''} {exc}".strip()
        return importlib.import_module(f"chorus.native.{pure}"), "pure"


_impl, IMPLEMENTATION = _choose("_wsframe", "codec_pure")

if TYPE_CHECKING:
    # The pure twin is the typing reference; _wsframe.pyi declares the same names.
    from chorus.native.codec_pure import (
        CLOSE_INVALID_DATA,
        CLOSE_PROTOCOL_ERROR,
        CLOSE_TOO_BIG,
        COMPRESSED,
        OP_BINARY,
        OP_CLOSE,
        OP_CONT,
        OP_PING,
        OP_PONG,
        OP_TEXT,
        FrameParser,
        ProtocolError,
        encode_close,
        encode_frame,
        encode_frames,
        validate_utf8,
    )
else:
    OP_CONT = _impl.OP_CONT
    OP_TEXT = _impl.OP_TEXT
    OP_BINARY = _impl.OP_BINARY
    OP_CLOSE = _impl.OP_CLOSE
    OP_PING = _impl.OP_PING
    OP_PONG = _impl.OP_PONG
    COMPRESSED = _impl.COMPRESSED
    CLOSE_PROTOCOL_ERROR = _impl.CLOSE_PROTOCOL_ERROR
    CLOSE_INVALID_DATA = _impl.CLOSE_INVALID_DATA
    CLOSE_TOO_BIG = _impl.CLOSE_TOO_BIG
    FrameParser = _impl.FrameParser
    ProtocolError = _impl.ProtocolError
    encode_close = _impl.encode_close
    encode_frame = _impl.encode_frame
    encode_frames = _impl.encode_frames
    validate_utf8 = _impl.validate_utf8


# The hub (native/HUB.md): the C++ ``_hub`` or its pure twin, chosen by the same switch. The
# codec and the hub load independently, so IMPLEMENTATION says "native" only if both did.
hub, HUB_IMPLEMENTATION = _choose("_hub", "hub_pure")
CODEC_IMPLEMENTATION = IMPLEMENTATION
if HUB_IMPLEMENTATION != CODEC_IMPLEMENTATION:
    IMPLEMENTATION = f"mixed (codec {CODEC_IMPLEMENTATION}, hub {HUB_IMPLEMENTATION})"
Hub = hub.Hub
__all__ += ["CODEC_IMPLEMENTATION", "HUB_IMPLEMENTATION", "Hub", "hub"]
