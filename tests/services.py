"""Start and stop the real Redis and Kafka used by the tests (no Docker, no mocks).

Redis is Debian's ``redis-server`` run as a child process; Kafka is the Apache broker started
by ``services/kafka/start.sh`` from the jars that ``scripts/install-test-deps.sh`` resolved.
Both listen on free loopback ports. A service is stopped by its own PID, never by name, so
the tests can't touch anything else on the machine.

Usage::

    redis = start_redis(tmp / "redis")   # redis.url == "redis://127.0.0.1:PORT/0"
    kafka = start_kafka(tmp / "kafka")   # kafka.bootstrap == "127.0.0.1:PORT"
    kafka.kill(); kafka.restart()        # crash and come back on the same port and data
    redis.stop(); kafka.stop()

    cluster = start_kafka_cluster(tmp / "cluster")   # three brokers, topic `comments` with 3 replicas
    cluster.bootstrap                   # "127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3"
    cluster.node(cluster.leader_of("comments", 0)).kill()
    cluster.stop()
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KAFKA_START = ROOT / "services" / "kafka" / "start.sh"
CASSANDRA_START = ROOT / "services" / "cassandra" / "start.sh"
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    """True if the process runs; a zombie (exited, not yet reaped by its parent) is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # the state letter follows the ")" that closes the command name
    return stat.rpartition(")")[2].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the child if the thread that started it dies (e.g. pytest is killed)."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Service:
    """One running service. ``address`` is a redis URL or a Kafka bootstrap string."""

    name: str
    pid: int
    address: str
    data_dir: Path
    port: int
    #: substring of the command line, checked before any signal (guards against PID reuse)
    match: str = ""
    #: extra ports the service needs on restart (Kafka's controller port)
    ports: tuple[int, ...] = ()
    #: True for a service given through the environment: never signalled by the tests
    external: bool = False
    #: environment of its start script, again on restart (a Kafka cluster node's settings)
    env: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.address

    @property
    def bootstrap(self) -> str:
        return self.address

    def alive(self) -> bool:
        if self.external:
            return True
        if self._proc is not None:
            return self._proc.poll() is None
        return _pid_alive(self.pid)

    def _signal(self, sig: int) -> None:
        if self.external:
            raise RuntimeError(f"{self.name} at {self.address} is external; not signalling it")
        if not self.alive():
            return
        if self.match and self.match not in _cmdline(self.pid):
            return  # the PID now belongs to another process: ours is gone
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def _wait(self, timeout: float) -> bool:
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while _pid_alive(self.pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM this service's PID, wait up to ``timeout`` s, then SIGKILL."""
        if self.external:
            return
        self._signal(signal.SIGTERM)
        if not self._wait(timeout):
            self._signal(signal.SIGKILL)
            self._wait(5.0)

    def kill(self) -> None:
        """SIGKILL (a crash: no clean shutdown) and wait until the process is gone."""
        self._signal(signal.SIGKILL)
        self._wait(10.0)

    def restart(self) -> None:
        """Stop if running, then start again on the same port(s) with the same data dir."""
        if self.external:
            raise RuntimeError(f"{self.name} at {self.address} is external; cannot restart it")
        self.stop()
        if self.name == "kafka":
            fresh = start_kafka(self.data_dir, self.port, self.ports[0] if self.ports else None, env=self.env)
        elif self.name == "cassandra":
            fresh = start_cassandra(self.data_dir, self.port, *self.ports)
        else:
            fresh = start_redis(self.data_dir, self.port)
        self.pid, self._proc = fresh.pid, fresh._proc


def _ping_redis(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(data_dir: Path, port: int | None = None, timeout: float = 15.0) -> Service:
    """Start ``redis-server`` (no persistence) on a free loopback port; ready when PING answers.

    Its output goes to ``data_dir/redis.log``.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    argv = [
        "redis-server",
        "--port", str(port),
        "--bind", HOST,
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--dir", str(data_dir),
    ]  # fmt: skip
    # The death signal belongs to the starting *thread*; only use it from the main thread.
    on_main = threading.current_thread() is threading.main_thread()
    with open(data_dir / "redis.log", "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if on_main else None,
        )
    svc = Service(
        "redis", proc.pid, f"redis://{HOST}:{port}/0", data_dir, port,
        match="redis-server", _proc=proc,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while not _ping_redis(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            svc.stop()
            tail = (data_dir / "redis.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"redis-server on port {port} did not start:\n{tail}")
        time.sleep(0.05)
    return svc


REDIS_CLUSTER_DIR = ROOT / "services" / "redis-cluster"


@dataclass
class RedisClusterNodes:
    """Three masters and three replicas from ``services/redis-cluster/start.sh``.

    ``url`` is the config value that points Chorus at it (``redis+cluster://`` and the six
    nodes as seeds). Each node is a :class:`Service` (killed and restarted by its own PID); a
    node started again rejoins as a replica of the one that took over its slots.
    """

    data_dir: Path
    base_port: int
    nodes: list[Service]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self.nodes)

    def node(self, port: int) -> Service:
        return next(n for n in self.nodes if n.port == port)

    def masters(self) -> dict[int, list[tuple[int, int]]]:
        """port -> the slot ranges (first, last) of each live master, as the first live node sees it."""
        for svc in self.nodes:
            if not svc.alive():
                continue
            try:
                out = subprocess.run(["redis-cli", "-h", HOST, "-p", str(svc.port), "cluster", "nodes"],
                                     capture_output=True, text=True, timeout=5, check=True).stdout
            except (subprocess.SubprocessError, OSError):
                continue
            found = {}
            for line in out.splitlines():
                parts = line.split()
                if len(parts) > 8 and "master" in parts[2] and "fail" not in parts[2]:
                    ranges = [r.partition("-") for r in parts[8:] if not r.startswith("[")]  # [..] a slot migrating
                    found[int(parts[1].split("@")[0].rsplit(":", 1)[1])] = [(int(a), int(b or a)) for a, _, b in ranges]
            return found
        return {}

    def restart(self, port: int) -> None:
        """Start a stopped or killed node again on its port, with its cluster state."""
        svc = self.node(port)
        fresh = _start_cluster_node(self.data_dir, port)
        svc.pid = fresh.pid

    def stop(self) -> None:
        subprocess.run(["bash", str(REDIS_CLUSTER_DIR / "stop.sh"), str(self.data_dir)], check=False,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30)


def _cluster_node_service(data_dir: Path, port: int) -> Service:
    pid = int((data_dir / str(port) / "redis.pid").read_text())
    return Service("redis-cluster", pid, f"redis://{HOST}:{port}/0", data_dir / str(port), port, match="redis-server")


def _start_cluster_node(data_dir: Path, port: int) -> Service:
    env = {**os.environ, "CHORUS_REDIS_CLUSTER_PARENT_PID": str(os.getpid())}
    subprocess.run(["bash", str(REDIS_CLUSTER_DIR / "node.sh"), str(data_dir), str(port)], check=True, env=env,
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    return _cluster_node_service(data_dir, port)


def _free_port_run(count: int) -> int:
    """A base port with ``count`` free ports from it and their cluster bus ports (+10000)."""
    for _ in range(200):
        base = 20000 + int.from_bytes(os.urandom(2), "big") % 30000
        ports = [*range(base, base + count), *range(base + 10000, base + 10000 + count)]
        if all(_port_free(p) for p in ports):
            return base
    raise RuntimeError(f"no run of {count} free ports on loopback")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def start_redis_cluster(data_dir: Path, timeout: float = 90.0) -> RedisClusterNodes:
    """Start the six-node cluster on free loopback ports (``services/redis-cluster/start.sh``)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    base = _free_port_run(6)
    env = {**os.environ, "CHORUS_REDIS_CLUSTER_PARENT_PID": str(os.getpid()),
           "CHORUS_REDIS_CLUSTER_READY_TIMEOUT": str(int(timeout))}
    proc = subprocess.run(["bash", str(REDIS_CLUSTER_DIR / "start.sh"), str(data_dir), str(base)], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"the redis cluster did not start:\n{proc.stderr[-3000:]}")
    return RedisClusterNodes(data_dir, base, [_cluster_node_service(data_dir, base + i) for i in range(6)])


def start_kafka(
    data_dir: Path, port: int | None = None, controller_port: int | None = None, env: dict[str, str] | None = None
) -> Service:
    """Start the single-node KRaft broker with ``services/kafka/start.sh`` on free ports.

    Returns once a topic can be created (``comments``, 4 partitions). Restarting with the same
    ``data_dir`` and ports keeps the cluster (no re-format). Log: ``data_dir/kafka.log``.
    ``env`` sets the script's node settings (one node of a cluster: :func:`start_kafka_cluster`).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    controller_port = controller_port or free_port()
    while controller_port == port:
        controller_port = free_port()
    pid_file = data_dir / "kafka.pid"
    old_pid = pid_file.read_text() if pid_file.exists() else None

    def kill_half_started() -> None:
        """Kill a broker this call launched (its PID file is new) that never got ready."""
        pid = pid_file.read_text() if pid_file.exists() else None
        if pid and pid != old_pid:
            Service("kafka", int(pid), "", data_dir, port, match="kafka.Kafka").kill()

    try:
        res = subprocess.run(
            ["bash", str(KAFKA_START), str(data_dir), str(port), str(controller_port)],
            # start.sh's watchdog stops the broker if this process dies without cleaning up
            env={**os.environ, **(env or {}), "CHORUS_KAFKA_PARENT_PID": str(os.getpid())},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
    except BaseException:  # e.g. a test timeout while waiting: don't leave the broker behind
        kill_half_started()
        raise
    if res.returncode != 0:
        kill_half_started()  # start.sh already SIGTERMed it; make sure it is gone
        out = res.stdout + res.stderr
        raise RuntimeError(f"Kafka did not start (exit {res.returncode}):\n{out}")
    return Service(
        "kafka", int(pid_file.read_text()), f"{HOST}:{port}", data_dir, port,
        match="kafka.Kafka", ports=(controller_port,), env=dict(env or {}),
    )  # fmt: skip


def start_cassandra(data_dir: Path, port: int | None = None, storage_port: int | None = None) -> Service:
    """Start one Cassandra node with ``services/cassandra/start.sh`` on free loopback ports.

    Returns once CQL answers. Restarting with the same ``data_dir`` and ports keeps the
    keyspaces. Log: ``data_dir/cassandra.log``; ``address`` is "127.0.0.1:PORT" (CQL).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    storage_port = storage_port or free_port()
    while storage_port == port:
        storage_port = free_port()
    pid_file = data_dir / "cassandra.pid"
    old_pid = pid_file.read_text() if pid_file.exists() else None

    def kill_half_started() -> None:
        pid = pid_file.read_text() if pid_file.exists() else None
        if pid and pid != old_pid:
            Service("cassandra", int(pid), "", data_dir, port, match="CassandraDaemon").kill()

    env = {**os.environ, "CHORUS_CASSANDRA_STORAGE_PORT": str(storage_port),
           "CHORUS_CASSANDRA_PARENT_PID": str(os.getpid())}
    try:
        res = subprocess.run(["bash", str(CASSANDRA_START), str(data_dir), str(port)], env=env,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    except BaseException:
        kill_half_started()
        raise
    if res.returncode != 0:
        kill_half_started()
        raise RuntimeError(f"Cassandra did not start (exit {res.returncode}):\n{res.stdout + res.stderr}")
    return Service("cassandra", int(pid_file.read_text()), f"{HOST}:{port}", data_dir, port,
                   match="CassandraDaemon", ports=(storage_port,))


# A cluster node killed with SIGKILL is fenced, and its partitions get new leaders, once the
# active controller has not heard from it for broker.session.timeout.ms: that is most of the
# outage a crashed leader causes, so the cluster keeps it short (its heartbeats every 250 ms
# (six to a session) leave a loaded machine some slack). A killed active controller is replaced once the other
# voters miss it for controller.quorum.fetch.timeout.ms.
CLUSTER_PROPS = """
broker.heartbeat.interval.ms=250
broker.session.timeout.ms=1500
controller.quorum.fetch.timeout.ms=1000
controller.quorum.election.timeout.ms=300
"""


@dataclass
class KafkaCluster:
    """Three KRaft nodes (each broker and controller) sharing one cluster id and quorum."""

    nodes: dict[int, Service]  # by node.id

    @property
    def bootstrap(self) -> str:
        return ",".join(n.address for n in self.nodes.values())

    def node(self, node_id: int) -> Service:
        return self.nodes[node_id]

    def leader_of(self, topic: str, partition: int) -> int:
        """The node id leading ``topic``'s ``partition`` now, as the cluster's metadata says."""
        return _in_fresh_loop(_partition_leader(self.bootstrap, topic, partition))

    def active_controller(self) -> int | None:
        """The node that last logged becoming the quorum's leader, if it is still alive."""
        latest: tuple[str, int] | None = None
        for node_id, svc in self.nodes.items():
            log = (svc.data_dir / "kafka.log").read_text(errors="replace") if svc.alive() else ""
            for stamp in re.findall(r"^\[([^\]]+)\] INFO \[RaftManager id=\d+\] Completed transition to "
                                    r"Leader", log, re.M):
                if latest is None or stamp > latest[0]:
                    latest = (stamp, node_id)
        return latest[1] if latest else None

    def stop(self) -> None:
        """Every node at once (each by its PID): one by one, the last waits out the others'
        controlled shutdowns with a quorum shrinking under it."""
        with ThreadPoolExecutor(len(self.nodes) or 1) as pool:
            list(pool.map(lambda svc: svc.stop(), self.nodes.values()))


def _in_fresh_loop(coro: Any) -> Any:
    """Run a coroutine to its end in a thread of its own (callers may be inside a running loop)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _partition_leader(bootstrap: str, topic: str, partition: int, timeout: float = 15.0) -> int:
    """Asked again while the partition has no leader (just created, or an election is under way)."""
    from aiokafka import TopicPartition
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    deadline = time.monotonic() + timeout
    try:
        await client.bootstrap()
        while True:
            client.add_topic(topic)
            await client.force_metadata_update()
            leader = client.cluster.leader_for_partition(TopicPartition(topic, partition))
            if leader is not None and leader >= 0:
                return int(leader)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{topic}:{partition} has no leader after {timeout}s")
            await asyncio.sleep(0.2)
    finally:
        await client.close()


async def _create_replicated_topic(bootstrap: str, topic: str, partitions: int, replicas: int,
                                   timeout: float) -> None:
    """Create the topic once every broker has registered (retried until then)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError, TopicAlreadyExistsError

    deadline = time.monotonic() + timeout
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            response = await admin.create_topics([NewTopic(topic, partitions, replicas)])
            errors = [e for _t, e, *_ in response.topic_errors if e not in (0, TopicAlreadyExistsError.errno)]
            if not errors:
                return
            why: object = errors
        except KafkaError as exc:
            why = exc
        finally:
            await admin.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"topic {topic} ({replicas} replicas) not created in {timeout}s: {why}")
        await asyncio.sleep(0.5)


def start_kafka_cluster(data_dir: Path, size: int = 3, topic: str = "comments", partitions: int = 4,
                        timeout: float = 120.0) -> KafkaCluster:
    """Start ``size`` KRaft nodes (broker + controller each, heap 256 MB) on free loopback ports,
    then create ``topic`` with ``size`` replicas (min.insync.replicas ``size - 1``).

    Each node has its own data dir (``data_dir/node-N``, log ``kafka.log``) and PID; every node
    is stopped by its PID if the cluster does not come up.
    """
    ports: list[int] = []
    while len(ports) < 2 * size:
        p = free_port()
        if p not in ports:
            ports.append(p)
    client_ports, controller_ports = ports[:size], ports[size:]
    voters = ",".join(f"{i + 1}@{HOST}:{controller_ports[i]}" for i in range(size))
    cluster_id = base64.urlsafe_b64encode(b"chorus" + os.urandom(10)).decode().rstrip("=")
    common = {
        "CHORUS_KAFKA_VOTERS": voters, "CHORUS_KAFKA_CLUSTER_ID": cluster_id, "CHORUS_KAFKA_REPLICAS": str(size),
        "CHORUS_KAFKA_HEAP": "-Xms128m -Xmx256m", "CHORUS_KAFKA_EXTRA_PROPS": CLUSTER_PROPS,
        "CHORUS_KAFKA_READY": "port",
    }  # fmt: skip
    nodes: dict[int, Service] = {}

    def start_node(i: int) -> Service:
        env = {**common, "CHORUS_KAFKA_NODE_ID": str(i + 1)}
        return start_kafka(data_dir / f"node-{i + 1}", client_ports[i], controller_ports[i], env=env)

    with ThreadPoolExecutor(size) as pool:
        futures = [pool.submit(start_node, i) for i in range(size)]
        failures = []
        for i, fut in enumerate(futures):
            try:
                nodes[i + 1] = fut.result()
            except Exception as exc:
                failures.append(exc)
    cluster = KafkaCluster(nodes)
    try:
        if failures:
            raise failures[0]
        _in_fresh_loop(_create_replicated_topic(cluster.bootstrap, topic, partitions, size, timeout))
    except BaseException:
        cluster.stop()
        raise
    return cluster
