"""
The scenarios of ``python -m benchmarks``, at full size and ``--quick`` size.

Full sizes are picked so that one run of a throughput scenario against one
target takes some 10 to 30 s on a 2-CPU machine; quick sizes so that the
whole suite takes well under a minute and still goes through every path
(streamed gigabyte-class message, 200 extra connections, two bridges, the
queued run).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["QUEUED", "SCENARIOS", "Load", "Scenario", "scenario_names"]

KiB = 2**10
MiB = 2**20
GiB = 2**30

#: The queued-memory run (benchmarks/queued_memory.py), not a Load.
QUEUED = "queued-2g"


@dataclass(frozen=True, slots=True)
class Load:
    """What the simulated plugins do; the same against every target."""

    masters: int
    workers: int
    files_per_master: int
    file_size: int
    #: Files per SUBMIT_TASKS (one session each, as the plugin).
    batch: int
    #: Most files a master keeps submitted and without result.
    window: int
    #: One SUBMIT_TASKS per master, streamed as one frame.
    streamed: bool = False
    #: --max-message-size of the target.
    max_message_size: int = GiB
    #: Processes the workers are spread over.
    worker_processes: int = 4
    #: More options for linkup's processes (launcher, or core and bridges).
    linkup_args: tuple[str, ...] = ()

    @property
    def files(self) -> int:
        return self.masters * self.files_per_master

    @property
    def payload_bytes(self) -> int:
        return self.files * self.file_size

    def __post_init__(self) -> None:
        if self.window < self.batch:
            raise ValueError("a master's window must hold one batch")
        if self.streamed and self.batch != self.files_per_master:
            raise ValueError("a streamed master sends all its files in one message")


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    full: Load | None
    quick: Load | None
    #: Targets compared side by side; the first is linkup's figure, the last
    #: the reference (relay) when there is one.
    targets: tuple[str, ...]

    def load(self, quick: bool) -> Load | None:
        return self.quick if quick else self.full


_DISPATCH = Load(
    masters=4,
    workers=16,
    files_per_master=2000,
    file_size=KiB,
    batch=50,
    window=200,
)
_DISPATCH_QUICK = Load(
    masters=4, workers=16, files_per_master=100, file_size=KiB, batch=25, window=100
)
# When the last byte of a 1.4 GB frame arrives, websockets copies and unmasks
# the whole frame in one go, holding the bridge's event loop for seconds; the
# default --link-timeout (10 s) leaves room for it. docs/performance.md has
# the figures.
_ONE_GIGABYTE = Load(
    masters=1,
    workers=4,
    files_per_master=128,
    file_size=8 * MiB,
    batch=128,
    window=128,
    streamed=True,
    max_message_size=2 * GiB,
    worker_processes=2,
)

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "dispatch",
        "1 KiB files, 4 masters, 16 workers, 8,000 tasks: dispatch rate",
        _DISPATCH,
        _DISPATCH_QUICK,
        ("linkup", "relay"),
    ),
    Scenario(
        "files-1m",
        "1 MiB files, 2 masters, 8 workers: payload throughput",
        Load(2, 8, 1000, MiB, batch=16, window=64),
        Load(2, 8, 16, MiB, batch=8, window=16),
        ("linkup", "relay"),
    ),
    Scenario(
        "files-8m",
        "8 MiB files, 1 master, 4 workers: payload throughput",
        Load(1, 4, 200, 8 * MiB, batch=2, window=12, worker_processes=2),
        Load(1, 4, 8, 8 * MiB, batch=2, window=6, worker_processes=2),
        ("linkup", "relay"),
    ),
    Scenario(
        "one-gigabyte",
        "one SUBMIT_TASKS of 1 GiB of files (128 of 8 MiB, 1.4 GB of JSON), "
        "4 workers; --max-message-size 2GiB",
        _ONE_GIGABYTE,
        replace(_ONE_GIGABYTE, files_per_master=4, batch=4, window=4),
        ("linkup", "relay"),
    ),
    Scenario(
        "idle-200",
        "dispatch with 200 more workers connected (216): every worker answers, "
        "so this is 216 connections sharing the batch",
        replace(_DISPATCH, workers=216),
        replace(_DISPATCH_QUICK, workers=216),
        ("linkup", "relay"),
    ),
    Scenario(
        "split",
        "dispatch with one core and two bridges, masters and workers spread "
        "over both; reference: the relay under the same load",
        _DISPATCH,
        _DISPATCH_QUICK,
        ("split", "relay"),
    ),
    Scenario(
        QUEUED,
        "2 GiB of 8 MiB files queued with no worker, then drained by 4 "
        "(benchmarks/queued_memory.py); memory should stay flat",
        None,
        None,
        ("linkup",),
    ),
)


def scenario_names() -> list[str]:
    return [scenario.name for scenario in SCENARIOS]
