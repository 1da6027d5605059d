"""PNG plots of a scenario's results, where a curve says more than a table (needs matplotlib).

Every curve of Chorus is drawn beside the baselines measured in the same run: the raw C floor
(``floor-single``, ``floor-coalesce``), a plain picows broadcast loop (``picows``) and the
``websockets`` library's ``broadcast`` (``websockets``).

- ``fanout``: latency percentiles (p50, p95, p99) against offered deliveries/s, one panel per
  viewer count (``-latency.png``); deliveries/s against viewers, one panel per message rate,
  with the offered load as a dotted line (``-throughput.png``).
- ``connections``: memory against connections per process: RSS growth per process, and bytes
  per connection (user space, and the kernel's share) (``-memory.png``).
- Any other scenario: its module's ``plot(data, stem) -> list[Path]`` if it has one (how the
  ``moderation``, ``reactions`` and ``pipeline`` scenarios add theirs).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["plot"]

# One colour and marker per server, the same in every plot; Chorus stands out.
STYLE: dict[str, dict[str, Any]] = {
    "chorus": {"color": "#d62728", "marker": "o", "linewidth": 2.2},
    "picows": {"color": "#1f77b4", "marker": "s"},
    "websockets": {"color": "#2ca02c", "marker": "^"},
    "floor-coalesce": {"color": "#555555", "marker": "D"},
    "floor-single": {"color": "#999999", "marker": "v"},
    "floor": {"color": "#555555", "marker": "D"},
}


def _style(kind: str) -> dict[str, Any]:
    return dict(STYLE.get(kind, {"marker": "x"}))  # a copy: callers change it


def plot(scenario: str, data: dict[str, Any], stem: Path, module: ModuleType | None = None) -> list[Path]:
    """Write the scenario's plots next to its JSON; returns their paths ([] without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        print("(no plots: pip install matplotlib)")
        return []
    matplotlib.use("Agg")  # files only, no display
    if scenario == "fanout":
        return _fanout(data, stem)
    if scenario == "connections":
        return _connections(data, stem)
    own = getattr(module, "plot", None)
    return list(own(data, stem)) if callable(own) else []


def _save(fig: Any, stem: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    path = stem.with_name(f"{stem.name}-{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fanout(data: dict[str, Any], stem: Path) -> list[Path]:
    steps = [r for r in data["steps"] if "error" not in r]
    if not steps:
        return []
    return [_fanout_latency(data, steps, stem), _fanout_throughput(data, steps, stem)]


def _fanout_latency(data: dict[str, Any], steps: list[dict[str, Any]], stem: Path) -> Path:
    """Latency percentiles against offered rate: p99 solid, p95 dash-dot, p50 dashed."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data["viewers"]), figsize=(5 * len(data["viewers"]), 4), squeeze=False)
    for ax, n in zip(axes[0], data["viewers"], strict=True):
        for kind in data["servers"]:
            rows = sorted((r for r in steps if r["server"] == kind and r["viewers"] == n), key=lambda r: r["rate"])
            if not rows:
                continue
            x = [r["offered_per_s"] for r in rows]
            style = _style(kind)
            ax.plot(x, [r["p99_ms"] for r in rows], label=f"{kind} p99", **style)
            style.pop("linewidth", None)
            ax.plot(x, [r["p95_ms"] for r in rows], linestyle="-.", alpha=0.7, **{**style, "marker": None})
            ax.plot(x, [r["p50_ms"] for r in rows], linestyle="--", alpha=0.7, **{**style, "marker": "."})
        ax.set(xscale="log", yscale="log", title=f"{n:,} viewers (p95 dash-dot, p50 dashed)",
               xlabel="offered deliveries/s", ylabel="latency publish to receive, ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, stem, "latency")


def _fanout_throughput(data: dict[str, Any], steps: list[dict[str, Any]], stem: Path) -> Path:
    """Deliveries/s against viewers, one panel per rate, with the offered load."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data["rates"]), figsize=(5 * len(data["rates"]), 4), squeeze=False)
    for ax, rate in zip(axes[0], data["rates"], strict=True):
        for kind in data["servers"]:
            rows = sorted((r for r in steps if r["server"] == kind and r["rate"] == rate), key=lambda r: r["viewers"])
            if rows:
                ax.plot([r["viewers"] for r in rows], [r["deliveries_per_s"] for r in rows], label=kind,
                        **_style(kind))
        viewers = sorted(data["viewers"])
        ax.plot(viewers, [n * rate for n in viewers], color="grey", linestyle=":", label="offered")
        ax.set(yscale="log", title=f"{rate} msgs/s", xlabel="viewers", ylabel="deliveries/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, stem, "throughput")


def _connections(data: dict[str, Any], stem: Path) -> list[Path]:
    """Memory against connections: RSS growth per process, and bytes per connection."""
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if "error" not in r]
    if not rows:
        return []
    fig, (rss_ax, per_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for kind in dict.fromkeys(r["server"] for r in rows):
        mine = sorted((r for r in rows if r["server"] == kind), key=lambda r: r["conns_per_server"])
        x = [r["conns_per_server"] for r in mine]
        grew = [(sum(r["rss_after"]) - sum(r["rss_before"])) / len(r["rss_after"]) / 2**20 for r in mine]
        style = _style(kind)
        rss_ax.plot(x, grew, label=kind, **style)
        per_ax.plot(x, [r["user_bytes_per_conn"] for r in mine], label=f"{kind} user", **style)
        style.pop("linewidth", None)
        per_ax.plot(x, [r["kernel_bytes_per_conn_server"] for r in mine], linestyle="--", alpha=0.7,
                    label=f"{kind} kernel", **style)
    rss_ax.set(title="server RSS growth per process", xlabel="idle connections per process", ylabel="MiB")
    per_ax.set(title="bytes per connection (kernel dashed: server's half)", xlabel="idle connections per process",
               ylabel="bytes", yscale="symlog")
    for ax in (rss_ax, per_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return [_save(fig, stem, "memory")]
