"""
The benchmarks still run: ``python -m benchmarks.queued_memory --quick``.

Only that it completes, every result checks out, and the JSON report has its
shape; nothing about speed or memory, which depend on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import UNIT

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(int(300 * UNIT) + 30)
def test_queued_memory_quick_runs_and_reports(tmp_path: Path) -> None:
    """`--quick` exits 0 and writes a JSON report with the expected keys."""
    output = tmp_path / "queued_memory.json"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.queued_memory",
            "--quick",
            "--output",
            str(output),
        ],
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

    report = json.loads(output.read_text())
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

    series = report["rss_series"]
    assert series["columns"][:4] == ["t_seconds", "core_rss", "bridge_rss", "sum_rss"]
    assert series["points"]
    assert all(len(point) == len(series["columns"]) for point in series["points"])
