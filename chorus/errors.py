"""The roots of the errors Chorus raises on purpose.

Every exception class the project defines derives from ``ChorusError``, so a caller (a role's
main loop, the CLI) can tell "Chorus refused or could not do this, and says why" from a bug.
``Unavailable`` is the family of "a backend (Redis, Kafka, the history store, the id lease) did
not answer": callers retry, degrade or pause, never treat it as bad input.

The tree (extra bases in brackets are kept for callers that catch them)::

    ChorusError
    ├── ConfigError [ValueError]        chorus.config: a config value; the CLI exits 2
    │   ├── ModelUnavailable            chorus.ingest.model: moderation.model cannot be loaded
    │   └── NodeIdUnavailable [Unavailable]  chorus.nodeid: no node id can be leased at start
    ├── AuthError                       chorus.auth: a token that does not verify
    │   └── TokenExpired
    ├── RecordError [ValueError]        chorus.ingest.records: a log record that is not ours
    ├── Refused                         chorus.ingest.admission: a comment not accepted
    ├── PrivateApiChanged               a dependency's internals are not the shape Chorus uses
    └── Unavailable
        ├── IdsUnavailable              chorus.ids: the node id lease lapsed
        ├── BackendUnavailable          chorus.ingest.limits: Redis did not answer admission
        ├── LogUnavailable              chorus.ingest.log: the log did not take a record
        │   └── LogUnconfirmed          ... or did not confirm it in time
        └── StoreUnavailable            chorus.ingest.store: the history store did not take a write
"""

from __future__ import annotations

__all__ = ["ChorusError", "PrivateApiChanged", "Unavailable"]


class ChorusError(Exception):
    """An error Chorus raises on purpose, with a message meant for the person who reads it."""


class Unavailable(ChorusError):
    """A backend did not answer (down, unreachable or too slow); the operation may be retried."""


class PrivateApiChanged(ChorusError):
    """A dependency's private API (picows's protocol constructor, aiokafka's protocol classes)
    is not the shape this version of Chorus was written against; the message names the
    dependency, its installed version and what differs. Raised at import or start, never later."""
