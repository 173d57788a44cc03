"""
Tests of what the core shows of itself: the scheduler's measurements,
:mod:`core.readout` (census, view, throughput) and :mod:`core.observer`.

Pure: a scheduler driven with explicit times, metrics in a private registry.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing

import pytest
from prometheus_client import CollectorRegistry

from core.errors import ERROR_CODES
from core.model import Measure, TaskSpec
from core.observer import READOUT_INTERVAL, VIEW_REFRESH, LinkedBridge, Observer
from core.readout import (
    MAX_LISTED_SESSIONS,
    MAX_SHOWN_FILENAME,
    ThroughputHistory,
    census,
    view,
)
from core.scheduler import Scheduler
from core.spool import MemorySpool
from core.store import SqliteStore
from metrics.core import CoreMetrics

W1 = (b"bridge", 11)
W2 = (b"bridge", 12)
MASTER = (b"bridge", 1)
BRIDGES = [LinkedBridge("b1", clients=3, last_heard=0.2)]


def spec(filename: str, size: int = 100) -> TaskSpec:
    return TaskSpec(filename, "image/png", size, f"spool-{filename}", size * 4 // 3)


def scheduler_with_session(*sizes: int) -> tuple[Scheduler, str, list[str]]:
    """A scheduler with no grace for silent workers' timeouts, and one batch."""
    s = Scheduler("t", worker_timeout=1_000_000.0)
    session_id = s.create_session(MASTER, 0.0)
    files = [spec(f"f{i}.png", size) for i, size in enumerate(sizes)]
    task_ids = s.submit_tasks(MASTER, session_id, files, 0.0)
    s.messages_to_send()
    return s, session_id, task_ids


def measured(s: Scheduler, measure: Measure) -> list[float]:
    return [value for kind, value in s.take_measurements() if kind == measure]


# Measurements.


def test_a_completed_task_measures_its_queue_wait_upload_and_latency():
    s, _, (task_id,) = scheduler_with_session(100)
    assert [v for m, v in s.take_measurements() if m == Measure.TASK_SIZE] == [100]

    s.register_worker(W1, 2.0)
    s.take_measurements()
    s.complete_task(W1, task_id, "https://x/1", 7.0)

    measurements = s.take_measurements()
    assert (Measure.UPLOAD, 5.0) in measurements
    assert (Measure.LATENCY, 7.0) in measurements
    assert s.take_measurements() == []


def test_queue_wait_is_measured_when_a_worker_takes_the_task():
    s, _, _ = scheduler_with_session(100)
    s.take_measurements()

    s.register_worker(W1, 3.5)

    assert measured(s, Measure.QUEUE_WAIT) == [3.5]


def test_a_retried_task_waits_again_from_its_return_to_the_queue():
    s, _, (task_id,) = scheduler_with_session(100)
    s.register_worker(W1, 1.0)
    s.client_gone(W1, 2.0)
    assert task_id in s.tasks
    s.take_measurements()

    s.register_worker(W2, 6.0)

    assert measured(s, Measure.QUEUE_WAIT) == [4.0]


@pytest.fixture
def store(tmp_path) -> Iterator[SqliteStore]:
    with closing(SqliteStore(tmp_path / "queue.db")) as opened:
        yield opened


def test_durations_that_began_before_a_restart_are_not_measured(store):
    s, session_id, (task_id,) = scheduler_with_session(100)
    store.save(s.take_changes())

    snapshot = store.load()
    restarted = Scheduler("u", worker_timeout=1_000_000.0)
    restarted.restore(snapshot.sessions, snapshot.tasks, snapshot.workers, 50.0)
    restarted.resume_session(MASTER, session_id, 0, 50.0)
    restarted.register_worker(W1, 51.0)
    restarted.complete_task(W1, task_id, "https://x/1", 52.0)

    # Only the upload, which began after the restart, has a start to go by.
    assert restarted.take_measurements() == [(Measure.UPLOAD, 1.0)]


# Census and view.


def test_census_counts_workers_sessions_and_tasks_by_state():
    s, _, _ = scheduler_with_session(100, 200, 300)
    s.register_worker(W1, 1.0)
    s.register_worker(W2, 1.0)

    counted = census(s, 1.0)

    assert counted.workers == {"idle": 0, "busy": 2, "resting": 0}
    assert counted.sessions == {"open": 1, "paused": 0, "ended": 0}
    assert counted.tasks == {"pending": 1, "active": 2}


def test_view_shows_each_worker_file_and_each_session_progress():
    s, session_id, (first, _) = scheduler_with_session(100, 200)
    worker_id = s.register_worker(W1, 1.0)
    s.complete_task(W1, first, "https://x/1", 2.0)

    shown = view(s, 2.0)

    assert shown["queue"] == {"pending": 0, "active": 1}
    assert shown["totals"]["completed"] == 1
    assert shown["totals"]["submitted"] == 2
    assert shown["workers"] == [
        {
            "id": worker_id,
            "state": "busy",
            "completed": 1,
            "failed": 0,
            "totalBytes": 100,
            "file": "f1.png",
            "fileSize": 200,
        }
    ]
    assert shown["sessions"] == [
        {
            "id": session_id,
            "state": "open",
            "total": 2,
            "completed": 1,
            "failed": 0,
            "cancelled": 0,
            "pending": 0,
            "active": 1,
        }
    ]


def test_view_lists_running_sessions_first_and_counts_the_rest():
    s = Scheduler("t")
    ended = s.create_session(MASTER, 0.0)
    s.cancel_session(MASTER, ended, 0.0)
    running = [
        s.create_session((b"bridge", 100 + i), 0.0) for i in range(MAX_LISTED_SESSIONS)
    ]

    shown = view(s, 0.0)

    listed = [session["id"] for session in shown["sessions"]]
    assert listed == running[::-1]
    assert shown["sessionsOmitted"] == 1


# Throughput.


def test_throughput_counts_what_completed_in_each_interval():
    history = ThroughputHistory(interval=5.0, length=4)
    history.record(0.0, 10, 1000)  # the starting totals, counted as nothing
    history.record(1.0, 12, 1200)
    history.record(4.0, 13, 1300)
    history.record(11.0, 20, 2000)

    series = history.series(12.0)

    assert series["completed"] == [0, 3, 0, 7]
    assert series["bytes"] == [0, 300, 0, 700]


def test_throughput_forgets_old_intervals_and_never_counts_backwards():
    history = ThroughputHistory(interval=1.0, length=3)
    history.record(0.0, 0, 0)
    history.record(0.5, 5, 50)
    history.record(10.0, 2, 20)  # totals restarted with the core

    assert history.series(10.0)["completed"] == [0, 0, 0]


# Observer.


def make_observer(
    s: Scheduler, store: SqliteStore
) -> tuple[Observer, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = CoreMetrics(registry, lambda: s.counters, ERROR_CODES)
    observer = Observer(s, store, MemorySpool(), metrics, wall_clock=lambda: 1e9)
    return observer, registry


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_observer_feeds_the_histograms_and_gauges(store):
    s, _, (task_id,) = scheduler_with_session(100)
    observer, metrics = make_observer(s, store)
    s.register_worker(W1, 2.0)
    s.complete_task(W1, task_id, "https://x/1", 3.0)

    observer.after_flush()
    observer.read(3.0, BRIDGES, watched=False)

    assert value(metrics, "linkup_task_upload_seconds_count") == 1
    assert value(metrics, "linkup_task_upload_seconds_sum") == 1.0
    assert value(metrics, "linkup_task_latency_seconds_sum") == 3.0
    assert value(metrics, "linkup_task_size_bytes_sum") == 100
    assert value(metrics, "linkup_workers", state="idle") == 1
    assert value(metrics, "linkup_sessions", state="ended") == 1
    assert value(metrics, "linkup_bridges") == 1
    assert value(metrics, "linkup_tasks_ended_total", outcome="completed") == 1
    assert value(metrics, "linkup_journal_bytes") == store.size_bytes


def test_observer_sends_a_view_only_when_watched_and_changed(store):
    s, _, _ = scheduler_with_session(100)
    observer, _ = make_observer(s, store)

    assert observer.read(0.0, BRIDGES, watched=False) is None
    first = observer.read(0.5, BRIDGES, watched=True)
    assert first is not None
    assert first["type"] == "view"
    assert first["links"]["bridges"] == [{"name": "b1", "clients": 3, "lastHeard": 0.2}]
    assert observer.due == 0.5 + READOUT_INTERVAL

    # Only the time since a bridge was last heard changed: nothing to send.
    quiet = [LinkedBridge("b1", clients=3, last_heard=0.9)]
    assert observer.read(1.0, quiet, watched=True) is None

    s.register_worker(W1, 1.2)
    changed = observer.read(1.5, quiet, watched=True)
    assert changed is not None
    assert changed["queue"] == {"pending": 0, "active": 1}

    # Unchanged, but a page must be able to tell a quiet core from a lost one.
    assert observer.read(1.5 + VIEW_REFRESH, quiet, watched=True) is not None


def test_view_cuts_long_filenames_and_counts_every_state():
    s, _, _ = scheduler_with_session(100)
    s.submit_tasks(MASTER, next(iter(s.sessions)), [spec("x" * 10_000)], 0.0)
    s.register_worker(W1, 1.0)
    s.register_worker(W2, 1.0)

    shown = view(s, 1.0)

    files = sorted(worker["file"] for worker in shown["workers"])
    assert files[0] == "f0.png"
    assert files[1] == "x" * (MAX_SHOWN_FILENAME - 1) + "\u2026"
    assert shown["workerStates"] == {"idle": 0, "busy": 2, "resting": 0}
    assert shown["sessionStates"] == {"open": 1, "paused": 0, "ended": 0}
