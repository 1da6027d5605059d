"""Comment ids: time-ordered, unique per node, decodable to their time; node ids leased in the
real Redis (chorus/nodeid.py) so two live gateways never share one."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from test_e2e import make_config

from chorus.app import App
from chorus.auth import Identity
from chorus.ids import MAX_NODE, NODE_BITS, SEQ_BITS, IdGenerator, IdsUnavailable, id_time_ms
from chorus.ingest.admission import Admission, Refused
from chorus.ingest.limits import redis_client
from chorus.ingest.log import MemoryLog
from chorus.nodeid import NodeIdUnavailable, NodeLease


def test_ids_increase_and_carry_their_time() -> None:
    now = [1_764_037_000_123]
    gen = IdGenerator(5, clock_ms=lambda: now[0])
    ids = [gen.next_int() for _ in range(5000)]  # more than 4096 in one millisecond
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert id_time_ms(ids[0]) == now[0]
    now[0] -= 10  # the clock steps back: ids keep increasing
    assert gen.next_int() > ids[-1]


def test_nodes_never_collide() -> None:
    a = IdGenerator(1, clock_ms=lambda: 1_764_037_000_000)
    b = IdGenerator(2, clock_ms=lambda: 1_764_037_000_000)
    assert {a.next() for _ in range(1000)}.isdisjoint({b.next() for _ in range(1000)})


def test_a_clock_far_behind_keeps_ids_increasing_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    now = [1_764_037_000_000]
    gen = IdGenerator(3, clock_ms=lambda: now[0])
    before = [gen.next_int() for _ in range(10)]
    now[0] -= 60_000  # NTP steps the clock back a minute
    with caplog.at_level(logging.WARNING, "chorus.ids"):
        after = [gen.next_int() for _ in range(9000)]  # past two milliseconds' worth of sequence
    assert after == sorted(after) and after[0] > before[-1] and len(set(before + after)) == 9010
    assert id_time_ms(after[-1]) == 1_764_037_000_002  # borrowed ahead of the clock, not repeated
    assert [r.message for r in caplog.records if "behind" in r.message][:1] and \
        sum("behind" in r.message for r in caplog.records) == 1  # once per episode, not per id


def test_a_floor_starts_ids_after_the_previous_holders() -> None:
    """A restart whose clock is behind the last holder's ids starts past them, not among them."""
    old = IdGenerator(7, clock_ms=lambda: 1_764_037_000_500)
    old_ids = {old.next_int() for _ in range(100)}
    new = IdGenerator(7, clock_ms=lambda: 1_764_037_000_000, floor_ms=old.last_ms)
    new_ids = [new.next_int() for _ in range(100)]
    assert old_ids.isdisjoint(new_ids) and min(new_ids) > max(old_ids)


def test_the_epoch_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="node id must be 0-1023"):
        IdGenerator(MAX_NODE + 1)
    with pytest.raises(IdsUnavailable, match="before the id epoch"):
        IdGenerator(1, clock_ms=lambda: 1_000).next_int()


# -- node id leases in the real Redis --------------------------------------------------------


def node_of(comment_id: int) -> int:
    return (comment_id >> SEQ_BITS) & ((1 << NODE_BITS) - 1)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


@pytest.fixture
async def leases(redis_url: str, prefix: str) -> AsyncIterator[Callable[..., NodeLease]]:
    made: list[NodeLease] = []

    def make(ttl_s: float = 30.0) -> NodeLease:
        lease = NodeLease(redis_client(redis_url, 2000), prefix, ttl_s)
        made.append(lease)
        return lease

    yield make
    for lease in made:
        await lease.release()


async def test_1030_leases_in_a_loop_never_share_a_live_id(leases: Callable[..., NodeLease]) -> None:
    """Past the 1,024 starts after which the old counter repeated itself: a long-lived gateway
    and a few short-lived ones at a time, 1,030 starts, never two live holders of one id."""
    elder = leases()
    await elder.take()
    live: list[NodeLease] = []
    taken = 0
    for n in range(1030):
        lease = leases()
        await lease.take()
        taken += 1
        assert lease.id != elder.id and lease.id not in {other.id for other in live}, f"start {n}"
        live.append(lease)
        if len(live) > 5:
            await live.pop(0).release()
    assert taken == 1030 and elder.held()


async def test_no_free_id_refuses_to_start(leases: Callable[..., NodeLease], redis_url: str, prefix: str) -> None:
    client = redis_client(redis_url, 2000)
    try:  # 1,024 live leases (written directly: as if 1,024 gateways held one each)
        await client.mset({f"{prefix}node:{i}": f"gw{i}" for i in range(MAX_NODE + 1)})
    finally:
        await client.aclose()
    with pytest.raises(NodeIdUnavailable, match="every node id 0-1023 is leased"):
        await leases().take()


async def test_two_gateways_started_concurrently_get_different_ids(request: pytest.FixtureRequest, tmp_path: Path,
                                                                   redis_url: str, prefix: str) -> None:
    # Built, not started: leasing needs only Redis (Kafka's producer starts with the app).
    configs = [make_config(tmp_path / f"gw{n}", "embedded", request, redis__url=redis_url,
                           kafka__bootstrap="127.0.0.1:9", redis__channel_prefix=prefix) for n in range(2)]
    client = redis_client(configs[0].redis.url, 2000)
    try:  # a long-lived gateway holds node 0, and 1,023 gateways started since: the counter wraps onto it
        await client.set(f"{prefix}node:0", "a-long-lived-gateway", px=60_000)
        await client.set(f"{prefix}node-seq", 1023)
    finally:
        await client.aclose()
    apps = await asyncio.gather(*(App.build(c, frozenset({"gateway"})) for c in configs))
    try:
        ids = [app.gateway.admission.ids for app in apps]  # type: ignore[union-attr]
        assert ids[0].node_id != ids[1].node_id and 0 not in (ids[0].node_id, ids[1].node_id)
        made = [node_of(gen.next_int()) for gen in ids]
        assert made == [ids[0].node_id, ids[1].node_id]
    finally:
        for app in apps:
            await app.stop()
    client = redis_client(configs[0].redis.url, 2000)
    try:  # both released on stop
        assert await client.exists(*(f"{prefix}node:{gen.node_id}" for gen in ids)) == 0
    finally:
        await client.aclose()


async def test_a_lapsed_lease_mints_no_ids(leases: Callable[..., NodeLease], redis_url: str, prefix: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    lease = leases(ttl_s=1.0)
    await lease.take()
    gen = IdGenerator(lease.id, floor_ms=lease.floor_ms, hold=lease)
    lease.attach(gen)
    admission = Admission(MemoryLog(), gen)
    who = Identity("alice", "Alice", frozenset({"read", "write:comments"}))
    assert (await admission.post(who, "s", "while held")).id
    lease.start()
    await asyncio.sleep(1.2)  # renewals keep it past its ttl
    assert lease.held()
    await lease.stop_renewing()  # renewal paused (a stalled loop, Redis out of reach)
    deadline = time.monotonic() + 5
    while lease.held() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not lease.held()
    with pytest.raises(IdsUnavailable, match="could not renew"):
        gen.next_int()
    with pytest.raises(Refused) as refused:
        await admission.post(who, "s", "after the lapse")
    assert refused.value.code == "not_accepted" and "not posted" in refused.value.reason
    # Meanwhile Redis let the key expire: another gateway could now hold this id.
    client = redis_client(redis_url, 2000)
    try:
        await asyncio.sleep(0.4)
        assert not await client.exists(lease.key)
        await client.set(lease.key, "another-gateway")
    finally:
        await client.aclose()
    with caplog.at_level(logging.ERROR, "chorus.nodeid"):
        assert not await lease.renew()  # and it does: this gateway never posts again
    assert not lease.held() and "taken by another gateway" in lease.why_not()
    assert any("refuses posts" in r.message for r in caplog.records)


async def test_an_expired_lease_nobody_took_is_taken_back_past_the_last_holders_ids(
        leases: Callable[..., NodeLease], redis_url: str) -> None:
    lease = leases(ttl_s=30.0)
    await lease.take()
    gen = IdGenerator(lease.id, hold=lease)
    lease.attach(gen)
    client = redis_client(redis_url, 2000)
    try:
        ahead = time.time_ns() // 1_000_000 + 5_000  # another holder in between reached 5 s ahead
        await client.delete(lease.key)  # expired in Redis (as after an outage)
        await client.set(lease.floor_key, str(ahead))
        assert await lease.renew() and lease.held()
        assert await client.get(lease.key) == lease.owner.encode()
    finally:
        await client.aclose()
    assert id_time_ms(gen.next_int()) > ahead


async def test_release_records_how_far_ids_went_for_the_next_holder(leases: Callable[..., NodeLease],
                                                                     redis_url: str, prefix: str) -> None:
    first = leases()
    await first.take()
    gen = IdGenerator(first.id, hold=first, clock_ms=lambda: time.time_ns() // 1_000_000 + 60_000)
    first.attach(gen)
    last = gen.next_int()  # this host's clock ran a minute fast
    await first.release()
    client: Any = redis_client(redis_url, 2000)
    try:  # the next start begins at that id
        await client.set(f"{prefix}node-seq", first.id - 1)
    finally:
        await client.aclose()
    second = leases()
    assert await second.take() == first.id
    after = IdGenerator(second.id, floor_ms=second.floor_ms, hold=second).next_int()
    assert after > last


async def test_an_embedded_restart_with_the_clock_set_back_does_not_repeat_ids(request: pytest.FixtureRequest,
                                                                                tmp_path: Path) -> None:
    """The worst clock step: the restarted process reads the very millisecond the last one did.
    Without the floor kept beside the history, its first ids are the ones already stored, and
    the history store drops them (INSERT OR IGNORE)."""
    stepped = 1_764_037_000_000
    config = make_config(tmp_path, "embedded", request, limits__user_per_minute=0)
    who = Identity("dana", "Dana", frozenset({"read", "write:comments"}))
    made: list[str] = []
    for run in range(2):
        app = await App.build(config)
        await app.start()
        try:
            assert app.gateway is not None and app.store is not None
            app.gateway.admission.ids._clock_ms = lambda: stepped
            for n in range(3):
                made.append((await app.gateway.admission.post(who, "s", f"run {run} comment {n}")).id)
            store = app.store
            deadline = time.monotonic() + 10
            while store.count("s") < len(made) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await app.stop()
    assert len(set(made)) == 6 and made == sorted(made, key=int)
    assert (tmp_path / "ids.floor").exists()
    app = await App.build(config)
    try:
        assert app.store is not None and app.store.count("s") == 6  # every comment stored
    finally:
        await app.stop()
