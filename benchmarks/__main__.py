"""
Upload throughput of a real linkup: ``python -m benchmarks``.

Starts ``linkup`` on a free port, with a temporary data dir removed at the
end, connects simulated workers that answer at once (so that linkup's own cost
is what is measured), submits one batch from one master, checks every result
against a hash of the file it stood for, and prints tasks/s, payload MB/s and
the peak RSS of core and bridge.

    python -m benchmarks --files 200 --size 1MiB --workers 8
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import psutil
from websockets.asyncio.client import ClientConnection, connect

from benchmarks.processes import free_port, wait_ready
from core.__main__ import byte_size


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--files", type=int, default=200, help="files in the batch")
    parser.add_argument("--size", type=byte_size, default=2**20, help="bytes per file")
    parser.add_argument("--workers", type=int, default=8, help="simulated workers")
    args = parser.parse_args()

    port = free_port()
    # A data dir of its own, so that the queue and the spooled files do not
    # land in the user's ~/.local/share/linkup.
    with tempfile.TemporaryDirectory(prefix="linkup-benchmark-") as data_dir:
        linkup = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "linkup",
                str(port),
                "--host",
                "127.0.0.1",
                "--data-dir",
                data_dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_ready(port, linkup)
            sampler = _RssSampler(linkup.pid)
            sampler.start()
            seconds = asyncio.run(
                _run(f"ws://127.0.0.1:{port}", args.files, args.size, args.workers)
            )
            sampler.stop()
        finally:
            linkup.terminate()
            linkup.wait(10)

    megabytes = args.files * args.size / 1e6
    print(
        f"{args.files} files of {args.size} bytes, {args.workers} workers: "
        f"{seconds:.2f}s, {args.files / seconds:.0f} tasks/s, "
        f"{megabytes / seconds:.1f} MB/s of file data, "
        f"peak RSS core+bridge {sampler.peak / 2**20:.0f} MiB"
    )
    return 0


async def _run(url: str, files: int, size: int, workers: int) -> float:
    worker_tasks = [asyncio.create_task(_worker(url)) for _ in range(workers)]
    master = await connect(url, max_size=None, compression=None)
    await master.send(json.dumps({"type": "CREATE_SESSION"}))
    session_id = (await _expect(master, "SESSION_CREATED"))["sessionId"]

    # Distinct files, made once; the URL each worker reports is the file's
    # hash, which the master checks.
    block = os.urandom(size)
    contents = [i.to_bytes(8, "big") + block[8:] for i in range(files)]
    expected = {
        f"file-{i}.bin": hashlib.sha256(c).hexdigest() for i, c in enumerate(contents)
    }
    tasks = [
        {
            "filename": f"file-{i}.bin",
            "mimeType": "application/octet-stream",
            "dataBase64": base64.b64encode(content).decode(),
            "size": len(content),
        }
        for i, content in enumerate(contents)
    ]
    message = json.dumps(
        {"type": "SUBMIT_TASKS", "sessionId": session_id, "tasks": tasks}
    )
    del tasks, contents

    started = time.perf_counter()
    await master.send(message)
    while True:
        result = await _expect(
            master, "TASK_COMPLETED", "TASK_FAILED", "SESSION_COMPLETED"
        )
        if result["type"] == "SESSION_COMPLETED":
            break
        if (
            result["type"] == "TASK_FAILED"
            or expected[result["filename"]] != result["resultUrl"]
        ):
            raise SystemExit(f"wrong result: {result}")
    seconds = time.perf_counter() - started

    await master.close()
    for task in worker_tasks:
        task.cancel()
    return seconds


async def _worker(url: str) -> None:
    async with connect(url, max_size=None, compression=None) as websocket:
        await websocket.send(json.dumps({"type": "WORKER_REGISTER"}))
        async for raw in websocket:
            message = json.loads(raw)
            if message["type"] != "TASK_ASSIGNED":
                continue
            task = message["task"]
            digest = hashlib.sha256(base64.b64decode(task["dataBase64"])).hexdigest()
            await websocket.send(
                json.dumps(
                    {
                        "type": "TASK_COMPLETED",
                        "taskId": task["id"],
                        "resultUrl": digest,
                    }
                )
            )


async def _expect(websocket: ClientConnection, *types: str) -> dict[str, object]:
    while True:
        message = json.loads(await websocket.recv())
        if message["type"] in types:
            return message  # type: ignore[no-any-return]


class _RssSampler(threading.Thread):
    """
    Peak resident memory of a process's children, summed, sampled every 50 ms.

    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.parent = psutil.Process(pid)
        self.peak = 0
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(0.05):
            total = 0
            for child in self.parent.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += child.memory_info().rss
            self.peak = max(self.peak, total)

    def stop(self) -> None:
        self._stopped.set()
        self.join()


if __name__ == "__main__":
    sys.exit(main())
