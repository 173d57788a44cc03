"""
Helpers for the metrics tests: the Grafana dashboard's queries and promtool.

Not a test module: pytest does not collect it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "metrics" / "grafana" / "dashboards" / "linkup.json"
PROVISIONING = REPO / "metrics" / "grafana" / "provisioning"
PROMETHEUS_CONFIG = REPO / "metrics" / "prometheus" / "prometheus.yml"
START_PROMETHEUS = REPO / ".ci" / "start-prometheus"

#: What every Prometheus query of the dashboard must name as its data source.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def in_ci() -> bool:
    """
    Whether the CI environment variable is set: a missing tool then fails.

    """
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_tool(name: str) -> str:
    """
    The path of the command ``name``; skip the test without it, fail in CI.

    """
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not on PATH (Debian: apt-get install prometheus)"
        if in_ci():
            pytest.fail(f"{message}; CI is set, so this is an error")
        pytest.skip(message)
    return path


# The dashboard.


def load_dashboard() -> dict[str, Any]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(dashboard, dict)
    return dashboard


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """
    Every panel, rows included, and the panels inside collapsed rows.

    """

    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    return list(walk(dashboard["panels"]))


@dataclass(frozen=True)
class Query:
    """
    One target of one panel.

    """

    panel_id: int
    panel_title: str
    ref_id: str
    expr: str

    def __str__(self) -> str:
        return f"panel {self.panel_id} {self.panel_title!r} {self.ref_id}: {self.expr}"


def queries(dashboard: dict[str, Any]) -> list[Query]:
    return [
        Query(panel["id"], panel["title"], target["refId"], target["expr"])
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    """
    The PromQL of the dashboard's query variables (``label_values(...)``).

    """
    found = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        found.append(query["query"] if isinstance(query, dict) else query)
    return found


# Grafana's built-in variables, given values that suit a Prometheus scraping
# every second (.ci/start-prometheus) and a test lasting a few seconds.
BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}

_VARIABLE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def substitute(expr: str, **values: str) -> str:
    """
    ``expr`` with Grafana's variables replaced as Grafana would: built-ins by
    :data:`BUILTINS`, the dashboard's own (``$core``, ``$bridge``) by
    ``values``. An unknown variable is an error.

    """

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group is not None)
        if name in values:
            return values[name]
        if name in BUILTINS:
            return BUILTINS[name]
        raise KeyError(f"no value for Grafana variable ${name} in {expr}")

    return _VARIABLE.sub(replace, expr)


# Metric names in PromQL, found without a PromQL parser: strings, label
# matchers, ranges and label lists are cut out first, and what remains of
# names, functions and keywords is told apart by what follows them.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)"
)
_NAME = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
    }
)


def metric_names(expr: str) -> set[str]:
    """
    The metric names that the PromQL ``expr`` selects.

    Names given as ``{__name__="..."}`` are not found: the dashboard does not
    use that form.

    """
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _LABEL_LIST.sub("", text)
    return {name for name in _NAME.findall(text) if name.lower() not in _KEYWORDS}
