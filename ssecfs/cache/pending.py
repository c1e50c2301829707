"""The bound on plaintext waiting in memory for the cache's sealer threads, counted in
chunks, with the hand-over in batches that keeps a fetcher from feeding the sealers one
chunk at a time."""

from __future__ import annotations

import threading


class Slots:
    """The bound on plaintext waiting for the sealers, in chunks. take() waits until
    `least` are free and takes up to `want` at once: a waiter never holds some while it
    waits for more (so waiters cannot deadlock each other), and a fetcher whose read unit
    does not fit hands it over in batches of `least` chunks, not one by one (each hand-over
    is a sealer job: a queue put, a thread wake-up, a GIL exchange)."""

    def __init__(self, total: int):
        self.total = total
        self.free = total
        self._cond = threading.Condition(threading.Lock())
        self._waits: list[int] = []      # the `least` of each waiter

    def take(self, want: int, least: int = 1) -> int:
        least = max(1, min(least, want, self.total))
        with self._cond:
            if self.free < least:
                self._waits.append(least)
                try:
                    while self.free < least:
                        self._cond.wait()
                finally:
                    self._waits.remove(least)
            got = min(want, self.free)
            self.free -= got
            return got

    def give(self, n: int = 1) -> None:
        with self._cond:
            self.free += n
            assert self.free <= self.total, "more slots given back than taken"
            if self._waits and self.free >= min(self._waits):
                self._cond.notify_all()      # (a wake-up per slot given back would cost
                                             # more than the batching saves)
