"""
Settings for the whole test session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Deployment

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


@pytest.fixture
def deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """
    Start real linkup processes; all stopped at teardown, and their logs
    printed if the test failed.

    """
    deployment = Deployment(tmp_path)
    yield deployment
    deployment.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for process in deployment.processes:
            print(f"----- {process.name} log -----\n{process.log()}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[None]:
    # Keep each phase's report on the test item, so that fixtures can print
    # the processes' logs when the test itself failed.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
