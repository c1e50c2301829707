"""Files open or dirty in this mount: their state (FileState) and the table of them and of
their handles (OpenFiles).

Locks, in the order they may be taken (the namespace lock, Namespace.lock, comes first):
  FileState.lock        guards that file's size, generations, remote ref, metadata, chunks
  OpenFiles.lock        leaf: guards the path -> FileState table and the handles
  AttrCache.lock        leaf: guards the attribute caches (attrs.py)
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..cache import Cache, CacheEntry
from ..errors import NotFound


@dataclass
class Remote:
    """The object a file's absent chunks come from."""
    key: str
    etag: str
    size: int
    key_fp: str | None


class FileState:
    """A file open or dirty in this mount. Lock: self.lock (see module docstring).

    Its generations and its remote change through its methods, which keep them consistent:
    dirty is generation > uploaded_gen; data_generation is the generation of the last change
    of its bytes; remote_valid never exceeds what the remote holds of the current bytes; a
    chunk fetched earlier (hot, readahead) is never served once the remote or the bytes
    changed."""

    _ids = itertools.count(1)

    def __init__(self, path: str, key: str, meta: dict, size: int = 0,
                 remote: Remote | None = None):
        self.id = next(self._ids)
        self.lock = threading.RLock()
        self.path = path
        self.key = key
        self.meta = meta                  # mode, uid, gid, mtime, ctime (numbers)
        self.size = size
        self.remote = remote
        self.remote_valid = remote.size if remote else 0
        self.entry: CacheEntry | None = None
        self.generation = 0               # bumped by every change
        self.data_generation = 0          # generation of the last data change
        self.uploaded_gen = 0
        self.opens = 0
        self.writers = 0                  # of the opens, those that may write
        self.deleted = False
        self.last_read_end = -1
        self.journaled_gen = 0
        self.trunc_epoch = 0              # bumped by every truncate (fetches check it)
        self.readahead: dict[int, Future] = {}
        # chunks fetched for a sequential reader and not read yet: index -> ((remote,
        # trunc_epoch, data_generation) when fetched, plaintext); valid only while that tag
        # still matches (no write, truncate or new remote since)
        self.hot: dict[int, tuple] = {}
        # read units below `ahead[1]` were fetched for the sequential reader since it last
        # jumped, while the remote and trunc_epoch were `ahead[0]` (read-ahead skips them:
        # they may have been read already without being cached, see Reader._admit)
        self.ahead: tuple = (None, 0)
        self.stream = None                # PartStream: parts sent while written (stream.py)
        self.no_stream = False            # metadata set explicitly: upload whole
        self.seq_end = 0                  # data written contiguously from offset 0 up to here
        self.urgent_gen = 0               # an fsync or unmount waits for this generation:
                                          # upload it even while the file is open for writing
        self.deferred = False             # an upload skipped while written: release schedules it
        self.error: str | None = None

    def __repr__(self) -> str:
        return f"<file {self.path!r} gen={self.generation} up={self.uploaded_gen}>"

    @property
    def dirty(self) -> bool:
        return self.generation > self.uploaded_gen

    # -- changes: the caller holds self.lock --------------------------------------------------
    def changed(self, data: bool) -> None:
        """A change of the file; data: of its bytes, not only of its metadata."""
        self.generation += 1
        if data:
            self.data_generation = self.generation
            self.hot.clear()            # void anyway (tagged with the old generation)

    def set_remote(self, remote: Remote | None) -> None:
        """Its absent chunks now come from remote (a copy, an upload; None: from nowhere):
        nothing fetched from the previous one is served any more."""
        self.remote = remote
        if remote is None:
            self.remote_valid = 0
        self.readahead.clear()
        self.hot.clear()

    def uploaded(self, gen: int, remote: Remote) -> None:
        """Generation gen of the file is stored, as remote."""
        self.remote_valid = remote.size if self.generation == gen else \
            min(self.remote_valid, remote.size)
        self.set_remote(remote)
        self.uploaded_gen = max(self.uploaded_gen, gen)

    def dropped(self) -> None:
        """Unlinked or replaced: nothing of it is uploaded any more."""
        self.deleted = True
        self.uploaded_gen = self.generation

    def journal(self) -> dict:
        r = self.remote
        return {"v": 1, "path": self.path, "key": self.key, "size": self.size,
                "meta": self.meta, "generation": self.generation,
                "data_generation": self.data_generation, "dirty": self.dirty,
                "remote": [r.key, r.etag, r.size, r.key_fp] if r else None,
                "remote_valid": self.remote_valid}


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


@dataclass(eq=False)
class OpenFiles:
    """The table path -> FileState of the files open or dirty, and the open handles."""

    cache: Cache
    lock: threading.Lock = field(default_factory=threading.Lock)
    _files: dict = field(default_factory=dict)          # path -> FileState
    _handles: dict = field(default_factory=dict)        # fh -> FileState
    _writer_fhs: set = field(default_factory=set)       # handles opened for writing
    _aliases: dict = field(default_factory=dict)        # alias -> orphan (orphans.py)
    _fh: itertools.count = field(default_factory=lambda: itertools.count(1))

    # -- the table --------------------------------------------------------------------------
    def get(self, path: str) -> FileState | None:
        with self.lock:
            return self._files.get(path)

    def add(self, st: FileState) -> None:
        with self.lock:
            self._files[st.path] = st

    def is_current(self, st: FileState) -> bool:
        """Whether st is the state the table holds for its path (not forgotten or replaced)."""
        with self.lock:
            return self._files.get(st.path) is st

    def discard(self, st: FileState, path: str | None = None) -> None:
        """Drop st from the table (at path, default its own), if it is still there."""
        path = st.path if path is None else path
        with self.lock:
            if self._files.get(path) is st:
                del self._files[path]

    def move(self, st: FileState, old: str, new: str) -> None:
        with self.lock:
            if self._files.get(old) is st:
                del self._files[old]
            self._files[new] = st

    def under(self, *tops: str) -> list[FileState]:
        """The states at the paths tops, or below them."""
        with self.lock:
            return [st for p, st in self._files.items() if any(_under(p, t) for t in tops)]

    def below(self, d: str) -> list[FileState]:
        """The states strictly below directory d."""
        pfx = d.rstrip("/") + "/"
        with self.lock:
            return [st for p, st in self._files.items() if p.startswith(pfx)]

    def any_below(self, d: str) -> bool:
        pfx = d.rstrip("/") + "/"
        with self.lock:
            return any(p.startswith(pfx) for p in self._files)

    def names_in(self, d: str) -> set[str]:
        """Names of the files of directory d in the table (not uploaded yet, maybe)."""
        pfx = "/" if d == "/" else d.rstrip("/") + "/"
        with self.lock:
            return {p[len(pfx):] for p in self._files
                    if p.startswith(pfx) and "/" not in p[len(pfx):]}

    # -- orphans: unlinked while open, out of the table (orphans.py) ------------------------
    def orphaned(self, st: FileState, path: str, alias: str | None) -> None:
        """st, at path, is unlinked but still open: out of the table, known by alias (if
        any) until forget_orphan."""
        with self.lock:
            if self._files.get(path) is st:
                del self._files[path]
            if alias is not None:
                self._aliases[alias] = st

    def orphan(self, alias: str) -> FileState | None:
        with self.lock:
            return self._aliases.get(alias)

    def forget_orphan(self, st: FileState) -> None:
        with self.lock:
            for alias in [a for a, o in self._aliases.items() if o is st]:
                del self._aliases[alias]

    def hold(self, path: str, writer: bool, load) -> FileState:
        """Caller holds the namespace lock. The file's state, with one more open (and writer)
        counted; load(path) makes it when the table has none. A state that an upload just
        forgot (closed and clean) is never revived: it is loaded anew."""
        while True:
            st = self.get(path)
            if st is None:
                st = load(path)
            with st.lock:
                if self.is_current(st):
                    st.opens += 1
                    st.writers += writer
                    return st

    def dirty(self) -> list[FileState]:
        with self.lock:
            return [st for st in self._files.values() if st.dirty and not st.deleted]

    # -- handles ----------------------------------------------------------------------------
    def register(self, st: FileState, writer: bool = False) -> int:
        """A new handle of st. The caller has counted it in st.opens (and st.writers)."""
        fh = next(self._fh)
        with self.lock:
            self._handles[fh] = st
            if writer:
                self._writer_fhs.add(fh)
        return fh

    def handle(self, fh: int) -> FileState:
        st = self._handles.get(fh)      # a single dict lookup is atomic: no lock on this path
        if st is None:
            raise NotFound(f"file handle {fh}")
        return st

    def handle_or_none(self, fh: int) -> FileState | None:
        with self.lock:
            return self._handles.get(fh)

    def close_handle(self, fh: int) -> tuple[FileState | None, bool]:
        """Forget handle fh: (its state, whether it was opened for writing)."""
        with self.lock:
            st = self._handles.pop(fh, None)
            writer = fh in self._writer_fhs
            self._writer_fhs.discard(fh)
        return st, writer

    # -- cache entries ----------------------------------------------------------------------
    def entry_of(self, st: FileState) -> CacheEntry:
        """st's cache entry, made (and indexed as a clean copy of its object) if it has none.
        Caller holds st.lock or is its only user."""
        if st.entry is None:
            st.entry = self.cache.new_entry()
            if st.remote and not st.dirty:
                self.cache.index_clean(st.entry, st.remote.key, st.remote.etag)
        return st.entry
