"""The `chorus` command as users run it: separate processes, stopped by their own PIDs.

- `chorus run` on the embedded default serves the page, takes a comment, delivers it and
  keeps it in history, with no Kafka, Redis or config file.
- Scale-out: two `chorus gateway` processes on different ports, one `chorus coordinator` and
  one `chorus archiver`, over the real Redis and Kafka: a comment posted on one gateway
  reaches viewers on both.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from clients import PicowsClient, WebsocketsClient, aget_json, http_get

from chorus.auth import mint_token
from chorus.config import load_config
from services import free_port

KEY = "process-test-key-0123456789abcdef012345"


class Proc:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "chorus.cli", *args], stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.log.close()
        return self.popen.returncode

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_http(url: str, proc: Proc, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(f"process exited early:\n{proc.output()}")
        try:
            if http_get(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not up in {timeout}s:\n{proc.output()}")




async def test_chorus_run_embedded_default(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    run = Proc(["run", "--port", str(port), "--data-dir", str(tmp_path / "data")], tmp_path / "run.log")
    procs.append(run)
    base = f"http://127.0.0.1:{port}"
    await asyncio.to_thread(wait_http, f"{base}/healthz", run)

    status, page = await asyncio.to_thread(http_get, f"{base}/")
    assert status == 200 and b'id="comments"' in page
    status, token = await aget_json(f"{base}/dev/token?name=Zoe")
    assert status == 200 and token["user"]["name"] == "Zoe"

    viewer = await PicowsClient.connect(f"ws://127.0.0.1:{port}/ws?stream=lobby")
    poster = await WebsocketsClient.connect(f"ws://127.0.0.1:{port}/ws?stream=lobby", token["token"])
    for c in (viewer, poster):
        await c.wait_for(lambda e: e["t"] == "welcome")
    await poster.send_json({"t": "comment", "text": "hello from the embedded default", "nonce": "z"})
    ack = await poster.wait_for(lambda e: e["t"] == "ack")
    batch = await viewer.wait_for(lambda e: e["t"] == "batch", timeout=2)
    assert batch["comments"][0]["id"] == ack["id"]
    await asyncio.sleep(0.2)
    status, history = await aget_json(f"{base}/streams/lobby/comments")
    assert [c["text"] for c in history["comments"]] == ["hello from the embedded default"]
    for c in (viewer, poster):
        await c.close()
    assert run.stop() == 0, run.output()
    assert (tmp_path / "data" / "history.sqlite3").exists()
    assert "Chorus archiver, coordinator, gateway, moderator on http://127.0.0.1" in run.output()


def test_role_alone_on_the_embedded_default_is_refused(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "chorus.cli", "gateway", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "embedded default runs every role in one process" in out.stderr


def test_bad_config_is_refused_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "chorus.toml"
    cfg.write_text("[gateway]\nport = -5\n")
    out = subprocess.run([sys.executable, "-m", "chorus.cli", "run", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "gateway.port" in out.stderr


def test_token_command_mints_a_token_the_gateway_accepts(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "chorus.cli", "token", "--user", "42", "--name", "alice",
                          "--scope", "read", "--scope", "write", "--role", "moderator"],
                         capture_output=True, text=True, timeout=30, check=True)
    from chorus.auth import verify_token

    who = verify_token(load_config(env={}).auth, out.stdout.strip())
    assert (who.user_id, who.name, who.role, who.can_write) == ("42", "alice", "moderator", True)


@pytest.mark.services
async def test_two_gateway_processes_share_redis_and_kafka(tmp_path: Path, procs: list[Proc], redis_url: str,
                                                          kafka_bootstrap: str) -> None:
    cfg = tmp_path / "chorus.toml"
    prefix = f"p{uuid.uuid4().hex[:6]}:"
    cfg.write_text(
        f'data_dir = "{tmp_path}"\n[auth]\nkey = "{KEY}"\n[kafka]\nbootstrap = "{kafka_bootstrap}"\n'
        f'[redis]\nurl = "{redis_url}"\nchannel_prefix = "{prefix}"\n'
        f'[history]\npath = "{tmp_path / "history.sqlite3"}"\n'
    )
    ports = [free_port(), free_port()]
    gateways = [Proc(["gateway", "--config", str(cfg), "--port", str(p)], tmp_path / f"gw{p}.log") for p in ports]
    procs += gateways
    procs.append(Proc(["coordinator", "--config", str(cfg)], tmp_path / "coordinator.log"))
    procs.append(Proc(["archiver", "--config", str(cfg)], tmp_path / "archiver.log"))
    for port, gw in zip(ports, gateways, strict=True):
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/healthz", gw)

    config = load_config(cfg, env={})
    token = mint_token(config.auth, "7", "poster", ["read", "write"])
    stream = f"x-{uuid.uuid4().hex[:6]}"
    viewers = [await WebsocketsClient.connect(f"ws://127.0.0.1:{p}/ws?stream={stream}") for p in ports]
    viewers.append(await PicowsClient.connect(f"ws://127.0.0.1:{ports[1]}/ws?stream={stream}"))
    poster = await WebsocketsClient.connect(f"ws://127.0.0.1:{ports[0]}/ws?stream={stream}", token)
    for c in (*viewers, poster):
        await c.wait_for(lambda e: e["t"] == "welcome")

    # The coordinator's consumer group may still be joining: the first comment can take seconds.
    await poster.send_json({"t": "comment", "text": "warm up", "nonce": "w"})
    for v in viewers:
        await v.wait_for(lambda e: e["t"] == "batch", timeout=30)
    sent = time.monotonic()
    await poster.send_json({"t": "comment", "text": "across gateways", "nonce": "x"})
    ack = await poster.wait_for(lambda e: e["t"] == "ack" and e["nonce"] == "x")
    for v in viewers:
        batch = await v.wait_for(lambda e: e["t"] == "batch", timeout=2)
        assert batch["comments"][0]["id"] == ack["id"]
    assert time.monotonic() - sent < 0.5

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _status, page = await aget_json(f"http://127.0.0.1:{ports[1]}/streams/{stream}/comments")
        if len(page["comments"]) == 2:
            break
        await asyncio.sleep(0.1)
    assert [c["text"] for c in page["comments"]] == ["across gateways", "warm up"]
    for c in (*viewers, poster):
        await c.close()
    for p in procs:
        assert p.stop() == 0, p.output()
