"""
linkup-core: the scheduler alone, serving bridges over ZeroMQ.
"""

from __future__ import annotations

import argparse
import math
import secrets
import signal
import sys
from types import FrameType

import zmq

from core.scheduler import DEFAULT_MAX_ATTEMPTS, DEFAULT_WORKER_TIMEOUT, Scheduler
from core.server import (
    DEFAULT_BIND,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_LINK_TIMEOUT,
    CoreServer,
)
from linkup import __version__
from linkup.logs import add_log_level_option, configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linkup-core",
        description="Run the linkup scheduler. Bridges connect to it over ZeroMQ.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--bind",
        default=DEFAULT_BIND,
        help="ZeroMQ endpoint for bridges to connect to; tcp://0.0.0.0:PORT "
        "accepts bridges on other machines",
    )
    add_scheduler_options(parser)
    add_link_options(parser)
    add_log_level_option(parser)
    parser.add_argument("--version", action="version", version=__version__)
    return parser


def add_scheduler_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--worker-timeout",
        type=positive_float,
        default=DEFAULT_WORKER_TIMEOUT,
        metavar="SECONDS",
        help="drop a worker silent for this long and requeue its task",
    )
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=DEFAULT_MAX_ATTEMPTS,
        choices=range(1, 101),
        metavar="N",
        help="attempts per task before the master is told it failed",
    )


def add_link_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--heartbeat-interval",
        type=positive_float,
        default=DEFAULT_HEARTBEAT_INTERVAL,
        metavar="SECONDS",
        help="heartbeat interval on the core-bridge link",
    )
    parser.add_argument(
        "--link-timeout",
        type=positive_float,
        default=DEFAULT_LINK_TIMEOUT,
        metavar="SECONDS",
        help="declare the other end of the core-bridge link lost after this "
        "much silence",
    )


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port {value} is not between 1 and 65535")
    return value


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)

    # Ids made by this run carry its instance id, so that a restarted core
    # never hands out an id that an old client still remembers.
    instance = secrets.token_hex(3)
    scheduler = Scheduler(
        instance, max_attempts=args.max_attempts, worker_timeout=args.worker_timeout
    )
    context = zmq.Context()
    try:
        server = CoreServer(
            context,
            args.bind,
            scheduler,
            instance=instance,
            heartbeat_interval=args.heartbeat_interval,
            link_timeout=args.link_timeout,
        )
    except zmq.ZMQError as exc:
        context.destroy(linger=0)
        sys.exit(f"linkup-core: cannot bind {args.bind}: {exc}")

    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        # A second signal (Ctrl-C reaches the whole process group, then
        # `linkup` sends SIGTERM) must not interrupt the cleanup.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.close()
        context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
