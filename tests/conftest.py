"""Session fixtures: the real Redis and Kafka (tests/services.py), started once per run.

Environment:
  CHORUS_TEST_REDIS_URL  use this Redis (e.g. redis://127.0.0.1:6379/0) instead of starting one
  CHORUS_TEST_CASSANDRA  use this Cassandra node (host:port of CQL) instead of starting one
  CHORUS_TEST_KAFKA      use this Kafka bootstrap (e.g. 127.0.0.1:9092) instead of starting one
                         (it must already have the topics the tests use, e.g. `comments`)
  CHORUS_EXPECT_IMPL     implementation chorus.native must report (default "native"), so a
                         failed native build can't silently run the suite on the pure fallback

Tests that use a service fixture get the `services` marker automatically
(`pytest -m "not services"` runs only the tests that need neither). Tests that use
`kafka_cluster` (three brokers, started only when such a test is selected) also get the
`cluster` marker (`-m "not cluster"` leaves them and the cluster out). Tests marked
`redis_cluster` use the `redis_cluster` fixture: a six-node Redis Cluster, started (~3 s, in the
background) only when such a test is selected.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from services import (
    KafkaCluster,
    RedisClusterNodes,
    Service,
    start_cassandra,
    start_kafka,
    start_kafka_cluster,
    start_redis,
    start_redis_cluster,
)

SERVICE_FIXTURES = {"redis_service", "kafka_service", "redis_url", "kafka_bootstrap", "kafka_cluster", "redis_cluster"}
# CHORUS_TEST_TIMEOUT_SCALE stretches pytest-timeout's limits too (tests/waiting.py).
pytest_plugins = ["waiting"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: needs the three-broker Kafka cluster (tests/services.py)")
    config.addinivalue_line("markers", "redis_cluster: needs the six-node Redis Cluster (services/redis-cluster/)")


def pytest_sessionstart(session: pytest.Session) -> None:
    expected = os.environ.get("CHORUS_EXPECT_IMPL", "native")
    hint = (
        "reinstall with `CHORUS_REINSTALL=1 bash scripts/install-test-deps.sh` (builds with "
        "CHORUS_BUILD_NATIVE=always), or set CHORUS_EXPECT_IMPL to test another implementation"
    )
    try:
        import chorus.native
    except ImportError as exc:
        pytest.exit(f"cannot import chorus.native ({exc}); {hint}", returncode=4)
    actual = getattr(chorus.native, "IMPLEMENTATION", None)
    if actual != expected:
        pytest.exit(
            f"chorus.native.IMPLEMENTATION is {actual!r}, expected {expected!r} (a native "
            f"extension that did not build or load?); {hint}",
            returncode=4,
        )
    # CI cancels with SIGTERM: turn it into SystemExit so fixture teardown and atexit stop the
    # services started below instead of leaving them running.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)
        if "kafka_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
        if "cassandra_service" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cassandra)
            item.add_marker(pytest.mark.services)


# Kafka takes a few seconds to start: when a selected test needs it, start it in the
# background as soon as collection ends, so it boots while the tests before it run.
_kafka_boot: Future[Service] | None = None
_cluster_boot: Future[KafkaCluster] | None = None
_redis_cluster_boot: Future[RedisClusterNodes] | None = None
_services_dir: Path | None = None
_cassandra_boot: Future[Service] | None = None


def _scratch() -> Path:
    """The run's folder for the services' data and logs (created on first use)."""
    global _services_dir
    if _services_dir is None:
        _services_dir = Path(tempfile.mkdtemp(prefix="chorus-services-"))
    return _services_dir


def _boot_kafka() -> Service:
    svc = start_kafka(_scratch() / "kafka")
    atexit.register(svc.stop)  # in case the session dies before the fixture's teardown
    return svc


def _boot_cluster() -> KafkaCluster:
    started = time.monotonic()
    cluster = start_kafka_cluster(_scratch() / "cluster")
    atexit.register(cluster.stop)
    print(f"\nthree-broker Kafka cluster up in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return cluster


def _boot_redis_cluster() -> RedisClusterNodes:
    started = time.monotonic()
    cluster = start_redis_cluster(_scratch() / "redis-cluster")
    atexit.register(cluster.stop)
    print(f"\nsix-node Redis Cluster up in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return cluster


def pytest_collection_finish(session: pytest.Session) -> None:
    global _kafka_boot, _cluster_boot, _redis_cluster_boot
    wants = {"kafka_service", "kafka_bootstrap"}
    if session.config.option.collectonly:
        return
    _start_cassandra_boot(session)
    if not os.environ.get("CHORUS_TEST_KAFKA") and any(
            wants.intersection(getattr(i, "fixturenames", ())) for i in session.items):
        _scratch()  # create it here, in the main thread: no race with the fixtures
        _kafka_boot = ThreadPoolExecutor(1, thread_name_prefix="kafka-boot").submit(_boot_kafka)
    if any("kafka_cluster" in getattr(i, "fixturenames", ()) for i in session.items):
        _scratch()
        _cluster_boot = ThreadPoolExecutor(1, thread_name_prefix="cluster-boot").submit(_boot_cluster)
    if any(i.get_closest_marker("redis_cluster") is not None for i in session.items):
        _scratch()
        _redis_cluster_boot = ThreadPoolExecutor(1, thread_name_prefix="redis-cluster-boot").submit(
            _boot_redis_cluster)


@pytest.hookimpl(trylast=True)  # after the session fixtures' teardown
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _kafka_boot is not None:  # booted but maybe never used (-x, -k ...): stop it too
        # a failed boot was already reported by the tests that needed Kafka
        with contextlib.suppress(Exception):
            _kafka_boot.result().stop()
    if _cluster_boot is not None:
        with contextlib.suppress(Exception):
            _cluster_boot.result().stop()
    if _redis_cluster_boot is not None:
        with contextlib.suppress(Exception):
            _redis_cluster_boot.result().stop()
    if _cassandra_boot is not None:
        with contextlib.suppress(Exception):
            _cassandra_boot.result().stop(timeout=30.0)
    if _services_dir is not None:
        if exitstatus == 0:
            shutil.rmtree(_services_dir, ignore_errors=True)
        else:
            print(f"\nservice data and logs kept in {_services_dir}", file=sys.stderr)


@pytest.fixture(scope="session")
def services_dir() -> Path:
    """Scratch folder of the services; removed after a passing run, kept (logs!) otherwise."""
    return _scratch()


def _stopped_at_end(svc: Service) -> Iterator[Service]:
    atexit.register(svc.stop)  # in case the session dies before the teardown below
    try:
        yield svc
    finally:
        svc.stop()
        atexit.unregister(svc.stop)


def _external(name: str, address: str) -> Service:
    """A service given through the environment: never signalled, stopped or restarted."""
    tail = address.rsplit(":", 1)[-1].split("/", 1)[0]
    return Service(name, 0, address, Path(), int(tail) if tail.isdigit() else 0, external=True)


@pytest.fixture(scope="session")
def redis_service(services_dir: Path) -> Iterator[Service]:
    """The session's Redis. Tests must not kill it: start a private one with start_redis()."""
    url = os.environ.get("CHORUS_TEST_REDIS_URL")
    if url:
        yield _external("redis", url)
    else:
        yield from _stopped_at_end(start_redis(services_dir / "redis"))


@pytest.fixture(scope="session")
def kafka_service(services_dir: Path) -> Iterator[Service]:
    """The session's Kafka broker, with topic `comments` (4 partitions). Don't kill it either."""
    bootstrap = os.environ.get("CHORUS_TEST_KAFKA")
    if bootstrap:
        yield _external("kafka", bootstrap)
        return
    svc = _kafka_boot.result() if _kafka_boot is not None else _boot_kafka()
    yield from _stopped_at_end(svc)


def _boot_cassandra() -> Service:
    started = time.monotonic()
    svc = start_cassandra(_scratch() / "cassandra")
    atexit.register(svc.stop)
    print(f"\nCassandra node up in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return svc


def _start_cassandra_boot(session: pytest.Session) -> None:
    """Boot the Cassandra node (~12 s) in the background when a selected test needs it."""
    global _cassandra_boot
    if not os.environ.get("CHORUS_TEST_CASSANDRA") and any(
            "cassandra_service" in getattr(i, "fixturenames", ()) for i in session.items):
        _scratch()
        _cassandra_boot = ThreadPoolExecutor(1, thread_name_prefix="cassandra-boot").submit(_boot_cassandra)


@pytest.fixture(scope="session")
def cassandra_service(services_dir: Path) -> Iterator[Service]:
    """The session's Cassandra node (CQL at ``address``). Tests may kill and restart it
    (``kill()``, ``restart()``) but must leave it running; CHORUS_TEST_CASSANDRA=host:port uses
    a node that runs already (never signalled)."""
    address = os.environ.get("CHORUS_TEST_CASSANDRA")
    if address:
        yield _external("cassandra", address)
        return
    svc = _cassandra_boot.result() if _cassandra_boot is not None else _boot_cassandra()
    atexit.register(svc.stop)
    try:
        yield svc
    finally:
        svc.stop(timeout=30.0)
        atexit.unregister(svc.stop)


@pytest.fixture(scope="session")
def kafka_cluster(services_dir: Path) -> Iterator[KafkaCluster]:
    """Three KRaft brokers, topic `comments` with 3 replicas; tests may kill and restart its nodes
    (each test leaves every node running again)."""
    cluster = _cluster_boot.result() if _cluster_boot is not None else _boot_cluster()
    atexit.register(cluster.stop)
    try:
        yield cluster
    finally:
        cluster.stop()
        atexit.unregister(cluster.stop)


@pytest.fixture(scope="session")
def redis_cluster(services_dir: Path) -> Iterator[RedisClusterNodes]:
    """Three masters and three replicas (services/redis-cluster/), started once per session in
    the background when a test marked `redis_cluster` is selected. Tests may kill a node; each
    leaves every node running again (a restarted master rejoins as a replica)."""
    cluster = _redis_cluster_boot.result() if _redis_cluster_boot is not None else _boot_redis_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
        atexit.unregister(cluster.stop)


@pytest.fixture(scope="session")
def redis_url(redis_service: Service) -> str:
    return redis_service.url


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_service: Service) -> str:
    return kafka_service.bootstrap


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """`chorus` processes a test starts (tests/test_processes.py Proc): each stopped by its PID
    at the end, however the test ends."""
    started: list[Any] = []
    yield started
    for p in started:
        p.stop()
