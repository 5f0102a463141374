"""PNG plots of one `benchmarks/bench.py` result file, written beside it.

Four figures, each skipped when the result has no data for it:

- `<stem>-throughput.png`: control-plane jobs/s against injected latency, per system, with
  cpworker's speed-up over the boto3 baselines at each latency;
- `<stem>-cpu.png`: CPU ms per job, per scenario and system;
- `<stem>-latency.png`: p50/p95/p99 job time (creation to result), one panel per scenario;
- `<stem>-resources.png`: peak RSS per scenario and system, against the 150 MiB goal.

Run: `python benchmarks/plots.py PATH.json` (prints the paths of the PNGs it wrote).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.axes import Axes
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.patches import Patch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CONTROL_PLANE = tuple(f"control_plane_{ms}ms" for ms in (0, 20, 50))
SCENARIOS = (*CONTROL_PLANE, "handler_bound", "artifacts", "big_artifact", "idle", "pickup")
SYSTEMS = ("cpworker", "boto3_sequential", "boto3_threads", "aws_s3_cp")
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
PERCENTILES = (("p50", "p50_s"), ("p95", "p95_s"), ("p99", "p99_s"))
FIGSIZE = (12.0, 7.0)  # inches; at dpi=100 that is 1200x700 pixels
DPI = 100
RSS_GOAL_MIB = 150.0
BOX = {"boxstyle": "round", "facecolor": "white", "alpha": 0.8}


def metric(result: dict[str, Any], scenario: str, system: str, key: str) -> float | None:
    """One finite metric of one system in one scenario, or None when absent or null."""
    value = result.get("scenarios", {}).get(scenario, {}).get("systems", {}).get(system, {})
    value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _scenarios(result: dict[str, Any]) -> list[str]:
    present = result.get("scenarios", {})
    return [s for s in SCENARIOS if s in present] + sorted(set(present) - set(SCENARIOS))


def _systems(result: dict[str, Any]) -> list[str]:
    found = {name for s in result.get("scenarios", {}).values() for name in s.get("systems", {})}
    return [s for s in SYSTEMS if s in found] + sorted(found - set(SYSTEMS))


def _colour(result: dict[str, Any], system: str) -> str:
    """The same colour for a system in every figure: known systems first, others sorted."""
    order = [*SYSTEMS, *sorted(set(_systems(result)) - set(SYSTEMS))]
    return COLOURS[order.index(system) % len(COLOURS)]


def _positive(result: dict[str, Any], scenario: str, system: str, key: str) -> float | None:
    """A metric that can be drawn (on a log scale too): above 0, else None."""
    value = metric(result, scenario, system, key)
    return value if value is not None and value > 0 else None


def _with_data(result: dict[str, Any], keys: list[str]) -> tuple[list[str], list[str]]:
    """The scenarios and the systems that have a positive value for at least one of `keys`."""

    def has(scenarios: list[str], systems: list[str]) -> bool:
        return any(_positive(result, s, n, k) for s in scenarios for n in systems for k in keys)

    scenarios = [s for s in _scenarios(result) if has([s], _systems(result))]
    return scenarios, [n for n in _systems(result) if has(scenarios, [n])]


def _bars(ax: Axes, slot: int, slots: int, values: list[float | None], colour: str) -> BarContainer:
    """Bars of `values` (None: no bar) at group positions 0, 1, ..., shifted to `slot`."""
    width = 0.8 / slots
    xs = [x + (slot - (slots - 1) / 2) * width for x, y in enumerate(values) if y is not None]
    return ax.bar(xs, [y for y in values if y is not None], width, color=colour)


def _title(result: dict[str, Any], what: str) -> str:
    machine = result.get("machine", {})
    cpus, model = machine.get("cpus", "?"), machine.get("cpu_model", "?")
    return f"{what}\n{cpus} CPUs, {model}, {result.get('mode', '?')} mode"


def _save(fig: Figure, path: Path) -> Path:
    try:
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path


def _ratios(result: dict[str, Any], scenario: str) -> str:
    """cpworker's jobs/s over each boto3 baseline's in `scenario`, one line each."""
    ours = _positive(result, scenario, "cpworker", "jobs_per_s")
    return "\n".join(
        f"{ours / theirs:.1f}x {name}"
        for name, base in (("sequential", "boto3_sequential"), ("threads", "boto3_threads"))
        if ours and (theirs := _positive(result, scenario, base, "jobs_per_s"))
    )


def plot_throughput(result: dict[str, Any], path: Path) -> Path | None:
    """Control-plane jobs/s against injected latency (log y), with cpworker's ratios."""
    points = {
        float(ms): s
        for s in _scenarios(result)
        if s.startswith("control_plane_")
        and isinstance(
            ms := result["scenarios"][s].get("params", {}).get("latency_ms"), int | float
        )
    }
    only = {"scenarios": {s: result["scenarios"][s] for s in points.values()}}
    if not (systems := _with_data(only, ["jobs_per_s"])[1]):
        return None
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for system in systems:
        xy = [(x, _positive(result, s, system, "jobs_per_s")) for x, s in sorted(points.items())]
        xs, ys = [x for x, y in xy if y], [y for _, y in xy if y]
        ax.plot(xs, ys, "o-", color=_colour(result, system), label=system, linewidth=2)
    for x, scenario in points.items():
        ours, text = (
            _positive(result, scenario, "cpworker", "jobs_per_s"),
            _ratios(result, scenario),
        )
        if ours and text:
            ax.annotate(
                text,
                (x, ours),
                (0, 12),
                textcoords="offset points",
                ha="center",
                va="bottom",
                bbox=BOX,
            )
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * 4)  # room for the ratio boxes above the top points
    ax.set_xticks(sorted(points))
    ax.set_xlim(min(points) - 5, max(points) + 5)
    ax.set_xlabel("injected control-plane latency (ms)")
    ax.set_ylabel("jobs/s (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best")
    ax.set_title(_title(result, "Control-plane throughput (ratios: cpworker / baseline)"))
    return _save(fig, path)


def _short(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _grouped_bars(ax: Axes, result: dict[str, Any], key: str) -> bool:
    """Bars of `key` (above 0) per scenario and system; False if there is nothing to draw."""
    scenarios, systems = _with_data(result, [key])
    for i, system in enumerate(systems):
        values = [_positive(result, s, system, key) for s in scenarios]
        bars = _bars(ax, i, len(systems), values, _colour(result, system))
        bars.set_label(system)
        ax.bar_label(bars, fmt=_short, fontsize=8)
    ax.set_xticks(range(len(scenarios)), scenarios, rotation=15)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    return bool(scenarios)


def plot_cpu(result: dict[str, Any], path: Path) -> Path | None:
    """CPU ms per job per system, grouped by scenario (log y)."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    if not _grouped_bars(ax, result, "cpu_ms_per_job"):
        plt.close(fig)
        return None
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * 5)  # room for the legend above the bars
    ax.set_ylabel("CPU ms per job (log)")
    ax.legend(loc="upper left", ncols=5)
    ax.set_title(_title(result, "CPU per job"))
    return _save(fig, path)


def plot_resources(result: dict[str, Any], path: Path) -> Path | None:
    """Peak RSS MiB per system, grouped by scenario, with the 150 MiB big_artifact goal."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    if not _grouped_bars(ax, result, "peak_rss_mib"):
        plt.close(fig)
        return None
    ax.axhline(RSS_GOAL_MIB, color="black", linestyle="--", label="big_artifact goal")
    ax.set_ylim(0, max(ax.get_ylim()[1], RSS_GOAL_MIB) * 1.25)  # room for the legend
    ax.set_ylabel("peak RSS (MiB)")
    ax.legend(loc="upper left", ncols=5)
    ax.set_title(_title(result, "Peak RSS"))
    return _save(fig, path)


def plot_latency(result: dict[str, Any], path: Path) -> Path | None:
    """p50/p95/p99 job time (creation to result) per system, one panel per scenario."""
    keys = [key for _, key in PERCENTILES]
    scenarios, systems = _with_data(result, keys)
    if not scenarios:
        return None
    cols = min(4, len(scenarios))
    fig, axes = plt.subplots(math.ceil(len(scenarios) / cols), cols, figsize=FIGSIZE, squeeze=False)
    for ax, scenario in zip(axes.flat, scenarios, strict=False):
        for i, system in enumerate(systems):
            values = [_positive(result, scenario, system, k) for k in keys]
            _bars(ax, i, len(systems), values, _colour(result, system))
        ax.set_xticks(range(len(keys)), [name for name, _ in PERCENTILES])
        ax.set_title(scenario, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    for ax in axes.flat[len(scenarios) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("seconds")
    handles = [Patch(color=_colour(result, s), label=s) for s in systems]
    fig.legend(handles=handles, loc="lower center", ncols=len(systems))
    fig.suptitle(_title(result, "Job time, creation to result (p50 / p95 / p99)"))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, path)


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    """Write the PNGs of `result` beside its JSON file `out` as `<out.stem>-<what>.png`.

    Returns the paths written; a figure without data in `result` is skipped.
    """
    figures = (
        ("throughput", plot_throughput),
        ("cpu", plot_cpu),
        ("latency", plot_latency),
        ("resources", plot_resources),
    )
    written = [plot(result, out.with_name(f"{out.stem}-{what}.png")) for what, plot in figures]
    return [path for path in written if path is not None]


def main(argv: list[str] | None = None) -> int:
    """Command line: plot one result file, print the paths of the PNGs written."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("result", type=Path, help="a result JSON file of benchmarks/bench.py")
    args = parser.parse_args(argv)
    paths = write_plots(json.loads(args.result.read_text()), args.result)
    for path in paths:
        print(path)
    if not paths:
        print(f"{args.result}: no data to plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
