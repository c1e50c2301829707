"""Deletes that return at once: journaled, then sent in batches (a Store in front of a Store).

`delete(key)` appends a sealed record to the delete journal (a file in the cache directory)
and returns; a background thread sends the keys in DeleteObjects requests of up to 1,000
keys, up to STREAMS at once, a key waiting at most DELETE_DELAY for others to share its
request. So `rm -r` of many files costs a few requests instead of one round trip per file.

Until its delete has gone through, a key is absent through this store: HEAD and GET answer
NotFound, listings leave it out (and a common prefix all of whose keys are being deleted),
and a write to it (PUT, upload, copy onto it) first waits for the delete, so that the bucket
sees our operations in the order the mount did. Other clients see the object until its
request is answered (normally within DELETE_DELAY plus a round trip).

Durability, as for an unlink on a local filesystem: the journal is not flushed per record,
so a daemon that is killed loses nothing (its records are in the kernel's page cache and are
sent at the next mount), a power cut can undo the deletes of the last seconds, and
`fsync()` of a directory waits until the deletes under it are done; so does unmounting.
After a restart a journaled key is deleted only if the object is still the one that was
deleted: same ETag when one was known, else last modified before the delete was journaled
(an object another client wrote since then stays).

Failed requests are retried with backoff for as long as the mount lives (like uploads);
`ssecfs status` shows the deletes pending and the last error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor

from cachetools import LRUCache

from .deljournal import JOURNAL_MAX, DeleteJournal
from ..errors import NotFound, StoreUnavailable
from .contract import ListPage

log = logging.getLogger("ssecfs.deletes")

DELETE_DELAY = 0.05          # s a key waits for others to go in the same request
BATCH_MAX = 1000             # keys per DeleteObjects (S3's limit)
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


class DeferredDeletes:
    """The Store protocol over `store`, with deletes deferred (see the module docstring)."""

    def __init__(self, store, journal: DeleteJournal | None = None,
                 delay: float = DELETE_DELAY):
        self._store = store
        self._journal = journal
        self.delay = delay
        self._cv = threading.Condition()
        self._tombs: dict[str, _Tomb] = {}
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

    def __getattr__(self, name):
        return getattr(self._store, name)

    def __repr__(self) -> str:
        return f"DeferredDeletes({self._store!r})"

    # -- start, stop ---------------------------------------------------------------------------
    def recover(self) -> int:
        """Take up the deletes a previous daemon journaled and did not finish; start a fresh
        journal. Returns how many."""
        if self._journal is None:
            return 0
        pending = self._journal.load()
        self._journal.start(pending)
        with self._cv:
            for seq, key, etag, t in pending:
                self._seq = max(self._seq, seq)
                self._add(_Tomb(key, seq, etag, t, replay=True))
            self._cv.notify_all()
        if pending:
            log.info("%d delete(s) journaled by the previous daemon: sending them", len(pending))
        return len(pending)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._journal is not None:
            self._journal.close()

    # -- what is pending -----------------------------------------------------------------------
    def pending(self, prefix: str = "") -> int:
        with self._cv:
            return sum(1 for k in self._tombs if k.startswith(prefix))

    def flush(self, prefix: str = "", timeout: float | None = None) -> bool:
        """Wait until the deletes of keys under prefix are done (True) or timeout passes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while any(k.startswith(prefix) for k in self._tombs):
                self._urgent = True
                self._cv.notify_all()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(timeout=left if left is not None else 1.0)
        return True

    def status(self) -> dict:
        with self._cv:
            return {"deletes_pending": len(self._tombs), "deletes_done": self.deletes_done,
                    "delete_error": self.last_error}

    # -- deletes -------------------------------------------------------------------------------
    def delete(self, key: str) -> None:
        self.delete_many([key])

    def delete_many(self, keys: list[str]) -> None:
        now = time.time()
        with self._cv:
            new = []
            for key in dict.fromkeys(keys):
                if key in self._tombs:
                    continue
                self._seq += 1
                new.append(_Tomb(key, self._seq, self._etags.get(key), now))
            if not new:
                return
            if self._journal is not None:
                try:
                    self._journal.append([{"add": [t.seq, t.key, t.etag, t.t]} for t in new])
                except OSError as e:
                    log.warning("delete journal not written (%s): deleting %d key(s) now",
                                e, len(new))
                    new = None
            if new is not None:
                for t in new:
                    self._add(t)
                if len(new) > 1:      # already a batch (a moved tree): no wait for company
                    self._urgent = True
                self._cv.notify_all()
                return
        self._store.delete_many(keys)       # without a journal entry: at once, as before

    def _add(self, t: _Tomb) -> None:
        self._tombs[t.key] = t
        self._queue.append(t)
        self._etags.pop(t.key, None)

    def _gone(self, key: str) -> bool:
        return key in self._tombs

    def _wait_gone(self, key: str) -> None:
        """Before a write to key: its pending delete goes first."""
        deadline = time.monotonic() + WRITE_WAIT
        with self._cv:
            while key in self._tombs:
                self._urgent = True
                self._cv.notify_all()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailable(f"{key!r}: the delete before this write has not gone "
                                           f"through ({self.last_error or 'still waiting'})")
                self._cv.wait(timeout=min(left, 1.0))

    # -- the sender ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                batch = self._next_batch()
                if batch is None:
                    return
                self._batches += 1
            self._pool.submit(self._send, batch)

    def _next_batch(self) -> list[_Tomb] | None:
        """Caller holds _cv. Waits for the next batch to send; None once stopped."""
        while True:
            now = time.monotonic()
            if self._stop:           # what is left stays journaled for the next daemon
                return None
            wait = None
            if not self._queue or self._batches >= STREAMS:
                wait = 1.0
            elif now < self._retry_at:
                wait = self._retry_at - now
            elif not self._urgent and len(self._queue) < BATCH_MAX:
                age = time.time() - self._queue[0].t
                if age < self.delay:
                    wait = self.delay - age
            if wait is None:
                batch = []
                size = min(BATCH_MAX, max(MIN_BATCH,
                                          -(-len(self._queue) // (STREAMS - self._batches))))
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
                if batch:
                    return batch
                wait = 1.0
            self._cv.wait(timeout=wait)

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
            with self._cv:
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
                self._cv.notify_all()
            return
        with self._cv:
            now = time.monotonic()
            for t in batch:
                self._inflight.discard(t.key)
                self._recent[t.key] = now
                self._recent.move_to_end(t.key)
                if self._tombs.get(t.key) is t:
                    del self._tombs[t.key]
            while self._recent and next(iter(self._recent.values())) < now - RECENT_S:
                self._recent.popitem(last=False)
            self._batches -= 1
            self._backoff = RETRY_MIN
            self.deletes_done += len(batch)
            self.last_error = None
            self._journal_done(batch)
            self._cv.notify_all()

    def _journal_done(self, batch: list[_Tomb]) -> None:
        """Caller holds _cv."""
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

    # -- reads: a key being deleted is absent --------------------------------------------------
    def _seen(self, key: str, etag: str | None) -> None:
        if etag:
            self._etags[key] = etag

    def head(self, key: str, *a, **kw):
        if self._gone(key):
            raise NotFound(key)
        info = self._store.head(key, *a, **kw)
        with self._cv:
            self._seen(key, info.etag)
        return info

    def head_many(self, keys: list[str], each=None) -> dict:
        with self._cv:
            gone = {k: NotFound(k) for k in keys if k in self._tombs}

        def seen(k, info):
            if not isinstance(info, Exception):
                with self._cv:
                    self._seen(k, info.etag)
            if each is not None:
                each(k, info)
        for k, e in gone.items():
            seen(k, e)
        return {**gone, **self._store.head_many([k for k in keys if k not in gone], seen)}

    def head_with_start(self, key: str, nbytes: int):
        if self._gone(key):
            raise NotFound(key)
        info = self._store.head_with_start(key, nbytes)
        with self._cv:
            self._seen(key, info.etag)
        return info

    def get_range(self, key: str, *a, **kw):
        if self._gone(key):
            raise NotFound(key)
        return self._store.get_range(key, *a, **kw)

    def list_page_iter(self, prefix: str, delimiter: str | None = "/", max_keys: int = 1000,
                       start_after: str | None = None):
        sent = time.monotonic()
        with self._cv:
            under = any(k.startswith(prefix) for k in self._tombs)
        gone = lambda k: k in self._tombs or self._recent.get(k, -1.0) >= sent  # noqa: E731
        if not under:
            for page in self._store.list_page_iter(prefix, delimiter, max_keys, start_after):
                with self._cv:
                    for o in page.objects:
                        self._seen(o.key, o.etag)
                yield page
            return
        # some keys under prefix are going: pages of at least 1,000 so that a caller asking
        # for one key still gets one that stays, if there is one
        for page in self._store.list_page_iter(prefix, delimiter, max(max_keys, 1000),
                                               start_after):
            with self._cv:
                objs = [o for o in page.objects if not gone(o.key)]
                for o in objs:
                    self._seen(o.key, o.etag)
            prefixes = [p for p in page.prefixes if not self._emptied(p, gone)]
            if objs or prefixes:
                yield ListPage(objs, prefixes)

    def _emptied(self, prefix: str, gone) -> bool:
        """Whether every key under prefix is being deleted (the prefix is then left out)."""
        with self._cv:
            if not any(gone(k) for k in (*self._tombs, *self._recent) if k.startswith(prefix)):
                return False
        for page in self._store.list_page_iter(prefix, None, 1000):
            with self._cv:
                if any(not gone(o.key) for o in page.objects):
                    return False
        return True

    # -- writes: after the delete of the same key ----------------------------------------------
    def _written(self, info):
        with self._cv:
            self._seen(info.key, info.etag)
        return info

    def put(self, key: str, *a, **kw):
        self._wait_gone(key)
        return self._written(self._store.put(key, *a, **kw))

    def upload(self, key: str, *a, **kw):
        self._wait_gone(key)
        return self._written(self._store.upload(key, *a, **kw))

    def mpu_begin(self, key: str, *a, **kw):
        self._wait_gone(key)
        return self._store.mpu_begin(key, *a, **kw)

    def mpu_complete(self, key: str, *a, **kw):
        return self._written(self._store.mpu_complete(key, *a, **kw))

    def copy(self, src: str, dst: str, *a, **kw):
        if self._gone(src):
            raise NotFound(src)
        self._wait_gone(dst)
        return self._written(self._store.copy(src, dst, *a, **kw))

    def copy_as_is(self, src: str, dst: str, *a, **kw):
        if self._gone(src):
            raise NotFound(src)
        self._wait_gone(dst)
        return self._written(self._store.copy_as_is(src, dst, *a, **kw))
