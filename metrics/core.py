"""
The core's Prometheus metrics.

The core's loop owns every figure; prometheus-client serves them from its own
thread. So the loop only hands over numbers: it sets gauges and observes
histograms through prometheus-client's thread-safe objects, and the running
totals (:class:`core.scheduler.Counters`, plain integers the loop increments)
are read at scrape time, which is safe since reading an int is atomic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from core.model import Measure
from core.readout import Census
from core.scheduler import Counters

__all__ = ["CoreMetrics"]

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# LAN uploads through a browser: from a fraction of a second to minutes.
QUEUE_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
UPLOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
LATENCY_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
SIZE_BUCKETS = (
    KIB,
    16 * KIB,
    256 * KIB,
    MIB,
    4 * MIB,
    16 * MIB,
    64 * MIB,
    256 * MIB,
    GIB,
)

OTHER = "other"


class CoreMetrics:
    """
    Create the core's metrics in ``registry``.

    Args:
        registry: Where to register.
        counters: Returns the scheduler's running totals.
        error_codes: The codes a refusal can carry: ``reason`` label values.

    """

    def __init__(
        self,
        registry: CollectorRegistry,
        counters: Callable[[], Counters],
        error_codes: Iterable[str],
    ) -> None:
        self._error_codes = frozenset(error_codes)
        registry.register(_CountersCollector(counters))

        self.workers = Gauge(
            "linkup_workers",
            "Registered workers, by state.",
            ["state"],
            registry=registry,
        )
        self.sessions = Gauge(
            "linkup_sessions", "Sessions, by state.", ["state"], registry=registry
        )
        self.tasks = Gauge(
            "linkup_tasks",
            "Tasks waiting in the queue (pending) or held by a worker (active).",
            ["state"],
            registry=registry,
        )
        self.tasks_refused = Counter(
            "linkup_tasks_refused",
            "Files in SUBMIT_TASKS that the core refused, by error code.",
            ["reason"],
            registry=registry,
        )
        self.bridges = Gauge(
            "linkup_bridges", "Bridges linked to this core.", registry=registry
        )
        self.bridges_lost = Counter(
            "linkup_bridges_lost",
            "Bridges lost without saying goodbye: silent, or disconnected.",
            registry=registry,
        )
        self.journal_bytes = Gauge(
            "linkup_journal_bytes",
            "Size of the queue's SQLite journal on disk, WAL included.",
            registry=registry,
        )
        self.spool_bytes = Gauge(
            "linkup_spool_bytes",
            "Bytes of queued files in the spool.",
            registry=registry,
        )
        self.spool_files = Gauge(
            "linkup_spool_files", "Queued files in the spool.", registry=registry
        )
        self._histograms = {
            Measure.TASK_SIZE: Histogram(
                "linkup_task_size_bytes",
                "Declared sizes of submitted files.",
                buckets=SIZE_BUCKETS,
                registry=registry,
            ),
            Measure.QUEUE_WAIT: Histogram(
                "linkup_task_queue_wait_seconds",
                "Time from entering the queue (submission or retry) to assignment.",
                buckets=QUEUE_WAIT_BUCKETS,
                registry=registry,
            ),
            Measure.UPLOAD: Histogram(
                "linkup_task_upload_seconds",
                "Time from assignment to the worker's TASK_COMPLETED.",
                buckets=UPLOAD_BUCKETS,
                registry=registry,
            ),
            Measure.LATENCY: Histogram(
                "linkup_task_latency_seconds",
                "Time from submission to a task's outcome, completed or failed.",
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
        }

        # Series for every known label value exist from the first scrape.
        for state in ("idle", "busy", "resting"):
            self.workers.labels(state)
        for state in ("open", "paused", "ended"):
            self.sessions.labels(state)
        for state in ("pending", "active"):
            self.tasks.labels(state)
        for code in (*self._error_codes, OTHER):
            self.tasks_refused.labels(code)

    def sample(self, census: Census) -> None:
        """
        Set the gauges of workers, sessions and tasks.

        """
        for state, count in census.workers.items():
            self.workers.labels(state).set(count)
        for state, count in census.sessions.items():
            self.sessions.labels(state).set(count)
        for state, count in census.tasks.items():
            self.tasks.labels(state).set(count)

    def observe(self, measurements: Iterable[tuple[Measure, float]]) -> None:
        for measure, value in measurements:
            self._histograms[measure].observe(value)

    def refused(self, code: str, files: int) -> None:
        label = code if code in self._error_codes else OTHER
        self.tasks_refused.labels(label).inc(files)


class _CountersCollector(Collector):
    # The scheduler's running totals, read when Prometheus scrapes.

    def __init__(self, counters: Callable[[], Counters]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        counters = self._counters()

        def total(name: str, documentation: str, value: int) -> CounterMetricFamily:
            return CounterMetricFamily(name, documentation, value=value)

        yield total(
            "linkup_tasks_submitted",
            "Files accepted from masters.",
            counters.tasks_submitted,
        )
        ended = CounterMetricFamily(
            "linkup_tasks_ended", "Tasks' final outcomes.", labels=["outcome"]
        )
        ended.add_metric(["completed"], counters.tasks_completed)
        ended.add_metric(["failed"], counters.tasks_failed)
        ended.add_metric(["cancelled"], counters.tasks_cancelled)
        yield ended
        yield total(
            "linkup_task_retries",
            "Attempts that ended without a result and went back to the queue.",
            counters.tasks_retried,
        )
        yield total(
            "linkup_task_attempts_expired",
            "Attempts that ran out of --task-timeout.",
            counters.attempts_expired,
        )
        yield total(
            "linkup_reports_refused",
            "Late, duplicate or foreign reports from workers, not used.",
            counters.reports_refused,
        )
        yield total(
            "linkup_payload_received_bytes",
            "Base64 payload bytes of files accepted from masters.",
            counters.payload_bytes_received,
        )
        yield total(
            "linkup_payload_sent_bytes",
            "Base64 payload bytes sent to workers, assignments sent again included.",
            counters.payload_bytes_sent,
        )
