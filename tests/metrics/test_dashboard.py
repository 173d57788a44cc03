"""
The Grafana dashboard, its provisioning files and the example Prometheus
configuration, checked without Grafana: structure, the metric names the
queries use, and PromQL syntax (promtool).
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.registry import CollectorRegistry

from bridge.messages import KNOWN_TYPES, OUTBOUND_TYPES
from core.errors import ERROR_CODES
from core.scheduler import Counters
from metrics.bridge import BridgeMetrics
from metrics.build import new_registry
from metrics.core import CoreMetrics
from tests.metrics.support import (
    DASHBOARD,
    DATASOURCE,
    PROMETHEUS_CONFIG,
    PROVISIONING,
    all_panels,
    load_dashboard,
    metric_names,
    queries,
    require_tool,
    substitute,
    variable_queries,
)

GRID_WIDTH = 24


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def _sample_names(registry: CollectorRegistry) -> dict[str, set[str]]:
    # Family name -> the sample names it exposes. Derived from the type, not
    # from the samples: a labelled metric with no child yet has no samples.
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "unknown": ("",),
        "info": ("_info",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("", "_count", "_sum"),
    }
    families: dict[str, set[str]] = {}
    for family in registry.collect():
        names = {family.name + suffix for suffix in suffixes[family.type]}
        names.update(sample.name for sample in family.samples)
        families[family.name] = names
    return families


@pytest.fixture(scope="module")
def exposed() -> dict[str, set[str]]:
    """
    Every metric family that the core and the bridge expose, with its sample
    names, from registries built as the two processes build theirs.

    """
    core = new_registry("core")
    CoreMetrics(core, Counters, ERROR_CODES)
    bridge = new_registry("bridge")
    BridgeMetrics(bridge, KNOWN_TYPES, OUTBOUND_TYPES, ERROR_CODES)
    return {**_sample_names(core), **_sample_names(bridge)}


def _all_sample_names(exposed: dict[str, set[str]]) -> set[str]:
    return set(itertools.chain.from_iterable(exposed.values()))


def _walk(node: Any, path: str = "$") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{path}[{index}]")


# The dashboard as a file for provisioning.


def test_dashboard_is_in_the_provisionable_form(dashboard):
    """Stable uid, no id, Grafana 11's schema, not the export-for-sharing form."""
    assert dashboard["uid"] == "linkup-overview"
    assert dashboard["id"] is None
    assert dashboard["schemaVersion"] == 39
    assert dashboard["title"]
    assert "__inputs" not in dashboard
    assert "__requires" not in dashboard
    assert "__elements" not in dashboard
    assert "${DS_" not in DASHBOARD.read_text(encoding="utf-8")


def test_datasource_is_chosen_through_a_variable(dashboard):
    """One template variable of type datasource, for Prometheus data sources."""
    variables = dashboard["templating"]["list"]
    names = [variable["name"] for variable in variables]
    assert len(names) == len(set(names)), names
    (datasource,) = [v for v in variables if v["type"] == "datasource"]
    assert datasource["name"] == "datasource"
    assert datasource["query"] == "prometheus"


def test_every_prometheus_query_uses_the_datasource_variable(dashboard):
    """Panels, their targets and query variables all name ${datasource}."""
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel.get("datasource") == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE, (panel["title"], target)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]
    # Nowhere else either: only Grafana's own annotations may differ.
    for path, node in _walk(dashboard):
        if isinstance(node, dict) and "datasource" in node:
            datasource = node["datasource"]
            if isinstance(datasource, dict) and datasource.get("type") == "grafana":
                continue
            assert datasource == DATASOURCE, path


def test_panel_ids_are_unique(dashboard):
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert all(isinstance(panel_id, int) for panel_id in ids), ids
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"duplicate panel ids {duplicates}"


def test_panels_have_a_place_on_the_grid_and_do_not_overlap(dashboard):
    cells: dict[tuple[int, int], str] = {}
    for panel in all_panels(dashboard):
        grid = panel.get("gridPos")
        assert grid is not None, f"{panel['title']} has no gridPos"
        assert all(isinstance(grid.get(key), int) for key in "hwxy"), panel["title"]
        assert grid["w"] > 0, panel["title"]
        assert grid["h"] > 0, panel["title"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= GRID_WIDTH, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                other = cells.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{other!r} overlaps {panel['title']!r}"


def test_rows_hold_panels_only_when_collapsed(dashboard):
    """Grafana keeps a row's panels inside it only while it is collapsed."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            assert panel["collapsed"] or not panel["panels"], panel["title"]
        else:
            assert "panels" not in panel, panel["title"]


def test_every_panel_has_queries_with_distinct_ref_ids(dashboard):
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), (panel["title"], ref_ids)
        for target in panel["targets"]:
            assert isinstance(target["expr"], str), (panel["title"], target)
            assert target["expr"].strip(), (panel["title"], target)


# Metric names.


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('sum(linkup_workers{instance=~"$core", state="busy"})', {"linkup_workers"}),
        (
            'histogram_quantile(0.95, sum by (le) (rate(a_bucket{x=~"b|c"}[5m])))',
            {"a_bucket"},
        ),
        (
            "rate(cpu_total[1m]) * on (job, instance) group_left (component) info",
            {"cpu_total", "info"},
        ),
        ("time() - start_seconds", {"start_seconds"}),
        ("a / clamp_min(sum(b), 1e3) > bool 0", {"a", "b"}),
        ("sum without (le) (x offset 5m) or vector(0)", {"x"}),
        ('label_values(linkup_build_info{component="core"}, instance)', None),
    ],
)
def test_metric_names_are_found_in_promql(expr, names):
    if names is None:  # label_values(metric, label): the label is no metric
        assert "linkup_build_info" in metric_names(expr)
    else:
        assert metric_names(expr) == names


def test_queries_use_only_metrics_that_linkup_exposes(dashboard, exposed):
    """Every metric name in a panel or variable query is one the processes serve."""
    served = _all_sample_names(exposed)
    unknown = []
    for query in queries(dashboard):
        names = metric_names(query.expr)
        assert names, f"no metric in {query}"
        unknown += [f"{name} in {query}" for name in sorted(names - served)]
    for expr in variable_queries(dashboard):
        # label_values(selector, label): the second argument is a label.
        selector = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr)
        assert selector is not None, expr
        names = metric_names(selector.group(1))
        assert names, expr
        unknown += [f"{name} in {expr}" for name in sorted(names - served)]
    assert not unknown, "\n".join(["metrics linkup does not expose:", *unknown])


def test_every_linkup_metric_is_on_the_dashboard(dashboard, exposed):
    """No linkup_* metric is left off the dashboard."""
    used = set().union(*(metric_names(query.expr) for query in queries(dashboard)))
    missing = sorted(
        family
        for family, names in exposed.items()
        if family.startswith("linkup_") and not names & used
    )
    assert not missing, f"linkup metrics without a panel: {missing}"


def test_quantiles_come_from_the_rate_of_histogram_buckets(dashboard, exposed):
    histograms = {
        family
        for family, names in exposed.items()
        if {f"{family}_bucket", f"{family}_sum"} <= names
    }
    quantiles = [q for q in queries(dashboard) if "histogram_quantile" in q.expr]
    assert quantiles
    for query in quantiles:
        assert re.search(r"rate\(\w+_bucket\{", query.expr), str(query)
        assert re.search(r"by \((?:[\w, ]*\b)?le\b", query.expr), str(query)
        (name,) = metric_names(query.expr)
        assert name.removesuffix("_bucket") in histograms, str(query)
    covered = {
        name.removesuffix("_bucket")
        for query in quantiles
        for name in metric_names(query.expr)
    }
    for family in (
        "linkup_task_queue_wait_seconds",
        "linkup_task_upload_seconds",
        "linkup_task_latency_seconds",
    ):
        assert family in covered, family


# promtool.


def test_example_prometheus_config_passes_promtool():
    output = promtool_check("config", PROMETHEUS_CONFIG)
    assert "SUCCESS" in output, output


def test_every_query_parses_as_promql(dashboard, tmp_path: Path):
    """Each panel's expr, as a recording rule, passes `promtool check rules`."""
    all_queries = queries(dashboard)
    rules = [
        {
            "record": f"linkup_dashboard:panel_{query.panel_id}:{query.ref_id}",
            "expr": substitute(query.expr, core=".+", bridge=".+"),
        }
        for query in all_queries
    ]
    for rule in rules:
        assert "$" not in rule["expr"], rule
    # JSON is YAML: no YAML writer needed.
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    output = promtool_check("rules", path)
    assert f"SUCCESS: {len(rules)} rules found" in output, output


def promtool_check(what: str, path: Path) -> str:
    """Run `promtool check WHAT PATH`, require success, return what it said."""
    promtool = require_tool("promtool")
    checked = subprocess.run(
        [promtool, "check", what, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0, output
    return output


# Provisioning files.


def test_datasource_provisioning_is_valid():
    path = PROVISIONING / "datasources" / "linkup.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert config["apiVersion"] == 1
    (datasource,) = config["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["name"]
    assert re.fullmatch(r"[\w-]{1,40}", datasource["uid"]), datasource["uid"]
    assert datasource["access"] in ("proxy", "direct")
    assert re.match(r"https?://", datasource["url"]), datasource["url"]
    assert set(datasource) <= {
        "name",
        "type",
        "uid",
        "access",
        "url",
        "isDefault",
        "editable",
        "jsonData",
        "orgId",
        "version",
        "basicAuth",
        "withCredentials",
        "secureJsonData",
        "database",
        "user",
    }, datasource


def test_datasource_time_interval_is_the_example_scrape_interval():
    """$__rate_interval needs the scrape interval that prometheus.yml sets."""
    datasources = yaml.safe_load(
        (PROVISIONING / "datasources" / "linkup.yaml").read_text(encoding="utf-8")
    )
    prometheus = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    (datasource,) = datasources["datasources"]
    interval = prometheus["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == interval


def test_dashboard_provisioning_is_valid_and_documents_its_path():
    path = PROVISIONING / "dashboards" / "linkup.yaml"
    text = path.read_text(encoding="utf-8")
    config = yaml.safe_load(text)
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["name"]
    assert provider["type"] == "file"
    directory = provider["options"]["path"]
    assert directory.startswith("/"), directory
    comments = "\n".join(
        line for line in text.splitlines() if line.lstrip().startswith("#")
    )
    # The comments tell where to put the dashboard: that very directory.
    assert directory.rstrip("/") + "/" in comments, comments
    assert DASHBOARD.name in comments, comments
    assert isinstance(provider["options"].get("foldersFromFilesStructure"), bool)
    assert isinstance(provider.get("updateIntervalSeconds", 10), int)
