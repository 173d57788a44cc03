"""
linkup-core: the scheduler alone, serving bridges over ZeroMQ.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import secrets
import signal
import sys
import time
from functools import partial
from pathlib import Path
from types import FrameType

import zmq

from core.errors import ERROR_CODES
from core.scheduler import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_RESUME_GRACE,
    DEFAULT_RETENTION,
    DEFAULT_TASK_TIMEOUT,
    DEFAULT_WORKER_TIMEOUT,
    Scheduler,
)
from core.server import (
    DEFAULT_BIND,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_LINK_TIMEOUT,
    CoreServer,
)
from core.spool import Spool
from core.store import (
    StorageError,
    Store,
    check_room_for,
    open_data_dir,
    open_memory,
)
from linkup import __version__
from linkup.logs import add_log_level_option, configure_logging
from linkup.memory import return_large_buffers_promptly
from metrics.build import new_registry
from metrics.core import CoreMetrics
from metrics.serve import MetricsServer

# Refuse to start with less free space than this in the data dir: a core
# that fills the disk mid-batch can only refuse files.
DEFAULT_MIN_FREE_SPACE = 64 * 2**20

# Next to the link's 9528; Prometheus scrapes http://HOST:9529/metrics.
DEFAULT_METRICS_PORT = 9529


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linkup-core",
        description="Run the linkup scheduler. Bridges connect to it over ZeroMQ.",
    )
    parser.add_argument(
        "--bind",
        default=DEFAULT_BIND,
        help="ZeroMQ endpoint for bridges to connect to; tcp://0.0.0.0:PORT "
        "accepts bridges on other machines (default: %(default)s)",
    )
    add_storage_options(parser, default_data_dir("core"))
    add_scheduler_options(parser)
    add_link_options(parser)
    parser.add_argument(
        "--metrics-port",
        type=port_or_zero,
        default=DEFAULT_METRICS_PORT,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics; 0: do not "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        metavar="HOST",
        help="address for the metrics port (default: %(default)s)",
    )
    add_log_level_option(parser)
    parser.add_argument("--version", action="version", version=__version__)
    return parser


def default_data_dir(name: str) -> Path:
    """
    Where a core keeps its queue unless told otherwise: under
    ``$XDG_DATA_HOME/linkup`` (``~/.local/share/linkup``).

    """
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "linkup" / name


def add_storage_options(parser: argparse.ArgumentParser, data_dir: Path | None) -> None:
    storage = parser.add_mutually_exclusive_group()
    storage.add_argument(
        "--data-dir",
        type=directory_path,
        default=data_dir,
        metavar="DIR",
        help="keep the task queue and the queued files here; survives "
        "restarts (default: %s)" % (data_dir or default_data_dir("port-PORT")),
    )
    storage.add_argument(
        "--memory",
        action="store_true",
        help="keep everything in memory instead; a restart loses the queue",
    )
    parser.add_argument(
        "--fsync",
        action="store_true",
        help="flush every change to the disk itself, so that the queue also "
        "survives a power cut (slower); without it, it survives crashes",
    )
    parser.add_argument(
        "--min-free-space",
        type=byte_size,
        default=DEFAULT_MIN_FREE_SPACE,
        metavar="BYTES",
        help="free space to keep in the data dir: refuse to start with less, "
        "and refuse files that would leave less "
        "(default: 64MiB)",
    )


def add_scheduler_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--worker-timeout",
        type=positive_float,
        default=DEFAULT_WORKER_TIMEOUT,
        metavar="SECONDS",
        help="drop a worker silent for this long and requeue its task "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=DEFAULT_MAX_ATTEMPTS,
        choices=range(1, 101),
        metavar="N",
        help="attempts per task before the master is told it failed "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--task-timeout",
        type=non_negative_float,
        default=DEFAULT_TASK_TIMEOUT,
        metavar="SECONDS",
        help="take a task back from a worker with no result this long after "
        "assigning it (plus any rate-limit wait it reported); 0: no limit "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--resume-grace",
        type=non_negative_float,
        default=DEFAULT_RESUME_GRACE,
        metavar="SECONDS",
        help="keep a session whose master disconnected paused this long for "
        "RESUME_SESSION before dropping its queue; 0: drop at once "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--retention",
        type=non_negative_float,
        default=DEFAULT_RETENTION,
        metavar="SECONDS",
        help="keep an ended session's results this long for RESUME_SESSION "
        "(default: %(default)s)",
    )


def scheduler_and_storage_argv(args: argparse.Namespace) -> list[str]:
    """
    The options of :func:`add_storage_options` and
    :func:`add_scheduler_options` as linkup-core's command line, for a
    launcher that parsed them.

    """
    argv = ["--memory"] if args.memory else ["--data-dir", str(args.data_dir)]
    if args.fsync:
        argv.append("--fsync")
    for option in (
        "min_free_space",
        "worker_timeout",
        "max_attempts",
        "task_timeout",
        "resume_grace",
        "retention",
    ):
        argv += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    return argv


def build_scheduler(args: argparse.Namespace, instance: str) -> Scheduler:
    return Scheduler(
        instance,
        max_attempts=args.max_attempts,
        worker_timeout=args.worker_timeout,
        task_timeout=args.task_timeout or None,
        resume_grace=args.resume_grace,
        retention=args.retention,
    )


def open_storage(args: argparse.Namespace) -> tuple[Store, Spool]:
    """
    Open the store and spool that the options ask for.

    Raises:
        StorageError: The data dir cannot be used; the message says why.

    """
    if args.memory:
        return open_memory()
    return open_data_dir(
        args.data_dir, fsync=args.fsync, min_free_bytes=args.min_free_space
    )


def add_link_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--heartbeat-interval",
        type=positive_float,
        default=DEFAULT_HEARTBEAT_INTERVAL,
        metavar="SECONDS",
        help="heartbeat interval on the core-bridge link (default: %(default)s)",
    )
    parser.add_argument(
        "--link-timeout",
        type=positive_float,
        default=DEFAULT_LINK_TIMEOUT,
        metavar="SECONDS",
        help="declare the other end of the core-bridge link lost after this "
        "much silence (default: %(default)s)",
    )


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def directory_path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return Path(text)


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


_UNITS = {
    "": 1,
    "b": 1,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}


def byte_size(text: str) -> int:
    number = text.strip().lower()
    unit = number.lstrip("0123456789.")
    digits = number[: len(number) - len(unit)]
    try:
        value = int(float(digits) * _UNITS[unit.strip()])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size such as 1073741824, 512MiB or 1GiB"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port {value} is not between 1 and 65535")
    return value


def port_or_zero(text: str) -> int:
    if text.strip() == "0":
        return 0
    try:
        return port_number(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or 0 for none)") from None


class _StopOnce:
    """
    A handler for SIGINT and SIGTERM that interrupts the core once.

    Ctrl-C reaches the whole process group, and then `linkup` sends SIGTERM
    too: the second signal, even one already pending when the first is
    handled, must not interrupt the cleanup that the first started.

    """

    def __init__(self) -> None:
        self.stopping = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            return
        self.stopping = True
        raise KeyboardInterrupt


def _cheaper_log_records() -> None:
    """
    The core logs a line per task at INFO (docs/operations.md, "Logs"). Its
    format shows neither the caller's file and line nor thread or process, so
    skip looking them up for every record (the logging HOWTO's
    "Optimization"): a third of what a line costs.

    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    _cheaper_log_records()
    return_large_buffers_promptly()
    stop_once = _StopOnce()
    signal.signal(signal.SIGINT, stop_once)
    signal.signal(signal.SIGTERM, stop_once)

    try:
        store, spool = open_storage(args)
        snapshot = store.load()
    except StorageError as exc:
        sys.exit(f"linkup-core: {exc}")

    # Ids made by this run carry its instance id, so that a restarted core
    # never hands out an id that an old client still remembers.
    instance = secrets.token_hex(3)
    scheduler = build_scheduler(args, instance)
    scheduler.restore(
        snapshot.sessions, snapshot.tasks, snapshot.workers, time.monotonic()
    )
    metrics = None
    if args.metrics_port:
        registry = new_registry("core")
        metrics = CoreMetrics(registry, lambda: scheduler.counters, ERROR_CODES)
        try:
            # Served from a thread of its own; see metrics.core for what it
            # reads.
            metrics_server = MetricsServer(
                registry, args.metrics_host, args.metrics_port
            )
        except OSError as exc:
            store.close()
            spool.close()
            sys.exit(
                f"linkup-core: cannot serve metrics on "
                f"{args.metrics_host}:{args.metrics_port}: {exc}; choose another "
                "--metrics-port, or 0 for none"
            )
        logging.getLogger("linkup.core").info(
            "metrics on http://%s:%d/metrics", args.metrics_host, args.metrics_port
        )
    context = zmq.Context()
    try:
        server = CoreServer(
            context,
            args.bind,
            scheduler,
            store,
            spool,
            instance=instance,
            check_room=None
            if args.memory
            else partial(
                check_room_for, args.data_dir, min_free_bytes=args.min_free_space
            ),
            heartbeat_interval=args.heartbeat_interval,
            link_timeout=args.link_timeout,
            metrics=metrics,
        )
    except zmq.ZMQError as exc:
        context.destroy(linger=0)
        store.close()
        spool.close()
        sys.exit(f"linkup-core: cannot bind {args.bind}: {exc}")

    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        stop_once.stopping = True
        server.close()
        context.term()
        if metrics is not None:
            metrics_server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
