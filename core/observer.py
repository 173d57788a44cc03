"""
What the core shows of itself: Prometheus metrics and the status page's view.

:class:`Observer` runs on the core's loop, called by :mod:`core.server`: after
every flush it hands the scheduler's measurements to the histograms, and every
:data:`READOUT_INTERVAL` it samples the gauges, notes throughput, and makes a
new view for watching bridges if what a page would show has changed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from core import readout
from core.readout import ThroughputHistory
from core.scheduler import Scheduler
from core.spool import Spool
from core.store import Store
from linkup import __version__
from metrics.core import CoreMetrics

__all__ = ["READOUT_INTERVAL", "LinkedBridge", "Observer"]

#: Seconds between samples of the gauges, and the most often a view is sent.
READOUT_INTERVAL = 0.5
#: A view is sent at least this often, changed or not, so that a page can
#: tell a quiet core from a lost one.
VIEW_REFRESH = 5.0


@dataclass(frozen=True, slots=True)
class LinkedBridge:
    name: str
    clients: int
    #: Seconds since the core last heard from it.
    last_heard: float


class Observer:
    """
    Feed ``metrics`` (if any) and make views of ``scheduler``.

    Args:
        wall_clock: For the view's timestamp; every other time is the
            scheduler's monotonic ``now``.

    """

    def __init__(
        self,
        scheduler: Scheduler,
        store: Store,
        spool: Spool,
        metrics: CoreMetrics | None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._scheduler = scheduler
        self._store = store
        self._spool = spool
        self._metrics = metrics
        self._wall_clock = wall_clock
        self._throughput = ThroughputHistory()
        self._version = __version__
        #: The last view sent, without what changes by itself (time, last
        #: heard), and when it was sent.
        self._last_view: dict[str, Any] | None = None
        self._last_view_at = float("-inf")
        #: When the next readout is due.
        self.due = 0.0

    def after_flush(self) -> None:
        measurements = self._scheduler.take_measurements()
        if self._metrics is not None:
            self._metrics.observe(measurements)

    def read(
        self, now: float, bridges: Sequence[LinkedBridge], watched: bool
    ) -> dict[str, Any] | None:
        """
        Sample metrics and throughput; return a view to send to watching
        bridges if one is due, else None.

        """
        self.due = now + READOUT_INTERVAL
        counters = self._scheduler.counters
        self._throughput.record(now, counters.tasks_completed, counters.bytes_completed)
        if self._metrics is not None:
            self._sample(now, len(bridges))
        if not watched:
            self._last_view = None
            return None

        view = self._view(now, bridges)
        if view == self._last_view and now - self._last_view_at < VIEW_REFRESH:
            return None
        self._last_view = view
        self._last_view_at = now
        return self._stamped(view, bridges)

    def view(self, now: float, bridges: Sequence[LinkedBridge]) -> dict[str, Any]:
        """
        The current view, for a bridge that just started watching.

        """
        return self._stamped(self._view(now, bridges), bridges)

    def _sample(self, now: float, bridges: int) -> None:
        assert self._metrics is not None
        metrics = self._metrics
        metrics.sample(readout.census(self._scheduler, now))
        metrics.bridges.set(bridges)
        metrics.journal_bytes.set(self._store.size_bytes)
        metrics.spool_bytes.set(self._spool.bytes_used)
        metrics.spool_files.set(self._spool.count)

    def _view(self, now: float, bridges: Sequence[LinkedBridge]) -> dict[str, Any]:
        view = readout.view(self._scheduler, now)
        view["throughput"] = self._throughput.series(now)
        view["links"] = {
            "bridges": [{"name": b.name, "clients": b.clients} for b in bridges]
        }
        return view

    def _stamped(
        self, view: dict[str, Any], bridges: Sequence[LinkedBridge]
    ) -> dict[str, Any]:
        links = {
            "bridges": [
                {"name": b.name, "clients": b.clients, "lastHeard": b.last_heard}
                for b in bridges
            ]
        }
        return {
            "type": "view",
            "time": self._wall_clock(),
            "version": self._version,
            **view,
            "links": links,
        }
