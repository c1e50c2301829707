"""The delay proxy of --rtt (benchmark/delayproxy.py) as a child process of the benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from . import delayproxy
from .common import proc_cpu, stop_process


class DelayProxy:
    """start() it in front of upstreams, url() to route an endpoint through it, mark() and
    step() around each step for what it did, stop() it."""

    def __init__(self, rtt_ms: float):
        self.rtt_ms = rtt_ms
        self.proc: subprocess.Popen | None = None
        self.ports: dict[tuple[str, int], int] = {}
        self.nice = 0
        self._mark = (0.0, 0.0)

    def start(self, upstreams: list[tuple[str, int]]) -> "DelayProxy":
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(delayproxy.__file__), "--rtt-ms", f"{self.rtt_ms:g}",
             *[a for h, p in upstreams for a in ("--to", f"{h}:{p}")]],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "ready":
            self.stop()
            raise RuntimeError("the delay proxy did not start")
        self.nice = int(line[1].split("=")[1])
        self.ports = dict(zip(upstreams, map(int, line[2:])))
        self.mark()
        return self

    def url(self, url: str) -> str:
        """The same endpoint URL, through the proxy (the host name stays, for TLS)."""
        scheme, rest = url.split("://", 1)
        host, port = rest.rsplit(":", 1)
        return f"{scheme}://{host}:{self.ports[('127.0.0.1', int(port))]}"

    def mark(self) -> None:
        """Start a step: its CPU time and counters count from here."""
        self._ask()
        self._mark = (proc_cpu(self.proc.pid), time.monotonic())

    def step(self) -> dict:
        """What the proxy did since mark(): CPU-s, wall s, and its counters."""
        cpu = proc_cpu(self.proc.pid) - self._mark[0]
        return {"cpu_s": cpu, "wall_s": time.monotonic() - self._mark[1], **self._ask()}

    def _ask(self) -> dict:
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        """Closing its stdin ends it."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        stop_process(self.proc, 10)
        self.proc = None
