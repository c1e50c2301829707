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

Batches: given upload_many, a worker takes up to `batch` small items ready at once and
hands them over together, to be sent all in flight at once without a thread each. A batch
forms only when items wait for a worker: on a distant endpoint, where each upload waits a
round trip, the workers are busy and the round trip is paid once per batch instead of once
per file; close by, uploads end fast and batches stay small.

Lock: _cond guards _due, _heap, _settled, _settle_heap, _in_flight, _attempts, _last_error,
_stopping. Idle workers wait on _work (the same lock), woken one at a time: a new item wakes
one worker, which wakes the next if more are ready. Waking them all for every item (a burst
of a thousand files, 32 workers) costs more CPU than the uploads. Waiters for durability
(wait, quiesce, wait_idle) wait on _cond, notified at the end of every upload.
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
                 settle: float = 0.25, burst: int = 16,
                 upload_many: Callable[[list], list] | None = None,
                 small: Callable[[Hashable], bool] = lambda item: False, batch: int = 8):
        self._upload = upload
        self._upload_many = upload_many       # [item] -> [None or the exception], in order
        self._small = small                   # called under _cond: must take no lock
        self.batch = batch
        self.delay = delay
        self.settle = min(settle, delay)
        self.burst = burst
        self.max_coalesce = max_coalesce if max_coalesce is not None else max(4 * delay, delay)
        self.max_backoff = max_backoff
        lock = threading.RLock()       # a wait() predicate may call pending()
        self._cond = threading.Condition(lock)
        self._work = threading.Condition(lock)
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
        self._work.notify()

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
            self._work.notify_all()
        for t in self._threads:
            t.join(timeout=5)

    # -- workers ------------------------------------------------------------------------------
    def _next(self) -> list[Hashable]:
        """The items a worker uploads next: one, or with upload_many, up to `batch` small
        ones ready now. [] when stopping."""
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                item = self._ready(now, None)
                if item is not None:
                    out = [item]
                    if self._upload_many is not None and self._small(item):
                        while len(out) < self.batch:
                            more = self._ready(now, self._small)
                            if more is None:
                                break
                            out.append(more)
                    return out
                wait = (self._heap[0][0] - now) if self._heap else 1.0
                if self._settle_heap and now < self._burst_until:
                    wait = min(wait, self._settle_heap[0][0] - now)
                self._work.wait(timeout=max(0.005, min(wait, 1.0)))
            return []

    def _ready(self, now: float, only: Callable[[Hashable], bool] | None) -> Hashable | None:
        """(Caller holds _cond.) Take the next item due (or, during a burst, settled) now;
        with `only`, none if that item is not one of those."""
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
            if only is not None and not only(item):
                return None
            heapq.heappop(self._heap)
            return self._take(item, now)
        settled = self._settled_item(now, only)
        return None if settled is None else self._take(settled, now)

    def _take(self, item: Hashable, now: float) -> Hashable:
        del self._due[item]
        self._first.pop(item, None)
        self._settled.pop(item, None)
        self._in_flight.add(item)
        if (self._heap and self._heap[0][0] <= now) or (
                now < self._burst_until and self._settle_heap
                and self._settle_heap[0][0] <= now):
            self._work.notify()          # more is ready (or a stale record: it goes back)
        return item

    def _settled_item(self, now: float, only=None) -> Hashable | None:
        """During a burst, the item untouched the longest if it has settled (and is one of
        `only`); its entry in _due stays: taking it is _take's."""
        if now >= self._burst_until:
            return None
        h = self._settle_heap
        while h:
            at, _, item = h[0]
            if self._settled.get(item) != at or item in self._in_flight or item in self._held:
                heapq.heappop(h)      # stale, or re-queued by the end of an upload or a hold
                continue
            if at > now or (only is not None and not only(item)):
                return None
            heapq.heappop(h)
            return item
        return None

    def _worker(self) -> None:
        while True:
            items = self._next()
            if not items:
                return
            if len(items) == 1:
                results = [self._attempt(items[0])]
            else:
                try:
                    results = self._upload_many(items)
                except Exception as e:  # noqa: BLE001 - each is retried
                    results = [e] * len(items)
            for item, error in zip(items, results):
                self._finish(item, error)

    def _attempt(self, item: Hashable) -> Exception | None:
        try:
            self._upload(item)
            return None
        except Exception as e:  # noqa: BLE001 - every failure is retried; data stays cached
            return e

    def _finish(self, item: Hashable, error: Exception | None) -> None:
        """The end of an attempt: count it, re-queue the item if it failed (backoff) or
        changed meanwhile, and wake the waiters."""
        retry_in = None
        with self._cond:
            if error is None:
                self._attempts.pop(item, None)
                self.uploads_done += 1
            else:
                n = self._attempts.get(item, 0) + 1
                self._attempts[item] = n
                self.upload_errors += 1
                self.last_error = f"{type(error).__name__}: {error}"
                retry_in = min(self.max_backoff, 0.2 * 2 ** min(n, 10)) * random.uniform(0.5, 1.0)
        if error is not None:
            level = logging.WARNING if isinstance(error, StoreUnavailable) else logging.ERROR
            log.log(level, "upload of %s failed (attempt %d, retry in %.1fs): %s",
                    item, n, retry_in, self.last_error,
                    exc_info=(error if not isinstance(error, StoreUnavailable)
                              and log.isEnabledFor(logging.DEBUG) else None))
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
