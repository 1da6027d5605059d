"""Time-ordered, unique 64-bit comment ids (snowflake layout).

  41 bits  milliseconds since 2024-01-01 UTC (good until 2093)
  10 bits  node id: unique per live gateway (a lease in Redis, chorus/nodeid.py; 0 embedded)
  12 bits  sequence within the millisecond

Ids travel as decimal strings in JSON because JavaScript numbers lose 64-bit precision.

Two ids can only be equal if one node id makes the same millisecond twice. Within a process
the generator never goes back (a clock that steps back is waited out on the last millisecond,
4096 ids each, then the next). Across holders of a node id (a restart, another gateway taking
a lapsed lease) the floor passed in at start says which millisecond the previous holder may
have reached, so a clock that is behind, or stepped back across a restart, cannot repeat its
ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from chorus.errors import Unavailable

__all__ = ["EPOCH_MS", "IdGenerator", "IdsUnavailable", "NodeHold", "id_time_ms"]

log = logging.getLogger("chorus.ids")

EPOCH_MS = 1704067200000
NODE_BITS = 10
SEQ_BITS = 12
MAX_NODE = (1 << NODE_BITS) - 1
SEQ_MASK = (1 << SEQ_BITS) - 1
STEP_BACK_WARN_MS = 1000  # a clock step back this large is logged (ids run ahead of the clock meanwhile)


class IdsUnavailable(Unavailable):
    """This process may not mint ids now (its node id lease lapsed); the message says why."""


class NodeHold(Protocol):
    """Whether this process still holds its node id (chorus/nodeid.py)."""

    def held(self) -> bool: ...

    def why_not(self) -> str: ...


class IdGenerator:
    """Gives strictly increasing ids for one node; waits out a clock that steps back.

    ``floor_ms``: ids are made only after this millisecond (the previous holder's reach).
    ``hold``: checked before every id; an id is never made while it is not held.
    """

    def __init__(self, node_id: int, clock_ms: Callable[[], int] | None = None, *, floor_ms: int = 0,
                 hold: NodeHold | None = None) -> None:
        if not 0 <= node_id <= MAX_NODE:
            raise ValueError(f"node id must be 0-{MAX_NODE}, got {node_id}")
        self.node_id = node_id
        self.hold = hold
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._last_ms = 0
        self._seq = 0
        self._behind = False  # the clock is behind the last id (logged once per episode)
        self.raise_floor(floor_ms)

    @property
    def last_ms(self) -> int:
        """The newest millisecond an id was (or may have been) made at."""
        return self._last_ms

    def raise_floor(self, floor_ms: int) -> None:
        """Make ids only after ``floor_ms`` from now on (no effect if already past it)."""
        if floor_ms >= self._last_ms:
            self._last_ms, self._seq = floor_ms, SEQ_MASK  # the next id borrows floor_ms + 1

    def next_int(self) -> int:
        if self.hold is not None and not self.hold.held():
            raise IdsUnavailable(self.hold.why_not())
        now = self._clock_ms()
        if now < self._last_ms:
            if not self._behind and self._last_ms - now >= STEP_BACK_WARN_MS:
                self._behind = True
                log.warning("node %d: the wall clock is %d ms behind the last comment id; ids stay ahead "
                            "of it until it catches up", self.node_id, self._last_ms - now)
            now = self._last_ms  # clock stepped back: keep ordering on the last millisecond
        else:
            self._behind = False
        if now == self._last_ms:
            self._seq = (self._seq + 1) & SEQ_MASK
            if self._seq == 0:  # 4096 ids in this millisecond: borrow the next one
                now = self._last_ms + 1
        else:
            self._seq = 0
        if now < EPOCH_MS:
            raise IdsUnavailable(f"the wall clock ({now} ms) is before the id epoch (2024-01-01)")
        self._last_ms = now
        return ((now - EPOCH_MS) << (NODE_BITS + SEQ_BITS)) | (self.node_id << SEQ_BITS) | self._seq

    def next(self) -> str:
        return str(self.next_int())


def id_time_ms(comment_id: str | int) -> int:
    """The wall-clock millisecond an id was made."""
    return (int(comment_id) >> (NODE_BITS + SEQ_BITS)) + EPOCH_MS
