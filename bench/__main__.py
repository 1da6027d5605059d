"""``python -m bench <scenario> [options]`` (or ``chorus bench ...``): run a scenario, print a
Markdown table, write JSON, the table and PNG plots.

Scenarios are found, not listed: every module ``bench/<name>.py`` with ``add_arguments(parser)``,
``run(args, log_dir) -> dict`` and ``report(data) -> str`` is the scenario ``<name>``
(bench/README.md says how to add one). Options every scenario gets from the runner:
``--quick`` (the module's ``QUICK`` arguments first: a short bounded run that checks the
machinery, not a result), ``--profile`` (py-spy flame graph of the Chorus process under load),
``--timeout MIN`` (the run's bound; the module's ``TIMEOUT_MIN``, else 60).

Results go to ``bench/out/<scenario>-<timestamp>.json`` and ``.md``, plots beside them
(``-<name>.png``), flame graphs to ``bench/out/profiles/<scenario>-<timestamp>/``; the
servers' and loadgens' stderr to ``bench/out/logs/<scenario>-<timestamp>/``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import signal
import sys
import time
from types import ModuleType
from typing import Any

from bench import harness
from bench.harness import BENCH, OUT, floor_exe, loadgen_exe, machine_info, write_json
from bench.plots import plot
from bench.progress import OutOfTime, Profiler, py_spy_exe, time_bound

__all__ = ["main", "scenarios"]

NOT_SCENARIOS = frozenset({"harness", "plots", "progress"})
DEFAULT_TIMEOUT_MIN = 60.0


def scenarios() -> dict[str, ModuleType]:
    """Every module of bench/ that has the three scenario functions, by name."""
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules([str(BENCH)]):
        if info.ispkg or info.name.startswith("_") or info.name in NOT_SCENARIOS:
            continue
        module = importlib.import_module(f"bench.{info.name}")
        if all(callable(getattr(module, f, None)) for f in ("add_arguments", "run", "report")):
            found[info.name] = module
    return dict(sorted(found.items()))


def build_parser(found: dict[str, ModuleType]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True)
    for name, module in found.items():
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        quick = " ".join(getattr(module, "QUICK", ()))
        p.add_argument("--quick", action="store_true",
                       help=f"a short run that checks the machinery, not a result ({quick or 'the defaults'})")
        p.add_argument("--profile", action="store_true",
                       help="record a py-spy --native flame graph of the Chorus process of each step")
        p.add_argument("--timeout", type=float, metavar="MIN",
                       help=f"stop the run after MIN minutes (default {getattr(module, 'TIMEOUT_MIN', 60):g})")
    sub.add_parser("build", help="only compile loadgen and floor into bench/out/")
    return parser


def parse(argv: list[str], found: dict[str, ModuleType]) -> argparse.Namespace:
    """Parse; with ``--quick`` the scenario's QUICK arguments go first, so options given win."""
    parser = build_parser(found)
    args = parser.parse_args(argv)
    if getattr(args, "quick", False):
        quick = list(getattr(found[args.scenario], "QUICK", ()))
        at = argv.index(args.scenario) + 1
        args = parser.parse_args([*argv[:at], *quick, *argv[at:]])
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    found = scenarios()
    args = parse(argv, found)
    # SIGTERM and SIGINT (even if inherited as ignored) unwind through the scenarios' `with
    # Fleet` blocks, so every server and loadgen is stopped by its PID on the way out.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    print(f"loadgen: {loadgen_exe()}\nfloor:   {floor_exe()}", flush=True)
    if args.scenario == "build":
        return 0
    module = found[args.scenario]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = OUT / "logs" / f"{args.scenario}-{stamp}"
    if args.profile:
        py_spy_exe()  # fail now, not after the first step
        harness.PROFILER = Profiler(OUT / "profiles")
    minutes = args.timeout if args.timeout is not None else getattr(module, "TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN)
    started = time.monotonic()
    machine_before = machine_info()  # load average before: other work on the box skews results
    try:
        with time_bound(minutes * 60):
            data = module.run(args, log_dir)
    except KeyboardInterrupt:
        print("\ninterrupted: every process started was stopped", file=sys.stderr)
        return 130
    except OutOfTime as exc:
        print(f"\n{exc}: every process started was stopped (--timeout MIN sets the bound)", file=sys.stderr)
        return 124
    runtime = time.monotonic() - started
    data = {"scenario": args.scenario, "started": stamp, "argv": argv, "quick": args.quick, "profiled": args.profile,
            "runtime_s": round(runtime, 1), "machine": machine_before, "loadavg_after": machine_info()["loadavg"],
            **data}
    profiles = harness.PROFILER.existing() if harness.PROFILER is not None else []
    if profiles:
        data["profiles"] = [str(p.relative_to(OUT)) for p in profiles]
    path = write_json(args.scenario, data, stamp)
    table = module.report(data)
    path.with_suffix(".md").write_text(_markdown(args.scenario, data, table))
    print()
    print(table)
    print(f"\nruntime {runtime:.0f} s; JSON {path}; table {path.with_suffix('.md')}; logs {log_dir}")
    for png in plot(args.scenario, data, path.with_suffix(""), module):
        print(f"plot {png}")
    for svg in profiles:
        print(f"flame graph {svg}")
    return 0


def _markdown(scenario: str, data: dict[str, Any], table: str) -> str:
    quick = " (--quick: checks the machinery; not a result)" if data.get("quick") else ""
    if data.get("profiled"):  # py-spy --native pauses the process to sample it
        quick += " (--profile: the Chorus process was slowed by sampling)"
    machine = data.get("machine") or {}
    return (f"## bench {scenario}{quick}\n\n`python -m bench {' '.join(map(str, data.get('argv', [])))}`, "
            f"{data.get('started')}, {data.get('runtime_s')} s, machine {machine}\n\n{table}\n")


if __name__ == "__main__":
    sys.exit(main())
