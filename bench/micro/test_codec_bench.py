"""Microbenchmarks of the RFC 6455 frame codec, native against pure (pytest-benchmark).

The native twin is ``chorus.native._wsframe``: the hub's C++ parser and encoder
(native/src/wsframe.cpp) behind codec_pure's API. The hub calls that code directly; these
numbers are what Python callers of ``chorus.native`` pay (pybind11 calls, a copy of each feed).

Not collected by the default run (testpaths is tests/). Run with
`pytest bench/micro -q --benchmark-only`; each group holds one operation for both twins.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import pytest

import chorus.native.codec_pure as pure

native: ModuleType | None
try:
    import chorus.native._wsframe as native
except ImportError:
    if os.environ.get("CHORUS_EXPECT_IMPL") == "native":
        raise
    native = None

IMPLS = [
    pytest.param(native, id="native", marks=pytest.mark.skipif(native is None, reason="no build")),
    pytest.param(pure, id="pure"),
]

COMMENT = ("great stream! é 😀 " * 8).encode()[:120]  # a chat comment: 120 bytes, mostly ASCII
MASK = b"\x37\xfa\x21\x3d"


def masked_text_frame(payload: bytes) -> bytes:
    """A client text frame (RFC 6455 5.2, 5.3), built without the code under test."""
    body = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + MASK + body


@pytest.fixture(params=IMPLS)
def codec(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


def test_encode_frame_120b(benchmark: Any, codec: ModuleType) -> None:
    benchmark.group = "encode_frame 120 B"
    frame = benchmark(codec.encode_frame, codec.OP_TEXT, COMMENT)
    assert len(frame) == 122


def test_encode_frames_16x120b(benchmark: Any, codec: ModuleType) -> None:
    benchmark.group = "encode_frames 16 x 120 B"
    frames = benchmark(codec.encode_frames, codec.OP_TEXT, [COMMENT] * 16)
    assert len(frames) == 16 * 122


def test_parse_1000_masked_120b(benchmark: Any, codec: ModuleType) -> None:
    benchmark.group = "parse 1000 masked text frames of 120 B"
    data = masked_text_frame(COMMENT) * 1000

    def parse() -> list[tuple[int, bytes]]:
        return codec.FrameParser().feed(data)

    messages = benchmark(parse)
    assert len(messages) == 1000 and messages[-1] == (codec.OP_TEXT, COMMENT)


def test_validate_utf8_4kib(benchmark: Any, codec: ModuleType) -> None:
    benchmark.group = "validate_utf8 4 KiB of mixed text"
    text = (COMMENT * 35)[:4096].decode("utf-8", "ignore").encode()
    assert benchmark(codec.validate_utf8, text) is True
