"""Prometheus metrics of every role, and the small HTTP listener that serves them.

Why ``prometheus_client``: the exposition format has escaping, histogram bucket and
OpenMetrics rules that a hand-written printer would have to get right and keep right; the
library is pure Python with no dependencies, and its custom-collector interface lets most
figures be read at scrape time from counters the roles keep anyway (the hub's ``stats()``,
the node's and coordinator's counts), so the hot path pays nothing for them. Only the two
latency histograms are observed as events happen. Each :class:`Metrics` has its own
registry, so several apps in one process (the tests) never share a series.

Latency is measured from a stamp the coordinator puts in each batch's channel header
(``published_us``, its wall clock when it publishes, chorus/protocol.py):
- ``chorus_pubsub_latency_seconds``: publish -> the gateway's Redis reader hands it over;
- ``chorus_delivery_latency_seconds``: publish -> the hub's flush wrote it to every viewer's
  socket (the first write attempt; a slow viewer's backlog is not waited for). After each
  ``hub.poll()`` the gateway asks ``hub.pending(stream)``; once 0, everything published to
  that stream before went out.
Both compare two hosts' wall clocks: keep them in NTP sync (skew shows as latency; negative
readings count as 0). Batches the Redis-down fallback builds carry no stamp and are not timed.

Kafka consumer lag per group is refreshed by :class:`chorus.ops.Operations` every
``metrics.probe_interval_s`` (it needs an await) and read here from that cache.

``chorus_build_info{hub,codec,version} 1`` (every role) says whether the hub and the frame
codec are the native extensions or their pure-Python twins (an install without a compiler
falls back to them; chorus/app.py also warns at start).

Moderation (the moderator role): ``chorus_moderation_queue_depth`` and
``chorus_moderation_lag_seconds`` read the moderator's ``queue_depth`` and ``lag_s``
attributes when the process runs a moderator; its consume loop (a ``loop`` attribute) gets
the same lag gauge as the others.

Each role's families come from a source the app adds (:meth:`Metrics.watch`): the gateway's
from its ``figures()``, the coordinator's, archiver's and moderator's from their counts.
This module imports no role.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.process_collector import ProcessCollector

if TYPE_CHECKING:
    from chorus.native import Hub

__all__ = ["CONTENT_TYPE", "ArchiverFigures", "CoordinatorFigures", "DeliveryClock", "FallbackFigures", "FigureSource",
           "GatewayFigures", "HttpListener", "Metrics", "archiver_families", "coordinator_families",
           "fallback_families", "gateway_families", "moderator_families"]

log = logging.getLogger("chorus.metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds; from sub-millisecond on one host to the brief's 500 ms budget and past it.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# hub.stats() counters exposed as chorus_<name>_total
HUB_COUNTERS = {
    "messages_out": "Events handed to viewers, one per viewer per event.",
    "comments_out": "Comments handed to viewers, one per viewer per comment.",
    "bytes_out": "Bytes written to viewer sockets.",
    "bytes_in": "Bytes read from viewer sockets.",
    "messages_in": "Messages received from viewers.",
    "flushes": "Stream flushes with at least one event.",
    "pings_sent": "Heartbeat pings sent.",
}
# chorus_connections_closed_total{reason}: hub counter per reason
CLOSE_REASONS = {"slow_viewer": "slow_closed", "heartbeat_timeout": "timeouts", "protocol_error": "protocol_errors"}


@dataclass(frozen=True, slots=True)
class GatewayFigures:
    """What a gateway shows on ``/metrics``, read at scrape time (gateway/server.py ``figures``)."""

    hub: Mapping[str, int]  # the hub's stats(): connections, streams, backlog, counters
    posts_in_flight: int
    draining: bool
    bad_channel_messages: int  # channel messages that did not decode (the node's count)
    failed_deliveries: int  # channel messages whose delivery raised
    received: Mapping[str, int]  # channel messages by path: pubsub, or the Kafka fallback


class CoordinatorFigures(Protocol):
    """The coordinator's counts (ingest/coordinator.py) read at scrape time."""

    published_batches: int
    throttle_events: int
    skipped_records: int
    sampled_out: int

    @property
    def sampler(self) -> Any: ...


class ArchiverFigures(Protocol):
    written: int


class FallbackFigures(Protocol):
    """The Redis-down fallback (gateway/fallback.py)."""

    active: bool


FigureSource = Callable[[], Iterable[Metric]]  # the families of one role, read at scrape time


@dataclass
class Metrics:
    """One process's registry: the live histograms and counters, and what the roles show.

    Each role's figures are read at scrape time through a source the app adds with
    :meth:`watch` (``gateway_families(gateway.figures())`` and the like): the registry reads
    what each role exposes, never the app's attributes."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    lag: dict[str, dict[int, int]] = field(default_factory=dict)  # group -> partition -> records
    sources: list[FigureSource] = field(default_factory=list)

    def __post_init__(self) -> None:
        r = self.registry
        self.delivery_latency = Histogram(
            "chorus_delivery_latency_seconds", "Coordinator publish to the hub's write to viewers, per batch.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.pubsub_latency = Histogram(
            "chorus_pubsub_latency_seconds", "Coordinator publish to receipt by the gateway (Redis Pub/Sub).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.posts_refused = Counter(
            "chorus_posts_refused", "Posts refused by the gateway before admission, by reason.", ["reason"],
            registry=r)
        ProcessCollector(registry=r)  # CPU seconds, resident memory, open fds of this process
        r.register(_RoleCollector(self))

    def watch(self, source: FigureSource) -> None:
        """Show ``source``'s families on every scrape from now on."""
        self.sources.append(source)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RoleCollector:
    """Reads the roles' figures at scrape time (prometheus_client's custom-collector interface)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # no fixed description: the families depend on the roles present

    def collect(self) -> Iterator[Metric]:
        yield _build_info()
        for source in self.metrics.sources:
            yield from source()
        yield from _lag_metrics(self.metrics.lag)


def _build_info() -> GaugeMetricFamily:
    """chorus_build_info{hub,codec,version} 1: which implementation runs (a pure fallback is slower)."""
    from chorus import __version__
    from chorus.native import CODEC_IMPLEMENTATION, HUB_IMPLEMENTATION

    family = GaugeMetricFamily("chorus_build_info", "Always 1: the version, and whether the hub and the frame codec "
                               "are the native extensions or their pure-Python twins.",
                               labels=["hub", "codec", "version"])
    family.add_metric([HUB_IMPLEMENTATION, CODEC_IMPLEMENTATION, __version__], 1.0)
    return family


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=value)


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


def gateway_families(f: GatewayFigures) -> Iterator[Metric]:
    stats = f.hub
    yield _gauge("chorus_connections", "Open viewer connections.", stats["connections"])
    yield _gauge("chorus_connections_closing", "Viewer connections closing.", stats["closing"])
    yield _gauge("chorus_streams", "Streams with viewers on this gateway.", stats["streams"])
    yield _gauge("chorus_backlog_bytes", "Bytes queued for viewers that could not take them yet.",
                 stats["backlog_bytes"])
    yield _gauge("chorus_posts_inflight", "Posts between arrival and answer.", f.posts_in_flight)
    yield _gauge("chorus_draining", "1 while the gateway drains (SIGTERM).", 1.0 if f.draining else 0.0)
    for name, text in HUB_COUNTERS.items():
        yield _counter(f"chorus_{name}", text, stats.get(name, 0))
    closed = CounterMetricFamily("chorus_connections_closed", "Viewer connections the gateway closed, by reason.",
                                 labels=["reason"])
    for reason, key in CLOSE_REASONS.items():
        closed.add_metric([reason], stats[key])
    yield closed
    drops = {"slow_viewer": stats["skipped"], "bad_channel_message": f.bad_channel_messages,
             "delivery_failed": f.failed_deliveries}
    yield _drops(drops)
    received = CounterMetricFamily("chorus_channel_messages", "Channel messages received, by path.", labels=["via"])
    for via, n in sorted(f.received.items()):
        received.add_metric([via], n)
    yield received


def fallback_families(fallback: FallbackFigures) -> Iterator[Metric]:
    yield _gauge("chorus_pubsub_fallback_active", "1 while the gateway reads Kafka itself (Redis Pub/Sub down).",
                 1.0 if fallback.active else 0.0)


def _drops(by_reason: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily("chorus_dropped", "Comments not delivered or not broadcast, by reason.",
                                 labels=["reason"])
    for reason, n in by_reason.items():
        family.add_metric([reason], n)
    return family


def coordinator_families(c: CoordinatorFigures) -> Iterator[Metric]:
    yield _counter("chorus_published_batches", "Batches published to stream channels.", c.published_batches)
    yield _counter("chorus_throttle_events", "Keep-ratio changes announced to viewers.", c.throttle_events)
    yield _counter("chorus_skipped_records", "Log records that were not comments (skipped).", c.skipped_records)
    yield _drops({"sampled": c.sampled_out})
    ratio = GaugeMetricFamily("chorus_sampling_keep_ratio",
                              "Share of a hot stream's comments broadcast (streams not listed: 1).", labels=["stream"])
    for stream, keep in sorted(c.sampler.sampled().items()):
        ratio.add_metric([stream], keep)
    yield ratio


def archiver_families(a: ArchiverFigures) -> Iterator[Metric]:
    yield _counter("chorus_archived_comments", "Comments written to the history store.", a.written)


def moderator_families(moderator: Any) -> Iterator[Metric]:
    depth = getattr(moderator, "queue_depth", None)
    if depth is not None:
        yield _gauge("chorus_moderation_queue_depth", "Flagged comments waiting in the review queue.", float(depth))
    lag = getattr(moderator, "lag_s", None)
    if lag is not None:
        yield _gauge("chorus_moderation_lag_seconds", "How far moderation trails posting (oldest comment in hand).",
                     float(lag))


def _lag_metrics(lag: dict[str, dict[int, int]]) -> Iterator[Metric]:
    if not lag:
        return
    family = GaugeMetricFamily("chorus_kafka_consumer_lag",
                               "Records not yet handled, per consumer group and partition.",
                               labels=["group", "partition"])
    for group, parts in sorted(lag.items()):
        for partition, n in sorted(parts.items()):
            family.add_metric([group, str(partition)], n)
    yield family


class DeliveryClock:
    """Times batches from their publish stamp to the hub's write (see the module docstring)."""

    def __init__(self, hub: Hub, metrics: Metrics) -> None:
        self.hub = hub
        self._pubsub = metrics.pubsub_latency
        self._delivery = metrics.delivery_latency
        self._waiting: dict[int, list[float]] = {}  # stream handle -> publish stamps (s) not yet flushed

    def published(self, handle: int, published_us: int) -> None:
        """A stamped batch was handed to the hub (``hub.publish`` just returned)."""
        stamp = published_us / 1e6
        now = time.time()
        self._pubsub.observe(max(0.0, now - stamp))
        if self.hub.pending(handle) == 0:  # flushed inside publish (flush_max_messages)
            self._delivery.observe(max(0.0, now - stamp))
        else:
            self._waiting.setdefault(handle, []).append(stamp)

    def polled(self) -> None:
        """After ``hub.poll()``: streams with nothing pending any more were written."""
        if not self._waiting:
            return
        now = time.time()
        for handle in [h for h in self._waiting if self.hub.pending(h) == 0]:
            for stamp in self._waiting.pop(handle):
                self._delivery.observe(max(0.0, now - stamp))


Probe = Callable[[], tuple[bool, dict[str, str]]]


class HttpListener:
    """``GET /metrics``, ``/healthz`` and ``/readyz`` on ``metrics.host:metrics.port``: for roles
    without a gateway (coordinator, archiver, moderator), or to keep metrics off the public port.

    A deliberately small HTTP/1.0-style server on asyncio streams: one request per connection,
    GET only, headers up to 8 KiB, answered and closed.
    """

    def __init__(self, metrics: Metrics, health: Probe, ready: Probe) -> None:
        self.metrics = metrics
        self.health = health
        self.ready = ready
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(self.answer(head))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def answer(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or len(head) > 8192:
            return _http(400, b"bad request\n", "text/plain")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET":
            return _http(405, b"only GET is served here\n", "text/plain")
        if target == b"/metrics":
            return _http(200, self.metrics.render(), CONTENT_TYPE)
        if target in (b"/healthz", b"/readyz"):
            ok, detail = (self.health if target == b"/healthz" else self.ready)()
            if ok and target == b"/healthz":
                return _http(200, b"ok", "text/plain")
            return _http(200 if ok else 503, _json_line(detail), "application/json")
        return _http(404, b"not found\n", "text/plain")


def _json_line(detail: dict[str, str]) -> bytes:
    import json

    return json.dumps(detail, separators=(",", ":")).encode() + b"\n"


def _http(status: int, body: bytes, content_type: str) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
              503: "Service Unavailable"}[status]
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n").encode() + body
