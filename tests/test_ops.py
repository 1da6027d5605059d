"""Operating Chorus: metrics on every role, honest readiness, graceful drain, logs, channel stamps.

- In process, embedded default: /metrics on the gateway's port counts connections and
  deliveries; the delivery-latency histogram fills from stamped batches; a gateway that stops
  refuses new posts with ``not_accepted``, answers the ones in flight and closes viewers 1012.
- As users run it, over the real Redis and Kafka: two ``chorus gateway`` processes, a
  coordinator and an archiver (each with its own metrics listener). /readyz says Redis and
  Kafka are reachable, /metrics of every role has its series. Then SIGTERM to one gateway by
  PID while comments flow: it goes not-ready, closes its viewers with 1012, they reconnect to
  the other gateway with ``resume``, and every acknowledged comment is seen exactly once after
  de-duplication by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from clients import aget_json, http_get
from test_processes import Proc, wait_http

from chorus.app import App
from chorus.auth import mint_token
from chorus.config import load_config
from chorus.ingest.consume import ConsumeLoop
from chorus.ingest.coordinator import batch_message
from chorus.ingest.log import MemoryLog
from chorus.ingest.records import Comment
from chorus.ops import configure_logging
from chorus.protocol import pack_channel_message, unpack_channel_message
from services import free_port

KEY = "ops-test-signing-key-0123456789abcdef0123"


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text page (None if absent)."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


class Session:
    """A websockets client that keeps every event, the newest position and the close code."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.events: list[dict[str, Any]] = []
        self.position: tuple[str, int] | None = None
        self.close_code: int | None = None
        self.reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, port: int, stream: str, token: str | None = None) -> Session:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn = await websockets.connect(f"ws://127.0.0.1:{port}/ws?stream={stream}", additional_headers=headers,
                                        subprotocols=["chorus.json.v1"], open_timeout=5)  # type: ignore[list-item]
        s = cls(conn)
        await s.wait(lambda e: e["t"] == "welcome")
        return s

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for msg in self.conn:
                event = json.loads(msg)
                self.events.append(event)
                if event["t"] in ("welcome", "batch") and event.get("epoch"):
                    self.position = (event["epoch"], event["offset"])
        self.close_code = self.conn.close_code

    async def wait(self, match: Any, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events:
                if match(e):
                    return e
            if self.reader.done():
                break
            await asyncio.sleep(0.01)
        raise TimeoutError(f"no matching event; last {self.events[-3:]}, closed {self.close_code}")

    def comment_ids(self) -> list[str]:
        return [c["id"] for e in self.events if e["t"] == "batch" for c in e["comments"]]

    async def close(self) -> None:
        await self.conn.close()
        await self.reader


# ---- in process: the embedded default ----


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[App]:
    config = load_config(env={}, gateway__port=0, data_dir=str(tmp_path), auth__key=KEY,
                         gateway__drain_timeout_s=5.0, limits__user_per_minute=1_000_000)
    app = await App.build(config)
    await app.start()
    yield app
    await app.stop()


async def test_gateway_metrics_page_counts_viewers_and_deliveries(embedded: App) -> None:
    gw = embedded.gateway
    assert gw is not None
    token = mint_token(embedded.config.auth, "u1", "Ann", ["read", "write"])
    viewers = [await Session.open(gw.port, "m1") for _ in range(3)]
    poster = await Session.open(gw.port, "m1", token)
    for i in range(5):
        await poster.conn.send(json.dumps({"t": "comment", "text": f"c{i}", "nonce": str(i)}))
    for v in viewers:
        await v.wait(lambda e, v=v: len(v.comment_ids()) >= 5)
    status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{gw.port}/metrics")
    text = body.decode()
    assert status == 200
    assert metric(text, "chorus_connections") == 4
    assert metric(text, "chorus_streams") == 1
    assert (metric(text, "chorus_comments_out_total") or 0) >= 4 * 5  # the poster views the stream too
    assert (metric(text, "chorus_messages_out_total") or 0) >= 4 * 1 + 5  # welcomes, batches, acks
    assert (metric(text, "chorus_bytes_out_total") or 0) > 0
    assert metric(text, "chorus_dropped_total", reason="slow_viewer") == 0
    assert metric(text, "chorus_published_batches_total") is not None  # `chorus run`: the coordinator too
    # The in-process coordinator stamps its batches: both latencies were observed.
    assert (metric(text, "chorus_delivery_latency_seconds_count") or 0) >= 1
    assert (metric(text, "chorus_pubsub_latency_seconds_count") or 0) >= 1
    assert (metric(text, "chorus_delivery_latency_seconds_bucket", le="1.0") or 0) >= 1
    assert metric(text, "process_resident_memory_bytes")
    status, ready = await aget_json(f"http://127.0.0.1:{gw.port}/readyz")
    assert (status, ready["status"]) == (200, "ready")
    for s in (*viewers, poster):
        await s.close()


async def test_stopping_gateway_answers_posts_in_flight_and_closes_1012(embedded: App) -> None:
    gw = embedded.gateway
    assert gw is not None
    token = mint_token(embedded.config.auth, "u2", "Bo", ["read", "write"])
    poster = await Session.open(gw.port, "d1", token)
    viewer = await Session.open(gw.port, "d1")
    # Posts keep coming while the gateway stops: each one it read is answered (ack, or
    # not_accepted once draining) before the close frame; none is left half-done.
    for i in range(20):
        await poster.conn.send(json.dumps({"t": "comment", "text": f"late {i}", "nonce": str(i)}))
    await poster.wait(lambda e: e["t"] == "ack")
    stopping = asyncio.ensure_future(gw.stop())
    await asyncio.sleep(0)
    assert gw.draining
    await stopping
    assert gw.posts_in_flight() == 0
    for s in (poster, viewer):
        await asyncio.wait_for(s.reader, 5)
        assert s.close_code == 1012
    answers = [e for e in poster.events if e.get("nonce") is not None]
    assert answers and {e["t"] for e in answers} <= {"ack", "error"}
    assert {e["code"] for e in answers if e["t"] == "error"} <= {"not_accepted"}
    assert len({e["nonce"] for e in answers}) == len(answers)  # one answer per post


async def test_posts_during_drain_are_refused_not_accepted(embedded: App) -> None:
    gw = embedded.gateway
    assert gw is not None
    token = mint_token(embedded.config.auth, "u3", "Cy", ["read", "write"])
    poster = await Session.open(gw.port, "d2", token)
    gw.drain_state.draining = gw.drain_state.refusing_posts = True  # as the drain sets them, closing nothing yet
    await poster.conn.send(json.dumps({"t": "comment", "text": "too late", "nonce": "b"}))
    refused = await poster.wait(lambda e: e.get("nonce") == "b")
    assert refused["t"] == "error" and refused["code"] == "not_accepted" and "restarting" in refused["reason"]
    status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{gw.port}/metrics")
    assert metric(body.decode(), "chorus_posts_refused_total", reason="draining") == 1
    status, ready = await aget_json(f"http://127.0.0.1:{gw.port}/readyz")
    assert status == 503 and ready["draining"] == "yes"
    gw.drain_state.draining = gw.drain_state.refusing_posts = False
    await poster.close()


# ---- small pieces ----


def test_channel_message_carries_the_publish_stamp() -> None:
    stamped = unpack_channel_message(pack_channel_message(b'{"t":"batch"}', 41, 3, 1_764_000_000_123_456))
    assert (stamped.event_json, stamped.offset, stamped.count, stamped.published_us) == \
        (b'{"t":"batch"}', 41, 3, 1_764_000_000_123_456)
    plain = unpack_channel_message(pack_channel_message(b'{"t":"batch"}', 41, 3))
    assert (plain.offset, plain.count, plain.published_us) == (41, 3, 0)
    control = unpack_channel_message(pack_channel_message(b'{"t":"mode"}'))
    assert (control.offset, control.published_us) == (None, 0)
    c = Comment(id="7", stream="s", epoch="e", offset=9, user_id="1", user_name="a", badges=(), text="hi", ts=1)
    assert unpack_channel_message(batch_message("s", "e", [c], 5)).published_us == 5
    with pytest.raises(ValueError):
        unpack_channel_message(b"T" + bytes(20))  # a timed header with no event


async def test_consumer_lag_counts_records_not_yet_handled() -> None:
    """chorus_kafka_consumer_lag: the log's end minus the fetch position plus what is in hand."""
    log = MemoryLog(partitions=1)
    for i in range(5):
        await log.append(b"s", str(i).encode())
    gate, handled = asyncio.Event(), []

    async def handle(records: Any) -> None:
        handled.extend(records)
        await gate.wait()

    loop = ConsumeLoop(log.consumer("g"), handle, name="lag-test", max_records=2)
    task = asyncio.create_task(loop.run())
    try:
        while len(handled) < 2:
            await asyncio.sleep(0.01)
        assert await loop.lag() == {0: 5}  # two fetched but in hand, three not fetched
        gate.set()
        while loop.handled < 5:
            await asyncio.sleep(0.01)
        assert await loop.lag() == {0: 0}
        await log.append(b"s", b"late")
        assert await loop.lag() == {0: 1}
    finally:
        loop.stop()
        await asyncio.wait_for(task, 5)


def test_json_logs_are_one_object_per_line() -> None:
    out = io.StringIO()
    configure_logging(load_config(env={}, log_format="json", log_level="INFO"), out)
    try:
        logging.getLogger("chorus.test").info("hello %s", "there")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("chorus.test").exception("it failed")
    finally:
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["msg"] == "hello there" and lines[0]["level"] == "INFO" and lines[0]["logger"] == "chorus.test"
    assert lines[0]["pid"] == os.getpid() and lines[0]["ts"].endswith("Z")
    assert lines[1]["level"] == "ERROR" and "RuntimeError: boom" in lines[1]["exc"]


@pytest.mark.parametrize(("key", "value", "why"), [
    ("log_format", "xml", '"text" or "json"'),
    ("metrics__port", 70000, "between 0 and 65535"),
    ("gateway__drain_timeout_s", -1.0, "0-600"),
])
def test_bad_ops_values_are_refused_naming_the_key(key: str, value: Any, why: str) -> None:
    with pytest.raises(ValueError, match=key.replace("__", ".")) as err:
        load_config(env={}, **{key: value})
    assert why in str(err.value)


def test_config_reference_is_generated_and_current() -> None:
    """docs/config.md is `chorus config --reference`; regenerate it when a key changes."""
    from chorus.config import iter_defaults
    from chorus.configdoc import reference_markdown

    path = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    assert path.read_text() == reference_markdown(), \
        "docs/config.md is stale: run `chorus config --reference > docs/config.md`"
    for key, _default, text in iter_defaults():
        assert text, f"config key {key} has no doc(...) text"
        assert f"`CHORUS_{key.upper().replace('.', '__')}`" in path.read_text()


def test_deploy_configs_load(tmp_path: Path) -> None:
    """The example TOML of deploy/ and the one in the Kubernetes ConfigMap are valid configs."""
    deploy = Path(__file__).resolve().parent.parent / "deploy"
    config = load_config(deploy / "chorus.toml", env={})
    assert config.log_format == "json" and not config.embedded
    lines = (deploy / "k8s" / "configmap.yaml").read_text().splitlines()
    start = lines.index("  chorus.toml: |") + 1
    block = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    (tmp_path / "k8s.toml").write_text("\n".join(block))
    k8s = load_config(tmp_path / "k8s.toml", env={"CHORUS_AUTH__KEY": "k" * 40})
    assert (k8s.metrics.port, k8s.metrics.on_gateway_port, k8s.gateway.host) == (9100, False, "0.0.0.0")
    unit = (deploy / "systemd" / "chorus-gateway@.service").read_text()
    assert "LimitNOFILE=1048576" in unit and "CHORUS_METRICS__PORT=91%i" in unit


# ---- processes on the real Redis and Kafka ----


class Deployment:
    def __init__(self, tmp_path: Path, redis_url: str, kafka_bootstrap: str) -> None:
        self.tmp = tmp_path
        self.cfg = tmp_path / "chorus.toml"
        self.cfg.write_text(
            f'data_dir = "{tmp_path}"\nlog_format = "json"\n[auth]\nkey = "{KEY}"\n'
            f'[kafka]\nbootstrap = "{kafka_bootstrap}"\n'
            f'[redis]\nurl = "{redis_url}"\nchannel_prefix = "o{uuid.uuid4().hex[:6]}:"\n'
            f'[history]\npath = "{tmp_path / "history.sqlite3"}"\n'
            '[gateway]\ndrain_delay_s = 1.0\ndrain_timeout_s = 10.0\n'
            '[metrics]\nprobe_interval_s = 0.5\n[limits]\nuser_per_minute = 1000000\nip_per_minute = 1000000\n'
        )
        self.ports = [free_port(), free_port()]
        self.metrics_ports = {"coordinator": free_port(), "archiver": free_port()}
        self.gateways = [self._start(["gateway", "--port", str(p)], f"gw{i}") for i, p in enumerate(self.ports)]
        self.roles = {role: self._start([role], role, {"CHORUS_METRICS__PORT": str(port)})
                      for role, port in self.metrics_ports.items()}

    def _start(self, args: list[str], name: str, env: dict[str, str] | None = None) -> Proc:
        return Proc([*args, "--config", str(self.cfg)], self.tmp / f"{name}.log", env)

    def all(self) -> list[Proc]:
        return [*self.gateways, *self.roles.values()]

    def token(self, user: str) -> str:
        return mint_token(load_config(self.cfg, env={}).auth, user, user, ["read", "write:comments"])


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, redis_url: str, kafka_bootstrap: str) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("ops"), redis_url, kafka_bootstrap)
    try:
        for port, gw in zip(d.ports, d.gateways, strict=True):
            wait_http(f"http://127.0.0.1:{port}/readyz", gw, timeout=60)
        for role, port in d.metrics_ports.items():
            wait_http(f"http://127.0.0.1:{port}/readyz", d.roles[role], timeout=60)
        yield d
    finally:
        for p in d.all():
            p.stop()


async def warm_up(port: int, token: str) -> None:
    """The coordinator's consumer group may still be joining: the first comment can take seconds."""
    s = await Session.open(port, f"warm-{uuid.uuid4().hex[:6]}", token)
    await s.conn.send(json.dumps({"t": "comment", "text": "warm up", "nonce": "w"}))
    await s.wait(lambda e: e["t"] == "batch", timeout=30)
    await s.close()


@pytest.mark.services
async def test_every_role_serves_metrics_and_says_it_is_ready(deployment: Deployment) -> None:
    d = deployment
    await warm_up(d.ports[0], d.token("warm"))
    for port in d.ports:
        status, ready = await aget_json(f"http://127.0.0.1:{port}/readyz")
        assert status == 200 and ready["redis"] == "ok" and ready["kafka"] == "ok", ready
    status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{d.ports[0]}/metrics")
    gw = body.decode()
    assert status == 200 and (metric(gw, "chorus_delivery_latency_seconds_count") or 0) >= 1
    assert (metric(gw, "chorus_pubsub_latency_seconds_count") or 0) >= 1
    assert metric(gw, "chorus_channel_messages_total", via="pubsub")
    await asyncio.sleep(1.2)  # a probe round refreshes the consumer lag
    for role, group in (("coordinator", "chorus-coordinator"), ("archiver", "chorus-archiver")):
        port = d.metrics_ports[role]
        status, ready = await aget_json(f"http://127.0.0.1:{port}/readyz")
        assert status == 200 and ready["kafka"] == "ok", ready
        status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/metrics")
        text = body.decode()
        lags = [line for line in text.splitlines() if line.startswith(f'chorus_kafka_consumer_lag{{group="{group}"')]
        assert status == 200 and lags, text[-2000:]
        assert metric(text, "process_open_fds")
    coordinator = (await asyncio.to_thread(http_get, f"http://127.0.0.1:{d.metrics_ports['coordinator']}/metrics"))[1]
    assert (metric(coordinator.decode(), "chorus_published_batches_total") or 0) >= 1
    archiver = (await asyncio.to_thread(http_get, f"http://127.0.0.1:{d.metrics_ports['archiver']}/metrics"))[1]
    assert (metric(archiver.decode(), "chorus_archived_comments_total") or 0) >= 1
    assert json.loads(d.gateways[0].output().splitlines()[0])["level"]  # log_format = "json"


@pytest.mark.services
async def test_sigterm_drains_a_gateway_and_viewers_resume_elsewhere_losing_nothing(deployment: Deployment) -> None:
    d = deployment
    token = d.token("poster")
    await warm_up(d.ports[0], token)
    stream = f"drain-{uuid.uuid4().hex[:6]}"
    poster = await Session.open(d.ports[0], stream, token)
    viewer = await Session.open(d.ports[0], stream)
    witness = await Session.open(d.ports[1], stream)  # stays on the other gateway throughout
    acked: dict[str, str] = {}  # nonce -> id
    refused: list[dict[str, Any]] = []
    sent = 0

    async def post_until_closed(s: Session, prefix: str, max_posts: int) -> None:
        nonlocal sent
        for i in range(max_posts):
            if s.reader.done():
                return
            with contextlib.suppress(websockets.ConnectionClosed):
                await s.conn.send(json.dumps({"t": "comment", "text": f"{prefix}{i}", "nonce": f"{prefix}{i}"}))
                sent += 1
            await asyncio.sleep(0.02)

    def collect(s: Session) -> None:
        for e in s.events:
            if e["t"] == "ack":
                acked[e["nonce"]] = e["id"]
            elif e["t"] == "error":
                refused.append(e)

    flow = asyncio.ensure_future(post_until_closed(poster, "a", 1000))
    await poster.wait(lambda e: e["t"] == "ack" and e["nonce"] == "a20", timeout=30)
    gw_a = d.gateways[0]
    os.kill(gw_a.popen.pid, signal.SIGTERM)
    # Not ready within moments (drain_delay_s = 1), while it still serves.
    deadline = time.monotonic() + 0.8
    while (status := (await aget_json(f"http://127.0.0.1:{d.ports[0]}/readyz"))[0]) == 200 \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert status == 503
    await asyncio.wait_for(flow, 30)
    for s in (poster, viewer):
        await asyncio.wait_for(s.reader, 15)
        assert s.close_code == 1012
    assert await asyncio.to_thread(gw_a.popen.wait, 15) == 0, gw_a.output()[-3000:]
    collect(poster)
    assert not [e for e in refused if e["code"] != "not_accepted"], refused

    # Reconnect to the other gateway, resume from the newest position seen, and post more.
    resumed: list[Session] = []
    for old, tok in ((poster, token), (viewer, None)):
        s = await Session.open(d.ports[1], stream, tok)
        assert old.position is not None
        await s.conn.send(json.dumps({"t": "resume", "epoch": old.position[0], "offset": old.position[1]}))
        done = await s.wait(lambda e: e["t"] == "resumed")
        assert done["recovered"] is True
        resumed.append(s)
    await post_until_closed(resumed[0], "b", 10)
    await resumed[0].wait(lambda e: e["t"] == "ack" and e["nonce"] == "b9", timeout=15)
    collect(resumed[0])
    ids = set(acked.values())
    assert len(ids) >= 30 and sent >= len(ids)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not ids <= set(viewer.comment_ids() + resumed[1].comment_ids()):
        await asyncio.sleep(0.1)
    seen = viewer.comment_ids() + resumed[1].comment_ids()
    assert ids <= set(seen), f"lost: {sorted(ids - set(seen))[:5]}"
    assert ids <= set(witness.comment_ids())
    # Exactly once after de-duplication: one comment per id, the text its nonce had.
    by_id = {c["id"]: c["text"] for e in (*viewer.events, *resumed[1].events) if e["t"] == "batch"
             for c in e["comments"]}
    assert {nonce: by_id[i] for nonce, i in acked.items()} == {nonce: nonce for nonce in acked}
    for s in (*resumed, witness):
        await s.close()
