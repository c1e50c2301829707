"""Deletes that return at once: journaled, then sent in batches (a Store in front of a Store).

`delete(key)` appends a sealed record to the delete journal (a file in the cache directory)
and returns; delqueue.DeleteQueue sends the keys in DeleteObjects requests of up to 1,000
keys, a few at once, a key waiting at most a moment for others to share its request. So
`rm -r` of many files costs a few requests instead of one round trip per file. This module is
the Store the filesystem sees meanwhile: what a pending delete means for reads, listings and
writes.

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

import time

from ..errors import NotFound
from .contract import LIST_PAGE_MAX, ListPage
from .delqueue import DELETE_DELAY, DeleteQueue
from .deljournal import DeleteJournal


class DeferredDeletes:
    """The Store protocol over `store`, with deletes deferred (see the module docstring)."""

    def __init__(self, store, journal: DeleteJournal | None = None,
                 delay: float = DELETE_DELAY):
        self._store = store
        self.queue = DeleteQueue(store, journal, delay)

    def __getattr__(self, name):
        return getattr(self._store, name)

    def __repr__(self) -> str:
        return f"DeferredDeletes({self._store!r})"

    # -- the queue's life and state (the filesystem's fsync, unmount and status) --------------
    def recover(self) -> int:
        """Take up the deletes a previous daemon journaled and did not finish."""
        return self.queue.recover()

    def close(self) -> None:
        self.queue.close()

    def pending(self, prefix: str = "") -> int:
        return self.queue.pending(prefix)

    def flush(self, prefix: str = "", timeout: float | None = None) -> bool:
        """Wait until the deletes of keys under prefix are done (True) or timeout passes."""
        return self.queue.flush(prefix, timeout)

    def status(self) -> dict:
        return self.queue.status()

    # -- deletes -------------------------------------------------------------------------------
    def delete(self, key: str) -> None:
        self.delete_many([key])

    def delete_many(self, keys: list[str]) -> None:
        if not self.queue.add(keys):
            self._store.delete_many(keys)       # without a journal entry: at once

    # -- reads: a key being deleted is absent --------------------------------------------------
    def _seen(self, key: str, etag: str | None) -> None:
        with self.queue.cv:
            self.queue.seen(key, etag)

    def head(self, key: str, *a, **kw):
        if self.queue.gone(key):
            raise NotFound(key)
        info = self._store.head(key, *a, **kw)
        self._seen(key, info.etag)
        return info

    def head_many(self, keys: list[str], each=None) -> dict:
        with self.queue.cv:
            gone = {k: NotFound(k) for k in keys if self.queue.gone(k)}

        def seen(k, info):
            if not isinstance(info, Exception):
                self._seen(k, info.etag)
            if each is not None:
                each(k, info)
        for k, e in gone.items():
            seen(k, e)
        return {**gone, **self._store.head_many([k for k in keys if k not in gone], seen)}

    def head_with_start(self, key: str, nbytes: int):
        if self.queue.gone(key):
            raise NotFound(key)
        info = self._store.head_with_start(key, nbytes)
        self._seen(key, info.etag)
        return info

    def get_range(self, key: str, *a, **kw):
        if self.queue.gone(key):
            raise NotFound(key)
        return self._store.get_range(key, *a, **kw)

    def list_page_iter(self, prefix: str, delimiter: str | None = "/",
                       max_keys: int = LIST_PAGE_MAX, start_after: str | None = None):
        q = self.queue
        gone = q.gone_since(time.monotonic())
        under = q.pending(prefix) > 0
        if not under:
            for page in self._store.list_page_iter(prefix, delimiter, max_keys, start_after):
                with q.cv:
                    for o in page.objects:
                        q.seen(o.key, o.etag)
                yield page
            return
        # some keys under prefix are going: pages of at least LIST_PAGE_MAX so that a
        # caller asking for one key still gets one that stays, if there is one
        for page in self._store.list_page_iter(prefix, delimiter, max(max_keys, LIST_PAGE_MAX),
                                               start_after):
            with q.cv:
                objs = [o for o in page.objects if not gone(o.key)]
                for o in objs:
                    q.seen(o.key, o.etag)
            prefixes = [p for p in page.prefixes if not self._emptied(p, gone)]
            if objs or prefixes:
                yield ListPage(objs, prefixes)

    def _emptied(self, prefix: str, gone) -> bool:
        """Whether every key under prefix is being deleted (the prefix is then left out)."""
        with self.queue.cv:
            if not any(gone(k) for k in self.queue.keys_known() if k.startswith(prefix)):
                return False
        for page in self._store.list_page_iter(prefix, None, LIST_PAGE_MAX):
            with self.queue.cv:
                if any(not gone(o.key) for o in page.objects):
                    return False
        return True

    # -- writes: after the delete of the same key ----------------------------------------------
    def _written(self, info):
        self._seen(info.key, info.etag)
        return info

    def put(self, key: str, *a, **kw):
        self.queue.wait_gone(key)
        return self._written(self._store.put(key, *a, **kw))

    def put_many(self, items: list) -> list:
        for key, _data, _meta in items:
            self.queue.wait_gone(key)
        return [r if isinstance(r, Exception) else self._written(r)
                for r in self._store.put_many(items)]

    def upload(self, key: str, *a, **kw):
        self.queue.wait_gone(key)
        return self._written(self._store.upload(key, *a, **kw))

    def mpu_begin(self, key: str, *a, **kw):
        self.queue.wait_gone(key)
        return self._store.mpu_begin(key, *a, **kw)

    def mpu_complete(self, key: str, *a, **kw):
        return self._written(self._store.mpu_complete(key, *a, **kw))

    def copy(self, src: str, dst: str, *a, **kw):
        if self.queue.gone(src):
            raise NotFound(src)
        self.queue.wait_gone(dst)
        return self._written(self._store.copy(src, dst, *a, **kw))

    def copy_as_is_many(self, items: list[tuple[str, str, int]]) -> list:
        out: list = [None] * len(items)
        todo = []
        for n, (src, dst, _size) in enumerate(items):
            if self.queue.gone(src):
                out[n] = NotFound(src)
            else:
                self.queue.wait_gone(dst)
                todo.append(n)
        for n, r in zip(todo, self._store.copy_as_is_many([items[n] for n in todo])):
            out[n] = r if isinstance(r, Exception) else self._written(r)
        return out

    def copy_as_is(self, src: str, dst: str, *a, **kw):
        if self.queue.gone(src):
            raise NotFound(src)
        self.queue.wait_gone(dst)
        return self._written(self._store.copy_as_is(src, dst, *a, **kw))
