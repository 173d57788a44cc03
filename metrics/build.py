"""
What both processes export about themselves: build information and the
standard process and Python metrics.
"""

from __future__ import annotations

import platform

from prometheus_client import (
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.registry import CollectorRegistry

from linkup import __version__

__all__ = ["new_registry"]


def new_registry(component: str) -> CollectorRegistry:
    """
    A registry holding ``linkup_build_info`` and the ``process_*`` and
    ``python_*`` metrics, for the process that ``component`` names.

    """
    # Every counter and histogram would also export a *_created series,
    # doubling the series for a start time that process_start_time_seconds
    # already gives. The switch is global: linkup's processes are its own.
    disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    Info(
        "linkup_build",
        "linkup's version and Python's, with the process's component; always 1.",
        registry=registry,
    ).info(
        {
            "component": component,
            "version": __version__,
            "python": platform.python_version(),
        }
    )
    return registry
