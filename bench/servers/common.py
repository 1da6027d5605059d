"""What every Python bench server shares: options, the message, the publisher and stdin control.

The publisher keeps a schedule: message k is due at start + k/rate and is stamped with that
due time (``bt``, CLOCK_MONOTONIC ns), not with the time the loop got round to it. A server
that cannot keep up then shows its backlog as latency instead of silently publishing less
(coordinated omission). Messages found due at one tick are published back to back.

stdin carries commands from the harness: ``start`` begins the schedule when the server was
started ``--paused`` (so viewers connect to an idle server: a busy one would starve its own
handshakes), ``burst N`` publishes N messages at once, all stamped now. When stdin is a pipe
and it closes, the server stops: a harness that died without cleaning up leaves no server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import stat
import sys
import time
from collections.abc import Callable

__all__ = ["Publisher", "bench_message", "parse_args", "serve_until_stopped"]

TEXT = "nice play!"


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, default=0.0, help="messages per second (0: only bursts)")
    p.add_argument("--paused", action="store_true", help="publish nothing until 'start' on stdin")
    p.add_argument("--deflate", action="store_true", help="accept permessage-deflate if supported")
    p.add_argument("--data-dir", default="", help="scratch directory (chorus only)")
    return p.parse_args()


def bench_message(k: int, bt: int) -> bytes:
    """The baselines' message: the shape and size of a Chorus one-comment batch (~200 B), as
    floor.c and servers/chorus_gateway.py send it, so every server moves the same bytes."""
    return (b'{"t":"batch","stream":"bench","epoch":"e","offset":%d,"comments":[{"id":"%d","stream":"bench",'
            b'"user":{"id":"1","name":"bench","badges":[]},"text":"%s","ts":%d,"bt":%d}]}'
            % (k, k, TEXT.encode(), bt // 1_000_000, bt))


class Publisher:
    """Calls ``publish(k, bt)`` for each message at ``rate`` per second, on schedule."""

    def __init__(self, rate: float, publish: Callable[[int, int], None], paused: bool = False,
                 tick_s: float = 0.001) -> None:
        self.rate = rate
        self.publish = publish
        self.tick_s = tick_s
        self.sent = 0
        self.started = asyncio.Event()
        if not paused:
            self.started.set()

    async def run(self) -> None:
        await self.started.wait()
        if self.rate <= 0:
            return
        t0 = time.monotonic_ns()
        period_ns = 1e9 / self.rate
        scheduled = 0
        while True:
            due = int((time.monotonic_ns() - t0) / period_ns)
            while scheduled < due:
                scheduled += 1
                self.sent += 1
                self.publish(self.sent, t0 + int(scheduled * period_ns))
            await asyncio.sleep(self.tick_s)

    def burst(self, n: int) -> None:
        bt = time.monotonic_ns()
        for _ in range(n):
            self.sent += 1
            self.publish(self.sent, bt)

    def watch_stdin(self, stop: asyncio.Event) -> None:
        """Obey ``burst N`` lines on stdin; set ``stop`` when a stdin pipe closes."""
        loop = asyncio.get_running_loop()
        fd = sys.stdin.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return  # a terminal or a file: no controller

        def readable() -> None:
            data = os.read(fd, 4096)
            if not data:
                loop.remove_reader(fd)
                stop.set()
                return
            for line in data.decode().splitlines():
                parts = line.split()
                if parts == ["start"]:
                    self.started.set()
                elif len(parts) == 2 and parts[0] == "burst":
                    self.burst(int(parts[1]))

        loop.add_reader(fd, readable)


async def serve_until_stopped(publisher: Publisher) -> None:
    """Run the publisher until SIGTERM, SIGINT or the end of a stdin pipe."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    publisher.watch_stdin(stop)
    task = asyncio.ensure_future(publisher.run())
    await stop.wait()
    task.cancel()
