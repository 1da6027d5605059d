"""Microbenchmarks of the hub's fan-out (pytest-benchmark), native and pure: publish + flush to 1k viewers.

Not collected by the default run (testpaths is tests/). Run with
`pytest bench/micro/test_hub_bench.py -q --benchmark-only`. Each round publishes a batch of
events to one stream of 1000 socketpair viewers and flushes: one buffer per variant, one
send() per viewer. The viewers' sockets are emptied between rounds, outside the timing, so
every round takes the fast path (no backlog).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from chorus.native import _hub, hub_pure

HUBS = {"native": _hub, "pure": hub_pure}

VIEWERS = 1000
COMMENT = {"id": "01J0000000000000000000000", "user": "viewer42", "text": "great stream! é 😀"}


def event(offset: int, comments: int) -> tuple[bytes, bytes]:
    body = {"t": "batch", "offset": offset, "comments": [COMMENT] * comments}
    return json.dumps(body, separators=(",", ":")).encode(), msgpack.packb(body)


class Fanout:
    def __init__(self, module: Any, variant: int) -> None:
        self.hub = module.Hub(flush_interval_ms=60_000, flush_max_messages=10_000)
        self.clients: list[socket.socket] = []
        for _ in range(VIEWERS):
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            self.hub.adopt(theirs.detach(), 1, variant)
            self.clients.append(ours)

    def empty_sockets(self) -> None:
        for sock in self.clients:
            try:
                while sock.recv(1 << 16):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        self.hub.shutdown()
        for sock in self.clients:
            sock.close()


@pytest.fixture(params=[(impl, v) for impl in HUBS for v in ("json", "json+deflate")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def fanout(request: pytest.FixtureRequest) -> Iterator[Fanout]:
    impl, variant = request.param
    f = Fanout(HUBS[impl], _hub.JSON | (_hub.DEFLATE if variant == "json+deflate" else 0))
    yield f
    f.close()


@pytest.mark.parametrize("events", [1, 10])
def test_publish_flush_1k_viewers(benchmark: Any, fanout: Fanout, events: int) -> None:
    benchmark.group = f"publish {events} x 10 comments + flush to {VIEWERS} viewers"
    items = [(1, event(i, 10), False, 10) for i in range(events)]

    def round_() -> None:
        fanout.hub.publish_many(items)
        fanout.hub.flush()

    before = fanout.hub.stats()
    benchmark.pedantic(round_, setup=fanout.empty_sockets, rounds=50, warmup_rounds=2)
    after = fanout.hub.stats()
    flushes = after["flushes"] - before["flushes"]
    assert after["writes"] - before["writes"] == flushes * VIEWERS  # one send per viewer
    assert after["frames_built"] - before["frames_built"] == flushes  # one buffer per flush
    assert after["partial_writes"] == 0
