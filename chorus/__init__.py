"""Chorus: live comments for live video.

The core package holds what every role shares: the typed config tree, the wire protocol,
comment ids, auth, error and close codes, and the broker seam. The roles live in
``chorus.gateway`` (WebSocket edge), ``chorus.ingest`` (log, coordinator, archiver) and
``chorus.native`` (the hot-path accelerators and their pure-Python twins).
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
