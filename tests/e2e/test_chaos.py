"""
Chaos: a 1,000-file batch while workers, a bridge and the core are killed.

One core with a data dir, two bridges (A and B) and seven worker processes
(chaos_worker.py: three stay on A, three on B, one moves from B to A when B
goes). A master on bridge A, which is never killed, submits 1,000 small
distinct files in four messages. Then steps driven by the number of results
received, not by time, kill -9:

- a worker, four times; a spare worker started in advance takes its place at
  once, so that the batch does not run ahead of the plan;
- bridge B, restarted on the same port; its workers reconnect;
- the core, twice, restarted on the same endpoint and data dir. The first
  time it comes back once both bridges noticed, and bridge A is held with
  SIGSTOP until B has joined, so that the joining order is always the same
  (B first). The second time it comes back at once, and the bridges join in
  whatever order they come.

Each step waits for readiness (logs, /readyz) before the next. At the end
the master sends RESUME_SESSION on its open connection, as a barrier and to
learn how many outcomes the core holds. Every file must come back exactly
once, with the URL its own content gives, progress must count each result
once and never pass the total, and the session must complete exactly once.
Uploads made twice by workers (an upload cut short by a kill is done again)
are allowed; they are counted and printed with the rest of the summary.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import json
import os
import random
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.chaos_clients import RESULTS, Master, WorkerFleet, WorkerProcess
from tests.e2e.harness import FAST_LINK, UNIT, Deployment, Process, http_get, wait_ready

REPO_ROOT = Path(__file__).resolve().parents[2]

N_FILES = 1000
FILE_SIZE = 200
BATCHES = 4
MAX_ATTEMPTS = 3
# A file gives up only if three holders in a row are killed under it.
MAX_GAVE_UP = 3

CORE_OPTIONS = (*FAST_LINK, "--worker-timeout", "3", "--resume-grace", "30")
NOTICE_WITHIN = 10 * UNIT
RUN_TIMEOUT = 90 * UNIT

A, B = "A", "B"
# Where each worker connects, in turn: three stay on A, three on B, one goes
# to A when B is killed.
WORKER_ROUTES = ((A,), (A,), (A,), (B,), (B,), (B,), (B, A))
# Spare workers, started in advance, that replace killed ones at once: one
# per worker killed in the plan, on the bridge the victim was on.
SPARES = (A, B, A, B)


@dataclass
class Step:
    #: Seconds since the master connected.
    at: float
    name: str
    detail: str
    results_before: int
    results_after: int
    seconds: float


class Chaos:
    """
    The deployment under test, and what can be done to it.

    """

    def __init__(self, deployment: Deployment, tmp_path: Path) -> None:
        self.deployment = deployment
        self.core: Process | None = None
        self.endpoint = ""
        self.bridges: dict[str, Process] = {}
        self.ports: dict[str, int] = {}
        self.fleet = WorkerFleet(deployment.start, tmp_path)
        self.cores: list[Process] = []
        self.all_bridges: list[Process] = []
        self.timeline: list[Step] = []
        self.skipped: list[str] = []
        self.kills: collections.Counter[str] = collections.Counter()
        self._restarts = 0

    def url(self, bridge: str) -> str:
        return f"ws://127.0.0.1:{self.ports[bridge]}"

    # Starting.

    async def start(self) -> None:
        self.core, self.endpoint = self.deployment.core(*CORE_OPTIONS)
        self.cores.append(self.core)
        for name in (A, B):
            process, port = await asyncio.to_thread(
                self.deployment.bridge, self.endpoint, *FAST_LINK
            )
            self.bridges[name], self.ports[name] = process, port
            self.all_bridges.append(process)
        workers = [
            self.fleet.start([self.url(b) for b in route]) for route in WORKER_ROUTES
        ]
        spares = [self.fleet.start([self.url(b)], spare=True) for b in SPARES]
        await asyncio.gather(
            *(_registered(w, 1) for w in workers),
            *(_standing_by(w) for w in spares),
        )

    # What can happen to it.

    async def kill_worker(self, on: str) -> str:
        """kill -9 a worker connected to bridge ``on``; a spare takes over."""
        victim = next(w for w in self.fleet.live if w.current_url() == self.url(on))
        self.fleet.kill9(victim)
        self.kills["worker"] += 1
        replacement = self.fleet.call_in([self.url(on)])
        await _registered(replacement, 1)
        return f"{victim.process.name} on {on} -> {replacement.process.name}"

    async def kill_bridge_b(self) -> str:
        """kill -9 bridge B; restart it on its port; its workers come back."""
        core = self._core()
        on_b = [w for w in self.fleet.live if w.current_url() == self.url(B)]
        registered = {w.process.name: w.registrations() for w in on_b}
        noticed = _count(core, "bridge lost", "bridge unreachable")

        self.bridges[B].kill9()
        self.kills["bridge"] += 1
        await _log_count(core, noticed + 1, "bridge lost", "bridge unreachable")

        self._restarts += 1
        process = self.deployment.start(
            f"bridge-{self.ports[B]}-restart-{self._restarts}",
            "-m",
            "bridge",
            "--core",
            self.endpoint,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.ports[B]),
            "--log-level",
            "DEBUG",
            *FAST_LINK,
        )
        self.bridges[B] = process
        self.all_bridges.append(process)
        await asyncio.to_thread(wait_ready, self.ports[B], process, NOTICE_WITHIN)
        await asyncio.gather(
            *(_registered(w, registered[w.process.name] + 1) for w in on_b)
        )
        return f"{len(on_b)} workers re-registered"

    async def kill_core(self, *, b_first: bool) -> str:
        """
        kill -9 the core; restart it on its endpoint and data dir.

        With ``b_first`` the core comes back once both bridges noticed, and
        bridge B joins it first: bridge A (the master's) is paused with
        SIGSTOP until B has joined, as a busy machine might delay it. B then
        hands over the reports its workers made while the core was away,
        before the master's session is claimed. Without, the core is
        restarted at once, the bridges learn of it by RESET or by its silence,
        and join in whatever order they come.

        """
        bridges = list(self.bridges.values())
        lost = [_count(b, "lost the core") for b in bridges]
        linked = [_count(b, "connected to core") for b in bridges]

        self._core().kill9()
        self.kills["core"] += 1
        if b_first:
            await asyncio.gather(
                *(
                    _log_count(b, n + 1, "lost the core")
                    for b, n in zip(bridges, lost, strict=True)
                )
            )
            self.bridges[A].signal(signal.SIGSTOP)
        try:
            self.core, _ = self.deployment.core(*CORE_OPTIONS, endpoint=self.endpoint)
            self.cores.append(self.core)
            if b_first:
                await _log_count(self.core, 1, "bridge joined")
        finally:
            if b_first:
                self.bridges[A].signal(signal.SIGCONT)
        await asyncio.gather(
            *(
                _log_count(b, n + 1, "connected to core")
                for b, n in zip(bridges, linked, strict=True)
            )
        )
        for name in (A, B):
            await asyncio.to_thread(
                wait_ready, self.ports[name], self.bridges[name], NOTICE_WITHIN
            )
        if not b_first:
            return "restarted at once"
        before_join = self.core.log().split("bridge joined", 1)[0]
        applied = re.findall(r"task completed task=(\S+)", before_join)
        return f"B joined first, with reports on {applied}"

    def _core(self) -> Process:
        assert self.core is not None
        return self.core

    # Driving it.

    async def run(
        self,
        master: Master,
        plan: list[tuple[int, str, Callable[[], Awaitable[str]]]],
    ) -> None:
        """
        Do each step of ``plan`` once ``gap`` more files have a result than
        when the previous step ended.

        """
        mark = 0
        for gap, name, action in plan:
            target = mark + gap
            await master.wait_until(
                lambda target=target: master.result_count >= target or master.finished
            )
            if master.finished:
                self.skipped.append(name)
                continue
            before, started = master.result_count, time.monotonic()
            detail = await action()
            mark = master.result_count
            self.timeline.append(
                Step(
                    started - master.opened_at,
                    name,
                    detail,
                    before,
                    mark,
                    time.monotonic() - started,
                )
            )


def _count(process: Process, *texts: str) -> int:
    log = process.log()
    return sum(log.count(text) for text in texts)


async def _log_count(
    process: Process, count: int, *texts: str, timeout: float = NOTICE_WITHIN
) -> None:
    """Wait until ``texts`` occur ``count`` times in all in the log."""
    deadline = time.monotonic() + timeout
    while _count(process, *texts) < count:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{texts!r} not {count} times in {process.name} log within {timeout}s"
            )
        await asyncio.sleep(0.02)


async def _standing_by(worker: WorkerProcess) -> None:
    deadline = time.monotonic() + NOTICE_WITHIN
    while not worker.standing_by():
        if not worker.process.alive() or time.monotonic() > deadline:
            raise AssertionError(
                f"{worker.process.name} not standing by:\n{worker.process.log()}"
            )
        await asyncio.sleep(0.02)


async def _registered(worker: WorkerProcess, count: int) -> None:
    deadline = time.monotonic() + NOTICE_WITHIN
    while worker.registrations() < count:
        if not worker.process.alive():
            raise AssertionError(f"{worker.process.name} died:\n{worker.process.log()}")
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{worker.process.name} not registered {count} times:\n"
                f"{worker.process.log()}"
            )
        await asyncio.sleep(0.02)


def _files() -> dict[str, bytes]:
    rng = random.Random(1000)
    return {
        f"file-{i:04d}.bin": f"{i:04d}".encode() + rng.randbytes(FILE_SIZE - 4)
        for i in range(N_FILES)
    }


def _entry(filename: str, data: bytes) -> dict[str, Any]:
    return {
        "filename": filename,
        "mimeType": "application/octet-stream",
        "dataBase64": base64.b64encode(data).decode("ascii"),
        "size": len(data),
    }


def _status(port: int) -> dict[str, Any]:
    status, _, body = http_get(f"http://127.0.0.1:{port}/status", timeout=3 * UNIT)
    assert status == 200, body
    return json.loads(body)  # type: ignore[no-any-return]


def _progress_gaps(master: Master) -> list[str]:
    """
    Where the master's results skip or repeat a progress count: the results
    it never got live, or got twice.

    """
    gaps = []
    seen = 0
    for outcome in master.outcomes:
        if outcome.message["type"] not in RESULTS:
            continue
        progress = outcome.message["progress"]
        ended = progress["completed"] + progress["failed"]
        if ended != seen + 1:
            gaps.append(
                f"result {ended} arrived after {seen} "
                f"(t={outcome.at - master.opened_at:.3f}s, "
                f"replayed={outcome.replayed}, task={outcome.message['taskId']})"
            )
        seen = max(seen, ended)
    return gaps


def _summary(
    chaos: Chaos, master: Master, final: dict[str, Any] | None, elapsed: float
) -> str:
    held = "?" if final is None else final["results"]
    results = [o for o in master.outcomes if o.message["type"] in RESULTS]
    failed = [o.message for o in results if o.message["type"] == "TASK_FAILED"]
    uploads = chaos.fleet.uploads()
    twice = {task: n for task, n in uploads.items() if n > 1}
    core_logs = "".join(core.log() for core in chaos.cores)
    bridge_logs = "".join(bridge.log() for bridge in chaos.all_bridges)
    lines = [
        f"chaos: {N_FILES} files of {FILE_SIZE} B, {len(WORKER_ROUTES)} workers, "
        f"{elapsed:.1f}s",
        "       at  results  ->  after  seconds  step",
    ]
    lines += [
        f"  {s.at:6.2f}s  {s.results_before:7d}  {s.results_after:6d}  "
        f"{s.seconds:7.2f}  {s.name}: {s.detail}"
        for s in chaos.timeline
    ]
    if chaos.skipped:
        lines.append(f"  skipped (batch already done): {chaos.skipped}")
    lines += [
        f"kills: workers {chaos.kills['worker']}, bridge B {chaos.kills['bridge']}, "
        f"core {chaos.kills['core']}",
        f"master: results {len(results)} for {len(master.by_task)} tasks "
        f"(replayed {sum(o.replayed for o in results)}), failed {len(failed)}, "
        f"connections {master.connections}, closes {master.closes}, "
        f"resumes {len(master.resumed) - (final is not None)}, "
        f"errors {len(master.errors)}, "
        f"session completions {len(master.session_completions)}",
        f"closing RESUME_SESSION: the core holds {held} outcomes, the master "
        f"had {len(master.outcomes)}; replayed {len(master.final_replay)}",
        f"worker uploads: {sum(uploads.values())} of {len(uploads)} tasks, "
        f"{len(twice)} uploaded more than once ({sum(twice.values()) - len(twice)} "
        "extra)",
        "core: attempts retried "
        f"{core_logs.count('attempt failed, task requeued')}, assignments sent "
        f"again {core_logs.count('assignment sent again')}, replayed reports "
        f"ignored {core_logs.count('replayed report ignored')}, late reports "
        f"refused {core_logs.count('late report refused')}, cancelled reports "
        f"discarded {core_logs.count('report of a cancelled task discarded')}",
        f"bridges: reports kept while the core was away "
        f"{bridge_logs.count('core away, report kept')}",
    ]
    lines += [f"failed: {m['taskId']} {m['filename']}: {m['error']}" for m in failed]
    lines += [f"gap: {gap}" for gap in _progress_gaps(master)]
    return "\n".join(lines)


class ResultsLost(AssertionError):
    """
    Results the core has but the master never received.

    """


def _verdict(
    chaos: Chaos,
    master: Master,
    final: dict[str, Any],
    files: dict[str, bytes],
    stats: dict[str, Any],
) -> tuple[list[str], list[str]]:
    """
    Check the run; return the results lost, and every other problem.

    """
    lost: list[str] = []
    other: list[str] = []
    results = [o for o in master.outcomes if o.message["type"] in RESULTS]

    # Every file came back exactly once, with its own content's URL.
    doubled = {
        task: [(o.replayed, o.message) for o in outcomes]
        for task, outcomes in master.by_task.items()
        if len(outcomes) > 1
    }
    if doubled:
        other.append(f"tasks with more than one result: {doubled}")
    by_file = collections.Counter(o.message["filename"] for o in results)
    missing = sorted(set(files) - set(by_file))
    if missing:
        lost.append(f"{len(missing)} files without a result: {missing}")
    if unknown := sorted(set(by_file) - set(files)):
        other.append(f"results for files never submitted: {unknown}")
    if twice := sorted(name for name, count in by_file.items() if count > 1):
        other.append(f"files with more than one result: {twice}")
    expected = {
        name: f"https://x/{hashlib.sha256(data).hexdigest()}"
        for name, data in files.items()
    }
    if wrong := [
        o.message
        for o in results
        if o.message["type"] == "TASK_COMPLETED"
        and o.message["resultUrl"] != expected.get(o.message["filename"])
    ]:
        other.append(f"results with another file's URL: {wrong}")

    # A file fails only when it ran out of attempts, and that is rare.
    failed = [o.message for o in results if o.message["type"] == "TASK_FAILED"]
    prefix = f"gave up after {MAX_ATTEMPTS} attempts"
    if bad := [m for m in failed if not m["error"].startswith(prefix)]:
        other.append(f"TASK_FAILED other than {prefix!r}: {bad}")
    if len(failed) > MAX_GAVE_UP:
        other.append(f"{len(failed)} files failed, more than {MAX_GAVE_UP}: {failed}")

    # Progress counts each result once, in order, and never passes the total.
    seen = 0
    for outcome in results:
        progress = outcome.message["progress"]
        ended = progress["completed"] + progress["failed"]
        if not ended <= progress["total"] <= N_FILES:
            other.append(f"progress beyond the total: {outcome.message}")
        if ended > seen + 1:
            lost.append(f"results {seen + 1}..{ended - 1} never arrived")
        elif ended <= seen:
            other.append(f"result {ended} again after {seen}: {outcome.message}")
        seen = max(seen, ended)

    # The session completed exactly once, last, with the right counts.
    completions = master.session_completions
    if len(completions) != 1:
        other.append(f"SESSION_COMPLETED {len(completions)} times")
    elif master.outcomes[-1] is not completions[0]:
        other.append("SESSION_COMPLETED before the last result")
    if completions and completions[0].message["stats"] != {
        "completed": N_FILES - len(failed),
        "failed": len(failed),
        "total": N_FILES,
    }:
        other.append(f"SESSION_COMPLETED says {completions[0].message['stats']}")

    # The core holds no outcome the master has not had.
    if final["results"] > len(master.outcomes):
        lost.append(
            f"the core holds {final['results']} outcomes of the session, the "
            f"master received {len(master.outcomes)}"
        )
    elif final["results"] < len(master.outcomes):
        other.append(
            f"the master received {len(master.outcomes)} outcomes, the core "
            f"holds {final['results']}"
        )
    if master.errors:
        other.append(f"the master was sent errors: {master.errors}")

    # Every completed task was uploaded by some worker.
    uploaded = set(chaos.fleet.uploads())
    if never := sorted(
        {o.message["taskId"] for o in results if o.message["type"] == "TASK_COMPLETED"}
        - uploaded
    ):
        other.append(f"completed but never uploaded: {never}")

    # The chaos really happened, and nothing is left behind in the core.
    if chaos.skipped:
        other.append(f"the batch ended before the steps {chaos.skipped}")
    if chaos.kills != {"worker": 4, "bridge": 1, "core": 2}:
        other.append(f"kills: {dict(chaos.kills)}")
    if stats["pendingTasks"] != 0 or stats["activeSessions"] != 0:
        other.append(f"work left in the core at the end: {stats}")
    return lost, other


@pytest.mark.slow
@pytest.mark.timeout(round(150 * UNIT))
async def test_no_task_is_lost_or_doubled_while_workers_a_bridge_and_the_core_die(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker processes run `python -m tests.e2e.chaos_worker`.
    monkeypatch.setenv(
        "PYTHONPATH",
        os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    )
    files = _files()
    chaos = Chaos(deployment, tmp_path)
    await chaos.start()

    master = Master(chaos.url(A))
    await master.open()
    receiver = asyncio.create_task(master.run())
    started = time.monotonic()
    final: dict[str, Any] | None = None
    try:
        names = list(files)
        for batch in range(BATCHES):
            chunk = names[batch::BATCHES]
            submitted = await master.submit([_entry(n, files[n]) for n in chunk])
            assert submitted["taskCount"] == len(chunk)

        plan: list[tuple[int, str, Callable[[], Awaitable[str]]]] = [
            (50, "kill -9 worker", lambda: chaos.kill_worker(on=A)),
            (40, "kill -9 bridge B", chaos.kill_bridge_b),
            (40, "kill -9 core", lambda: chaos.kill_core(b_first=True)),
            (40, "kill -9 worker", lambda: chaos.kill_worker(on=B)),
            (40, "kill -9 core", lambda: chaos.kill_core(b_first=False)),
            (40, "kill -9 worker", lambda: chaos.kill_worker(on=A)),
            (40, "kill -9 worker", lambda: chaos.kill_worker(on=B)),
        ]
        async with asyncio.timeout(RUN_TIMEOUT):
            await chaos.run(master, plan)
            await master.wait_until(lambda: master.finished)
            final = await master.final_check()
    finally:
        elapsed = time.monotonic() - started
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)
        await master.close()
        print()
        print(_summary(chaos, master, final, elapsed))

    assert final is not None
    stats = await asyncio.to_thread(_status, chaos.ports[A])
    lost, other = _verdict(chaos, master, final, files, stats)
    if other:
        raise AssertionError("\n".join(other + lost))
    if lost:
        raise ResultsLost("\n".join(lost))
