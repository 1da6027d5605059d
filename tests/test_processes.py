"""The `chorus` command as users run it: separate processes, stopped by their own PIDs.

- `chorus run` on the embedded default serves the page, takes a comment, delivers it and
  keeps it in history, with no Kafka, Redis or config file; its flags win over the environment.
- Bound beyond loopback it signs with a random key of its data dir, never the public
  development key; `chorus token --data-dir` mints with the same key.
- The pure-Python twins are announced at start and in /metrics (`chorus_build_info`).
- The CLI's refusals: bad config files (every problem at once), a model that does not import,
  `--ttl 0`, operator commands on the embedded default; and `chorus --version`.
- Scale-out: two `chorus gateway` processes on different ports, one `chorus coordinator` and
  one `chorus archiver`, over the real Redis and Kafka: a comment posted on one gateway
  reaches viewers on both.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from clients import PicowsClient, ViewerClient, WebsocketsClient, aget_json, http_get
from waiting import eventually, eventually_sync, scaled

from chorus import __version__
from chorus.auth import mint_token
from chorus.config import DEV_KEY, AuthConfig, load_config
from chorus.native import CODEC_IMPLEMENTATION, HUB_IMPLEMENTATION
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
                self.popen.wait(scaled(10))
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.log.close()
        return self.popen.returncode

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_http(url: str, proc: Proc, timeout: float = 20) -> None:
    timeout = scaled(timeout)
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




async def http(port: int, method: str, path: str, token: str, body: dict[str, Any]) -> tuple[int, Any]:
    """One JSON request on its own connection (tests/test_moderation.py has the same; it imports this module)."""
    data = json.dumps(body).encode()
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {len(data)}\r\n"
            f"Content-Type: application/json\r\nAuthorization: Bearer {token}\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + data)
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2] or b"null")


async def history_page(base: str, stream: str, at_least: int = 1) -> dict[str, Any] | None:
    """The stream's history page once it holds ``at_least`` comments, else None."""
    status, page = await aget_json(f"{base}/streams/{stream}/comments")
    assert status == 200, page
    return page if len(page["comments"]) >= at_least else None


def chorus(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chorus.cli", *args], capture_output=True, text=True,
                          timeout=scaled(60), env={**os.environ, **(env or {})})


async def test_chorus_run_embedded_default(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    # The flag wins over the environment (which names a port nothing listens on).
    run = Proc(["run", "--port", str(port), "--data-dir", str(tmp_path / "data")], tmp_path / "run.log",
               env={"CHORUS_GATEWAY__PORT": str(free_port())})
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
    history = await eventually(lambda: history_page(base, "lobby"), what="the comment in history")
    assert [c["text"] for c in history["comments"]] == ["hello from the embedded default"]
    status, metrics = await asyncio.to_thread(http_get, f"{base}/metrics")
    assert status == 200
    build = (f'chorus_build_info{{codec="{CODEC_IMPLEMENTATION}",hub="{HUB_IMPLEMENTATION}",'
             f'version="{__version__}"}} 1.0')
    assert build in metrics.decode()
    for c in (viewer, poster):
        await c.close()
    assert run.stop() == 0, run.output()
    assert (tmp_path / "data" / "history.sqlite3").exists()
    assert "Chorus archiver, coordinator, gateway, moderator on http://127.0.0.1" in run.output()


async def test_pure_twins_are_announced_at_start_and_in_metrics(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    run = Proc(["run", "--port", str(port), "--data-dir", str(tmp_path / "data")], tmp_path / "run.log",
               env={"CHORUS_PURE": "1"})
    procs.append(run)
    await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/healthz", run)
    status, metrics = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    assert f'chorus_build_info{{codec="pure",hub="pure",version="{__version__}"}} 1.0' in metrics.decode()
    assert run.stop() == 0, run.output()
    warning = [line for line in run.output().splitlines() if "WARNING" in line and "pure-Python" in line]
    assert len(warning) == 1, run.output()
    assert "hub=pure codec=pure loaded (CHORUS_PURE is set)" in warning[0]
    # `chorus gateway` warns the same way (here before refusing to run alone on the embedded default).
    out = chorus("gateway", "--data-dir", str(tmp_path), env={"CHORUS_PURE": "1"})
    assert out.returncode == 2 and "hub=pure codec=pure loaded" in out.stderr


async def test_run_beyond_loopback_signs_with_a_key_of_its_own(tmp_path: Path, procs: list[Proc]) -> None:
    """The development key is public: bound to 0.0.0.0 `chorus run` makes a random key in the data
    dir (0600) and signs with it, so a moderator token minted with the public key is refused, a
    /dev/token sign-in cannot moderate, and `chorus token --data-dir` of the same dir can."""
    port, data = free_port(), tmp_path / "data"
    run = Proc(["run", "--host", "0.0.0.0", "--port", str(port), "--data-dir", str(data)], tmp_path / "run.log")
    procs.append(run)
    await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/healthz", run)  # reached over loopback only
    key_file = data / "auth.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert len(key_file.read_text().strip()) >= 32
    said = [line for line in run.output().splitlines() if "beyond loopback" in line]
    assert len(said) == 1 and str(key_file) in said[0] and "/dev/token signs in by name only" in said[0]

    slow_mode = "/mod/streams/lobby/slow_mode"
    forged = mint_token(AuthConfig(key=DEV_KEY), "evil", "evil", ["read", "moderate"], "moderator")
    assert (await http(port, "POST", slow_mode, forged, {"seconds": 30}))[0] == 401
    _status, dev = await aget_json(f"http://127.0.0.1:{port}/dev/token?name=Zoe")
    assert (await http(port, "POST", slow_mode, dev["token"], {"seconds": 30}))[0] == 403
    minted = chorus("token", "--data-dir", str(data), "--user", "9", "--role", "moderator")
    assert minted.returncode == 0, minted.stderr
    status, answer = await http(port, "POST", slow_mode, minted.stdout.strip(), {"seconds": 30})
    assert (status, answer["mode"]) == (200, {"slow_mode_seconds": 30})
    assert run.stop() == 0, run.output()

    # The next start reuses the key (tokens stay valid), also on loopback.
    before = key_file.read_text()
    again = Proc(["run", "--port", str(port), "--data-dir", str(data)], tmp_path / "again.log")
    procs.append(again)
    await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/healthz", again)
    assert key_file.read_text() == before
    status, _answer = await http(port, "POST", slow_mode, minted.stdout.strip(), {"seconds": 0})
    assert status == 200
    assert again.stop() == 0, again.output()


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    (tmp_path / "auth.key").write_text("k" * 64)
    (tmp_path / "auth.key").chmod(0o644)
    out = chorus("token", "--data-dir", str(tmp_path), "--user", "1")
    assert out.returncode == 2 and "readable by others (mode 0644)" in out.stderr


def test_role_alone_on_the_embedded_default_is_refused(tmp_path: Path) -> None:
    out = chorus("gateway", "--data-dir", str(tmp_path))
    assert out.returncode == 2
    assert "embedded default runs every role in one process" in out.stderr


def test_cli_refusals_say_what_is_wrong(tmp_path: Path) -> None:
    assert chorus("--version").stdout.startswith(f"chorus {__version__} (hub {HUB_IMPLEMENTATION}, codec ")
    for ttl in ("0", "-5"):
        out = chorus("token", "--user", "1", "--ttl", ttl)
        assert out.returncode == 2 and "--ttl must be a positive number of seconds" in out.stderr
    out = chorus("ban", "lobby", "42", "--data-dir", str(tmp_path))
    assert out.returncode == 2 and "chorus ban: works on a deployment with Redis" in out.stderr
    assert "POST /mod/streams/STREAM/users/USER/ban" in out.stderr and "Traceback" not in out.stderr

    cfg = tmp_path / "chorus.toml"
    cfg.write_text('[gateway]\nport = "8080"\nheartbeat_interval_s = 0\n')
    out = chorus("config", "--config", str(cfg), env={"CHORUS_GATEWY__HOST": "x"})
    assert out.returncode == 2
    assert "chorus: 3 problems in the config:" in out.stderr
    for problem in ("gateway.port: expected int, got '8080' (a string)", "gateway.heartbeat_interval_s: must be",
                    "CHORUS_GATEWY__HOST: not a config key (did you mean CHORUS_GATEWAY__HOST?)"):
        assert problem in out.stderr
    cfg.write_text('[moderation]\nmodel = "no_such_package.models:make"\n')
    out = chorus("config", "--config", str(cfg))
    assert out.returncode == 2 and "moderation.model: cannot import 'no_such_package.models'" in out.stderr
    cfg.write_text('[moderation]\nmodel = "none"\n')
    out = chorus("config", "--config", str(cfg))
    assert out.returncode == 0 and "config OK (embedded default; moderation model none loads)" in out.stdout


def test_bad_config_is_refused_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "chorus.toml"
    cfg.write_text("[gateway]\nport = -5\n")
    out = subprocess.run([sys.executable, "-m", "chorus.cli", "run", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=scaled(30))
    assert out.returncode == 2 and "gateway.port" in out.stderr


def test_token_command_mints_a_token_the_gateway_accepts(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "chorus.cli", "token", "--user", "42", "--name", "alice",
                          "--scope", "read", "--scope", "write", "--role", "moderator", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=scaled(30), check=True)
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
    viewers: list[ViewerClient] = [await WebsocketsClient.connect(f"ws://127.0.0.1:{p}/ws?stream={stream}")
                                   for p in ports]
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

    page = await eventually(lambda: history_page(f"http://127.0.0.1:{ports[1]}", stream, 2),
                            what="both comments in history")
    assert [c["text"] for c in page["comments"]] == ["across gateways", "warm up"]
    for c in (*viewers, poster):
        await c.close()
    for p in procs:
        assert p.stop() == 0, p.output()


def test_sigterm_during_start_up_stops_gracefully(tmp_path: Path) -> None:
    """A SIGTERM while `chorus run` is still starting (its roles built, not yet announced) is
    handled like one later: the app finishes starting, drains and exits 0, never killed by it."""
    proc = Proc(["run", "--port", "0", "--data-dir", str(tmp_path / "data")], tmp_path / "run.log")
    try:
        eventually_sync(lambda: "moderator: model" in proc.output() or proc.popen.poll() is not None,
                        timeout=30, what="the roles being built")
        proc.popen.send_signal(signal.SIGTERM)
        proc.popen.wait(scaled(20))
    finally:
        code = proc.stop()
    assert code == 0, proc.output()
    assert "draining" in proc.output(), proc.output()
