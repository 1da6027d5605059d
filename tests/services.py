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
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KAFKA_START = ROOT / "services" / "kafka" / "start.sh"
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
        fresh = _STARTERS[self.name](self.data_dir, self.port, *self.ports)
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


def start_kafka(
    data_dir: Path, port: int | None = None, controller_port: int | None = None
) -> Service:
    """Start the single-node KRaft broker with ``services/kafka/start.sh`` on free ports.

    Returns once a topic can be created (``comments``, 4 partitions). Restarting with the same
    ``data_dir`` and ports keeps the cluster (no re-format). Log: ``data_dir/kafka.log``.
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
            env={**os.environ, "CHORUS_KAFKA_PARENT_PID": str(os.getpid())},
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
        match="kafka.Kafka", ports=(controller_port,),
    )  # fmt: skip


_STARTERS = {"redis": start_redis, "kafka": start_kafka}
