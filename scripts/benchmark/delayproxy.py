"""A TCP proxy on loopback that delays each direction by half a round trip (`--rtt MS`).

It forwards bytes and nothing else, so TLS passes through untouched. Each direction of each
connection is a delay line: a chunk read at time t is written on at t + MS/2, whatever came
before it, so the delay adds latency without capping bandwidth (nothing waits for one chunk's
delay before reading the next). Bytes held in a line are bounded (WINDOW, like a TCP window
grown to its maximum): past that the proxy stops reading from that side until the line drains,
which is the back pressure TCP itself would give.

A new connection also waits one round trip before its first bytes go on, as a TCP handshake
would cost: the client's connect() returns at once on loopback, so without this every new
connection would be a round trip cheaper than on a real network. (A TLS handshake's round
trips are bytes like any other and are delayed as such.)

One asyncio loop in its own process (benchmark.rtt starts it): the benchmark reads the
proxy's CPU time from /proc per step, and asks it for its counters with a line "stats" on
stdin (answer: one JSON line of the counters since the last such question: bytes forwarded,
connections accepted, and how late its release timers fired, which shows whether the proxy
kept up). It raises its own priority when allowed (raise_priority).

    python -m benchmark.delayproxy --rtt-ms 20 --to 127.0.0.1:8333 [--to ...]
    # prints "ready nice=N PORT ..." (one loopback port per --to, in order), then serves
    # until EOF on stdin or SIGTERM
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import ipaddress
import json
import os
import signal
import sys

WINDOW = 32 * 1024 * 1024    # bytes held per direction before reading from that side pauses
READ_SIZE = 1024 * 1024       # bytes read from a socket at once
SEND_BUFFER = 256 * 1024      # bytes asyncio may hold for a socket before the line waits
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # mallopt(3)
CLOSE, RESET = object(), object()   # queued after the data: the peer closed / reset


class Stats:
    def __init__(self):
        self.bytes = 0
        self.connections = 0
        self.late_max = 0.0          # s: the latest a release timer fired after its time
        self.late_sum = 0.0
        self.timers = 0              # release timers fired
        self.paused = 0              # times a side stopped being read (WINDOW full)

    def take(self) -> dict:
        """The counters since the last take(), which starts them again."""
        out = {"bytes": self.bytes, "connections": self.connections, "timers": self.timers,
               "late_max_ms": round(self.late_max * 1000, 3), "paused": self.paused,
               "late_mean_ms": round(self.late_sum / self.timers * 1000, 3) if self.timers
               else 0.0}
        self.__init__()
        return out


class Line:
    """One direction of one connection: chunks read from `src`, written to `dst` `delay`
    seconds after they were read, in order. Runs on the loop's thread only (no lock).

    A released chunk is handed to dst only while dst's own buffer is below SEND_BUFFER
    (`blocked` otherwise, until dst's protocol hears resume_writing): asyncio's transport
    buffer (3.11) moves its whole remainder after each partial send, so a big one would cost
    the loop more than the forwarding itself."""

    def __init__(self, loop, delay: float, not_before: float, stats: Stats):
        self.loop = loop
        self.delay = delay
        self.not_before = not_before     # loop time before which nothing is released
        self.stats = stats
        self.src = None                  # transports, set as each side connects
        self.dst = None
        self.queue: collections.deque = collections.deque()   # (release, bytes|CLOSE|RESET)
        self.held = 0                    # bytes in the queue
        self.timer = None                # set for the release time of the queue's head
        self.paused = False              # src is not being read (WINDOW full)
        self.blocked = False             # dst's buffer is full
        self.ended = False               # dst's write side is done

    def push(self, item) -> None:
        if self.ended:                   # dst is gone: what still comes is dropped
            return
        now = self.loop.time()
        release = max(now + self.delay, self.not_before)
        self.queue.append((release, item))
        if isinstance(item, bytes):
            self.held += len(item)
            self.stats.bytes += len(item)
        if self.timer is None and not self.blocked:
            if release <= now:
                self.flush()
            else:
                self.timer = self.loop.call_at(release, self.on_timer, release)
        if not self.paused and self.backlog() > WINDOW:
            self.paused = True
            self.stats.paused += 1
            self.src.pause_reading()

    def backlog(self) -> int:
        return self.held + (self.dst.get_write_buffer_size() if self.dst is not None else 0)

    def on_timer(self, when: float) -> None:
        late = self.loop.time() - when
        self.stats.late_max = max(self.stats.late_max, late)
        self.stats.late_sum += late
        self.stats.timers += 1
        self.timer = None
        self.flush()

    def flush(self) -> None:
        """Hand dst every released chunk it can take now; a timer for the next one."""
        if self.dst is None or self.timer is not None or self.ended:
            return                       # still connecting / not yet due / dst gone
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now and not self.blocked:
            release, item = self.queue.popleft()
            if not isinstance(item, bytes):
                self.end(item)
                return
            self.held -= len(item)
            self.dst.write(item)         # may call pause_writing: blocked
        if self.queue and not self.blocked and self.queue[0][0] > now:
            self.timer = self.loop.call_at(self.queue[0][0], self.on_timer, self.queue[0][0])
        self.maybe_resume()

    def end(self, how) -> None:
        """The source closed (CLOSE: pass the FIN on) or was reset (RESET: reset dst)."""
        self.ended = True
        self.queue.clear()
        if how is RESET:
            self.dst.abort()
            return
        try:
            self.dst.write_eof()
        except OSError:                  # dst's peer is already gone, unseen by asyncio yet
            self.dst.abort()
            return
        self.dst.get_protocol().maybe_close()

    def maybe_resume(self) -> None:
        if self.paused and self.backlog() < WINDOW // 2 and not self.src.is_closing():
            self.paused = False
            self.src.resume_reading()


class Side(asyncio.Protocol):
    """One socket of a proxied connection: what it reads enters the line `out`; the line
    `feed` writes to it."""

    def __init__(self, out: Line, feed: Line):
        self.out = out
        self.feed = feed
        self.transport = None
        self.eof = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=SEND_BUFFER, low=SEND_BUFFER // 4)
        transport.max_size = READ_SIZE   # asyncio's own is 256 KiB: fewer, bigger chunks
        self.out.src = transport
        self.feed.dst = transport
        self.feed.flush()                # what the other side sent while this one connected

    def data_received(self, data: bytes) -> None:
        self.out.push(data)

    def eof_received(self):
        self.eof = True
        self.out.push(CLOSE)
        self.maybe_close()
        return True                      # keep writing to it (half-close)

    def maybe_close(self) -> None:
        """Both directions done: close the socket (after what is buffered for it)."""
        if self.eof and self.feed.ended:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if not self.eof:                 # a reset, or closed without a FIN: pass it on
            self.eof = True
            self.out.push(RESET if exc is not None else CLOSE)
        self.feed.ended = True           # nothing more can be written to this socket
        self.feed.queue.clear()

    def pause_writing(self) -> None:
        self.feed.blocked = True

    def resume_writing(self) -> None:
        self.feed.blocked = False
        # Not from inside this callback: asyncio (3.11) calls it half-way through its own
        # write handler, which would then close a transport that flush() closed already.
        asyncio.get_running_loop().call_soon(self.feed.flush)


class Proxy:
    def __init__(self, rtt: float, stats: Stats):
        self.delay = rtt / 2
        self.stats = stats
        self.loop = asyncio.get_running_loop()

    async def serve(self, upstream: tuple[str, int]) -> int:
        server = await self.loop.create_server(
            lambda: self._accept(upstream), "127.0.0.1", 0, reuse_address=True, backlog=512)
        return server.sockets[0].getsockname()[1]

    def _accept(self, upstream) -> asyncio.Protocol:
        self.stats.connections += 1
        now = self.loop.time()
        # the client's first bytes reach the server as if after a TCP handshake
        up = Line(self.loop, self.delay, now + 3 * self.delay, self.stats)
        down = Line(self.loop, self.delay, now, self.stats)
        client = Side(up, down)
        self.loop.create_task(self._connect(upstream, client, up, down))
        return client

    async def _connect(self, upstream, client: Side, up: Line, down: Line) -> None:
        try:
            await self.loop.create_connection(lambda: Side(down, up), *upstream)
        except OSError:
            client.transport.abort()


def loopback(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"delayproxy: {host} is not a loopback address")
    return host, int(port)


def keep_freed_memory() -> None:
    """Every chunk is a new bytes object of up to READ_SIZE. glibc would map big ones anew
    and give freed heap back to the kernel, so their pages would fault in again and again
    (dear on a VM, and CPU the proxy would take from the processes under test). Keep them
    on the heap, and keep the heap (the delay lines bound it)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 1024 * 1024 * 1024)


def raise_priority() -> int:
    """The proxy stands for the network, which does not wait for a CPU: ahead of the
    processes under test (nice -10) when allowed, so that a busy machine does not delay its
    timers. Returns the niceness it runs at."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except OSError:
        pass
    return os.getpriority(os.PRIO_PROCESS, 0)


async def main_async(rtt_ms: float, upstreams: list[tuple[str, int]]) -> None:
    nice = raise_priority()
    keep_freed_memory()
    stats = Stats()
    proxy = Proxy(rtt_ms / 1000, stats)
    ports = [await proxy.serve(u) for u in upstreams]
    print(f"ready nice={nice} " + " ".join(map(str, ports)), flush=True)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)

    def on_stdin() -> None:
        line = sys.stdin.readline()
        if not line:
            done.set()
        elif line.strip() == "stats":
            print(json.dumps(stats.take()), flush=True)
    loop.add_reader(sys.stdin.fileno(), on_stdin)
    await done.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rtt-ms", type=float, required=True)
    p.add_argument("--to", action="append", required=True, metavar="HOST:PORT",
                   help="an upstream on loopback; one listening port each")
    a = p.parse_args(argv)
    if a.rtt_ms < 0:
        p.error("--rtt-ms must be >= 0")
    asyncio.run(main_async(a.rtt_ms, [loopback(t) for t in a.to]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
