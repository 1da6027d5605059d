"""The viewer page in a real browser: Debian's Chromium, driven by Playwright (never a
downloaded browser), against the embedded default.

Two viewers in separate browser contexts (their own storage, so two users): they sign in,
post and see each other's comments, react and see the totals, pause and see new comments
counted and then shown, see a pin and a delete, reconnect after the gateway closes every
connection (no duplicates afterwards), and the stream picker lists the stream. A screenshot
of the phone-sized viewer is saved in the test's tmp dir, and copied to
docs/screenshots/viewer.png when CHORUS_SCREENSHOT=1.

Then the details: the Pause button covers no comment and the phone header stays readable
while reconnecting; waits (slow mode, rate limits) count down and go, across a reconnect too;
the author of a removed comment is told why, a restored comment comes back in place or in
order, text and names are bidi-isolated; an `unconfirmed` post is sent again with its nonce;
a reconnect says whether the missed comments were recovered, and fills an unrecovered gap
from history.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from clients import WebsocketsClient, aget_json, reply_to
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


async def open_viewer(browser: Any, url: str, name: str, phone: bool = False, cuttable: bool = False) -> Any:
    """A signed-in viewer; ``cuttable``: its WebSockets pass through a route that cut_off closes."""
    size = {"width": 390, "height": 780} if phone else {"width": 1100, "height": 800}
    context = await browser.new_context(viewport=size, is_mobile=phone, has_touch=phone)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors
    page.ws_cut = False
    if cuttable:
        def route(ws: Any) -> None:  # while cut, a connection closes at once (as with no network)
            if page.ws_cut:
                ws.close(code=1013, reason="no network")
            else:
                ws.connect_to_server()
        await page.route_web_socket(re.compile(r"/ws\?"), route)
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
        await expect(page.locator("#pin")).to_be_hidden()  # the pinned comment was the deleted one
    await expect(ben.locator(f'li.comment[data-id="{first_id}"] .text')).to_have_text("This comment was removed.")
    # Ana wrote it: she is told why (the delete carries code "moderator" and a reason).
    await expect(ana.locator(f'li.comment[data-id="{first_id}"] .text')).to_have_text(
        re.compile(r"^Your comment was removed: (removed by a moderator: )?test$"))

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


def fake_comments(stream: str, n: int, first_id: int, prefix: str) -> list[dict[str, Any]]:
    """Comments in the wire shape, for a batch published straight to the stream's channel."""
    return [{"id": str(first_id + i), "stream": stream, "offset": -1, "text": f"{prefix} {i}", "ts": 1764037000123 + i,
             "user": {"id": f"u{i}", "name": f"viewer {i}", "badges": []}} for i in range(n)]


async def cut_off(page: Any, env: Env) -> None:
    """The phone loses its network and the gateway closes its connection: it keeps trying to
    reconnect, and fails, until back_online."""
    page.ws_cut = True
    await page.context.set_offline(True)
    status = page.locator("#status")
    # close_all reaches the connections the hub holds: one still joining (the reconnect a sign-in
    # makes, say) escapes it and goes live a moment later, so close again until the page sees it.
    for _ in range(WAIT_MS // 500):
        env.app.gateway.hub.close_all(CloseCode.SERVICE_RESTART, "restarting")  # type: ignore[union-attr]
        env.app.gateway.on_hub_ready()  # type: ignore[union-attr]
        if await status.get_attribute("data-state") == "reconnecting":
            break
        await asyncio.sleep(0.5)
    await expect(status).to_have_attribute("data-state", "reconnecting", timeout=WAIT_MS)


async def back_online(page: Any) -> None:
    page.ws_cut = False
    await page.context.set_offline(False)  # the page's "online" event: it reconnects at once


OVERLAPS = """() => {
  const pause = document.querySelector('#pause').getBoundingClientRect();
  const list = document.querySelector('#comments').getBoundingClientRect();
  return [...document.querySelectorAll('#comments li.comment')].filter(li => {
    const r = li.getBoundingClientRect();  // the part the list shows (it clips the rest)
    const top = Math.max(r.top, list.top), bottom = Math.min(r.bottom, list.bottom);
    return top < bottom && r.left < pause.right && r.right > pause.left && top < pause.bottom && bottom > pause.top;
  }).map(li => li.dataset.id);
}"""

HEADER = """() => {
  const box = e => document.querySelector(e).getBoundingClientRect();
  const status = document.querySelector('#status'), name = document.querySelector('#stream-name');
  return {name: box('#stream-name'), status: box('#status'), width: window.innerWidth,
          statusCut: status.scrollWidth > status.clientWidth + 1, nameText: name.textContent};
}"""


async def test_phone_layout_pause_never_covers_and_header_stays_readable(env: Env, browser: Any) -> None:
    stream = "the-season-final-of-the-longest-running-show-" + uuid.uuid4().hex[:8]
    ana = await open_viewer(browser, f"{env.base}/streams/{stream}", "Ana", phone=True, cuttable=True)
    await post(ana, "a real comment first")  # a position to resume from
    await expect(ana.locator("#notice")).to_be_hidden()  # signing in reconnects on purpose: nothing to say
    await publish_control(env, stream, {"t": "batch", "stream": stream,
                                        "comments": fake_comments(stream, 40, 10**15, "filler")})
    await expect(ana.locator("#comments li.comment")).to_have_count(41, timeout=WAIT_MS)

    # The Pause button covers no comment, wherever the list is scrolled.
    for where in ("el.scrollHeight", "el.scrollHeight / 2", "0", "el.scrollHeight / 3"):
        await ana.evaluate(f"() => {{ const el = document.querySelector('#comments'); el.scrollTop = {where}; }}")
        assert await ana.evaluate(OVERLAPS) == [], where
    await ana.evaluate("() => { const el = document.querySelector('#comments'); el.scrollTop = el.scrollHeight; }")

    # Reconnecting on a phone: the status is whole, the stream name keeps a readable width, and
    # neither runs into the other or off the screen.
    await cut_off(ana, env)
    header = await ana.evaluate(HEADER)
    assert not header["statusCut"], header
    assert header["name"]["width"] >= 80, header
    assert header["name"]["right"] <= header["status"]["left"] and header["status"]["right"] <= header["width"]
    await expect(ana.locator("#viewer-count")).to_be_hidden()  # stale while not live
    assert await ana.locator("#status").text_content() in {"reconnecting in 1 s", "reconnecting in 2 s",
                                                           "reconnecting in 4 s", "connecting…", "reconnecting…"}

    # Back online: it reconnects at once, resumes, and says the missed comments were recovered.
    await back_online(ana)
    await expect(ana.locator("#status")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
    await expect(ana.locator("#notice")).to_have_text("Reconnected: the comments you missed were recovered.",
                                                      timeout=WAIT_MS)
    assert not ana.js_errors, ana.js_errors


async def test_wait_messages_count_down_and_go_also_across_a_reconnect(env: Env, browser: Any) -> None:
    stream = f"wait-{uuid.uuid4().hex[:6]}"
    ana = await open_viewer(browser, f"{env.base}/streams/{stream}", "Ana", phone=True, cuttable=True)
    await moderate(env, f"/mod/streams/{stream}/slow_mode", {"seconds": 6})
    await expect(ana.locator("#banner")).to_have_text("Slow mode: one comment every 6 s", timeout=WAIT_MS)
    await post(ana, "first within slow mode")
    await ana.fill("#comment-input", "too soon")
    await ana.click("#send")
    error = ana.locator("#error")
    await expect(error).to_have_text(re.compile(r"^Slow mode is on: you can post again in [56] s\.$"), timeout=WAIT_MS)
    await expect(ana.locator("#send")).to_be_disabled()
    await expect(error).to_have_text(re.compile(r"in [34] s\.$"), timeout=WAIT_MS)  # it counts down

    await cut_off(ana, env)
    await back_online(ana)
    await expect(ana.locator("#status")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
    await expect(error).to_have_text(re.compile(r"^Slow mode is on: you can post again in [1-3] s\.$"))
    await expect(error).to_have_text("", timeout=WAIT_MS)  # the wait is over: the message is gone
    await expect(ana.locator("#send")).to_be_enabled()
    await ana.click("#send")
    await expect(comment(ana, "too soon")).to_have_count(1, timeout=WAIT_MS)

    # A rate-limited burst of reactions: the message goes as soon as the wait is over.
    await ana.evaluate("""() => { const b = document.querySelector('.reaction-btn[data-emoji="heart"]');
                                  for (let i = 0; i < 25; i++) b.click(); }""")
    await expect(error).to_contain_text("Slow down: too many reactions", timeout=WAIT_MS)
    await expect(error).to_have_text("", timeout=WAIT_MS)
    assert not ana.js_errors, ana.js_errors


async def test_removed_for_its_author_restored_in_place_and_isolated_text(env: Env, browser: Any) -> None:
    stream = f"restore-{uuid.uuid4().hex[:6]}"
    url = f"{env.base}/streams/{stream}"
    ana = await open_viewer(browser, url, "Ana", phone=True)
    ben = await open_viewer(browser, url, "Ben")
    for text in ("one", "two", "three"):
        await post(ana, text)
    for page in (ana, ben):
        await expect(page.locator("#comments li.comment")).to_have_count(3, timeout=WAIT_MS)
    ids = await ana.eval_on_selector_all("#comments li.comment", "els => els.map(e => e.dataset.id)")
    _status, history = await aget_json(f"{env.base}/streams/{stream}/comments")
    two = next(c for c in history["comments"] if c["id"] == ids[1])

    # The author is told why; everyone else sees the usual line.
    await publish_control(env, stream, {"t": "delete", "id": ids[1], "code": "moderator", "reason": "off topic"})
    await expect(ana.locator(f'li.comment[data-id="{ids[1]}"] .text')).to_have_text(
        "Your comment was removed: off topic", timeout=WAIT_MS)
    await expect(ben.locator(f'li.comment[data-id="{ids[1]}"] .text')).to_have_text(
        "This comment was removed.", timeout=WAIT_MS)

    # Restored: back in its place, no longer struck through.
    await publish_control(env, stream, {"t": "restore", "comment": two})
    for page in (ana, ben):
        li = page.locator(f'li.comment[data-id="{ids[1]}"]')
        await expect(li.locator(".text")).to_have_text(two["text"], timeout=WAIT_MS)
        await expect(li).not_to_have_class(re.compile(r"\bdeleted\b"))
        assert await page.eval_on_selector_all("#comments li.comment", "els => els.map(e => e.dataset.id)") == ids

    # A restored comment that is not on the page goes where its id puts it.
    older = {**two, "id": str(int(ids[0]) + 1), "text": "restored \u202efrom before",
             "user": {"id": "x", "name": "\u202eEve", "badges": []}}
    await publish_control(env, stream, {"t": "restore", "comment": older})
    await expect(comment(ben, "restored")).to_have_count(1, timeout=WAIT_MS)
    order = await ben.eval_on_selector_all("#comments li.comment", "els => els.map(e => e.dataset.id)")
    assert order == [ids[0], older["id"], ids[1], ids[2]]

    # The override inside that one stays inside it: text and names are isolated, direction by content.
    # Ana again, on another device: her comments are marked hers once she signs in.
    other = await (await browser.new_context()).new_page()
    await other.goto(url)
    await expect(comment(other, "three")).to_have_count(1, timeout=WAIT_MS)
    await expect(comment(other, "three")).not_to_have_class(re.compile(r"\bmine\b"))
    await other.fill("#name-input", "Ana")
    await other.click("#login")
    await expect(comment(other, "three")).to_have_class(re.compile(r"\bmine\b"), timeout=WAIT_MS)
    await other.context.close()

    isolation = await ben.eval_on_selector_all("#comments li.comment", """els => els.map(e => {
        const t = e.querySelector('.text'), a = e.querySelector('.author');
        return [t.dir, getComputedStyle(t).unicodeBidi, a.tagName, a.dir, getComputedStyle(a).unicodeBidi]; })""")
    assert all(row == ["auto", "isolate", "BDI", "auto", "isolate"] for row in isolation), isolation
    for page in (ana, ben):
        assert not page.js_errors, page.js_errors


async def test_unconfirmed_comment_is_posted_again_with_its_nonce(env: Env, browser: Any) -> None:
    """The gateway's answer to the first post is replaced (between the real browser and the real
    gateway) by what it sends when Kafka does not confirm in time; the page posts again with the
    same nonce and shows the comment once. New refusal codes read clearly."""
    stream = f"confirm-{uuid.uuid4().hex[:6]}"
    sent: list[dict[str, Any]] = []
    closing: list[asyncio.Future[None]] = []
    refuse = {"bad text": {"code": "bad_text", "reason": "U+0007 at 4"},
              "no scope": {"code": "missing_scope", "reason": "needs write:comments"}}

    def route(ws: Any) -> None:
        server = ws.connect_to_server()

        def from_page(message: str | bytes) -> None:
            event = json.loads(message)
            if event.get("t") != "comment":
                server.send(message)
                return
            sent.append(event)
            first = [e["text"] for e in sent].count(event["text"]) == 1
            if event["text"] in refuse:
                ws.send(json.dumps({"t": "error", "nonce": event["nonce"], **refuse[event["text"]]}))
            elif first:  # the log took it and did not confirm it: it never appears
                wait_ms = 1500 if event["text"] == "worth saying once" else 8000
                ws.send(json.dumps({"t": "error", "code": "unconfirmed", "nonce": event["nonce"], "id": "12345",
                                    "reason": "the comment log did not confirm it in time", "retry_after_ms": wait_ms}))
                if event["text"] == "and then the line dropped":  # close() is a coroutine here
                    closing.append(asyncio.ensure_future(ws.close(code=1012, reason="restarting")))
                    closing.append(asyncio.ensure_future(server.close()))
            else:
                server.send(message)

        ws.on_message(from_page)
        server.on_message(ws.send)

    context = await browser.new_context(viewport={"width": 390, "height": 780})
    page = await context.new_page()
    page.js_errors = []
    page.on("pageerror", lambda exc: page.js_errors.append(str(exc)))
    await page.route_web_socket(re.compile(r"/ws\?"), route)
    await page.goto(f"{env.base}/streams/{stream}")
    await page.fill("#name-input", "Cy")
    await page.click("#login")
    await expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
    await expect(page.locator("#signed-in")).to_be_visible()

    await page.fill("#comment-input", "worth saying once")
    await page.click("#send")
    await expect(page.locator("#error")).to_have_text("Your comment is confirming…", timeout=WAIT_MS)
    await expect(page.locator("#send")).to_have_text("Confirming…")
    await expect(page.locator("#comment-input")).to_have_value("", timeout=WAIT_MS)  # acked on the repost
    await expect(comment(page, "worth saying once")).to_have_count(1, timeout=WAIT_MS)
    await expect(page.locator("#error")).to_have_text("")
    assert [(e["text"], e["nonce"]) for e in sent] == [(sent[0]["text"], sent[0]["nonce"])] * 2

    # Unconfirmed, then the connection drops: the page posts it again (same nonce) as soon as it is
    # back, well before the 8 s the refusal asked to wait.
    await page.fill("#comment-input", "and then the line dropped")
    await page.click("#send")
    await expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting", timeout=WAIT_MS)
    await expect(comment(page, "and then the line dropped")).to_have_count(1, timeout=WAIT_MS)
    again = [e for e in sent if e["text"] == "and then the line dropped"]
    assert len(again) == 2 and again[0]["nonce"] == again[1]["nonce"]
    await expect(page.locator("#comment-input")).to_have_value("")

    for text, shown in (("bad text", "Your comment has characters that cannot be shown (U+0007 at 4)"),
                        ("no scope", "Your sign-in does not allow posting (it needs the write:comments scope)")):
        await page.fill("#comment-input", text)
        await page.click("#send")
        await expect(page.locator("#error")).to_contain_text(shown, timeout=WAIT_MS)
        await expect(page.locator("#comment-input")).to_have_value(text)  # kept, to be fixed and sent again
    assert not page.js_errors, page.js_errors
    await context.close()


@pytest.fixture
async def small_recovery_env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    app = await started_app(make_config(tmp_path, "embedded", request, history__recover_max=1, **FAST))
    yield Env(app)
    await app.stop()


async def test_unrecovered_gap_is_said_and_filled_from_history(small_recovery_env: Env, browser: Any) -> None:
    env = small_recovery_env
    stream = f"gap-{uuid.uuid4().hex[:6]}"
    ana = await open_viewer(browser, f"{env.base}/streams/{stream}", "Ana", phone=True, cuttable=True)
    await post(ana, "before the gap")
    await cut_off(ana, env)
    token = mint_token(env.app.config.auth, "7", "Ben", ["read", "write:comments"])
    ben = await WebsocketsClient.connect(env.ws_url(stream), token)
    await ben.wait_for(lambda e: e["t"] == "welcome")
    for i in range(3):  # more than history.recover_max = 1
        await ben.send_json({"t": "comment", "text": f"missed {i}", "nonce": f"m{i}"})
        await ben.wait_for(reply_to(f"m{i}", ("ack",)))
    await ben.close()
    await back_online(ana)
    await expect(ana.locator("#notice")).to_have_text(
        "Reconnected, but some comments you missed could not be recovered: showing the latest instead.",
        timeout=WAIT_MS)
    for i in range(3):
        await expect(comment(ana, f"missed {i}")).to_have_count(1, timeout=WAIT_MS)
    assert not ana.js_errors, ana.js_errors
