"""The bench runner's machinery, without running a benchmark (that is `python -m bench ... --quick`):
scenarios found by their functions, --quick arguments first, the time bound, progress lines,
the plots drawn from results shaped as the scenarios write them, py-spy's command line."""

from __future__ import annotations

import importlib
import io
import sys
import time
from pathlib import Path
from typing import Any

import pytest

# bench/ lives beside chorus/ in the checkout and is not installed: import it from there.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
runner = importlib.import_module("bench.__main__")
plots = importlib.import_module("bench.plots")
progress_mod = importlib.import_module("bench.progress")
parse, scenarios, plot = runner.parse, runner.scenarios, plots.plot
OutOfTime, Profiler, Progress, time_bound = (progress_mod.OutOfTime, progress_mod.Profiler, progress_mod.Progress,
                                             progress_mod.time_bound)


def test_scenarios_are_found_by_their_three_functions() -> None:
    found = scenarios()
    assert {"fanout", "connections", "pipeline"} <= set(found)
    assert not {"harness", "plots", "progress"} & set(found)
    for module in found.values():
        assert all(callable(getattr(module, f)) for f in ("add_arguments", "run", "report"))


def test_quick_arguments_go_first_and_given_options_win() -> None:
    found = scenarios()
    args = parse(["fanout", "--quick"], found)
    assert (args.viewers, args.rates, args.duration, args.quick) == ([200], [10, 50], 1.0, True)
    args = parse(["fanout", "--quick", "--viewers", "300", "--profile"], found)
    assert args.viewers == [300] and args.rates == [10, 50] and args.profile
    args = parse(["connections", "--quick"], found)
    assert (args.conns, args.servers) == ([200, 1000], 1)
    assert parse(["fanout"], found).viewers is None  # the scenario's own defaults without --quick


def test_time_bound_unwinds_past_except_exception() -> None:
    caught_by_step = False
    with pytest.raises(OutOfTime), time_bound(0.2):
        try:
            time.sleep(5)
        except Exception:  # what a scenario's per-step handler catches
            caught_by_step = True
    assert not caught_by_step
    with time_bound(0):  # 0: no bound
        time.sleep(0.01)


def test_progress_lines_say_where_the_run_is() -> None:
    out = io.StringIO()
    progress = Progress(total=4, heartbeat_s=0.05, out=out)
    with progress.step("first"):
        time.sleep(0.12)
        progress.done("first measured")
    with progress.step("second"):
        progress.done("second measured")
    lines = out.getvalue().splitlines()
    assert any("first: still running" in line for line in lines)
    done = [line for line in lines if "measured" in line]
    assert done[0].startswith("[1/4 25%,") and "left]" in done[0] and done[0].endswith("s)")
    assert done[1].startswith("[2/4 50%,")


def test_profiler_records_native_frames_into_an_svg_per_step(tmp_path: Path) -> None:
    profiler = Profiler(tmp_path / "profiles")
    assert profiler.wants("chorus") and profiler.wants("gateway0") and not profiler.wants("picows")
    svg = profiler.svg_for(tmp_path / "logs" / "fanout-1" / "chorus-200-10", tmp_path / "logs", "chorus")
    assert svg == tmp_path / "profiles" / "fanout-1" / "chorus-200-10-chorus.svg"
    argv = profiler.argv(1234, svg)
    assert argv[1:3] == ["record", "--native"] and "--pid" in argv and str(svg) in argv


def _fanout_data() -> dict[str, Any]:
    servers = ["floor-single", "floor-coalesce", "picows", "websockets", "chorus"]
    steps = [{"server": s, "viewers": n, "rate": r, "offered_per_s": n * r, "deliveries_per_s": n * r * 0.9,
              "p50_ms": 1.0 + i, "p95_ms": 2.0 + i, "p99_ms": 3.0 + i}
             for i, s in enumerate(servers) for n in (200, 1000) for r in (10, 50)]
    steps.append({"server": "chorus", "viewers": 200, "rate": 10, "error": "boom"})
    return {"servers": servers, "viewers": [200, 1000], "rates": [10, 50], "steps": steps, "bursts": []}


def _connections_data() -> dict[str, Any]:
    rows = [{"server": s, "conns_per_server": n, "rss_before": [10 << 20], "rss_after": [(10 << 20) + n * k],
             "user_bytes_per_conn": k, "kernel_bytes_per_conn_server": 3000}
            for s, k in (("chorus", 400), ("picows", 4000), ("websockets", 20000), ("floor", 30))
            for n in (200, 1000)]
    return {"rows": rows}


def test_plots_draw_chorus_beside_the_baselines(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pngs = plot("fanout", _fanout_data(), tmp_path / "fanout-x")
    assert [p.name for p in pngs] == ["fanout-x-latency.png", "fanout-x-throughput.png"]
    pngs += plot("connections", _connections_data(), tmp_path / "connections-x")
    assert pngs[-1].name == "connections-x-memory.png"
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_scenario_module_can_bring_its_own_plot(tmp_path: Path) -> None:
    class Module:
        @staticmethod
        def plot(data: dict[str, Any], stem: Path) -> list[Path]:
            path = stem.with_name(stem.name + "-own.png")
            path.write_bytes(b"drawn from " + str(data["n"]).encode())
            return [path]

    pytest.importorskip("matplotlib")
    [png] = plot("reactions", {"n": 3}, tmp_path / "reactions-x", Module)
    assert png.read_bytes() == b"drawn from 3"
    assert plot("reactions", {"n": 3}, tmp_path / "reactions-y") == []  # no module plot: none
