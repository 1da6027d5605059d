"""Chorus itself: the real gateway on the embedded default, fed where Redis Pub/Sub would be.

Only two entry points are used, the ones that stay stable while the hub is rewritten:
``App.build(...)``/``app.start()`` and ``app.gateway.node.on_message(stream, data)``. Each
published message is one comment batch on stream ``bench`` (viewers connect to
``/ws?stream=bench``), packed as the coordinator would publish it. ``--deflate`` has no effect
yet: the loadgen offers it and uses it if the gateway accepts.
"""

from __future__ import annotations

import json
import logging
import tempfile

import uvloop

from bench.servers.common import Publisher, parse_args, serve_until_stopped
from chorus.app import App
from chorus.config import load_config
from chorus.protocol import pack_channel_message

__all__ = ["main"]

STREAM = "bench"
TEXT = "nice play!"  # short: Chorus's envelope is already ~190 bytes of the ~200


def event_json(offset: int, bt: int) -> bytes:
    """A one-comment batch event as the coordinator builds it (~200 bytes)."""
    comment = {"id": str(offset), "stream": STREAM, "user": {"id": "1", "name": "bench", "badges": []},
               "text": TEXT, "ts": bt // 1_000_000, "bt": bt}
    event = {"t": "batch", "stream": STREAM, "epoch": "e", "offset": offset, "comments": [comment]}
    return json.dumps(event, separators=(",", ":")).encode()


async def run() -> None:
    args = parse_args(__doc__ or "")
    logging.basicConfig(level=logging.WARNING)
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="chorus-bench-")
    config = load_config(env={}, gateway__port=args.port, gateway__host=args.host, data_dir=data_dir,
                         gateway__max_connections_per_ip=1_000_000, log_level="WARNING")
    app = await App.build(config)
    await app.start()
    assert app.gateway is not None
    node = app.gateway.node

    def publish(offset: int, bt: int) -> None:
        node.on_message(STREAM, pack_channel_message(event_json(offset, bt), offset, 1))

    try:
        await serve_until_stopped(Publisher(args.rate, publish, args.paused))
    finally:
        await app.stop()


def main() -> None:
    uvloop.run(run())


if __name__ == "__main__":
    main()
