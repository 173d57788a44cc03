"""
The live status page in a real browser (Debian's Chromium, driven by
Playwright): what it shows of a batch under way, that it keeps up with the
bridge's pushes, its two languages, and that it shows when the bridge is gone.

Every wait is Playwright's ``expect`` with a timeout: the page must catch up
within it, and the test goes on as soon as it has.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Error as PlaywrightError,
    Page,
    Request,
    WebSocket,
    async_playwright,
    expect,
)

from tests.e2e.harness import UNIT, Deployment, Plugin, free_port, wait_ready
from tests.e2e.protocol_helpers import (
    heartbeat,
    in_background,
    make_task,
    result_url_for,
    submit,
)

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parents[2]

# The page must show a change within a second of the view that carries it;
# views come at most every half second. Generous for a loaded machine.
WITHIN_MS = 5_000 * UNIT

# Filenames are whatever a plugin sends: each would run script if the page
# ever wrote one as HTML.
HOSTILE_NAMES = (
    "<img src=x onerror=window.__xss=1>.png",
    "<script>window.__xss=2</script>.png",
    '"><svg onload=window.__xss=3>.png',
)


def artifacts_dir() -> Path:
    configured = os.environ.get("LINKUP_TEST_ARTIFACTS")
    directory = Path(configured) if configured else REPO / ".artifacts"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def chromium() -> Path:
    """
    Debian's Chromium; the test is skipped without it, except on CI.

    """
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is not installed (Debian: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the status page test: {reason}")
        pytest.skip(reason)
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path, deployment: Deployment) -> AsyncIterator[Browser]:
    """
    A headless Chromium, closed before the deployment stops.

    (It depends on ``deployment`` for that order: a bridge waits for its
    WebSockets' closing handshakes when it stops.)

    """
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


class WatchedPage:
    """
    A page, with every request it made and every error it reported.

    """

    def __init__(self, page: Page) -> None:
        self.page = page
        self.urls: list[str] = []
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        page.on("request", self._on_request)
        page.on("websocket", self._on_websocket)
        page.on("console", self._on_console)
        page.on("pageerror", self._on_page_error)

    @classmethod
    async def open(
        cls, browser: Browser, port: int, **context_options: Any
    ) -> WatchedPage:
        context = await browser.new_context(**context_options)
        watched = cls(await context.new_page())
        await watched.page.goto(f"http://127.0.0.1:{port}/")
        return watched

    def _on_request(self, request: Request) -> None:
        self.urls.append(request.url)

    def _on_websocket(self, websocket: WebSocket) -> None:
        self.urls.append(websocket.url)

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(f"{message.text} at {message.location}")

    def _on_page_error(self, error: PlaywrightError) -> None:
        self.page_errors.append(str(error))

    def foreign_requests(self, port: int) -> list[str]:
        """
        Requests that went anywhere but this bridge: none, on a LAN without
        internet (no CDN, no web fonts).

        """
        foreign = []
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme == "data":
                continue  # the inline icon: no request leaves the page
            if (
                parts.scheme not in ("http", "ws")
                or parts.netloc != f"127.0.0.1:{port}"
            ):
                foreign.append(url)
        return foreign


async def start_linkup(deployment: Deployment) -> tuple[Any, int]:
    # Starting a process blocks until it is ready; keep the loop free.
    return await asyncio.to_thread(deployment.linkup)


async def test_page_follows_a_batch_live_and_shows_filenames_as_text(
    start, browser: Browser
):
    """The page shows a batch's progress, a busy worker's file as plain text,
    and each completion within seconds; it loads nothing from elsewhere."""
    clients = await start()
    port = urlsplit(clients.url).port
    assert port is not None
    worker, worker_id = await clients.worker()
    master, session_id, _ = await clients.master()

    async with in_background(heartbeat(worker)):
        tasks = [
            make_task(name, f"file {index}".encode() * (index + 1) * 1000)
            for index, name in enumerate(HOSTILE_NAMES)
        ]
        await submit(master, session_id, tasks)
        # The worker holds its task until the test answers.
        assigned = (await worker.expect("TASK_ASSIGNED"))["task"]

        watched = await WatchedPage.open(
            browser, port, locale="en-US", viewport={"width": 1280, "height": 900}
        )
        page = watched.page

        await expect(page.get_by_test_id("connection")).to_have_attribute(
            "data-state", "live", timeout=WITHIN_MS
        )
        await expect(page.get_by_test_id("core-link")).to_have_attribute(
            "data-state", "up", timeout=WITHIN_MS
        )
        session = page.locator(
            f'[data-testid="session"][data-session-id="{session_id}"]'
        )
        await expect(session.get_by_test_id("session-count")).to_have_text(
            "0 / 3", timeout=WITHIN_MS
        )
        await expect(session.get_by_test_id("session-progress")).to_have_attribute(
            "aria-valuenow", "0"
        )
        worker_row = page.locator(
            f'[data-testid="worker"][data-worker-id="{worker_id}"]'
        )
        await expect(worker_row).to_have_attribute(
            "data-state", "busy", timeout=WITHIN_MS
        )
        # The name is shown as the very characters sent, and nothing ran.
        await expect(worker_row.get_by_test_id("worker-file")).to_have_text(
            assigned["filename"]
        )
        await expect(page.get_by_test_id("queue-pending")).to_have_text("2")
        await expect(page.get_by_test_id("queue-active")).to_have_text("1")
        await assert_no_markup_ran(page)

        # One done: the page catches up on its own.
        await complete(worker, assigned)
        await expect(session.get_by_test_id("session-count")).to_have_text(
            "1 / 3", timeout=WITHIN_MS
        )
        await expect(page.get_by_test_id("totals-completed")).to_have_text(
            "1", timeout=WITHIN_MS
        )
        assigned = (await worker.expect("TASK_ASSIGNED"))["task"]
        await expect(worker_row.get_by_test_id("worker-file")).to_have_text(
            assigned["filename"], timeout=WITHIN_MS
        )
        await expect(session.get_by_test_id("session-progress")).to_have_attribute(
            "aria-valuenow", "1"
        )
        await page.screenshot(path=artifacts_dir() / "status-page.png", full_page=True)

        # The rest.
        await complete(worker, assigned)
        await complete(worker, (await worker.expect("TASK_ASSIGNED"))["task"])
        await expect(session.get_by_test_id("session-count")).to_have_text(
            "3 / 3", timeout=WITHIN_MS
        )
        await expect(page.get_by_test_id("totals-completed")).to_have_text("3")
        await expect(worker_row).to_have_attribute(
            "data-state", "idle", timeout=WITHIN_MS
        )
        await master.expect("SESSION_COMPLETED")

    await assert_no_markup_ran(page)
    assert watched.foreign_requests(port) == []
    assert any(url.endswith("/status/live") for url in watched.urls), watched.urls
    assert watched.console_errors == []
    assert watched.page_errors == []


async def test_language_follows_the_browser_and_the_switch_is_remembered(
    deployment: Deployment, browser: Browser
):
    """English or Chinese from the browser's languages; the switch button
    changes every label at once and the choice survives a reload."""
    _, port = await start_linkup(deployment)

    watched = await WatchedPage.open(browser, port, locale="en-US")
    page = watched.page
    html = page.locator("html")
    workers_label = page.locator('#workers-title [data-i18n="workers"]')
    switch = page.get_by_test_id("lang-switch")
    await expect(page.get_by_test_id("connection")).to_have_attribute(
        "data-state", "live", timeout=WITHIN_MS
    )
    await expect(html).to_have_attribute("lang", "en")
    await expect(workers_label).to_have_text("Workers")

    await switch.click()
    await expect(html).to_have_attribute("lang", "zh-CN")
    await expect(workers_label).to_have_text("工作者")
    await expect(page.locator('[data-i18n="pending"]')).to_have_text("排队中")
    assert await page.evaluate("localStorage.getItem('linkup.lang')") == "zh"

    await page.reload()
    await expect(html).to_have_attribute("lang", "zh-CN")
    await expect(workers_label).to_have_text("工作者")
    await expect(page.get_by_test_id("connection")).to_have_attribute(
        "data-state", "live", timeout=WITHIN_MS
    )

    await switch.click()
    await expect(html).to_have_attribute("lang", "en")
    await expect(workers_label).to_have_text("Workers")

    # A browser that prefers Chinese gets Chinese without asking.
    chinese = await WatchedPage.open(browser, port, locale="zh-CN")
    await expect(chinese.page.locator("html")).to_have_attribute("lang", "zh-CN")
    await expect(
        chinese.page.locator('#workers-title [data-i18n="workers"]')
    ).to_have_text("工作者")

    for each in (watched, chinese):
        assert each.foreign_requests(port) == []
        assert each.console_errors == []
        assert each.page_errors == []


async def test_page_shows_offline_when_the_bridge_stops_and_recovers(
    deployment: Deployment, browser: Browser
):
    """When the bridge goes away the page says offline (and no longer claims
    a core link); it reconnects by itself when a bridge is back on the port."""
    process, port = await start_linkup(deployment)
    watched = await WatchedPage.open(browser, port, locale="en-US")
    page = watched.page
    connection = page.get_by_test_id("connection")
    core_link = page.get_by_test_id("core-link")
    await expect(connection).to_have_attribute("data-state", "live", timeout=WITHIN_MS)
    await expect(core_link).to_have_attribute("data-state", "up")

    await asyncio.to_thread(process.stop)
    await expect(connection).to_have_attribute(
        "data-state", "offline", timeout=WITHIN_MS
    )
    await expect(core_link).to_have_attribute("data-known", "false")

    # Back on the same port: the page finds it again (its backoff tops out
    # at 5 s).
    restarted = deployment.start(
        f"linkup-{port}-again",
        "-m",
        "linkup",
        str(port),
        "--host",
        "127.0.0.1",
        "--memory",
        "--core-metrics-port",
        str(free_port()),
    )
    await asyncio.to_thread(wait_ready, port, restarted)
    await expect(connection).to_have_attribute(
        "data-state", "live", timeout=WITHIN_MS + 5_000
    )
    await expect(core_link).to_have_attribute("data-state", "up")

    # Failed reconnection attempts are logged by Chromium itself as console
    # errors; only the page's own script must not have failed.
    assert watched.page_errors == []
    assert watched.foreign_requests(port) == []


async def complete(worker: Plugin, task: dict[str, Any]) -> None:
    await worker.send(
        "TASK_COMPLETED", taskId=task["id"], resultUrl=result_url_for(b"")
    )


async def assert_no_markup_ran(page: Page) -> None:
    assert await page.evaluate("() => window.__xss") is None
    # No element came out of a filename: the page itself has no img, script
    # (beyond its two) or svg in its lists.
    injected = await page.evaluate(
        "() => document.querySelectorAll("
        "'#workers img, #workers script, #workers svg,"
        " #sessions img, #sessions script, #sessions svg').length"
    )
    assert injected == 0
