"""One frozen, typed config tree, loaded from a TOML file plus ``CHORUS_*`` environment overrides.

Every key has a default, so no file is needed for the embedded default. Precedence, lowest
first: the file, an environment variable ``CHORUS_<SECTION>__<KEY>`` (for example
``CHORUS_GATEWAY__PORT=8081``), the command line (``--port``). Values are checked at start-up
and refused with a message naming the key, never silently replaced: strictly typed (``port =
"8080"`` is a string, not a port), in range, enumerations listing their values, and a
``CHORUS_*`` variable that names no key is an error (with the nearest key's name). Every
problem of a file is listed at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from chorus.errors import ChorusError

__all__ = [
    "AuthConfig",
    "Config",
    "ConfigError",
    "CoordinatorConfig",
    "FallbackConfig",
    "GatewayConfig",
    "HistoryConfig",
    "KafkaConfig",
    "LimitsConfig",
    "MetricsConfig",
    "ModerationConfig",
    "ReactionsConfig",
    "RedisConfig",
    "SamplingConfig",
    "ViewersConfig",
    "env_name",
    "load_config",
]

# Development signing key of the embedded default. A deployment that points at Kafka or Redis
# must set its own (checked in ``Config.validate``).
DEV_KEY = "chorus-development-key-change-me-0123456789"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
CASSANDRA_CONSISTENCY = ("ONE", "LOCAL_ONE", "QUORUM", "LOCAL_QUORUM", "EACH_QUORUM", "ALL")


class ConfigError(ChorusError, ValueError):
    """Config values missing, of the wrong type or out of range; each problem names its key.

    ``problems`` lists them all (a file with three mistakes reports three, not the first).
    """

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{len(self.problems)} problems in the config:\n  " + "\n  ".join(self.problems))


def doc(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field that carries its documentation (used by the generated reference)."""
    if callable(default) and not isinstance(default, str | int | float | bool):
        return field(default_factory=default, metadata={"doc": text}, **kw)
    return field(default=default, metadata={"doc": text}, **kw)


@dataclass(frozen=True)
class GatewayConfig:
    host: str = doc("Address the gateway listens on.", "127.0.0.1")
    port: int = doc("TCP port of the gateway (HTTP and WebSocket).", 8080)
    allowed_origins: tuple[str, ...] = doc(
        "Origins allowed to open a WebSocket besides the gateway's own; '*' allows any. "
        "Requests without an Origin header (non-browser clients) are allowed.",
        (),
    )
    max_message_bytes: int = doc("Largest client frame or message; larger closes with 1009.", 65536)
    max_fragments: int = doc("Most frames one client message may be split into; more closes with 1009.", 64)
    max_pings_per_s: int = doc("Pings a client may send per second; more closes with 1008 (0: no limit).", 20)
    permessage_deflate: bool = doc(
        "Accept permessage-deflate (RFC 7692): each batch is compressed once for every viewer that "
        "negotiated it.", True
    )
    deflate_level: int = doc("zlib level of compressed batches (1 fastest - 9 smallest).", 6)
    max_connections_per_ip: int = doc("Open WebSocket connections allowed from one address.", 1000)
    handshake_timeout_s: float = doc("Time a client has to complete the HTTP upgrade.", 5.0)
    heartbeat_interval_s: float = doc("Server ping interval on an idle connection.", 60.0)
    heartbeat_timeout_s: float = doc("Time to wait for a pong before closing.", 30.0)
    flush_interval_ms: int = doc("Coalescing window: a stream's pending events are flushed this often.", 10)
    flush_max_messages: int = doc("Flush a stream early once this many events are pending.", 100)
    backlog_limit_bytes: int = doc("Unsent bytes a viewer may hold before comment batches are skipped.", 65536)
    slow_close_after_s: float = doc("A viewer over the backlog limit this long is closed with 4008.", 10.0)
    unsubscribe_delay_ms: int = doc("Keep a stream's channel this long after its last local viewer.", 2000)
    recent_on_welcome: int = doc("Recent comments sent in the welcome message.", 50)
    registry_ttl_s: float = doc(
        "A gateway's entries in the connection registry (conn:user:<user>, for bans across gateways) outlive "
        "its last refresh (every third of this) by this long: a killed gateway's entries vanish after it.", 90.0
    )
    node_id: int = doc("Node part of comment ids (0-1023); -1 takes one from Redis or 0 embedded.", -1)
    node_lease_ttl_s: float = doc(
        "With node_id -1 and Redis: the node id is a lease in Redis renewed every third of this; a gateway "
        "that cannot renew it for 0.8 of this (Redis unreachable) refuses posts until it can, and a stopped "
        "gateway's id is free again after this.", 120.0
    )
    echo_endpoint: bool = doc("Serve /echo (conformance testing only; never in production).", False)
    drain_delay_s: float = doc(
        "On SIGTERM: how long /readyz answers 503 while the gateway still serves, so a load balancer "
        "polling it stops sending new viewers before the listener closes (Kubernetes: use a preStop hook).", 0.0
    )
    drain_timeout_s: float = doc(
        "On SIGTERM: how long the gateway waits for posts in flight to be answered before it closes every "
        "viewer with 1012 (service restart: reconnect elsewhere and resume).", 10.0
    )


@dataclass(frozen=True)
class AuthConfig:
    key: str = doc("HMAC key signing viewer tokens (HS256).", DEV_KEY)
    algorithm: str = doc("JWT algorithm; one of HS256, HS384, HS512.", "HS256")
    issuer: str = doc("Required `iss` claim.", "chorus")
    audience: str = doc("Required `aud` claim.", "chorus")
    leeway_s: int = doc("Clock skew allowed when checking `exp` and `nbf`.", 5)
    token_ttl_s: int = doc("Lifetime of tokens minted by `chorus token` and /dev/token.", 86400)
    anonymous_read: bool = doc("Let viewers without a token read (posting always needs one).", True)
    dev_login: bool = doc(
        "Serve GET /dev/token?name=... minting a token for anyone (embedded default only).", True
    )


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap: str = doc("Kafka bootstrap servers; empty uses the in-process log.", "")
    topic: str = doc("Topic of comments, keyed by stream id.", "comments")
    partitions: int = doc("Partitions of the in-process log (Kafka's come from the topic).", 4)
    accept_timeout_ms: int = doc("How long a post waits for Kafka before it is refused.", 5000)
    linger_ms: int = doc(
        "Producer batching delay: a gateway's posts of this long share one produce request (the broker's "
        "CPU goes by requests).", 5
    )
    session_timeout_ms: int = doc(
        "Consumer group session: a member not heard from this long is dropped and its partitions handed "
        "on. Must lie within the brokers' group.min.session.timeout.ms-group.max.session.timeout.ms "
        "(6000-1800000 by default).", 10000
    )
    heartbeat_interval_ms: int = doc(
        "How often group members heartbeat; also how soon a live member hears of a rebalance. "
        "Below session_timeout_ms.", 1000
    )
    log_retention_records: int = doc(
        "In-process log (embedded default): records kept per partition once every consumer group has read "
        "them (history stays in SQLite; recovery reads the recent cache, then history). 0: no count bound.", 10000
    )
    log_retention_s: float = doc(
        "In-process log: records older than this go once every consumer group has read them. 0: no age bound "
        "(with log_retention_records 0 too, every record is kept and memory grows without bound).", 60.0
    )
    log_max_records: int = doc(
        "In-process log: hard cap per partition; past it the oldest records go even if a consumer has not read "
        "them (it skips ahead; counted and logged). 0: no cap.", 100000
    )


@dataclass(frozen=True)
class RedisConfig:
    url: str = doc(
        "Redis URL for Pub/Sub and state; empty uses the in-process broker. redis://host:port/db (rediss:// for "
        "TLS, unix:// for a socket) is one node; redis+cluster://host:port[,host:port...] (rediss+cluster:// for "
        "TLS) is a Redis Cluster by its seed nodes: the client discovers the rest and follows slot moves and "
        "failovers (keys then carry hash tags, the limits are split by slot: docs/design.md).", ""
    )
    channel_prefix: str = doc("Prefix of per-stream channels and keys.", "chorus:")
    sharded_pubsub: bool = doc(
        "Use Redis 7 sharded Pub/Sub (SPUBLISH/SSUBSCRIBE) when the server has it (checked at start); "
        "false, or a server older than 7.0, uses PUBLISH/SUBSCRIBE. Every role must agree.", True
    )
    hot_streams: dict[str, int] = doc(
        'Streams whose channel is split in K shard channels, e.g. {"big-final" = 4}: the coordinator '
        "publishes each batch to all K and each gateway subscribes to one (its node id mod K), so one "
        "channel's fan-out is spread over K Redis Cluster slots. Add a stream on gateways before "
        "coordinators, remove it on coordinators first.", dict
    )


def _redis_url_ok(url: str) -> bool:
    """One node's URL, or a cluster's whose seeds parse (chorus/redisconn.py)."""
    from chorus.redisconn import is_cluster_url, parse_cluster_url

    if not url or url.partition("://")[0] in ("redis", "rediss", "unix"):
        return True
    if not is_cluster_url(url):
        return False
    try:
        parse_cluster_url(url)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HistoryConfig:
    path: str = doc("SQLite history file; empty means <data_dir>/history.sqlite3.", "")
    page_max: int = doc("Largest page GET /streams/{id}/comments returns.", 200)
    recover_max: int = doc(
        "Most comments a reconnecting viewer's resume replays (from the recent cache or this store); "
        "more missed answers recovered:false.", 10000
    )
    backend: str = doc(
        '"sqlite" (one file: the embedded default and a single host) or "cassandra" (Apache Cassandra: '
        "no shared volume, every role reads and writes over the network; the cassandra_* keys).", "sqlite"
    )
    cassandra_contact_points: tuple[str, ...] = doc(
        'Cassandra nodes the driver first connects to ("host" or "host:port"); it finds the rest itself.',
        ("127.0.0.1",)
    )
    cassandra_port: int = doc("CQL port of contact points given without one.", 9042)
    cassandra_keyspace: str = doc("Keyspace of the history (created with its tables when missing).", "chorus")
    cassandra_replication: str = doc(
        "Replication of the keyspace when it is created, a CQL map, e.g. "
        "\"{'class': 'NetworkTopologyStrategy', 'dc1': 3}\".", "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    )
    cassandra_consistency: str = doc(
        "Consistency level of reads and writes: ONE, LOCAL_ONE, QUORUM, LOCAL_QUORUM, EACH_QUORUM or ALL.",
        "LOCAL_QUORUM"
    )
    cassandra_ttl_s: int = doc(
        "Retention: comments (and their positions) expire this long after they were written, as the "
        "tables' default TTL (0: kept forever). Expired data is dropped whole by TimeWindowCompactionStrategy.",
        0
    )
    cassandra_bucket_s: int = doc(
        "Width of a comments partition (stream, time bucket): 30 s holds ~60 MB at 10k comments/s. Fixed "
        "once the keyspace has data (rows are found by it).", 30
    )
    cassandra_timeout_ms: int = doc("A store request not answered in this long fails (the archiver retries).",
                                    10000)


@dataclass(frozen=True)
class CoordinatorConfig:
    flush_interval_ms: int = doc("Batch a stream's comments for this long before publishing.", 10)
    max_batch: int = doc("Publish a stream's batch early at this many comments.", 100)
    hot_flush_interval_ms: int = doc(
        "While the coordinator is busy (busy_above_per_s) or a stream is sampled, batch for this long instead: "
        "every batch is a frame to every viewer, so fewer, fuller batches make busy streams' fan-out cheaper.", 50
    )
    busy_above_per_s: int = doc(
        "Comments/s (every stream of this coordinator together) above which it batches over "
        "hot_flush_interval_ms; 0: always.", 500
    )
    recent_size: int = doc("Recent comments kept per stream (in Redis) for welcome and recovery.", 1000)
    group_id: str = doc(
        "Kafka consumer group of the coordinators. Deployments sharing a Kafka cluster need their own: a "
        "rebalance waits for every member of the group, a crashed one of another deployment too.",
        "chorus-coordinator"
    )
    instance_id: str = doc(
        "Static consumer group identity (Kafka group.instance.id): a coordinator restarted with the same "
        "id takes its partitions back at once. Coordinators with the same id are one slot: the holder of "
        "a lease in Redis consumes, the others stand by and the first takes over within about lease_ms of "
        "its crash. Give coordinators different ids to share the partitions; empty: a dynamic member "
        "and no lease (a crashed one's partitions wait for kafka.session_timeout_ms).", "coordinator"
    )
    lease_ms: int = doc(
        "How long a coordinator's lease lasts without renewal (renewed every lease_ms/4): how soon a "
        "standby takes over from a crashed holder, and how long a holder cut off from Redis keeps going "
        "before it steps down.", 1000
    )


@dataclass(frozen=True)
class LimitsConfig:
    user_per_minute: int = doc(
        "Comments one user may post per minute, over every gateway and stream; a burst of this many, "
        "then one every 60/N s (GCRA). 0 turns the limit off.", 10
    )
    ip_per_minute: int = doc("Comments one client address may post per minute (0: off).", 100)
    stream_per_second: int = doc("Comments one stream takes per second from everyone (0: off).", 10000)
    global_per_second: int = doc("Comments the whole deployment takes per second (0: off).", 100000)
    local_max_keys: int = doc(
        "Users and addresses a gateway's in-memory limiter tracks; idle ones go first, and past this "
        "bound the least recently seen are forgotten.", 100000
    )
    redis_timeout_ms: int = doc(
        "How long admission waits for Redis (limits, slow mode, bans); past it, or with Redis down, "
        "a comment is let through with only the gateway's local user and address limits (fail open).", 250
    )
    max_inflight_posts: int = doc(
        "Posts one gateway holds between arrival and its answer (admission and the log); past it a post "
        "is refused at once with `overloaded` and retry_after_ms instead of queueing without bound.", 20000
    )
    nonce_window_s: float = doc(
        "A post repeated with the same nonce, text and stream by the same user within this long is a retry: "
        "it gets the first post's id and is stored once (with Redis, shared by every gateway: one key per "
        "post with a nonce, ~100 bytes, for this long). 0: every post is new.", 600.0
    )


@dataclass(frozen=True)
class SamplingConfig:
    enabled: bool = doc("Sample the broadcast of a stream whose rate passes a tier (everything is still stored).",
                        True)
    tiers: tuple[tuple[int, float], ...] = doc(
        "[[above comments/s, keep ratio], ...], thresholds ascending, ratios descending in (0, 1): a stream "
        "above a threshold broadcasts that share of its comments (priority lanes always go out). For "
        "extreme events, e.g. [[1000, 0.5], [5000, 0.1], [20000, 0.05]].", ((5000, 0.2),)
    )
    window_ms: int = doc("A stream's rate is measured over this sliding window.", 1000)
    bucket_ms: int = doc("Granularity of the window (window_ms must be a multiple).", 100)
    hysteresis: float = doc(
        "A stream leaves a tier only once its rate falls below threshold x (1 - hysteresis).", 0.2
    )
    slow_mode_above_per_s: int = doc(
        "Automatic slow mode: a stream above this rate for slow_mode_after_s gets slow mode "
        "(slow_mode_seconds), lifted once it stays below for as long. 0 turns it off.", 0
    )
    slow_mode_after_s: float = doc("How long a stream must stay above (or below) for automatic slow mode.", 30.0)
    slow_mode_seconds: int = doc("The slow mode automatic slow mode sets.", 10)


@dataclass(frozen=True)
class FallbackConfig:
    enabled: bool = doc(
        "Gateways consume Kafka themselves while Redis Pub/Sub is down (a circuit breaker decides).", True
    )
    failures: int = doc("Consecutive failed Redis probes that open the breaker (start the Kafka fallback).", 3)
    probe_interval_ms: int = doc("How often a gateway probes Redis while the breaker is closed.", 500)
    probe_timeout_ms: int = doc("A probe not answered in this time counts as a failure.", 500)
    retry_after_s: float = doc("While open, probe again (half-open) this often; success closes it.", 3.0)
    rewind_ms: int = doc(
        "The fallback reads Kafka from this long before the last good probe (the coordinator's lag), "
        "skipping what the gateway already delivered.", 3000
    )


# Words of the default blocklist, matched after normalisation (ingest/rules.py): a plain word
# matches the whole word with common endings (s, es, ed, er, ers, ing, in); "word*" any word
# starting with it; "*word*" anywhere, even inside another word (use sparingly: Scunthorpe).
# What ingest/context.py may find a comment to be (moderation.context_deletes)
CONTEXT_CATEGORIES = ("threat", "sexual", "scam", "menace", "insult", "hostile")
DEFAULT_BLOCKLIST = (
    "*fuck*", "shit*", "bullshit*", "cunt*", "motherfuck*", "asshole*", "bitch*", "bastard", "dickhead*",
    "faggot*", "fag", "nigger*", "nigga*", "retard", "whore*", "slut*", "twat*", "wanker*", "cocksuck*",
    "kys", "kill yourself", "kike",
)


@dataclass(frozen=True)
class ModerationConfig:
    enabled: bool = doc("Run the moderator role (`chorus run` includes it; `chorus moderator` runs it alone).",
                        True)
    blocklist: tuple[str, ...] = doc(
        "Stage 1: words deleted on sight, matched after normalising case, accents, look-alike letters, "
        "leetspeak, repeated letters and spacing tricks ('f u c k', 'fμck', 'sh1t'). 'word' matches the "
        "word and its common endings, 'word*' any word starting so, '*word*' anywhere; several words "
        "match as a phrase.", DEFAULT_BLOCKLIST
    )
    allowlist: tuple[str, ...] = doc("Words never matched by the blocklist (e.g. 'scunthorpe').", ())
    model: str = doc(
        "Stage 2: the classifier. 'profanity-check' (a linear model trained on ~200k labelled comments, "
        "weights shipped in the alt-profanity-check package), 'none' (rules and reputation only), or "
        "'package.module:factory' returning an object with score_batch(texts) -> scores in [0, 1].",
        "profanity-check"
    )
    delete_at: float = doc(
        "A model score at or above this deletes a comment the context rules find insulting or hostile to a "
        "person (with context_rules off: any comment).", 0.9
    )
    flag_at: float = doc(
        "A model score at or above this (and below delete_at) is borderline for a comment aimed at a person "
        "(with context_rules off: any comment): flagged for review, or shadowed when the author is a repeat "
        "offender.", 0.6
    )
    model_alone_flag_at: float = doc(
        "A model score at or above this flags a comment that no context rule corroborates or explains as an "
        "idiom ('kill the boss', 'I hate mondays'); the model alone never deletes. Above 1: never.", 0.99
    )
    context_rules: bool = doc(
        "Stage 1b (ingest/context.py): read what a comment is aimed at (a person or a thing) and the idioms "
        "of sports, gaming and music chat before trusting the model.", True
    )
    context_deletes: tuple[str, ...] = doc(
        "Context categories deleted without the model: of 'threat', 'sexual', 'scam', 'menace', 'insult', "
        "'hostile' (the others are deleted only when the model agrees at delete_at, else flagged).",
        ("threat", "sexual", "scam")
    )
    repeat_offender_at: float = doc(
        "Stage 3: an author whose offence score (each confident delete or moderator-confirmed offence counts 1, "
        "decaying; flags count nothing) is at or above this is a repeat offender.", 1.5
    )
    offence_half_life_s: float = doc("Offence scores halve every this many seconds.", 3600.0)
    shadow_ban_s: int = doc("How long a shadow-ban lasts (s); the author's comments reach only the author.", 86400)
    spam_repeats: int = doc("The same message from one user this many times within spam_window_s is spam "
                            "(deleted from that copy on); 0 turns it off.", 3)
    spam_window_s: float = doc("The window of the spam rules.", 30.0)
    max_links: int = doc("A comment with more links than this is spam (0: any link is).", 2)
    link_posts_per_window: int = doc("Comments with links one user may post within spam_window_s (0: off).", 3)
    exempt_badges: tuple[str, ...] = doc("Authors with any of these badges are never moderated.",
                                         ("broadcaster", "moderator"))
    batch_size: int = doc("Most comments the moderator reads and classifies at once.", 2000)
    linger_ms: int = doc("How long the moderator waits to fill a batch once the first comment is in.", 20)
    record_accepts: bool = doc("Also write a moderation_actions row for each accepted comment (heavy).", False)


@dataclass(frozen=True)
class MetricsConfig:
    host: str = doc("Address of the metrics listener (roles without a gateway, or to keep /metrics private).",
                    "127.0.0.1")
    port: int = doc(
        "Port of a small HTTP listener serving /metrics, /healthz and /readyz (0: none). Coordinators, "
        "archivers and moderators need it to be scraped; give each process on a host its own "
        "(e.g. CHORUS_METRICS__PORT).", 0
    )
    on_gateway_port: bool = doc("Also serve /metrics on the gateway's own port.", True)
    probe_interval_s: float = doc(
        "How often /readyz's view of Redis and Kafka is refreshed (each probe is bounded by this too).", 2.0
    )


@dataclass(frozen=True)
class ReactionsConfig:
    emoji: tuple[str, ...] = doc(
        "Reactions viewers may send, by name (a-z 0-9 _); the page shows a glyph for the names it knows.",
        ("heart", "fire", "laugh", "wow", "clap", "sad"),
    )
    user_per_second: int = doc(
        "Reactions one viewer may send per second on a gateway, after a burst of as many (GCRA); past it "
        "they are dropped and the viewer is told once (rate_limited). 0 turns the limit off.", 10
    )
    anonymous: bool = doc("Let viewers without a token react (limited per address instead of per user).", False)
    flush_interval_ms: int = doc(
        "Each gateway adds the reactions it counted into the stream's totals this often (in Redis: one "
        "pipelined HINCRBY per stream and emoji, never one call per reaction).", 500
    )
    broadcast_interval_ms: int = doc(
        "Viewers get the stream's reaction totals (a `reactions` event, when they changed) this often.", 1000
    )
    high_traffic_streams: tuple[str, ...] = doc(
        "Streams in high-traffic mode ('*': every stream): their reactions flush and their totals go out every "
        "high_traffic_interval_ms instead.", ()
    )
    high_traffic_interval_ms: int = doc("Flush and broadcast interval of high-traffic streams.", 100)
    retention_s: int = doc("A stream's reaction totals are kept this long after its last reaction.", 7 * 86400)


@dataclass(frozen=True)
class ViewersConfig:
    interval_ms: int = doc(
        "Each gateway reports its live viewers per stream, and viewers get a `viewers` event when the "
        "numbers changed, this often.", 1000
    )
    ttl_ms: int = doc(
        "A gateway's report counts this long: one that stops reporting (killed) drops out of the counts "
        "after it. At least twice interval_ms.", 5000
    )
    exact_unique_max: int = doc(
        "Unique viewers are counted exactly (a set of ids) up to this many per stream, then estimated with "
        "HyperLogLog (about 0.8% error, at most 12 KiB per stream).", 1000
    )
    retention_s: int = doc("A stream's unique-viewer count is kept this long after its last join.", 7 * 86400)


@dataclass(frozen=True)
class Config:
    data_dir: str = doc("Directory of the embedded default's files.", ".chorus")
    log_level: str = doc("Logging level: DEBUG, INFO, WARNING or ERROR.", "INFO")
    log_format: str = doc('Log lines as "text" (human) or "json" (one object per line, for log collectors).',
                          "text")
    gateway: GatewayConfig = doc("", GatewayConfig)
    auth: AuthConfig = doc("", AuthConfig)
    kafka: KafkaConfig = doc("", KafkaConfig)
    redis: RedisConfig = doc("", RedisConfig)
    history: HistoryConfig = doc("", HistoryConfig)
    coordinator: CoordinatorConfig = doc("", CoordinatorConfig)
    limits: LimitsConfig = doc("", LimitsConfig)
    sampling: SamplingConfig = doc("", SamplingConfig)
    fallback: FallbackConfig = doc("", FallbackConfig)
    metrics: MetricsConfig = doc("", MetricsConfig)
    reactions: ReactionsConfig = doc("", ReactionsConfig)
    viewers: ViewersConfig = doc("", ViewersConfig)
    moderation: ModerationConfig = doc("", ModerationConfig)

    @property
    def embedded(self) -> bool:
        """True when neither Kafka nor Redis is configured: one process, in-process bus."""
        return not self.kafka.bootstrap and not self.redis.url

    @property
    def history_path(self) -> Path:
        return Path(self.history.path) if self.history.path else Path(self.data_dir) / "history.sqlite3"

    def problems(self) -> list[str]:
        """Every value out of range or inconsistent with another, each naming its key."""
        checks: list[tuple[str, bool, str]] = [
            ("gateway.port", 0 <= self.gateway.port <= 65535, "must be between 0 and 65535"),
            ("gateway.max_message_bytes", self.gateway.max_message_bytes >= 1024, "must be >= 1024"),
            ("gateway.max_pings_per_s", 0 <= self.gateway.max_pings_per_s <= 250, "must be 0-250"),
            ("gateway.max_fragments", 1 <= self.gateway.max_fragments <= 1_000_000, "must be 1-1000000"),
            ("gateway.deflate_level", 1 <= self.gateway.deflate_level <= 9, "must be 1-9"),
            ("gateway.max_connections_per_ip", self.gateway.max_connections_per_ip >= 1, "must be >= 1"),
            ("gateway.flush_interval_ms", 1 <= self.gateway.flush_interval_ms <= 1000, "must be 1-1000"),
            ("gateway.flush_max_messages", self.gateway.flush_max_messages >= 1, "must be >= 1"),
            ("gateway.backlog_limit_bytes", self.gateway.backlog_limit_bytes >= 4096, "must be >= 4096"),
            ("gateway.node_id", -1 <= self.gateway.node_id <= 1023, "must be -1 or 0-1023"),
            ("gateway.node_lease_ttl_s", 1 <= self.gateway.node_lease_ttl_s <= 3600, "must be 1-3600"),
            ("gateway.registry_ttl_s", 0.5 <= self.gateway.registry_ttl_s <= 86_400, "must be 0.5-86400"),
            ("auth.algorithm", self.auth.algorithm in ("HS256", "HS384", "HS512"), "must be HS256, HS384 or HS512"),
            ("auth.key", len(self.auth.key) >= 32, "must be at least 32 characters"),
            ("kafka.partitions", self.kafka.partitions >= 1, "must be >= 1"),
            ("kafka.accept_timeout_ms", self.kafka.accept_timeout_ms >= 100, "must be >= 100"),
            ("kafka.log_retention_records", self.kafka.log_retention_records >= 0, "must be >= 0"),
            ("kafka.log_retention_s", self.kafka.log_retention_s >= 0, "must be >= 0"),
            ("kafka.log_max_records", self.kafka.log_max_records == 0
             or self.kafka.log_max_records >= self.kafka.log_retention_records,
             "must be 0 or >= log_retention_records"),
            ("history.page_max", self.history.page_max >= 1, "must be >= 1"),
            ("history.recover_max", self.history.recover_max >= 0, "must be >= 0"),
            ("history.backend", self.history.backend in ("sqlite", "cassandra"), 'must be "sqlite" or "cassandra"'),
            ("history.cassandra_consistency", self.history.cassandra_consistency in CASSANDRA_CONSISTENCY,
             f"must be one of {', '.join(CASSANDRA_CONSISTENCY)}"),
            ("history.cassandra_keyspace", re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,47}", self.history.cassandra_keyspace)
             is not None, "must be a CQL name: a letter, then letters, digits or _ (48 at most)"),
            ("history.cassandra_replication", self.history.cassandra_replication.strip().startswith("{")
             and self.history.cassandra_replication.strip().endswith("}"), "must be a CQL map {...}"),
            ("history.cassandra_contact_points", bool(self.history.cassandra_contact_points), "must not be empty"),
            ("history.cassandra_port", 1 <= self.history.cassandra_port <= 65535, "must be 1-65535"),
            ("history.cassandra_ttl_s", 0 <= self.history.cassandra_ttl_s <= 630_720_000, "must be 0-630720000"),
            ("history.cassandra_bucket_s", 1 <= self.history.cassandra_bucket_s <= 86_400, "must be 1-86400"),
            ("history.cassandra_timeout_ms", 100 <= self.history.cassandra_timeout_ms <= 120_000,
             "must be 100-120000"),
            ("coordinator.recent_size", self.coordinator.recent_size >= 1, "must be >= 1"),
            ("coordinator.flush_interval_ms", 1 <= self.coordinator.flush_interval_ms <= 1000, "must be 1-1000"),
            ("coordinator.max_batch", self.coordinator.max_batch >= 1, "must be >= 1"),
            ("coordinator.hot_flush_interval_ms",
             self.coordinator.flush_interval_ms <= self.coordinator.hot_flush_interval_ms <= 1000,
             "must be flush_interval_ms-1000"),
            ("coordinator.busy_above_per_s", self.coordinator.busy_above_per_s >= 0, "must be >= 0"),
            ("coordinator.group_id", bool(self.coordinator.group_id), "must not be empty"),
            ("coordinator.lease_ms", 200 <= self.coordinator.lease_ms <= 60_000, "must be 200-60000"),
            ("kafka.session_timeout_ms", 1000 <= self.kafka.session_timeout_ms <= 1_800_000,
             "must be 1000-1800000"),
            ("kafka.heartbeat_interval_ms", 100 <= self.kafka.heartbeat_interval_ms < self.kafka.session_timeout_ms,
             "must be >= 100 and below kafka.session_timeout_ms"),
            ("limits.user_per_minute", 0 <= self.limits.user_per_minute <= 1_000_000, "must be 0-1000000"),
            ("limits.ip_per_minute", 0 <= self.limits.ip_per_minute <= 1_000_000, "must be 0-1000000"),
            ("limits.stream_per_second", 0 <= self.limits.stream_per_second <= 1_000_000, "must be 0-1000000"),
            ("limits.global_per_second", 0 <= self.limits.global_per_second <= 1_000_000, "must be 0-1000000"),
            ("limits.local_max_keys", self.limits.local_max_keys >= 100, "must be >= 100"),
            ("limits.redis_timeout_ms", 10 <= self.limits.redis_timeout_ms <= 10_000, "must be 10-10000"),
            ("limits.max_inflight_posts", self.limits.max_inflight_posts >= 1, "must be >= 1"),
            ("limits.nonce_window_s", 0 <= self.limits.nonce_window_s <= 86_400, "must be 0-86400"),
            ("log_level", self.log_level.upper() in LOG_LEVELS, f"must be one of {', '.join(LOG_LEVELS)}"),
            *self._sampling_checks(),
            *self._ops_checks(),
            *self._timing_checks(),
            *self._engagement_checks(),
            *self._moderation_checks(),
        ]
        problems = [f"config key {key}: {why}" for key, ok, why in checks if not ok]
        if not self.embedded and self.auth.key == DEV_KEY:
            problems.append("config key auth.key: set a key of your own when using Kafka or Redis")
        return problems

    def validate(self) -> Config:
        """This config, or a ConfigError listing every value out of range."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self

    def _sampling_checks(self) -> list[tuple[str, bool, str]]:
        """Checks of [sampling], [fallback] and the hot streams of [redis]."""
        s, f = self.sampling, self.fallback
        above = [t[0] for t in s.tiers]
        keep = [t[1] for t in s.tiers]
        return [
            ("sampling.tiers", all(a >= 1 for a in above) and above == sorted(set(above)),
             "thresholds must be >= 1 and strictly ascending"),
            ("sampling.tiers", all(0 < k < 1 for k in keep) and keep == sorted(set(keep), reverse=True),
             "keep ratios must be between 0 and 1 (exclusive) and strictly descending"),
            ("sampling.bucket_ms", 10 <= s.bucket_ms <= s.window_ms, "must be 10 - window_ms"),
            ("sampling.window_ms", s.window_ms <= 60_000 and s.window_ms % max(s.bucket_ms, 1) == 0,
             "must be at most 60000 and a multiple of bucket_ms"),
            ("sampling.hysteresis", 0 <= s.hysteresis < 1, "must be 0 - 1 (exclusive)"),
            ("sampling.slow_mode_above_per_s", s.slow_mode_above_per_s >= 0, "must be >= 0"),
            ("sampling.slow_mode_after_s", s.slow_mode_after_s > 0, "must be > 0"),
            ("sampling.slow_mode_seconds", 1 <= s.slow_mode_seconds <= 86_400, "must be 1-86400"),
            ("redis.hot_streams", all(k and "/" not in k and 1 <= n <= 1024 for k, n in self.redis.hot_streams.items()),
             "must map stream ids to shard counts 1-1024"),
            ("fallback.failures", f.failures >= 1, "must be >= 1"),
            ("fallback.probe_interval_ms", 10 <= f.probe_interval_ms <= 60_000, "must be 10-60000"),
            ("fallback.probe_timeout_ms", 10 <= f.probe_timeout_ms <= 60_000, "must be 10-60000"),
            ("fallback.retry_after_s", f.retry_after_s > 0, "must be > 0"),
            ("fallback.rewind_ms", 0 <= f.rewind_ms <= 600_000, "must be 0-600000"),
        ]

    def _timing_checks(self) -> list[tuple[str, bool, str]]:
        """Times, sizes and names that have no meaning at zero, negative or empty."""
        g, a, k = self.gateway, self.auth, self.kafka
        return [
            ("gateway.host", bool(g.host.strip()), 'must name an address (e.g. "127.0.0.1" or "0.0.0.0")'),
            ("gateway.handshake_timeout_s", 0 < g.handshake_timeout_s <= 600, "must be in (0, 600]"),
            ("gateway.heartbeat_interval_s", 0 < g.heartbeat_interval_s <= 3600, "must be in (0, 3600]"),
            ("gateway.heartbeat_timeout_s", 0 < g.heartbeat_timeout_s <= 3600, "must be in (0, 3600]"),
            ("gateway.slow_close_after_s", 0 < g.slow_close_after_s <= 3600, "must be in (0, 3600]"),
            ("gateway.unsubscribe_delay_ms", 0 <= g.unsubscribe_delay_ms <= 600_000, "must be 0-600000"),
            ("gateway.recent_on_welcome", 0 <= g.recent_on_welcome <= 1000, "must be 0-1000"),
            ("auth.issuer", bool(a.issuer), "must not be empty"),
            ("auth.audience", bool(a.audience), "must not be empty"),
            ("auth.leeway_s", 0 <= a.leeway_s <= 3600, "must be 0-3600"),
            ("auth.token_ttl_s", a.token_ttl_s >= 1, "must be >= 1"),
            ("kafka.topic", bool(re.fullmatch(r"[A-Za-z0-9._-]{1,249}", k.topic)),
             "must be 1-249 letters, digits, '.', '_' or '-' (Kafka's topic names)"),
            ("kafka.linger_ms", 0 <= k.linger_ms <= 1000, "must be 0-1000"),
            ("kafka.bootstrap", not k.bootstrap or all(re.fullmatch(r"[^\s,]+:\d{1,5}", b.strip())
                                                       for b in k.bootstrap.split(",")),
             'must be "host:port", or several separated by commas'),
            ("redis.url", _redis_url_ok(self.redis.url),
             "must be a redis://, rediss:// or unix:// URL, or redis+cluster://host:port[,host:port...]"),
            ("data_dir", bool(self.data_dir.strip()), "must name a directory"),
            ("metrics.host", bool(self.metrics.host.strip()), "must name an address"),
        ]

    def _ops_checks(self) -> list[tuple[str, bool, str]]:
        """Checks of logging, draining and [metrics]."""
        g, m = self.gateway, self.metrics
        return [
            ("log_format", self.log_format in ("text", "json"), 'must be "text" or "json"'),
            ("gateway.drain_delay_s", 0 <= g.drain_delay_s <= 600, "must be 0-600"),
            ("gateway.drain_timeout_s", 0 <= g.drain_timeout_s <= 600, "must be 0-600"),
            ("metrics.port", 0 <= m.port <= 65535, "must be between 0 and 65535"),
            ("metrics.probe_interval_s", 0.1 <= m.probe_interval_s <= 60, "must be 0.1-60"),
        ]

    def _engagement_checks(self) -> list[tuple[str, bool, str]]:
        """Checks of [reactions] and [viewers]."""
        r, v = self.reactions, self.viewers
        names = [e for e in r.emoji if re.fullmatch(r"[a-z0-9_]{1,32}", e)]
        return [
            ("reactions.emoji", 1 <= len(r.emoji) <= 64 and len(names) == len(set(r.emoji)),
             "must name 1-64 distinct reactions of 1-32 characters a-z 0-9 _"),
            ("reactions.user_per_second", 0 <= r.user_per_second <= 10_000, "must be 0-10000"),
            ("reactions.flush_interval_ms", 10 <= r.flush_interval_ms <= 60_000, "must be 10-60000"),
            ("reactions.broadcast_interval_ms", 10 <= r.broadcast_interval_ms <= 60_000, "must be 10-60000"),
            ("reactions.high_traffic_interval_ms", 10 <= r.high_traffic_interval_ms <= 60_000, "must be 10-60000"),
            ("reactions.retention_s", r.retention_s >= 60, "must be >= 60"),
            ("viewers.interval_ms", 100 <= v.interval_ms <= 60_000, "must be 100-60000"),
            ("viewers.ttl_ms", 2 * v.interval_ms <= v.ttl_ms <= 3_600_000, "must be at least 2 x viewers.interval_ms"),
            ("viewers.exact_unique_max", 0 <= v.exact_unique_max <= 1_000_000, "must be 0-1000000"),
            ("viewers.retention_s", v.retention_s >= 60, "must be >= 60"),
        ]

    def _moderation_checks(self) -> list[tuple[str, bool, str]]:
        m = self.moderation
        return [
            ("moderation.blocklist", all(w.strip("* ") for w in m.blocklist), "entries must not be empty"),
            ("moderation.model", bool(m.model.strip()), "must be 'profanity-check', 'none' or 'module:factory'"),
            ("moderation.delete_at", 0 < m.delete_at <= 1, "must be in (0, 1]"),
            ("moderation.flag_at", 0 < m.flag_at <= m.delete_at, "must be in (0, delete_at]"),
            ("moderation.model_alone_flag_at", m.model_alone_flag_at >= m.flag_at, "must be >= flag_at"),
            ("moderation.context_deletes", set(m.context_deletes) <= set(CONTEXT_CATEGORIES),
             "entries must be of " + ", ".join(CONTEXT_CATEGORIES)),
            ("moderation.repeat_offender_at", m.repeat_offender_at > 0, "must be > 0"),
            ("moderation.offence_half_life_s", m.offence_half_life_s > 0, "must be > 0"),
            ("moderation.shadow_ban_s", m.shadow_ban_s >= 1, "must be >= 1"),
            ("moderation.spam_repeats", m.spam_repeats == 0 or m.spam_repeats >= 2, "must be 0 or >= 2"),
            ("moderation.spam_window_s", 0 < m.spam_window_s <= 3600, "must be in (0, 3600]"),
            ("moderation.max_links", m.max_links >= 0, "must be >= 0"),
            ("moderation.link_posts_per_window", m.link_posts_per_window >= 0, "must be >= 0"),
            ("moderation.batch_size", 1 <= m.batch_size <= 100_000, "must be 1-100000"),
            ("moderation.linger_ms", 0 <= m.linger_ms <= 1000, "must be 0-1000"),
        ]


T = TypeVar("T")

# CHORUS_* variables of the project's tooling, not config keys (scripts/, tests/, and the
# test broker's services/kafka/start.sh, CHORUS_KAFKA_<NAME> with one underscore): every other
# CHORUS_* variable must name a key, so a misspelt override is an error, not ignored.
TOOL_ENV = frozenset({"CHORUS_PURE", "CHORUS_BUILD_NATIVE", "CHORUS_EXPECT_IMPL", "CHORUS_REINSTALL",
                      "CHORUS_SCREENSHOT", "CHORUS_FUZZ_CASES"})
TOOL_ENV_PREFIXES = ("CHORUS_TEST_", "CHORUS_BENCH_", "CHORUS_KAFKA_")
_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str"}


def env_name(key: str) -> str:
    """The environment variable overriding a dotted key: gateway.port -> CHORUS_GATEWAY__PORT."""
    return "CHORUS_" + key.upper().replace(".", "__")


def _did_you_mean(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _given(value: Any) -> str:
    """What a wrong value was, for the message: its repr and, when it helps, its TOML type."""
    kind = {bool: "a boolean", str: "a string", int: "an integer", float: "a number", list: "a list",
            dict: "a table"}.get(type(value))
    return f"{value!r} ({kind})" if kind else repr(value)


def _coerce(key: str, kind: Any, value: Any, from_env: bool) -> Any:
    """Turn a TOML value (strictly typed: "8080" is not an int) or an environment string into
    ``kind``, or raise ConfigError naming ``key``."""
    try:
        if from_env and kind is not str and not isinstance(value, str):
            raise ValueError(value)
        if kind is bool:
            if from_env:
                low = value.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return low in ("1", "true", "yes", "on")
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if kind is int:
            if from_env:
                return int(value.strip())
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(value)
            return value
        if kind is float:
            if from_env:
                return float(value.strip())
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(value)
            return float(value)
        if kind is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
        if kind == tuple[tuple[int, float], ...]:
            return _pairs(json.loads(value) if from_env else value)
        if kind == dict[str, int]:
            return _str_int_map(json.loads(value) if from_env else value)
        if kind == tuple[str, ...]:
            items = [s.strip() for s in value.split(",") if s.strip()] if from_env else value
            if not isinstance(items, list | tuple) or not all(isinstance(s, str) for s in items):
                raise ValueError(value)
            return tuple(items)
    except ValueError:
        name = _TYPE_NAMES.get(kind, getattr(kind, "__name__", str(kind)))
        raise ConfigError(f"config key {key}: expected {name}, got {_given(value)}") from None
    raise ConfigError(f"config key {key}: unsupported type {kind}")


def _pairs(value: Any) -> tuple[tuple[int, float], ...]:
    """[[int, number], ...] (TOML, or JSON from the environment) as a tuple of pairs."""
    if not isinstance(value, list | tuple):
        raise ValueError(value)
    out = []
    for pair in value:
        if (not isinstance(pair, list | tuple) or len(pair) != 2 or isinstance(pair[0], bool)
                or not isinstance(pair[0], int) or isinstance(pair[1], bool) or not isinstance(pair[1], int | float)):
            raise ValueError(value)
        out.append((pair[0], float(pair[1])))
    return tuple(out)


def _str_int_map(value: Any) -> dict[str, int]:
    """A table of integers (TOML, or a JSON object from the environment)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                              for k, v in value.items()):
        raise ValueError(value)
    return dict(value)


@dataclass
class _Sources:
    """Where values come from, lowest precedence first: the file, the environment, the command line."""

    file: Mapping[str, Any]
    env: Mapping[str, str]
    cli: Mapping[str, Any]  # dotted key -> value
    problems: list[str] = field(default_factory=list)


def _build(cls: type[T], prefix: str, data: Mapping[str, Any], src: _Sources) -> T:
    """``cls`` from its table of the file, overridden by the environment, then the command line.
    A value that is wrong keeps its default and adds a problem, so every problem is reported at once."""
    hints = get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for name in data:
        if name not in known:
            src.problems.append(f"config key {prefix}{name}: unknown key{_did_you_mean(name, known, prefix)}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(kind):
            section = data.get(f.name, {})
            if not isinstance(section, dict):
                src.problems.append(f"config key {key}: expected a table, got {_given(section)}")
                section = {}
            values[f.name] = _build(kind, f"{key}.", section, src)  # type: ignore[arg-type]
            continue
        try:
            if key in src.cli:
                values[f.name] = _coerce(f"{key} (from the command line)", kind, src.cli[key], False)
            elif env_name(key) in src.env:
                values[f.name] = _coerce(f"{key} (from {env_name(key)})", kind, src.env[env_name(key)], True)
            elif f.name in data:
                values[f.name] = _coerce(key, kind, data[f.name], False)
        except ConfigError as exc:
            src.problems.append(str(exc))
    return cls(**values)


def _unknown_variables(env: Mapping[str, str]) -> list[str]:
    """CHORUS_* variables that name no config key (nor the tooling's own, TOOL_ENV)."""
    keys = {env_name(key) for key, _default, _doc in iter_defaults()}
    return [f"environment variable {name}: not a config key{_did_you_mean(name, keys)}"
            for name in sorted(env) if name.startswith("CHORUS_") and name not in keys and not _is_tool_variable(name)]


def _is_tool_variable(name: str) -> bool:
    return name in TOOL_ENV or (name.startswith(TOOL_ENV_PREFIXES) and "__" not in name)


def _unknown_overrides(cli: Mapping[str, Any]) -> list[str]:
    keys = [key for key, _default, _doc in iter_defaults()]
    return [f"config key {key} (from the command line): unknown key{_did_you_mean(key, keys)}"
            for key in cli if key not in keys]


def _read_file(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path}: is a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
    """Load the config file (if any), apply ``CHORUS_*`` variables, then ``overrides`` (the
    command line): each wins over the one before. Every problem found is listed in one ConfigError.

    ``overrides`` are dotted keys with underscores for dots, as the CLI passes them
    (``gateway__port=8081``).
    """
    data = _read_file(path) if path is not None else {}
    src = _Sources(data, os.environ if env is None else env, {k.replace("__", "."): v for k, v in overrides.items()})
    src.problems += _unknown_variables(src.env) + _unknown_overrides(src.cli)
    config = _build(Config, "", data, src)
    problems = src.problems + config.problems()
    if problems:
        raise ConfigError(problems)
    return config


def iter_defaults(cls: type[Any] = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every leaf key: the source of the generated reference."""
    rows: list[tuple[str, Any, str]] = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
        if dataclasses.is_dataclass(default):
            rows.extend(iter_defaults(type(default), f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", default, f.metadata.get("doc", "")))
    return rows
