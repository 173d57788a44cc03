"""
The benchmarks still run: ``python -m benchmarks --quick`` (the throughput
suite) and ``python -m benchmarks.queued_memory --quick``.

Only that they complete, every result checks out, and the reports have their
shape; nothing about speed or memory, which depend on the machine.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from benchmarks.clients import RESULT_PREFIX, ResultBook, WorkerTally, split_task
from benchmarks.payloads import FileMaker, file_name, submit_parts
from benchmarks.queued_memory import memory_target
from tests.e2e.harness import UNIT

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = {
    "dispatch",
    "files-1m",
    "files-8m",
    "one-gigabyte",
    "idle-200",
    "split",
    "queued-2g",
}
# Every scenario but the queued run is also measured against the relay.
COMPARED = SCENARIOS - {"queued-2g"}
RUN_FIGURES = {
    "tasks_per_s",
    "mb_per_s",
    "latency_ms",
    "peak_rss",
    "server_cpu",
    "client_cpu",
}


@pytest.mark.parametrize("size", [27, 28, 29, 1024, 100_003])
def test_file_maker_pieces_are_the_file(size: int) -> None:
    """The shortcuts the masters take give what a plain encoder and hash give."""
    maker = FileMaker(size, seed=7)
    names = [file_name(0, 0), file_name(12, 3456789)]
    contents = [maker.content(name) for name in names]
    assert [len(content) for content in contents] == [size, size]
    assert contents[0] != contents[1]

    message = orjson.loads(b"".join(submit_parts("s-1", names, maker)))
    assert message["type"] == "SUBMIT_TASKS"
    assert message["sessionId"] == "s-1"
    for task, name, content in zip(message["tasks"], names, contents, strict=True):
        assert task["filename"] == name
        assert task["size"] == size
        assert base64.b64decode(task["dataBase64"], validate=True) == content
        assert maker.digest(name) == hashlib.sha256(content).hexdigest()


def test_worker_answer_is_checked_by_the_master() -> None:
    """A worker's answer to a TASK_ASSIGNED passes the master's check."""
    maker = FileMaker(1000, seed=1)
    name = file_name(1, 2)
    book = ResultBook(maker, [name])
    book.submitting("s-1", [name], when=1.0)
    data = base64.b64encode(maker.content(name)).decode()
    assigned = orjson.dumps(
        {
            "type": "TASK_ASSIGNED",
            "task": {"id": "t-1", "filename": name, "dataBase64": data, "size": 1000},
        }
    )
    message, payload = split_task(assigned)
    assert bytes(payload) == data.encode()
    # Cut out, not copied into the parsed message.
    assert message["task"]["dataBase64"] == ""
    answer = orjson.loads(WorkerTally().answer(message["task"], payload))
    assert answer["resultUrl"].startswith(RESULT_PREFIX)

    book.on_message(
        {"type": "TASK_COMPLETED", "filename": name, "resultUrl": answer["resultUrl"]},
        when=1.5,
    )
    stats = {"completed": 1, "failed": 0, "total": 1}
    book.on_message(
        {"type": "SESSION_COMPLETED", "sessionId": "s-1", "stats": stats}, when=1.5
    )
    report = book.report()
    assert book.finished
    assert report["verified"] == 1
    assert report["errors"] == []
    assert report["latencies"] == [0.5]


@pytest.mark.slow
@pytest.mark.timeout(int(300 * UNIT) + 30)
def test_throughput_suite_quick_runs_and_reports(tmp_path: Path) -> None:
    """`--quick` exits 0, verifies every result and writes the JSON and the chart."""
    output = tmp_path / "throughput.json"
    chart = tmp_path / "throughput.png"
    report = run_quick("benchmarks", output, "--chart", str(chart))
    assert report["ok"] is True
    assert report["errors"] == []
    assert report["quick"] is True
    assert {"cpu_count", "cpu_model", "ram_bytes", "python", "platform"} <= report[
        "machine"
    ].keys()
    assert set(report["scenarios"]) == SCENARIOS
    for name, scenario in report["scenarios"].items():
        assert scenario["ok"] is True, name
        assert scenario["errors"] == [], name
        linkup = scenario["linkup"]
        assert linkup["ok"] is True, name
        assert linkup["results_verified"] == linkup["files"] > 0, name
        if name not in COMPARED:
            continue
        relay = scenario["relay"]
        assert relay["ok"] is True, name
        assert relay["results_verified"] == relay["files"] == linkup["files"], name
        for run in (linkup, relay):
            assert run.keys() >= RUN_FIGURES, name
            assert {"p50", "p99"} <= run["latency_ms"].keys(), name
            assert run["client_cpu"]["total_seconds"] > 0, name
        assert {"core", "bridge"} <= linkup["peak_rss"].keys(), name
        ratios = scenario["ratios"]
        assert {"tasks_per_s", "mb_per_s", "latency_p50", "latency_p99"} <= (
            ratios.keys()
        ), name
        assert all(isinstance(value, float) for value in ratios.values()), name
    assert report["scenarios"]["split"]["linkup"]["target"] == "split"
    series = report["scenarios"]["queued-2g"]["queued_memory"]["rss_series"]
    assert series["points"]

    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(int(300 * UNIT) + 30)
def test_queued_memory_quick_runs_and_reports(tmp_path: Path) -> None:
    """`--quick` exits 0 and writes a JSON report with the expected keys."""
    output = tmp_path / "queued_memory.json"
    report = run_quick("benchmarks.queued_memory", output)
    assert report["ok"] is True
    assert report["errors"] == []
    assert {"machine", "parameters", "results", "rss_series"} <= report.keys()
    assert {"cpu_count", "cpu_model", "ram_bytes", "python", "platform"} <= report[
        "machine"
    ].keys()
    assert {"total", "file_size", "message_size", "workers"} <= report[
        "parameters"
    ].keys()

    results = report["results"]
    assert {
        "files",
        "messages",
        "largest_message_bytes",
        "results_verified",
        "spool_after_phase1",
        "phase1",
        "queued_idle_rss",
        "phase2",
        "load_generator",
    } <= results.keys()
    assert results["results_verified"] == results["files"]
    for phase in ("phase1", "phase2"):
        assert {"seconds", "payload_mb_per_s", "peak_rss", "cpu_seconds"} <= results[
            phase
        ].keys()
        assert {"core", "bridge", "sum"} <= results[phase]["peak_rss"].keys()
    assert {"bytes", "files"} <= results["spool_after_phase1"].keys()
    assert "cpu_seconds" in results["load_generator"]
    target = results["memory_target"]
    assert target["bound_bytes"] == 256 * 10**6 + 2 * results["largest_message_bytes"]
    assert target["sampled_peak_sum_bytes"] == max(
        results[phase]["peak_rss"]["sum"] for phase in ("phase1", "phase2")
    )

    series = report["rss_series"]
    assert series["columns"][:4] == ["t_seconds", "core_rss", "bridge_rss", "sum_rss"]
    assert series["points"]
    assert all(len(point) == len(series["columns"]) for point in series["points"])


def queued_results(**kernel: dict[str, int | None]) -> dict[str, Any]:
    """The part of a queued_memory report that memory_target reads."""
    return {
        "largest_message_bytes": 100 * 10**6,
        "kernel_peak_rss": kernel,
        "phase1": {"peak_rss": {"sum": 300 * 10**6}},
        "phase2": {"peak_rss": {"sum": 200 * 10**6}},
    }


def test_memory_target_holds_the_kernel_peaks_added_to_the_bound() -> None:
    # Bound: 256 MB + 2 x 100 MB = 456 MB.
    within = queued_results(
        phase1={"core": 150 * 10**6, "bridge": 306 * 10**6},
        phase2={"core": 50 * 10**6, "bridge": 100 * 10**6},
    )
    over = queued_results(phase1={"core": 150 * 10**6, "bridge": 306 * 10**6 + 1})

    assert memory_target(within) == {
        "bound_bytes": 456 * 10**6,
        "kernel_peaks_added_bytes": 456 * 10**6,
        "sampled_peak_sum_bytes": 300 * 10**6,
        "met": True,
    }
    # The samples stay within; the kernel's peaks, the stricter reading, do not.
    assert memory_target(over)["met"] is False


def test_memory_target_falls_back_to_the_samples_without_kernel_peaks() -> None:
    target = memory_target(queued_results(phase1={"core": None, "bridge": None}))

    assert target["kernel_peaks_added_bytes"] is None
    assert target["met"] is True


def run_quick(module: str, output: Path, *options: str) -> dict[str, Any]:
    """Run ``python -m MODULE --quick``, require success, return its JSON."""
    completed = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--output", str(output), *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240 * UNIT,
        check=False,
    )
    assert completed.returncode == 0, (
        f"exit status {completed.returncode}\nstdout:\n{completed.stdout}\n"
        f"stderr:\n{completed.stderr}"
    )
    report: dict[str, Any] = json.loads(output.read_text())
    return report
