"""Scenario ``reactions``: reactions/s one gateway counts into Redis (DESIGN.md 8: >= 100k/s per host).

One run starts a real Redis and a single-node Kafka (``tests/services.py``; a ``chorus
gateway`` needs both) and one ``chorus gateway`` process, all on CPU 0. Each rate is one
step on a fresh stream: ``reactgen`` processes on CPU 1 open RATE / ``--user-rate``
connections, each a different user (JWTs minted with the run's key), spread over source
addresses 127.0.0.2, .3, ... and over processes (the open-file limit is 20,000 per process),
and send ``{"t":"react","emoji":...}`` at RATE in total, ``--per-write`` frames per write.
Each user sends ``--user-rate`` (8) a second against a limit of ``--user-limit`` (20; the
default config has 10): a gateway that falls behind reads a user's spaced-out reactions
together, and against a tight limit that burst is refused, which would measure the
limiter's view of a backlog rather than throughput. Refusals are reported.

Aggregated rate: the stream's totals hash in Redis is read every 100 ms over the measured
``--duration``; the rate is the least-squares slope of total over time, i.e. reactions the
gateway checked, counted and flushed with its pipelined ``HINCRBY`` (every 500 ms). After
the senders stop and a flush passes, counted / sent says whether any was lost or refused.
Gateway CPU is read from /proc over the same window.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import (
    BENCH,
    FDS_PER_LOADGEN,
    LOAD_CPU,
    Fleet,
    Proc,
    build,
    cpu_sample,
    cpu_usage,
    free_port,
    md_table,
    one_line,
    wait_port,
)
from bench.harness import _read_json_line as read_json_line
from bench.pipeline import chorus, mint_tokens, services, write_config

__all__ = ["QUICK", "TIMEOUT_MIN", "add_arguments", "report", "run"]

QUICK = ("--rates", "2000", "--duration", "2", "--warmup", "1")  # ~40 s: checks the machinery
TIMEOUT_MIN = 20

TARGET_PER_S = 100_000
SAMPLE_S = 0.1
EMOJI = ("heart", "fire", "laugh", "wow", "clap", "sad")
SRC_PER_GEN = 8  # source addresses per reactgen process


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rates", type=_ints, default=[50_000, 100_000, 150_000], help="reactions/s sent (default "
                   "50000,100000,150000)")
    p.add_argument("--user-rate", type=float, default=8.0, help="reactions/s per connection (one user each)")
    p.add_argument("--user-limit", type=int, default=20, help="reactions.user_per_second of the gateway (default 20)")
    p.add_argument("--per-write", type=int, default=1, help="reactions per write() (frames in one TCP segment)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per step")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of sending before the measured window")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config key for the gateway, e.g. reactions.flush_interval_ms=100")


def reactgen_exe() -> Path:
    return build("reactgen")


def _redis(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


def _total(client: Any, key: str) -> int:
    return sum(int(v) for v in client.hgetall(key).values())


def _settled_total(client: Any, key: str, quiet_s: float = 1.5, limit_s: float = 60.0) -> int:
    """The totals once they stop moving: a gateway that fell behind works off its socket backlog
    after the senders stop, and flushes every 500 ms."""
    total, since, deadline = _total(client, key), time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.25)
        now = _total(client, key)
        if now != total:
            total, since = now, time.monotonic()
    return total


def slope(samples: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (t, total): the steady rate, insensitive to the 500 ms flush steps."""
    n = len(samples)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return sum((t - mt) * (v - mv) for t, v in samples) / var if var else 0.0


def _senders(fleet: Fleet, rate: int, port: int, stream: str, tokens: Path, args: argparse.Namespace) -> list[Proc]:
    conns = max(1, math.ceil(rate / args.user_rate))
    gens = max(1, -(-conns // (FDS_PER_LOADGEN // 2)))  # half the fd budget each: room for slack
    procs = []
    for i in range(gens):
        share = conns // gens + (1 if i < conns % gens else 0)
        argv = [str(reactgen_exe()), "--port", str(port), "--path", f"/ws?stream={stream}", "--conns", str(share),
                "--rate", str(rate * share / conns), "--per-write", str(args.per_write),
                "--seconds", str(args.warmup + args.duration + 1), "--start-after", "1000",
                "--token-file", str(tokens), "--emoji", ",".join(EMOJI),
                "--src-base", str(2 + SRC_PER_GEN * i), "--src-count", str(SRC_PER_GEN)]
        procs.append(fleet.start(f"reactgen{i}-{rate}", argv, LOAD_CPU, stdout=subprocess.PIPE))
    return procs


def step(log_dir: Path, rate: int, port: int, gateway: Proc, redis_url: str, prefix: str, tokens: Path,
         args: argparse.Namespace) -> dict[str, Any]:
    stream = f"react-{rate}-{int(time.time())}"
    key = f"{prefix}react:{stream}"
    client = _redis(redis_url)
    with Fleet(log_dir) as fleet:
        gens = _senders(fleet, rate, port, stream, tokens, args)
        connected = [read_json_line(g) for g in gens]
        time.sleep(1.0 + args.warmup)  # reactgen starts sending 1 s after connecting
        samples: list[tuple[float, int]] = []
        before = cpu_sample(gateway.pid)
        end = time.monotonic() + args.duration
        while time.monotonic() < end:
            samples.append((time.monotonic(), _total(client, key)))
            time.sleep(SAMPLE_S)
        cpu = cpu_usage(before, cpu_sample(gateway.pid))
        done = [read_json_line(g) for g in gens]
    counted = _settled_total(client, key)
    client.close()
    sent = sum(d["sent"] for d in done)
    conns = sum(d["conns"] for d in done)
    return {
        "rate": rate, "stream": stream, "conns": conns, "connected": sum(c["connected"] for c in connected),
        "connect_s": max(c["connect_s"] for c in connected), "senders": len(gens),
        "aggregated_per_s": slope(samples), "samples": len(samples),
        "sent": sent, "sent_per_s": sent / max(d["run_s"] for d in done), "counted": counted,
        "counted_of_sent": counted / sent if sent else 0.0, "blocked_writes": sum(d["blocked_writes"] for d in done),
        "rate_limited_errors": sum(d["errors_rate_limited"] for d in done),
        "other_errors": sum(d["errors_other"] for d in done),
        "first_error": next((d["first_error"] for d in done if d["first_error"]), ""),
        "reactions_events_per_conn_s": sum(d["reactions_events"] for d in done) / conns / max(d["run_s"] for d in done),
        "closed_by_server": sum(d["closed_by_server"] for d in done),
        "gateway_cpu_pct": round(cpu["server_cpu_pct"], 1), "gateway_wait_pct": round(cpu["server_wait_pct"], 1),
        "cpu0_busy_pct": round(cpu["cpu0_busy_pct"], 1),
    }


def run(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    log_dir.mkdir(parents=True, exist_ok=True)
    reactgen_exe()
    steps: list[dict[str, Any]] = []
    with services(log_dir / "services") as (redis, kafka), Fleet(log_dir) as fleet:
        config = log_dir / "chorus.toml"
        keys = write_config(config, redis.url, kafka.bootstrap,
                            [f"reactions.user_per_second={args.user_limit}", *args.set])
        port = free_port()
        gateway = chorus(fleet, "gateway", config, "gateway0", "--port", str(port))  # --profile attaches to it
        wait_port(port, gateway)
        _, tokens = mint_tokens(config, max(math.ceil(r / args.user_rate) for r in args.rates))
        for rate in args.rates:
            t0 = time.monotonic()
            try:
                row = step(log_dir, rate, port, gateway, redis.url, keys["redis.channel_prefix"], tokens, args)
            except Exception as exc:
                print(f"  rate {rate}: failed: {exc}", flush=True)
                steps.append({"rate": rate, "error": str(exc)})
                continue
            steps.append(row)
            print(f"  rate {rate:>7,}/s over {row['conns']:,} conns: aggregated {row['aggregated_per_s']:,.0f}/s, "
                  f"counted/sent {row['counted_of_sent']:.4f}, gateway CPU {row['gateway_cpu_pct']:.0f}% "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)
        dead = [] if gateway.alive() else ["gateway0"]
    return {"rates": args.rates, "user_rate": args.user_rate, "user_limit": args.user_limit,
            "per_write": args.per_write, "duration_s": args.duration, "warmup_s": args.warmup, "config": keys,
            "exited_early": dead, "reactgen": str(BENCH / "reactgen.c"), "steps": steps}


HEADERS = ["sent/s", "conns (users)", "aggregated/s", "counted / sent", "blocked writes", "rate_limited errors",
           "other errors", "`reactions` events per conn per s", "gateway CPU / wait", "CPU 0 busy",
           f"kept up with ≥ {TARGET_PER_S:,}/s"]


def report(data: dict[str, Any]) -> str:
    rows = []
    for r in data["steps"]:
        if "error" in r:
            rows.append([r["rate"], "", "failed", one_line(r["error"])] + [""] * (len(HEADERS) - 4))
            continue
        # Met when at least the target was sent and the gateway kept up with it: the slope is within
        # the sampling noise (3%) of the sent rate and every reaction sent was counted.
        kept_up = r["aggregated_per_s"] >= 0.97 * r["sent_per_s"] and r["counted_of_sent"] > 0.999
        ok = kept_up and r["sent_per_s"] >= 0.99 * TARGET_PER_S
        rows.append([f"{r['sent_per_s']:,.0f}", f"{r['connected']:,}/{r['conns']:,}", f"{r['aggregated_per_s']:,.0f}",
                     f"{r['counted']:,} / {r['sent']:,}", r["blocked_writes"], r["rate_limited_errors"],
                     r["other_errors"], f"{r['reactions_events_per_conn_s']:.2f}",
                     f"{r['gateway_cpu_pct']:.0f}% / {r['gateway_wait_pct']:.0f}%", f"{r['cpu0_busy_pct']:.0f}%",
                     "yes" if ok else ("kept up, below the target" if kept_up else "NO")])
    out = [f"### Reactions: one `chorus gateway` process (CPU 0) counting into Redis; {data['user_rate']:g} "
           f"reactions/s per user (limit {data.get('user_limit', 10)}/s), {data['per_write']} per write, "
           f"{data['duration_s']:g} s measured per rate", "",
           md_table(HEADERS, rows), "",
           "aggregated/s: slope of the stream's Redis totals over the measured window (what the gateway checked, "
           "counted and flushed with HINCRBY). counted / sent: totals after the senders stopped and a flush passed. "
           "Redis and Kafka share CPU 0 with the gateway; the senders run on CPU 1."]
    if data["exited_early"]:
        out.append(f"Exited before the end: {', '.join(data['exited_early'])} (see its log).")
    return "\n".join(out)
