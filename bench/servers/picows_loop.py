"""Baseline: a plain picows + uvloop broadcast loop, written the usual way.

Each message is built once and handed to ``transport.send()`` of every viewer: one frame
and one write() per message per viewer. picows's defaults are kept (16 KiB read buffer),
as a newcomer would.
"""

from __future__ import annotations

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

from bench.servers.common import Publisher, bench_message, parse_args, serve_until_stopped

__all__ = ["main"]

viewers: set[WSTransport] = set()


class Viewer(WSListener):
    def on_ws_connected(self, transport: WSTransport) -> None:
        viewers.add(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        viewers.discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()


def publish(k: int, bt: int) -> None:
    payload = bench_message(k, bt)
    for transport in viewers:
        transport.send(WSMsgType.TEXT, payload)


async def serve() -> None:
    args = parse_args(__doc__ or "")
    server = await ws_create_server(lambda request: Viewer(), args.host, args.port)
    try:
        await serve_until_stopped(Publisher(args.rate, publish, args.paused))
    finally:
        server.close()


def main() -> None:
    uvloop.run(serve())


if __name__ == "__main__":
    main()
