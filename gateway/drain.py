"""The gateway's graceful drain (SIGTERM), as three flags that only move forward.

::

    serving --drain()--> draining (not ready; still serving for gateway.drain_delay_s)
            --delay----> refusing posts (listener closed; new posts get not_accepted)
            --answered-> drained (posts in flight answered, or gateway.drain_timeout_s passed)

After ``drained`` the gateway closes every viewer with 1012 (service restart), which tells
clients to reconnect elsewhere and ``resume`` from the last position they saw.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

__all__ = ["DRAIN_REASON", "Drain"]

log = logging.getLogger("chorus.gateway")

DRAIN_REASON = "gateway restarting: reconnect and resume"
POLL_S = 0.01  # how often the drain looks at the posts still in flight


class Drain:
    """Where a gateway is in its drain; :meth:`run` moves it through (once)."""

    def __init__(self, delay_s: float, timeout_s: float) -> None:
        self.delay_s = delay_s
        self.timeout_s = timeout_s
        self.draining = False  # not ready (still serving through the delay)
        self.refusing_posts = False  # past the delay: new posts are refused, not_accepted
        self.drained = False  # the posts in flight are answered; viewers are closed next

    async def run(self, close_listener: Callable[[], None], in_flight: Callable[[], int]) -> None:
        """Readiness off, the listener closed after the delay, the posts in flight answered.
        Idempotent: a second call (the app drains, then stops the gateway) returns at once."""
        if self.drained:
            return
        self.draining = True
        log.info("draining: not ready; closing the listener in %.1f s", self.delay_s)
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        self.refusing_posts = True
        close_listener()
        deadline = time.monotonic() + self.timeout_s
        while in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        left = in_flight()
        if left:
            log.warning("draining: %d posts still unanswered after %.1f s", left, self.timeout_s)
        self.drained = True
