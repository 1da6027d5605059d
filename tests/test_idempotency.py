"""Retries are idempotent (issue 11.6): a repeat of a post's nonce (same user, stream and text,
within limits.nonce_window_s) gets the first post's id and the comment is stored once.

In process with the real in-process log for each rule; then through the real gateway, Kafka
(SIGSTOPped so posts come back ``unconfirmed``), Redis (the memory every gateway shares) and
the archiver's SQLite history, over the WebSocket and ``POST /streams/{id}/comments``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from clients import WebsocketsClient
from test_admission import http_exchange, request
from test_e2e import Env, make_config

from chorus.app import App
from chorus.auth import Identity, mint_token
from chorus.config import LimitsConfig
from chorus.ids import IdGenerator
from chorus.ingest.admission import Admission, Refused
from chorus.ingest.limits import AdmissionLimits
from chorus.ingest.log import LogUnavailable, LogUnconfirmed, MemoryLog
from chorus.ingest.records import Comment

ALICE = Identity("alice", "Alice", frozenset({"read", "write:comments"}))
BOB = Identity("bob", "Bob", frozenset({"read", "write:comments"}))


class FlakyLog(MemoryLog):
    """The in-process log, failing its next appends as told: "unconfirmed" stores the record but
    says it did not confirm (a broker that crashed after writing), "down" stores nothing."""

    def __init__(self) -> None:
        super().__init__(1)
        self.failures: list[str] = []
        self.gate: asyncio.Event | None = None  # set: appends wait for it

    async def append(self, key: bytes, value: bytes) -> None:
        if self.gate is not None:
            await self.gate.wait()
        failure = self.failures.pop(0) if self.failures else None
        if failure == "down":
            raise LogUnavailable("the log is down")
        await super().append(key, value)
        if failure == "unconfirmed":
            raise LogUnconfirmed("no confirmation in time")

    def stored(self) -> list[dict[str, Any]]:
        base, end = self.bounds(0)
        return [json.loads(r.value) for r in self._parts[0].read(base, end - base)]


def admission(log: MemoryLog, **limits: Any) -> Admission:
    return Admission(log, IdGenerator(1), AdmissionLimits.in_memory(LimitsConfig(**limits), None))


async def answer(adm: Admission, who: Identity, text: str, nonce: str | None, stream: str = "s") -> Comment | Refused:
    (result,) = await adm.post_many([(who, stream, text, "10.0.0.1", nonce)])
    return result


async def test_a_repeat_of_an_acked_post_gets_its_id_and_appends_nothing() -> None:
    log = FlakyLog()
    adm = admission(log)
    first = await answer(adm, ALICE, "hello", "n1")
    again = await answer(adm, ALICE, "hello", "n1")
    assert isinstance(first, Comment) and isinstance(again, Comment)
    assert again.id == first.id and again.ts == first.ts and len(log.stored()) == 1 and adm.repeats == 1


async def test_a_repeat_of_an_unconfirmed_post_appends_the_same_record_again() -> None:
    log = FlakyLog()
    log.failures = ["unconfirmed"]
    adm = admission(log)
    first = await answer(adm, ALICE, "are you there", "n1")
    assert isinstance(first, Refused) and first.code == "unconfirmed" and first.comment_id
    again = await answer(adm, ALICE, "are you there", "n1")
    assert isinstance(again, Comment) and again.id == first.comment_id
    stored = log.stored()
    assert len(stored) == 2 and stored[0] == stored[1]  # the same record: consumers keep one (by id)
    assert (await answer(adm, ALICE, "are you there", "n1")).id == first.comment_id  # type: ignore[union-attr]
    assert len(log.stored()) == 2  # acked now: nothing more


async def test_a_post_refused_before_the_log_does_not_pin_its_nonce() -> None:
    log = FlakyLog()
    log.failures = ["down"]
    adm = admission(log, user_per_minute=2)
    first = await answer(adm, ALICE, "try me", "n1")
    assert isinstance(first, Refused) and first.code == "not_accepted"
    again = await answer(adm, ALICE, "try me", "n1")
    assert isinstance(again, Comment) and len(log.stored()) == 1  # admitted as new
    limited = await answer(adm, ALICE, "over the limit", "n2")  # two posts took the budget of two
    assert isinstance(limited, Refused) and limited.code == "rate_limited"
    adm.limits.limiter = AdmissionLimits.in_memory(LimitsConfig(), None).limiter  # the budget is back
    assert isinstance(await answer(adm, ALICE, "over the limit", "n2"), Comment) and len(log.stored()) == 2


async def test_a_repeat_while_the_first_is_in_flight_gets_the_same_answer() -> None:
    log = FlakyLog()
    log.gate = asyncio.Event()
    adm = admission(log)
    first = asyncio.ensure_future(answer(adm, ALICE, "slow one", "n1"))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(answer(adm, ALICE, "slow one", "n1"))
    await asyncio.sleep(0.05)
    assert not first.done() and not second.done()  # the repeat waits for the first
    log.gate.set()
    a, b = await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert isinstance(a, Comment) and isinstance(b, Comment) and a.id == b.id and len(log.stored()) == 1


async def test_repeats_in_one_batch_are_one_post() -> None:
    log = FlakyLog()
    adm = admission(log)
    post = (ALICE, "s", "twice in one drain", "10.0.0.1", "n1")
    results = await adm.post_many([post, post, (BOB, "s", "twice in one drain", "10.0.0.2", "n1")])
    ids = [r.id for r in results if isinstance(r, Comment)]
    assert len(ids) == 3 and ids[0] == ids[1] != ids[2] and len(log.stored()) == 2  # bob's nonce is his own


async def test_a_nonce_for_another_text_or_stream_and_no_nonce_are_new_posts() -> None:
    log = FlakyLog()
    adm = admission(log)
    ids = [await answer(adm, ALICE, "one", "n1"), await answer(adm, ALICE, "two", "n1"),
           await answer(adm, ALICE, "one", "n1", stream="t"), await answer(adm, ALICE, "one", None),
           await answer(adm, ALICE, "one", None)]
    assert len({c.id for c in ids if isinstance(c, Comment)}) == 5 and len(log.stored()) == 5


async def test_the_window_ends_and_the_memory_is_bounded() -> None:
    log = FlakyLog()
    adm = admission(log, nonce_window_s=0.2)
    first = await answer(adm, ALICE, "brief", "n1")
    await asyncio.sleep(0.3)
    later = await answer(adm, ALICE, "brief", "n1")
    assert isinstance(first, Comment) and isinstance(later, Comment) and later.id != first.id
    adm.retries._max = 50
    for n in range(200):
        await answer(adm, BOB, f"c{n}", f"b{n}")
    assert len(adm.retries) <= 50


# -- the real gateway, Kafka, Redis and history -----------------------------------------------


@pytest.fixture
async def apps(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[App]]]:
    started: list[App] = []

    async def start(roles: frozenset[str], **extra: Any) -> App:
        app = await App.build(make_config(tmp_path / f"app{len(started)}", "services", request, **extra), roles)
        started.append(app)
        await app.start()
        return app

    yield start
    for app in reversed(started):
        await app.stop()


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def post_request(stream: str, token: str, body: dict[str, Any]) -> bytes:
    return request(f"/streams/{stream}/comments", json.dumps(body).encode(), token)


async def answers(client: WebsocketsClient, nonces: Sequence[str], timeout: float) -> dict[str, dict[str, Any]]:
    got: dict[str, dict[str, Any]] = {}
    while len(got) < len(nonces):
        event = await client.wait_for(lambda e: e["t"] in ("ack", "error") and e.get("nonce") in nonces,
                                      timeout=timeout)
        got[event["nonce"]] = event
    return got


@pytest.mark.services
async def test_reposts_after_a_stalled_broker_are_stored_once_with_the_first_ids(
        apps: Callable[..., Awaitable[App]], kafka_service: Any, redis_url: str) -> None:
    if kafka_service.external:
        pytest.skip("the broker is not ours to pause")
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    app = await apps(frozenset({"gateway", "archiver"}), kafka__accept_timeout_ms=1000,
                     redis__channel_prefix=prefix)
    env = Env(app)
    stream = f"retry-{uuid.uuid4().hex[:6]}"
    tok = mint_token(app.config.auth, "carol", "Carol", ["read", "write:comments"])
    client = await WebsocketsClient.connect(env.ws_url(stream), tok)
    await client.wait_for(lambda e: e["t"] == "welcome")
    await client.send_json({"t": "comment", "text": "the producer is connected", "nonce": "w0"})
    warm = (await answers(client, ["w0"], 30))["w0"]
    assert warm["t"] == "ack"
    nonces = ["n1", "n2", "n3"]
    os.kill(kafka_service.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(0.2)  # every thread of the broker stopped
        for n in nonces:
            await client.send_json({"t": "comment", "text": f"during the stall {n}", "nonce": n})
        stalled = await answers(client, nonces, 20)
        status, _, body = await http_exchange(env, post_request(stream, tok, {"text": "over http", "nonce": "h1"}))
    finally:
        os.kill(kafka_service.pid, signal.SIGCONT)
    assert all(stalled[n].get("code") == "unconfirmed" and stalled[n]["id"] for n in nonces), stalled
    assert (status, body["error"]) == (504, "unconfirmed")
    first_ids = {n: stalled[n]["id"] for n in nonces} | {"h1": body["id"]}
    # The client does what the README says: post the same nonces and texts again.
    for n in nonces:
        await client.send_json({"t": "comment", "text": f"during the stall {n}", "nonce": n})
    again = await answers(client, nonces, 30)
    status, _, body = await http_exchange(env, post_request(stream, tok, {"text": "over http", "nonce": "h1"}))
    assert {n: (again[n]["t"], again[n]["id"]) for n in nonces} == {n: ("ack", first_ids[n]) for n in nonces}
    assert (status, body["id"]) == (201, first_ids["h1"])
    # A second gateway shares the memory: a repeat of an acked post is answered at once, not appended.
    other = await apps(frozenset({"gateway"}), redis__channel_prefix=prefix)
    status, _, body = await http_exchange(Env(other), post_request(stream, tok, {"text": "over http", "nonce": "h1"}))
    assert (status, body["id"]) == (201, first_ids["h1"]) and other.gateway.admission.repeats == 1  # type: ignore[union-attr]
    await client.send_json({"t": "comment", "text": "the last one", "nonce": "z"})
    last = (await answers(client, ["z"], 30))["z"]["id"]
    store = app.store
    assert store is not None
    await until(lambda: store.comment(stream, last) is not None, 60, "the archiver to store the last comment")
    stored = {c["id"] for c in store.page(stream, None, 100)}
    assert stored == {warm["id"], *first_ids.values(), last} and store.count(stream) == 6  # each exactly once
    await client.close()
