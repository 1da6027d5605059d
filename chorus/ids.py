"""Time-ordered, unique 64-bit comment ids (snowflake layout).

  41 bits  milliseconds since 2024-01-01 UTC (good until 2093)
  10 bits  node id: unique per live gateway (taken from Redis, or 0 on the embedded default)
  12 bits  sequence within the millisecond

Ids travel as decimal strings in JSON because JavaScript numbers lose 64-bit precision.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["EPOCH_MS", "IdGenerator", "id_time_ms"]

EPOCH_MS = 1704067200000
NODE_BITS = 10
SEQ_BITS = 12
MAX_NODE = (1 << NODE_BITS) - 1
SEQ_MASK = (1 << SEQ_BITS) - 1


class IdGenerator:
    """Gives strictly increasing ids for one node; waits out a clock that steps back."""

    def __init__(self, node_id: int, clock_ms: Callable[[], int] | None = None) -> None:
        if not 0 <= node_id <= MAX_NODE:
            raise ValueError(f"node id must be 0-{MAX_NODE}, got {node_id}")
        self.node_id = node_id
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._last_ms = 0
        self._seq = 0

    def next_int(self) -> int:
        now = self._clock_ms()
        if now < self._last_ms:
            now = self._last_ms  # clock stepped back: keep ordering on the last millisecond
        if now == self._last_ms:
            self._seq = (self._seq + 1) & SEQ_MASK
            if self._seq == 0:  # 4096 ids in this millisecond: borrow the next one
                now = self._last_ms + 1
        else:
            self._seq = 0
        self._last_ms = now
        return ((now - EPOCH_MS) << (NODE_BITS + SEQ_BITS)) | (self.node_id << SEQ_BITS) | self._seq

    def next(self) -> str:
        return str(self.next_int())


def id_time_ms(comment_id: str | int) -> int:
    """The wall-clock millisecond an id was made."""
    return (int(comment_id) >> (NODE_BITS + SEQ_BITS)) + EPOCH_MS
