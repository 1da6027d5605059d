"""Scenario ``soak``: the embedded default's memory over a long run (its in-process log is bounded).

Each ``--retention`` setting is one ``chorus run`` process (a real process on CPU 0, its own
port and data dir), all started together and driven at once with the same load from this
process: ``--posters`` WebSocket connections posting ``--rate`` comments/s in total to one
stream (rate limits off, so the rate is what is posted, acks counted) and ``--viewers``
connections reading every batch. Texts cycle through ``--distinct-texts`` phrases (chat repeats
itself; with every text unique the moderator's score cache, bounded at 50,000 texts, grows for
the first ~17 minutes at 50/s and hides the log's slope). Every ``--sample-s`` seconds each server's RSS is read from
/proc (VmRSS). ``default`` is the configured retention (``kafka.log_retention_*``);
``0`` keeps every record (the log as it was before it had a bound); a number N keeps N records
per partition (age bound off).

Per server: mean RSS over the first and the last minute, their change, and the least-squares
slope of RSS over the run after the first minute (MB/min): a bounded log is flat once its
retention is full, an unbounded one keeps the slope.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.harness import Fleet, Proc, free_port, md_table, rss_bytes, wait_port
from bench.reactions import slope

__all__ = ["QUICK", "TIMEOUT_MIN", "add_arguments", "report", "run"]

QUICK = ("--minutes", "1", "--rate", "20", "--sample-s", "5")
TIMEOUT_MIN = 30
SERVER_CPU = 0
MB = 1024 * 1024


def _settings(text: str) -> list[str]:
    out = [s.strip() for s in text.split(",") if s.strip()]
    for s in out:
        if s != "default" and not s.isdigit():
            raise argparse.ArgumentTypeError(f"retention {s!r}: 'default' or a record count (0: keep every record)")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=10.0, help="length of the soak (default 10)")
    p.add_argument("--rate", type=float, default=50.0, help="comments/s posted to each server (default 50)")
    p.add_argument("--posters", type=int, default=5, help="posting connections per server (default 5)")
    p.add_argument("--viewers", type=int, default=3, help="reading connections per server (default 3)")
    p.add_argument("--sample-s", type=float, default=10.0, help="seconds between RSS samples (default 10)")
    p.add_argument("--distinct-texts", type=int, default=500, help="phrases the texts cycle through (0: every "
                   "text unique; default 500)")
    p.add_argument("--retention", type=_settings, default=["default", "0"],
                   help="comma list of log retentions, one server each: 'default' (the config's), 0 (keep "
                        "everything), or N records per partition (default: default,0)")


def _env(setting: str) -> list[str]:
    """`env` assignments for one server: limits off, and the log retention."""
    env = ["CHORUS_LIMITS__USER_PER_MINUTE=0", "CHORUS_LIMITS__IP_PER_MINUTE=0"]
    if setting == "0":
        env += ["CHORUS_KAFKA__LOG_RETENTION_RECORDS=0", "CHORUS_KAFKA__LOG_RETENTION_S=0",
                "CHORUS_KAFKA__LOG_MAX_RECORDS=0"]
    elif setting != "default":
        env += [f"CHORUS_KAFKA__LOG_RETENTION_RECORDS={setting}", "CHORUS_KAFKA__LOG_RETENTION_S=0"]
    return env


def _start(fleet: Fleet, setting: str, log_dir: Path) -> tuple[Proc, int]:
    port = free_port()
    data = log_dir / f"data-{setting}"
    shutil.rmtree(data, ignore_errors=True)
    argv = ["env", *_env(setting), sys.executable, "-m", "chorus.cli", "run", "--port", str(port),
            "--data-dir", str(data)]
    proc = fleet.start(f"chorus-run-{setting}", argv, SERVER_CPU)
    wait_port(port, proc, timeout_s=60)
    return proc, port


def _dev_token(port: int, name: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/dev/token?name={name}", timeout=10) as r:
        return str(json.loads(r.read())["token"])


class Load:
    """The posters and viewers of one server, counting what they got."""

    def __init__(self, port: int, args: argparse.Namespace) -> None:
        self.port = port
        self.args = args
        self.stream = f"soak-{port}"
        self.sent = self.acked = self.errors = self.seen = 0

    async def _poster(self, n: int, until: float) -> None:
        from websockets.asyncio.client import connect

        token = _dev_token(self.port, f"soak{n}")
        url = f"ws://127.0.0.1:{self.port}/ws?stream={self.stream}"
        interval = self.args.posters / self.args.rate
        async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, compression=None) as ws:
            reader = asyncio.ensure_future(self._count_answers(ws))
            next_at = time.monotonic()
            i = 0
            while time.monotonic() < until:
                i += 1
                await ws.send(json.dumps({"t": "comment", "text": self._text(n, i), "nonce": f"s{n}-{i}"}))
                self.sent += 1
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await asyncio.sleep(2)  # the last acks
            reader.cancel()

    def _text(self, n: int, i: int) -> str:
        distinct = self.args.distinct_texts
        k = (n * 7919 + i) % distinct if distinct else f"{n}-{i}"
        return f"soak comment {k} " + "x" * 60

    async def _count_answers(self, ws: Any) -> None:
        async for raw in ws:
            event = json.loads(raw)
            if event.get("t") == "ack":
                self.acked += 1
            elif event.get("t") == "error":
                self.errors += 1

    async def _viewer(self, until: float) -> None:
        from websockets.asyncio.client import connect

        url = f"ws://127.0.0.1:{self.port}/ws?stream={self.stream}"
        async with connect(url, compression=None) as ws:
            while time.monotonic() < until + 2:
                try:
                    raw = await asyncio.wait_for(ws.recv(), timeout=1.0)
                except TimeoutError:
                    continue
                event = json.loads(raw)
                if event.get("t") == "batch":
                    self.seen += len(event.get("comments", ()))

    async def run(self, until: float) -> None:
        await asyncio.gather(*(self._viewer(until) for _ in range(self.args.viewers)),
                             *(self._poster(n, until) for n in range(self.args.posters)))


async def _sample(servers: dict[str, Proc], until: float, every_s: float,
                  samples: dict[str, list[tuple[float, int]]]) -> None:
    t0 = time.monotonic()
    while True:
        now = time.monotonic()
        for setting, proc in servers.items():
            if proc.alive():
                samples[setting].append((now - t0, rss_bytes(proc.pid)))
        if now >= until:
            return
        line = ", ".join(f"{s}: {samples[s][-1][1] / MB:.1f} MB" for s in servers if samples[s])
        print(f"  {now - t0:5.0f} s  RSS {line}", flush=True)
        await asyncio.sleep(min(every_s, max(0.0, until - time.monotonic())))


async def _soak(servers: dict[str, Proc], ports: dict[str, int], args: argparse.Namespace,
                samples: dict[str, list[tuple[float, int]]]) -> dict[str, Load]:
    until = time.monotonic() + args.minutes * 60
    loads = {s: Load(ports[s], args) for s in servers}
    await asyncio.gather(_sample(servers, until, args.sample_s, samples), *(load.run(until) for load in loads.values()))
    return loads


def summarise(samples: list[tuple[float, int]], window_s: float = 60.0) -> dict[str, float]:
    """First- and last-minute mean RSS (MB), their change (%), and the slope (MB/min) after the first
    minute and over the second half (once every bounded part is full)."""
    end = samples[-1][0]
    first = [v for t, v in samples if t <= window_s]
    last = [v for t, v in samples if t >= end - window_s]
    after = [(t, v) for t, v in samples if t >= window_s] or samples
    second_half = [(t, v) for t, v in samples if t >= end / 2] or samples
    first_mb, last_mb = sum(first) / len(first) / MB, sum(last) / len(last) / MB
    return {"first_min_mb": round(first_mb, 1), "last_min_mb": round(last_mb, 1),
            "change_pct": round(100 * (last_mb - first_mb) / first_mb, 1),
            "slope_mb_per_min": round(slope([(t / 60, v / MB) for t, v in after]), 2),
            "second_half_slope_mb_per_min": round(slope([(t / 60, v / MB) for t, v in second_half]), 2)}


def run(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    log_dir.mkdir(parents=True, exist_ok=True)
    samples: dict[str, list[tuple[float, int]]] = {s: [] for s in args.retention}
    with Fleet(log_dir) as fleet:
        started = {s: _start(fleet, s, log_dir) for s in args.retention}
        servers = {s: proc for s, (proc, _) in started.items()}
        loads = asyncio.run(_soak(servers, {s: port for s, (_, port) in started.items()}, args, samples))
        dead = [s for s, proc in servers.items() if not proc.alive()]
    rows = []
    for s in args.retention:
        load = loads[s]
        rows.append({"retention": s, "sent": load.sent, "acked": load.acked, "errors": load.errors,
                     "seen_per_viewer": load.seen / max(1, args.viewers), **summarise(samples[s]),
                     "samples": [(round(t, 1), v) for t, v in samples[s]]})
    return {"minutes": args.minutes, "rate": args.rate, "posters": args.posters, "viewers": args.viewers,
            "sample_s": args.sample_s, "distinct_texts": args.distinct_texts, "exited_early": dead, "servers": rows}


HEADERS = ["log retention", "posted / acked", "errors", "comments seen per viewer", "RSS first minute",
           "RSS last minute", "change", "slope after the first minute", "slope, second half", "flat (±5%)"]


def _label(setting: str) -> str:
    if setting == "default":
        return "default (kafka.log_retention_*)"
    return "0: every record kept" if setting == "0" else f"{int(setting):,} records per partition"


def report(data: dict[str, Any]) -> str:
    rows = [[_label(r["retention"]), f"{r['sent']:,} / {r['acked']:,}", r["errors"], f"{r['seen_per_viewer']:,.0f}",
             f"{r['first_min_mb']:.1f} MB", f"{r['last_min_mb']:.1f} MB", f"{r['change_pct']:+.1f}%",
             f"{r['slope_mb_per_min']:+.2f} MB/min", f"{r.get('second_half_slope_mb_per_min', 0):+.2f} MB/min",
             "yes" if abs(r["change_pct"]) <= 5 else "NO"]
            for r in data["servers"]]
    out = [f"### Soak: `chorus run` (embedded default) for {data['minutes']:g} min at {data['rate']:g} comments/s, "
           f"{data['posters']} posting and {data['viewers']} reading connections each, "
           f"{data.get('distinct_texts') or 'all'} distinct texts; RSS every {data['sample_s']:g} s",
           "", md_table(HEADERS, rows), "",
           "Every server ran at the same time on CPU 0 with the same load; RSS is VmRSS of the `chorus run` process."]
    if data["exited_early"]:
        out.append(f"Exited before the end: {', '.join(data['exited_early'])} (see its log).")
    return "\n".join(out)
