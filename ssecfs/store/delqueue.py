"""The deletes waiting to be sent, and their sender (for deferred.DeferredDeletes).

A delete is a tombstone: journaled (deljournal.DeleteJournal), queued, then sent by a
background thread in DeleteObjects requests of up to DELETE_MAX keys, up to STREAMS at
once, a key waiting at most `delay` for others to share its request. Failed requests are
retried with backoff for as long as the queue lives. A key whose delete is done is remembered RECENT_S
seconds (a listing sent before then may still show it). The ETags seen of live objects are
kept so that a delete replayed after a restart removes only the object that was deleted.

Lock order: `cv` is a leaf lock: no store request is made while it is held.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor

from cachetools import LRUCache

from .contract import DELETE_MAX
from .deljournal import JOURNAL_MAX, DeleteJournal
from ..errors import NotFound, StoreUnavailable

log = logging.getLogger("ssecfs.deletes")

DELETE_DELAY = 0.05          # s a key waits for others to go in the same request
STREAMS = 4                  # DeleteObjects requests at once
# SeaweedFS works through one DeleteObjects key by key: many keys go faster as a few requests
# at once (of at least MIN_BATCH keys each) than as one
MIN_BATCH = 25
WRITE_WAIT = 60.0            # s a write waits for the delete before it (then EIO)
RETRY_MIN, RETRY_MAX = 0.5, 30.0
ETAGS_KEPT = 100_000         # ETags seen, so that a replayed delete knows what it deleted
MTIME_MARGIN = 2.0           # s: an object modified this close to its journaled delete stays
RECENT_S = 60.0              # s a done delete is remembered (for listings sent before it)


class _Tomb:
    __slots__ = ("key", "seq", "etag", "t", "replay", "sent")

    def __init__(self, key: str, seq: int, etag: str | None, t: float, replay: bool = False):
        self.key, self.seq, self.etag, self.t, self.replay = key, seq, etag, t, replay
        self.sent = False


class DeleteQueue:
    """Deletes of keys of `store` (its delete_many and head), journaled in `journal`."""

    def __init__(self, store, journal: DeleteJournal | None = None,
                 delay: float = DELETE_DELAY):
        self._store = store
        self._journal = journal
        self.delay = delay
        self.cv = threading.Condition()
        self._tombs: dict[str, _Tomb] = {}
        self._under: Counter[str] = Counter()     # "a/" -> pending deletes of keys under it
        self._queue: deque[_Tomb] = deque()
        self._inflight: set[str] = set()
        self._batches = 0
        self._urgent = False
        self._retry_at = 0.0
        self._backoff = RETRY_MIN
        self._seq = 0
        self._stop = False
        self._etags = LRUCache(maxsize=ETAGS_KEPT)
        # key -> when its delete was done: a listing sent before then may still show it
        self._recent: OrderedDict[str, float] = OrderedDict()
        self.deletes_done = 0
        self.last_error: str | None = None
        self._pool = ThreadPoolExecutor(max_workers=STREAMS, thread_name_prefix="delete")
        self._thread = threading.Thread(target=self._run, name="deletes", daemon=True)
        self._thread.start()

    # -- start, stop ---------------------------------------------------------------------------
    def recover(self) -> int:
        """Take up the deletes a previous daemon journaled and did not finish; start a fresh
        journal. Returns how many."""
        if self._journal is None:
            return 0
        pending = self._journal.load()
        self._journal.start(pending)
        with self.cv:
            for seq, key, etag, t in pending:
                self._seq = max(self._seq, seq)
                self._add(_Tomb(key, seq, etag, t, replay=True))
            self.cv.notify_all()
        if pending:
            log.info("%d delete(s) journaled by the previous daemon: sending them", len(pending))
        return len(pending)

    def close(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify_all()
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._journal is not None:
            self._journal.close()

    # -- what is pending -----------------------------------------------------------------------
    def pending(self, prefix: str = "") -> int:
        with self.cv:
            return sum(1 for k in self._tombs if k.startswith(prefix))

    def flush(self, prefix: str = "", timeout: float | None = None) -> bool:
        """Wait until the deletes of keys under prefix are done (True) or timeout passes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cv:
            while any(k.startswith(prefix) for k in self._tombs):
                self._urgent = True
                self.cv.notify_all()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.cv.wait(timeout=left if left is not None else 1.0)
        return True

    def status(self) -> dict:
        with self.cv:
            return {"deletes_pending": len(self._tombs), "deletes_done": self.deletes_done,
                    "delete_error": self.last_error}

    def gone(self, key: str) -> bool:
        """Whether key's delete is pending (the key is then absent)."""
        return key in self._tombs

    def gone_since(self, sent: float):
        """Caller holds cv for each call of the predicate it returns: whether a key is absent
        from a listing sent at `sent` (monotonic): being deleted, or deleted since."""
        return lambda k: k in self._tombs or self._recent.get(k, -1.0) >= sent

    def keys_known(self):
        """Caller holds cv: the keys being deleted and those deleted lately."""
        return (*self._tombs, *self._recent)

    def seen(self, key: str, etag: str | None) -> None:
        """Caller holds cv: the ETag of a live object (for a replayed delete)."""
        if etag:
            self._etags[key] = etag

    # -- deletes -------------------------------------------------------------------------------
    def add(self, keys: list[str]) -> bool:
        """Journal and queue the deletes of keys (True), or False when the journal could not be
        written: the caller then deletes them at once."""
        now = time.time()
        with self.cv:
            new = []
            for key in dict.fromkeys(keys):
                if key in self._tombs:
                    continue
                self._seq += 1
                new.append(_Tomb(key, self._seq, self._etags.get(key), now))
            if not new:
                return True
            if self._journal is not None:
                try:
                    self._journal.append([{"add": [t.seq, t.key, t.etag, t.t]} for t in new])
                except OSError as e:
                    log.warning("delete journal not written (%s): deleting %d key(s) now",
                                e, len(new))
                    return False
            for t in new:
                self._add(t)
            if len(new) > 1:      # already a batch (a moved tree): no wait for company
                self._urgent = True
            self.cv.notify_all()
            return True

    def _add(self, t: _Tomb) -> None:
        self._tombs[t.key] = t
        self._under.update(_dirs_of(t.key))
        self._queue.append(t)
        self._etags.pop(t.key, None)

    def _buried(self, t: _Tomb) -> None:
        """Caller holds cv: t's delete is done."""
        del self._tombs[t.key]
        for d in _dirs_of(t.key):
            if self._under[d] > 1:
                self._under[d] -= 1
            else:
                del self._under[d]

    def _in_the_way(self, key: str) -> bool:
        """Caller holds cv: whether a pending delete must go before a write to key. Besides
        the key itself: servers that keep files and directories in one namespace (SeaweedFS,
        MinIO) refuse `d/` or `d/x` while a file `d` exists, and a file `d` while keys under
        `d/` exist."""
        tombs = self._tombs
        if key in tombs or any(key[:i] in tombs for i, c in enumerate(key) if c == "/"):
            return True
        return not key.endswith("/") and (key + "/" in tombs or self._under[key + "/"] > 0)

    def wait_gone(self, key: str) -> None:
        """Before a write to key: the pending deletes in its way go first."""
        deadline = time.monotonic() + WRITE_WAIT
        with self.cv:
            while self._in_the_way(key):
                self._urgent = True
                self.cv.notify_all()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailable(f"{key!r}: the delete before this write has not gone "
                                           f"through ({self.last_error or 'still waiting'})")
                self.cv.wait(timeout=min(left, 1.0))

    # -- the sender ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cv:
                batch = self._next_batch()
                if batch is None:
                    return
                self._batches += 1
            self._pool.submit(self._send, batch)

    def _next_batch(self) -> list[_Tomb] | None:
        """Caller holds cv. Waits for the next batch to send; None once stopped."""
        while True:
            now = time.monotonic()
            if self._stop:           # what is left stays journaled for the next daemon
                return None
            wait = None
            if not self._queue or self._batches >= STREAMS:
                wait = 1.0
            elif now < self._retry_at:
                wait = self._retry_at - now
            elif not self._urgent and len(self._queue) < DELETE_MAX:
                age = time.time() - self._queue[0].t
                if age < self.delay:
                    wait = self.delay - age
            if wait is None:
                batch = self._take()
                if batch:
                    return batch
                wait = 1.0
            self.cv.wait(timeout=wait)

    def _take(self) -> list[_Tomb]:
        """Caller holds cv: the next batch off the queue, its share of what waits."""
        batch = []
        size = min(DELETE_MAX, max(MIN_BATCH, -(-len(self._queue) // (STREAMS - self._batches))))
        while self._queue and len(batch) < size:
            t = self._queue[0]
            # SeaweedFS keeps a "dir/" key listed while a key under it exists: a
            # directory key goes after every earlier key under it is gone
            if t.key.endswith("/") and any(k.startswith(t.key) for k in self._inflight):
                break
            self._queue.popleft()
            t.sent = True
            self._inflight.add(t.key)
            batch.append(t)
        if not self._queue:
            self._urgent = False
        return batch

    def _still_ours(self, t: _Tomb) -> bool:
        """A delete journaled by an earlier daemon: is the object still the one deleted?"""
        try:
            info = self._store.head(t.key)
        except NotFound:
            return False
        except Exception:  # noqa: BLE001 - locked/plaintext objects: their listing date
            return True if t.etag is None else False
        if t.etag is not None:
            ours = info.etag == t.etag
        else:
            ours = info.mtime < t.t - MTIME_MARGIN
        if not ours:
            log.info("journaled delete of %r skipped: the object changed since", t.key)
        return ours

    def _send(self, batch: list[_Tomb]) -> None:
        try:
            keys = [t.key for t in batch if not t.replay or self._still_ours(t)]
            if keys:
                self._store.delete_many(keys)
        except Exception as e:  # noqa: BLE001 - retried until it goes through
            self._failed(batch, e)
            return
        self._done(batch)

    def _failed(self, batch: list[_Tomb], e: Exception) -> None:
        with self.cv:
            self.last_error = str(e)
            log.warning("delete of %d key(s) failed (%s); retrying in %.1f s", len(batch),
                        e, self._backoff)
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, RETRY_MAX)
            for t in reversed(batch):
                t.sent = False
                self._inflight.discard(t.key)
                self._queue.appendleft(t)
            self._batches -= 1
            self.cv.notify_all()

    def _done(self, batch: list[_Tomb]) -> None:
        with self.cv:
            now = time.monotonic()
            for t in batch:
                self._inflight.discard(t.key)
                self._recent[t.key] = now
                self._recent.move_to_end(t.key)
                if self._tombs.get(t.key) is t:
                    self._buried(t)
            while self._recent and next(iter(self._recent.values())) < now - RECENT_S:
                self._recent.popitem(last=False)
            self._batches -= 1
            self._backoff = RETRY_MIN
            self.deletes_done += len(batch)
            self.last_error = None
            self._journal_done(batch)
            self.cv.notify_all()

    def _journal_done(self, batch: list[_Tomb]) -> None:
        """Caller holds cv."""
        if self._journal is None:
            return
        try:
            if not self._tombs:
                self._journal.reset()
            elif self._journal.size() > JOURNAL_MAX:
                self._journal.start([[t.seq, t.key, t.etag, t.t] for t in self._tombs.values()])
            else:
                self._journal.append([{"done": [t.seq for t in batch]}])
        except OSError as e:      # at worst these deletes are checked and sent again later
            log.warning("delete journal not updated: %s", e)


def _dirs_of(key: str) -> list[str]:
    """The directories a key is under: "a/b/c" -> ["a/", "a/b/"] (and "a/b/" -> ["a/"])."""
    parts = key.rstrip("/").split("/")[:-1]
    return ["/".join(parts[:i]) + "/" for i in range(1, len(parts) + 1)]
