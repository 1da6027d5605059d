"""The moderator: reads the comments log in its own consumer group and moderates in batches.

Never on the delivery path: a comment reaches viewers first (the coordinator reads the same
log in another group) and is moderated a moment later. If the moderator is stopped, comments
keep flowing (fail open); when it is back it resumes from its committed offset and catches
up, and :attr:`Moderator.lag_ms` says how far behind it is.

Per batch (``moderation.batch_size`` records, ``linger_ms`` to fill it):

1. **Rules** (ingest/rules.py): the blocklist through its normalisation, and the spam rules.
   A hit is deleted (stage ``rules`` or ``spam``, score 1).
   **Context** (ingest/context.py, ``context_rules``): what the comment is aimed at. A threat,
   sexual harassment or a scam (``context_deletes``) is deleted (stage ``context``).
2. **Model** (ingest/model.py), one call for the batch, read with the context: a menace, an
   insult or hostility aimed at a person is deleted at ``delete_at`` (the model and the words agree),
   else borderline; another comment aimed at a person is borderline at ``flag_at``; one that
   nothing corroborates only at ``model_alone_flag_at``, and never when its hot words are all
   harmless idioms ("kill the boss", "I hate mondays"). The model alone never deletes.
   With ``context_rules`` off: ``delete_at`` deletes, ``flag_at`` is borderline.
3. **Reputation** (ingest/reputation.py), one round trip for the batch's borderline authors:
   a repeat offender's borderline comment is shadowed and the author shadow-banned
   (``shadow_ban_s``); anyone else's is flagged for review. An automatic shadow-ban enters
   the review queue (stage ``reputation``) with the offences that led to it, so a moderator
   sees it and can lift it.

Only confident offences count against an author: automatic deletes (every one of which a
rule, or the model and the context together, decided) and a moderator's delete. Flags and
shadows count nothing: a fan whose "I hate mondays" was flagged is not one step closer to a
shadow-ban.

Then the effects, in this order, and only then is the batch committed (so a crash repeats
them, and each is idempotent):

- deletes and shadows are appended to the log as control records (ingest/records.py), in the
  stream's order: the coordinator sends ``{"t":"delete","id":...,"code":"moderated","reason":...}``
  (the reason a short sentence for the author: "removed by automatic moderation: threat aimed
  at a person") to every viewer and takes the comment out of the recent cache, the archiver
  turns it into a tombstone in history;
- the authors' confident offences are added (each delete 1), shadow-bans set;
- every decision but accept (and accepts too with ``record_accepts``) is written to
  ``moderation_actions`` with its stage, score and reason; flags enter the review queue, and
  so do deletes, as resolved items a moderator may restore.

Stages 1 and 2 are CPU work: where a gateway shares the event loop (``chorus run``) they run
in a worker thread; a moderator process of its own (``chorus moderator``) runs them on the
loop, which spares the handing of the GIL back and forth with the Kafka fetcher. A batch
whose effects fail is retried with the decisions already made, so the spam rules' memory
counts each comment once. Authors with an exempt badge
(broadcaster, moderator) and comments already shadowed are not moderated.

Metrics (attributes, read by /metrics, chorus/metrics.py): ``lag_s`` (the age of the oldest
comment of the batch being moderated, else how old the newest moderated comment was when its
batch was done: ``chorus_moderation_lag_seconds``), ``queue_depth`` (flagged comments waiting
in the review queue: ``chorus_moderation_queue_depth``), ``handled``, ``batches``,
``decisions`` (a Counter of (action, stage)), ``stage_seconds`` (rules+model, effects), and
:meth:`consumer_lag` (records of the log not yet moderated; /metrics has it per partition as
``chorus_kafka_consumer_lag{group="chorus-moderator"}``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from chorus.codes import DeleteCode
from chorus.config import ModerationConfig
from chorus.ingest.consume import ConsumeLoop
from chorus.ingest.context import Context, read_context
from chorus.ingest.log import CommentLog, LogRecord, append_many
from chorus.ingest.model import ScoreCache, ToxicityModel
from chorus.ingest.records import Comment, Control, RecordError, decode_any, encode_control
from chorus.ingest.reputation import Reputation
from chorus.ingest.rules import Blocklist, SpamRules, deleet, fold, join_spaced
from chorus.ingest.store import ModerationAction, ReviewItem, SqliteStore

__all__ = ["AUTOMATIC", "GROUP", "OFFENCE_WEIGHT", "Decision", "Moderator", "Pipeline"]

log = logging.getLogger("chorus.moderator")

GROUP = "chorus-moderator"
ACTOR = "moderator"  # the ``by`` of automatic decisions
OFFENCE_WEIGHT = 1.0  # of each confident delete; flags and shadows add nothing
AUTOMATIC = "removed by automatic moderation"  # how a delete event's reason starts


@dataclass(frozen=True, slots=True)
class Decision:
    comment: Comment
    action: str  # accept, delete, shadow, flag; "borderline" between stages 2 and 3
    stage: str  # rules, spam, context, model, reputation ("" for accept without a model)
    score: float | None
    reason: str  # for moderators (moderation_actions): the rule, or the model's score
    public: str = ""  # for the author and viewers (the delete event): what kind of offence
    confident: bool = False  # counts against the author's reputation

    def action_row(self) -> ModerationAction:
        c = self.comment
        return ModerationAction(c.stream, self.action, self.stage, c.id, c.user_id, self.score, self.reason, ACTOR)

    @property
    def event_reason(self) -> str:
        """The delete event's reason: a short sentence the author can read."""
        return f"{AUTOMATIC}: {self.public or 'offensive language'}"


class Pipeline:
    """Stages 1, 1b and 2 (sans-I/O), and stage 3 given the authors' scores."""

    def __init__(self, cfg: ModerationConfig, model: ToxicityModel | None) -> None:
        self.cfg = cfg
        self.model = model
        self.scores = ScoreCache(model) if model is not None else None
        self.blocklist = Blocklist(cfg.blocklist, cfg.allowlist)
        self.spam = SpamRules(cfg.spam_repeats, cfg.spam_window_s, cfg.max_links, cfg.link_posts_per_window)
        self.exempt = frozenset(cfg.exempt_badges)
        self.context_deletes = frozenset(cfg.context_deletes)

    def moderated(self, c: Comment) -> bool:
        """Comments the pipeline looks at: not already shadowed, not by an exempt author."""
        return not c.shadow and self.exempt.isdisjoint(c.badges)

    def classify(self, comments: Sequence[Comment]) -> list[Decision]:
        """Stages 1, 1b and 2 over a batch, in order; borderline ones wait for :meth:`settle`."""
        decided: list[Decision | None] = []
        normalised: list[str] = []
        contexts: list[Context | None] = []
        for c in comments:
            folded = fold(c.text)
            norm = join_spaced(folded)
            normalised.append(norm)
            decision, context = self._by_rules(c, folded, norm)
            decided.append(decision)
            contexts.append(context)
        todo = [i for i, d in enumerate(decided) if d is None]
        if self.scores is None:
            for i in todo:
                decided[i] = self._without_model(comments[i], contexts[i])
            return [d for d in decided if d is not None]
        scores = self.scores.score([comments[i].text for i in todo], [deleet(normalised[i]) for i in todo])
        for i, score in zip(todo, scores, strict=True):
            decided[i] = self._by_score(comments[i], score, contexts[i])
        return [d for d in decided if d is not None]

    def _by_rules(self, c: Comment, folded: str, norm: str) -> tuple[Decision | None, Context | None]:
        """Stages 1 and 1b: a delete on a rule, or None and the comment's context for stage 2."""
        entry = self.blocklist.match(norm)
        if entry is not None:
            return Decision(c, "delete", "rules", 1.0, f"blocklist: {entry.strip('*')}", "blocked word", True), None
        spam = self.spam.check(c.stream, c.user_id, c.ts, folded)
        if spam is not None:
            return Decision(c, "delete", "spam", 1.0, spam.reason, spam.reason, True), None
        if not self.cfg.context_rules:
            return None, None
        context = read_context(c.text)
        if context.category in self.context_deletes:
            return Decision(c, "delete", "context", 1.0, f"context: {context.reason}", context.reason, True), context
        return None, context

    def _without_model(self, c: Comment, context: Context | None) -> Decision:
        if context is not None and context.category:
            return Decision(c, "borderline", "context", None, f"context: {context.reason}", context.reason)
        return Decision(c, "accept", "", None, "")

    def _by_score(self, c: Comment, score: float, context: Context | None) -> Decision:
        rounded = round(score, 4)
        name = self.model.name if self.model is not None else "model"
        cfg = self.cfg
        if context is None:  # context rules off: the model's thresholds alone
            if score >= cfg.delete_at:
                return Decision(c, "delete", "model", rounded, f"{name}: score {rounded:.2f} >= {cfg.delete_at}")
            if score >= cfg.flag_at:
                return Decision(c, "borderline", "model", rounded, f"{name}: score {rounded:.2f} >= {cfg.flag_at}")
            return Decision(c, "accept", "model", rounded, "")
        if context.category:  # a menace, an insult or hostility (threats and the like were deleted)
            if score >= cfg.delete_at:
                return Decision(c, "delete", "model", rounded,
                                f"{name}: score {rounded:.2f} >= {cfg.delete_at}; context: {context.reason}",
                                context.reason, True)
            return Decision(c, "borderline", "context", rounded, f"context: {context.reason}", context.reason)
        threshold = cfg.flag_at if context.aimed else cfg.model_alone_flag_at
        if score >= threshold and not context.idiom:
            aimed = "aimed at a person" if context.aimed else "nothing else agrees"
            return Decision(c, "borderline", "model", rounded, f"{name}: score {rounded:.2f} >= {threshold}; {aimed}")
        return Decision(c, "accept", "model", rounded, "")

    def settle(self, decisions: list[Decision], offence_scores: dict[str, float]) -> list[Decision]:
        """Stage 3: a borderline comment is shadowed if its author is a repeat offender, else flagged."""
        out = []
        for d in decisions:
            if d.action == "borderline":
                score = offence_scores.get(d.comment.user_id, 0.0)
                if score >= self.cfg.repeat_offender_at:
                    d = Decision(d.comment, "shadow", "reputation", d.score,
                                 f"{d.reason}; repeat offender (offence score {score:.1f})", d.public)
                else:
                    d = Decision(d.comment, "flag", d.stage, d.score, d.reason, d.public)
            out.append(d)
        return out


class Moderator:
    def __init__(self, comment_log: CommentLog, store: SqliteStore | None, reputation: Reputation,
                 cfg: ModerationConfig, model: ToxicityModel | None, offload: bool = True) -> None:
        self.log = comment_log
        self.offload = offload  # classify in a worker thread (the event loop serves a gateway too)
        self.store = store
        self.reputation = reputation
        self.cfg = cfg
        self.pipeline = Pipeline(cfg, model)
        # Moderation may trail delivery by a moment: fuller fetches cost the broker less CPU.
        self.consumer = comment_log.consumer(GROUP, max_wait_ms=50)
        self.loop = ConsumeLoop(self.consumer, self.handle, name="moderator", linger_ms=cfg.linger_ms,
                                max_records=cfg.batch_size)
        self._decided: tuple[Sequence[LogRecord], list[Decision]] | None = None
        # metrics
        self.handled = 0  # comments moderated
        self.batches = 0
        self.skipped_records = 0
        self.decisions: Counter[tuple[str, str]] = Counter()
        self.lag_ms = 0  # age of the newest comment of the last batch when its effects were done
        self.last_comment_ts = 0
        self._oldest_in_hand_ts = 0  # ts of the oldest comment of the batch being moderated (0: none)
        self._depth: tuple[float, int] = (0.0, 0)  # (when read, open review items)
        self.stage_seconds: dict[str, float] = {"classify": 0.0, "effects": 0.0}

    async def handle(self, records: Sequence[LogRecord]) -> None:
        if self._decided is not None and self._decided[0] is records:
            decisions = self._decided[1]  # a retry: the same decisions, the spam rules' memory untouched
        else:
            comments = self._comments(records)
            self._oldest_in_hand_ts = min((c.ts for c in comments), default=0)
            started = time.perf_counter()
            if not comments:
                decisions = []
            elif self.offload:
                decisions = await asyncio.to_thread(self.pipeline.classify, comments)
            else:
                decisions = self.pipeline.classify(comments)
            self.stage_seconds["classify"] += time.perf_counter() - started
            decisions = await self._settle(decisions)
            self._decided = (records, decisions)
        started = time.perf_counter()
        await self._apply(decisions)
        self.stage_seconds["effects"] += time.perf_counter() - started
        self._decided = None
        self._oldest_in_hand_ts = 0
        self._count(decisions)

    def _comments(self, records: Sequence[LogRecord]) -> list[Comment]:
        out = []
        for r in records:
            try:
                item = decode_any(r.value, r.epoch, r.offset)
            except RecordError as exc:
                self.skipped_records += 1
                log.warning("skipping record %d@%d: %s", r.offset, r.partition, exc)
                continue
            if isinstance(item, Comment) and self.pipeline.moderated(item):
                out.append(item)
        return out

    async def _settle(self, decisions: list[Decision]) -> list[Decision]:
        borderline = [d.comment.user_id for d in decisions if d.action == "borderline"]
        scores = await self.reputation.scores(borderline) if borderline else {}
        return self.pipeline.settle(decisions, scores)

    async def _apply(self, decisions: list[Decision]) -> None:
        """The effects of a batch (see the module docstring); raises if any failed, to be retried."""
        hidden = [d for d in decisions if d.action in ("delete", "shadow")]
        if hidden:
            now = time.time_ns() // 1_000_000
            controls = [Control(d.action, d.comment.stream, d.comment.id, by=ACTOR, ts=now,
                                reason=d.event_reason if d.action == "delete" else d.reason,
                                code=DeleteCode.MODERATED if d.action == "delete" else "")
                        for d in hidden]
            failures = await append_many(self.log, [encode_control(c) for c in controls])
            failed = [f for f in failures if f is not None]
            if failed:
                raise failed[0]
        offences = [(d.comment.user_id, OFFENCE_WEIGHT) for d in decisions if d.action == "delete" and d.confident]
        if offences:
            await self.reputation.add(offences)
        shadowed = sorted({d.comment.user_id for d in decisions if d.action == "shadow"})
        if shadowed:
            await self.reputation.shadow_ban(shadowed, self.cfg.shadow_ban_s)
        if self.store is not None:
            await asyncio.to_thread(self._record, decisions)

    def _record(self, decisions: list[Decision]) -> None:
        rows = [d.action_row() for d in decisions if d.action != "accept" or self.cfg.record_accepts]
        if rows:
            assert self.store is not None
            self.store.record_actions(rows)
        flags = [ReviewItem(d.comment.stream, d.comment.id, d.comment.user_id, d.comment.user_name, d.comment.text,
                            d.stage, d.score, d.reason, d.comment.ts) for d in decisions if d.action == "flag"]
        flags += [self._shadow_ban_item(d) for d in decisions if d.action == "shadow"]
        flags += [ReviewItem(d.comment.stream, d.comment.id, d.comment.user_id, d.comment.user_name, d.comment.text,
                             d.stage, d.score, d.reason, d.comment.ts, resolution="delete", resolved_by=ACTOR)
                  for d in decisions if d.action == "delete"]  # listed as resolved: a moderator may restore it
        if flags:
            assert self.store is not None
            self.store.queue_for_review(flags)

    def _shadow_ban_item(self, d: Decision) -> ReviewItem:
        """The review item of an automatic shadow-ban: why, and the offences that led to it."""
        assert self.store is not None
        c = d.comment
        since = c.ts - int(self.cfg.offence_half_life_s * 1000 * 4)  # older offences weigh < 1/16 now
        evidence = self.store.offences_of(c.user_id, since, limit=10)
        reason = (f"shadow-banned for {self.cfg.shadow_ban_s} s (lift it with action \"lift\"): {d.reason}; "
                  f"after {len(evidence)} confident offences")
        return ReviewItem(c.stream, c.id, c.user_id, c.user_name, c.text, "reputation", d.score, reason, c.ts,
                          evidence=tuple(evidence))

    def _count(self, decisions: list[Decision]) -> None:
        self.batches += 1
        self.handled += len(decisions)
        for d in decisions:
            self.decisions[d.action, d.stage] += 1
        if decisions:
            self.last_comment_ts = max(d.comment.ts for d in decisions)
            self.lag_ms = max(0, time.time_ns() // 1_000_000 - self.last_comment_ts)

    @property
    def lag_s(self) -> float:
        """How far moderation trails posting, in seconds (see the module docstring)."""
        if self._oldest_in_hand_ts:
            return max(0.0, time.time() - self._oldest_in_hand_ts / 1000)
        return self.lag_ms / 1000

    @property
    def queue_depth(self) -> int:
        """Flagged comments waiting for review, read from the store at most once a second."""
        now = time.monotonic()
        if now - self._depth[0] >= 1.0:
            self._depth = (now, self.review_queue_depth())
        return self._depth[1]

    async def consumer_lag(self) -> int:
        """Records of the log not yet moderated (fetched and in hand, or not fetched yet)."""
        return sum((await self.loop.lag()).values())

    def review_queue_depth(self, stream: str | None = None) -> int:
        return self.store.open_reviews(stream) if self.store is not None else 0

    async def run(self) -> None:
        await self.loop.run()

    def stop(self) -> None:
        self.loop.stop()
