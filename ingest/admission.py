"""Admission of a viewer's comment: checked, numbered, and appended to the log.

Every post, over a WebSocket or ``POST /streams/{id}/comments``, goes through
:meth:`Admission.post_many` (:meth:`Admission.post` is a batch of one), in this order (the
first refusal wins):

1. the token: scope ``write:comments`` (or ``write``), not expired;
2. the text: what the protocol forbids (empty, too long);
3. bans a gateway was told about in the last seconds (Redis only: a banned user's flood
   stays off Redis);
4. the local pre-check (Redis only): the user and address limits in this process's memory;
5. sanctions: banned or timed out on this stream or on every stream;
6. the rate limits and slow mode, all or nothing (ingest/limits.py);
7. the log: the gateway acknowledges a comment only after the log took it (Kafka
   acks=all), so an ``ack`` means the comment will be delivered and stored.

If Redis does not answer (steps 5-6) the post is let through on the local limits alone
(fail open): comments keep flowing through a Redis outage, and Kafka still refuses clearly.

With step 5 (in the same Redis call, or concurrently on the embedded default), ``shadowed``
says which authors are shadow-banned (ingest/reputation.py); their comments are admitted like
any other but marked ``shadow`` in the log: stored, shown only to the author.

Posts that arrive together (one ``hub.drain()`` of a gateway) go together: with Redis, steps 5
and 6 and the shadow-ban check are one script call for the whole batch (each post still
decided atomically, in order: ingest/limits.py), and step 7 hands every record to the
producer and waits for Kafka's confirmations in one task.

The log's two failures are told apart: a record that never left the gateway (Kafka
unreachable, no metadata) is ``not_accepted``, "it was not posted"; one handed to Kafka but not
confirmed within kafka.accept_timeout_ms is ``unconfirmed``, "it may still appear", with the
comment's id so a client that posts it again can drop the first copy if it shows up.

**Retries are idempotent.** A post with a ``nonce`` is remembered for
``limits.nonce_window_s`` under its retry key (user, stream, nonce and text: a nonce reused
for another text is a new post) with its id and state, in this process and, with Redis, in
the admission script's own call (one GET and one SET per post), so every gateway knows it:

- a repeat of an acked post gets ``ack`` with the first id at once, appending nothing;
- a repeat of an ``unconfirmed`` one appends the same record again (same id, text and ts:
  every consumer is idempotent on the comment id) and is answered once the log confirms it;
- a repeat of one still in flight on this gateway waits for its answer and gets the same one;
  one in flight on another gateway is appended again, as an unconfirmed one;
- a post refused before the log (limits, bans, ``not_accepted``) leaves no trace: its retry
  is a new post. Repeats take no rate-limit budget. Posts without a nonce are all new.

Each post is admitted on its own: two posts a client sends faster than a Redis round trip
may finish steps 5-7 in either order (so either may be the one slow mode refuses). Clients
that care wait for each ``ack``; serialising a user's posts here would cap one poster at one
post per Redis round trip.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chorus.auth import Identity
from chorus.codes import ErrorCode
from chorus.config import LimitsConfig
from chorus.errors import ChorusError
from chorus.ids import IdGenerator, IdsUnavailable, id_time_ms
from chorus.ingest.limits import AdmissionLimits, BackendUnavailable, Decision, Poster, Refusal
from chorus.ingest.log import CommentLog, LogUnavailable, LogUnconfirmed, append_many
from chorus.ingest.records import Comment, encode_record
from chorus.protocol import validate_comment_text

__all__ = ["Admission", "Admitted", "FirstPost", "Post", "Refused", "RetryMemory", "retry_key"]

log = logging.getLogger("chorus.admission")

MEMO_MAX = 10_000  # bans remembered at once per gateway
FAIL_OPEN_LOG_INTERVAL_S = 10.0
RETRIES_MAX = 10_000  # posts one process remembers for their retries (Redis remembers the whole window)
JOIN_TIMEOUT_S = 30.0  # a repeat waits this long at most for the first post's answer

# (who, stream, text, ip) or (who, stream, text, ip, nonce)
Post = tuple[Identity | None, str, str, str] | tuple[Identity | None, str, str, str, str | None]


class Refused(ChorusError):
    """The comment was not accepted; ``code`` and ``reason`` go back to the poster."""

    def __init__(self, code: ErrorCode, reason: str, retry_after_ms: int | None = None,
                 comment_id: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.retry_after_ms = retry_after_ms
        self.comment_id = comment_id  # ``unconfirmed`` only: the id the comment has if it appears

    @classmethod
    def of(cls, refusal: Refusal) -> Refused:
        return cls(refusal.code, refusal.reason, refusal.retry_after_ms)


@dataclass(slots=True)
class FirstPost:
    """A post with a nonce on its way to the log, or unconfirmed: its record (to append again
    for a retry) and its answer (for repeats that came while it was in flight)."""

    comment: Comment
    state: str  # "p" in flight, "u" unconfirmed
    expires: float  # monotonic s
    done: asyncio.Future[Comment | Refused]


class RetryMemory:
    """Retry key -> the first post, for ``window_s`` and at most ``max_entries`` (oldest out first):
    a :class:`FirstPost` while in flight or unconfirmed, then only its id once acked (an int,
    whose time says when it expires), so remembering an acked post costs ~150 bytes."""

    def __init__(self, window_s: float, max_entries: int = RETRIES_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._max = max_entries
        self._clock = clock
        self._posts: dict[str, FirstPost | int] = {}

    def __len__(self) -> int:
        return len(self._posts)

    def _expired(self, first: FirstPost | int) -> bool:
        if isinstance(first, int):
            return id_time_ms(first) + self.window_s * 1000 <= time.time_ns() // 1_000_000
        return first.state != "p" and first.expires <= self._clock()

    def get(self, key: str) -> FirstPost | int | None:
        first = self._posts.get(key)
        if first is not None and self._expired(first):
            del self._posts[key]
            return None
        return first

    def in_flight(self, key: str, comment: Comment) -> FirstPost:
        """Remember ``comment`` as on its way to the log (its repeats wait for its answer)."""
        first = FirstPost(comment, "p", self._clock() + self.window_s, asyncio.get_running_loop().create_future())
        self._posts.pop(key, None)
        self._posts[key] = first
        for _ in range(2):  # what expired, from the old end
            oldest = next(iter(self._posts))
            if not self._expired(self._posts[oldest]):
                break
            del self._posts[oldest]
        while len(self._posts) > self._max:
            del self._posts[next(iter(self._posts))]
        return first

    def settle(self, key: str, first: FirstPost, result: Comment | Refused) -> str:
        """Record the log's answer; the outcome for Redis: "a" acked, "u" unconfirmed, "x" not taken."""
        if not first.done.done():
            first.done.set_result(result)
        mine = self._posts.get(key) is first
        if isinstance(result, Comment):
            if mine:
                self._posts[key] = int(first.comment.id)
            return "a"
        if result.code == ErrorCode.UNCONFIRMED:
            first.state = "u"
            return "u"
        if mine:  # never stored: the retry is a new post
            del self._posts[key]
        return "x"


def retry_key(user: str, stream: str, nonce: str, text: str) -> str:
    """What makes a repeat the same post (a digest: fixed length, no separator to confuse)."""
    return hashlib.blake2b(f"{user}\0{stream}\0{nonce}\0{text}".encode(), digest_size=16).hexdigest()


@dataclass(slots=True)
class Admitted:
    """A batch between :meth:`Admission.admit_many` and :meth:`Admission.append_admitted`."""

    results: list[Comment | Refused | None]  # per post: its refusal, or None while it waits for the log
    comments: list[tuple[int, Comment]]  # (index in results, comment) to append
    firsts: dict[int, tuple[str, FirstPost]] = field(default_factory=dict)  # index -> its retry key and memory
    joins: list[tuple[int, FirstPost]] = field(default_factory=list)  # repeats waiting for the first's answer

    def waiting(self) -> list[int]:
        """The posts :meth:`Admission.append_admitted` answers (appended, or waiting for another's answer)."""
        return [i for i, _ in self.comments] + [i for i, _ in self.joins]


class Admission:
    def __init__(self, comment_log: CommentLog, ids: IdGenerator, limits: AdmissionLimits | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = comment_log
        self.ids = ids
        self.limits = limits if limits is not None else AdmissionLimits.in_memory(LimitsConfig(), None)
        self._clock = clock
        self._memo: dict[tuple[str, str], tuple[Refusal, float]] = {}  # (stream, user) -> (refusal, when)
        self._fail_open_logged = -FAIL_OPEN_LOG_INTERVAL_S
        self.accepted = 0
        self.refused = 0
        self.fail_open = 0  # posts let through because Redis did not answer
        self.repeats = 0  # posts that were retries of one before (answered with its id)
        self.retries = RetryMemory(self.limits.retry_window_s, clock=clock)
        self._outcome_tasks: set[asyncio.Task[None]] = set()
        # Which of these users are shadow-banned (ingest/reputation.py); set by the app.
        self.shadowed: Callable[[Sequence[str]], Awaitable[set[str]]] | None = None

    async def post(self, who: Identity | None, stream: str, text: str, ip: str = "",
                   nonce: str | None = None) -> Comment:
        """Append the comment to the log and return it, or raise :class:`Refused`."""
        (result,) = await self.post_many([(who, stream, text, ip, nonce)])
        if isinstance(result, Refused):
            raise result
        return result

    @staticmethod
    def _comment(comment_id: int | str, who: Identity, stream: str, text: str, shadow: bool = False) -> Comment:
        """The comment with that id; its ts is the id's time, so a repeat rebuilds the same record."""
        return Comment(
            id=str(comment_id), stream=stream, user_id=who.user_id, user_name=who.name,
            badges=tuple(who.badges()), text=text, ts=id_time_ms(comment_id), shadow=shadow,
        )

    @staticmethod
    def _no_ids(exc: IdsUnavailable) -> Refused:
        return Refused(ErrorCode.NOT_ACCEPTED, f"comment not accepted: {exc}; it was not posted", retry_after_ms=2000)

    def _mint(self, i: int, who: Identity, poster: Poster, text: str, shadow: bool, admitted: Admitted,
              comment_id: int | None = None) -> None:
        """Add the new comment to append (remembered for its retries), or its refusal if no id can
        be made (the node lease lapsed); a repeat of a post earlier in the batch waits for it."""
        if poster.nonce and self._answer_repeat(i, poster.nonce, who, poster.stream, text, admitted):
            return
        try:
            comment = self._comment(self.ids.next_int() if comment_id is None else comment_id, who, poster.stream,
                                    text, shadow)
        except IdsUnavailable as exc:
            admitted.results[i] = self._no_ids(exc)
            return
        admitted.comments.append((i, comment))
        if poster.nonce:
            admitted.firsts[i] = (poster.nonce, self.retries.in_flight(poster.nonce, comment))

    def _answer_repeat(self, i: int, key: str, who: Identity, stream: str, text: str, admitted: Admitted) -> bool:
        """A post this gateway remembers: answered from memory, joined, or appended again."""
        first = self.retries.get(key)
        if first is None:
            return False
        self.repeats += 1
        if isinstance(first, int):  # acked
            admitted.results[i] = self._comment(first, who, stream, text)
        elif first.state == "p":
            admitted.joins.append((i, first))
        else:  # unconfirmed: the same record again; repeats meanwhile wait for this one
            self._append_again(i, key, first.comment, admitted)
        return True

    def _append_again(self, i: int, key: str, comment: Comment, admitted: Admitted) -> None:
        admitted.comments.append((i, comment))
        admitted.firsts[i] = (key, self.retries.in_flight(key, comment))

    def _repeat_seen_elsewhere(self, i: int, ident: Identity, poster: Poster, text: str, decision: Decision,
                               admitted: Admitted) -> None:
        """A repeat Redis remembers and this gateway does not (another gateway, or before a restart)."""
        assert decision.seen is not None
        first_id, state = decision.seen
        comment = self._comment(first_id, ident, poster.stream, text, decision.shadowed)
        self.repeats += 1
        if state == "a":
            admitted.results[i] = comment
        else:  # unconfirmed, or in flight elsewhere: appending the same record again is harmless
            self._append_again(i, poster.nonce, comment, admitted)

    def _shadow_check(self, users: list[str]) -> asyncio.Task[set[str]] | None:
        """Start asking which ``users`` are shadow-banned, alongside the sanctions' round trip."""
        if self.shadowed is None or not users:
            return None
        return asyncio.ensure_future(self.shadowed(users))

    async def _shadowed_of(self, task: asyncio.Task[set[str]] | None) -> set[str]:
        """The answer, or nobody if the store did not answer (fail open: the comment is shown)."""
        if task is None:
            return set()
        try:
            return await task
        except Exception as exc:
            log.warning("shadow-ban check failed (%s); comments shown as usual", exc)
            return set()

    @staticmethod
    def _log_refusal(comment: Comment, exc: LogUnavailable) -> Refused:
        if isinstance(exc, LogUnconfirmed):
            return Refused(ErrorCode.UNCONFIRMED,
                           f"the comment log did not confirm it in time ({exc}); it may still appear",
                           retry_after_ms=2000, comment_id=comment.id)
        return Refused(ErrorCode.NOT_ACCEPTED, f"comment not accepted: {exc}; it was not posted", retry_after_ms=2000)

    async def post_many(self, posts: Sequence[Post]) -> list[Comment | Refused]:
        """:meth:`post` for each (who, stream, text, ip[, nonce]): per post the comment or its refusal.

        The same checks in the same order as one by one, with one Redis round trip per step
        for the whole batch and one wait for the log's confirmations.
        """
        return await self.append_admitted(await self.admit_many(posts))

    def _retry_key(self, who: Identity, stream: str, text: str, nonce: str | None) -> str:
        if nonce is None or self.retries.window_s <= 0:
            return ""
        return retry_key(who.user_id, stream, nonce, text)

    async def admit_many(self, posts: Sequence[Post]) -> Admitted:
        """Steps 1-6 of :meth:`post_many`: its refusals so far, and the comments to append."""
        results: list[Comment | Refused | None] = [None] * len(posts)
        admitted = Admitted(results, [])
        todo: list[tuple[int, Identity, str, Poster]] = []
        for i, post in enumerate(posts):
            who, stream, text, ip = post[:4]
            try:
                ident, clean = self._check(who, text)
                key = self._retry_key(ident, stream, clean, post[4] if len(post) > 4 else None)
                if key and self._answer_repeat(i, key, ident, stream, clean, admitted):
                    continue
                poster = Poster(stream, ident.user_id, ip, slow_mode_exempt=bool(ident.badges()), nonce=key)
                self._admit_locally(poster)
            except Refused as exc:
                results[i] = exc
                continue
            todo.append((i, ident, clean, poster))
        if todo and self.limits.one_call:
            return await self._admit_in_one_call(todo, admitted)
        shadow = self._shadow_check([ident.user_id for _, ident, _, _ in todo])
        if todo:
            sanctions = self.limits.sanctions
            pairs = [(p.stream, p.user) for _, _, _, p in todo]
            check_many = getattr(sanctions, "check_many", None)
            verdicts = await self._ask_many(
                check_many(pairs) if check_many is not None else _each(sanctions.check, pairs), len(todo))
            todo = _keep_allowed(todo, verdicts, results, remember=self._remember)
        if todo:
            limiter = self.limits.limiter
            posters = [p for _, _, _, p in todo]
            acquire_many = getattr(limiter, "acquire_many", None)
            verdicts = await self._ask_many(
                acquire_many(posters) if acquire_many is not None else _each(limiter.acquire, posters), len(todo))
            todo = _keep_allowed(todo, verdicts, results)
        shadowed = await self._shadowed_of(shadow)
        for i, ident, clean, p in todo:
            self._mint(i, ident, p, clean, ident.user_id in shadowed, admitted)
        return admitted

    async def _admit_in_one_call(self, todo: list[tuple[int, Identity, str, Poster]], admitted: Admitted) -> Admitted:
        """Steps 5-6, repeats and the shadow-ban check in one Redis call (limits, bans, retry keys
        and shadow-bans all in Redis); if Redis does not answer, every post passes, shown as usual.
        Each post's id is made first: the call stores it under the post's retry key."""
        results = admitted.results
        try:
            ids = [self.ids.next_int() for _ in todo]
        except IdsUnavailable as exc:
            for i, *_ in todo:
                results[i] = self._no_ids(exc)
            return admitted
        decisions = await self._ask(self.limits.decide_many([p for *_, p in todo], self.shadowed is not None,
                                                            [str(x) for x in ids]), len(todo))
        for n, (i, ident, clean, poster) in enumerate(todo):
            decision = decisions[n] if decisions is not None else None
            if decision is not None and decision.sanction is not None:
                self._remember(poster, decision.sanction)
                results[i] = Refused.of(decision.sanction)
            elif decision is not None and decision.seen is not None:
                if not self._answer_repeat(i, poster.nonce, ident, poster.stream, clean, admitted):
                    self._repeat_seen_elsewhere(i, ident, poster, clean, decision, admitted)
            elif decision is not None and decision.limit is not None:
                results[i] = Refused.of(decision.limit)
            else:
                shadow = decision is not None and decision.shadowed
                self._mint(i, ident, poster, clean, shadow, admitted, ids[n])
        return admitted

    async def append_admitted(self, admitted: Admitted) -> list[Comment | Refused]:
        """Step 7 of :meth:`post_many`: append what :meth:`admit_many` let through; repeats of a
        post in flight get its answer."""
        results = admitted.results
        if admitted.comments:
            failures = await append_many(self.log, [encode_record(c) for _, c in admitted.comments])
            for (i, comment), failure in zip(admitted.comments, failures, strict=True):
                if failure is None:
                    results[i] = comment
                elif isinstance(failure, LogUnavailable):
                    results[i] = self._log_refusal(comment, failure)
                else:
                    raise failure
            self._settle(admitted)
        for i, first in admitted.joins:
            results[i] = await self._answer_of(first)
        out = [r for r in results if r is not None]
        assert len(out) == len(results)
        accepted = sum(1 for r in out if isinstance(r, Comment))
        self.accepted += accepted
        self.refused += len(out) - accepted
        return out

    def _settle(self, admitted: Admitted) -> None:
        """Remember what became of each post with a nonce; with Redis, tell the other gateways too."""
        outcomes = []
        for i, (key, first) in admitted.firsts.items():
            result = admitted.results[i]
            assert result is not None
            outcomes.append((key, first.comment.id, self.retries.settle(key, first, result)))
        if outcomes and self.limits.nonces is not None:
            task = asyncio.ensure_future(self._record_outcomes(outcomes))
            self._outcome_tasks.add(task)
            task.add_done_callback(self._outcome_tasks.discard)

    async def _record_outcomes(self, outcomes: list[tuple[str, str, str]]) -> None:
        try:
            await self.limits.record_outcomes(outcomes)
        except BackendUnavailable as exc:  # a retry elsewhere then appends the record again: stored once all the same
            log.warning("could not record %d posts' outcomes for their retries: %s", len(outcomes), exc)

    @staticmethod
    async def _answer_of(first: FirstPost) -> Comment | Refused:
        """The answer of the post a repeat joined (in flight when the repeat came)."""
        try:
            return await asyncio.wait_for(asyncio.shield(first.done), JOIN_TIMEOUT_S)
        except TimeoutError:
            return Refused(ErrorCode.UNCONFIRMED, "the first post of this nonce is still on its way; it may still "
                           "appear", retry_after_ms=2000, comment_id=first.comment.id)

    async def _ask_many(self, answer: Awaitable[list[Refusal | None]], n: int) -> list[Refusal | None]:
        """The shared store's answers, or None for each (let them through) if it did not answer."""
        got = await self._ask(answer, n)
        return got if got is not None else [None] * n

    @staticmethod
    def _check(who: Identity | None, text: str) -> tuple[Identity, str]:
        if who is None:
            raise Refused(ErrorCode.UNAUTHORIZED, "posting needs a valid token with the write:comments scope")
        if not who.can_write:  # say which: a client renews an expired token, but not a read-only one
            if time.time() >= who.expires_at:
                raise Refused(ErrorCode.TOKEN_EXPIRED, "the token has expired; get a fresh one and post again")
            raise Refused(ErrorCode.MISSING_SCOPE, "this token may not post: it needs the write:comments scope")
        clean, code, reason = validate_comment_text(text)
        if code is not None or clean is None:
            raise Refused(code or ErrorCode.BAD_MESSAGE, reason)
        return who, clean

    def _admit_locally(self, poster: Poster) -> None:
        """Steps 3-4: in this process's memory, before anything waits."""
        remembered = self._remembered(poster)
        if remembered is not None:
            raise Refused.of(remembered)
        if self.limits.precheck is not None:
            refusal = self.limits.precheck.take(poster)
            if refusal is not None:
                raise Refused.of(refusal)

    async def _ask(self, answer: Awaitable[Any], posts: int = 1) -> Any:
        """The shared store's answer, or None (let it through) if it did not answer."""
        try:
            return await answer
        except BackendUnavailable as exc:
            self.fail_open += posts
            now = self._clock()
            if now - self._fail_open_logged >= FAIL_OPEN_LOG_INTERVAL_S:
                self._fail_open_logged = now
                log.warning("%s; admitting comments on local limits only (%d so far)", exc, self.fail_open)
            return None

    # A ban a gateway was told about, remembered briefly so a banned user's flood is refused
    # here (with the right code) instead of asking Redis each time; an unban reaches this
    # gateway within limits.sanction_memo_s.
    def _remembered(self, poster: Poster) -> Refusal | None:
        entry = self._memo.get((poster.stream, poster.user))
        if entry is None:
            return None
        refusal, when = entry
        elapsed = self._clock() - when
        left_ms = None if refusal.retry_after_ms is None else refusal.retry_after_ms - int(elapsed * 1000)
        if elapsed >= self.limits.sanction_memo_s or (left_ms is not None and left_ms <= 0):
            del self._memo[(poster.stream, poster.user)]
            return None
        return Refusal(refusal.code, refusal.reason, left_ms)

    def _remember(self, poster: Poster, refusal: Refusal) -> None:
        if self.limits.sanction_memo_s <= 0:
            return
        self._memo.pop((poster.stream, poster.user), None)
        self._memo[(poster.stream, poster.user)] = (refusal, self._clock())
        while len(self._memo) > MEMO_MAX:
            del self._memo[next(iter(self._memo))]


def _keep_allowed(todo: list[Any], verdicts: list[Refusal | None], results: list[Any],
                  remember: Callable[[Any, Refusal], None] | None = None) -> list[Any]:
    """The posts no verdict refused; each refused one gets its answer in ``results``."""
    kept = []
    for item, refusal in zip(todo, verdicts, strict=True):
        if refusal is None:
            kept.append(item)
            continue
        if remember is not None:
            remember(item[3], refusal)
        results[item[0]] = Refused.of(refusal)
    return kept


async def _each(ask: Callable[..., Awaitable[Refusal | None]], items: Sequence[Any]) -> list[Refusal | None]:
    """One call per item, in order, for a limiter or sanctions store without a batch method."""
    return [await (ask(*item) if isinstance(item, tuple) else ask(item)) for item in items]
