"""
Logging setup shared by the three commands: one readable line per event.
"""

from __future__ import annotations

import argparse
import logging

__all__ = ["LEVELS", "add_log_level_option", "configure_logging"]

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def add_log_level_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LEVELS,
        help="least severe level to log to stderr (default: %(default)s)",
    )


def configure_logging(level: str) -> None:
    """
    Send linkup's logs to stderr, one line per event.

    Only the ``linkup`` logger tree is set to ``level``; libraries stay at
    WARNING so that DEBUG shows linkup's messages, not websockets' frames.

    """
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("linkup").setLevel(level)
