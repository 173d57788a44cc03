"""
Resident memory of core and bridge with a large queue: ``python -m
benchmarks.queued_memory``.

Starts ``linkup`` on a free port with a data dir of its own, then:

1. Phase 1, submit: one master (its own process) submits ``--total`` bytes of
   files, ``--file-size`` each, in SUBMIT_TASKS messages of ``--message-size``
   of file data each, with no worker connected, and waits for every
   TASKS_SUBMITTED. Everything is then queued: in the spool on disk, not in
   the processes' memory.
2. Phase 2, drain: ``--workers`` workers (one process each) connect and take
   every task, answering TASK_COMPLETED with ``https://x/<sha256 of the
   decoded file>``. The master checks each result against the hash of the file
   it submitted under that name, one result per file, and SESSION_COMPLETED.

A thread samples the RSS of linkup's two children, core and bridge, every
50 ms. The table gives the peak of core, bridge and their sum in each phase,
the RSS once everything is queued and nothing moves, the bytes in the spool,
the time and payload MB/s of each phase, the CPU time of the load generator,
and the memory target (``memory_target``: core and bridge together at most
256 MB + 2 x the largest message); the JSON file (``--output``) has all of it,
the machine, the parameters and the RSS time series.

The master writes each message straight to its socket, one file at a time, so
that it stays small however large a message is; every message is one text
frame, as the plugin sends it. Sizes are in bytes of file data (decoded);
Base64 makes them a third larger on the wire.

    python -m benchmarks.queued_memory                # 2 GiB in 128 MiB messages
    python -m benchmarks.queued_memory --message-size 2GiB   # one message
    python -m benchmarks.queued_memory --quick        # a few seconds, for CI

Exits 1 if any result is missing or wrong, or linkup failed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import math
import multiprocessing
import multiprocessing.synchronize
import os
import platform
import queue
import random
import resource
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosedOK
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from benchmarks.processes import free_port, wait_ready
from bridge.memory import RELEASE_MEMORY_AFTER

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C speedups
    from websockets.utils import apply_mask

KiB = 2**10
MiB = 2**20
GiB = 2**30

DEFAULT_TOTAL = 2 * GiB
DEFAULT_FILE_SIZE = 8 * MiB
DEFAULT_MESSAGE_SIZE = 128 * MiB
DEFAULT_WORKERS = 4
QUICK_TOTAL = 64 * MiB
QUICK_FILE_SIZE = 1 * MiB
QUICK_MESSAGE_SIZE = 16 * MiB
DEFAULT_OUTPUT = Path(__file__).parent / "results" / "queued_memory.json"

# linkup's own default --max-message-size; raised only for larger messages.
LINKUP_MAX_MESSAGE_SIZE = GiB
SAMPLE_INTERVAL = 0.05
#: The fixed part of the memory target (256 MB, decimal: the stricter reading).
TARGET_BASE_BYTES = 256 * 10**6
SERIES_POINTS = 500
# Default time left with everything queued and nothing moving, between the
# phases (--settle): long enough for the bridge to give back the memory of
# the last message, which it does between one and two RELEASE_MEMORY_AFTER
# after it.
SETTLE_SECONDS = 2 * RELEASE_MEMORY_AFTER + 0.5
# One random block, repeated to fill each file behind a header of its own.
BLOCK_SIZE = MiB
HEADER_SIZE = 40
MIN_FILE_SIZE = 64
STOP_TIMEOUT = 15.0
MIME_TYPE = "application/octet-stream"
RESULT_PREFIX = "https://x/"


# The plan: which files, in which messages.


@dataclass(frozen=True, slots=True)
class Params:
    total: int
    file_size: int
    message_size: int
    workers: int
    timeout: float
    settle: float
    seed: int
    quick: bool
    linkup_args: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FileSpec:
    index: int
    name: str
    size: int

    @property
    def base64_size(self) -> int:
        return 4 * math.ceil(self.size / 3)


def plan_files(total: int, file_size: int) -> list[FileSpec]:
    """Files of ``file_size`` bytes adding up to ``total``; the last may be less."""
    sizes = [file_size] * (total // file_size)
    if total % file_size:
        sizes.append(total % file_size)
    return [FileSpec(i, f"file-{i:06d}.bin", size) for i, size in enumerate(sizes)]


def plan_messages(files: Sequence[FileSpec], message_size: int) -> list[list[FileSpec]]:
    """Consecutive files per message, at most ``message_size`` bytes (at least one)."""
    messages: list[list[FileSpec]] = []
    current: list[FileSpec] = []
    current_size = 0
    for spec in files:
        if current and current_size + spec.size > message_size:
            messages.append(current)
            current, current_size = [], 0
        current.append(spec)
        current_size += spec.size
    if current:
        messages.append(current)
    return messages


class FileMaker:
    """
    File contents, cheap to make: a header naming the file, then one random
    block repeated. Every file hashes differently; none is stored.

    """

    def __init__(self, seed: int) -> None:
        self.block = random.Random(seed).randbytes(BLOCK_SIZE)

    def data(self, spec: FileSpec) -> bytes:
        header = f"linkup queued_memory file {spec.index:010d}\n".encode()
        header = header.ljust(HEADER_SIZE, b".")[: spec.size]
        body = spec.size - len(header)
        repeats = body // BLOCK_SIZE + 1
        return header + (self.block * repeats)[:body]


def submit_message(
    session_id: str,
    files: Sequence[FileSpec],
    maker: FileMaker,
    digests: dict[str, str],
) -> tuple[int, Iterator[bytes]]:
    """
    A SUBMIT_TASKS message as its exact length and its bytes, made one file
    at a time; ``digests`` gets each file's sha256 as its data is made.

    """
    prefix = json.dumps({"type": "SUBMIT_TASKS", "sessionId": session_id})
    prefix_bytes = (prefix[:-1] + ',"tasks":[').encode()
    heads = [
        (
            ("," if i else "")
            + json.dumps({"filename": spec.name, "mimeType": MIME_TYPE})[:-1]
            + ',"dataBase64":"'
        ).encode()
        for i, spec in enumerate(files)
    ]
    tails = [f'","size":{spec.size}}}'.encode() for spec in files]
    suffix = b"]}"
    length = (
        len(prefix_bytes)
        + sum(
            len(h) + spec.base64_size + len(t)
            for h, spec, t in zip(heads, files, tails, strict=True)
        )
        + len(suffix)
    )

    def chunks() -> Iterator[bytes]:
        yield prefix_bytes
        for head, spec, tail in zip(heads, files, tails, strict=True):
            data = maker.data(spec)
            digests[spec.name] = hashlib.sha256(data).hexdigest()
            encoded = base64.b64encode(data)
            del data
            yield head
            yield encoded
            yield tail
        yield suffix

    return length, chunks()


# The master: a minimal blocking WebSocket client that can stream one frame.


class StreamingClient:
    """
    A blocking WebSocket client: websockets' Sans-I/O protocol for the
    handshake, small messages, pings and close, plus :meth:`send_streamed_text`
    which writes one text frame of a known length piece by piece, so that a
    message of gigabytes never sits in memory.

    """

    def __init__(self, url: str, timeout: float) -> None:
        uri = parse_uri(url)
        self.timeout = timeout
        self.sock = socket.create_connection((uri.host, uri.port), timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.protocol = ClientProtocol(uri, max_size=None)
        self._messages: deque[dict[str, Any]] = deque()
        self._fragments: list[bytes] = []
        self.protocol.send_request(self.protocol.connect())
        self._flush()
        while self.protocol.handshake_exc is None and not self._handshake_done():
            self._receive_some(time.monotonic() + timeout)
        if self.protocol.handshake_exc is not None:
            raise self.protocol.handshake_exc

    def _handshake_done(self) -> bool:
        return self.protocol.state is State.OPEN

    def send_json(self, message: dict[str, Any]) -> None:
        self.protocol.send_text(json.dumps(message).encode())
        self._flush()

    def send_streamed_text(self, length: int, chunks: Iterator[bytes]) -> None:
        """Send one text frame of ``length`` bytes, masked, as ``chunks`` come."""
        mask = os.urandom(4)
        if length < 126:
            header = struct.pack("!BB", 0x81, 0x80 | length)
        elif length < 65536:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, length)
        self.sock.settimeout(self.timeout)
        self.sock.sendall(header + mask)
        sent = 0
        for chunk in chunks:
            # The mask runs on from where the previous chunk stopped.
            shift = sent % 4
            self.sock.sendall(apply_mask(chunk, mask[shift:] + mask[:shift]))
            sent += len(chunk)
        if sent != length:
            raise RuntimeError(f"sent {sent} bytes in a frame of {length}")

    def receive(self, timeout: float) -> dict[str, Any]:
        """The next message; TimeoutError or ConnectionError otherwise."""
        deadline = time.monotonic() + timeout
        while not self._messages:
            self._receive_some(deadline)
        return self._messages.popleft()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.protocol.send_close(1000)
            self._flush()
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                if not self.sock.recv(65536):
                    break
        self.sock.close()

    def _receive_some(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no message in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(MiB)
        except TimeoutError:
            raise TimeoutError("no message in time") from None
        if not data:
            self.protocol.receive_eof()
            raise ConnectionError("linkup closed the connection")
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                self._on_frame(event)
        # Pongs to linkup's pings, made by the protocol.
        self._flush()

    def _on_frame(self, frame: Frame) -> None:
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                self._messages.append(json.loads(b"".join(self._fragments)))
                self._fragments = []
        elif frame.opcode is Opcode.CLOSE:
            raise ConnectionError(
                f"linkup closed the connection with {self.protocol.close_code}"
            )

    def _flush(self) -> None:
        self.sock.settimeout(self.timeout)
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)
            else:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)


def expect(client: StreamingClient, wanted: str, deadline: float) -> dict[str, Any]:
    """
    The next message of type ``wanted``, skipping others; an ERROR instead
    ends the run (RuntimeError), since the answer may never come.

    """
    while True:
        message = client.receive(max(0.0, deadline - time.monotonic()))
        if message["type"] == wanted:
            return message
        if message["type"] == "ERROR":
            raise RuntimeError(f"ERROR while waiting for {wanted}: {message}")


def master_process(url: str, params: Params, events: Any) -> None:
    """
    Phase 1, then the results of phase 2; reports to ``events``: ``started``,
    ``acked`` for each TASKS_SUBMITTED, ``submitted`` and ``done`` (with
    every check's outcome).

    """
    errors: list[str] = []
    report: dict[str, Any] = {"errors": errors}
    try:
        _master(url, params, events, report)
    except Exception as exc:
        errors.append(f"master: {type(exc).__name__}: {exc}")
    report.update(_own_usage())
    events.put(("done", time.monotonic(), report))


def _master(url: str, params: Params, events: Any, report: dict[str, Any]) -> None:
    errors: list[str] = report["errors"]
    deadline = time.monotonic() + params.timeout
    files = plan_files(params.total, params.file_size)
    messages = plan_messages(files, params.message_size)
    maker = FileMaker(params.seed)
    digests: dict[str, str] = {}

    client = StreamingClient(url, timeout=params.timeout)
    client.send_json({"type": "CREATE_SESSION"})
    session_id = expect(client, "SESSION_CREATED", deadline)["sessionId"]

    events.put(("started", time.monotonic(), {}))
    submitted = 0
    for batch in messages:
        length, chunks = submit_message(session_id, batch, maker, digests)
        started = time.monotonic()
        client.send_streamed_text(length, chunks)
        sent = time.monotonic()
        answer = expect(client, "TASKS_SUBMITTED", deadline)
        events.put(
            (
                "acked",
                time.monotonic(),
                {
                    "bytes": length,
                    "files": len(batch),
                    "send_seconds": round(sent - started, 3),
                    "ack_seconds": round(time.monotonic() - sent, 3),
                },
            )
        )
        submitted += len(batch)
        if answer["taskCount"] != len(batch) or answer["totalPending"] != submitted:
            errors.append(
                f"TASKS_SUBMITTED {answer} for {len(batch)} tasks, "
                f"{submitted} pending in all"
            )
    events.put(("submitted", time.monotonic(), {}))

    results: dict[str, list[str]] = {}
    failed: list[dict[str, Any]] = []
    completed: dict[str, Any] | None = None
    while completed is None:
        message = client.receive(max(0.0, deadline - time.monotonic()))
        match message["type"]:
            case "TASK_COMPLETED":
                results.setdefault(message["filename"], []).append(message["resultUrl"])
            case "TASK_FAILED":
                failed.append(message)
            case "SESSION_COMPLETED":
                completed = message
            case "ERROR":
                errors.append(f"ERROR: {message}")
    client.close()

    wrong = [
        name
        for name, urls in results.items()
        if urls != [RESULT_PREFIX + digests.get(name, "?")]
    ]
    missing = sorted(set(digests) - set(results))
    unknown = sorted(set(results) - set(digests))
    if failed:
        errors.append(f"{len(failed)} TASK_FAILED, first: {failed[0]}")
    if wrong:
        errors.append(f"{len(wrong)} wrong or repeated results, first: {wrong[0]}")
    if missing:
        errors.append(f"{len(missing)} files without a result, first: {missing[0]}")
    if unknown:
        errors.append(f"results for files never submitted: {unknown[:3]}")
    expected_stats = {"completed": len(files), "failed": 0, "total": len(files)}
    if completed.get("stats") != expected_stats:
        errors.append(f"SESSION_COMPLETED {completed}, expected {expected_stats}")
    report["results_verified"] = len(results) - len(wrong)
    report["files"] = len(files)


# The workers.


def worker_process(url: str, number: int, stop: Any, events: Any) -> None:
    """One plugin in worker mode until ``stop`` is set; reports ``worker``."""
    report: dict[str, Any] = {"number": number, "errors": []}
    events.put(("worker_connecting", time.monotonic(), {"number": number}))
    try:
        asyncio.run(_work(url, stop, report))
    except Exception as exc:
        report["errors"].append(f"worker {number}: {type(exc).__name__}: {exc}")
    report.update(_own_usage())
    events.put(("worker", time.monotonic(), report))


async def _work(
    url: str, stop: multiprocessing.synchronize.Event, report: dict[str, Any]
) -> None:
    tasks = 0
    payload_bytes = 0
    largest = 0
    async with connect(url, max_size=None, compression=None) as websocket:

        async def close_when_stopped() -> None:
            # A multiprocessing Event, which cannot be awaited: poll it.
            while not stop.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            await websocket.close()

        watcher = asyncio.create_task(close_when_stopped())
        await websocket.send(json.dumps({"type": "WORKER_REGISTER"}))
        try:
            while True:
                raw = await websocket.recv(decode=False)
                largest = max(largest, len(raw))
                message = orjson.loads(raw)
                del raw
                if message["type"] != "TASK_ASSIGNED":
                    continue
                task = message["task"]
                data = base64.b64decode(task["dataBase64"])
                del message
                digest = hashlib.sha256(data).hexdigest()
                tasks += 1
                payload_bytes += len(data)
                del data
                await websocket.send(
                    json.dumps(
                        {
                            "type": "TASK_COMPLETED",
                            "taskId": task["id"],
                            "resultUrl": RESULT_PREFIX + digest,
                        }
                    )
                )
        except ConnectionClosedOK:
            pass
        finally:
            watcher.cancel()
    report.update(tasks=tasks, payload_bytes=payload_bytes, largest_message=largest)


def _own_usage() -> dict[str, Any]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
        # ru_maxrss is in KiB on Linux.
        "max_rss_bytes": usage.ru_maxrss * KiB,
    }


# Measuring linkup.


@dataclass(slots=True)
class Sample:
    t: float
    core_rss: int
    bridge_rss: int
    core_shared: int
    bridge_shared: int
    core_cpu: float
    bridge_cpu: float

    @property
    def total_rss(self) -> int:
        return self.core_rss + self.bridge_rss


class RssSampler(threading.Thread):
    """
    RSS (and CPU time) of core and bridge every ``interval`` seconds.

    """

    def __init__(
        self, core: psutil.Process, bridge: psutil.Process, interval: float
    ) -> None:
        super().__init__(daemon=True)
        self.core = core
        self.bridge = bridge
        self.interval = interval
        self.samples: list[Sample] = []
        self._stopped = threading.Event()

    def sample(self) -> None:
        try:
            core_memory = self.core.memory_info()
            bridge_memory = self.bridge.memory_info()
            core_cpu = self.core.cpu_times()
            bridge_cpu = self.bridge.cpu_times()
        except psutil.Error:
            return
        self.samples.append(
            Sample(
                time.monotonic(),
                core_memory.rss,
                bridge_memory.rss,
                core_memory.shared,
                bridge_memory.shared,
                core_cpu.user + core_cpu.system,
                bridge_cpu.user + bridge_cpu.system,
            )
        )

    def run(self) -> None:
        next_time = time.monotonic()
        while not self._stopped.is_set():
            self.sample()
            next_time += self.interval
            self._stopped.wait(max(0.0, next_time - time.monotonic()))

    def stop(self) -> None:
        self._stopped.set()
        self.join()
        self.sample()

    def window(self, start: float, end: float) -> list[Sample]:
        inside = [s for s in self.samples if start <= s.t <= end]
        if inside or not self.samples:
            return inside
        # A window shorter than the interval: the sample nearest to it.
        return [min(self.samples, key=lambda s: abs(s.t - (start + end) / 2))]


def peaks(samples: Sequence[Sample]) -> dict[str, int]:
    if not samples:
        return {"core": 0, "bridge": 0, "sum": 0}
    return {
        "core": max(s.core_rss for s in samples),
        "bridge": max(s.bridge_rss for s in samples),
        "sum": max(s.total_rss for s in samples),
    }


def cpu_between(samples: Sequence[Sample]) -> dict[str, float]:
    if len(samples) < 2:
        return {"core": 0.0, "bridge": 0.0}
    return {
        "core": round(samples[-1].core_cpu - samples[0].core_cpu, 3),
        "bridge": round(samples[-1].bridge_cpu - samples[0].bridge_cpu, 3),
    }


def downsample(
    samples: Sequence[Sample], origin: float, points: int
) -> list[list[Any]]:
    """
    At most ``points`` rows; each the maximum of its bucket, column by column,
    so that no peak is lost (CPU times are cumulative, so their maximum is the
    bucket's last value).

    """
    rows = [
        [
            round(s.t - origin, 3),
            s.core_rss,
            s.bridge_rss,
            s.total_rss,
            s.core_shared,
            s.bridge_shared,
            round(s.core_cpu, 3),
            round(s.bridge_cpu, 3),
        ]
        for s in samples
    ]
    if len(rows) <= points:
        return rows
    size = len(rows) / points
    buckets = [rows[int(i * size) : int((i + 1) * size)] for i in range(points)]
    return [
        [bucket[0][0], *(max(column) for column in list(zip(*bucket, strict=True))[1:])]
        for bucket in buckets
        if bucket
    ]


SERIES_COLUMNS = [
    "t_seconds",
    "core_rss",
    "bridge_rss",
    "sum_rss",
    "core_shared",
    "bridge_shared",
    "core_cpu_seconds",
    "bridge_cpu_seconds",
]


def read_hwm(process: psutil.Process) -> int | None:
    """The kernel's peak RSS of ``process`` (VmHWM) since start or reset."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
    return None


def read_status_memory(process: psutil.Process) -> dict[str, int]:
    """
    RSS split by kind, from /proc/PID/status: RssAnon (the heap), RssFile
    (mapped files: code, libraries; page cache of read() and write() is never
    counted in RSS) and RssShmem, in bytes.

    """
    fields = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")
    found: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in fields:
                found[name] = int(value.split()[0]) * KiB
    return found


def reset_hwm(process: psutil.Process) -> bool:
    """Reset VmHWM (Linux: ``echo 5 > /proc/PID/clear_refs``); False if refused."""
    try:
        Path(f"/proc/{process.pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def spool_usage(data_dir: Path) -> dict[str, int]:
    files = 0
    size = 0
    blocks = 0
    spool = data_dir / "spool"
    if spool.is_dir():
        for entry in os.scandir(spool):
            if entry.is_file(follow_symlinks=False):
                stat = entry.stat(follow_symlinks=False)
                files += 1
                size += stat.st_size
                blocks += stat.st_blocks * 512
    return {"bytes": size, "files": files, "disk_bytes": blocks}


def machine_info() -> dict[str, Any]:
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "ram_bytes": psutil.virtual_memory().total,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


# Running it all.


@dataclass(slots=True)
class Run:
    """What the parent learns while the benchmark runs."""

    params: Params
    errors: list[str] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    master: dict[str, Any] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)
    #: One entry per SUBMIT_TASKS answered: size, send and answer times.
    messages: list[dict[str, Any]] = field(default_factory=list)
    spool: dict[str, int] = field(default_factory=dict)
    hwm: dict[str, dict[str, int | None]] = field(default_factory=dict)
    memory_detail: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)


def parse_args(argv: Sequence[str] | None) -> tuple[Params, Path | None, Path]:
    # Here, not at the top: the load generator's processes import this module
    # too, and need none of the core.
    from core.__main__ import byte_size

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.queued_memory",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--total",
        type=byte_size,
        help="bytes of file data to queue, decoded (default: 2GiB; --quick: 64MiB)",
    )
    parser.add_argument(
        "--file-size",
        type=byte_size,
        help="bytes per file (default: 8MiB; --quick: 1MiB)",
    )
    parser.add_argument(
        "--message-size",
        type=byte_size,
        help="bytes of file data per SUBMIT_TASKS message; equal to --total for "
        "one message (default: 128MiB; --quick: 16MiB)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help="workers, one process each (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="linkup's data dir, which must be empty or missing; kept "
        "(default: a temporary directory, removed at the end)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="JSON file for the results (default: benchmarks/results/"
        "queued_memory.json)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds the whole run may take (default: %(default)s)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=SETTLE_SECONDS,
        help="seconds to wait with everything queued before the workers come "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the random file data"
    )
    parser.add_argument(
        "--linkup-args",
        default="",
        metavar="ARGS",
        help="more options for linkup, one string, e.g. '--link-timeout 30' "
        "(default: none; --max-message-size is raised to fit the largest "
        "message)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="64MiB in 1MiB files and 16MiB messages: a few seconds, for CI",
    )
    args = parser.parse_args(argv)
    if args.quick:
        defaults = (QUICK_TOTAL, QUICK_FILE_SIZE, QUICK_MESSAGE_SIZE)
    else:
        defaults = (DEFAULT_TOTAL, DEFAULT_FILE_SIZE, DEFAULT_MESSAGE_SIZE)
    total = args.total or defaults[0]
    file_size = args.file_size or defaults[1]
    message_size = args.message_size or defaults[2]
    if file_size < MIN_FILE_SIZE:
        parser.error(f"--file-size must be at least {MIN_FILE_SIZE} bytes")
    if file_size > total:
        parser.error("--file-size must not exceed --total")
    if message_size < file_size:
        parser.error("--message-size must hold at least one file (--file-size)")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.settle < 0 or args.timeout <= 0:
        parser.error("--settle must be 0 or more and --timeout more than 0")
    data_dir = args.data_dir
    if data_dir is not None and (
        data_dir.is_file() or (data_dir.is_dir() and any(data_dir.iterdir()))
    ):
        parser.error(f"--data-dir {args.data_dir} must be empty or missing")
    params = Params(
        total=total,
        file_size=file_size,
        message_size=message_size,
        workers=args.workers,
        timeout=args.timeout,
        settle=args.settle,
        seed=args.seed,
        quick=args.quick,
        linkup_args=tuple(shlex.split(args.linkup_args)),
    )
    return params, args.data_dir, args.output


def main(argv: Sequence[str] | None = None) -> int:
    params, data_dir_option, output = parse_args(argv)
    report = run_benchmark(params, data_dir_option)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(_table(report))
    print(f"\nwritten to {output}")
    if report["errors"]:
        print("\nFAILED:", file=sys.stderr)
        for error in report["errors"]:
            print(f"  {error}", file=sys.stderr)
        return 1
    return 0


def run_benchmark(
    params: Params, data_dir_option: Path | None = None
) -> dict[str, Any]:
    """
    Start linkup, run both phases, stop it; the report (``ok``, ``errors``,
    ``results``, ``rss_series``...). Also called by ``python -m benchmarks``.

    """
    files = plan_files(params.total, params.file_size)
    messages = plan_messages(files, params.message_size)
    run = Run(params)

    work_dir = Path(tempfile.mkdtemp(prefix="linkup-queued-memory-"))
    data_dir = data_dir_option or work_dir / "data"
    log_path = work_dir / "linkup.log"
    # A whole batch is one message: make room for the largest, Base64 and all.
    largest_estimate = max(
        sum(spec.base64_size + 200 for spec in batch) for batch in messages
    )
    max_message_size = max(LINKUP_MAX_MESSAGE_SIZE, largest_estimate + MiB)

    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    stop_workers = context.Event()
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    processes: list[multiprocessing.process.BaseProcess] = []
    sampler: RssSampler | None = None
    deadline = time.monotonic() + params.timeout

    with log_path.open("wb") as log:
        linkup = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "linkup",
                str(port),
                "--host",
                "127.0.0.1",
                "--data-dir",
                str(data_dir),
                "--max-message-size",
                str(max_message_size),
                *params.linkup_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_ready(port, linkup)
        core, bridge = linkup_children(linkup.pid)
        sampler = RssSampler(core, bridge, SAMPLE_INTERVAL)
        sampler.start()

        master = context.Process(
            target=master_process, args=(url, params, events), name="master"
        )
        master.start()
        processes.append(master)

        # Phase 1.
        submitted = _wait_for(events, {"started"}, run, processes, deadline)
        if submitted == "started":
            submitted = _wait_for(events, {"submitted"}, run, processes, deadline)
        if submitted == "submitted":
            time.sleep(params.settle)
            run.marks["settled"] = time.monotonic()
            run.spool = spool_usage(data_dir)
            run.memory_detail["queued_idle"] = {
                "core": read_status_memory(core),
                "bridge": read_status_memory(bridge),
            }
            run.hwm["phase1"] = {"core": read_hwm(core), "bridge": read_hwm(bridge)}
            if not (reset_hwm(core) and reset_hwm(bridge)):
                run.hwm["phase1"] = {"core": None, "bridge": None}

            # Phase 2.
            run.marks["workers_started"] = time.monotonic()
            for number in range(params.workers):
                worker = context.Process(
                    target=worker_process,
                    args=(url, number, stop_workers, events),
                    name=f"worker-{number}",
                )
                worker.start()
                processes.append(worker)
            _wait_for(events, {"done"}, run, processes, deadline)
            run.memory_detail["after_phase2"] = {
                "core": read_status_memory(core),
                "bridge": read_status_memory(bridge),
            }
            if run.hwm["phase1"]["core"] is not None:
                run.hwm["phase2"] = {
                    "core": read_hwm(core),
                    "bridge": read_hwm(bridge),
                }

        stop_workers.set()
        while len(run.workers) < len(processes) - 1 and time.monotonic() < deadline:
            _wait_for(
                events,
                {"worker"},
                run,
                processes,
                min(deadline, time.monotonic() + STOP_TIMEOUT),
            )
        sampler.stop()
        if linkup.poll() is not None:
            run.errors.append(f"linkup exited early with status {linkup.returncode}")
    except (TimeoutError, RuntimeError, psutil.Error) as exc:
        run.errors.append(str(exc))
    finally:
        stop_workers.set()
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        for process in processes:
            process.join(STOP_TIMEOUT)
            if process.is_alive():
                process.kill()
                process.join()
        _stop_linkup(linkup)

    run.errors += run.master.get("errors", [])
    for report in run.workers:
        run.errors += report.get("errors", [])
    if run.errors:
        print(f"linkup log ({log_path}), last lines:", file=sys.stderr)
        lines = log_path.read_text(errors="replace").splitlines()
        print("\n".join(lines[-30:]), file=sys.stderr)
    if data_dir_option is None:
        shutil.rmtree(work_dir, ignore_errors=True)
    else:
        log_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            work_dir.rmdir()

    return _report(run, files, messages, sampler, max_message_size, data_dir_option)


def _wait_for(
    events: Any,
    kinds: set[str],
    run: Run,
    processes: Sequence[multiprocessing.process.BaseProcess],
    deadline: float,
) -> str:
    """Handle events until one of ``kinds`` or ``done``; return its kind."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {'/'.join(sorted(kinds))} in time (--timeout)")
        try:
            kind, when, payload = events.get(timeout=min(0.5, remaining))
        except queue.Empty:
            dead = [p.name for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"load generator died: {', '.join(dead)}") from None
            continue
        match kind:
            case "started":
                run.marks["phase1_start"] = when
            case "acked":
                run.messages.append(payload)
            case "submitted":
                run.marks["phase1_end"] = when
            case "worker_connecting":
                run.marks.setdefault("phase2_start", when)
            case "done":
                run.marks["phase2_end"] = when
                run.master.update(payload)
            case "worker":
                run.workers.append(payload)
        # "done": the master has finished, early if something went wrong;
        # nothing else is coming from it.
        if kind in kinds or kind == "done":
            return str(kind)


def _report(
    run: Run,
    files: Sequence[FileSpec],
    messages: Sequence[Sequence[FileSpec]],
    sampler: RssSampler | None,
    max_message_size: int,
    data_dir_option: Path | None,
) -> dict[str, Any]:
    params = run.params
    marks = run.marks
    samples = sampler.samples if sampler is not None else []
    wire_bytes = sum(spec.base64_size for spec in files)
    message_sizes = [m["bytes"] for m in run.messages]

    def phase(
        start: str, end: str, window_start: str, window_end: str
    ) -> dict[str, Any] | None:
        # Timed from the master's or workers' first move to the last answer;
        # the peaks are taken over the window, which adds the quiet moments
        # around it, so that nothing between the phases escapes.
        # A phase cut short by a failure reports what it saw until the end.
        if start not in marks:
            return None
        finished = end in marks
        stop = marks[end] if finished else (samples[-1].t if samples else 0.0)
        seconds = max(stop - marks[start], 1e-9)
        window = (
            []
            if sampler is None
            else sampler.window(
                marks.get(window_start, marks[start]), marks.get(window_end, stop)
            )
        )
        return {
            "completed": finished,
            "seconds": round(seconds, 3),
            "payload_mb_per_s": round(params.total / seconds / 1e6, 1),
            "wire_mb_per_s": round(wire_bytes / seconds / 1e6, 1),
            "peak_rss": peaks(window),
            "cpu_seconds": cpu_between(window),
        }

    settled: dict[str, int] | None = None
    if "settled" in marks and sampler is not None:
        before = [s for s in samples if s.t <= marks["settled"]]
        if before:
            last = before[-1]
            settled = {
                "core": last.core_rss,
                "bridge": last.bridge_rss,
                "sum": last.total_rss,
            }

    load_cpu = run.master.get("cpu_seconds", 0.0) + sum(
        w.get("cpu_seconds", 0.0) for w in run.workers
    )
    origin = marks.get("phase1_start", samples[0].t if samples else 0.0)
    report: dict[str, Any] = {
        "benchmark": "queued_memory",
        "ok": not run.errors,
        "errors": run.errors,
        "machine": machine_info(),
        "parameters": {
            **asdict(params),
            "data_dir": str(data_dir_option) if data_dir_option else None,
            "linkup_max_message_size": max_message_size,
            "sample_interval_seconds": SAMPLE_INTERVAL,
        },
        "results": {
            "files": len(files),
            "messages": len(messages),
            "payload_bytes": params.total,
            "wire_bytes": wire_bytes,
            "largest_message_bytes": max(message_sizes, default=0),
            "messages_acked": run.messages,
            "largest_task_assigned_bytes": max(
                (w.get("largest_message", 0) for w in run.workers), default=0
            ),
            "results_verified": run.master.get("results_verified", 0),
            "spool_after_phase1": run.spool,
            "phase1": phase(
                "phase1_start", "phase1_end", "phase1_start", "workers_started"
            ),
            "queued_idle_rss": settled,
            "phase2": phase(
                "phase2_start", "phase2_end", "workers_started", "phase2_end"
            ),
            "kernel_peak_rss": run.hwm,
            "memory_detail": run.memory_detail,
            "load_generator": {
                "cpu_seconds": round(load_cpu, 3),
                "master": {
                    k: run.master.get(k) for k in ("cpu_seconds", "max_rss_bytes")
                },
                "workers": [
                    {
                        k: w.get(k)
                        for k in (
                            "number",
                            "tasks",
                            "payload_bytes",
                            "cpu_seconds",
                            "max_rss_bytes",
                        )
                    }
                    for w in sorted(run.workers, key=lambda w: w.get("number", 0))
                ],
            },
        },
        "rss_series": {
            "columns": SERIES_COLUMNS,
            "note": "t from the start of phase 1; each row is the maximum of "
            "its bucket when downsampled; RSS and shared in bytes, CPU "
            "cumulative",
            "samples": len(samples),
            "phase_marks": {
                name: round(value - origin, 3) for name, value in marks.items()
            },
            "points": downsample(samples, origin, SERIES_POINTS),
        },
    }
    report["results"]["memory_target"] = memory_target(report["results"])
    return report


def memory_target(results: dict[str, Any]) -> dict[str, Any]:
    """
    The memory target: peak RSS of core and bridge together at most
    256 MB + 2 x the largest message. Two readings of "together": the
    kernel's peak of each process added up, an upper bound, since the two
    need not peak at once (the bridge peaks while it receives a message, the
    core after, while it spools it); and the largest sum of one sample. The
    target is met if the stricter reading available is within the bound.

    """
    bound = TARGET_BASE_BYTES + 2 * results["largest_message_bytes"]
    added = [
        peak["core"] + peak["bridge"]
        for peak in results["kernel_peak_rss"].values()
        if peak and peak["core"] is not None and peak["bridge"] is not None
    ]
    sampled = [
        phase["peak_rss"]["sum"]
        for phase in (results["phase1"], results["phase2"])
        if phase is not None
    ]
    kernel_peaks_added = max(added, default=None)
    sampled_peak_sum = max(sampled, default=None)
    strictest = kernel_peaks_added if kernel_peaks_added else sampled_peak_sum
    return {
        "bound_bytes": bound,
        "kernel_peaks_added_bytes": kernel_peaks_added,
        "sampled_peak_sum_bytes": sampled_peak_sum,
        "met": strictest is not None and strictest <= bound,
    }


def target_line(target: dict[str, Any]) -> str:
    """One line for the tables: the bound, both readings, and the verdict."""
    return (
        f"memory target {_mib(target['bound_bytes'])} MiB (256 MB + 2 x the "
        f"largest message): kernel peaks added "
        f"{_mib(target['kernel_peaks_added_bytes'])}, largest sampled sum "
        f"{_mib(target['sampled_peak_sum_bytes'])}: "
        f"{'met' if target['met'] else 'NOT met'}"
    )


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MiB:.0f}"


def _table(report: dict[str, Any]) -> str:
    results = report["results"]
    params = report["parameters"]
    lines = [
        f"queued_memory: {params['total'] / MiB:.0f} MiB of files "
        f"({results['files']} of {params['file_size'] / MiB:g} MiB) in "
        f"{results['messages']} SUBMIT_TASKS of up to "
        f"{params['message_size'] / MiB:g} MiB of files; largest message "
        f"{results['largest_message_bytes'] / MiB:.1f} MiB; "
        f"{params['workers']} workers",
        "",
        f"{'':24}{'core':>8}{'bridge':>8}{'sum':>8}{'seconds':>9}{'MB/s':>8}",
        f"{'(RSS in MiB)':24}",
    ]
    for label, key in (
        ("phase 1 submit, peak", "phase1"),
        ("phase 2 drain, peak", "phase2"),
    ):
        phase = results.get(key)
        if phase is None:
            lines.append(f"{label:24}{'(did not run)':>16}")
            continue
        if not phase["completed"]:
            label = f"{label[:7]} peak, cut short"
        peak = phase["peak_rss"]
        lines.append(
            f"{label:24}{_mib(peak['core']):>8}{_mib(peak['bridge']):>8}"
            f"{_mib(peak['sum']):>8}{phase['seconds']:>9.2f}"
            f"{phase['payload_mb_per_s']:>8.1f}"
        )
        if key == "phase1" and results["queued_idle_rss"] is not None:
            idle = results["queued_idle_rss"]
            lines.append(
                f"{'all queued, idle':24}{_mib(idle['core']):>8}"
                f"{_mib(idle['bridge']):>8}{_mib(idle['sum']):>8}"
            )
    hwm = results["kernel_peak_rss"]
    for key, label in (
        ("phase1", "kernel VmHWM, phase 1"),
        ("phase2", "kernel VmHWM, phase 2"),
    ):
        if hwm.get(key) and hwm[key]["core"] is not None:
            lines.append(
                f"{label:24}{_mib(hwm[key]['core']):>8}{_mib(hwm[key]['bridge']):>8}"
            )
    lines.append(target_line(results["memory_target"]))
    detail = results["memory_detail"].get("queued_idle")
    if detail:
        lines.append(
            "all queued, idle, by kind: "
            + "; ".join(
                f"{name} anon {_mib(detail[name].get('RssAnon'))} "
                f"file {_mib(detail[name].get('RssFile'))} "
                f"shmem {_mib(detail[name].get('RssShmem'))}"
                for name in ("core", "bridge")
            )
        )
    spool = results["spool_after_phase1"]
    load = results["load_generator"]
    lines += [
        "",
        f"spool after phase 1: {spool.get('bytes', 0) / 1e6:.1f} MB in "
        f"{spool.get('files', 0)} files (Base64 on the wire: "
        f"{results['wire_bytes'] / 1e6:.1f} MB)",
        f"load generator CPU: {load['cpu_seconds']:.1f} s (master "
        f"{load['master'].get('cpu_seconds') or 0:.1f} s, "
        f"{len(load['workers'])} workers)",
        f"results verified: {results['results_verified']}/{results['files']}; "
        + ("OK" if report["ok"] else "FAILED"),
    ]
    return "\n".join(lines)


def linkup_children(pid: int) -> tuple[psutil.Process, psutil.Process]:
    """The core and the bridge that the launcher ``pid`` started."""
    found: dict[str, psutil.Process] = {}
    for child in psutil.Process(pid).children(recursive=True):
        command = child.cmdline()
        for name in ("core", "bridge"):
            if name in command and command[command.index(name) - 1] == "-m":
                found[name] = child
    if sorted(found) != ["bridge", "core"]:
        raise RuntimeError(f"linkup's children not found: {found}")
    return found["core"], found["bridge"]


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM ``process``, and SIGKILL it if it is still there after ``timeout``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _stop_linkup(linkup: subprocess.Popen[bytes]) -> None:
    stop_process(linkup, STOP_TIMEOUT)


if __name__ == "__main__":
    sys.exit(main())
