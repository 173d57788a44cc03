"""
The reference for ``python -m benchmarks``: the plugin's round trip and nothing
else, in one process. No core, no journal, no spool, no checks, no retries.

    python -m benchmarks.relay PORT [--max-message-size BYTES]

Workers register and get tasks in submission order as they become idle;
masters open sessions, submit, and get every TASK_COMPLETED and one
SESSION_COMPLETED per session. It answers GET /readyz so that the suite waits
for it as it waits for linkup. Benchmark use only: a client that misbehaves
(or a worker that leaves holding a task) is not handled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response


@dataclass(slots=True)
class Session:
    id: str
    master: ServerConnection
    total: int = 0
    completed: int = 0


class Relay:
    def __init__(self) -> None:
        self.idle: deque[ServerConnection] = deque()
        self.queue: deque[bytes] = deque()  # encoded TASK_ASSIGNED, oldest first
        self.sessions: dict[str, Session] = {}
        self.owners: dict[str, tuple[Session, str]] = {}  # task id: session, file
        self.ids = itertools.count(1)

    async def handle(self, websocket: ServerConnection) -> None:
        try:
            async for raw in websocket:
                await self.on_message(websocket, orjson.loads(raw))
        finally:
            with contextlib.suppress(ValueError):
                self.idle.remove(websocket)

    async def on_message(self, websocket: ServerConnection, message: Any) -> None:
        match message["type"]:
            case "WORKER_REGISTER":
                worker_id = f"w-{next(self.ids)}"
                await send(
                    websocket, {"type": "WORKER_REGISTERED", "workerId": worker_id}
                )
                self.idle.append(websocket)
                await self.dispatch()
            case "CREATE_SESSION":
                session = Session(f"s-{next(self.ids)}", websocket)
                self.sessions[session.id] = session
                await send(
                    websocket, {"type": "SESSION_CREATED", "sessionId": session.id}
                )
            case "SUBMIT_TASKS":
                session = self.sessions[message["sessionId"]]
                for task in message["tasks"]:
                    task_id = f"t-{next(self.ids)}"
                    self.owners[task_id] = (session, task["filename"])
                    assigned = {
                        "type": "TASK_ASSIGNED",
                        "task": {"id": task_id, **task},
                    }
                    self.queue.append(orjson.dumps(assigned))
                session.total += len(message["tasks"])
                submitted = {
                    "type": "TASKS_SUBMITTED",
                    "sessionId": session.id,
                    "taskCount": len(message["tasks"]),
                    "totalPending": max(0, len(self.queue) - len(self.idle)),
                }
                await send(websocket, submitted)
                await self.dispatch()
            case "TASK_COMPLETED":
                session, filename = self.owners.pop(message["taskId"])
                session.completed += 1
                progress = {
                    "completed": session.completed,
                    "failed": 0,
                    "total": session.total,
                }
                completed = {
                    "type": "TASK_COMPLETED",
                    "taskId": message["taskId"],
                    "filename": filename,
                    "resultUrl": message["resultUrl"],
                    "progress": progress,
                }
                # Decided before any await: another worker's result may be
                # handled meanwhile, and only one of them ends the session.
                ended = session.completed == session.total
                if ended:
                    del self.sessions[session.id]
                await send(session.master, completed)
                if ended:
                    stats = {"sessionId": session.id, "stats": progress}
                    await send(session.master, {"type": "SESSION_COMPLETED", **stats})
                self.idle.append(websocket)
                await self.dispatch()

    async def dispatch(self) -> None:
        while self.idle and self.queue:
            worker = self.idle.popleft()
            await worker.send(self.queue.popleft(), text=True)


async def send(websocket: ServerConnection, message: dict[str, Any]) -> None:
    await websocket.send(orjson.dumps(message), text=True)


def ready_check(connection: ServerConnection, request: Request) -> Response | None:
    if request.path == "/readyz":
        return connection.respond(HTTPStatus.OK, "ready\n")
    return None


async def run(port: int, max_message_size: int) -> None:
    relay = Relay()
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with serve(
        relay.handle,
        "127.0.0.1",
        port,
        process_request=ready_check,
        compression=None,  # as linkup's bridge
        max_size=max_message_size,
    ):
        await stop


def main() -> None:
    from core.__main__ import byte_size

    parser = argparse.ArgumentParser(prog="python -m benchmarks.relay")
    parser.add_argument("port", type=int)
    parser.add_argument("--max-message-size", type=byte_size, default=2**30)
    args = parser.parse_args()
    asyncio.run(run(args.port, args.max_message_size))


if __name__ == "__main__":
    main()
