"""Recovery: a reconnecting viewer gets exactly what it missed.

Unit cases drive :class:`Recovery` with the in-process state and a real SQLite store (cache
path, history path, tombstones, bounds, a trailing archiver). End-to-end cases run the whole
app on the embedded default and on real Redis + Kafka: a viewer leaves, 1,000 comments are
posted, it comes back, resumes, and receives those 1,000 in order, from the cache when it is
long enough and from the history store when it is not.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from clients import ViewerClient
from test_e2e import Env, make_config, started_app

from chorus.broker import MemoryStreamState
from chorus.gateway.recovery import Recovery
from chorus.ids import IdGenerator
from chorus.ingest.records import Comment, encode_record
from chorus.ingest.store import SqliteStore, StoreUnavailable
from chorus.positions import NO_EPOCH
from chorus.protocol import ChannelMessage

E = "comments:0:test"


def comment(i: int, offset: int, stream: str = "s") -> Comment:
    return Comment(str(5000 + i), stream, "u", "U", (), f"c{i}", 1_764_000_000_000 + i, E, offset)


class World:
    """A stream whose comments sit at offsets 10, 13, 16, ...: the cache and the store fed as
    the coordinator and the archiver would."""

    def __init__(self, tmp_path: Path, count: int, keep: int, archived: int | None = None) -> None:
        self.comments = [comment(i, 10 + 3 * i) for i in range(count)]
        self.state = MemoryStreamState()
        self.store = SqliteStore(tmp_path / "h.sqlite3")
        self.keep = keep
        self.store.write_comments(self.comments[:archived])

    async def publish(self) -> None:
        for i in range(0, len(self.comments), 7):
            await self.state.advance("s", E, [c.to_event() for c in self.comments[i : i + 7]], self.keep)

    def offsets_after(self, offset: int) -> list[int]:
        return [c.offset for c in self.comments if c.offset > offset]


def got(found: Any) -> list[int]:
    return [c["offset"] for c in found.comments]


async def test_from_the_cache_when_it_reaches_back(tmp_path: Path) -> None:
    w = World(tmp_path, 50, keep=20)
    await w.publish()
    r = Recovery(w.state, w.store, recover_max=1000)
    x = w.comments[35].offset
    found = await r.missed("s", E, x)
    assert found.recovered and got(found) == w.offsets_after(x) and r.from_cache == 1
    assert (await r.missed("s", E, w.comments[-1].offset)).comments == []  # nothing missed


async def test_from_the_store_when_the_cache_is_too_short(tmp_path: Path) -> None:
    w = World(tmp_path, 50, keep=20)
    await w.publish()
    r = Recovery(w.state, w.store, recover_max=1000)
    x = w.comments[3].offset
    found = await r.missed("s", E, x)
    assert found.recovered and got(found) == w.offsets_after(x) and r.from_history == 1
    assert [c["id"] for c in found.comments] == [c.id for c in w.comments[4:]]


async def test_the_cache_covers_what_the_archiver_has_not_written_yet(tmp_path: Path) -> None:
    w = World(tmp_path, 50, keep=20, archived=40)  # the store trails by 10, the cache holds 20
    await w.publish()
    found = await Recovery(w.state, w.store, recover_max=1000).missed("s", E, w.comments[2].offset)
    assert found.recovered and got(found) == w.offsets_after(w.comments[2].offset)


async def test_an_archiver_further_behind_than_the_cache_is_waited_for(tmp_path: Path) -> None:
    w = World(tmp_path, 50, keep=5, archived=20)
    await w.publish()
    r = Recovery(w.state, w.store, recover_max=1000, lag_wait_s=0.2)
    started = time.monotonic()
    assert not (await r.missed("s", E, w.comments[2].offset)).recovered
    assert time.monotonic() - started >= 0.2
    catch_up = asyncio.get_running_loop().call_later(0.1, w.store.write_comments, w.comments)
    r.lag_wait_s = 2.0
    found = await r.missed("s", E, w.comments[2].offset)
    catch_up.cancel()
    assert found.recovered and got(found) == w.offsets_after(w.comments[2].offset)


async def test_tombstones_are_skipped(tmp_path: Path) -> None:
    w = World(tmp_path, 30, keep=5)
    await w.publish()
    with w.store._lock:
        w.store._db.execute("UPDATE comments SET is_deleted = 1 WHERE comment_id IN (5004, 5010)")
    found = await Recovery(w.state, w.store, recover_max=1000).missed("s", E, w.comments[4].offset)
    assert found.recovered  # the deleted comment X itself still proves the store reaches back
    assert [c["id"] for c in found.comments] == [c.id for c in w.comments[5:] if c.id != "5010"]


@pytest.mark.parametrize(
    ("why", "epoch", "index", "recover_max"),
    [
        ("another epoch", "comments:0:gone", 3, 1000),
        ("more missed than recover_max", E, 3, 40),
        ("more missed than recover_max, from the cache", E, 45, 2),
        ("the store does not reach back", E, -1, 1000),
    ],
)
async def test_unrecoverable(tmp_path: Path, why: str, epoch: str, index: int, recover_max: int) -> None:
    w = World(tmp_path, 50, keep=20)
    await w.publish()
    x = w.comments[index].offset if index >= 0 else 7  # 7: a position the store never had
    found = await Recovery(w.state, w.store, recover_max=recover_max, lag_wait_s=0).missed("s", epoch, x)
    assert (found.recovered, found.comments) == (False, []), why


async def test_a_store_that_fails_is_unrecoverable_not_an_error(tmp_path: Path) -> None:
    class DownStore:
        def since(self, *args: Any) -> Any:
            raise StoreUnavailable("disk on fire")

    w = World(tmp_path, 50, keep=5)
    await w.publish()
    found = await Recovery(w.state, DownStore(), recover_max=1000, lag_wait_s=0).missed(  # type: ignore[arg-type]
        "s", E, w.comments[3].offset)
    assert not found.recovered


async def test_joined_before_the_first_comment(tmp_path: Path) -> None:
    w = World(tmp_path, 30, keep=100)
    r = Recovery(w.state, w.store, recover_max=1000)
    assert (await r.missed("s", NO_EPOCH, -1)).recovered  # still nothing: nothing missed
    await w.publish()
    found = await r.missed("s", NO_EPOCH, -1)
    assert found.recovered and found.epoch == E and got(found) == w.offsets_after(-1)
    w.keep = 5
    w.state = MemoryStreamState()
    await w.publish()
    found = await Recovery(w.state, w.store, recover_max=1000).missed("s", NO_EPOCH, -1)
    assert found.recovered and got(found) == w.offsets_after(-1)  # via the store


async def test_state_lost_but_the_store_remembers(tmp_path: Path) -> None:
    """Redis lost its data (no position at all): the store alone serves the viewer's epoch."""
    w = World(tmp_path, 30, keep=5)
    found = await Recovery(MemoryStreamState(), w.store, recover_max=1000).missed("s", E, w.comments[10].offset)
    assert found.recovered and got(found) == w.offsets_after(w.comments[10].offset)


async def test_no_position_and_no_cache_replays_the_stores_newest_epoch(tmp_path: Path) -> None:
    """A viewer that saw nothing ("") after the cache was lost: everything the store has."""
    w = World(tmp_path, 30, keep=5)
    found = await Recovery(MemoryStreamState(), w.store, recover_max=1000).missed("s", NO_EPOCH, -1)
    assert found.recovered and found.epoch == E and got(found) == w.offsets_after(-1)
    too_many = await Recovery(MemoryStreamState(), w.store, recover_max=20).missed("s", NO_EPOCH, -1)
    assert not too_many.recovered


async def test_welcome_from_the_store_when_the_cache_is_gone(tmp_path: Path) -> None:
    w = World(tmp_path, 30, keep=5)
    w.store.delete_comments("s", [w.comments[25].id])
    r = Recovery(w.state, w.store, recover_max=1000)
    view = await r.welcome("s", NO_EPOCH, -1, [], 10)
    live = [c for c in w.comments if c.id != w.comments[25].id]
    assert [c["id"] for c in view.recent] == [c.id for c in live[-10:]]  # oldest first, no tombstone
    assert (view.epoch, view.offset) == (E, w.comments[-1].offset) and r.welcomes_from_history == 1
    # A cache holding only the newest few: the older ones come from the store; the position is the cache's.
    await w.publish()
    (epoch, offset), recent = await w.state.position("s"), await w.state.recent("s", 10)
    assert len(recent) == 5
    view = await r.welcome("s", epoch, offset, recent, 10)
    assert [c["id"] for c in view.recent] == [c.id for c in w.comments[20:]]  # the cache was not told of the delete
    assert (view.epoch, view.offset) == (epoch, offset)
    full = await r.welcome("s", epoch, offset, recent, 5)  # enough in the cache: no read
    assert full.recent == recent and r.welcomes_from_history == 2
    empty = await Recovery(MemoryStreamState(), SqliteStore(tmp_path / "e.sqlite3"), 1000).welcome("x", "", -1,
                                                                                                   [], 10)
    assert (empty.epoch, empty.offset, empty.recent) == ("", -1, [])


def test_batches_are_chunked_in_order(tmp_path: Path) -> None:
    from chorus.gateway.recovery import Recovered

    found = Recovered(E, [c.to_event() for c in (comment(i, i) for i in range(450))])
    batches = list(found.batch_events("s", size=200))
    assert [len(b["comments"]) for b in batches] == [200, 200, 50]
    assert [b["offset"] for b in batches] == [199, 399, 449]
    assert all(b["t"] == "batch" and b["epoch"] == E and b["stream"] == "s" for b in batches)


# -- end to end --

MISSED = 1000


async def post_directly(env: Env, stream: str, count: int) -> set[str]:
    """Append ``count`` comments to the app's log (what admission does after its checks)."""
    ids = IdGenerator(1000 + int(uuid.uuid4().int % 23))
    comments = [Comment(ids.next(), stream, "p", "Poster", (), f"missed {i}", 1_764_000_000_000 + i)
                for i in range(count)]
    for i in range(0, count, 50):
        await asyncio.gather(*(env.app.log.append(*encode_record(c)) for c in comments[i : i + 50]))
    return {c.id for c in comments}


async def collect_until(client: ViewerClient, want: set[str], timeout: float = 30) -> list[dict[str, Any]]:
    """Comments from batches until every id in ``want`` arrived (in arrival order, duplicates kept)."""
    got_: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not want <= {c["id"] for c in got_}:
        event = await client.next_event(max(0.1, deadline - time.monotonic()))
        if event["t"] == "batch":
            got_ += event["comments"]
    return got_


async def resume(client: ViewerClient, epoch: str, offset: int) -> tuple[list[dict[str, Any]], bool]:
    await client.send_json({"t": "resume", "epoch": epoch, "offset": offset})
    comments: list[dict[str, Any]] = []
    while True:
        event = await client.next_event(30)
        if event["t"] == "resumed":
            return comments, event["recovered"]
        if event["t"] == "batch":
            comments += event["comments"]


@pytest.mark.parametrize("backend", ["embedded", pytest.param("services", marks=pytest.mark.services)])
@pytest.mark.parametrize(("recent_size", "path"), [(2000, "cache"), (100, "history")])
async def test_a_viewer_that_was_away_gets_exactly_what_it_missed(
        tmp_path: Path, request: pytest.FixtureRequest, backend: str, recent_size: int, path: str) -> None:
    app = await started_app(make_config(tmp_path, backend, request, coordinator__recent_size=recent_size))
    try:
        env = Env(app)
        await env.warm_up()
        assert app.gateway is not None and app.store is not None
        stream = f"r-{uuid.uuid4().hex[:6]}"
        watcher = await env.viewer(stream)  # stays: tells us when everything was published
        leaver = await env.viewer(stream)
        (first,) = await post_directly(env, stream, 1)
        batch = await leaver.wait_for(lambda e: e["t"] == "batch", timeout=30)
        assert batch["comments"][0]["id"] == first
        position = (batch["epoch"], batch["offset"])
        await leaver.close()

        missed = await post_directly(env, stream, MISSED)
        live = await collect_until(watcher, missed | {first})
        expected = [c["id"] for c in sorted(live, key=lambda c: c["offset"]) if c["id"] in missed]
        expected = list(dict.fromkeys(expected))
        deadline = time.monotonic() + 20
        while app.store.count(stream) < MISSED + 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert app.store.count(stream) == MISSED + 1

        back = await env.viewer(stream)
        replayed, recovered = await resume(back, *position)
        assert recovered is True
        assert [c["id"] for c in replayed] == expected  # all 1,000, in order, nothing else
        offsets = [c["offset"] for c in replayed]
        assert offsets == sorted(set(offsets)) and offsets[0] > position[1]
        counter = app.gateway.recovery.from_cache if path == "cache" else app.gateway.recovery.from_history
        assert counter == 1, f"expected the {path} path"
        for c in (watcher, back):
            await c.close()
    finally:
        await app.stop()


async def test_more_missed_than_recover_max_is_unrecovered(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    app = await started_app(make_config(tmp_path, "embedded", request, coordinator__recent_size=100,
                                        history__recover_max=500))
    try:
        env = Env(app)
        stream = f"r-{uuid.uuid4().hex[:6]}"
        watcher = await env.viewer(stream)
        await post_directly(env, stream, 1)
        batch = await watcher.wait_for(lambda e: e["t"] == "batch")
        await collect_until(watcher, await post_directly(env, stream, 600))
        back = await env.viewer(stream)
        assert await resume(back, batch["epoch"], batch["offset"]) == ([], False)
        for c in (watcher, back):
            await c.close()
    finally:
        await app.stop()


def stuck_viewer(port: int, stream: str) -> socket.socket:
    """A viewer that upgrades and then never reads again (a tiny receive buffer): the hub keeps
    whatever is sent to it as backlog."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET /ws?stream={stream} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    sock.settimeout(5)
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_a_resume_is_paced_by_its_own_viewer_not_the_gateways_backlog(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Another viewer holds a large backlog (it stopped reading); a resume of 1,000 missed
    comments still goes at the pace of the resuming viewer's own socket."""
    app = await started_app(make_config(tmp_path, "embedded", request, gateway__slow_close_after_s=120))
    try:
        env = Env(app)
        gw = app.gateway
        assert gw is not None
        limit = app.config.gateway.backlog_limit_bytes
        stuck = await asyncio.to_thread(stuck_viewer, env.port, "stuck")
        big = json.dumps({"t": "note", "pad": "x" * 60_000}).encode()  # control events: never skipped
        for _ in range(100):
            if gw.hub.stats()["backlog_bytes"] > 4 * limit:
                break
            gw.delivery.deliver("stuck", ChannelMessage(big))
            await asyncio.sleep(0.01)
        assert gw.hub.stats()["backlog_bytes"] > 4 * limit

        stream = f"p-{uuid.uuid4().hex[:6]}"
        watcher = await env.viewer(stream)
        await post_directly(env, stream, 1)
        batch = await watcher.wait_for(lambda e: e["t"] == "batch", timeout=30)
        await collect_until(watcher, await post_directly(env, stream, MISSED))
        back = await env.viewer(stream)
        started = time.monotonic()
        replayed, recovered = await resume(back, batch["epoch"], batch["offset"])
        took = time.monotonic() - started
        assert recovered and len({c["id"] for c in replayed}) == MISSED
        assert gw.hub.stats()["backlog_bytes"] > 4 * limit  # the stuck viewer still holds its backlog
        assert took < 3.0, f"the resume took {took:.2f} s"  # it used to wait out its 5 s deadline
        print(f"resume of {MISSED} missed beside a {gw.hub.stats()['backlog_bytes']} B backlog: {took:.3f} s")
        for c in (watcher, back):
            await c.close()
        stuck.close()
    finally:
        await app.stop()
