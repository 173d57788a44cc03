"""
The suite's chart (PNG): linkup's throughput as a ratio to the relay's per
scenario, and core and bridge memory over time during the 2 GiB queued run,
under the memory target's bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from benchmarks.scenarios import QUEUED

__all__ = ["draw_chart"]

MiB = 2**20
TARGET_RATIO = 0.6
PHASE_LABELS = {
    "phase1_start": "submit",
    "phase1_end": "all queued",
    "workers_started": "workers join",
    "phase2_end": "drained",
}


def draw_chart(report: dict[str, Any], path: Path) -> None:
    # The object API on the Agg canvas: no display, no global pyplot state.
    figure = Figure(figsize=(13, 5))
    FigureCanvasAgg(figure)
    ratios_axes, memory_axes = figure.subplots(
        1, 2, gridspec_kw={"width_ratios": [3, 2]}
    )
    _ratios(ratios_axes, report["scenarios"])
    _memory(memory_axes, report["scenarios"].get(QUEUED))
    machine = report["machine"]
    figure.suptitle(
        f"linkup upload throughput ({report['started_at'][:10]}, "
        f"{machine['cpu_count']} CPUs, {machine['cpu_model']})"
        + (", --quick" if report["quick"] else ""),
        fontsize=10,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")


def _ratios(axes: Axes, scenarios: dict[str, dict[str, Any]]) -> None:
    names = [name for name, result in scenarios.items() if result.get("ratios")]
    axes.set_title("throughput relative to the reference relay", fontsize=10)
    if not names:
        axes.text(
            0.5,
            0.5,
            "no scenario run against the relay",
            ha="center",
            transform=axes.transAxes,
        )
        axes.set_xticks([])
        axes.set_yticks([])
        return
    tasks = [scenarios[name]["ratios"]["tasks_per_s"] or 0.0 for name in names]
    payload = [scenarios[name]["ratios"]["mb_per_s"] or 0.0 for name in names]
    positions = range(len(names))
    width = 0.38
    tasks_bars = axes.bar(
        [p - width / 2 for p in positions], tasks, width, label="tasks/s ratio"
    )
    payload_bars = axes.bar(
        [p + width / 2 for p in positions], payload, width, label="MB/s ratio"
    )
    axes.bar_label(tasks_bars, fmt="%.2f", fontsize=8)
    axes.bar_label(payload_bars, fmt="%.2f", fontsize=8)
    axes.axhline(1.0, color="black", linewidth=1, label="relay (1.0)")
    axes.axhline(
        TARGET_RATIO,
        color="tab:red",
        linestyle="--",
        linewidth=1,
        label=f"target ({TARGET_RATIO})",
    )
    axes.set_xticks(list(positions), names)
    axes.set_ylabel("linkup / relay")
    axes.set_ylim(0, max([1.2, *tasks, *payload]) * 1.1)
    axes.legend(fontsize=8, loc="upper right")


def _memory(axes: Axes, queued: dict[str, Any] | None) -> None:
    report = (queued or {}).get("queued_memory", {})
    total = report.get("parameters", {}).get("total", 0)
    axes.set_title(f"{total / MiB:,.0f} MiB queued, then drained: RSS", fontsize=10)
    series = report.get("rss_series")
    if not series or not series["points"]:
        axes.text(0.5, 0.5, f"{QUEUED} not run", ha="center", transform=axes.transAxes)
        return
    columns = series["columns"]
    points = series["points"]
    times = [row[columns.index("t_seconds")] for row in points]
    highest = 0.0
    for column, label in (
        ("core_rss", "core"),
        ("bridge_rss", "bridge"),
        ("sum_rss", "sum"),
    ):
        index = columns.index(column)
        values = [row[index] / MiB for row in points]
        highest = max(highest, *values)
        axes.plot(times, values, label=label, linewidth=1)
    target = report.get("results", {}).get("memory_target")
    if target:
        bound = target["bound_bytes"] / MiB
        highest = max(highest, bound)
        axes.axhline(
            bound,
            color="tab:red",
            linestyle="--",
            linewidth=1,
            label="target: 256 MB + 2 x largest message",
        )
    for mark, seconds in series.get("phase_marks", {}).items():
        if mark in PHASE_LABELS:
            axes.axvline(seconds, color="grey", linestyle=":", linewidth=1)
            axes.annotate(
                PHASE_LABELS[mark],
                (seconds, 1.0),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=7,
                color="grey",
            )
    axes.set_xlabel("seconds")
    axes.set_ylabel("MiB")
    # Headroom above the peaks for the phase labels; the legend goes below.
    axes.set_ylim(0, highest * 1.3)
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=2)
