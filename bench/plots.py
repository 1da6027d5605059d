"""Optional PNG plots of a scenario's results (only if matplotlib is installed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot"]


def plot(scenario: str, data: dict[str, Any], stem: Path) -> list[Path]:
    """Write the scenario's plots next to its JSON; returns their paths ([] without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")  # files only, no display
    if scenario == "fanout":
        return _fanout(data, stem)
    if scenario == "connections":
        return _connections(data, stem)
    return []


def _fanout(data: dict[str, Any], stem: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    steps = [r for r in data["steps"] if "error" not in r]
    paths = []
    fig, axes = plt.subplots(1, len(data["viewers"]), figsize=(5 * len(data["viewers"]), 4), squeeze=False)
    for ax, n in zip(axes[0], data["viewers"], strict=True):
        for kind in data["servers"]:
            rows = sorted((r for r in steps if r["server"] == kind and r["viewers"] == n), key=lambda r: r["rate"])
            if rows:
                x = [r["offered_per_s"] for r in rows]
                line, = ax.plot(x, [r["p99_ms"] for r in rows], marker="o", label=f"{kind} p99")
                ax.plot(x, [r["p50_ms"] for r in rows], marker=".", linestyle="--", color=line.get_color())
        ax.set(xscale="log", yscale="log", title=f"{n:,} viewers (dashed: p50)",
               xlabel="offered deliveries/s", ylabel="latency ms")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(stem.with_name(stem.name + "-latency.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(data["rates"]), figsize=(5 * len(data["rates"]), 4), squeeze=False)
    for ax, rate in zip(axes[0], data["rates"], strict=True):
        for kind in data["servers"]:
            rows = sorted((r for r in steps if r["server"] == kind and r["rate"] == rate), key=lambda r: r["viewers"])
            if rows:
                ax.plot([r["viewers"] for r in rows], [r["deliveries_per_s"] for r in rows], marker="o", label=kind)
        viewers = sorted(data["viewers"])
        ax.plot(viewers, [n * rate for n in viewers], color="grey", linestyle=":", label="offered")
        ax.set(yscale="log", title=f"{rate} msgs/s", xlabel="viewers", ylabel="deliveries/s")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(stem.with_name(stem.name + "-throughput.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def _connections(data: dict[str, Any], stem: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in dict.fromkeys(r["server"] for r in rows):
        mine = sorted((r for r in rows if r["server"] == kind), key=lambda r: r["conns_per_server"])
        x = [r["conns_per_server"] for r in mine]
        deltas = [(sum(r["rss_after"]) - sum(r["rss_before"])) / len(r["rss_after"]) / 2**20 for r in mine]
        ax.plot(x, deltas, marker="o", label=kind)
    ax.set(title="server RSS growth per process", xlabel="idle connections per process", ylabel="MiB")
    ax.legend()
    fig.tight_layout()
    path = stem.with_name(stem.name + "-memory.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
