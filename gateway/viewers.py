"""Who is connected here: streams with local viewers, their hub handles, connections per address.

The hub keeps no Python object per viewer, only a small *tag* (address, variant, identity)
that it hands back with each of the viewer's messages; :func:`viewer_tag` makes it and
:func:`read_tag` reads it back. :class:`LocalViewers` is the gateway's one table of streams
with viewers (the join adds to it, a CLOSED event takes away, delivery reads it) and of
connections per address (``gateway.max_connections_per_ip``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack

from chorus.auth import Identity
from chorus.protocol import ChannelMessage

__all__ = ["ECHO_HANDLE", "REPLAY_BATCHES", "LocalStream", "LocalViewers", "read_tag", "viewer_tag"]

ECHO_HANDLE = 0  # the conformance echo endpoint's pseudo-stream
REPLAY_BATCHES = 32  # recent batches per stream, for viewers joining between welcome and hub
UNTAG_MEMO_MAX = 50_000  # decoded viewer tags kept (Identity is immutable, so sharing is safe)

ViewerTag = tuple[str, int, Identity | None]  # (address, hub variant, identity or None: anonymous)


def viewer_tag(ip: str, variant: int, who: Identity | None) -> bytes:
    """What the hub keeps for a viewer and returns with its messages."""
    if who is None:
        return msgpack.packb([ip, variant])
    return msgpack.packb([ip, variant, who.user_id, who.name, sorted(who.scopes), who.role, who.expires_at,
                          who.verified])


def read_tag(tag: bytes) -> ViewerTag:
    """A viewer's tag back as (address, variant, identity); a connection's tag never changes,
    so each is decoded once and remembered (a poster's messages all carry the same one)."""
    found = _read_tags.get(tag)
    if found is None:
        if len(_read_tags) >= UNTAG_MEMO_MAX:
            _read_tags.clear()
        fields = msgpack.unpackb(tag)
        if len(fields) == 2:
            found = (fields[0], fields[1], None)
        else:
            ip, variant, user_id, name, scopes, role, expires_at, verified = fields
            found = (ip, variant, Identity(user_id, name, frozenset(scopes), role, expires_at, verified=verified))
        _read_tags[tag] = found
    return found


_read_tags: dict[bytes, ViewerTag] = {}


@dataclass(slots=True)
class LocalStream:
    """A stream with local viewers: its hub handle and its last few batches."""

    name: str
    handle: int
    viewers: int = 0
    replay: deque[ChannelMessage] = field(default_factory=lambda: deque(maxlen=REPLAY_BATCHES))
    # Control events (deletes, pins, modes) by arrival number, for viewers joining meanwhile.
    controls: deque[tuple[int, ChannelMessage]] = field(default_factory=lambda: deque(maxlen=REPLAY_BATCHES))


class LocalViewers:
    """Streams with viewers on this gateway, and connections per address."""

    def __init__(self, max_per_ip: int, release_stream: Callable[[str], None]) -> None:
        self.max_per_ip = max_per_ip
        self._release_stream = release_stream  # the node's release: one viewer fewer of a channel
        self._streams: dict[str, LocalStream] = {}
        self._by_handle: dict[int, LocalStream] = {}
        self._next_handle = ECHO_HANDLE + 1
        self._per_ip: dict[str, int] = {}

    def stream(self, name: str) -> LocalStream | None:
        return self._streams.get(name)

    def by_handle(self, handle: int) -> LocalStream | None:
        return self._by_handle.get(handle)

    def counts(self) -> dict[str, int]:
        """Viewers per stream (what engagement reports as this gateway's share)."""
        return {name: s.viewers for name, s in self._streams.items()}

    def from_ip(self, ip: str) -> int:
        return self._per_ip.get(ip, 0)

    def addresses(self) -> int:
        """How many addresses hold connections here."""
        return len(self._per_ip)

    def take_ip(self, ip: str) -> bool:
        """Count one more connection from ``ip``; False (nothing counted) when it is at the limit."""
        if self._per_ip.get(ip, 0) >= self.max_per_ip:
            return False
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        return True

    def release_ip(self, ip: str) -> None:
        left = self._per_ip.get(ip, 0) - 1
        if left > 0:
            self._per_ip[ip] = left
        else:
            self._per_ip.pop(ip, None)

    def joined(self, name: str) -> LocalStream:
        """One more viewer of ``name`` (its channel is subscribed already): its stream entry."""
        s = self._streams.get(name)
        if s is None:
            s = self._streams[name] = LocalStream(name, self._next_handle)
            self._by_handle[s.handle] = s
            self._next_handle += 1
        s.viewers += 1
        return s

    def left(self, handle: int, ip: str) -> None:
        """A viewer of the stream ``handle`` from ``ip`` is gone (or never got to the hub)."""
        self.release_ip(ip)
        s = self._by_handle.get(handle)
        if s is None:
            return
        s.viewers -= 1
        self._release_stream(s.name)
        if s.viewers <= 0:
            del self._streams[s.name]
            del self._by_handle[s.handle]
