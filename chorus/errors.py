"""The roots of the errors Chorus raises on purpose.

Every exception class the project defines derives from ``ChorusError``, so a caller (a role's
main loop, the CLI) can tell "Chorus refused or could not do this, and says why" from a bug.
``Unavailable`` is the family of "a backend (Redis, Kafka, the history store, the id lease) did
not answer": callers retry, degrade or pause, never treat it as bad input.
"""

from __future__ import annotations

__all__ = ["ChorusError", "Unavailable"]


class ChorusError(Exception):
    """An error Chorus raises on purpose, with a message meant for the person who reads it."""


class Unavailable(ChorusError):
    """A backend did not answer (down, unreachable or too slow); the operation may be retried."""
