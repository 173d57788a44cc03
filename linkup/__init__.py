"""
linkup: pool browser-plugin upload accounts on a LAN.

This package holds the ``linkup`` command, which runs a core and a bridge
together, and what the three commands share.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("linkup")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0.0.0"
