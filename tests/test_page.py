"""The viewer page in a real browser: Debian's Chromium, driven by Playwright (never a
downloaded browser), against the embedded default.

Two viewers in separate browser contexts (their own storage, so two users): they sign in,
post and see each other's comments, react and see the totals, pause and see new comments
counted and then shown, see a pin and a delete, reconnect after the gateway closes every
connection (no duplicates afterwards), and the stream picker lists the stream. A screenshot
of the phone-sized viewer is saved in the test's tmp dir, and copied to
docs/screenshots/viewer.png when CHORUS_SCREENSHOT=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_browser import CHROMIUM, FLAGS
from test_e2e import Env, make_config, started_app
from test_moderation import http

from chorus.auth import mint_token
from chorus.codes import CloseCode
from chorus.protocol import pack_channel_message

playwright_api = pytest.importorskip("playwright.async_api")

ROOT = Path(__file__).resolve().parent.parent
FAST = {"reactions__flush_interval_ms": 100, "reactions__broadcast_interval_ms": 200,
        "viewers__interval_ms": 200, "viewers__ttl_ms": 1000}
WAIT_MS = 5000  # every expectation below must hold within this


@pytest.fixture
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    app = await started_app(make_config(tmp_path, "embedded", request, **FAST))
    yield Env(app)
    await app.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=[f for f in FLAGS if f != "--headless"])
        try:
            yield b
        finally:
            await b.close()


async def open_viewer(browser: Any, url: str, name: str, phone: bool = False) -> Any:
    size = {"width": 390, "height": 780} if phone else {"width": 1100, "height": 800}
    context = await browser.new_context(viewport=size, is_mobile=phone, has_touch=phone)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors
    await page.goto(url)
    await expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
    await page.fill("#name-input", name)
    await page.click("#login")
    await expect(page.locator("#signed-in")).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
    return page


def expect(locator: Any) -> Any:
    return playwright_api.expect(locator)


async def post(page: Any, text: str) -> None:
    await page.fill("#comment-input", text)
    await page.click("#send")
    await expect(page.locator("#comment-input")).to_have_value("", timeout=WAIT_MS)  # cleared on the ack


def comment(page: Any, text: str) -> Any:
    return page.locator("#comments li.comment", has_text=text)


async def moderate(env: Env, path: str, body: dict[str, Any] | None = None) -> Any:
    """The moderator HTTP API (gateway/modapi.py) with a moderator's token: 200 and its answer."""
    token = mint_token(env.app.config.auth, "mod-1", "Mod", ["read"], "moderator")
    status, answer = await http(env.port, "POST", path, token, body)
    assert status == 200, (status, answer)
    return answer


async def publish_control(env: Env, stream: str, event: dict[str, Any]) -> None:
    """A control event on the stream's channel: for ``throttle``, which only the coordinator's
    sampling sends (no API sets it)."""
    await env.app.broker.publish(stream, pack_channel_message(json.dumps(event).encode()))


async def test_two_viewers_post_react_pause_pin_delete_and_reconnect(env: Env, browser: Any, tmp_path: Path) -> None:
    stream = f"page-{uuid.uuid4().hex[:6]}"
    url = f"{env.base}/streams/{stream}"
    ana = await open_viewer(browser, url, "Ana", phone=True)
    ben = await open_viewer(browser, url, "Ben")
    await expect(ana.locator("#stream-name")).to_have_text(f"#{stream}")

    # Post: both see it, with the author's name; the poster's own comment is marked.
    await post(ana, "hello from Ana")
    for page in (ana, ben):
        await expect(comment(page, "hello from Ana")).to_have_count(1, timeout=WAIT_MS)
        await expect(comment(page, "hello from Ana").locator(".author")).to_have_text("Ana")
    await expect(comment(ana, "hello from Ana")).to_have_class(re.compile(r"\bmine\b"))
    await expect(ben.locator("#viewer-count")).to_have_text("2 watching", timeout=WAIT_MS)

    # React: the totals reach the other viewer.
    fire = ana.locator('.reaction-btn[data-emoji="fire"]')
    for _ in range(3):
        await fire.click()
    await expect(ben.locator('.reaction-btn[data-emoji="fire"] .count')).to_have_text("3", timeout=WAIT_MS)
    await expect(ana.locator('.reaction-btn[data-emoji="fire"] .count')).to_have_text("3", timeout=WAIT_MS)

    # Pause: Ben's list holds still while new comments are counted, then shows them on resume.
    await ben.click("#pause")
    await expect(ben.locator("#pause")).to_have_attribute("aria-pressed", "true")
    await post(ana, "while Ben pauses 1")
    await post(ana, "while Ben pauses 2")
    await expect(ben.locator("#held-count")).to_have_text("2 new", timeout=WAIT_MS)
    await expect(comment(ben, "while Ben pauses")).to_have_count(0)
    await ben.click("#pause")
    await expect(comment(ben, "while Ben pauses")).to_have_count(2)

    # A moderator pins and sets slow mode through the API: both viewers show them live.
    first_id = await comment(ana, "hello from Ana").get_attribute("data-id")
    await moderate(env, f"/mod/streams/{stream}/comments/{first_id}/pin")
    for page in (ana, ben):
        await expect(page.locator("#pin .pin-text")).to_have_text("hello from Ana", timeout=WAIT_MS)
        await expect(page.locator("#pin .author")).to_have_text("Ana")
    await moderate(env, f"/mod/streams/{stream}/slow_mode", {"seconds": 30})
    await publish_control(env, stream, {"t": "throttle", "keep_ratio": 0.2})
    for page in (ana, ben):
        await expect(page.locator("#banner")).to_have_text(
            "Slow mode: one comment every 30 s · Busy chat: showing 1 in 5 comments", timeout=WAIT_MS)

    shot = tmp_path / "viewer.png"
    await ana.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("CHORUS_SCREENSHOT") == "1":
        (ROOT / "docs" / "screenshots").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "screenshots" / "viewer.png")

    await moderate(env, f"/mod/streams/{stream}/comments/{first_id}/delete", {"reason": "test"})
    for page in (ana, ben):
        await expect(page.locator(f'li.comment[data-id="{first_id}"]')).to_have_class(re.compile(r"\bdeleted\b"),
                                                                               timeout=WAIT_MS)
        await expect(page.locator(f'li.comment[data-id="{first_id}"] .text')).to_have_text("This comment was removed.")
        await expect(page.locator("#pin")).to_be_hidden()  # the pinned comment was the deleted one

    # The gateway closes every connection (as a drain does): the pages reconnect, resume, and
    # what arrives twice (the welcome's recent comments, the resume) is shown once.
    env.app.gateway.hub.close_all(CloseCode.SERVICE_RESTART, "restarting")  # type: ignore[union-attr]
    env.app.gateway.on_hub_ready()  # type: ignore[union-attr]
    for page in (ana, ben):  # each waits about a second (with jitter) before reconnecting
        await expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting", timeout=WAIT_MS)
    for page in (ana, ben):
        await expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
    await post(ben, "after the reconnect")
    for page in (ana, ben):
        await expect(comment(page, "after the reconnect")).to_have_count(1, timeout=WAIT_MS)
        await expect(comment(page, "while Ben pauses 1")).to_have_count(1)

    # Errors read clearly: a burst of reactions past the limit.
    await ben.evaluate("""() => { const b = document.querySelector('.reaction-btn[data-emoji="heart"]');
                                   for (let i = 0; i < 25; i++) b.click(); }""")
    await expect(ben.locator("#error")).to_contain_text("Slow down: too many reactions", timeout=WAIT_MS)

    # The stream picker at / lists the stream and links to it.
    picker = await ana.context.new_page()
    await picker.goto(env.base + "/")
    link = picker.locator(f'a.live-stream[href="/streams/{stream}"]')
    await expect(link).to_contain_text("2 watching", timeout=WAIT_MS)
    await link.click()
    await expect(picker.locator("#stream-name")).to_have_text(f"#{stream}", timeout=WAIT_MS)
    for page in (ana, ben, picker):
        assert not getattr(page, "js_errors", []), page.js_errors
