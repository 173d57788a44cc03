"""
Running the scenarios: start a target, start the simulated plugins in their
own processes, wait for them step by step (workers registered, masters ready,
go, results), measure, stop everything.

Every wait is on an event from a client process, with a deadline; a client
process that dies or a target that exits ends the wait at once.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from multiprocessing.process import BaseProcess
from typing import Any

import psutil

from benchmarks import queued_memory
from benchmarks.clients import (
    MasterLoad,
    WorkerGroupLoad,
    master_process,
    worker_group_process,
)
from benchmarks.scenarios import QUEUED, SCENARIOS, Load, Scenario
from benchmarks.servers import ProcessMeter, Target, start_target

__all__ = ["Progress", "run_load", "run_suite"]

Progress = Callable[[str], None]

FULL_TIMEOUT = 600.0
QUICK_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0
POLL_INTERVAL = 0.5
SEED = 1
# A ready event that can no longer come: its process reported it was done.
_ENDS_BEFORE = {"workers_ready": "workers_done", "master_ready": "master_done"}


def stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class EventLog:
    """The events of the client processes, by kind and process number."""

    def __init__(
        self, events: Any, processes: Sequence[BaseProcess], target: Target
    ) -> None:
        self.events = events
        self.processes = processes
        self.target = target
        self.received: dict[str, dict[int, tuple[float, dict[str, Any]]]] = defaultdict(
            dict
        )

    def wait(self, kind: str, count: int, deadline: float) -> None:
        """Until ``count`` events of ``kind`` have come; errors if they cannot."""
        while len(self.received[kind]) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = count - len(self.received[kind])
                raise TimeoutError(f"{missing} {kind} missing at the deadline")
            try:
                got, number, when, payload = self.events.get(
                    timeout=min(POLL_INTERVAL, remaining)
                )
            except queue.Empty:
                self._check_alive()
                continue
            self.received[got][number] = (when, payload)
            if _ENDS_BEFORE.get(kind) == got:
                raise RuntimeError(
                    f"{got} {number} before {kind}: {payload.get('errors')}"
                )

    def payloads(self, kind: str) -> list[dict[str, Any]]:
        return [payload for _, payload in self.received[kind].values()]

    def _check_alive(self) -> None:
        dead = [p.name for p in self.processes if p.exitcode not in (None, 0)]
        if dead:
            raise RuntimeError(f"load generator died: {', '.join(dead)}")
        if not self.target.alive():
            raise RuntimeError(f"{self.target.kind} exited during the run")


def plan_masters(load: Load, urls: Sequence[str], timeout: float) -> list[MasterLoad]:
    return [
        MasterLoad(
            number=number,
            url=urls[number % len(urls)],
            files=load.files_per_master,
            file_size=load.file_size,
            batch=load.batch,
            window=load.window,
            streamed=load.streamed,
            seed=SEED,
            timeout=timeout,
        )
        for number in range(load.masters)
    ]


def plan_worker_groups(
    load: Load, urls: Sequence[str], timeout: float
) -> list[WorkerGroupLoad]:
    """Workers spread over the URLs in turn, then over the processes in turn."""
    worker_urls = [urls[number % len(urls)] for number in range(load.workers)]
    groups = min(load.worker_processes, load.workers)
    return [
        WorkerGroupLoad(number, tuple(worker_urls[number::groups]), timeout)
        for number in range(groups)
    ]


def run_load(target: Target, load: Load, timeout: float) -> dict[str, Any]:
    """Drive ``load`` against ``target``; every figure of one run."""
    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    go = context.Event()
    stop_reader, stop_writer = context.Pipe(duplex=False)
    processes: list[BaseProcess] = []
    log = EventLog(events, processes, target)
    groups = plan_worker_groups(load, target.urls, timeout)
    masters = plan_masters(load, target.urls, timeout)
    errors: list[str] = []
    measured: dict[str, Any] = {}
    deadline = time.monotonic() + timeout + STOP_TIMEOUT

    def spawn(name: str, function: Callable[..., None], *args: Any) -> None:
        process = context.Process(target=function, args=args, name=name, daemon=True)
        process.start()
        processes.append(process)

    try:
        setup_started = time.monotonic()
        for group in groups:
            spawn(
                f"workers-{group.number}",
                worker_group_process,
                group,
                events,
                stop_reader,
            )
        log.wait("workers_ready", len(groups), deadline)
        workers_ready = time.monotonic()
        for master in masters:
            spawn(f"master-{master.number}", master_process, master, events, go)
        log.wait("master_ready", len(masters), deadline)

        server_meter = ProcessMeter(target.processes)
        client_meter = ProcessMeter({p.name: psutil.Process(p.pid) for p in processes})
        server_meter.start()
        client_meter.start(track_memory=False)
        started = time.monotonic()
        go.set()
        log.wait("master_done", len(masters), deadline)
        ended = time.monotonic()
        # Masters exit once done: their CPU time is what they reported.
        masters_cpu = {
            f"master-{number}": payload["cpu_seconds"]
            for number, (_, payload) in log.received["master_done"].items()
        }
        measured = {
            "server": server_meter.stop(),
            "clients": client_meter.stop(ended=masters_cpu),
            "peak_rss_since": "go" if server_meter.peak_since_start else "start",
            "window_seconds": ended - started,
            "setup_seconds": started - setup_started,
            "workers_connect_seconds": workers_ready - setup_started,
        }
    except (TimeoutError, RuntimeError, psutil.Error) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        # EOF on the pipe: every worker closes its connection and reports.
        stop_writer.close()
        with contextlib.suppress(TimeoutError, RuntimeError):
            log.wait("workers_done", len(groups), time.monotonic() + STOP_TIMEOUT)
        for process in processes:
            process.join(STOP_TIMEOUT if process.name.startswith("workers") else 1)
            if process.is_alive():
                process.kill()
                process.join()
        stop_reader.close()
        events.close()
    return _summarize(target, load, log, measured, errors)


def _summarize(
    target: Target,
    load: Load,
    log: EventLog,
    measured: dict[str, Any],
    errors: list[str],
) -> dict[str, Any]:
    master_reports = log.payloads("master_done")
    worker_reports = log.payloads("workers_done")
    for report in [*master_reports, *worker_reports]:
        errors += report.get("errors", [])
    verified = sum(report["verified"] for report in master_reports)
    if verified != load.files:
        errors.append(f"{verified} of {load.files} results verified")
    firsts = [r["first_send"] for r in master_reports if r["first_send"] is not None]
    lasts = [r["last_result"] for r in master_reports if r["last_result"] is not None]
    seconds = max(lasts) - min(firsts) if firsts and lasts else None
    latencies = [value for r in master_reports for value in r["latencies"]]
    window = measured.get("window_seconds")
    return {
        "target": target.kind,
        "ok": not errors,
        "errors": errors,
        "files": load.files,
        "results_verified": verified,
        "payload_bytes": load.payload_bytes,
        "seconds": _round(seconds),
        # Not rounded to fewer digits than MB/s: ratios are taken of these.
        "tasks_per_s": _round(load.files / seconds if seconds else None),
        "mb_per_s": _round(load.payload_bytes / 1e6 / seconds if seconds else None),
        "latency_ms": latency_summary(latencies),
        "peak_rss": measured.get("server", {}).get("peak_rss"),
        "peak_rss_since": measured.get("peak_rss_since"),
        "server_cpu": _cpu_summary(measured.get("server"), window),
        "client_cpu": _cpu_summary(measured.get("clients"), window),
        "window_seconds": _round(window),
        "setup_seconds": _round(measured.get("setup_seconds")),
        "workers_connect_seconds": _round(measured.get("workers_connect_seconds")),
        "tasks_per_worker_process": [r["tasks"] for r in worker_reports],
    }


def latency_summary(latencies: Sequence[float]) -> dict[str, float] | None:
    """p50, p99, mean and max in milliseconds (inclusive quantiles)."""
    if not latencies:
        return None
    if len(latencies) == 1:
        p50 = p99 = latencies[0]
    else:
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        p50, p99 = cuts[49], cuts[98]
    return {
        "p50": round(p50 * 1e3, 2),
        "p99": round(p99 * 1e3, 2),
        "mean": round(statistics.fmean(latencies) * 1e3, 2),
        "max": round(max(latencies) * 1e3, 2),
        "count": len(latencies),
    }


def _cpu_summary(
    usage: dict[str, Any] | None, window: float | None
) -> dict[str, Any] | None:
    if not usage or not window:
        return None
    seconds = usage["cpu_seconds"]
    total = sum(value for value in seconds.values() if value is not None)
    return {
        "seconds": seconds,
        "total_seconds": round(total, 3),
        # CPU seconds per second of wall time: 1.0 is one CPU kept busy.
        "cores": round(total / window, 3),
    }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# The suite.


def run_target(
    kind: str, load: Load, timeout: float, progress: Progress, label: str
) -> dict[str, Any]:
    progress(f"[{label}] {kind}: starting")
    try:
        with start_target(kind, load.max_message_size, load.linkup_args) as target:
            result = run_load(target, load, timeout)
            if not result["ok"]:
                progress(target.log_tail())
    except (RuntimeError, OSError, psutil.Error) as exc:
        result = {"target": kind, "ok": False, "errors": [f"{kind} failed: {exc}"]}
    if result["ok"]:
        progress(
            f"[{label}] {kind}: {result['files']} tasks in {result['seconds']:.2f}s, "
            f"{result['tasks_per_s']:.0f} tasks/s, {result['mb_per_s']:.1f} MB/s"
        )
    else:
        progress(f"[{label}] {kind}: FAILED: {'; '.join(result['errors'][:5])}")
    return result


def ratios(
    linkup: dict[str, Any], relay: dict[str, Any] | None
) -> dict[str, Any] | None:
    """linkup's figures divided by the relay's (for latency, above 1 is slower)."""
    if relay is None:
        return None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    linkup_latency = linkup.get("latency_ms") or {}
    relay_latency = relay.get("latency_ms") or {}
    return {
        "tasks_per_s": ratio(linkup.get("tasks_per_s"), relay.get("tasks_per_s")),
        "mb_per_s": ratio(linkup.get("mb_per_s"), relay.get("mb_per_s")),
        "latency_p50": ratio(linkup_latency.get("p50"), relay_latency.get("p50")),
        "latency_p99": ratio(linkup_latency.get("p99"), relay_latency.get("p99")),
    }


def run_throughput(
    scenario: Scenario,
    quick: bool,
    progress: Progress,
    relay_runs: dict[Load, tuple[str, dict[str, Any]]],
) -> dict[str, Any]:
    load = scenario.load(quick)
    assert load is not None
    timeout = QUICK_TIMEOUT if quick else FULL_TIMEOUT
    linkup_kind, *references = scenario.targets
    linkup = run_target(linkup_kind, load, timeout, progress, scenario.name)
    relay = None
    relay_measured_in = None
    if references:
        # The relay under the same load has been measured already (split has
        # dispatch's load): one run serves both.
        if load in relay_runs:
            progress(f"[{scenario.name}] relay: same load as {relay_runs[load][0]}")
        else:
            run = run_target("relay", load, timeout, progress, scenario.name)
            relay_runs[load] = (scenario.name, run)
        relay_measured_in, relay = relay_runs[load]
    errors = [f"{linkup_kind}: {error}" for error in linkup["errors"]]
    if relay is not None:
        errors += [f"relay: {error}" for error in relay["errors"]]
    return {
        "description": scenario.description,
        "parameters": asdict(load)
        | {"files": load.files, "payload_bytes": load.payload_bytes},
        "ok": not errors,
        "errors": errors,
        "linkup": linkup,
        "relay": relay,
        "relay_measured_in": relay_measured_in,
        "ratios": ratios(linkup, relay),
    }


def run_queued(quick: bool, progress: Progress) -> dict[str, Any]:
    """queued_memory's whole run, summarized like the others, kept whole."""
    scenario = next(s for s in SCENARIOS if s.name == QUEUED)
    if quick:
        sizes = (
            queued_memory.QUICK_TOTAL,
            queued_memory.QUICK_FILE_SIZE,
            queued_memory.QUICK_MESSAGE_SIZE,
        )
    else:
        sizes = (
            queued_memory.DEFAULT_TOTAL,
            queued_memory.DEFAULT_FILE_SIZE,
            queued_memory.DEFAULT_MESSAGE_SIZE,
        )
    params = queued_memory.Params(
        total=sizes[0],
        file_size=sizes[1],
        message_size=sizes[2],
        workers=queued_memory.DEFAULT_WORKERS,
        timeout=QUICK_TIMEOUT if quick else FULL_TIMEOUT * 3,
        settle=queued_memory.SETTLE_SECONDS,
        seed=SEED,
        quick=quick,
    )
    progress(f"[{QUEUED}] linkup: starting (benchmarks/queued_memory.py)")
    report = queued_memory.run_benchmark(params)
    results = report["results"]
    submit, drain = results.get("phase1"), results.get("phase2")
    phases = [phase for phase in (submit, drain) if phase]
    peak = {
        role: max((phase["peak_rss"][role] for phase in phases), default=None)
        for role in ("core", "bridge")
    }
    errors = list(report["errors"])
    if results["results_verified"] != results["files"]:
        errors.append(
            f"{results['results_verified']} of {results['files']} results verified"
        )
    summary = {
        "target": "linkup",
        "ok": not errors,
        "errors": errors,
        "files": results["files"],
        "results_verified": results["results_verified"],
        "payload_bytes": results["payload_bytes"],
        "submit": submit,
        "drain": drain,
        "queued_idle_rss": results["queued_idle_rss"],
        "peak_rss": peak,
        "memory_target": results["memory_target"],
        "load_generator_cpu_seconds": results["load_generator"]["cpu_seconds"],
    }
    if drain:
        summary["seconds"] = drain["seconds"]
        summary["tasks_per_s"] = round(results["files"] / drain["seconds"], 1)
        summary["mb_per_s"] = drain["payload_mb_per_s"]
    progress(f"[{QUEUED}] linkup: {'ok' if not errors else 'FAILED: ' + str(errors)}")
    return {
        "description": scenario.description,
        "parameters": report["parameters"],
        "ok": not errors,
        "errors": errors,
        "linkup": summary,
        "relay": None,
        "relay_measured_in": None,
        "ratios": None,
        "queued_memory": report,
    }


def run_suite(
    names: Sequence[str], quick: bool, progress: Progress = stderr_progress
) -> dict[str, dict[str, Any]]:
    """Every scenario in ``names``, in the suite's order; results by name."""
    relay_runs: dict[Load, tuple[str, dict[str, Any]]] = {}
    results: dict[str, dict[str, Any]] = {}
    for scenario in SCENARIOS:
        if scenario.name not in names:
            continue
        if scenario.name == QUEUED:
            results[scenario.name] = run_queued(quick, progress)
        else:
            results[scenario.name] = run_throughput(
                scenario, quick, progress, relay_runs
            )
    return results
