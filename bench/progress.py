"""Progress of a bench run, its time bound, and py-spy profiles of the server under load.

**Progress**: each finished step prints one line with its place in the run, the time spent
and an estimate of what is left (from the mean step time so far); while a step runs longer
than ``heartbeat_s`` a line says it is still going. Plain lines only (no cursor tricks), so
the output reads the same in a terminal, a log file or CI.

**Time bound**: :func:`time_bound` arms SIGALRM; when it fires, :class:`OutOfTime` (a
BaseException, so the scenarios' per-step ``except Exception`` does not swallow it) unwinds
through every ``with Fleet`` block, which stops each process by its PID.

**Profiles**: with ``--profile`` the harness attaches ``py-spy record --native`` to the first
process of each step whose name matches (``chorus``, ``chorus0``: the Chorus server of
``fanout`` and ``connections``; ``gateway0``: the first gateway of ``pipeline``), from its
start until the step ends, and py-spy writes an SVG flame graph with Python and native
(C++ hub, Cython codec) frames under ``bench/out/profiles/``.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["OutOfTime", "Profiler", "Progress", "py_spy_exe", "time_bound"]

PROFILE_TARGETS = ("chorus", "chorus0", "gateway0")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """``with progress.step("label"):`` ... ``progress.done("what it measured")``."""

    def __init__(self, total: int, heartbeat_s: float = 30.0, out: Any = None) -> None:
        self.total = max(1, total)
        self.finished = 0
        self.heartbeat_s = heartbeat_s
        self.out = out or sys.stdout
        self.started = time.monotonic()
        self._step_started = self.started
        self._label = ""
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        self._label, self._step_started = label, time.monotonic()
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()
        try:
            yield
        finally:
            self._stop.set()
            self._beat.join()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self._print(f"  ... {self._label}: still running ({_clock(time.monotonic() - self._step_started)})")

    def done(self, summary: str) -> None:
        """One step finished (measured or failed): print where the run is."""
        self.finished += 1
        now = time.monotonic()
        elapsed = now - self.started
        left = elapsed / self.finished * (self.total - self.finished)
        eta = f", ~{_clock(left)} left" if self.finished < self.total else ""
        pct = 100 * self.finished // self.total
        self._print(f"[{self.finished}/{self.total} {pct}%, {_clock(elapsed)}{eta}] {summary} "
                    f"({now - self._step_started:.1f} s)")

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)


class OutOfTime(BaseException):  # a BaseException: per-step `except Exception` must not catch it
    """The scenario ran past its time bound."""


@contextlib.contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    """Raise :class:`OutOfTime` in the main thread after ``seconds`` (0: no bound)."""
    if seconds <= 0:
        yield
        return

    def fire(signum: int, frame: FrameType | None) -> None:
        raise OutOfTime(f"the run passed its bound of {_clock(seconds)}")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def py_spy_exe() -> str:
    """py-spy next to this Python (a venv) or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy (or pip install '.[bench]')")
    return found


@dataclass
class Profiler:
    """Which processes get py-spy attached (the harness's Fleet asks), and where the SVGs go."""

    out_dir: Path
    targets: tuple[str, ...] = PROFILE_TARGETS
    rate_hz: int = 100
    written: list[Path] = field(default_factory=list)

    def argv(self, pid: int, svg: Path) -> list[str]:
        """py-spy's command line recording ``pid`` into ``svg`` until it exits or gets SIGINT."""
        svg.parent.mkdir(parents=True, exist_ok=True)
        self.written.append(svg)
        return [py_spy_exe(), "record", "--native", "--rate", str(self.rate_hz), "--pid", str(pid),
                "--output", str(svg), "--format", "flamegraph"]

    def wants(self, name: str) -> bool:
        return name in self.targets

    def svg_for(self, step_dir: Path, logs_root: Path, name: str) -> Path:
        """bench/out/profiles/<scenario-stamp>/<step>-<process>.svg"""
        try:
            rel = step_dir.relative_to(logs_root)
        except ValueError:
            rel = Path(step_dir.name)
        run = rel.parts[0] if rel.parts else "run"
        step = "-".join(rel.parts[1:]) or "all"
        return self.out_dir / run / f"{step}-{name}.svg"

    def existing(self) -> list[Path]:
        return [p for p in self.written if p.exists()]


