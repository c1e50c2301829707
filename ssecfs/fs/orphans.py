"""Files unlinked, or replaced by a rename, while open: orphans. As POSIX has it, such a file
stays readable and writable through its open descriptors until the last close. Its object is
deleted at once all the same (the name is free: a new file of that name is unrelated), so its
bytes live only in its cache entry from then on, and nothing of it is ever uploaded.

- `preparing` (before the namespace lock is taken): the entry is pinned (counted as dirty by
  the cache, so never evicted, and out of the index of clean copies, so no other file finds
  it) and every chunk that only the object holds is fetched into it, without st.lock (the
  file's readers and writers go on meanwhile).
- `keep` (the unlink itself, under the namespace lock): what is still missing is fetched, the
  file forgets its object, its journal record is made to say clean (a crash while it is open
  recovers nothing of it: recovery removes clean entries), and it leaves the table of paths;
  `alias` is the name it is known by meanwhile, if any (libfuse's `.fuse_hidden…` name).
- `release` (its last close): the entry is discarded, its space accounted back.

An orphan is a FileState with `deleted` set and opens left; OpenFiles keeps its alias.
"""

from __future__ import annotations

from concurrent.futures import wait
from contextlib import contextmanager
from dataclasses import dataclass

from ..cache import Cache
from ..errors import NotFound
from .files import FileState, OpenFiles
from .meta import Attr, attr_from_meta
from .reader import Reader
from .stream import Streams


@dataclass(eq=False, repr=False)
class Orphans:
    cache: Cache
    files: OpenFiles
    reader: Reader
    streams: Streams

    @contextmanager
    def preparing(self, st: FileState | None):
        """Around the unlink (or replacing rename) of st: a file open now has its bytes made
        local first; unpinned again if it is not kept after all (the unlink failed, or its
        last descriptor was closed meanwhile)."""
        if st is None or st.opens == 0:
            yield
            return
        try:
            self._pin(st)
            self.reader.make_local(st)
            yield
        finally:
            self._unpin(st)

    def _pin(self, st: FileState) -> None:
        with st.lock:
            if st.deleted:
                return
            entry = self.files.entry_of(st)
            if not entry.dirty:
                self.cache.unindex(entry)
                self.cache.set_dirty(entry, True)

    def _unpin(self, st: FileState) -> None:
        with st.lock:
            e = st.entry
            if st.deleted or e is None or st.dirty or not e.dirty:
                return
            self.cache.set_dirty(e, False)
            if st.remote is not None:
                self.cache.index_clean(e, st.remote.key, st.remote.etag)

    def keep(self, st: FileState, path: str, alias: str | None) -> bool:
        """Caller holds the namespace lock; st's uploads are quiesced. If st (at path) is still
        open, make it an orphan and return True: its object may be deleted once this returns.
        False: it is closed (the caller forgets it)."""
        with st.lock:
            if st.opens == 0:
                return False
            self._pin(st)
            self.reader.make_local_locked(st)
            # first, as it may fail (the unlink then fails, the file unchanged)
            st.entry.save_state({"dirty": False})
            st.dropped()
            self.streams.drop(st, "unlinked", for_good=True)
            fetching = list(st.readahead.values())
            st.set_remote(None)              # nothing is fetched from the object any more
            self.files.orphaned(st, path, alias)
        # a fetch sent before must reach the store before the delete does (its reader then
        # finds the chunk in the entry)
        wait(fetching)
        return True

    def release(self, st: FileState) -> None:
        """Caller holds st.lock. After a close: the last one of an orphan drops it."""
        if not st.deleted or st.opens > 0:
            return
        if st.entry is not None:
            self.cache.discard(st.entry)
            st.entry = None
        st.hot.clear()
        self.files.forget_orphan(st)

    def by_alias(self, path: str, alias: str) -> FileState:
        """The orphan known by alias (path: the name it was asked by, for the error)."""
        st = self.files.orphan(alias)
        if st is None:
            raise NotFound(path)
        return st

    def attr(self, st: FileState) -> Attr:
        """An open file's attributes from its own state (an orphan has no link left)."""
        with st.lock:
            return attr_from_meta(st.meta, st.size, nlink=0 if st.deleted else 1)
