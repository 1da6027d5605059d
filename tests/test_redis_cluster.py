"""Every Redis use of Chorus on a real Redis Cluster: three masters, three replicas
(services/redis-cluster/start.sh, the `redis_cluster` fixture), pointed at with one
``redis+cluster://`` URL.

Sharded Pub/Sub with channels on several masters and a slot moved under a live subscription;
hot-stream shards over several masters; positions, recent cache, modes and pins in the stream's
slot; reactions and viewer counts; the connection registry by user; node-id and coordinator
leases; bans and shadow-bans; admission split by slot (stream, user, address) with the global
limit leased in chunks, and what a refused post gives back. The failover test (a master
SIGKILLed under load) is tests/test_redis_failover.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis as syncredis

from chorus.broker import RedisBroker, RedisStreamState, StreamMode, set_stream_mode
from chorus.codes import ErrorCode
from chorus.config import ConfigError, load_config
from chorus.counters import RedisCounters
from chorus.ingest.lease import RedisLease
from chorus.ingest.limits import (
    ALL_STREAMS,
    ClusterRateLimiter,
    Limit,
    NonceKeys,
    Poster,
    RedisSanctions,
    redis_client,
)
from chorus.ingest.reputation import RedisReputation, shadow_key
from chorus.nodeid import NodeLease
from chorus.protocol import pack_channel_message
from chorus.redisconn import is_cluster, open_redis, parse_cluster_url
from services import HOST, RedisClusterNodes

pytestmark = pytest.mark.redis_cluster

KEY = "a test key of thirty two bytes or more, not the dev one"
WAIT_S = 10.0  # bound on every wait for a message or a repair (a loaded machine is slow)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


@pytest.fixture
async def client(redis_cluster: RedisClusterNodes) -> AsyncIterator[Any]:
    c = redis_client(redis_cluster.url, 2000)
    yield c
    await c.aclose()


def owner_port(cluster: RedisClusterNodes, slot: int) -> int:
    return next(port for port, ranges in cluster.masters().items() if any(a <= slot <= b for a, b in ranges))


def keyslot(key: str) -> int:
    from redis.crc import key_slot

    return int(key_slot(key.encode()))


def node_command(port: int, *args: Any) -> Any:
    """One command to one node (not through the cluster client)."""
    with syncredis.Redis(host=HOST, port=port) as r:
        return r.execute_command(*args)


def move_slot(cluster: RedisClusterNodes, slot: int, to_port: int) -> None:
    """Give one (key-less) slot to another master, as a resharding does (CLUSTER SETSLOT)."""
    src_port = owner_port(cluster, slot)
    src_id, dst_id = (node_command(p, "CLUSTER MYID").decode() for p in (src_port, to_port))
    node_command(to_port, "CLUSTER SETSLOT", slot, "IMPORTING", src_id)
    node_command(src_port, "CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
    assert not node_command(src_port, "CLUSTER GETKEYSINSLOT", slot, 10)
    for port in cluster.masters():
        node_command(port, "CLUSTER SETSLOT", slot, "NODE", dst_id)


async def wait_for(check: Any, what: str, timeout: float = WAIT_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def streams_on_each_master(cluster: RedisClusterNodes, prefix: str, per_master: int = 2) -> list[str]:
    """Stream ids whose channels (``<prefix>s:<stream>``) cover every master."""
    masters = cluster.masters()
    found: dict[int, list[str]] = {port: [] for port in masters}
    i = 0
    while any(len(v) < per_master for v in found.values()):
        stream = f"st{i}"
        port = owner_port(cluster, keyslot(f"{prefix}s:{stream}"))
        if len(found[port]) < per_master:
            found[port].append(stream)
        i += 1
    return [s for v in found.values() for s in v]


# -- configuration ---------------------------------------------------------------------------------


def test_cluster_url_names_seeds_and_is_checked(tmp_path: Any) -> None:
    parsed = parse_cluster_url("rediss+cluster://app:s%40cret@10.0.0.1:7000,10.0.0.2")
    assert parsed.seeds == (("10.0.0.1", 7000), ("10.0.0.2", 6379))
    assert (parsed.username, parsed.password, parsed.tls) == ("app", "s@cret", True)
    good = tmp_path / "good.toml"
    good.write_text(f'[auth]\nkey = "{KEY}"\n[kafka]\nbootstrap = "k:9092"\n[redis]\nurl = "redis+cluster://a:7000,b:7001"\n')
    assert load_config(good).redis.url == "redis+cluster://a:7000,b:7001"
    for bad in ("redis+cluster://", "redis+cluster://a:x", "redis+cluster://a:7000/2", "http://a:1"):
        path = tmp_path / "bad.toml"
        path.write_text(f'[auth]\nkey = "{KEY}"\n[kafka]\nbootstrap = "k:9092"\n[redis]\nurl = "{bad}"\n')
        with pytest.raises(ConfigError, match=r"redis\.url"):
            load_config(path)


async def test_a_cluster_url_discovers_every_node_from_one_seed(redis_cluster: RedisClusterNodes) -> None:
    one_seed = f"redis+cluster://{HOST}:{redis_cluster.base_port + 4}"  # a replica is a seed too
    c = open_redis(one_seed)
    try:
        assert is_cluster(c)
        await c.set("{x}a", "1")
        assert await c.get("{x}a") == b"1"
        assert sorted(n.port for n in c.get_primaries()) == sorted(redis_cluster.masters())
    finally:
        await c.delete("{x}a")
        await c.aclose()


# -- Pub/Sub ----------------------------------------------------------------------------------------


async def test_sharded_pubsub_subscribes_on_each_channels_master(redis_cluster: RedisClusterNodes,
                                                                prefix: str) -> None:
    streams = streams_on_each_master(redis_cluster, prefix)
    gateway, coordinator = RedisBroker(redis_cluster.url, prefix), RedisBroker(redis_cluster.url, prefix)
    got: list[tuple[str, bytes]] = []
    await gateway.start(lambda stream, data: got.append((stream, data)))
    try:
        for s in streams:
            await gateway.subscribe(s)
        assert gateway._shard_sub is not None
        nodes = {gateway._shard_sub.node_of(gateway.channel(s)) for s in streams}
        assert len(nodes) == 3  # a connection per master, each channel on its slot's
        await wait_for(lambda: _subscribed_everywhere(redis_cluster, prefix, streams), "SSUBSCRIBE on every master")
        for s in streams:
            await coordinator.publish(s, pack_channel_message(s.encode(), 7))
        await wait_for(lambda: len(got) == len(streams), "a message per stream")
        assert sorted(s for s, _ in got) == sorted(streams)
        await gateway.ping()
        await gateway.unsubscribe(streams[0])
        assert gateway._shard_sub.node_of(gateway.channel(streams[0])) is None
    finally:
        await gateway.stop()
        await coordinator.stop()


def _subscribed_everywhere(cluster: RedisClusterNodes, prefix: str, streams: list[str]) -> bool:
    seen: set[bytes] = set()
    for port in cluster.masters():
        seen.update(node_command(port, "PUBSUB SHARDCHANNELS", f"{prefix}s:*"))
    return seen >= {f"{prefix}s:{s}".encode() for s in streams}


async def test_a_subscription_follows_its_slot_to_another_master(redis_cluster: RedisClusterNodes,
                                                                prefix: str) -> None:
    gateway, coordinator = RedisBroker(redis_cluster.url, prefix), RedisBroker(redis_cluster.url, prefix)
    got: list[bytes] = []
    await gateway.start(lambda _stream, data: got.append(data))
    try:
        await gateway.subscribe("moving")
        channel = gateway.channel("moving")
        slot = keyslot(channel)
        before = owner_port(redis_cluster, slot)
        await wait_for(lambda: _subscribed_everywhere(redis_cluster, prefix, ["moving"]), "the subscription")
        await coordinator.publish("moving", b"one")
        await wait_for(lambda: got == [b"one"], "the first message")
        target = next(p for p in redis_cluster.masters() if p != before)
        move_slot(redis_cluster, slot, target)
        assert gateway._shard_sub is not None
        # Redis tells the subscriber (sunsubscribe); it reads the slot map again and moves
        await wait_for(lambda: gateway._shard_sub is not None
                       and gateway._shard_sub.node_of(channel) == f"{HOST}:{target}", "the move")
        await wait_for(lambda: _subscribed_everywhere(redis_cluster, prefix, ["moving"]), "SSUBSCRIBE on the new owner")
        await coordinator.publish("moving", b"two")  # the publisher follows the MOVED reply
        await wait_for(lambda: got == [b"one", b"two"], "the message after the move")
        assert gateway.healthy and gateway._shard_sub.moves >= 1
    finally:
        await gateway.stop()
        await coordinator.stop()


async def test_hot_stream_shards_spread_over_masters(redis_cluster: RedisClusterNodes, prefix: str) -> None:
    k = 6
    publisher = RedisBroker(redis_cluster.url, prefix, shards={"final": k})
    channels = publisher.publish_channels("final", pack_channel_message(b"[]", 1))
    assert len(channels) == k
    assert len({owner_port(redis_cluster, keyslot(ch)) for ch in channels}) >= 2
    gateways = [RedisBroker(redis_cluster.url, prefix, shards={"final": k}, node=n) for n in range(k)]
    got: list[list[bytes]] = [[] for _ in gateways]
    for box, g in zip(got, gateways, strict=True):
        await g.start(lambda _s, data, box=box: box.append(data))  # type: ignore[misc]
        await g.subscribe("final")
    try:
        await wait_for(lambda: _subscribed_everywhere(redis_cluster, prefix, ["final", *(f"final/{i}"
                                                                                 for i in range(k))]), "shards")
        batch = pack_channel_message(b"[batch]", 11)
        await publisher.publish("final", batch)
        await publisher.publish("final", pack_channel_message(b"control"))  # on the stream's own channel
        await wait_for(lambda: all(len(g) == 2 for g in got), "the batch and the control event everywhere")
        assert all(sorted(g) == sorted([batch, pack_channel_message(b"control")]) for g in got)
    finally:
        for g in gateways:
            await g.stop()
        await publisher.stop()


# -- per-stream state ------------------------------------------------------------------------------


async def test_positions_recent_modes_and_pins_live_in_the_streams_slot(redis_cluster: RedisClusterNodes,
                                                                       prefix: str) -> None:
    state, broker = RedisStreamState(redis_cluster.url, prefix), RedisBroker(redis_cluster.url, prefix)
    try:
        comments = [{"id": str(100 + i), "stream": "s1", "offset": i, "text": f"c{i}"} for i in range(5)]
        await state.advance("s1", "e1", comments, keep=3)
        assert await state.position("s1") == ("e1", 4)
        assert [c["id"] for c in await state.recent("s1", 10)] == ["102", "103", "104"]
        after = await state.recent_after("s1", "e1", 2)  # a transaction: both keys in {s1}
        assert after is not None and [c["offset"] for c in after] == [3, 4]
        assert await state.recent_after("s1", "e1", 0) is None  # below the floor
        assert await state.remove("s1", ["103"]) == 1
        assert await state.restore("s1", comments[3])
        await state.note_keep_ratio("s1", "e1", 4, 0.5)
        assert await state.keep_ratios("s1", "e1") == [(4, 0.5)]
        await set_stream_mode(state, broker, "s1", StreamMode(slow_mode_seconds=5))
        assert (await state.get_mode("s1")).slow_mode_seconds == 5
        await state.set_pin("s1", comments[0])
        assert (await state.get_pin("s1") or {}).get("id") == "100"
        keys = [f"{prefix}meta:{{s1}}", f"{prefix}recent:{{s1}}", f"{prefix}mode:{{s1}}", f"{prefix}pin:{{s1}}",
                f"{prefix}sampling:{{s1}}"]
        assert len({keyslot(k) for k in keys}) == 1
        assert await state._redis.exists(*[k for k in keys]) == len(keys)  # same slot: one EXISTS
    finally:
        await state.close()
        await broker.stop()


async def test_reactions_and_viewer_counts(redis_cluster: RedisClusterNodes, prefix: str) -> None:
    a, b = (RedisCounters(redis_cluster.url, prefix, ttl_ms=5000) for _ in range(2))
    try:
        streams = [f"r{i}" for i in range(6)]  # over several masters
        await a.add_reactions({s: {"fire": 2} for s in streams})
        totals = await b.add_reactions({streams[0]: {"wow": 1}}, read=streams)
        assert totals[streams[0]] == {"fire": 2, "wow": 1} and totals[streams[5]] == {"fire": 2}
        await a.report_viewers("gw-a", {s: 3 for s in streams}, {s: [f"u:{i}" for i in range(3)] for s in streams})
        got = await b.report_viewers("gw-b", {s: 2 for s in streams}, {streams[0]: ["u:9"]})
        assert got[streams[0]].now == 5 and got[streams[0]].unique == 4 and got[streams[5]].unique == 3
        _, count = await a.snapshot(streams[1])
        assert count.now == 5
    finally:
        await a.close()
        await b.close()


# -- registry and leases --------------------------------------------------------------------------


async def test_connection_registry_is_sharded_by_user(redis_cluster: RedisClusterNodes, client: Any,
                                                      prefix: str) -> None:
    from chorus.gateway.registry import ConnectionRegistry

    one, two = ConnectionRegistry("gw-1", client, prefix), ConnectionRegistry("gw-2", client, prefix)
    users = [f"user{i}" for i in range(40)]
    for n, user in enumerate(users):
        one.add(user, n, "s1")
    two.add("user3", 99, "s2")
    await one.flush()
    await two.flush()
    assert one.key("user3") == f"{prefix}conn:user:{{user3}}"
    assert len({client.keyslot(one.key(u)) for u in users}) > 20  # spread: one call per slot, one pipeline
    assert sorted(await one.gateways("user3")) == ["gw-1", "gw-2"]
    assert await one.gateways("user7") == ["gw-1"]
    one.remove("user3", 3)
    await one.flush()
    assert await two.gateways("user3") == ["gw-2"]


async def test_node_id_leases_on_a_cluster(redis_cluster: RedisClusterNodes, prefix: str) -> None:
    leases = [NodeLease(redis_client(redis_cluster.url, 2000), prefix, 30.0) for _ in range(3)]
    try:
        ids = [await lease.take() for lease in leases]
        assert len(set(ids)) == 3
        assert [await lease.renew() for lease in leases] == [True] * 3
        assert leases[0].key == f"{prefix}{{node-ids}}node:{ids[0]}"
    finally:
        for lease in leases:
            await lease.release()
    check = redis_client(redis_cluster.url, 2000)
    try:  # released: the leases are gone, each id's floor stays for its next holder
        assert await check.exists(*(f"{prefix}{{node-ids}}node:{i}" for i in ids)) == 0
        assert await check.exists(*(f"{prefix}{{node-ids}}node-floor:{i}" for i in ids)) == 3
    finally:
        await check.aclose()


async def test_coordinator_lease_on_a_cluster(redis_cluster: RedisClusterNodes, prefix: str) -> None:
    first, second = (RedisLease(redis_cluster.url, f"{prefix}coordinator-lease:c", 1000) for _ in range(2))
    try:
        await first.acquire()
        waiting = asyncio.create_task(second.acquire())
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await first.release()
        await asyncio.wait_for(waiting, WAIT_S)
        assert second.terms == 1
    finally:
        await first.close()
        await second.close()


# -- bans, shadow-bans and admission --------------------------------------------------------------


async def test_bans_and_shadow_bans(client: Any, prefix: str) -> None:
    sanctions = RedisSanctions(client, prefix)
    await sanctions.ban("s1", "troll")
    await sanctions.ban(ALL_STREAMS, "quiet", seconds=30)
    assert sanctions.key("s1", "troll") == f"{prefix}ban:{{s1}}:troll"  # the stream's slot
    assert sanctions.key(ALL_STREAMS, "quiet") == f"{prefix}ban:*:{{quiet}}"  # the user's
    refused = await sanctions.check("s1", "troll")
    assert refused is not None and refused.code == ErrorCode.BANNED
    timed = await sanctions.check("s2", "quiet")
    assert timed is not None and timed.code == ErrorCode.TIMED_OUT
    await sanctions.unban("s1", "troll")
    assert await sanctions.check("s1", "troll") is None
    rep = RedisReputation(client, prefix, 3600)
    await rep.shadow_ban([f"sly{i}" for i in range(10)], 600)
    assert await rep.shadowed_among(["sly3", "nice", "sly9"]) == {"sly3", "sly9"}
    scores = await rep.add([(f"u{i}", 1.0) for i in range(10)])  # keys over many slots
    assert scores == {f"u{i}": 1.0 for i in range(10)}
    assert shadow_key(prefix, "sly3", True) == f"{prefix}shadow:{{sly3}}"


async def test_admission_on_the_cluster_checks_each_slot(client: Any, prefix: str) -> None:
    limits = [Limit("user", 2, 60), Limit("ip", 100, 60), Limit("stream", 1000, 1), Limit("global", 100_000, 1)]
    lim = ClusterRateLimiter(client, prefix, limits)
    sanctions = RedisSanctions(client, prefix)
    await sanctions.ban("s1", "troll")
    await sanctions.ban(ALL_STREAMS, "quiet", seconds=30)
    await RedisReputation(client, prefix, 3600).shadow_ban(["sly"], 600)
    posters = [Poster("s1", "troll", "1.1.1.1"), Poster("s1", "quiet"), Poster("s1", "sly", "2.2.2.2"),
               Poster("s2", "sly"), Poster("s1", "sly")]
    got = await lim.decide_many(posters, sanctions.key_prefix, shadow_key(prefix, ""))
    assert [d.sanction.code if d.sanction else None for d in got] == [
        ErrorCode.BANNED, ErrorCode.TIMED_OUT, None, None, None]
    assert 29_000 < (got[1].sanction.retry_after_ms or 0) <= 30_000  # type: ignore[union-attr]
    assert [d.limit is None for d in got] == [True, True, True, True, False]  # sly's third is over 2/min
    assert [d.shadowed for d in got] == [False, False, True, True, True]
    # the banned post took its stream's and address's cells, then gave them back
    assert await client.get(lim.limit_key("ip", "1.1.1.1")) is None
    assert await client.get(lim.limit_key("user", "troll")) is None
    assert lim.refunded >= 3
    assert lim.budget is not None and lim.budget.leases == 1  # the global limit: one lease, 500 cells


async def test_a_post_refused_in_one_slot_gives_back_the_others(client: Any, prefix: str) -> None:
    lim = ClusterRateLimiter(client, prefix, [Limit("user", 100, 60), Limit("stream", 2, 1)])
    first = await lim.decide_many([Poster("busy", f"u{i}") for i in range(3)])
    assert [d.limit is None for d in first] == [True, True, False]  # the stream takes 2 a second
    assert first[2].limit is not None and first[2].limit.code == ErrorCode.RATE_LIMITED
    # u2's user cell went back: 100 more posts of u2 on calm streams all pass
    assert await client.get(lim.limit_key("user", "u2")) is None
    again = await lim.decide_many([Poster(f"calm{i}", "u2") for i in range(100)])
    assert all(d.limit is None for d in again)


async def test_slow_mode_and_retry_keys_on_the_cluster(redis_cluster: RedisClusterNodes, client: Any,
                                                      prefix: str) -> None:
    state = RedisStreamState(redis_cluster.url, prefix)
    try:
        await state.set_mode("slow", StreamMode(slow_mode_seconds=30))
        lim = ClusterRateLimiter(client, prefix, [Limit("user", 100, 60)])
        nonces = NonceKeys(f"{prefix}nonce:", 60_000)
        got = await lim.decide_many([Poster("slow", "ann", nonce="k1"), Poster("slow", "ann", nonce="k2"),
                                     Poster("slow", "mod", slow_mode_exempt=True),
                                     Poster("slow", "mod", slow_mode_exempt=True)],
                                    nonces=nonces, ids=["1", "2", "3", "4"])
        assert [d.limit.code if d.limit else None for d in got] == [None, ErrorCode.SLOW_MODE, None, None]
        assert 29_000 < (got[1].limit.retry_after_ms or 0) <= 30_000  # type: ignore[union-attr]
        # ann's second post was refused: its retry key was given back; the first is in flight
        assert await client.get(lim.nonce_key(nonces, "ann", "k2")) is None
        assert await client.get(lim.nonce_key(nonces, "ann", "k1")) == b"1 p"
        repeat = await lim.decide_many([Poster("slow", "ann", nonce="k1")], nonces=nonces, ids=["9"])
        assert repeat[0].seen == ("1", "p") and repeat[0].limit is None
    finally:
        await state.close()


async def test_gateway_admission_end_to_end_on_the_cluster(redis_cluster: RedisClusterNodes, tmp_path: Any,
                                                          prefix: str) -> None:
    """open_limits builds the cluster limiter from the config; Admission posts through it, and
    the retry keys' outcomes are recorded per user slot."""
    from chorus.auth import Identity
    from chorus.ids import IdGenerator
    from chorus.ingest.admission import Admission
    from chorus.ingest.limits import open_limits
    from chorus.ingest.log import MemoryLog

    path = tmp_path / "c.toml"
    path.write_text(f'[auth]\nkey = "{KEY}"\n[kafka]\nbootstrap = "k:9092"\n[redis]\nurl = "{redis_cluster.url}"\n'
                    f'channel_prefix = "{prefix}"\n[limits]\nuser_per_minute = 3\n')
    config = load_config(path)
    state = RedisStreamState(config.redis.url, prefix)
    limits = open_limits(config, state)
    try:
        assert isinstance(limits.limiter, ClusterRateLimiter) and limits.one_call
        admission = Admission(MemoryLog(), IdGenerator(3), limits)
        who = [Identity(f"u{i}", f"U{i}", frozenset({"write:comments"})) for i in range(4)]
        posts: list[Any] = [(who[i % 4], f"s{i % 3}", f"hello {i}", f"10.0.0.{i % 4}", f"n{i}") for i in range(16)]
        got = await admission.post_many(posts)
        accepted = [r for r in got if not isinstance(r, Exception)]
        assert len(accepted) == 12  # each of 4 users: 3 a minute
        await asyncio.gather(*admission._outcome_tasks)
        again = await admission.post_many(posts[:1])  # a retry: the same id, no new limit taken
        assert getattr(again[0], "id", None) == getattr(got[0], "id", "")
        key = limits.limiter.nonce_key(limits.nonces, "u0", _retry_key("u0", "s0", "n0", "hello 0"))  # type: ignore
        assert (await limits.redis.get(key)).endswith(b" a")
    finally:
        await limits.close()
        await state.close()


def _retry_key(user: str, stream: str, nonce: str, text: str) -> str:
    from chorus.ingest.admission import retry_key

    return retry_key(user, stream, nonce, text)

