"""Ingest: the comment log (Kafka or in-process), the coordinator (log to Pub/Sub), the
archiver (log to history) and the history store."""

__all__: list[str] = []
