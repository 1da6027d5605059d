"""Process control and measurement shared by the bench scenarios.

Every process the bench starts goes through a :class:`Fleet`, which stops them all by their
own PID (SIGTERM, then SIGKILL) when its ``with`` block ends, however it ends. Servers run on
CPU 0 and load generators on CPU 1, so the load does not steal the server's core.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from bench.progress import Profiler

__all__ = [
    "BENCH",
    "OUT",
    "Fleet",
    "Proc",
    "build",
    "cpu_sample",
    "cpu_usage",
    "free_port",
    "kernel_memory",
    "machine_info",
    "md_table",
    "one_line",
    "rss_bytes",
    "run_loadgens",
    "start_server",
    "write_json",
]

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
SERVER_CPU, LOAD_CPU = 0, 1
FDS_PER_LOADGEN = 19_000   # the open-file limit is 20,000 per process and cannot be raised
SERVERS = ("floor-single", "floor-coalesce", "picows", "websockets", "chorus")
PROFILER: Profiler | None = None  # set by ``--profile`` (bench/__main__.py)


# ---- building the C programs ----
def build(name: str, libs: tuple[str, ...] = ()) -> Path:
    """Compile bench/<name>.c into bench/out/, once per source version (cached by hash)."""
    src = BENCH / f"{name}.c"
    headers = b"".join(h.read_bytes() for h in sorted(BENCH.glob("*.h")))  # what the sources include
    digest = hashlib.sha256(src.read_bytes() + headers + " ".join(libs).encode()).hexdigest()[:12]
    exe = OUT / f"{name}-{digest}"
    if not exe.exists():
        OUT.mkdir(exist_ok=True)
        tmp = exe.with_suffix(".tmp")
        subprocess.run(["cc", "-O2", "-Wall", "-o", str(tmp), str(src), *libs], check=True)
        tmp.rename(exe)
    return exe


def loadgen_exe() -> Path:
    return build("loadgen", ("-lz",))


def floor_exe() -> Path:
    return build("floor")


# ---- processes ----
class Proc:
    """One child process, pinned to a CPU, with its stderr in a log file."""

    def __init__(self, name: str, argv: list[str], cpu: int, log: Path,
                 stdin: int | IO[Any] = subprocess.PIPE, stdout: int | IO[Any] = subprocess.DEVNULL) -> None:
        self.name = name
        self.log = log
        self.stop_signal = signal.SIGTERM  # py-spy takes SIGINT, then writes its flame graph
        self.grace_s = 3.0
        with open(log, "ab") as err:
            self.popen = subprocess.Popen(
                argv, cwd=ROOT, stdin=stdin, stdout=stdout, stderr=err,
                # Own session: a Ctrl-C at the terminal reaches only the harness, whose finally
                # blocks then stop everything in order.
                start_new_session=True,
                preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line.encode())
        self.popen.stdin.flush()

    def stop(self, grace_s: float | None = None) -> None:
        """``stop_signal`` (SIGTERM), then SIGKILL if it is still there after ``grace_s``."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, self.stop_signal)
            try:
                self.popen.wait(self.grace_s if grace_s is None else grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait()
        for pipe in (self.popen.stdin, self.popen.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def log_tail(self, lines: int = 8) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Fleet:
    """The processes of one step; ``with Fleet(...)`` stops them all, newest first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self.profiled = False

    def start(self, name: str, argv: list[str], cpu: int, **kw: Any) -> Proc:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        proc = Proc(name, argv, cpu, self.log_dir / f"{name}.log", **kw)
        self.procs.append(proc)
        if PROFILER is not None and not self.profiled and PROFILER.wants(name):
            self._profile(proc)
        return proc

    def _profile(self, proc: Proc) -> None:
        """py-spy on the load CPU, recording ``proc`` until the step ends (bench/progress.py)."""
        assert PROFILER is not None
        self.profiled = True
        svg = PROFILER.svg_for(self.log_dir, OUT / "logs", proc.name)
        spy = Proc(f"py-spy-{proc.name}", PROFILER.argv(proc.pid, svg), LOAD_CPU,
                   self.log_dir / f"py-spy-{proc.name}.log", stdin=subprocess.DEVNULL)
        spy.stop_signal, spy.grace_s = signal.SIGINT, 60.0
        self.procs.append(spy)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: Proc, timeout_s: float = 30.0) -> None:
    """Until the server accepts TCP connections; raise with its log if it died first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not listen on {port} within {timeout_s} s")


# ---- servers ----
def server_argv(kind: str, port: int, rate: float, deflate: bool, data_dir: Path) -> tuple[list[str], str]:
    """Command line and WebSocket path of one server kind; it waits for "start" on stdin."""
    if kind.startswith("floor"):
        mode = kind.removeprefix("floor-") if "-" in kind else "coalesce"
        return [str(floor_exe()), "--port", str(port), "--rate", str(rate), "--mode", mode, "--paused"], "/"
    module = {"picows": "picows_loop", "websockets": "websockets_broadcast", "chorus": "chorus_gateway"}[kind]
    argv = [sys.executable, "-m", f"bench.servers.{module}", "--port", str(port), "--rate", str(rate), "--paused"]
    if deflate:
        argv.append("--deflate")
    if kind == "chorus":
        argv += ["--data-dir", str(data_dir)]
        return argv, "/ws?stream=bench"
    return argv, "/"


def start_server(fleet: Fleet, kind: str, rate: float, deflate: bool = False,
                 name: str | None = None) -> tuple[Proc, int, str]:
    """Start a server on a fresh port (no TIME_WAIT left from an earlier step) and wait for it.

    It publishes nothing until ``proc.send("start\\n")``: viewers connect to an idle server.
    """
    port = free_port()
    data_dir = fleet.log_dir / f"data-{name or kind}-{port}"
    argv, path = server_argv(kind, port, rate, deflate, data_dir)
    proc = fleet.start(name or kind, argv, SERVER_CPU)
    wait_port(port, proc)
    return proc, port, path


# ---- load generators ----
def run_loadgens(fleet: Fleet, targets: list[tuple[int, str, int]], *, mode: str = "recv",
                 seconds: float = 5, start_after_ms: float = 1000, expect_per_conn: int = 0,
                 src_count: int = 4, deflate: bool = False, subprotocol: bool = False,
                 on_connected: Callable[[], None] | None = None) -> dict[str, Any]:
    """Connect clients to each (port, path, n) target; one merged result.

    A target gets as many loadgen processes as the fd limit needs; each process has its own
    source addresses (127.0.0.2 onwards, ``src_count`` each). ``on_connected`` runs once every
    process has finished connecting (the burst trigger, the memory reading); in hold mode the
    clients are released when it returns.
    """
    exe = loadgen_exe()
    gens: list[Proc] = []
    for port, path, n in targets:
        procs = max(1, -(-n // FDS_PER_LOADGEN))
        for i in range(procs):
            share = n // procs + (1 if i < n % procs else 0)
            src_base = 2 + len(gens) * src_count
            argv = [str(exe), f"--{mode}", "--port", str(port), "--path", path, "--conns", str(share),
                    "--seconds", str(seconds), "--start-after", str(start_after_ms),
                    "--src-base", str(src_base), "--src-count", str(src_count)]
            if expect_per_conn:
                argv += ["--expect", str(expect_per_conn * share)]
            argv += ["--deflate"] * deflate + ["--subprotocol"] * subprotocol
            stdin = subprocess.PIPE if mode == "hold" else subprocess.DEVNULL
            gens.append(fleet.start(f"loadgen{len(gens)}", argv, LOAD_CPU, stdin=stdin,
                                    stdout=subprocess.PIPE))
    phases = [_read_json_line(g) for g in gens]
    if on_connected is not None:
        on_connected()
    if mode == "hold":
        for g in gens:
            assert g.popen.stdin is not None
            g.popen.stdin.close()
    results = [_read_json_line(g) for g in gens]
    for g in gens:
        g.popen.wait(10)
    merged = merge_results(results)
    merged["connect_ms"] = max(p.get("connect_ms", 0.0) for p in phases)
    return merged


def _read_json_line(proc: Proc) -> dict[str, Any]:
    assert proc.popen.stdout is not None
    line = proc.popen.stdout.readline()
    if not line:
        raise RuntimeError(f"{proc.name} ended without output:\n{proc.log_tail()}")
    return dict(json.loads(line))


SUMMED = ("conns", "connected", "failed", "open", "closed_by_server", "deflate_conns", "errors",
          "inflate_errors", "messages", "rx_bytes", "deliveries", "deliveries_per_s", "cpu_pct", "wait_pct")


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts add up (all loadgens share CPU 1, so cpu_pct and wait_pct add too); percentiles are taken
    from the merged histogram."""
    merged: dict[str, Any] = {k: sum(r.get(k, 0) for r in results) for k in SUMMED}
    merged["processes"] = len(results)
    merged["window_s"] = max(r.get("window_s", 0.0) for r in results)
    merged["max_ms"] = max(r.get("max_ms", 0.0) for r in results)
    hist: dict[int, int] = {}
    for r in results:
        for low_us, count in r.get("hist", []):
            hist[low_us] = hist.get(low_us, 0) + count
    for q in (50, 95, 99):
        merged[f"p{q}_ms"] = _percentile(hist, q / 100)
    return merged


def _percentile(hist: dict[int, int], q: float) -> float:
    total = sum(hist.values())
    if not total:
        return 0.0
    rank, seen = min(int(q * total), total - 1), 0
    for low_us in sorted(hist):
        seen += hist[low_us]
        if seen > rank:
            return low_us / 1000
    return 0.0


# ---- CPU and memory readings ----
def cpu_sample(pid: int) -> tuple[float, ...]:
    """(wall s, process CPU s, CPU 0 busy s, CPU 0 total s, process run-queue wait s).

    Two samples tell how much of its core the server used, how much other processes used, and
    how long the server was runnable but waiting for the CPU (schedstat run_delay, summed over
    its threads): on a shared machine, that wait is the noise in the result.
    """
    tick = os.sysconf("SC_CLK_TCK")
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    proc = (int(fields[11]) + int(fields[12])) / tick  # utime + stime (fields 14, 15)
    wait = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            wait += int((task / "schedstat").read_text().split()[1]) / 1e9
    busy = total = 0.0
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{SERVER_CPU} "):
            t = [int(x) for x in line.split()[1:]]
            total = sum(t[:8]) / tick
            busy = total - (t[3] + t[4]) / tick  # minus idle and iowait
    return time.monotonic(), proc, busy, total, wait


def cpu_usage(a: tuple[float, ...], b: tuple[float, ...]) -> dict[str, float]:
    wall, core = b[0] - a[0], b[3] - a[3]
    server = 100 * (b[1] - a[1]) / wall if wall > 0 else 0.0
    busy = 100 * (b[2] - a[2]) / core if core > 0 else 0.0
    return {"server_cpu_pct": server, "cpu0_busy_pct": busy, "cpu0_other_pct": max(0.0, busy - server),
            "server_wait_pct": 100 * (b[4] - a[4]) / wall if wall > 0 else 0.0}


def rss_bytes(pid: int) -> int:
    """VmRSS of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def kernel_memory() -> dict[str, Any]:
    """TCP socket buffer memory, TCP sockets in use, and slab memory (per cache if readable)."""
    page = os.sysconf("SC_PAGESIZE")
    out: dict[str, Any] = {}
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            f = line.split()[1:]
            fields = dict(zip(f[::2], map(int, f[1::2]), strict=False))
            out["tcp_mem_bytes"] = fields.get("mem", 0) * page
            out["tcp_inuse"] = fields.get("inuse", 0)
            out["tcp_tw"] = fields.get("tw", 0)
    try:
        caches: dict[str, int] = {}
        for line in Path("/proc/slabinfo").read_text().splitlines()[2:]:
            f = line.split()
            # name active_objs num_objs objsize objperslab pagesperslab ... slabdata active num
            caches[f[0]] = int(f[14]) * int(f[5]) * page
        out["slab_bytes"], out["slab_caches"], out["slab_source"] = sum(caches.values()), caches, "slabinfo"
    except (OSError, IndexError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Slab:"):
                out["slab_bytes"] = int(line.split()[1]) * 1024
        out["slab_caches"], out["slab_source"] = {}, "meminfo"
    return out


def slab_growth(before: dict[str, Any], after: dict[str, Any], top: int = 6) -> dict[str, int]:
    """The slab caches that grew most: where the kernel's per-connection memory goes."""
    b, a = before.get("slab_caches", {}), after.get("slab_caches", {})
    grew = {name: a[name] - b.get(name, 0) for name in a}
    return dict(sorted(grew.items(), key=lambda kv: -kv[1])[:top])


# ---- output ----
def machine_info() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "loadavg": os.getloadavg()}


def write_json(scenario: str, data: dict[str, Any], stamp: str | None = None) -> Path:
    """bench/out/<scenario>-<stamp>.json (the run's start stamp, shared by its logs and profiles)."""
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{scenario}-{stamp or time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=1, default=str))
    return path


def one_line(text: str, width: int = 80) -> str:
    """Text for one table cell: whitespace (newlines too) collapsed, cut to ``width``."""
    return " ".join(text.split())[:width]


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) < 100 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def timed() -> Iterator[Callable[[], float]]:
    t0 = time.monotonic()
    yield lambda: time.monotonic() - t0
