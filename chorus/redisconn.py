"""Redis clients from ``redis.url``: one node, or a Redis Cluster from its seed nodes.

``redis.url`` names one node (``redis://``, ``rediss://``, ``unix://``) or, with the scheme
``redis+cluster://`` (``rediss+cluster://`` for TLS), a Redis Cluster by one or more seed nodes
separated by commas: ``redis+cluster://user:secret@10.0.0.1:6379,10.0.0.2:6379``. The client
asks a seed for the slot map (CLUSTER SLOTS) and finds every other node from it, then follows
MOVED/ASK redirections and fails over to the replica Redis promotes, without a restart.

Every multi-key script or transaction must stay inside one hash slot on a cluster, so the
parts of a key that choose its slot go inside a hash tag, ``{...}`` (:func:`tag`): a stream's
keys share ``{<stream>}``, a user's ``{<user>}``. On one node :func:`tag` returns its argument
as it is, so single-node keys keep the names they always had.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

__all__ = [
    "CLUSTER_SCHEMES",
    "ClusterUrl",
    "SlotScript",
    "group_by_slot",
    "is_cluster",
    "is_cluster_url",
    "open_redis",
    "parse_cluster_url",
    "tag",
]

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_PORT = 6379


@dataclass(frozen=True, slots=True)
class ClusterUrl:
    """What a ``redis+cluster://`` URL says: the seed nodes, credentials and TLS."""

    seeds: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterUrl:
    """The seeds of ``redis+cluster://[user:password@]host:port[,host:port...][/][?...]``.

    Raises ValueError naming what is wrong (no seed, a port that is not a number, a database
    other than 0: a cluster has only database 0).
    """
    scheme, _, rest = url.partition("://")
    if scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"not a cluster URL (scheme {scheme!r}; expected {' or '.join(CLUSTER_SCHEMES)})")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if path.strip("/") not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0")
    creds, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = creds.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if colon else None)
    seeds = tuple(_host_port(item) for item in hosts.split(",") if item.strip())
    if not seeds:
        raise ValueError("no seed node (expected host:port[,host:port...])")
    tls = scheme == "rediss+cluster" or parse_qs(query).get("ssl", [""])[0].lower() in ("1", "true", "yes")
    return ClusterUrl(seeds, username, password, tls)


def _host_port(item: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [IPv6]:port
        host, _, port = item[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError(f"seed node {item!r} has no host")
    if port and not port.isdigit():
        raise ValueError(f"seed node {item!r}: port {port!r} is not a number")
    return host, int(port) if port else DEFAULT_PORT


def open_redis(url: str, *, timeout_s: float | None = None, max_connections: int | None = None,
               pool_timeout_s: float | None = None, retries: int | None = None) -> Any:
    """A ``redis.asyncio`` client for ``url``: ``Redis`` for one node, ``RedisCluster`` for a cluster.

    ``timeout_s`` bounds connecting and each reply; ``max_connections`` caps the pool (per node
    on a cluster); with ``pool_timeout_s`` a caller past the cap waits that long for a connection
    (one node: a blocking pool) instead of failing at once; ``retries`` 0 makes a lost
    connection show at once (the Pub/Sub reader's own reconnect handles it).
    """
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff, NoBackoff

    timeouts: dict[str, Any] = {}
    if timeout_s is not None:
        timeouts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if not is_cluster_url(url):
        if retries is not None:
            timeouts["retry"] = Retry(NoBackoff(), retries)
        if max_connections is None:
            return aioredis.Redis.from_url(url, **timeouts)
        pool_cls = aioredis.BlockingConnectionPool if pool_timeout_s is not None else aioredis.ConnectionPool
        if pool_timeout_s is not None:
            timeouts["timeout"] = pool_timeout_s
        return aioredis.Redis.from_pool(pool_cls.from_url(url, max_connections=max_connections, **timeouts))
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    parsed = parse_cluster_url(url)
    # A failover takes cluster-node-timeout plus an election (1-3 s on the test cluster): a
    # command whose node died is retried on the slot map read again, a few times with backoff.
    backoff = Retry(ExponentialBackoff(cap=0.5, base=0.05), 6 if retries is None else retries)
    # require_full_coverage off: while one master's slots are unserved the others still work.
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in parsed.seeds], require_full_coverage=False,
                        max_connections=max_connections or 1000, retry=backoff, username=parsed.username,
                        password=parsed.password, ssl=parsed.tls, **timeouts)


def is_cluster(client: Any) -> bool:
    """True for a ``RedisCluster`` client (keys then need hash tags: :func:`tag`)."""
    from redis.asyncio.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def tag(part: str, cluster: bool) -> str:
    """``part`` as the hash tag that picks a key's slot on a cluster; as it is on one node."""
    return "{" + part + "}" if cluster else part


class SlotScript:
    """A Lua script run as many calls at once, each inside one hash slot: one pipeline, which a
    cluster client splits into one round trip per master, sent in parallel (one node: one
    round trip). Loaded (SCRIPT LOAD, on every master) when a node answers NOSCRIPT: a replica
    promoted by a failover, or a restarted node, has none; only the calls that failed so are
    sent again, since a script that ran must not run twice.
    """

    def __init__(self, source: str) -> None:
        import hashlib

        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.round_trips = 0

    async def run_many(self, client: Any, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Per call (its keys, all in one slot, and its arguments) the script's reply, in order;
        raises the first error."""
        from redis.exceptions import NoScriptError

        results = await self._pipeline(client, calls)
        again = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if again:
            await client.script_load(self.source)
            for i, r in zip(again, await self._pipeline(client, [calls[i] for i in again]), strict=True):
                results[i] = r
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    async def _pipeline(self, client: Any, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        self.round_trips += 1
        async with client.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(self.sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))


def group_by_slot(client: Any, keys: list[str]) -> dict[int, list[int]]:
    """Slot -> the indexes of ``keys`` in it (one group for everything on a single node)."""
    if not is_cluster(client):
        return {0: list(range(len(keys)))}
    groups: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(client.keyslot(key), []).append(i)
    return groups
