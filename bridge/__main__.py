"""
linkup-bridge: plugin WebSockets in front of a linkup core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable

import zmq.asyncio

from bridge.memory import reuse_large_buffers
from bridge.server import Bridge, BridgeOptions
from core.__main__ import add_link_options, byte_size, port_number, positive_float
from linkup import __version__
from linkup.logs import add_log_level_option, configure_logging
from linkup.memory import return_large_buffers_promptly

_DEFAULTS = BridgeOptions()


def add_bridge_options(parser: argparse.ArgumentParser) -> None:
    """
    The WebSocket options, shared with the ``linkup`` command.

    """
    parser.add_argument(
        "--max-message-size",
        type=byte_size,
        default=_DEFAULTS.max_message_size,
        metavar="BYTES",
        help="largest message a client may send, e.g. 1GiB or 512MiB; the "
        "plugin sends a whole batch of files as one message (default: 1GiB)",
    )
    parser.add_argument(
        "--ping-interval",
        type=positive_float,
        default=_DEFAULTS.ping_interval,
        metavar="SECONDS",
        help="WebSocket keepalive ping interval (default: %(default)s)",
    )
    parser.add_argument(
        "--ping-timeout",
        type=positive_float,
        default=_DEFAULTS.ping_timeout,
        metavar="SECONDS",
        help="close a connection whose ping has waited this long for its pong "
        "while no data moved either way (default: %(default)s)",
    )
    parser.add_argument(
        "--max-outbox",
        type=byte_size,
        default=_DEFAULTS.max_outbox_bytes,
        metavar="BYTES",
        help="bytes waiting to be sent to one client, e.g. 64MiB, beyond which "
        "the client is closed as too slow (1008); one larger message is still "
        "sent on its own (default: 64MiB)",
    )
    parser.add_argument(
        "--core-grace",
        type=positive_float,
        default=_DEFAULTS.core_grace,
        metavar="SECONDS",
        help="while the core is away (restarting), keep clients connected this "
        "long so that it can take them back; then close them (default: "
        "%(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linkup-bridge",
        description="Serve plugin WebSockets, the status page, /status and "
        "/metrics, relaying to a linkup core.",
    )
    parser.add_argument(
        "--core",
        default=_DEFAULTS.core,
        help="the core's ZeroMQ endpoint (default: %(default)s)",
    )
    parser.add_argument(
        "--host",
        default=_DEFAULTS.host,
        help="address to listen on (default: %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=port_number,
        default=_DEFAULTS.port,
        help="port for WebSockets and HTTP (default: %(default)s)",
    )
    add_bridge_options(parser)
    add_link_options(parser)
    add_log_level_option(parser)
    parser.add_argument("--version", action="version", version=__version__)
    return parser


async def serve(
    options: BridgeOptions, release_memory: Callable[[], None] | None = None
) -> None:
    context = zmq.asyncio.Context()
    bridge = Bridge(context, options, release_memory=release_memory)
    bridge_task = asyncio.create_task(bridge.run())
    loop = asyncio.get_running_loop()

    def stop() -> None:
        # Once only: a second signal (Ctrl-C reaches the whole process group,
        # then `linkup` sends SIGTERM) must not interrupt the cleanup.
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, lambda: None)
        bridge_task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await bridge_task
    finally:
        context.destroy(linger=0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    # Large buffers are reused while files flow, and given back when idle;
    # where that cannot be set up, each gets pages of its own, as in the core.
    release_memory = reuse_large_buffers()
    if release_memory is None:
        return_large_buffers_promptly()
    options = BridgeOptions(
        core=args.core,
        host=args.host,
        port=args.port,
        max_message_size=args.max_message_size,
        heartbeat_interval=args.heartbeat_interval,
        link_timeout=args.link_timeout,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        max_outbox_bytes=args.max_outbox,
        core_grace=args.core_grace,
    )
    try:
        asyncio.run(serve(options, release_memory))
    except OSError as exc:
        sys.exit(f"linkup-bridge: cannot listen on {args.host}:{args.port}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
