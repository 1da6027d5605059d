"""The gateway: HTTP and the WebSocket upgrade on picows + uvloop, then viewers in the hub.

One ``Gateway`` per process. It owns the lifecycle (start, drain, stop) and drives the hub
(``chorus.native.Hub``, see native/HUB.md); each job between is a part of its own, which the
gateway builds and wires in its constructor:

- :class:`~chorus.gateway.routes.HttpRoutes`: which answer each HTTP request gets;
- :class:`~chorus.gateway.join.Join`: an upgrade through to a socket the hub adopted, welcome first;
- :class:`~chorus.gateway.events.ViewerEvents`: what viewers send, read from the hub in drains;
- :class:`~chorus.gateway.posts.PostPipeline`: a comment from arrival to its ack or error;
- :class:`~chorus.gateway.delivery.Delivery`: the broker's events for a stream into the hub;
- :class:`~chorus.gateway.viewers.LocalViewers`: streams with viewers here, connections per address;
- :class:`~chorus.gateway.drain.Drain`: where the graceful drain is;
- :class:`~chorus.gateway.modapi.GatewayModeration` (when the app gives a moderation setup) and
  :class:`~chorus.gateway.engagement.Engagement` (reactions, viewer counts).

After the 101 the gateway holds no Python object per viewer, only the small tag the hub keeps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from chorus import native
from chorus.broker import StreamState
from chorus.codes import CloseCode
from chorus.config import Config, GatewayConfig
from chorus.counters import Counters
from chorus.gateway.delivery import Delivery
from chorus.gateway.drain import DRAIN_REASON, Drain
from chorus.gateway.engagement import Engagement, open_counters
from chorus.gateway.events import ViewerEvents
from chorus.gateway.failures import FailureLog
from chorus.gateway.handoff import picows_protocol_factory
from chorus.gateway.join import Join
from chorus.gateway.modapi import GatewayModeration, ModerationSetup
from chorus.gateway.node import Node
from chorus.gateway.posts import PostPipeline
from chorus.gateway.recovery import Recovery
from chorus.gateway.routes import HttpRoutes, Probes
from chorus.gateway.viewers import LocalViewers
from chorus.ingest.admission import Admission
from chorus.ingest.store import HistoryStore
from chorus.metrics import DeliveryClock, GatewayFigures, Metrics
from chorus.protocol import ChannelMessage

__all__ = ["Gateway", "GatewayOps", "HubTimer", "open_hub"]

log = logging.getLogger("chorus.gateway")

CLOSE_WAIT_S = 1.0  # how long stop() lets the close frames go out


@dataclass(frozen=True, slots=True)
class GatewayOps:
    """What operations (chorus/ops.py, chorus/metrics.py) give a gateway: its probes, and the
    metrics it records (and serves on its own port when ``serve_metrics``)."""

    probes: Probes
    metrics: Metrics
    serve_metrics: bool = True


def open_hub(g: GatewayConfig) -> native.Hub:
    """The hub, with the gateway's limits and timers."""
    return native.Hub(
        flush_interval_ms=g.flush_interval_ms, flush_max_messages=g.flush_max_messages,
        backlog_limit_bytes=g.backlog_limit_bytes, slow_close_after_ms=int(g.slow_close_after_s * 1000),
        max_message_bytes=g.max_message_bytes, max_fragments=g.max_fragments,
        heartbeat_interval_ms=int(g.heartbeat_interval_s * 1000),
        heartbeat_timeout_ms=int(g.heartbeat_timeout_s * 1000),
        deflate_level=g.deflate_level, deflate_window_bits=15, inflate_limit_bytes=g.max_message_bytes,
        max_pings_per_s=g.max_pings_per_s,
    )


class HubTimer:
    """The pure hub has no timerfd: wake it when its next deadline is due."""

    def __init__(self, hub: native.Hub, wake: Callable[[], None]) -> None:
        self.hub = hub
        self.wake = wake
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0

    def fired(self) -> None:
        """The hub is being polled now: the next arm() sets a fresh deadline."""
        self._handle = None

    def arm(self) -> None:
        wait_ms = self.hub.next_timeout_ms()
        if wait_ms < 0:
            return
        at = time.monotonic() + wait_ms / 1000
        if self._handle is not None and self._at <= at:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._at = at
        self._handle = asyncio.get_running_loop().call_later(wait_ms / 1000, self.wake)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


class Gateway:
    """One process's WebSocket edge: its parts, its listener and the hub that drives them."""

    def __init__(self, config: Config, admission: Admission, node: Node, state: StreamState,
                 store: HistoryStore | None, counters: Counters | None = None, *,
                 moderation: ModerationSetup | None = None, ops: GatewayOps | None = None) -> None:
        g = config.gateway
        self.config = config
        self.admission = admission
        self.node = node
        self.store = store
        self.server: asyncio.Server | None = None
        self.started_at = time.time()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.hub = open_hub(g)
        self.timer = HubTimer(self.hub, self.on_hub_ready)
        self.clock = DeliveryClock(self.hub, ops.metrics) if ops is not None else None
        self.failures = FailureLog()  # events and answers that raised (each cost only its own connection)
        self.drain_state = Drain(g.drain_delay_s, g.drain_timeout_s)
        self.recovery = Recovery(state, store, config.history.recover_max)
        self.viewers = LocalViewers(g.max_connections_per_ip, node.release)
        self.moderation = None if moderation is None else GatewayModeration(
            moderation, config, self.hub, self.on_hub_ready, admission.limits.sanctions, state, store)
        self.delivery = Delivery(self.hub, self.viewers, self.timer.arm, self.clock, self.moderation)
        node.deliver = self.delivery.deliver
        # Reactions and viewer counts: their events reach local viewers as control events.
        self.engagement = Engagement(config, counters or open_counters(config), self.viewers.counts,
                                     lambda stream, event: self.delivery.deliver(stream, ChannelMessage(event)))
        refused = None if ops is None else (lambda why: ops.metrics.posts_refused.labels(why).inc())
        self.posts = PostPipeline(self.hub, admission, self.drain_state, self.failures,
                                  max_inflight=config.limits.max_inflight_posts, spawn=self.spawn,
                                  wake=self.on_hub_ready, shadow=self.moderation, refused=refused)
        self.events = ViewerEvents(self.hub, self.viewers, self.posts, self.engagement, self.recovery, self.failures,
                                   backlog_limit_bytes=g.backlog_limit_bytes, spawn=self.spawn,
                                   wake=self.on_hub_ready, leave=self.moderation)
        self.join = Join(config, self.hub, node, state, store, self.recovery, self.engagement, self.viewers,
                         self.delivery, self.drain_state, self.failures, spawn=self.spawn, wake=self.on_hub_ready,
                         gate=self.moderation)
        metrics_page = ops.metrics.render if ops is not None and ops.serve_metrics else None
        self.routes = HttpRoutes(config, self.join, self.engagement, admission, store, self, self.drain_state,
                                 moderation=self.moderation, probes=ops.probes if ops is not None else None,
                                 metrics_page=metrics_page)

    # -- lifecycle --
    async def start(self) -> None:
        g = self.config.gateway
        loop = asyncio.get_running_loop()
        await self.node.start()
        if self.moderation is not None:
            await self.moderation.start()
        self.engagement.start()
        loop.add_reader(self.hub.fileno(), self.on_hub_ready)
        picows_log = logging.getLogger("chorus.picows")
        if not picows_log.isEnabledFor(logging.DEBUG):
            picows_log.setLevel(logging.WARNING)  # it logs every accepted connection at INFO
        factory = picows_protocol_factory(self.routes.route, self.join.recorders,
                                          handshake_timeout_s=g.handshake_timeout_s,
                                          max_frame_size=g.max_message_bytes, logger=picows_log,
                                          http_handler=self.routes.answer)
        self.server = await loop.create_server(factory, g.host, g.port, reuse_port=True, backlog=4096)
        log.info("gateway listening on %s (hub: %s)", ", ".join(str(s.getsockname()) for s in self.server.sockets),
                 native.HUB_IMPLEMENTATION)

    @property
    def listening(self) -> bool:
        return self.server is not None

    @property
    def draining(self) -> bool:
        """SIGTERM: not ready (still serving through gateway.drain_delay_s)."""
        return self.drain_state.draining

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def drain(self) -> None:
        """The graceful drain (gateway/drain.py): readiness off, the listener closed after
        ``gateway.drain_delay_s``, the posts in flight answered. Idempotent."""
        if self.drain_state.drained:
            return
        await self.drain_state.run(self._close_listener, self.posts_in_flight)
        self.on_hub_ready()  # the last answers go out before the close frames

    def _close_listener(self) -> None:
        if self.server is not None:
            self.server.close()

    async def stop(self, code: int = CloseCode.SERVICE_RESTART) -> None:
        """Drain, close every viewer with ``code`` and let the close frames go out."""
        if self.hub.fileno() < 0:
            return  # stopped already
        await self.drain()
        self.hub.close_all(code, DRAIN_REASON if code == CloseCode.SERVICE_RESTART else "gateway stopping")
        self.on_hub_ready()
        deadline = time.monotonic() + CLOSE_WAIT_S
        while self.hub.connections() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            self.on_hub_ready()
        for task in list(self._tasks):
            task.cancel()
        asyncio.get_running_loop().remove_reader(self.hub.fileno())
        self.timer.cancel()
        self.hub.shutdown()
        if self.moderation is not None:
            await self.moderation.stop()
        await self.engagement.stop()
        await self.node.stop()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task the gateway cancels when it stops (and logs if it fails)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("gateway task failed", exc_info=task.exception())

    # -- the hub --
    def on_hub_ready(self) -> None:
        """The hub's epoll fd is readable (or its deadline passed): let it work, then react."""
        self.timer.fired()
        self.hub.poll()
        if self.clock is not None:
            self.clock.polled()
        self.posts.submit(self.events.handle_drain(self.hub.drain()))
        self.timer.arm()

    # -- what operations read --
    def posts_in_flight(self) -> int:
        """WebSocket and HTTP posts between arrival and answer."""
        return self.posts.in_flight + self.routes.http_inflight

    def figures(self) -> GatewayFigures:
        """What ``/metrics`` shows of this gateway (chorus/metrics.py), read now."""
        return GatewayFigures(hub=self.hub.stats(), posts_in_flight=self.posts_in_flight(), draining=self.draining,
                              bad_channel_messages=self.node.bad_messages,
                              failed_deliveries=self.node.failed_deliveries, received=dict(self.node.received))
