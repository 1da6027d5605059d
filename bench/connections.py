"""Scenario ``connections``: memory per idle connection, projected to 1M per host.

For each server kind, G server processes (each on its own port, all on CPU 0) take N idle
viewers each from loadgen processes spread over source addresses 127.0.0.2 onwards. Readings
before connecting and once every client is connected and ``--settle`` s have passed:
- user space: each server's VmRSS; (after − before) / N per connection;
- kernel: /proc/net/sockstat TCP ``mem`` pages and slab memory (/proc/slabinfo when readable,
  else /proc/meminfo Slab), divided by all G×N connections. On loopback both ends of every
  connection live in this kernel, so that figure is per connection *pair*; half of it is the
  projection for the server side alone.
The floor (raw C) is a near-zero reference: a preallocated slot per fd and nothing else.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench.harness import Fleet, kernel_memory, md_table, one_line, rss_bytes, run_loadgens, slab_growth, start_server
from bench.progress import Progress

__all__ = ["QUICK", "TIMEOUT_MIN", "add_arguments", "report", "run"]

TARGETS = ("chorus", "picows", "websockets", "floor")
MILLION = 1_000_000
QUICK = ("--conns", "200,1000", "--servers", "1", "--settle", "0.5")  # ~1 min: checks the machinery
TIMEOUT_MIN = 30


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conns", type=_ints, default=[1000, 5000, 15000],
                   help="idle connections per server process (at most ~19,900: the fd limit)")
    p.add_argument("--servers", type=int, default=2, help="server processes per kind (G)")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"subset of {','.join(TARGETS)}")
    p.add_argument("--settle", type=float, default=1.5, help="seconds after connecting before reading")


def step(kind: str, n: int, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    with Fleet(log_dir / f"{kind}-{n}") as fleet:
        # Rate 0 and never started: the servers only hold connections.
        servers = [start_server(fleet, kind, 0, name=f"{kind}{i}") for i in range(args.servers)]
        time.sleep(0.5)  # let start-up allocations finish before the baseline reading
        rss_before = [rss_bytes(proc.pid) for proc, _, _ in servers]
        kernel_before = kernel_memory()
        reading: dict[str, Any] = {}

        def measure() -> None:
            time.sleep(args.settle)
            reading["rss_after"] = [rss_bytes(proc.pid) for proc, _, _ in servers]
            reading["kernel_after"] = kernel_memory()

        res = run_loadgens(fleet, [(port, path, n) for _, port, path in servers], mode="hold",
                           seconds=600, on_connected=measure)
    total = n * args.servers
    k0, k1 = kernel_before, reading["kernel_after"]
    user = [(a - b) / n for a, b in zip(reading["rss_after"], rss_before, strict=True)]
    user_per_conn = sum(user) / len(user)
    slab_pair = (k1["slab_bytes"] - k0["slab_bytes"]) / total
    tcp_mem_pair = (k1["tcp_mem_bytes"] - k0["tcp_mem_bytes"]) / total
    kernel_server = (slab_pair + tcp_mem_pair) / 2
    return {
        "server": kind, "conns_per_server": n, "servers": args.servers, "connected": res["connected"],
        "open": res["open"], "failed": res["failed"], "connect_ms": res["connect_ms"],
        "rss_before": rss_before, "rss_after": reading["rss_after"], "user_bytes_per_conn": user_per_conn,
        "user_bytes_per_conn_each": user, "slab_bytes_per_pair": slab_pair,
        "tcp_mem_bytes_per_pair": tcp_mem_pair, "kernel_bytes_per_conn_server": kernel_server,
        "tcp_inuse_delta": k1["tcp_inuse"] - k0["tcp_inuse"], "tcp_tw_before": k0["tcp_tw"],
        "tcp_tw_after": k1["tcp_tw"], "slab_source": k1["slab_source"],
        "slab_growth": slab_growth(k0, k1),
        "projected_1m_bytes": MILLION * (user_per_conn + kernel_server),
    }


def run(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets: {', '.join(sorted(unknown))}")
    if max(args.conns) > 19_900:
        raise SystemExit("--conns: one server process can hold at most ~19,900 (fd limit 20,000)")
    rows: list[dict[str, Any]] = []
    progress = Progress(len(targets) * len(args.conns))
    for kind in targets:
        for n in args.conns:
            with progress.step(f"{kind} {args.servers} x {n}"):
                try:
                    row = step(kind, n, args, log_dir)
                except Exception as exc:
                    progress.done(f"{kind} conns={n} failed: {one_line(str(exc))}")
                    rows.append({"server": kind, "conns_per_server": n, "servers": args.servers, "error": str(exc)})
                    continue
                rows.append(row)
                progress.done(f"{kind:<11} {args.servers} x {n:<6} open {row['open']:>6}  "
                              f"user {row['user_bytes_per_conn']:>8,.0f} B/conn  kernel (pair) "
                              f"{row['slab_bytes_per_pair'] + row['tcp_mem_bytes_per_pair']:>7,.0f} B")
    return {"conns": args.conns, "servers_per_kind": args.servers, "rows": rows}


def report(data: dict[str, Any]) -> str:
    rows = []
    for r in data["rows"]:
        if "error" in r:
            rows.append([r["server"], f"{r['servers']} x {r['conns_per_server']:,}", "failed", "", "", "", "", "",
                         one_line(r["error"])])
            continue
        rss_mib = sum(r["rss_before"]) / len(r["rss_before"]) / 2**20
        rows.append([r["server"], f"{r['servers']} x {r['conns_per_server']:,}", f"{r['open']:,}",
                     round(rss_mib, 1), round(r["user_bytes_per_conn"]), round(r["slab_bytes_per_pair"]),
                     round(r["tcp_mem_bytes_per_pair"]), round(r["kernel_bytes_per_conn_server"]),
                     f"{r['projected_1m_bytes'] / 2**30:.1f}"])
    out = ["### Idle connections: memory per connection", "",
           md_table(["server", "procs x conns", "open", "RSS before (MiB/proc)", "user B/conn", "slab B/pair",
                     "TCP mem B/pair", "kernel B/conn (server, = pair/2)", "1M conns (GiB)"], rows), "",
           "Projection per host: 1,000,000 × (user B/conn + kernel B/conn pair ÷ 2), taken from the largest N:"]
    best: dict[str, dict[str, Any]] = {}
    for r in data["rows"]:
        if "error" not in r and r["conns_per_server"] >= best.get(r["server"], {}).get("conns_per_server", 0):
            best[r["server"]] = r
    for kind, r in best.items():
        out.append(f"- {kind}: 1M × ({r['user_bytes_per_conn']:,.0f} + {r['kernel_bytes_per_conn_server']:,.0f}) B "
                   f"= {r['projected_1m_bytes'] / 2**30:.2f} GiB "
                   f"(user {MILLION * r['user_bytes_per_conn'] / 2**30:.2f} GiB + kernel "
                   f"{MILLION * r['kernel_bytes_per_conn_server'] / 2**30:.2f} GiB)")
    out += ["", "Slab growth per connection pair, largest N (where the kernel's share goes):"]
    for kind, r in best.items():
        pairs = r["conns_per_server"] * r["servers"]
        caches = ", ".join(f"{name} {grew / pairs:,.0f}" for name, grew in r["slab_growth"].items())
        out.append(f"- {kind}: {caches}")
    out.append("(proc_inode_cache is not socket memory: it grew here although the bench reads no /proc/PID/fd, "
               "so something else on the machine likely inspects fds. It is still in the totals above.)")
    return "\n".join(out)
