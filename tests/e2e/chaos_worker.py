"""
A simulated worker plugin, run as its own process by the chaos test.

Not a test module. Run as::

    python -m tests.e2e.chaos_worker --upload-log FILE [--seed N]
        [--standby FILE] URL [URL ...]

It behaves like the plugin in worker mode: connect, ``WORKER_REGISTER``,
``WORKER_HEARTBEAT`` every second, and for each ``TASK_ASSIGNED`` decode the
file, "upload" it (a random 0-20 ms pause), append the task id to the upload
log and reply ``TASK_COMPLETED`` with ``https://x/<sha256 of the file>``. When
its connection ends it waits a moment and connects again, registering afresh,
to the next URL of its list (a single URL: always the same bridge).

Being a real process holding a real WebSocket, it can be killed with
``kill -9`` in the middle of an upload, as a browser tab can. The upload log
is written with one ``write`` per line on a file opened ``O_APPEND``, so that
a kill never leaves half a task id behind, and the test can count uploads
made twice. Events go to stderr, one line each (stdout is a pipe nobody
reads).

With ``--standby FILE`` it starts up, says ``standing by``, and connects only
once FILE exists: a spare that replaces a killed worker at once, without the
second or so a Python process takes to start on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import os
import random
import sys
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

# The plugin waits 5 s before reconnecting; the test cannot wait that long.
RECONNECT_DELAY = 0.2
HEARTBEAT_INTERVAL = 1.0
MAX_UPLOAD_DELAY = 0.02

# Printed once registered; the test waits for it.
REGISTERED = "registered"
STANDING_BY = "standing by"


def log(event: str) -> None:
    sys.stderr.write(f"{time.time():.3f} pid={os.getpid()} {event}\n")
    sys.stderr.flush()


class Worker:
    def __init__(self, urls: list[str], upload_log: str, seed: int) -> None:
        self.urls = urls
        self.random = random.Random(seed)
        self.upload_fd = os.open(
            upload_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
        )

    async def run(self) -> None:
        for url in itertools.cycle(self.urls):
            try:
                websocket = await connect(
                    url, max_size=None, compression=None, open_timeout=5
                )
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                log(f"cannot connect url={url}: {exc!r}")
            else:
                log(f"connected url={url}")
                with contextlib.suppress(ConnectionClosed):
                    await self.serve(websocket)
                await websocket.close()
                log(
                    f"closed url={url} code={websocket.close_code} "
                    f"reason={websocket.close_reason!r}"
                )
            await asyncio.sleep(RECONNECT_DELAY)

    async def serve(self, websocket: ClientConnection) -> None:
        await self.send(websocket, {"type": "WORKER_REGISTER"})
        heartbeats = asyncio.create_task(self.heartbeat(websocket))
        try:
            async for raw in websocket:
                message = json.loads(raw)
                match message.get("type"):
                    case "WORKER_REGISTERED":
                        log(f"{REGISTERED} worker={message['workerId']}")
                    case "TASK_ASSIGNED":
                        await self.upload(websocket, message["task"])
                    case "ERROR" | "TASK_CANCELLED":
                        log(f"got {json.dumps(message)}")
                    case _:
                        pass
        finally:
            heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await heartbeats

    async def upload(self, websocket: ClientConnection, task: dict[str, Any]) -> None:
        data = base64.b64decode(task["dataBase64"], validate=True)
        digest = hashlib.sha256(data).hexdigest()
        await asyncio.sleep(self.random.uniform(0, MAX_UPLOAD_DELAY))
        # The upload is done: whatever happens next, it happened.
        os.write(self.upload_fd, f"{task['id']}\n".encode())
        log(f"uploaded task={task['id']} filename={task['filename']}")
        await self.send(
            websocket,
            {
                "type": "TASK_COMPLETED",
                "taskId": task["id"],
                "resultUrl": f"https://x/{digest}",
            },
        )

    async def heartbeat(self, websocket: ClientConnection) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            await self.send(websocket, {"type": "WORKER_HEARTBEAT"})

    @staticmethod
    async def send(websocket: ClientConnection, message: dict[str, Any]) -> None:
        await websocket.send(json.dumps(message))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("urls", nargs="+", metavar="URL")
    parser.add_argument("--upload-log", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--standby", metavar="FILE")
    args = parser.parse_args()
    log(f"started urls={args.urls}")
    if args.standby is not None:
        log(STANDING_BY)
        while not os.path.exists(args.standby):
            time.sleep(0.01)
        log("called in")
    asyncio.run(Worker(args.urls, args.upload_log, args.seed).run())


if __name__ == "__main__":
    main()
