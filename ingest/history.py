"""Opens the history store the config names (SQLite or Cassandra); apart from both stores so
neither imports the other."""

from __future__ import annotations

from chorus.config import Config
from chorus.ingest.store import HistoryStore, SqliteStore
from chorus.ingest.store_cassandra import CassandraSettings, CassandraStore

__all__ = ["open_store"]


def open_store(config: Config) -> HistoryStore:
    """The history store ``[history] backend`` names: SQLite at ``config.history_path``, or the
    Cassandra keyspace of the ``cassandra_*`` keys (its schema created when missing)."""
    h = config.history
    if h.backend != "cassandra":
        return SqliteStore(config.history_path)
    return CassandraStore(CassandraSettings(
        contact_points=tuple(h.cassandra_contact_points), port=h.cassandra_port, keyspace=h.cassandra_keyspace,
        replication=h.cassandra_replication, consistency=h.cassandra_consistency, ttl_s=h.cassandra_ttl_s,
        bucket_s=h.cassandra_bucket_s, timeout_ms=h.cassandra_timeout_ms,
    ))
