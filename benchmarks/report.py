"""
The suite's report: the JSON document and the table printed on stdout.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from benchmarks.clients import BASE64_DECODER
from benchmarks.queued_memory import machine_info, target_line

__all__ = ["build_report", "table"]

MiB = 2**20


def build_report(
    results: dict[str, dict[str, Any]],
    quick: bool,
    started: datetime.datetime,
    seconds: float,
    load_before: tuple[float, float, float],
) -> dict[str, Any]:
    errors = [
        f"{name}: {error}"
        for name, result in results.items()
        for error in result["errors"]
    ]
    return {
        "benchmark": "throughput",
        "ok": not errors,
        "errors": errors,
        "quick": quick,
        "started_at": started.isoformat(timespec="seconds"),
        "duration_seconds": round(seconds, 1),
        "machine": machine_info(),
        # Anything else running on the machine shows here (1, 5, 15 minutes).
        "load_average": {
            "before": [round(value, 2) for value in load_before],
            "after": [round(value, 2) for value in os.getloadavg()],
        },
        "notes": {
            "ratios": "linkup's figure divided by the relay's under the same load "
            "(benchmarks/relay.py); for latency, above 1 means slower",
            "latency": "per task, from just before its SUBMIT_TASKS was written "
            "to the socket to when its TASK_COMPLETED was read by the master",
            "cpu": "user+system seconds during the measured window (go to last "
            "result); cores = seconds / window",
            "mb": "MB are 10^6 bytes of file data (decoded); Base64 on the wire "
            "is a third more",
            "workers_base64_decoder": BASE64_DECODER,
        },
        "scenarios": results,
    }


def _number(value: float | None, digits: int = 0, width: int = 8) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MiB:.0f}"


def _rss(peak: dict[str, int | None] | None) -> str:
    if not peak:
        return "-"
    if "relay" in peak:
        return f"relay {_mib(peak['relay'])}"
    bridges = "+".join(
        _mib(value) for name, value in peak.items() if name.startswith("bridge")
    )
    return f"core {_mib(peak.get('core'))}, bridge {bridges}"


def _cpu(usage: dict[str, Any] | None) -> str:
    if not usage:
        return "-"
    return f"{usage['total_seconds']:.1f}s ({usage['cores']:.2f})"


HEADER = (
    f"{'scenario':<14}{'run':<8}{'tasks/s':>9}{'MB/s':>8}{'p50 ms':>9}{'p99 ms':>9}"
    f"  {'peak RSS MiB':<24}{'server CPU':>14}{'client CPU':>14}"
)


def _run_line(name: str, label: str, run: dict[str, Any]) -> str:
    latency = run.get("latency_ms") or {}
    if not run.get("ok"):
        return f"{name:<14}{label:<8}FAILED: {'; '.join(run.get('errors', [])[:2])}"
    return (
        f"{name:<14}{label:<8}{_number(run.get('tasks_per_s'), 0, 9)}"
        f"{_number(run.get('mb_per_s'), 1)}{_number(latency.get('p50'), 1, 9)}"
        f"{_number(latency.get('p99'), 1, 9)}  {_rss(run.get('peak_rss')):<24}"
        f"{_cpu(run.get('server_cpu')):>14}{_cpu(run.get('client_cpu')):>14}"
    )


def _queued_lines(name: str, result: dict[str, Any]) -> list[str]:
    run = result["linkup"]
    if not run.get("submit") or not run.get("drain"):
        return [f"{name:<14}{'linkup':<8}FAILED: {'; '.join(result['errors'][:2])}"]
    submit, drain, idle = run["submit"], run["drain"], run["queued_idle_rss"] or {}
    return [
        f"{name:<14}{'drain':<8}{_number(run.get('tasks_per_s'), 0, 9)}"
        f"{_number(drain['payload_mb_per_s'], 1)}{'':18}  "
        f"{_rss(drain['peak_rss']):<24}",
        f"{'':<14}{'submit':<8}{'':9}{_number(submit['payload_mb_per_s'], 1)}{'':18}"
        f"  {_rss(submit['peak_rss']):<24}",
        f"{'':<14}{'queued':<8}{'':35}  {_rss(idle):<24}  (all queued, nothing moving)",
        f"{'':<14}{target_line(run['memory_target'])}",
    ]


def table(report: dict[str, Any]) -> str:
    """The figures of every scenario, linkup over the relay, then the ratio."""
    lines = [HEADER]
    for name, result in report["scenarios"].items():
        if result.get("queued_memory") is not None:
            lines += _queued_lines(name, result)
            continue
        linkup, relay, ratios = result["linkup"], result["relay"], result["ratios"]
        lines.append(_run_line(name, linkup["target"], linkup))
        if relay is not None:
            lines.append(_run_line("", "relay", relay))
        if ratios:
            lines.append(
                f"{'':<14}{'ratio':<8}{_number(ratios['tasks_per_s'], 2, 9)}"
                f"{_number(ratios['mb_per_s'], 2)}"
                f"{_number(ratios['latency_p50'], 2, 9)}"
                f"{_number(ratios['latency_p99'], 2, 9)}"
            )
    machine = report["machine"]
    load = report["load_average"]
    lines += [
        "",
        "CPU: user+system seconds in the measured window (cores busy on average); "
        "server = core+bridge(s) or relay, client = the simulated plugins.",
        f"{machine['cpu_count']} CPUs ({machine['cpu_model']}), "
        f"{machine['ram_bytes'] / 2**30:.0f} GiB RAM, Python {machine['python']}; "
        f"load average (1/5/15 min) before {'/'.join(map(str, load['before']))}, "
        f"after {'/'.join(map(str, load['after']))}; "
        + ("all results verified" if report["ok"] else "FAILED"),
    ]
    return "\n".join(line.rstrip() for line in lines)
