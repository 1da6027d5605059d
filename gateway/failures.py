"""Rate-limited logging of the gateway's own failures.

Every failure inside the gateway costs only the connection it came from (gateway/events.py,
gateway/posts.py, gateway/join.py); this is where each one is counted and logged, so a client
repeating a message that trips a bug cannot flood the log.
"""

from __future__ import annotations

import logging
import time

__all__ = ["FAILURE_LOG_INTERVAL_S", "FailureLog"]

log = logging.getLogger("chorus.gateway")

FAILURE_LOG_INTERVAL_S = 10.0  # one log line per kind of failure this often, with the count in between


class FailureLog:
    """Logs a kind of failure the first time and then at most once per interval, with how
    many happened in between."""

    def __init__(self, interval_s: float = FAILURE_LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._quiet: dict[tuple[str, str], int] = {}
        self.count = 0

    def failed(self, where: str, exc: BaseException, level: int = logging.ERROR) -> None:
        """Log ``exc`` (with its traceback at ERROR: a bug) unless its kind was logged lately."""
        self.count += 1
        key = (where, type(exc).__name__)
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return
        self._last[key] = now
        also = self._quiet.pop(key, 0)
        log.log(level, "%s failed (%s: %s; %d more like it since the last report)", where, type(exc).__name__, exc,
                also, exc_info=exc if level >= logging.ERROR else None)
