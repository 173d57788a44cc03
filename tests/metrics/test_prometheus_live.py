"""
A real split deployment under load, seen through its metrics endpoints and
through a real Prometheus: the expositions pass `promtool check metrics`, and
every query of the Grafana dashboard returns data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import (
    TIMEOUT,
    UNIT,
    Deployment,
    Plugin,
    create_session,
    http_get,
    register_worker,
)
from tests.e2e.protocol_helpers import (
    RESULTS,
    expect_error,
    heartbeat,
    in_background,
    make_task,
    result_url_for,
    submit,
    watching,
)
from tests.metrics.conftest import Prometheus
from tests.metrics.support import (
    Query,
    load_dashboard,
    metric_names,
    queries,
    require_tool,
    substitute,
)

# How long Prometheus may take to pick up targets, scrape them and have
# enough samples for every query.
PROMETHEUS_WITHIN = 3 * TIMEOUT


@dataclass
class Loaded:
    """
    A core and two bridges with clients at work on both bridges.

    """

    core_address: str
    bridge_addresses: list[str]
    #: The clients' work: fails the test if it stops before the test is done.
    background: list[asyncio.Task[Any]]

    @property
    def addresses(self) -> list[str]:
        return [self.core_address, *self.bridge_addresses]


async def _receive(plugin: Plugin, *message_types: str) -> dict[str, Any]:
    """
    The next message of one of ``message_types``, keeping others; no timeout.

    For the background loops: :meth:`Plugin.expect` waits with
    asyncio.wait_for, which on Python 3.11 can swallow the cancellation that
    stops them (bpo-42130) when a message arrives at that moment. The test's
    own waits have deadlines, so a stalled loop still fails it.

    """
    while True:
        for index, message in enumerate(plugin.backlog):
            if message["type"] in message_types:
                return plugin.backlog.pop(index)
        message = json.loads(await plugin.websocket.recv())
        if message["type"] in message_types:
            return message
        if message["type"] != "STATS_UPDATE":  # pushed often; never awaited
            plugin.backlog.append(message)


async def _work(worker: Plugin) -> None:
    # Complete every assignment at once, until cancelled.
    while True:
        task = (await _receive(worker, "TASK_ASSIGNED"))["task"]
        await worker.send(
            "TASK_COMPLETED", taskId=task["id"], resultUrl=f"https://x/{task['id']}"
        )


async def _keep_submitting(master: Plugin, session_id: str) -> None:
    # One file at a time, each awaited to its result, until cancelled.
    number = 0
    while True:
        data = os.urandom(1500 + number % 3000)
        task = make_task(f"load-{number}.png", data)
        await master.send("SUBMIT_TASKS", sessionId=session_id, tasks=[task])
        submitted = await _receive(master, "TASKS_SUBMITTED", "ERROR")
        assert submitted["type"] == "TASKS_SUBMITTED", submitted
        result = await _receive(master, *RESULTS)
        assert result["type"] == "TASK_COMPLETED", result
        number += 1
        # Pace: a few files a second are plenty for rates and quantiles.
        await asyncio.sleep(0.1 * UNIT)


@contextlib.asynccontextmanager
async def loaded_deployment(deployment: Deployment) -> AsyncIterator[Loaded]:
    """
    Start a core with metrics and two bridges, and put them to work: workers
    on both bridges, one on each holding a task; a master on each bridge
    submitting files; a failed attempt that is retried, a submission the core
    refuses, an unknown and a malformed message. The load goes on, and the
    tasks stay held, until the block ends.

    """
    core, endpoint = deployment.core()
    assert core.metrics_port is not None
    _, port_a = deployment.bridge(endpoint)
    _, port_b = deployment.bridge(endpoint)
    url_a, url_b = f"ws://127.0.0.1:{port_a}", f"ws://127.0.0.1:{port_b}"
    plugins: list[Plugin] = []
    try:
        # On each bridge a worker holds a task of that bridge's master to the
        # end: tasks stay active, and both sessions stay open for more files.
        masters = []
        holders = []
        for url in (url_b, url_a):
            holder, _ = await register_worker(url)
            master, session_id, _ = await create_session(url)
            plugins += [holder, master]
            await submit(master, session_id, [make_task("held.png", b"held")])
            await holder.expect("TASK_ASSIGNED")
            masters.append((master, session_id))
            holders.append(holder)
        (master_b, session_b), (master_a, session_a) = masters

        # A worker on A fails its first attempt; the retry comes back to it.
        worker_a, _ = await register_worker(url_a)
        plugins.append(worker_a)
        await submit(master_a, session_a, [make_task("flaky.png", b"flaky")])
        task = (await worker_a.expect("TASK_ASSIGNED"))["task"]
        await worker_a.send("TASK_FAILED", taskId=task["id"], error="HTTP 502")
        again = (await worker_a.expect("TASK_ASSIGNED"))["task"]
        assert again["id"] == task["id"]

        # While it holds the retry, a worker on B is the only one idle: it
        # does a file of B's master, so both bridges carry a whole task.
        worker_b, _ = await register_worker(url_b)
        plugins.append(worker_b)
        await submit(master_b, session_b, [make_task("b.png", b"b")])
        task_b = (await worker_b.expect("TASK_ASSIGNED"))["task"]
        await worker_b.send(
            "TASK_COMPLETED", taskId=task_b["id"], resultUrl=result_url_for(b"b")
        )
        completed = await master_b.expect(*RESULTS)
        assert completed["type"] == "TASK_COMPLETED", completed

        await worker_a.send(
            "TASK_COMPLETED", taskId=task["id"], resultUrl=result_url_for(b"flaky")
        )
        completed = await master_a.expect(*RESULTS)
        assert completed["type"] == "TASK_COMPLETED", completed

        # Refused by the core: no such session.
        await master_a.send(
            "SUBMIT_TASKS", sessionId="s-unknown", tasks=[make_task("x.png", b"x")]
        )
        await expect_error(master_a, "unknown_session")
        # Refused by the bridge: a type it does not know, a message without one.
        await master_a.send("FLY_TO_THE_MOON")
        await expect_error(master_a, "unknown_type")
        await master_a.send_raw('{"taskId": "t-1"}')
        await expect_error(master_a, "invalid_field")

        workers = [*holders, worker_a, worker_b]
        async with in_background(
            *(heartbeat(worker) for worker in workers),
            _work(worker_a),
            _work(worker_b),
            *(_keep_submitting(master, session_id) for master, session_id in masters),
        ) as background:
            yield Loaded(
                f"127.0.0.1:{core.metrics_port}",
                [f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"],
                background,
            )
    finally:
        for plugin in plugins:
            plugin.websocket.close_timeout = UNIT
        await asyncio.gather(
            *(plugin.close() for plugin in plugins), return_exceptions=True
        )


def _scrape(address: str) -> str:
    status, headers, body = http_get(f"http://{address}/metrics", timeout=5)
    assert status == 200, (address, status, body[:500])
    content_type = {k.lower(): v for k, v in headers.items()}["content-type"]
    assert content_type.startswith("text/plain"), (address, content_type)
    return body.decode("utf-8")


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
#: What each scraped address is, in the order of Loaded.addresses.
COMPONENTS = ("core", "bridge", "bridge")


def _samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _unmet(core: Samples, bridge_a: Samples, bridge_b: Samples) -> list[str]:
    """
    What the scraped figures do not show yet of what the load did.

    """
    received = "linkup_websocket_messages_received_total"
    workers = sum(
        _value(core, "linkup_workers", state=state)
        for state in ("idle", "busy", "resting")
    )
    checks = [
        # The core: 4 workers, two holding a task; two open sessions; both
        # bridges; a retry, a refusal, completed files timed.
        ("core: workers == 4", workers, workers == 4),
        *(
            (f"core: {name} >= {least}", value, value >= least)
            for name, labels, least in [
                ("linkup_workers", {"state": "busy"}, 2),
                ("linkup_tasks", {"state": "active"}, 2),
                ("linkup_tasks_ended_total", {"outcome": "completed"}, 5),
                ("linkup_tasks_submitted_total", {}, 7),
                ("linkup_task_retries_total", {}, 1),
                ("linkup_payload_received_bytes_total", {}, 1),
                ("linkup_payload_sent_bytes_total", {}, 1),
                ("linkup_journal_bytes", {}, 1),
                ("linkup_task_queue_wait_seconds_count", {}, 5),
                ("linkup_task_upload_seconds_count", {}, 5),
                ("linkup_task_latency_seconds_count", {}, 5),
            ]
            for value in [_value(core, name, **labels)]
        ),
        *(
            (f"core: {name} {labels} == {exactly}", value, value == exactly)
            for name, labels, exactly in [
                ("linkup_sessions", {"state": "open"}, 2),
                ("linkup_bridges", {}, 2),
                ("linkup_tasks_refused_total", {"reason": "unknown_session"}, 1),
            ]
            for value in [_value(core, name, **labels)]
        ),
        # The bridges: linked, a master and workers on each; A got the
        # failure report, the unknown and the malformed message.
        *(
            (f"bridge {which}: {name} {labels} {op} {bound}", value, ok)
            for which, bridge in (("A", bridge_a), ("B", bridge_b))
            for name, labels, op, bound in [
                ("linkup_core_link_up", {}, "==", 1),
                ("linkup_websocket_connections", {"role": "master"}, "==", 1),
                ("linkup_websocket_connections", {"role": "worker"}, ">=", 1),
                (received, {"type": "SUBMIT_TASKS"}, ">=", 2),
                (received, {"type": "TASK_COMPLETED"}, ">=", 1),
            ]
            for value in [_value(bridge, name, **labels)]
            for ok in [value == bound if op == "==" else value >= bound]
        ),
        *(
            (f"bridge A: {name} {labels} == 1", value, value == 1)
            for name, labels in [
                (received, {"type": "other"}),
                (received, {"type": "invalid"}),
                (received, {"type": "TASK_FAILED"}),
                ("linkup_websocket_errors_sent_total", {"code": "unknown_type"}),
                ("linkup_websocket_errors_sent_total", {"code": "invalid_field"}),
                ("linkup_websocket_errors_sent_total", {"code": "unknown_session"}),
            ]
            for value in [_value(bridge_a, name, **labels)]
        ),
    ]
    return [f"{what} (is {value})" for what, value, ok in checks if not ok]


async def test_metrics_endpoints_pass_promtool_under_load(deployment):
    """All three expositions move with the load and lint clean with promtool."""
    async with loaded_deployment(deployment) as loaded:
        # The core samples its gauges every half second, and the load takes
        # a moment: scrape until the figures show everything, or time is up.
        async def scrape_until_moved() -> tuple[list[str], list[str]]:
            deadline = asyncio.get_running_loop().time() + TIMEOUT
            while True:
                texts = await asyncio.gather(
                    *(asyncio.to_thread(_scrape, a) for a in loaded.addresses)
                )
                for text, component in zip(texts, COMPONENTS, strict=True):
                    labels = _build_labels(_samples(text), component)
                    assert set(labels) == {"component", "version", "python"}
                unmet = _unmet(*(_samples(text) for text in texts))
                if not unmet or asyncio.get_running_loop().time() > deadline:
                    return list(texts), unmet
                await asyncio.sleep(0.1 * UNIT)

        texts, unmet = await watching(loaded.background, scrape_until_moved())
    assert not unmet, "the metrics do not show:\n" + "\n".join(unmet)

    promtool = require_tool("promtool")
    for address, text in zip(loaded.addresses, texts, strict=True):
        checked = await asyncio.to_thread(
            subprocess.run,
            [promtool, "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        # Clean: exit 0 and not a word (lint findings exit 3, with a list).
        output = checked.stdout + checked.stderr
        assert checked.returncode == 0, f"{address}:\n{output}"
        assert not output.strip(), f"{address}:\n{output}"


def _build_labels(samples: Samples, component: str) -> dict[str, str]:
    (labels,) = [
        dict(labels)
        for name, labels in samples
        if name == "linkup_build_info" and dict(labels)["component"] == component
    ]
    return labels


def _finite(samples: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in samples)


async def test_every_dashboard_query_returns_data_from_prometheus(
    deployment, prometheus: Prometheus
):
    """Prometheus scrapes core and bridges; each panel's query has finite data."""
    dashboard_queries = queries(load_dashboard())
    async with loaded_deployment(deployment) as loaded:
        background = loaded.background
        core = loaded.core_address
        bridges = loaded.bridge_addresses

        # The names the panels use are all among what the processes serve.
        texts = await asyncio.gather(
            *(asyncio.to_thread(_scrape, a) for a in loaded.addresses)
        )
        served = {name for text in texts for name, _ in _samples(text)}
        used = set().union(*(metric_names(q.expr) for q in dashboard_queries))
        assert used <= served, sorted(used - served)

        prometheus.add_targets(
            [
                {"targets": [core], "labels": {"job": "linkup-core"}},
                {"targets": bridges, "labels": {"job": "linkup-bridge"}},
            ]
        )
        try:
            await watching(background, _scraped_twice(prometheus, loaded.addresses))
            exprs = [
                (query, substitute(query.expr, core=core, bridge="|".join(bridges)))
                for query in dashboard_queries
            ]
            empty = await watching(background, _until_all_have_data(prometheus, exprs))
        finally:
            prometheus.remove_targets(set(loaded.addresses))
    assert not empty, "dashboard queries without finite data:\n" + "\n".join(empty)


async def _scraped_twice(prometheus: Prometheus, addresses: list[str]) -> None:
    """
    Wait until every address is an up target, scraped at least twice.

    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROMETHEUS_WITHIN
    wanted = {f"http://{address}/metrics" for address in addresses}
    pattern = "|".join(addresses)
    scrapes = f'count_over_time(up{{instance=~"{pattern}"}}[1m]) >= 2'
    while True:
        data = await asyncio.to_thread(prometheus.api, "targets", state="active")
        health = {
            target["scrapeUrl"]: (target["health"], target["lastError"])
            for target in data["activeTargets"]
            if target["scrapeUrl"] in wanted
        }
        if all(health.get(url, ("",))[0] == "up" for url in wanted):
            samples = await asyncio.to_thread(prometheus.query, scrapes)
            scraped = {sample["metric"]["instance"] for sample in samples}
            if scraped == set(addresses):
                return
        if loop.time() > deadline:
            raise AssertionError(
                f"Prometheus at {prometheus.url} did not scrape {addresses} twice "
                f"within {PROMETHEUS_WITHIN}s; its targets: {health}"
            )
        await asyncio.sleep(0.2)


async def _until_all_have_data(
    prometheus: Prometheus, exprs: list[tuple[Query, str]]
) -> list[str]:
    """
    Evaluate every query until each returns a finite value, or time runs out;
    return the queries that never did, with what they last returned.

    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROMETHEUS_WITHIN
    waiting = dict(exprs)
    last: dict[Query, list[dict[str, Any]]] = {}
    while waiting:
        for query, expr in list(waiting.items()):
            last[query] = await asyncio.to_thread(prometheus.query, expr)
            if _finite(last[query]):
                del waiting[query]
        if not waiting or loop.time() > deadline:
            break
        await asyncio.sleep(0.5)
    return [
        f"{query}\n    as {expr}\n    returned {last[query]}"
        for query, expr in waiting.items()
    ]
