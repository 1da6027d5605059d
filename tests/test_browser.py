"""Chromium, a client we did not write, against the gateway: permessage-deflate interop.

Chromium always offers permessage-deflate; the gateway accepts with no context takeover, so
the welcome it sends the page is compressed once by the hub, and Chromium must inflate it to
render the comment.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_e2e import Env, make_config, started_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    app = await started_app(make_config(tmp_path, "embedded", request))
    yield Env(app)
    await app.stop()


async def render_until(url: str, expected: str, attempts: int = 6) -> str:
    """Render until ``expected`` shows: headless Chromium's virtual clock can run out before a
    loopback answer arrives, so a page that is still waiting is loaded again."""
    dom = ""
    for _ in range(attempts):
        dom = await render(url)
        if expected in dom:
            break
    return dom


async def render(url: str, budget_ms: int = 4000) -> str:
    with tempfile.TemporaryDirectory() as profile:
        proc = await asyncio.create_subprocess_exec(
            CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
            "--dump-dom", url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    return out.decode(errors="replace")


async def test_chromium_negotiates_deflate_and_renders_the_comment(env: Env) -> None:
    poster = await env.viewer("browser", env.token("una"))
    text = "hello chromium, this welcome travels compressed"
    await poster.send_json({"t": "comment", "text": text, "nonce": "b"})
    await poster.wait_for(lambda e: e["t"] == "batch")
    hub = env.app.gateway.hub  # type: ignore[union-attr]
    deflated_before = hub.stats()["deflate_calls"]
    dom = await render_until(f"{env.base}/?stream=browser", text)
    assert text in dom, dom[-2000:]
    assert hub.stats()["deflate_calls"] > deflated_before, "Chromium did not get a compressed frame"
    await poster.close()


async def test_chromium_posts_a_compressed_comment_and_gets_the_ack(request: pytest.FixtureRequest,
                                                                  tmp_path: Path) -> None:
    """Chromium compresses what it sends once deflate is negotiated: the hub must inflate it."""
    app = await started_app(make_config(tmp_path, "embedded", request, gateway__allowed_origins=("null",)))
    try:
        env = Env(app)
        token = env.token("chromium")
        text = "posted by chromium " * 20  # long enough that Chromium compresses it
        script = (
            f"const ws = new WebSocket('{env.ws_url('browser-post')}&access_token={token}', ['chorus.json.v1']);"
            f"ws.onopen = () => ws.send(JSON.stringify({{t: 'comment', text: '{text}', nonce: 'b1'}}));"
            "ws.onmessage = (m) => { const e = JSON.parse(m.data);"
            " if (e.t === 'ack' || e.t === 'error')"
            "   document.body.textContent = 'RESULT ' + e.t + ' ' + ws.extensions; };"
        )
        page = tmp_path / "post.html"
        page.write_text(f"<!doctype html><body>waiting<script>{script}</script></body>")
        hub = app.gateway.hub  # type: ignore[union-attr]
        inflated_before = hub.stats()["inflate_calls"]
        dom = await render_until(page.as_uri(), "RESULT ack")
        assert "RESULT ack permessage-deflate" in dom, dom[-500:]
        assert hub.stats()["inflate_calls"] > inflated_before, "Chromium's message was not compressed"
    finally:
        await app.stop()
