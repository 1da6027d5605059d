"""Wiring: builds the parts each role needs from the config and runs them until stopped.

``chorus run`` runs every role in one process; on the embedded default (no Kafka, no Redis)
that is the only way, since the in-process log and broker live in that process.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import uuid
from dataclasses import dataclass, field
from typing import Any

from chorus.broker import Broker, MemoryBroker, MemoryStreamState, RedisBroker, RedisStreamState, StreamState
from chorus.config import Config, ConfigError
from chorus.gateway.fallback import KafkaTail, PubSubFallback
from chorus.gateway.modapi import ModerationSetup
from chorus.gateway.node import Node
from chorus.gateway.server import Gateway, GatewayOps
from chorus.ids import IdGenerator
from chorus.ingest.admission import Admission
from chorus.ingest.archiver import Archiver
from chorus.ingest.coordinator import Coordinator
from chorus.ingest.lease import RedisLease, lease_key
from chorus.ingest.limits import open_limits
from chorus.ingest.log import CommentLog, Retention, open_log
from chorus.ingest.moderator import Moderator
from chorus.ingest.reputation import MemoryReputation, RedisReputation, Reputation
from chorus.ingest.store import SqliteStore
from chorus.localkey import needs_own_key
from chorus.metrics import (
    Metrics,
    archiver_families,
    coordinator_families,
    fallback_families,
    gateway_families,
    moderator_families,
)
from chorus.nodeid import FixedNode, NodeLease, fixed_node, lease_node_id
from chorus.ops import LagReader, Operations

__all__ = ["ALL_ROLES", "App", "run_app", "tune_gc", "warn_if_pure"]

log = logging.getLogger("chorus.app")

ALL_ROLES = frozenset({"gateway", "coordinator", "archiver", "moderator"})


async def _node_id(config: Config) -> FixedNode | NodeLease:
    """The id generator's node: from the config, else a lease in Redis renewed in the background
    (chorus/nodeid.py), else 0 on the embedded default."""
    if config.gateway.node_id >= 0 or not config.redis.url:  # embedded: the floor is kept beside the history
        return fixed_node(max(0, config.gateway.node_id),
                          config.history_path.with_name("ids.floor") if config.embedded else None)
    return await lease_node_id(config.redis.url, config.redis.channel_prefix, config.gateway.node_lease_ttl_s)


@dataclass
class App:
    """Every part of one process, so tests and the CLI start and stop them the same way."""

    config: Config
    roles: frozenset[str]
    log: CommentLog
    broker: Broker
    state: StreamState
    store: SqliteStore | None = None
    gateway: Gateway | None = None
    coordinator: Coordinator | None = None
    archiver: Archiver | None = None
    fallback: PubSubFallback | None = None  # a gateway's Kafka delivery while Redis Pub/Sub is down
    moderator: Moderator | None = None
    reputation: Reputation | None = None  # offence scores and shadow-bans (moderator, admission, API)
    ops: Operations | None = None  # metrics, readiness, the metrics listener (chorus/ops.py)
    node_hold: FixedNode | NodeLease | None = None  # the gateway's node id (a lease with Redis: chorus/nodeid.py)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _fallback_task: asyncio.Task[None] | None = None

    @classmethod
    async def build(cls, config: Config, roles: frozenset[str] = ALL_ROLES) -> App:
        if config.embedded and roles != ALL_ROLES:
            raise ConfigError("the embedded default runs every role in one process: use `chorus run`, "
                              "or set kafka.bootstrap and redis.url to run roles apart")
        if bool(config.kafka.bootstrap) != bool(config.redis.url):
            raise ConfigError("config keys kafka.bootstrap and redis.url go together: set both or neither")
        if "gateway" in roles and needs_own_key(config):
            raise ConfigError(f"config key gateway.host: {config.gateway.host} is beyond loopback, and the embedded "
                              "default's development key is public (anyone could mint a moderator token): set "
                              "auth.key, or start with `chorus run`, which keeps a random key in the data dir")
        k = config.kafka
        comment_log = open_log(k.bootstrap, k.topic, k.partitions, k.accept_timeout_ms, k.linger_ms,
                               session_timeout_ms=k.session_timeout_ms, heartbeat_interval_ms=k.heartbeat_interval_ms,
                               retention=Retention(k.log_retention_records, k.log_retention_s, k.log_max_records))
        broker: Broker
        state: StreamState
        node_hold = await _node_id(config) if "gateway" in roles else FixedNode(0)
        node_id = node_hold.id
        r = config.redis
        if r.url:
            broker = RedisBroker(r.url, r.channel_prefix, shards=r.hot_streams, node=node_id, sharded=r.sharded_pubsub)
            state = RedisStreamState(r.url, r.channel_prefix)
        else:
            broker, state = MemoryBroker(), MemoryStreamState()
        app = cls(config, roles, comment_log, broker, state)
        app.reputation = _reputation(config)
        if roles & {"gateway", "archiver", "moderator"}:
            app.store = SqliteStore(config.history_path)
        if "moderator" in roles and config.moderation.enabled:
            app.moderator = await _moderator(config, comment_log, app.store, app.reputation, "gateway" in roles)
        if "coordinator" in roles:
            app.coordinator = _coordinator(config, comment_log, broker, state)
        if "archiver" in roles:
            assert app.store is not None
            app.archiver = Archiver(comment_log, app.store)
        metrics = Metrics()
        app.ops = Operations(config, metrics, app.failed_role, _lag_readers(app))
        if "gateway" in roles:
            app.gateway = _gateway(config, app, node_hold, GatewayOps(app.ops, metrics, config.metrics.on_gateway_port))
        _watch_roles(metrics, app)
        return app

    async def start(self) -> None:
        if self.ops is not None:
            await self.ops.start(self.gateway)
        await self.log.start()
        if self.coordinator is not None:
            self._tasks.append(asyncio.create_task(self.coordinator.run(), name="coordinator"))
        if self.archiver is not None:
            self._tasks.append(asyncio.create_task(self.archiver.run(), name="archiver"))
        if self.moderator is not None:
            self._tasks.append(asyncio.create_task(self.moderator.run(), name="moderator"))
        if self.gateway is not None:
            await self.gateway.start()
        if self.fallback is not None:
            self._fallback_task = asyncio.create_task(self.fallback.run(), name="pubsub-fallback")
            self._tasks.append(self._fallback_task)

    async def stop(self) -> None:
        if self.gateway is not None:  # first, while every part still works (gateway/drain.py)
            await self.gateway.drain()
        if self.fallback is not None and self._fallback_task is not None:  # first: it feeds the gateway's hub
            self.fallback.stop()
            await asyncio.wait([self._fallback_task], timeout=5)
        if self.gateway is not None:
            await self.gateway.stop()
            await self.gateway.admission.limits.close()
        if self.node_hold is not None:  # after the last post: the next holder starts past its ids
            await self.node_hold.release()
        for role in (self.coordinator, self.archiver, self.moderator):
            if role is not None:
                role.stop()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.log.stop()
        if self.gateway is None:
            await self.broker.stop()
        close = getattr(self.state, "close", None)
        if close is not None:
            await close()
        rep_close = getattr(self.reputation, "close", None)
        if rep_close is not None:
            await rep_close()
        if self.store is not None:
            self.store.close()
        if self.ops is not None:
            await self.ops.stop()

    def failed_role(self) -> BaseException | None:
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                return task.exception()
        return None


def _gateway(config: Config, app: App, node_hold: FixedNode | NodeLease, ops: GatewayOps) -> Gateway:
    """The gateway with its node, admission and moderation; the Redis-down fallback beside it."""
    assert app.reputation is not None
    node = Node(app.broker, config.gateway.unsubscribe_delay_ms)
    ids = IdGenerator(node_hold.id, floor_ms=node_hold.floor_ms, hold=node_hold)
    node_hold.attach(ids)
    app.node_hold = node_hold
    admission = Admission(app.log, ids, open_limits(config, app.state))
    admission.shadowed = app.reputation.shadowed_among
    gateway = Gateway(config, admission, node, app.state, app.store,
                      moderation=_moderation_setup(config, app.log, app.broker, app.reputation, node_hold.id), ops=ops)
    if isinstance(app.broker, RedisBroker) and config.fallback.enabled:
        bootstrap, topic = config.kafka.bootstrap, config.kafka.topic
        app.fallback = PubSubFallback(node, app.broker.ping, lambda: KafkaTail(bootstrap, topic), config.fallback,
                                      config.sampling, max_batch=config.coordinator.max_batch)
    return gateway


def _moderation_setup(config: Config, comment_log: CommentLog, broker: Broker, reputation: Reputation,
                      node_id: int) -> ModerationSetup:
    """What the gateway's moderation needs from the app (the API, the connection registry, the
    gateway's control channel): this gateway's instance id and its own Redis client."""
    redis = None
    if config.redis.url:
        from chorus.ingest.limits import redis_client

        redis = redis_client(config.redis.url, 2000)
    return ModerationSetup(comment_log, broker, reputation, f"{node_id}-{uuid.uuid4().hex[:8]}", redis,
                           config.redis.channel_prefix, config.moderation.shadow_ban_s, config.gateway.registry_ttl_s)


def _coordinator(config: Config, comment_log: CommentLog, broker: Broker, state: StreamState) -> Coordinator:
    c = config.coordinator
    return Coordinator(comment_log, broker, state, flush_interval_ms=c.flush_interval_ms, max_batch=c.max_batch,
                       recent_size=c.recent_size, hot_flush_interval_ms=c.hot_flush_interval_ms,
                       busy_above_per_s=c.busy_above_per_s, sampling=config.sampling, group=c.group_id,
                       instance_id=c.instance_id, lease=_coordinator_lease(config))


def _lag_readers(app: App) -> dict[str, LagReader]:
    """The consume loops whose Kafka lag the metrics show, by consumer group."""
    roles = ((app.config.coordinator.group_id, app.coordinator), ("chorus-archiver", app.archiver),
             ("chorus-moderator", app.moderator))
    return {group: role.loop for group, role in roles if role is not None}


def _watch_roles(metrics: Metrics, app: App) -> None:
    """What each role of this process shows on /metrics, read from the role at scrape time."""
    gateway, fallback, coordinator, archiver, moderator = (app.gateway, app.fallback, app.coordinator, app.archiver,
                                                           app.moderator)
    if gateway is not None:
        metrics.watch(lambda: gateway_families(gateway.figures()))
    if fallback is not None:
        metrics.watch(lambda: fallback_families(fallback))
    if coordinator is not None:
        metrics.watch(lambda: coordinator_families(coordinator))
    if archiver is not None:
        metrics.watch(lambda: archiver_families(archiver))
    if moderator is not None:
        metrics.watch(lambda: moderator_families(moderator))


def _coordinator_lease(config: Config) -> RedisLease | None:
    """Coordinators sharing an instance id take turns through a lease in Redis (ingest/lease.py)."""
    c = config.coordinator
    if not (config.redis.url and config.kafka.bootstrap and c.instance_id):
        return None
    return RedisLease(config.redis.url, lease_key(config.redis.channel_prefix, c.instance_id), c.lease_ms)


def _reputation(config: Config) -> Reputation:
    """Offence scores and shadow-bans: in Redis (shared with admission), else in this process."""
    half_life = config.moderation.offence_half_life_s
    if not config.redis.url:
        return MemoryReputation(half_life)
    from chorus.ingest.limits import redis_client

    return RedisReputation(redis_client(config.redis.url, 5000), config.redis.channel_prefix, half_life)


async def _moderator(config: Config, comment_log: CommentLog, store: SqliteStore | None,
                     reputation: Reputation, offload: bool) -> Moderator:
    """The moderator role, its model loaded first (seconds; in a thread): a model that cannot be
    loaded stops start-up with a ConfigError naming moderation.model."""
    from chorus.ingest.model import load_model

    model = await asyncio.to_thread(load_model, config.moderation.model)
    log.info("moderator: model %s", model.name if model is not None else "none (rules and reputation only)")
    return Moderator(comment_log, store, reputation, config.moderation, model, offload)


def tune_gc() -> None:
    """Once started: move everything alive into the permanent generation and collect gen0 less often.

    Under load a gateway allocates tens of thousands of short-lived objects a second (futures,
    callbacks, encoded events) and almost none of them form cycles, so reference counting frees
    them; the cyclic GC's default gen0 threshold (700) made it run hundreds of times a second,
    each full pass walking the modules, config and clients built at start-up, and it took ~30%
    of the gateway's CPU at 1,000 comments/s. gc.freeze() takes what start-up built out of
    every later collection; 50,000 allocations between gen0 passes makes them rare and cheap.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def warn_if_pure(roles: frozenset[str]) -> str | None:
    """A gateway on the pure-Python hub or codec works, at a fraction of the native speed: say so
    at start (an install without a compiler falls back silently; pip hides setup.py's warning)."""
    from chorus.native import CODEC_IMPLEMENTATION, HUB_IMPLEMENTATION, NATIVE_IMPORT_ERROR

    if "gateway" not in roles or (HUB_IMPLEMENTATION, CODEC_IMPLEMENTATION) == ("native", "native"):
        return None
    why = ("CHORUS_PURE is set" if NATIVE_IMPORT_ERROR is None
           else f"the native build did not load: {NATIVE_IMPORT_ERROR}")
    text = (f"pure-Python hub={HUB_IMPLEMENTATION} codec={CODEC_IMPLEMENTATION} loaded ({why}): the gateway works "
            "but serves far fewer viewers per core; reinstall with a C/C++ compiler and the Python headers "
            "(CHORUS_BUILD_NATIVE=always makes a failed build an error)")
    log.warning("%s", text)
    return text


async def run_app(config: Config, roles: frozenset[str], announce: Any = print) -> None:
    """Run until SIGINT/SIGTERM, then stop every part."""
    warn_if_pure(roles)
    # Handlers first: a SIGTERM during start-up or right after the announcement stops gracefully
    # once the app is started, instead of killing the process.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    app = await App.build(config, roles)
    await app.start()
    tune_gc()
    if app.gateway is not None:
        g = config.gateway
        where = "embedded: in-process bus" if config.embedded else f"kafka {config.kafka.bootstrap}, redis"
        announce(f"Chorus {', '.join(sorted(roles))} on http://{g.host}:{app.gateway.port}/ "
                 f"({where}; history {config.history_path})")
    else:
        announce(f"Chorus {', '.join(sorted(roles))} running")
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            failed = app.failed_role()
            if failed is not None:
                log.error("a role stopped: %s", failed)
                break
    await app.stop()
