"""Baseline: the ``websockets`` library's ``broadcast()`` (asyncio API, on uvloop).

Compression is off unless ``--deflate`` (websockets enables permessage-deflate by default;
the local baselines measured it off).
"""

from __future__ import annotations

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve

from bench.servers.common import Publisher, bench_message, parse_args, serve_until_stopped

__all__ = ["main"]

viewers: set[ServerConnection] = set()


async def handler(ws: ServerConnection) -> None:
    viewers.add(ws)
    try:
        await ws.wait_closed()
    finally:
        viewers.discard(ws)


def publish(k: int, bt: int) -> None:
    # Encodes the frame once and writes it to each open connection (text=True: a text frame
    # from bytes, no decode).
    broadcast(viewers, bench_message(k, bt), text=True)


async def run() -> None:
    args = parse_args(__doc__ or "")
    compression = "deflate" if args.deflate else None
    async with serve(handler, args.host, args.port, compression=compression,
                     backlog=1024):
        await serve_until_stopped(Publisher(args.rate, publish, args.paused))


def main() -> None:
    uvloop.run(run())


if __name__ == "__main__":
    main()
