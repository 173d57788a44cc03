"""
Large messages through a real `linkup`: a whole batch in one SUBMIT_TASKS, as
the plugin sends it, and a message over --max-message-size.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import threading
import time
from typing import Any

import psutil
import pytest
from websockets.exceptions import ConnectionClosed

from tests.e2e.harness import (
    TIMEOUT,
    UNIT,
    Plugin,
    create_session,
    http_get,
    register_worker,
)

# 100 photos of 2.25 MiB: about 300 MB of Base64 in one message.
FILE_COUNT = 100
FILE_SIZE = 2_359_296
# The plugin gives up on every open file after 60 s without a result.
PLUGIN_RESULT_TIMEOUT = 60 * UNIT


pytestmark = pytest.mark.usefixtures("close_plugins")


class PeakRss(threading.Thread):
    """
    Sample the summed RSS of some processes until stopped; keep the peak.

    """

    def __init__(self, processes: list[psutil.Process], interval: float = 0.02):
        super().__init__(daemon=True)
        self.processes = processes
        self.interval = interval
        self.peak = 0
        self.peaks = {process.pid: 0 for process in processes}
        self.samples = 0
        self._stopped = threading.Event()

    def sample(self) -> None:
        total = 0
        for process in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                rss = process.memory_info().rss
                self.peaks[process.pid] = max(self.peaks[process.pid], rss)
                total += rss
        self.peak = max(self.peak, total)
        self.samples += 1

    def run(self) -> None:
        while not self._stopped.is_set():
            self.sample()
            self._stopped.wait(self.interval)

    def stop(self) -> None:
        self._stopped.set()
        self.join(TIMEOUT)
        self.sample()


def _linkup_children(pid: int) -> dict[str, psutil.Process]:
    children = {}
    for child in psutil.Process(pid).children(recursive=True):
        command = child.cmdline()
        for name in ("core", "bridge"):
            if name in command and command[command.index(name) - 1] == "-m":
                children[name] = child
    assert sorted(children) == ["bridge", "core"], children
    return children


async def _work(
    worker: Plugin, name: str, received: dict[str, tuple[str, int, str]]
) -> None:
    # Check each file as a plugin would use it, decoded, then report success.
    while True:
        assigned = await worker.expect("TASK_ASSIGNED", timeout=PLUGIN_RESULT_TIMEOUT)
        task = assigned["task"]
        data = base64.b64decode(task["dataBase64"], validate=True)
        assert task["filename"] not in received, f"{task['filename']} twice"
        received[task["filename"]] = (hashlib.sha256(data).hexdigest(), len(data), name)
        del assigned, task["dataBase64"], data
        await worker.send(
            "TASK_COMPLETED",
            taskId=task["id"],
            resultUrl=f"https://{name}/{task['filename']}",
        )


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_a_300_mb_batch_reaches_workers_intact_in_bounded_memory(
    deployment, record_property
):
    """A ~300 MB SUBMIT_TASKS: all files arrive intact; core+bridge RSS < 4x."""
    linkup, port = deployment.linkup()
    url = f"ws://127.0.0.1:{port}"
    children = _linkup_children(linkup.pid)
    workers = {f"w{index}": (await register_worker(url))[0] for index in range(3)}
    master, session_id, stats = await create_session(url)
    assert stats["workerCount"] == 3

    digests = {}
    tasks = []
    for index in range(FILE_COUNT):
        # Random, and distinct even if the random source were not.
        data = b"%04d" % index + os.urandom(FILE_SIZE - 4)
        filename = f"IMG_{index:04}.jpg"
        digests[filename] = hashlib.sha256(data).hexdigest()
        tasks.append(
            {
                "filename": filename,
                "mimeType": "image/jpeg",
                "dataBase64": base64.b64encode(data).decode(),
                "size": len(data),
            }
        )
    del data
    message = json.dumps(
        {"type": "SUBMIT_TASKS", "sessionId": session_id, "tasks": tasks}
    )
    del tasks
    message_size = len(message)
    assert 290e6 < message_size < 330e6

    sampler = PeakRss(list(children.values()))
    sampler.sample()
    baseline = sampler.peak
    sampler.start()
    received: dict[str, tuple[str, int, str]] = {}
    working = [
        asyncio.create_task(_work(worker, name, received))
        for name, worker in workers.items()
    ]
    started = time.monotonic()
    try:
        await master.send_raw(message)
        del message
        submitted = await master.expect(
            "TASKS_SUBMITTED", timeout=PLUGIN_RESULT_TIMEOUT
        )
        assert submitted["taskCount"] == FILE_COUNT
        results = {}
        for _ in range(FILE_COUNT):
            # Each result within the plugin's 60 s, or it gives up on the rest.
            result = await master.expect(
                "TASK_COMPLETED", "TASK_FAILED", timeout=PLUGIN_RESULT_TIMEOUT
            )
            assert result["type"] == "TASK_COMPLETED", result
            results[result["filename"]] = result["resultUrl"]
        finished = await master.expect("SESSION_COMPLETED")
    finally:
        elapsed = time.monotonic() - started
        sampler.stop()
        for task in working:
            task.cancel()
        outcomes = await asyncio.gather(*working, return_exceptions=True)
    for outcome in outcomes:
        assert isinstance(outcome, asyncio.CancelledError), outcome

    assert finished["stats"] == {
        "completed": FILE_COUNT,
        "failed": 0,
        "total": FILE_COUNT,
    }
    assert sorted(received) == sorted(digests)
    for filename, (digest, size, worker_name) in received.items():
        assert digest == digests[filename], f"{filename} corrupted"
        assert size == FILE_SIZE
        assert results[filename] == f"https://{worker_name}/{filename}"
    assert {name for _, _, name in received.values()} == set(workers)

    peaks = {name: sampler.peaks[child.pid] for name, child in children.items()}
    record_property("message_bytes", message_size)
    record_property("peak_rss_core_plus_bridge", sampler.peak)
    record_property("peak_rss_core", peaks["core"])
    record_property("peak_rss_bridge", peaks["bridge"])
    print(
        f"\n{message_size / 1e6:.0f} MB batch in {elapsed:.1f}s: peak RSS "
        f"core+bridge {sampler.peak / 1e6:.0f} MB "
        f"(core {peaks['core'] / 1e6:.0f} MB, bridge {peaks['bridge'] / 1e6:.0f} MB, "
        f"before {baseline / 1e6:.0f} MB, {sampler.samples} samples)"
    )
    assert sampler.peak < 4 * message_size, (
        f"peak RSS {sampler.peak / 1e6:.0f} MB for a {message_size / 1e6:.0f} MB "
        "message"
    )


async def _closed_by_server(plugin: Plugin, message: str) -> int | None:
    """
    Send ``message``, then read until the server closes; return its close code.

    None means that the connection broke without a close frame.

    """
    try:
        await plugin.send_raw(message)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(plugin.websocket.recv(), 0.5)
    except ConnectionClosed as closed:
        return None if closed.rcvd is None else closed.rcvd.code
    raise AssertionError(f"connection still open {TIMEOUT}s after the message")


def _submit(session_id: str, name: str, data: bytes) -> dict[str, Any]:
    return {
        "type": "SUBMIT_TASKS",
        "sessionId": session_id,
        "tasks": [
            {
                "filename": name,
                "mimeType": "image/png",
                "dataBase64": base64.b64encode(data).decode(),
                "size": len(data),
            }
        ],
    }


async def test_a_message_over_the_size_limit_closes_only_its_connection(deployment):
    """Over --max-message-size: that client is closed with 1009, others go on."""
    _, port = deployment.linkup("--max-message-size", "1MiB")
    url = f"ws://127.0.0.1:{port}"
    worker, worker_id = await register_worker(url)
    bystander, bystander_session, _ = await create_session(url)
    sender, sender_session, _ = await create_session(url)

    too_big = json.dumps(_submit(sender_session, "big.png", os.urandom(1_500_000)))
    assert len(too_big) > 2_000_000
    assert await _closed_by_server(sender, too_big) == 1009

    # The worker and the other master were not touched, and a message just
    # under the limit still goes through.
    data = os.urandom(760_000)
    fits = json.dumps(_submit(bystander_session, "fits.png", data))
    assert 1_000_000 < len(fits) < 2**20
    await bystander.send_raw(fits)
    submitted = await bystander.expect("TASKS_SUBMITTED")
    assert submitted["taskCount"] == 1
    assigned = await worker.expect("TASK_ASSIGNED")
    assert assigned["task"]["filename"] == "fits.png"
    assert base64.b64decode(assigned["task"]["dataBase64"]) == data
    await worker.send(
        "TASK_COMPLETED", taskId=assigned["task"]["id"], resultUrl="https://x/fits"
    )
    completed = await bystander.expect("TASK_COMPLETED")
    assert completed["resultUrl"] == "https://x/fits"

    status, _, body = await asyncio.to_thread(
        http_get, f"http://127.0.0.1:{port}/status"
    )
    assert status == 200
    stats = json.loads(body)
    assert [worker["id"] for worker in stats["workers"]] == [worker_id]
    assert stats["workers"][0]["stats"]["completed"] == 1
