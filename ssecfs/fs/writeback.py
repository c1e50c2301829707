"""Write-back scheduler: a delay queue of dirty items, a pool of upload workers, retry with
exponential backoff and jitter, and waiters (fsync, unmount) for durability.

It knows nothing of S3 or of the cache layout: it calls ``upload(item)``, which uploads the
item's current generation and returns normally once it is durable, raises StoreUnavailable
(or any other error) to be retried later. Transient errors are retried forever while the
mount lives; the data stays in the encrypted cache meanwhile.

Bursts: the coalescing delay is there for repeated saves of one file, which come within a
moment of each other. Once `burst` items or more wait (a `cp -r`, an untar, a build), and
until a delay has passed since then, an item untouched for `settle` seconds goes without
waiting out the rest of its delay: a burst of new files is then bound by the uploads, not by
the delay, to its last file.

Lock: _cond guards _due, _heap, _settled, _settle_heap, _in_flight, _attempts, _last_error,
_stopping.
An item is never uploaded by two workers at once; `quiesce(item)` removes it from the queue
and waits for an upload in flight to end (callers must not hold a lock `upload` takes).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
from typing import Callable, Hashable

from ..errors import StoreUnavailable

log = logging.getLogger("ssecfs.writeback")


class WriteBack:
    def __init__(self, upload: Callable[[Hashable], None], delay: float = 2.0, workers: int = 4,
                 max_backoff: float = 30.0, max_coalesce: float | None = None,
                 settle: float = 0.25, burst: int = 16):
        self._upload = upload
        self.delay = delay
        self.settle = min(settle, delay)
        self.burst = burst
        self.max_coalesce = max_coalesce if max_coalesce is not None else max(4 * delay, delay)
        self.max_backoff = max_backoff
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Hashable]] = []
        self._due: dict[Hashable, float] = {}
        self._first: dict[Hashable, float] = {}
        # items scheduled with the coalescing delay: when they may go during a burst
        self._settled: dict[Hashable, float] = {}
        self._settle_heap: list[tuple[float, int, Hashable]] = []
        self._burst_until = 0.0
        self._in_flight: set[Hashable] = set()
        self._attempts: dict[Hashable, int] = {}
        self._held: dict[Hashable, int] = {}      # items no worker may start (namespace ops)
        self._seq = itertools.count()
        self._stopping = False
        self.last_error: str | None = None
        self.uploads_done = 0
        self.upload_errors = 0
        self._threads = [threading.Thread(target=self._worker, name=f"upload-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    # -- queue --------------------------------------------------------------------------------
    def schedule(self, item: Hashable, delay: float | None = None) -> None:
        """(Re)schedule an upload. Repeated calls within the delay coalesce into one upload,
        but an item is never held back longer than max_coalesce after its first schedule."""
        now = time.monotonic()
        with self._cond:
            first = self._first.setdefault(item, now)
            d = self.delay if delay is None else delay
            due = min(now + d, first + self.max_coalesce) if d > 0 else now
            self._push(item, due)
            if delay is None and due > now + self.settle:
                self._settled[item] = at = now + self.settle
                heapq.heappush(self._settle_heap, (at, next(self._seq), item))
            if len(self._due) >= self.burst:
                self._burst_until = now + self.delay

    def _push(self, item: Hashable, due: float) -> None:
        """(Callers hold _cond.) Any earlier settle time of item no longer holds."""
        self._settled.pop(item, None)
        self._due[item] = due
        heapq.heappush(self._heap, (due, next(self._seq), item))
        self._cond.notify_all()

    def quiesce(self, item: Hashable) -> bool:
        """Take item out of the queue and wait until no upload of it is in flight.
        Returns True if it was queued (the caller re-schedules it if still needed)."""
        with self._cond:
            was = self._due.pop(item, None) is not None
            self._first.pop(item, None)
            self._settled.pop(item, None)
            while item in self._in_flight:
                self._cond.wait(timeout=1.0)
            was = (self._due.pop(item, None) is not None) or was   # a failed attempt re-queues
            self._attempts.pop(item, None)
            return was

    def hold(self, item: Hashable) -> None:
        """No upload of item starts until unhold(); one in flight goes on (see wait_idle)."""
        with self._cond:
            self._held[item] = self._held.get(item, 0) + 1

    def wait_idle(self, item: Hashable) -> None:
        with self._cond:
            while item in self._in_flight:
                self._cond.wait(timeout=1.0)

    def unhold(self, item: Hashable) -> None:
        with self._cond:
            n = self._held.get(item, 0) - 1
            if n > 0:
                self._held[item] = n
                return
            self._held.pop(item, None)
            if item in self._due:
                self._push(item, self._due[item])

    def wait(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Block until predicate() holds (checked after every upload attempt)."""
        deadline = None if timeout is None or timeout <= 0 else time.monotonic() + timeout
        with self._cond:
            while not predicate():
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(timeout=min(left, 1.0))
                else:
                    self._cond.wait(timeout=1.0)
            return True

    def expedite(self, item: Hashable) -> None:
        """Upload now (fsync, unmount): skip the coalescing delay and any backoff."""
        with self._cond:
            self._push(item, time.monotonic())

    def expedite_all(self) -> None:
        with self._cond:
            now = time.monotonic()
            for item in list(self._due):
                self._push(item, now)

    def pending(self) -> int:
        with self._cond:
            return len(self._due) + len(self._in_flight - set(self._due))

    def in_flight(self) -> int:
        with self._cond:
            return len(self._in_flight)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5)

    # -- workers ------------------------------------------------------------------------------
    def _next(self) -> Hashable | None:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                while self._heap:
                    due, _, item = self._heap[0]
                    if self._due.get(item) != due:
                        heapq.heappop(self._heap)      # stale heap record
                        continue
                    if item in self._in_flight or item in self._held:
                        # stays in _due; re-queued when the upload ends / the hold is released
                        heapq.heappop(self._heap)
                        continue
                    if due > now:
                        break
                    heapq.heappop(self._heap)
                    return self._take(item)
                settled = self._settled_item(now)
                if settled is not None:
                    return self._take(settled)
                wait = (self._heap[0][0] - now) if self._heap else 1.0
                if self._settle_heap and now < self._burst_until:
                    wait = min(wait, self._settle_heap[0][0] - now)
                self._cond.wait(timeout=max(0.005, min(wait, 1.0)))
            return None

    def _take(self, item: Hashable) -> Hashable:
        del self._due[item]
        self._first.pop(item, None)
        self._settled.pop(item, None)
        self._in_flight.add(item)
        return item

    def _settled_item(self, now: float) -> Hashable | None:
        """During a burst, the item untouched the longest if it has settled (its entry in
        _due stays: taking it is _take's)."""
        if now >= self._burst_until:
            return None
        h = self._settle_heap
        while h:
            at, _, item = h[0]
            if self._settled.get(item) != at or item in self._in_flight or item in self._held:
                heapq.heappop(h)      # stale, or re-queued by the end of an upload or a hold
                continue
            if at > now:
                return None
            heapq.heappop(h)
            return item
        return None

    def _worker(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            retry_in = None
            try:
                self._upload(item)
                with self._cond:
                    self._attempts.pop(item, None)
                    self.uploads_done += 1
            except Exception as e:  # noqa: BLE001 - every failure is retried; data stays cached
                with self._cond:
                    n = self._attempts.get(item, 0) + 1
                    self._attempts[item] = n
                    self.upload_errors += 1
                    self.last_error = f"{type(e).__name__}: {e}"
                retry_in = min(self.max_backoff, 0.2 * 2 ** min(n, 10)) * random.uniform(0.5, 1.0)
                level = logging.WARNING if isinstance(e, StoreUnavailable) else logging.ERROR
                log.log(level, "upload of %s failed (attempt %d, retry in %.1fs): %s",
                        item, n, retry_in, self.last_error,
                        exc_info=not isinstance(e, (StoreUnavailable,)) and log.isEnabledFor(logging.DEBUG))
            finally:
                with self._cond:
                    self._in_flight.discard(item)
                    if item in self._due:           # changed again while uploading
                        due = self._due[item]
                        if retry_in is not None:
                            due = max(due, time.monotonic() + retry_in)
                        self._push(item, due)
                    elif retry_in is not None:
                        self._push(item, time.monotonic() + retry_in)
                    self._cond.notify_all()
