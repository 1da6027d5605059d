"""Operating a process: health and readiness, the gateway's graceful drain, structured logs.

**Readiness** is what a load balancer or Kubernetes asks before sending work: ``/readyz``
answers 200 only when the process can do its job now. The routes are synchronous (picows
calls the gateway's router inline), so :class:`Operations` probes in the background every
``metrics.probe_interval_s`` and the routes read the last result:
- ``redis``: a PING on a connection of its own answered in time (gateways need Redis for new
  viewers to join, coordinators to publish);
- ``kafka``: cluster metadata fetched and the comments topic in it (gateways post to it,
  coordinators and archivers consume it);
- ``draining``: a gateway that got SIGTERM is not ready, whatever else holds;
- before the first probe has answered, nothing is ready.
The embedded default has neither Redis nor Kafka: ready once started. ``/healthz`` says only
whether the process is alive and none of its roles' tasks has failed (a failed role stops
the process anyway).

**Drain** (SIGTERM on a gateway, ``Gateway.drain``, gateway/drain.py): readiness goes 503 at once; after
``gateway.drain_delay_s`` (time for a load balancer polling /readyz to stop sending new
viewers) the listener closes, so new connections go to the other gateways on the port
(SO_REUSEPORT) or the host; posts that arrive from then on (not during the delay) are refused with
``not_accepted`` (nothing posted; the client posts again after reconnecting); posts already
in flight are answered, up to ``gateway.drain_timeout_s``; then the gateway closes every
viewer with 1012 (service restart), which tells clients to reconnect and ``resume`` from the
last position they saw, losing nothing.

**Logs**: ``log_format = "json"`` writes one JSON object per line (time, level, logger,
message, process id, and the exception when there is one) for log collectors; "text" is for
people.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from chorus.config import Config
from chorus.metrics import HttpListener, Metrics

__all__ = ["JsonFormatter", "LagReader", "Operations", "Serving", "configure_logging"]

log = logging.getLogger("chorus.ops")


class Serving(Protocol):
    """A gateway as readiness sees it (gateway/server.py)."""

    @property
    def listening(self) -> bool: ...

    @property
    def draining(self) -> bool: ...


class LagReader(Protocol):
    """A Kafka consume loop that can say how far it trails (ingest/)."""

    async def lag(self) -> dict[int, int]: ...


class Operations:
    """Metrics, readiness probes and the metrics listener of one process.

    Built before the roles it serves: the gateway gets it (its probes) in its constructor, and
    readiness asks the gateway, passed in, whether it listens and drains."""

    def __init__(self, config: Config, metrics: Metrics, failed_role: Callable[[], BaseException | None],
                 lag_readers: Mapping[str, LagReader] | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.failed_role = failed_role
        self.lag_readers = dict(lag_readers or {})  # consumer group -> its consume loop
        self.checks: dict[str, str] = {}  # name -> "ok" or what failed; empty until probed
        self.listener: HttpListener | None = None
        self._task: asyncio.Task[None] | None = None
        self._redis: Any = None
        self._kafka: Any = None

    def _needs(self) -> list[str]:
        c = self.config
        return [name for name, on in (("redis", bool(c.redis.url)), ("kafka", bool(c.kafka.bootstrap))) if on]

    # -- the probes --
    async def start(self, serving: Serving | None = None) -> None:
        """Probe in the background; serve the metrics listener if ``metrics.port`` is set
        (its /readyz includes ``serving``, this process's gateway)."""
        m = self.config.metrics
        if m.port:
            self.listener = HttpListener(self.metrics, self.health, functools.partial(self.ready, serving))
            await self.listener.start(m.host, m.port)
        self._task = asyncio.create_task(self._probe_loop(), name="readiness-probes")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.listener is not None:
            await self.listener.stop()
        if self._redis is not None:
            await self._redis.aclose()
        if self._kafka is not None:
            with contextlib.suppress(Exception):
                await self._kafka.close()

    async def _probe_loop(self) -> None:
        interval = self.config.metrics.probe_interval_s
        while True:
            started = time.monotonic()
            await self.probe_once(timeout_s=interval)
            await asyncio.sleep(max(0.05, interval - (time.monotonic() - started)))

    async def probe_once(self, timeout_s: float) -> None:
        checks: dict[str, str] = {}
        for name in self._needs():
            try:
                async with asyncio.timeout(timeout_s):
                    await (self._probe_redis() if name == "redis" else self._probe_kafka())
                checks[name] = "ok"
            except Exception as exc:
                checks[name] = f"{type(exc).__name__}: {exc}"[:200] or "failed"
                if name == "kafka":
                    await self._reset_kafka()
        self.checks = checks
        await self._refresh_lag()

    async def _probe_redis(self) -> None:
        if self._redis is None:
            from chorus.redisconn import open_redis  # one node or a cluster

            self._redis = open_redis(self.config.redis.url, timeout_s=self.config.metrics.probe_interval_s)
        await self._redis.ping()

    async def _probe_kafka(self) -> None:
        if self._kafka is None:
            from aiokafka.client import AIOKafkaClient

            self._kafka = AIOKafkaClient(bootstrap_servers=self.config.kafka.bootstrap, client_id="chorus-readyz")
            await self._kafka.bootstrap()
        metadata = await self._kafka.fetch_all_metadata()
        if self.config.kafka.topic not in metadata.topics():
            raise LookupError(f"topic {self.config.kafka.topic} not found")

    async def _reset_kafka(self) -> None:
        client, self._kafka = self._kafka, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def _refresh_lag(self) -> None:
        """Kafka consumer lag of each consume loop in this process (the metrics read the cache)."""
        for group, loop in self.lag_readers.items():
            try:
                async with asyncio.timeout(self.config.metrics.probe_interval_s):
                    self.metrics.lag[group] = await loop.lag()
            except Exception as exc:  # not started yet, or Kafka away: keep the last figures
                log.debug("lag of %s not read: %s", group, exc)

    # -- what the routes read --
    def health(self) -> tuple[bool, dict[str, str]]:
        failed = self.failed_role()
        if failed is not None:
            return False, {"status": "failed", "error": str(failed)[:200]}
        return True, {"status": "ok"}

    def ready(self, serving: Serving | None = None) -> tuple[bool, dict[str, str]]:
        """Whether the process can do its job now, and why not; ``serving``: its gateway."""
        detail = dict(self.checks)
        if serving is not None and serving.draining:
            detail["draining"] = "yes"
        if serving is not None and not serving.listening:
            detail["listening"] = "not yet"
        missing = [name for name in self._needs() if name not in detail]
        for name in missing:
            detail[name] = "not probed yet"
        ok = all(v == "ok" for k, v in detail.items() if k in ("redis", "kafka")) and not missing \
            and "draining" not in detail and "listening" not in detail
        detail["status"] = "ready" if ok else "not ready"
        return ok, detail


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ms), level, logger, msg, pid, and exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(config: Config, stream: Any = None) -> None:
    """The root logger as ``log_level`` and ``log_format`` say (replaces earlier handlers)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.log_level.upper())
    log.debug("logging as %s (pid %d)", config.log_format, os.getpid())
