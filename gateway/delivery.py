"""Delivery: a stream's events from the broker (through the node) to its viewers in the hub.

Each event is encoded once per wire the stream's viewers use and handed to the hub, which
fans the same bytes out (native/HUB.md). The last few batches and control events of every
stream are kept, so a viewer whose welcome was read while they arrived still gets them
(:meth:`Delivery.missed`). Events for this gateway's own control channel (no viewers, see
gateway/modapi.py) go to the moderation's handler instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Protocol

import msgpack

from chorus import native
from chorus.gateway.viewers import LocalStream, LocalViewers
from chorus.protocol import JSON, ChannelMessage, Wire

__all__ = ["REPLAYED_CONTROLS", "ControlChannel", "Delivery", "PublishClock"]

# Control events a viewer joining meanwhile must not miss (not the periodic counts: the next
# one comes anyway). Every event is compact JSON starting with its type.
REPLAYED_CONTROLS = (b'{"t":"delete"', b'{"t":"restore"', b'{"t":"pin"', b'{"t":"unpin"', b'{"t":"mode"')
# variants() has a bit per (variant & 3): plain and deflated viewers of one encoding both need
# that encoding's payload (the hub compresses it once for the deflated ones).
_JSON_BITS = (1 << native.hub.JSON) | (1 << (native.hub.JSON | native.hub.DEFLATE))
_MSGPACK_BITS = (1 << native.hub.MSGPACK) | (1 << (native.hub.MSGPACK | native.hub.DEFLATE))


class PublishClock(Protocol):
    """Times stamped batches from publish to the hub's write (chorus/metrics.py DeliveryClock)."""

    def published(self, handle: int, published_us: int) -> None: ...

    def polled(self) -> None: ...


class ControlChannel(Protocol):
    """This gateway's control channel (gateway/modapi.py): a broker stream without viewers."""

    def owns(self, stream: str) -> bool: ...

    def on_control(self, message: ChannelMessage) -> None: ...


class Delivery:
    """Feeds the hub each stream's events; remembers the recent ones for joining viewers."""

    def __init__(self, hub: native.Hub, viewers: LocalViewers, arm_timer: Callable[[], None],
                 clock: PublishClock | None = None, control: ControlChannel | None = None) -> None:
        self.hub = hub
        self.viewers = viewers
        self.arm_timer = arm_timer  # the hub's next deadline may have moved (a flush is due)
        self.clock = clock
        self.control = control
        self.controls_seen = 0  # control events delivered so far (numbers LocalStream.controls)

    def deliver(self, stream: str, message: ChannelMessage) -> None:
        """An event from the broker for a stream this gateway has viewers of."""
        s = self.viewers.stream(stream)
        if s is None:
            if self.control is not None and self.control.owns(stream):
                self.control.on_control(message)
            return
        if message.offset is not None:
            s.replay.append(message)
        elif message.event_json.startswith(REPLAYED_CONTROLS):
            self.controls_seen += 1
            s.controls.append((self.controls_seen, message))
        mask = self.hub.variants(s.handle)
        as_json = message.event_json if mask & _JSON_BITS else None
        as_msgpack = msgpack.packb(json.loads(message.event_json)) if mask & _MSGPACK_BITS else None
        self.hub.publish(s.handle, (as_json, as_msgpack), message.offset is None, message.count)
        if message.published_us and self.clock is not None:
            self.clock.published(s.handle, message.published_us)
        self.arm_timer()

    def missed(self, s: LocalStream, cache_offset: int, controls_before: int, wire: Wire) -> list[bytes]:
        """What ``s`` published after a welcome read at ``cache_offset`` (batches past it, then
        control events numbered past ``controls_before``: after the batches they may name)."""
        found = [m for m in s.replay if m.offset is not None and m.offset > cache_offset]
        found += [m for n, m in s.controls if n > controls_before]
        return [m.event_json if wire == JSON else msgpack.packb(json.loads(m.event_json)) for m in found]
