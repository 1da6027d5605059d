"""Scenario ``pipeline``: comments posted over WebSocket through Kafka and Redis to the viewers.

One run starts a real Redis and a single-node Kafka (``tests/services.py``), then ``chorus
gateway`` (``--gateways``), ``chorus coordinator`` and ``chorus archiver`` as separate
processes sharing one generated TOML (its own ``auth.key`` and ``redis.channel_prefix``).
``--placement split`` (the default) gives the gateways CPU 0 to themselves, as on a gateway
host, and puts Kafka, Redis, the coordinator, the archiver and the loadgens (posters and
viewers) on CPU 1; ``shared`` puts every server process on CPU 0 and the loadgens on CPU 1.
After a probe comment has gone all the way round, each rate is one step on a fresh stream:

1. ``--viewers`` connections are on the stream: the posters of step 2 and, for the rest,
   watchers (split over the gateways) that only watch: ``--probes`` of them loadgen ``--recv``
   connections that measure every comment, the others ``--sink`` connections that read and
   drop what they get (each watcher inflates and scans every comment otherwise, and the load
   generator, not the server, limited the run). They negotiate permessage-deflate as
   browsers do (``--no-deflate``: plain frames);
2. one loadgen ``--post RATE`` posts for ``--warmup-ms`` unmarked, then ``--duration`` s of
   comments whose text carries ``bt=<due time> k=<seq>``, and waits up to ``--grace`` s for
   the last answers. It posts over RATE / ``--user-rate`` connections to the first gateway,
   each a different user (JWTs minted with the run's key, as ``chorus token`` does): admission
   takes one user's posts one at a time (ordering), so a few users could not carry the rate.
   Those connections are viewers too: they receive every batch like the watchers;
3. ``--grace`` s after the last comment was due, the viewers stop.

Acceptance latency: a comment's due time to its ``ack`` (sent only after Kafka acked it,
acks=all). Delivery latency: due time to receipt by a watcher. Delivered: distinct marked
comments each watcher got / (watchers x marked comments acked); a comment that reaches a
watcher later than the grace counts as not delivered. Per-process CPU is read from /proc over
the measured ``--duration``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.harness import (
    LOAD_CPU,
    ROOT,
    SERVER_CPU,
    Fleet,
    Proc,
    cpu_sample,
    cpu_usage,
    free_port,
    loadgen_exe,
    md_table,
    merge_results,
    one_line,
    wait_port,
)
from bench.harness import _read_json_line as read_json_line
from chorus.auth import mint_token
from chorus.config import iter_defaults, load_config

__all__ = ["add_arguments", "report", "run"]

# Admission limits set out of the way (the validator's maximum), so the bench measures the
# pipeline with the limiter still on its path. Only keys this checkout's config has are set.
GENEROUS = {"limits.user_per_minute": 1_000_000, "limits.ip_per_minute": 1_000_000,
            "limits.stream_per_second": 1_000_000, "limits.global_per_second": 1_000_000}
ACK_P95_TARGET_MS, E2E_P95_TARGET_MS, E2E_TARGET_RATE = 50.0, 500.0, 10_000
# --quick: one small step through the whole pipeline (~1 min with Kafka's start): checks the machinery.
QUICK = ("--rates", "200", "--viewers", "50", "--duration", "2", "--warmup-ms", "500", "--grace", "2")
TIMEOUT_MIN = 30
NOTE = ("Adaptive sampling is on (default: above 5,000 comments/s a stream broadcasts 20%): below the threshold "
        "every viewer should get every acked comment (delivered 1.0), less means the gateway skipped batches for "
        "viewers over their backlog (`skipped` events) or they arrived after the grace; above it viewers get a "
        "`throttle` event and a sample.")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rates", type=_ints, default=[1000, 10_000], help="comments/s posted (default 1000,10000)")
    p.add_argument("--viewers", type=int, default=1000,
                   help="connections on the stream, the posters among them (the rest only watch and are measured)")
    p.add_argument("--gateways", type=int, default=1, choices=(1, 2), help="gateway processes (posts go to the first)")
    p.add_argument("--user-rate", type=float, default=20.0, help="posts/s per poster connection (one user each)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds of posting per step")
    p.add_argument("--warmup-ms", type=float, default=2000.0, help="posting before the measured comments")
    p.add_argument("--grace", type=float, default=5.0, help="seconds after the last post for acks and deliveries")
    p.add_argument("--probes", type=int, default=100,
                   help="watchers that measure each comment (the rest read and drop what they get, so the load "
                        "generator's own CPU does not limit the run); 0: every watcher measures")
    p.add_argument("--deflate", action=argparse.BooleanOptionalAction, default=True,
                   help="viewers negotiate permessage-deflate, as browsers do (default; --no-deflate: plain frames)")
    p.add_argument("--placement", choices=("split", "shared"), default="split",
                   help="split (default): the gateways alone on CPU 0, as on a gateway host, and Kafka, Redis, "
                        "coordinator, archiver and the loadgens on CPU 1; shared: every server process on CPU 0")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config key for every chorus process, e.g. coordinator.max_batch=500")


# ---- services and chorus processes ----
def backend_cpu(args: argparse.Namespace) -> int:
    """The CPU of Kafka, Redis, the coordinator and the archiver."""
    return LOAD_CPU if args.placement == "split" else SERVER_CPU


@contextlib.contextmanager
def services(data_dir: Path, cpu: int = SERVER_CPU) -> Iterator[tuple[Any, Any]]:
    """Redis and Kafka on ``cpu`` (started while this process is pinned there); yields their
    ``tests/services.py`` Service objects (``.url``, ``.bootstrap``, ``.pid``)."""
    if not list((ROOT / ".services" / "kafka" / "libs").glob("kafka_2.13-*.jar")):
        raise SystemExit("no Kafka jars in .services/kafka/libs: run `bash scripts/install-test-deps.sh`")
    sys.path.insert(0, str(ROOT / "tests"))
    svc = importlib.import_module("services")
    started: list[Any] = []
    mask = os.sched_getaffinity(0)
    # A fresh broker spends its first minute or two compiling (C2) on the same core as the
    # run; the client compiler alone settles in seconds (services/kafka/start.sh reads this).
    os.environ.setdefault("CHORUS_KAFKA_JVM_OPTS", "-XX:TieredStopAtLevel=1")
    try:
        os.sched_setaffinity(0, {cpu})  # children inherit it
        started.append(svc.start_redis(data_dir / "redis"))
        started.append(svc.start_kafka(data_dir / "kafka"))
        os.sched_setaffinity(0, mask)
        yield started[0], started[1]
    finally:
        os.sched_setaffinity(0, mask)
        for s in reversed(started):
            s.stop()


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else str(value)


def write_config(path: Path, redis_url: str, bootstrap: str, extra: list[str]) -> dict[str, Any]:
    """The run's TOML; returns the keys set (the secret key masked)."""
    known = {key for key, _, _ in iter_defaults()}
    keys: dict[str, Any] = {
        "data_dir": str(path.parent), "log_level": "WARNING", "auth.key": secrets.token_hex(24),
        "kafka.bootstrap": bootstrap, "redis.url": redis_url, "redis.channel_prefix": f"bench{secrets.token_hex(4)}:",
        "history.path": str(path.parent / "history.sqlite3"), "gateway.max_connections_per_ip": 100_000,
        **{k: v for k, v in GENEROUS.items() if k in known},
    }
    for item in extra:
        key, _, value = item.partition("=")
        keys[key] = int(value) if value.lstrip("-").isdigit() else value
    sections: dict[str, list[str]] = {}
    for key, value in keys.items():
        head, _, name = key.rpartition(".")
        sections.setdefault(head, []).append(f"{name} = {_toml(value)}")
    path.write_text("\n".join(sections.pop("")) + "\n" +
                    "".join(f"[{head}]\n" + "\n".join(lines) + "\n" for head, lines in sections.items()))
    return {**keys, "auth.key": "(random)"}


def chorus(fleet: Fleet, role: str, config: Path, name: str, *extra: str, cpu: int = SERVER_CPU) -> Proc:
    argv = [sys.executable, "-m", "chorus.cli", role, "--config", str(config), *extra]
    return fleet.start(name, argv, cpu, stdin=subprocess.DEVNULL)


def mint_tokens(config: Path, users: int) -> tuple[str, Path]:
    """``chorus token`` for the probe's user, and a file of one token per poster user (bench-0 ...)
    minted in this process with the same function and key (a CLI start per token is slow)."""
    out = subprocess.run([sys.executable, "-m", "chorus.cli", "token", "--config", str(config), "--user", "bench",
                          "--scope", "read", "--scope", "write"], cwd=ROOT, capture_output=True, text=True, check=True)
    auth = load_config(config, env={}).auth
    path = config.with_name("tokens.txt")
    path.write_text("".join(mint_token(auth, f"bench-{i}", f"bench-{i}", ["read", "write"]) + "\n"
                            for i in range(users)))
    return out.stdout.strip(), path


def wait_ready(port: int, token: str, timeout_s: float = 90.0) -> float:
    """Post probe comments until one comes back in a batch (the coordinator's group may still be
    joining); returns the seconds it took."""
    from websockets.sync.client import connect

    t0 = time.monotonic()
    url = f"ws://127.0.0.1:{port}/ws?stream=bench-ready-{secrets.token_hex(3)}"
    # No permessage-deflate, like the loadgen viewers: the variant under test is plain JSON.
    headers = {"Authorization": f"Bearer {token}"}
    with connect(url, additional_headers=headers, compression=None, open_timeout=10) as ws:
        for n in range(1, 1000):
            ws.send(json.dumps({"t": "comment", "text": f"probe {n}", "nonce": f"p{n}"}))
            until = min(t0 + timeout_s, time.monotonic() + 5)
            while (left := until - time.monotonic()) > 0:
                try:
                    event = json.loads(ws.recv(timeout=left))
                except TimeoutError:
                    break
                if event.get("t") == "batch" and event.get("comments"):
                    return time.monotonic() - t0
            if time.monotonic() >= t0 + timeout_s:
                break
    raise RuntimeError(f"no probe comment came back through the pipeline within {timeout_s:.0f} s")


# ---- one step ----
def poster_conns(rate: int, args: argparse.Namespace) -> int:
    return max(1, math.ceil(rate / args.user_rate))


def _loadgen(fleet: Fleet, name: str, mode: list[str], port: int, stream: str, conns: int, seconds: float,
             start_after_ms: float, src_base: int, src_count: int, deflate: bool) -> Proc:
    argv = [str(loadgen_exe()), *mode, "--port", str(port), "--path", f"/ws?stream={stream}", "--conns", str(conns),
            "--seconds", str(seconds), "--start-after", str(start_after_ms),
            "--src-base", str(src_base), "--src-count", str(src_count), *(["--deflate"] if deflate else [])]
    return fleet.start(name, argv, LOAD_CPU, stdout=subprocess.PIPE)


def step(log_dir: Path, rate: int, ports: list[int], tokens: Path, servers: dict[str, int],
         args: argparse.Namespace) -> dict[str, Any]:
    """One rate on a fresh stream; its loadgens are stopped when it ends, however it ends."""
    with Fleet(log_dir) as load:
        return _step(load, rate, ports, tokens, servers, args)


def _step(fleet: Fleet, rate: int, ports: list[int], tokens: Path, servers: dict[str, int],
          args: argparse.Namespace) -> dict[str, Any]:
    stream = f"bench-{rate}-{secrets.token_hex(3)}"
    posting_s = args.warmup_ms / 1000 + args.duration
    posters = poster_conns(rate, args)
    watchers = max(1, args.viewers - posters)  # the posters are viewers of the stream too
    probes = min(watchers, args.probes) if args.probes > 0 else watchers
    viewers: list[Proc] = []
    sinks: list[Proc] = []
    for i, port in enumerate(ports):
        for kind, total, out in (("viewers", probes, viewers), ("sinks", watchers - probes, sinks)):
            share = total // len(ports) + (1 if i < total % len(ports) else 0)
            if share:
                out.append(_loadgen(fleet, f"{kind}{i}-{rate}", ["--recv" if kind == "viewers" else "--sink"], port,
                                    stream, share, posting_s + args.grace + 60, 0, 2 + 4 * i, 4, args.deflate))
    for v in viewers + sinks:
        read_json_line(v)  # connected
    time.sleep(0.5)  # the gateway finishes joining them to the hub
    poster = _loadgen(fleet, f"poster-{rate}", ["--post", str(rate), "--token-file", str(tokens),
                                               "--grace", str(args.grace)],
                      ports[0], stream, posters, args.duration, args.warmup_ms, 2 + 4 * len(ports), 1, args.deflate)
    read_json_line(poster)  # connected: posting starts now
    t_post = time.monotonic()
    pids = {**servers, "poster": poster.pid, **{f"viewers{i}": v.pid for i, v in enumerate(viewers)},
            **{f"sinks{i}": v.pid for i, v in enumerate(sinks)}}
    time.sleep(args.warmup_ms / 1000)
    before = {name: cpu_sample(pid) for name, pid in pids.items()}
    time.sleep(args.duration)
    cpu = {name: cpu_usage(before[name], cpu_sample(pid)) for name, pid in pids.items()}
    post = read_json_line(poster)
    time.sleep(max(0.0, t_post + posting_s + args.grace - time.monotonic()))  # the last deliveries
    for v in viewers + sinks:
        assert v.popen.stdin is not None
        v.popen.stdin.close()
    got = [read_json_line(v) for v in viewers]
    sunk = [read_json_line(v) for v in sinks]
    recv = merge_results(got)
    expected = recv["connected"] * post["marked_acked"]  # over the probes, which measure
    return {
        "rate": rate, "stream": stream, "viewers": args.viewers, "watchers": watchers, "probes": probes,
        "connected": recv["connected"] + sum(g["connected"] for g in sunk),
        "poster_conns": posters, "posters_connected": post["connected"],
        "posted": post["posted"], "marked": post["marked_posted"], "acked": post["marked_acked"],
        "refused": post["marked_refused"], "rate_limited": post["marked_rate_limited"],
        "unanswered": post["unanswered"], "unsent": post["unsent"], "first_refusal": post["first_refusal"],
        "poster_max_lag_ms": post["max_lag_ms"],
        "ack_ms": {q: post[f"{q}_ms"] for q in ("p50", "p95", "p99", "max")},
        "e2e_ms": {q: recv[f"{q}_ms"] for q in ("p50", "p95", "p99", "max")},
        "deliveries": recv["deliveries"], "expected": expected,
        "delivered": recv["deliveries"] / expected if expected else 0.0,
        "delivered_of_posted": recv["deliveries"] / (recv["connected"] * post["marked_posted"] or 1),
        "least_served": min(g["conn_min"] for g in got) / post["marked_acked"] if post["marked_acked"] else 0.0,
        "duplicates": sum(g["duplicates"] for g in got), "skipped_events": sum(g["skipped_events"] for g in got),
        "throttle_events": sum(g["throttle_events"] for g in got),
        "closed_by_server": recv["closed_by_server"] + sum(g["closed_by_server"] for g in sunk),
        "rx_mb_per_s": (recv["rx_bytes"] + sum(g["rx_bytes"] for g in sunk)) / 1e6 / recv["window_s"]
        if recv["window_s"] else 0.0,
        "cpu_pct": {name: round(u["server_cpu_pct"], 1) for name, u in cpu.items()},
        "wait_pct": {name: round(u["server_wait_pct"], 1) for name, u in cpu.items()},
        "cpu0_busy_pct": round(next(iter(cpu.values()))["cpu0_busy_pct"], 1),
    }


def run(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    log_dir.mkdir(parents=True, exist_ok=True)
    steps: list[dict[str, Any]] = []
    backend = backend_cpu(args)
    with services(log_dir / "services", backend) as (redis, kafka), Fleet(log_dir) as fleet:
        config = log_dir / "chorus.toml"
        keys = write_config(config, redis.url, kafka.bootstrap, args.set)
        ports = [free_port() for _ in range(args.gateways)]
        gateways = [chorus(fleet, "gateway", config, f"gateway{i}", "--port", str(p)) for i, p in enumerate(ports)]
        servers = {f"gateway{i}": g.pid for i, g in enumerate(gateways)}
        servers["coordinator"] = chorus(fleet, "coordinator", config, "coordinator", cpu=backend).pid
        servers["archiver"] = chorus(fleet, "archiver", config, "archiver", cpu=backend).pid
        servers["redis"], servers["kafka"] = redis.pid, kafka.pid
        for port, g in zip(ports, gateways, strict=True):
            wait_port(port, g)
        token, tokens = mint_tokens(config, max(poster_conns(r, args) for r in args.rates))
        ready_s = [wait_ready(p, token) for p in ports]
        print(f"pipeline up: gateways on {ports}, first comment round trip after {max(ready_s):.1f} s", flush=True)
        for rate in args.rates:
            t0 = time.monotonic()
            try:
                row = step(log_dir, rate, ports, tokens, servers, args)
            except Exception as exc:
                print(f"  rate {rate}: failed: {exc}", flush=True)
                steps.append({"rate": rate, "error": str(exc)})
                continue
            steps.append(row)
            print(f"  rate {rate:>6}/s: acked {row['acked']:,}/{row['marked']:,}, "
                  f"ack p95 {row['ack_ms']['p95']:.1f} ms, e2e p95 {row['e2e_ms']['p95']:.1f} ms, "
                  f"delivered {row['delivered']:.3f}, "
                  f"CPU {_cpu_line(row)} ({time.monotonic() - t0:.0f} s)", flush=True)
        dead = [p.name for p in fleet.procs if p.name in servers and not p.alive()]
    return {"rates": args.rates, "viewers": args.viewers, "gateways": args.gateways, "user_rate": args.user_rate,
            "placement": args.placement, "deflate": args.deflate,
            "duration_s": args.duration, "warmup_ms": args.warmup_ms, "grace_s": args.grace, "config": keys,
            "ready_s": ready_s, "exited_early": dead, "note": NOTE, "steps": steps}


# ---- output ----
def _cpu_line(row: dict[str, Any]) -> str:
    return ", ".join(f"{name} {pct:.0f}%" for name, pct in row["cpu_pct"].items())


def _placement_line(placement: str) -> str:
    if placement == "split":
        return ("The gateway alone on CPU 0 (a gateway host); Kafka, Redis, coordinator, archiver, poster and viewers "
                "share CPU 1 (CPU 0 busy is the gateway's core).")
    return "Server processes (gateway, coordinator, archiver, Redis, Kafka) share CPU 0; poster and viewers CPU 1."


def _mark(ok: bool) -> str:
    return "yes" if ok else "NO"


HEADERS = ["posts/s", "posters", "acked", "refused (rate_limited)", "unanswered", "ack p50", "ack p95", "ack p99",
           "e2e p50", "e2e p95", "e2e p99", "delivered", "least-served viewer", "skipped events", "targets"]
LEGEND = ("Latencies in ms from the comment's due time (the poster's schedule). ack: the gateway's `ack` (after Kafka "
          "acks=all). e2e: receipt by a watcher, over the comments that arrived within the grace. delivered: distinct "
          "comments per watcher / comments acked (mean; least-served: the worst watcher). posters: viewers, one user "
          "each, that post (and receive the stream's batches like the rest); watchers: the other viewers, which are "
          "measured. delivered above 1: comments answered with an error (e.g. `not_accepted` after "
          "kafka.accept_timeout_ms) reached the viewers anyway.")


def _targets(r: dict[str, Any]) -> str:
    if not r["acked"]:
        return "nothing acked: NO"
    text = f"ack p95 ≤ {ACK_P95_TARGET_MS:.0f}: {_mark(r['ack_ms']['p95'] <= ACK_P95_TARGET_MS)}"
    if r["rate"] >= E2E_TARGET_RATE:
        ok = r["e2e_ms"]["p95"] <= E2E_P95_TARGET_MS and r["delivered"] > 0
        text += f"; e2e p95 ≤ {E2E_P95_TARGET_MS:.0f}: {_mark(ok)}"
    return text


def report(data: dict[str, Any]) -> str:
    rows, cpu_rows = [], []
    names = next((list(r["cpu_pct"]) for r in data["steps"] if "error" not in r), [])
    for r in data["steps"]:
        if "error" in r:
            rows.append([r["rate"], "", "failed", one_line(r["error"])] + [""] * (len(HEADERS) - 4))
            continue
        a, e = r["ack_ms"], r["e2e_ms"]
        rows.append([r["rate"], f"{r['posters_connected']}/{r['poster_conns']}", f"{r['acked']:,}/{r['marked']:,}",
                     f"{r['refused']:,} ({r['rate_limited']:,})", r["unanswered"], a["p50"], a["p95"], a["p99"],
                     e["p50"], e["p95"], e["p99"], f"{r['delivered']:.3f}", f"{r['least_served']:.3f}",
                     f"{r['skipped_events']:,}", _targets(r)])
        cpu_rows.append([r["rate"], *(f"{r['cpu_pct'][n]:.0f}% / {r['wait_pct'][n]:.0f}%" for n in names),
                         f"{r['cpu0_busy_pct']:.0f}%", f"{r['rx_mb_per_s']:,.0f}"])
    out = [f"### Pipeline: posts → gateway → Kafka → coordinator → Redis → gateway → {data['viewers']:,} viewers "
           f"({data['gateways']} gateway(s), {data['duration_s']:g} s measured per rate)", "",
           md_table(HEADERS, rows), "", LEGEND, "", f"**{data['note']}**", "",
           "### CPU per process over the measured window (share of one core / run-queue wait)", "",
           md_table(["posts/s", *names, "CPU 0 busy", "viewers rx MB/s"], cpu_rows), "",
           _placement_line(data.get("placement", "shared")) +
           " Wait is summed over a process's threads, so it can pass 100%."]
    if any(r.get("throttle_events") for r in data["steps"]):
        out.append("Viewers received `throttle` events: sampling is active, so delivered < 1 is by design.")
    if data["exited_early"]:
        out.append(f"Exited before the end: {', '.join(data['exited_early'])} (see their logs).")
    return "\n".join(out)
