"""Ingest: the comment log (Kafka or in-process), the coordinator (log to Pub/Sub), the
archiver (log to history) and the history store."""

if __name__ != "chorus.ingest":  # one import name: the folder is installed as chorus.ingest
    raise ImportError(f"import chorus.ingest, not {__name__} (pip install -e . maps ingest/ to chorus.ingest)")


__all__: list[str] = []
