"""
Settings for the whole test session.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_data_home: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    # Every linkup a test starts without --data-dir keeps its queue under
    # $XDG_DATA_HOME: point it at a directory of the session's own, never at
    # the user's real data.
    global _data_home
    _data_home = tempfile.mkdtemp(prefix="linkup-test-data-")
    os.environ["XDG_DATA_HOME"] = _data_home


def pytest_unconfigure(config: pytest.Config) -> None:
    if _data_home is not None:
        shutil.rmtree(_data_home, ignore_errors=True)
