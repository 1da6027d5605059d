"""``python -m bench <scenario> [options]``: run a scenario, print a Markdown table, write JSON.

Scenarios: ``fanout`` (broadcast throughput and latency, every server side by side),
``connections`` (memory per idle connection, projected to 1M), ``pipeline`` (comments
posted through Kafka and Redis to viewers: acceptance and delivery latency) and ``reactions``
(reactions/s one gateway counts into Redis). Results go to
``bench/out/<scenario>-<timestamp>.json`` (plus PNG plots if matplotlib is installed); the
servers' and loadgens' stderr to ``bench/out/logs/<scenario>-<timestamp>/``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from bench import connections, fanout, pipeline, reactions
from bench.harness import OUT, floor_exe, loadgen_exe, machine_info, write_json
from bench.plots import plot

SCENARIOS = {"fanout": fanout, "connections": connections, "pipeline": pipeline, "reactions": reactions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True)
    for name, module in SCENARIOS.items():
        module.add_arguments(sub.add_parser(name, help=(module.__doc__ or "").splitlines()[0]))
    sub.add_parser("build", help="only compile loadgen and floor into bench/out/")
    args = parser.parse_args(argv)
    # SIGTERM and SIGINT (even if inherited as ignored) unwind through the scenarios' `with
    # Fleet` blocks, so every server and loadgen is stopped by its PID on the way out.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    print(f"loadgen: {loadgen_exe()}\nfloor:   {floor_exe()}", flush=True)
    if args.scenario == "build":
        return 0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = OUT / "logs" / f"{args.scenario}-{stamp}"
    module = SCENARIOS[args.scenario]
    started = time.monotonic()
    machine_before = machine_info()  # load average before: other work on the box skews results
    try:
        data = module.run(args, log_dir)
    except KeyboardInterrupt:
        print("\ninterrupted: every process started was stopped", file=sys.stderr)
        return 130
    runtime = time.monotonic() - started
    data = {"scenario": args.scenario, "started": stamp, "argv": sys.argv[1:], "runtime_s": round(runtime, 1),
            "machine": machine_before, "loadavg_after": machine_info()["loadavg"], **data}
    path = write_json(args.scenario, data)
    print()
    print(module.report(data))
    print(f"\nruntime {runtime:.0f} s; JSON {path}; logs {log_dir}")
    for png in plot(args.scenario, data, path.with_suffix("")):
        print(f"plot {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
