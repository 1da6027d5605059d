"""Moderation without services: normalisation and the blocklist, spam rules, control records,
the model stage (precision and recall on a labelled set that ships with the tests), the
pipeline's decisions, reputation's decay, and the store's moderation tables."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from chorus.config import DEFAULT_BLOCKLIST, ConfigError, ModerationConfig, load_config
from chorus.ingest.model import ModelUnavailable, load_model, score_texts
from chorus.ingest.moderator import Pipeline
from chorus.ingest.records import (
    Comment,
    Control,
    RecordError,
    decode_any,
    decode_record,
    encode_control,
    encode_record,
)
from chorus.ingest.reputation import MemoryReputation
from chorus.ingest.rules import Blocklist, SpamRules, deleet, fold, normalise
from chorus.ingest.store import ModerationAction, ReviewItem, SqliteStore
from chorus.positions import MemoryPositions

DATA = Path(__file__).resolve().parent / "data" / "moderation_labelled.tsv"
BLOCK = Blocklist(DEFAULT_BLOCKLIST)


def labelled() -> tuple[list[str], list[int]]:
    rows = [line.rstrip("\n").split("\t", 1) for line in DATA.read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    return [t for _, t in rows], [int(label) for label, _ in rows]


# -- normalisation and the blocklist ----------------------------------------------------------

CAUGHT = [
    ("FUCK you", "*fuck*"), ("fück", "*fuck*"), ("fμck", "*fuck*"), ("ｆｕｃｋ", "*fuck*"),
    ("f\u200buck", "*fuck*"), ("fuuuuuck", "*fuck*"), ("f u c k", "*fuck*"), ("f.u.c.k off", "*fuck*"),
    ("F-U-C-K", "*fuck*"), ("𝐟𝐮𝐜𝐤", "*fuck*"), ("sh1t", "shit*"), ("$h!t", "shit*"), ("shit!", "shit*"),
    ("sh1tty", "shit*"), ("s1ut", "slut*"), ("bullsh1t", "bullshit*"), ("motherfucker", "motherfuck*"),
    ("kys", "kys"), ("k y s", "kys"), ("kys!", "kys"), ("ki11 y0urse1f", "kill yourself"),
    ("killyourself", "kill yourself"), ("you retard", "retard"), ("retarded", "retard"), ("fags", "fag"),
    ("а$$hole", "asshole*"),  # a Cyrillic а and dollar signs
]
CLEAN = ["Scunthorpe", "Niger is a country", "Nigeria won", "as good as it gets", "class assignment",
         "hello world", "spicy food", "flame retardant", "a b c d", "what the f*ck", "cocktail", "assassin",
         "kill the boss yourself", "skills", "I have 1 dog", "Cockburn"]


@pytest.mark.parametrize(("text", "entry"), CAUGHT)
def test_disguises_are_caught(text: str, entry: str) -> None:
    assert BLOCK.match(normalise(text)) == entry


@pytest.mark.parametrize("text", CLEAN)
def test_innocent_words_are_not(text: str) -> None:
    assert BLOCK.match(normalise(text)) is None


def test_from_utf8_bytes_too() -> None:
    for raw in ("fμck".encode(), "sh\u0131t".encode(), "ｓｈｉｔ".encode()):  # μ, dotless i, full width
        assert BLOCK.check(raw.decode()) is not None
    assert fold("Ñandú Café") == "nandu cafe"


def test_allowlist_and_phrases() -> None:
    block = Blocklist(["*cunt*", "go die"], allow=["Scunthorpe"])
    assert block.match(normalise("welcome to scunthorpe")) is None
    assert block.match(normalise("you cunt")) == "*cunt*"
    assert block.match(normalise("just go... die")) == "go die"
    assert Blocklist([]).match("anything") is None
    # Letters may repeat ("fuuuck"), so "shiitake" is "shit*" until allowed.
    assert BLOCK.match(normalise("shiitake")) == "shit*"
    assert Blocklist(DEFAULT_BLOCKLIST, allow=["Shiitake"]).match(normalise("shiitake, and shit")) == "shit*"
    assert Blocklist(DEFAULT_BLOCKLIST, allow=["Shiitake"]).match(normalise("shiitake mushrooms")) is None


def test_the_prefilter_never_hides_a_match() -> None:
    """Random text over the letters and leetspeak symbols the blocklist uses: whatever the full
    expression finds, match() finds too (the prefilter may only let more through)."""
    rng = random.Random(7)
    alphabet = "fuckshitaslbrdgnyrokw10345$@!|+ .-_"
    words = ["fuck", "shit", "sh1t", "kill", "yourself", "kys", "slut", "fag", "ass", "retard", "nigger", "cunt"]
    for _ in range(3000):
        parts = [rng.choice(words) if rng.random() < 0.3 else "".join(rng.choice(alphabet) for _ in range(4))
                 for _ in range(rng.randint(1, 5))]
        text = normalise(rng.choice(["", " "]).join(parts))
        full = BLOCK._regex.search(text) if BLOCK._regex is not None else None
        assert (full is not None) == (BLOCK.match(text) is not None), text


def test_arbitrary_unicode_never_raises() -> None:
    rng = random.Random(11)
    for _ in range(500):
        text = "".join(chr(rng.randint(1, 0x2FFFF)) for _ in range(rng.randint(0, 40)))
        text = text.encode("utf-8", "replace").decode("utf-8", "replace")
        BLOCK.match(normalise(text))
        deleet(normalise(text))


def test_deleet_spells_out_words_with_digits_only() -> None:
    assert deleet(normalise("y0u 1di0t!!")) == "you idiot!!"
    assert deleet("score 2-1 in 2024") == "score 2-1 in 2024"


# -- spam -------------------------------------------------------------------------------------


def test_repeated_messages_are_spam_from_the_nth_copy() -> None:
    spam = SpamRules(repeats=3, window_s=30, max_links=2, link_posts_per_window=3)
    t = 1_000_000
    assert spam.check("s", "u", t, "buy followers") is None
    assert spam.check("s", "u", t + 1000, "BUY   followers".lower()) is None
    hit = spam.check("s", "u", t + 2000, "buy followers")
    assert hit is not None and "3 times" in hit.reason
    assert spam.check("s", "other", t + 2000, "buy followers") is None  # per user
    assert spam.check("s", "u", t + 40_000, "buy followers") is None  # the window moved on


def test_links_are_spam_past_the_limits() -> None:
    spam = SpamRules(repeats=0, window_s=30, max_links=2, link_posts_per_window=2)
    hit = spam.check("s", "u", 0, "see a.com b.net https://c.org/x")
    assert hit is not None and "3 links" in hit.reason
    spam = SpamRules(repeats=0, window_s=30, max_links=2, link_posts_per_window=2)
    assert spam.check("s", "u", 0, "my clip www.clips.tv/1") is None
    assert spam.check("s", "u", 1, "and www.clips.tv/2") is None
    assert spam.check("s", "u", 2, "also www.clips.tv/3") is not None
    assert spam.check("s", "u", 3, "no links now") is None


def test_spam_memory_is_bounded() -> None:
    spam = SpamRules(max_users=100)
    for i in range(1000):
        spam.check("s", f"u{i}", i, "hi")
    assert len(spam) == 100


# -- control records --------------------------------------------------------------------------


def test_control_records_round_trip_and_old_readers_refuse_them() -> None:
    pin = Control("pin", "s", "12", comment={"id": "12", "text": "hi"}, by="mod1", reason="welcome", ts=5)
    restore = Control("restore", "s", "12", comment={"id": "12", "text": "hi", "offset": 3}, by="mod1", ts=6)
    automatic = Control("delete", "s", "12", by="moderator", reason="removed by automatic moderation: threat aimed "
                        "at a person", ts=7, code="moderated")
    for control in (automatic, pin, restore, Control("unpin", "s", ts=9), Control("shadow", "s", "13", ts=9)):
        key, value = encode_control(control)
        assert key == b"s"
        back = decode_any(value, "e", 41)
        assert back == Control(control.op, "s", control.id, control.comment, control.by, control.reason, control.ts,
                               "e", 41, control.code)
        with pytest.raises(RecordError, match="control record"):
            decode_record(value)
    # The delete event says who removed the comment and why, in a sentence for its author.
    assert automatic.to_event() == {"t": "delete", "id": "12", "code": "moderated",
                                    "reason": "removed by automatic moderation: threat aimed at a person"}
    assert Control("delete", "s", "12", by="mod7", code="moderator").to_event() == {
        "t": "delete", "id": "12", "code": "moderator", "reason": "removed by a moderator"}
    from_before_codes = Control("delete", "s", "12", by="moderator").to_event()
    assert from_before_codes is not None and from_before_codes["code"] == "moderated"
    assert restore.to_event() == {"t": "restore", "comment": {"id": "12", "text": "hi", "offset": 3}}
    assert pin.to_event() == {"t": "pin", "comment": {"id": "12", "text": "hi"}}
    assert Control("unpin", "s").to_event() == {"t": "unpin"}
    assert Control("shadow", "s", "1").to_event() is None


@pytest.mark.parametrize("value", [
    b'{"v":1,"k":"control","op":"explode","stream":"s"}', b'{"v":1,"k":"control","op":"delete","stream":"s"}',
    b'{"v":1,"k":"control","op":"pin","stream":"s","comment":"x"}', b'{"v":1,"k":"control"}', b"[]",
    b'{"v":1,"k":"control","op":"restore","stream":"s","id":"5"}',
    b'{"v":1,"k":"control","op":"delete","stream":"s","id":"5","code":"<script>"}',
])
def test_malformed_control_records_are_refused(value: bytes) -> None:
    with pytest.raises(RecordError):
        decode_any(value)


def test_the_shadow_flag_travels_only_when_set() -> None:
    c = Comment("1", "s", "u", "U", (), "hi", 5)
    assert b"shadow" not in encode_record(c)[1]
    shadowed = Comment("1", "s", "u", "U", (), "hi", 5, shadow=True)
    assert decode_record(encode_record(shadowed)[1]).shadow is True
    assert decode_record(encode_record(c)[1]).shadow is False


# -- the model stage --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> object:
    return load_model("profanity-check")


def test_precision_and_recall_of_the_model_on_the_labelled_set(model: object) -> None:
    texts, labels = labelled()
    assert len(texts) >= 120 and 0.3 < sum(labels) / len(labels) < 0.5
    scores = score_texts(model, texts, [deleet(normalise(t)) for t in texts])  # type: ignore[arg-type]
    cfg = ModerationConfig()
    for threshold, min_precision, min_recall in ((cfg.flag_at, 0.85, 0.9), (cfg.delete_at, 0.95, 0.85)):
        tp = sum(1 for s, y in zip(scores, labels, strict=True) if s >= threshold and y)
        fp = sum(1 for s, y in zip(scores, labels, strict=True) if s >= threshold and not y)
        fn = sum(1 for s, y in zip(scores, labels, strict=True) if s < threshold and y)
        precision, recall = tp / (tp + fp), tp / (tp + fn)
        assert precision >= min_precision and recall >= min_recall, (threshold, precision, recall)


def test_normalised_text_helps_the_model(model: object) -> None:
    written = model.score_batch(["y0u 1di0t"])[0]  # type: ignore[attr-defined]
    best = score_texts(model, ["y0u 1di0t"], [deleet(normalise("y0u 1di0t"))])[0]  # type: ignore[arg-type]
    assert written < 0.5 and best > 0.9


class KeywordModel:
    """A deployment's own model (here: a tiny real one), plugged in by moderation.model."""

    name = "keywords"

    def score_batch(self, texts: Sequence[str]) -> list[float]:
        return [1.0 if "boo" in t else 0.0 for t in texts]


def keyword_model() -> KeywordModel:
    return KeywordModel()


def test_models_are_pluggable_and_bad_specs_refused_naming_the_key() -> None:
    assert load_model("none") is None
    plugged = load_model(f"{__name__}:keyword_model")
    assert plugged is not None and list(plugged.score_batch(["boo!", "yay"])) == [1.0, 0.0]
    for spec, message in (("nonsense", "unknown model"), ("no_such_module_x:f", "cannot import"),
                          (f"{__name__}:nothing_here", "no callable"),
                          ("sys:getrecursionlimit", "without score_batch")):
        with pytest.raises(ModelUnavailable, match=f"moderation.model: .*{message}"):
            load_model(spec)
    assert issubclass(ModelUnavailable, ConfigError)
    assert sys.modules[__name__].keyword_model is keyword_model


def test_the_default_model_without_the_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host installed without chorus-live[moderation] (a gateway's): the moderator does not start."""
    monkeypatch.setitem(sys.modules, "profanity_check", None)  # what Python does when it is not installed
    with pytest.raises(ModelUnavailable) as caught:
        load_model("profanity-check")
    text = str(caught.value)
    assert text.startswith("config key moderation.model: 'profanity-check' needs the moderation extra")
    assert "pip install 'chorus-live[moderation]'" in text and 'moderation.model = "none"' in text


def test_moderation_config_is_validated(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[moderation]\nflag_at = 0.95\ndelete_at = 0.9\n")
    with pytest.raises(ConfigError, match=r"moderation\.flag_at"):
        load_config(f, env={})
    f.write_text('[moderation]\nblocklist = ["ok", "*"]\n')
    with pytest.raises(ConfigError, match=r"moderation\.blocklist"):
        load_config(f, env={})
    f.write_text('[moderation]\ncontext_deletes = ["threat", "rudeness"]\n')
    with pytest.raises(ConfigError, match=r"moderation\.context_deletes: entries must be of threat, sexual"):
        load_config(f, env={})


# -- the pipeline -----------------------------------------------------------------------------


def comment(i: int, text: str, user: str = "u1", badges: tuple[str, ...] = (), shadow: bool = False) -> Comment:
    return Comment(str(1000 + i), "s", user, user.title(), badges, text, 1_764_000_000_000 + i * 1000, shadow=shadow)


def test_pipeline_decides_per_stage(model: object) -> None:
    pipeline = Pipeline(ModerationConfig(), model)  # type: ignore[arg-type]
    batch = [comment(0, "what a goal"), comment(1, "f u c k this"), comment(2, "you are a fucking idiot"),
             comment(3, "hate this guy"), comment(4, "hate this guy", user="bad"),
             comment(5, "fuck", badges=("moderator",))]
    assert [pipeline.moderated(c) for c in batch] == [True] * 5 + [False]
    assert not pipeline.moderated(comment(6, "x", shadow=True))
    decided = pipeline.classify(batch[:5])
    assert [(d.action, d.stage) for d in decided] == [
        ("accept", "model"), ("delete", "rules"), ("delete", "rules"), ("borderline", "model"), ("borderline", "model")]
    assert decided[1].reason == "blocklist: fuck" and decided[1].score == 1.0
    settled = pipeline.settle(decided, {"bad": 2.5})
    assert [(d.action, d.stage) for d in settled[3:]] == [("flag", "model"), ("shadow", "reputation")]
    assert "repeat offender" in settled[4].reason
    spam = [comment(10 + i, "follow me on twitch") for i in range(3)]
    assert [d.action for d in pipeline.classify(spam)] == ["accept", "accept", "delete"]


def test_the_context_decides_what_the_model_may_do(model: object) -> None:
    """Issue 17.2: the shipped model scores "I hate mondays" 0.905 and "before kill 0" 0.947 (over
    delete_at); aimed at things, they are accepted. Threats, harassment and scams are deleted
    without the model; an insult only when the model agrees, else it is flagged."""
    pipeline = Pipeline(ModerationConfig(), model)  # type: ignore[arg-type]
    texts = ["I hate mondays", "before kill 0", "that was a hell of a match", "shoot the ball!", "killer goal",
             "you killed it, great set", "i will find you", "send nudes", "free vbucks at vbux-free.xyz",
             "you are an idiot", "you are worthless", "hate this guy"]
    decided = pipeline.classify([comment(20 + i, t, user=f"c{i}") for i, t in enumerate(texts)])
    assert [(d.action, d.stage) for d in decided] == [("accept", "model")] * 6 + [
        ("delete", "context"), ("delete", "context"), ("delete", "context"), ("delete", "model"),
        ("borderline", "context"), ("borderline", "model")]
    assert (decided[0].score or 0) > 0.9 and (decided[1].score or 0) > 0.9  # the model alone would have deleted
    assert [d.confident for d in decided[6:]] == [True] * 4 + [False] * 2  # only these count against the author
    assert decided[6].event_reason == "removed by automatic moderation: threat aimed at a person"
    assert decided[9].reason == "profanity-check: score 1.00 >= 0.9; context: insult aimed at a person"
    without = Pipeline(ModerationConfig(context_rules=False), model)  # type: ignore[arg-type]
    assert [d.action for d in without.classify([comment(40, "I hate mondays"), comment(41, "shoot the ball!")])] == [
        "delete", "borderline"]  # what the issue saw


def test_without_a_model_rules_still_apply() -> None:
    pipeline = Pipeline(ModerationConfig(model="none"), None)
    assert [d.action for d in pipeline.classify([comment(0, "sh1t"), comment(1, "you are a fucking idiot x")])] == [
        "delete", "delete"]
    assert [(d.action, d.stage) for d in pipeline.classify([comment(2, "you are an idiot"), comment(3, "gg")])] == [
        ("borderline", "context"), ("accept", "")]  # the context rules still read it


# -- reputation -------------------------------------------------------------------------------


async def test_offence_scores_decay_and_shadow_bans_expire() -> None:
    now = [1000.0]
    rep = MemoryReputation(half_life_s=100, clock=lambda: now[0])
    assert await rep.add([("u", 1.0), ("u", 1.0), ("v", 0.5)]) == {"u": 2.0, "v": 0.5}
    now[0] += 100
    assert (await rep.scores(["u", "v", "w"])) == {"u": 1.0, "v": 0.25, "w": 0.0}
    await rep.shadow_ban(["u"], 60)
    assert await rep.shadowed_among(["u", "v"]) == {"u"}
    now[0] += 61
    assert await rep.shadowed_among(["u", "v"]) == set()
    assert await rep.add([("u", -1.0)]) == {"u": 0.0}  # a restore takes an offence back, never below 0


async def test_redis_reputation_takes_offences_back(redis_url: str) -> None:
    from chorus.ingest.limits import redis_client
    from chorus.ingest.reputation import RedisReputation

    redis = redis_client(redis_url, 2000)
    rep = RedisReputation(redis, f"t{random.randrange(10**9)}:", half_life_s=3600)
    try:
        assert (await rep.add([("u", 1.0), ("u", 1.0)]))["u"] == pytest.approx(2.0, abs=0.01)
        assert (await rep.add([("u", -1.0)]))["u"] == pytest.approx(1.0, abs=0.01)
        assert (await rep.add([("u", -5.0)]))["u"] == 0.0
    finally:
        await rep.close()


# -- the store and the recent cache -----------------------------------------------------------


def test_store_tombstones_shadows_queue_actions_and_pins(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "h.sqlite3")
    rows = [Comment(str(5000 + i), "s", f"u{i % 2}", "U", (), f"c{i}", 1_764_000_000_000 + i, "e", i,
                    shadow=i == 3) for i in range(5)]
    store.write_comments(rows)
    why = "removed by automatic moderation: insult aimed at a person"
    assert store.delete_comments("s", ["5001"], "moderated", why) == 1 and store.delete_comments("s", ["5001"]) == 0
    assert [c["id"] for c in store.page("s", None, 10)] == ["5004", "5002", "5000"]
    # Its author sees the deleted comment, with who removed it and why; nobody else does.
    mine = store.page("s", None, 10, viewer="u1")
    assert [c["id"] for c in mine] == ["5004", "5003", "5002", "5001", "5000"]
    assert {k: mine[3][k] for k in ("deleted", "code", "reason")} == {"deleted": True, "code": "moderated",
                                                                       "reason": why}
    assert "deleted" not in mine[0] and store.deleted_automatically("s", "5001")
    assert [c["id"] for c in store.page("s", None, 10, viewer="u0")] == ["5004", "5002", "5000"]
    store.shadow_comments("s", ["5004"])
    assert [c["id"] for c in store.page("s", None, 10, viewer="u1")] == ["5003", "5002", "5001", "5000"]
    assert [(r.offset, r.deleted) for r in store.since("s", "e", 0, 10)] == [
        (0, False), (1, True), (2, False), (3, True), (4, True)]
    assert store.comment("s", "5001") is not None and store.comment("s", "5001")[1] is True  # type: ignore[index]
    assert store.recent_of_user("s", "u0", 0, 10) == ["5004", "5002", "5000"]

    action = ModerationAction("s", "delete", "rules", "5001", "u1", 1.0, "blocklist: x")
    assert store.record_actions([action, action]) == 1 and store.record_actions([action]) == 0
    assert store.record_actions([ModerationAction("s", "ban", "api", None, "u1", actor="mod")] * 2) == 2
    assert [a.action for a in store.actions("s")] == ["ban", "ban", "delete"]
    assert store.offences_of("u1", 0, 10) == [{"stream": "s", "id": "5001", "text": "c1", "reason": "blocklist: x"}]
    assert store.offences_of("u0", 0, 10) == []

    item = ReviewItem("s", "5002", "u0", "U", "c2", "model", 0.7, "borderline", 1)
    assert store.queue_for_review([item, item]) == 1
    assert [i.comment_id for i in store.review_queue("s", 10)] == ["5002"] and store.open_reviews("s") == 1
    assert store.resolve_review("s", "5002", "keep", "mod") and not store.resolve_review("s", "5002", "keep", "mod")
    assert store.open_reviews() == 0 and store.review_queue("s", 10, resolved=True)[0].resolution == "keep"
    evidence = ({"stream": "s", "id": "5001", "text": "c1", "reason": "blocklist: x"},)
    store.queue_for_review([ReviewItem("s", "5003", "u1", "U", "c3", "reputation", 0.7, "shadow-banned", 2,
                                       evidence=evidence)])
    banned = store.review_item("s", "5003")
    assert banned is not None and banned.evidence == evidence and banned.to_wire()["evidence"] == list(evidence)
    assert store.review_item("s", "5002") is None  # resolved already

    # A restore lifts the tombstone; it is a live comment for everyone again.
    assert store.deleted_comment("s", "5001") is not None and store.deleted_comment("s", "5000") is None
    assert store.restore_comments("s", ["5001"]) == 1 and store.restore_comments("s", ["5001"]) == 0
    assert "5001" in [c["id"] for c in store.page("s", None, 10)] and not store.deleted_automatically("s", "5001")

    # Bans and time-outs in force, durably (re-seeded into a Redis that restarted empty).
    store.record_sanction("s", "u1", None, "spam")
    store.record_sanction("*", "u2", 2_000, "")
    store.record_sanction("s", "u3", 500, "")
    assert sorted(store.sanctions_in_force(1_000)) == [("*", "u2", 2_000), ("s", "u1", None)]
    store.lift_sanction("s", "u1")
    assert store.sanctions_in_force(1_000) == [("*", "u2", 2_000)]

    store.set_pin("s", {"id": "5000"})
    assert store.pin("s") == {"id": "5000"}
    store.set_pin("s", None)
    assert store.pin("s") is None
    store.close()


async def test_tombstones_leave_the_recent_cache() -> None:
    cache = MemoryPositions()
    events = [{"id": str(i), "offset": i, "text": "x"} for i in range(5)]
    await cache.advance("s", "e", events, 10)
    assert await cache.remove("s", ["1", "3", "99"]) == 2
    assert [c["id"] for c in await cache.recent("s", 10)] == ["0", "2", "4"]
    assert [c["id"] for c in await cache.recent_after("s", "e", 0) or []] == ["2", "4"]
    # A restore puts a comment back in its place, once, and only where the cache vouches for it.
    assert await cache.restore("s", events[3]) and not await cache.restore("s", events[3])
    assert [c["id"] for c in await cache.recent("s", 10)] == ["0", "2", "3", "4"]
    assert not await cache.restore("s", {"id": "9", "offset": 9, "text": "never published"})
    assert not await cache.restore("other", events[1])
    await cache.set_pin("s", events[0])
    assert await cache.get_pin("s") == events[0]
    await cache.set_pin("s", None)
    assert await cache.get_pin("s") is None


# -- the defaults, measured on labelled live chat (issue 17.2) ---------------------------------

LIVECHAT = Path(__file__).resolve().parent / "data" / "livechat_labelled.tsv"
FRESH = Path(__file__).resolve().parent / "data" / "livechat_fresh.tsv"


def test_the_defaults_meet_the_targets_on_labelled_live_chat(model: object) -> None:
    """`python -m bench moderation --eval tests/data/livechat_labelled.tsv`: the real pipeline deletes
    <= 0.5% and flags <= 3% of the benign lines and catches >= 90% of the abusive ones, on the
    lines the defaults were chosen on and on the held-out ones; the model's thresholds alone (the
    defaults before) did not."""
    sys.path.insert(0, str(LIVECHAT.parents[2]))  # the repository: bench/ is not an installed package
    from bench.moderation import EVAL_TARGETS, evaluate, labelled_set

    rows = labelled_set(LIVECHAT)
    assert sum(1 for y, _, _ in rows if y == 0) >= 500 and sum(1 for y, _, _ in rows if y == 1) >= 200
    assert any(h for _, _, h in rows) and len({t.lower() for _, t, _ in rows}) == len(rows)
    got = evaluate(LIVECHAT, model=model)
    for split in ("all", "tuning", "held_out"):
        f = got[split]
        assert f["benign_deleted"] <= EVAL_TARGETS["benign_deleted_max"], (split, f)
        assert f["benign_flagged"] <= EVAL_TARGETS["benign_flagged_max"], (split, f)
        assert f["abusive_caught"] >= EVAL_TARGETS["abusive_caught_min"], (split, f)
        assert f["delete"]["precision"] >= 0.99, (split, f)
    assert got["met"]
    before = evaluate(LIVECHAT, ModerationConfig(context_rules=False), model=model)
    assert not before["met"] and before["all"]["benign_deleted"] > 0.01 and before["all"]["abusive_caught"] < 0.7
    fresh = evaluate(FRESH, model=model)["all"]  # written after the defaults were chosen
    assert fresh["benign_deleted"] <= 0.005 and fresh["benign_flagged"] <= 0.03 and fresh["abusive_caught"] >= 0.9


def test_the_eval_command_prints_the_tables() -> None:
    out = subprocess.run([sys.executable, "-m", "bench", "moderation", "--eval", str(LIVECHAT)],
                         capture_output=True, text=True, timeout=240, cwd=LIVECHAT.parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "**defaults** (targets met)" in out.stdout and "targets NOT met" in out.stdout
    assert "| held-out | 192 / 76 |" in out.stdout
