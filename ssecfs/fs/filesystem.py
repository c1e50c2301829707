"""Filesystem semantics over the store and the encrypted cache.

Path ``/a/b.txt`` <-> object ``PREFIX + "a/b.txt"``. Directories are prefixes; ``mkdir`` writes a
zero-byte marker ``a/``. Attributes live in s3fs-compatible metadata (mode, uid, gid, mtime,
ctime). File data goes through the encrypted cache; dirty files are uploaded by the write-back
scheduler (close returns at once, fsync waits for durability). This module owns open files,
reads, writes and uploads; mixins on the same object own the rest: attrs.AttrOps (getattr,
attribute and listing caches), namespace.NamespaceOps (directories, unlink, rename, metadata
changes), stream.StreamOps (uploads that start while a big file is written).

Locks, in the order they may be taken:
  _ns_lock (RLock)      serialises namespace changes (create, unlink, rename, mkdir, rmdir,
                        symlink) so they see a stable table of open files
  FileState.lock        guards that file's size, generation, remote ref, metadata, chunks
  _files_lock           leaf: guards _files (path -> FileState) and the changes of _handles
  _attr_lock            leaf: guards the attribute cache
Uploads (write-back workers) take FileState.lock and _files_lock only, never _ns_lock, so
namespace operations may wait for an upload in flight (WriteBack.quiesce) while holding _ns_lock.
"""

from __future__ import annotations

import itertools
import logging
import os
import posixpath
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from cachetools import LRUCache

from .attrs import AttrOps, _now
from ..buffers import Segments
from ..cache import CHUNK, Cache, CacheEntry
from ..config import FsConfig
from ..store.deferred import DeferredDeletes
from ..store.deljournal import DeleteJournal
from .dirindex import INDEX_NAME
from ..errors import (InvalidName, IsADirectory, KeyMismatch, NameTooLong, NotFound,
                     ReadOnly, Stale, TimedOut)
from .namespace import NamespaceOps
from ..store.contract import LOCKED, PLAINTEXT, Store, pieces
from .stream import STREAM_CLOSE_DELAY, StreamOps
from .writeback import WriteBack

log = logging.getLogger("ssecfs.fs")

NAME_MAX = 255
KEY_MAX = 1024
READ_UNIT = 8 * 1024 * 1024          # range GET size for sequential reads
READAHEAD_UNITS = 4                  # units fetched ahead of a sequential reader
SEQ_SLACK = 2 * 1024 * 1024          # a read this close to the last one is sequential
HOT_CHUNKS = (READAHEAD_UNITS + 1) * READ_UNIT // (128 * 1024)   # per file, see FileState.hot
COPY_WORKERS = 16
PREFETCH_ON_OPEN = 1024 * 1024      # files up to this size are fetched at open (read-only)
# Scan resistance: a read unit of a file this big that a sequential reader fetches is cached
# only when it is fetched a second time (docs/CACHE.md, "What a read leaves in the cache").
SCAN_MIN_SIZE = 64 * 1024 * 1024
SCANNED_UNITS = 16384                # read units remembered as fetched once (128 GiB of them)


@dataclass
class Remote:
    """The object a file's absent chunks come from."""
    key: str
    etag: str
    size: int
    key_fp: str | None


class FileState:
    """A file open or dirty in this mount. Lock: self.lock (see module docstring)."""

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
        # they may have been read already without being cached, see Filesystem._admit)
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

    def journal(self) -> dict:
        r = self.remote
        return {"v": 1, "path": self.path, "key": self.key, "size": self.size,
                "meta": self.meta, "generation": self.generation,
                "data_generation": self.data_generation, "dirty": self.dirty,
                "remote": [r.key, r.etag, r.size, r.key_fp] if r else None,
                "remote_valid": self.remote_valid}


class Filesystem(AttrOps, NamespaceOps, StreamOps):
    def __init__(self, store: Store, cache: Cache, config: FsConfig):
        # deletes return once journaled and go out in batches (deletes.py); recover() takes
        # up what an earlier daemon journaled
        self.deletes = DeferredDeletes(store, DeleteJournal(
            os.path.join(cache.dir, "deletes"), cache.sealers, cache.key_fp)) \
            if config.defer_deletes else None
        self.store = self.deletes or store
        self.cache = cache
        self.cfg = config
        self.prefix = config.prefix
        # the defaults of what carries no trusted attributes (attrs.AttrOps._meta_of)
        self.uid = config.uid if config.uid is not None else os.getuid()
        self.gid = config.gid if config.gid is not None else os.getgid()
        self.file_mode = config.file_mode
        self.dir_mode = config.dir_mode
        self._ns_lock = threading.RLock()
        self._files_lock = threading.Lock()
        self._files: dict[str, FileState] = {}
        self._handles: dict[int, FileState] = {}
        self._writer_fhs: set[int] = set()      # handles opened for writing
        self._fh = itertools.count(1)
        self._init_attrs(config)
        self._fetch_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fetch")
        self._scanned = LRUCache(maxsize=SCANNED_UNITS)     # (key, etag, start): fetched once
        self._scanned_lock = threading.Lock()
        self._copy_pool = ThreadPoolExecutor(max_workers=COPY_WORKERS, thread_name_prefix="copy")
        self.wb = WriteBack(self._upload, delay=config.writeback_delay,
                            workers=config.upload_workers)
        self._init_streams(config.upload_workers)
        self.mount_time = _now()

    # ===================================================================== paths & attributes
    def key_of(self, path: str) -> str:
        rel = path.lstrip("/")
        for comp in rel.split("/"):
            if len(comp.encode("utf-8", "surrogateescape")) > NAME_MAX:
                raise NameTooLong(path)
            if comp == INDEX_NAME:
                raise InvalidName(f"{path}: the name {INDEX_NAME} is reserved (directory index)")
        key = self.prefix + rel
        if len(key.encode("utf-8", "surrogateescape")) > KEY_MAX:
            raise NameTooLong(path)
        return key

    def dir_key(self, path: str) -> str:
        k = self.key_of(path)
        k = k + "/" if k and not k.endswith("/") else k
        if len(k.encode("utf-8", "surrogateescape")) > KEY_MAX:
            raise NameTooLong(path)          # the marker "dir/" is one byte longer
        return k

    def _state(self, path: str) -> FileState | None:
        with self._files_lock:
            return self._files.get(path)

    # ===================================================================== open / create
    def _check_writable(self) -> None:
        if self.cfg.read_only:
            raise ReadOnly("read-only mount")

    def _exists(self, path: str) -> bool:
        try:
            self.getattr(path)
            return True
        except NotFound:
            return False

    def _check_parent(self, path: str) -> None:
        parent = posixpath.dirname(path) or "/"
        if parent != "/" and not self.is_dir(parent):
            raise NotFound(parent)

    def _register(self, st: FileState, writer: bool = False) -> int:
        """A new handle of st. The caller has counted it in st.opens (and st.writers)."""
        fh = next(self._fh)
        with self._files_lock:
            self._handles[fh] = st
            if writer:
                self._writer_fhs.add(fh)
        return fh

    def handle(self, fh: int) -> FileState:
        st = self._handles.get(fh)      # a single dict lookup is atomic: no lock on this path
        if st is None:
            raise NotFound(f"file handle {fh}")
        return st

    def create(self, path: str, mode: int, uid: int | None = None, gid: int | None = None) -> int:
        """uid, gid: the creating process's (the FUSE request's; None: the mount's defaults)."""
        self._check_writable()
        with self._ns_lock:
            old = self._state(path)
            if old is not None:
                # O_CREAT on a file we have open/dirty: open it and truncate, like O_TRUNC
                fh = self.open(path, os.O_RDWR)
                self.truncate(path, 0, fh)
                return fh
            meta = self._new_meta(path, stat.S_IFREG | (mode & 0o7777), uid, gid)
            st = FileState(path, self.key_of(path), meta)
            st.opens = st.writers = 1
            st.generation = st.data_generation = 1
            with self._files_lock:
                self._files[path] = st
            self._invalidate(path)
            self._note_child(path, True)
            return self._register(st, writer=True)

    def open(self, path: str, flags: int) -> int:
        writing = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND))
        if writing:
            self._check_writable()
        with self._ns_lock:
            st = self._hold_state(path, writing)
            fh = self._register(st, writing)
        if flags & os.O_TRUNC:
            self.truncate(path, 0, fh)
        elif not writing:
            self._prefetch_small(st)
            self._follow_siblings(path)
        return fh

    def _prefetch_small(self, st: FileState) -> None:
        """A small file opened for reading is about to be read whole: start its GET now, so
        it travels while the kernel sends the first read."""
        with st.lock:
            if (st.remote is not None and 0 < st.remote_valid <= PREFETCH_ON_OPEN
                    and not st.dirty and (st.entry is None or not st.entry.has(0))):
                self._ensure_entry(st)
                self._fetch_async(st, 0, READ_UNIT)

    def _hold_state(self, path: str, writer: bool = False) -> FileState:
        """Caller holds _ns_lock. The file's state, with one more open (and writer) counted.
        A state that an upload just forgot (closed and clean) is never revived: it is loaded
        anew."""
        while True:
            st = self._state(path)
            if st is None:
                st = self._load_state(path)
            with st.lock:
                with self._files_lock:
                    registered = self._files.get(path) is st
                if registered:
                    st.opens += 1
                    st.writers += writer
                    return st

    def _load_state(self, path: str) -> FileState:
        key = self.key_of(path)
        with self._attr_lock:
            pending = self._heads.get(path)
        if pending is not None:       # a prefetch is looking it up right now: its answer
            try:
                pending.result()
            except Exception:  # noqa: BLE001 - then we ask ourselves, below
                pass
        with self._attr_lock:
            info = self._infos.pop(path, None)   # looked up within the attribute timeout
        if info is None:
            info = self._head_keep_start(path, key)   # close-to-open: a fresh HEAD
        if info.access == LOCKED:
            log.warning("%s: no key of the ring opens this object (another key?)", path)
            raise KeyMismatch(path)
        if info.access == PLAINTEXT:
            log.warning("%s: object is stored without SSE-C (plaintext); refused", path)
            raise KeyMismatch(path)
        m = self._meta_of(info, stat.S_IFREG)
        if stat.S_ISDIR(m["mode"]):
            raise IsADirectory(path)
        st = FileState(path, key, m, info.size, Remote(key, info.etag, info.size, info.key_fp))
        st.entry = self.cache.lookup_clean(key, info.etag)
        data = self.take_start(path, info.etag)
        if data is not None and (st.entry is None or not st.entry.has(0)):
            # the lookup fetched the whole (small) object: cached and served like a fetch
            entry = self._ensure_entry(st)
            tag = (st.remote, st.trunc_epoch, st.data_generation)
            for off in range(0, len(data), CHUNK):
                piece = data[off:off + CHUNK]
                if entry.write_chunk(off // CHUNK, piece, dirty=False):
                    st.hot[off // CHUNK] = (tag, piece)
        with self._files_lock:
            self._files[path] = st
        with self._attr_lock:
            self._attrs[path] = self._attr_of_state(st)
        return st

    def _ensure_entry(self, st: FileState) -> CacheEntry:
        if st.entry is None:
            st.entry = self.cache.new_entry()
            if st.remote and not st.dirty:
                self.cache.index_clean(st.entry, st.remote.key, st.remote.etag)
        return st.entry

    # ===================================================================== read
    def read(self, fh: int, size: int, offset: int, copy: bool = True) -> bytes:
        """Bytes [offset, offset + size) of the open file (fewer at its end). With copy=False
        the answer may be a memoryview of a fetched buffer (the FUSE adapter copies it into
        the kernel's reply buffer itself: one copy of each byte read less)."""
        st = self.handle(fh)
        with st.lock:
            end = min(offset + size, st.size)
            if offset >= end:
                return b""
            # near the previous read counts as sequential: the kernel's read-ahead sends
            # several requests at once and they may arrive slightly out of order
            sequential = abs(offset - st.last_read_end) <= SEQ_SLACK
            if not sequential:
                st.ahead = (None, 0)
            st.last_read_end = max(end, st.last_read_end) if sequential else end
        first, last = offset // CHUNK, (end - 1) // CHUNK
        parts = []
        for i in range(first, last + 1):
            lo = max(offset, i * CHUNK) - i * CHUNK
            hi = min(end, (i + 1) * CHUNK) - i * CHUNK
            piece = self._chunk(st, i, sequential, lo, hi)
            parts.append(piece)
            if len(piece) < hi - lo:
                parts.append(bytes(hi - lo - len(piece)))
        if sequential:
            self._readahead(st, end)
        if len(parts) > 1:
            return b"".join(parts)
        # a chunk may be a view into a fetched buffer (bytes(b) is b itself for bytes)
        return parts[0] if not copy else bytes(parts[0])

    def _chunk(self, st: FileState, i: int, sequential: bool = True,
               lo: int = 0, hi: int = CHUNK) -> bytes:
        """Plaintext bytes [lo, hi) of chunk i as the file has it now (may be shorter: zeros
        follow). Fetches from the remote object when not cached: a whole read unit for
        sequential access, the one chunk otherwise."""
        whole = lo == 0 and hi >= CHUNK
        for _ in range(3):
            with st.lock:
                hot = st.hot.get(i)
                if hot is not None and hot[0] == (st.remote, st.trunc_epoch, st.data_generation):
                    # fetched moments ago: no need to decrypt it again (nor to fetch it again
                    # when it was not cached); kept until read to its end
                    if hi >= len(hot[1]):
                        del st.hot[i]
                    return hot[1] if whole else hot[1][lo:hi]
                if hot is not None:
                    del st.hot[i]
                entry = self._ensure_entry(st)
                cached = entry.has(i)
            if cached:
                # outside st.lock: the decryption of one reader does not stall the others
                # (the entry's own io_lock keeps the slot read whole)
                data = entry.read_chunk(i) if whole else \
                    entry.read_range(i, lo, hi, random=not sequential)
                if data is not None:
                    return data
            with st.lock:
                if st.entry is not entry:
                    continue
                data = entry.read_chunk(i)
                if data is not None:
                    return data if whole else data[lo:hi]
                if st.remote is None or i * CHUNK >= st.remote_valid:
                    return b""
                remote = st.remote
                unit = i * CHUNK // READ_UNIT * READ_UNIT
                if sequential or unit in st.readahead or self._scanned_before(remote, unit):
                    fut = self._fetch_async(st, unit, READ_UNIT)
                else:
                    fut = self._fetch_async(st, i * CHUNK, CHUNK)
            fetched = fut.result()
            with st.lock:
                data = st.entry.read_chunk(i) if st.entry is not None else None
                if data is not None:
                    return data if whole else data[lo:hi]
                # The cache may have evicted it already (a cache smaller than the read-ahead):
                # the fetched bytes are still good while the file's remote is unchanged.
                if fetched and i in fetched and st.remote is remote:
                    limit = min(st.remote_valid, st.size) - i * CHUNK
                    data = fetched[i][:max(0, limit)]
                    if hi >= len(data):
                        st.hot.pop(i, None)
                    return data if whole else data[lo:hi]
        raise Stale(f"{st.path}: chunk {i} could not be loaded")

    def _fetch_async(self, st: FileState, start: int, length: int) -> Future:
        """Caller holds st.lock. One fetch in flight per range, shared by readers."""
        fut = st.readahead.get(start)
        if fut is None or fut.done():
            fut = self._fetch_pool.submit(self._fetch, st, start, length, st.remote)
            st.readahead[start] = fut
            fut.add_done_callback(lambda f: self._fetch_done(st, start, f))
        return fut

    @staticmethod
    def _fetch_done(st: FileState, start: int, fut: Future) -> None:
        """A finished fetch leaves the table (its result, the fetched bytes, is kept only by
        the readers that wait for it: memory stays bounded however much is read)."""
        with st.lock:
            if st.readahead.get(start) is fut:
                del st.readahead[start]

    def _admit(self, st: FileState, start: int, length: int, remote: Remote) -> bool:
        """Caller holds st.lock. Whether the fetched range [start, start + length) goes into
        the cache. Not when a sequential reader fetches a read unit of a big clean file for
        the first time: a file read once from end to end (a copy, a backup, a scan) would
        otherwise push out what the cache holds and pay the sealing and the cache writes on
        the reader's time; a unit fetched again is cached."""
        if (self.cfg.cache_every_read or length != READ_UNIT or remote.size < SCAN_MIN_SIZE
                or st.dirty or st.writers):
            return True
        seen = (remote.key, remote.etag, start)
        with self._scanned_lock:
            if seen in self._scanned:
                return True
            self._scanned[seen] = True
        return False

    def _scanned_before(self, remote: Remote, start: int) -> bool:
        """Whether the read unit at start was fetched once for a sequential reader and not
        cached (_admit): a random read of it then fetches it whole, to be cached this time
        (its second fetch), rather than one chunk after the other. (A second sequential read
        may have come from the kernel's page cache, unseen here.)"""
        with self._scanned_lock:
            return (remote.key, remote.etag, start) in self._scanned

    def _fetch(self, st: FileState, start: int, length: int, remote: Remote) -> dict:
        """Range GET; stores the chunks in the cache (unless _admit says no) and returns
        {chunk index: bytes}."""
        with st.lock:
            valid = st.remote_valid if st.remote is remote else 0
            admit = self._admit(st, start, length, remote)
        length = min(length, valid - start)
        if length <= 0:
            return {}
        data = self.store.get_range(remote.key, start, length, remote.key_fp, remote.etag,
                                    shared=True)
        if len(data) != length:
            raise Stale(f"{st.path}: short read from the store")
        got = {}
        with st.lock:
            if st.remote is not remote or st.deleted:
                return {}
            entry = self._ensure_entry(st)
            limit = min(st.remote_valid, st.size)
            epoch = st.trunc_epoch
            dgen = st.data_generation
        # chunks are views (no copy, no allocation each), each holding only its own buffer
        for off, piece in zip(range(0, len(data), CHUNK), pieces(data, CHUNK)):
            i = (start + off) // CHUNK
            if start + off >= limit:
                break
            got[i] = piece[:min(CHUNK, limit - start - off)]
        # Stored without holding st.lock (readers go on meanwhile); a chunk written or a
        # file truncated since the GET was sent wins over the fetched bytes.
        still = lambda: st.remote is remote and st.trunc_epoch == epoch and not st.deleted  # noqa: E731
        stored = entry.write_chunks(got, dirty=False, only_if=still) if admit else list(got)
        with st.lock:
            if still():
                tag = (remote, epoch, dgen)       # a write since then voids them
                for i in stored:
                    st.hot[i] = (tag, got[i])
                while len(st.hot) > HOT_CHUNKS:
                    del st.hot[next(iter(st.hot))]
        return got

    def _readahead(self, st: FileState, pos: int) -> None:
        with st.lock:
            if st.remote is None or st.entry is None:
                return
            u0 = pos // READ_UNIT
            # never read further ahead than a quarter of the cache can hold
            units = max(0, min(READAHEAD_UNITS, self.cache.max_bytes // 4 // READ_UNIT))
            tag = (st.remote, st.trunc_epoch)
            upto = st.ahead[1] if st.ahead[0] == tag else 0
            for u in range(u0, u0 + units + 1):
                start = u * READ_UNIT
                if start >= st.remote_valid:
                    break
                first = max(start, pos) // CHUNK
                if start < upto or st.entry.has(first) or first in st.hot \
                        or start in st.readahead:
                    continue
                self._fetch_async(st, start, READ_UNIT)
            st.ahead = (tag, max(upto, min(u0 + units + 1, -(-st.remote_valid // READ_UNIT))
                                 * READ_UNIT))

    # ===================================================================== write / truncate
    def write(self, fh: int, data: bytes, offset: int) -> int:
        self._check_writable()
        st = self.handle(fh)
        if st.deleted:
            return len(data)
        entry = self._ensure_entry(st)
        self.cache.wait_for_room(len(data), entry, progress=lambda: self.wb.pending() > 0)
        end = offset + len(data)
        with st.lock:
            self._begin_change(st, data=True)
            pos = offset
            view = memoryview(data)
            while pos < end:
                i = pos // CHUNK
                cstart = i * CHUNK
                lo = pos - cstart
                hi = min(end, cstart + CHUNK) - cstart
                new_size = max(st.size, end)
                chunk_len = min(CHUNK, new_size - cstart)
                if lo == 0 and hi >= chunk_len:
                    if pos == offset and hi == len(data) and isinstance(data, bytes):
                        entry.write_chunk(i, data)        # one whole chunk: no copy
                    else:
                        entry.write_chunk(i, bytes(view[pos - offset:pos - offset + hi]))
                else:
                    base = bytearray(self._chunk_locked(st, i))
                    want = max(len(base), hi)
                    if len(base) < want:
                        base.extend(bytes(want - len(base)))
                    base[lo:hi] = view[pos - offset:pos - offset + (hi - lo)]
                    entry.write_chunk(i, bytes(base))
                pos = cstart + hi
            st.size = max(st.size, end)
            st.meta["mtime"] = st.meta["ctime"] = _now()
            self._stream_on_write(st, offset, end)
        return len(data)

    def _chunk_locked(self, st: FileState, i: int) -> bytes:
        """Like _chunk, for a caller that holds st.lock (write/truncate): fetches inline."""
        data = self._ensure_entry(st).read_chunk(i)
        if data is not None:
            return data[:max(0, st.size - i * CHUNK)]
        if st.remote is None or i * CHUNK >= st.remote_valid:
            return b""
        start = i * CHUNK
        length = min(CHUNK, st.remote_valid - start, st.size - start)
        if length <= 0:
            return b""
        r = st.remote
        return self.store.get_range(r.key, start, length, r.key_fp, r.etag)

    def _begin_change(self, st: FileState, data: bool) -> None:
        """Caller holds st.lock. Marks the file dirty (its cache entry too)."""
        st.generation += 1
        if data:
            st.data_generation = st.generation
            if st.hot:
                st.hot.clear()            # void anyway (tagged with the old generation)
            entry = self._ensure_entry(st)
            if not entry.dirty:
                self.cache.unindex(entry)
                self.cache.set_dirty(entry, True)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        self._check_writable()
        if fh is not None:
            st = self.handle(fh)
        else:
            with self._ns_lock:
                st = self._hold_state(path)
            try:
                self._truncate(st, length)
            finally:
                self.release(None, st=st)
            return
        self._truncate(st, length)

    def _truncate(self, st: FileState, length: int) -> None:
        with st.lock:
            if length == st.size:
                st.meta["mtime"] = st.meta["ctime"] = _now()
                self._begin_change(st, data=False)
                return
            self._begin_change(st, data=True)
            self._stream_drop(st, "truncated")
            st.seq_end = min(st.seq_end, length)
            st.trunc_epoch += 1
            entry = self._ensure_entry(st)
            if length < st.size:
                k, rem = divmod(length, CHUNK)
                if rem:
                    tail = self._chunk_locked(st, k)[:rem]
                    if tail:
                        entry.write_chunk(k, tail.ljust(rem, b"\0"))
                    entry.drop_chunks_from(k + 1)
                else:
                    entry.drop_chunks_from(k)
                st.remote_valid = min(st.remote_valid, length)
            st.size = length
            st.meta["mtime"] = st.meta["ctime"] = _now()
        self._invalidate(st.path)

    # ===================================================================== flush / fsync / release
    def flush(self, fh: int) -> None:
        st = self.handle(fh)
        self._persist_and_schedule(st)

    def _persist_and_schedule(self, st: FileState, delay: float | None = None) -> None:
        with st.lock:
            if not st.dirty or st.deleted:
                return
            if delay == 0:
                st.urgent_gen = st.generation     # fsync, unmount: see _upload
            if delay is None and st.stream is not None:
                # mostly sent already: complete it soon (still late enough for the chmod /
                # utime that cp -p and rsync do right after close)
                delay = min(self.cfg.writeback_delay, STREAM_CLOSE_DELAY)
            if st.journaled_gen != st.generation:
                entry = self._ensure_entry(st)
                if not entry.dirty:
                    # a change of metadata only (chmod, utime, truncate to the same size):
                    # the entry must not be evicted, with its record, before the upload
                    self.cache.unindex(entry)
                    self.cache.set_dirty(entry, True)
                try:
                    entry.save_state(st.journal())     # with the data: durable
                except Exception:
                    # the caller hears of it (ENOSPC at close); the upload is still queued:
                    # what could not be written to disk is still in memory
                    self.wb.schedule(st, delay)
                    raise
                st.journaled_gen = st.generation
            elif delay is None and not st.deferred:
                return          # already journaled and queued (close after flush)
            st.deferred = False
        self.wb.schedule(st, delay)

    def fsync(self, fh: int) -> None:
        st = self.handle(fh)
        with st.lock:
            if not st.dirty or st.deleted:
                return
            gen = st.generation
        self._persist_and_schedule(st, delay=0)
        self.wb.expedite(st)
        ok = self.wb.wait(lambda: st.uploaded_gen >= gen or st.deleted,
                          timeout=self.cfg.fsync_timeout)
        if not ok:
            raise TimedOut(f"fsync of {st.path}: not durable after {self.cfg.fsync_timeout}s "
                           f"({self.wb.last_error or 'upload pending'})")

    def release(self, fh: int | None, st: FileState | None = None) -> None:
        writer = False
        if st is None:
            with self._files_lock:
                st = self._handles.pop(fh, None)
                if fh in self._writer_fhs:
                    self._writer_fhs.discard(fh)
                    writer = True
            if st is None:
                return
        with st.lock:
            st.opens -= 1         # first: an upload that starts from here sees it closed
            st.writers -= writer
        try:
            self._persist_and_schedule(st)
        finally:
            with st.lock:
                self._maybe_forget(st)

    def _maybe_forget(self, st: FileState) -> None:
        """Caller holds st.lock. Drop a closed, clean file from the table."""
        if st.opens > 0 or st.dirty:
            return
        with self._files_lock:
            if self._files.get(st.path) is st:
                del self._files[st.path]
        if st.entry is not None:
            st.entry.close_fd()
        st.hot.clear()
        if not st.deleted:
            self._note_child(st.path, True, changed=False)
            with self._attr_lock:
                self._attrs[st.path] = self._attr_of_state(st)

    # ===================================================================== upload (write-back)
    def _upload(self, st: FileState) -> None:
        """Called by a write-back worker. Uploads the current generation of st."""
        with st.lock:
            if st.deleted or not st.dirty:
                return
            if st.writers > 0 and st.urgent_gen <= st.uploaded_gen:
                # Still open for writing: a close() of another descriptor of it queued this
                # upload (`dd` and shell redirections close the descriptor they dup'ed onto
                # stdout before they write; a reader closes). Uploading now would store a
                # partial object, or complete a multipart stream at a partial size and send
                # every later part again; the last writer's close (release) queues it again.
                st.deferred = True
                log.info("%s: still being written: its upload waits for the last close",
                         st.path)
                return
            gen, key, size = st.generation, st.key, st.size
            meta = self._meta_headers(st.meta)
            remote = st.remote
            meta_only = (st.data_generation <= st.uploaded_gen and remote is not None
                         and remote.key == key and remote.size == size)
        if meta_only:
            info = self.store.copy(key, key, size, meta, remote.key_fp)
        else:
            info = self._stream_finish(st, key, size)
            if info is None:
                info = self.store.upload(key, size,
                                         lambda off, ln: self._read_for_upload(st, off, ln), meta)
        with st.lock:
            if st.deleted or st.key != key:
                return      # unlinked/renamed meanwhile: the namespace op fixed the object
            new_remote = Remote(key, info.etag, size, info.key_fp)
            if st.generation == gen:
                st.remote_valid = size
            else:
                st.remote_valid = min(st.remote_valid, size)
            st.remote = new_remote
            st.uploaded_gen = max(st.uploaded_gen, gen)
            st.readahead.clear()
            st.hot.clear()
            if st.entry is not None:
                if not st.dirty:
                    self.cache.set_dirty(st.entry, False)
                    self.cache.index_clean(st.entry, key, info.etag)
                try:
                    if st.dirty:
                        st.entry.save_state(st.journal(), sync=False)
                    else:
                        st.entry.drop_state()
                except Exception as e:  # noqa: BLE001 - the object is durable already; at
                    # worst a crash before the next journal write uploads it once more
                    log.warning("%s: journal not updated after upload: %s", st.path, e)
            self._maybe_forget(st)
        self._invalidate(st.path)
        log.debug("uploaded %s (%d bytes, generation %d)", key, size, gen)

    def _read_for_upload(self, st: FileState, off: int, length: int) -> Segments:
        pieces = []
        pos, end = off, off + length
        while pos < end:
            i = pos // CHUNK
            data = self._chunk(st, i)
            lo = pos - i * CHUNK
            hi = min(end - i * CHUNK, CHUNK)
            piece = data[lo:hi] if lo or hi < len(data) else data     # whole chunk: no copy
            pieces.append(piece)
            if len(piece) < hi - lo:
                pieces.append(bytes(hi - lo - len(piece)))
            pos = i * CHUNK + hi
        return Segments(pieces)           # not joined: the transport copies them once

    # ===================================================================== whole-mount
    def statfs(self) -> dict:
        total = 1 << 50
        bs = 4096
        return {"f_bsize": bs, "f_frsize": bs, "f_blocks": total // bs, "f_bfree": total // bs,
                "f_bavail": total // bs, "f_files": 1 << 32, "f_ffree": 1 << 32,
                "f_favail": 1 << 32, "f_namemax": NAME_MAX}

    def dirty_files(self) -> list[FileState]:
        with self._files_lock:
            return [st for st in self._files.values() if st.dirty and not st.deleted]

    def recover(self) -> int:
        """Re-adopt dirty files from the cache journal after a crash and queue their uploads;
        take up the deletes the delete journal holds."""
        if self.deletes is not None:
            self.deletes.recover()
        entries, bad = self.cache.recover()
        n = 0
        for entry, j in entries:
            r = j.get("remote")
            remote = Remote(*r) if r else None
            st = FileState(j["path"], j["key"], j["meta"], j["size"], remote)
            st.remote_valid = j.get("remote_valid", remote.size if remote else 0)
            st.entry = entry
            st.generation = st.data_generation = 1
            if j.get("data_generation", 1) < j.get("generation", 1) and remote is not None:
                st.data_generation = 0        # only metadata was pending
            with self._files_lock:
                self._files[st.path] = st
            self.wb.schedule(st, 0)
            n += 1
        if n:
            log.info("recovered %d dirty file(s) from the cache journal; uploading", n)
        self.bad_entries = bad
        return n

    def flush_all(self, timeout: float | None = None, progress=None) -> bool:
        """Upload every dirty file now and wait (unmount, SIGTERM)."""
        for st in self.dirty_files():
            try:
                self._persist_and_schedule(st, delay=0)
            except Exception as e:  # noqa: BLE001 - one file's trouble must not stop the rest
                log.error("%s: could not journal before the final upload: %s", st.path, e)
        self.wb.expedite_all()

        def done() -> bool:
            left = self.dirty_files()
            if progress:
                progress(len(left), sum(s.size for s in left))
            return not left
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.wb.wait(done, timeout=timeout):
            return False
        return self.deletes is None or self.deletes.flush(
            timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))

    def fsyncdir(self, path: str) -> None:
        """fsync() of a directory: the deletes under it are done when it returns."""
        if self.deletes is not None:
            pfx = self.prefix if path == "/" else self.dir_key(path)
            if not self.deletes.flush(pfx, timeout=self.cfg.fsync_timeout or None):
                raise TimedOut(f"{path}: deletes not done within --fsync-timeout")

    def status(self) -> dict:
        left = self.dirty_files()
        return {"dirty_files": len(left), "bytes_pending": sum(s.size for s in left),
                "uploads_in_flight": self.wb.in_flight(), "uploads_done": self.wb.uploads_done,
                "upload_errors": self.wb.upload_errors, "last_error": self.wb.last_error,
                **(self.deletes.status() if self.deletes is not None else {}),
                **self.cache.stats()}

    def shutdown(self) -> None:
        self.wb.stop()
        if self.deletes is not None:
            self.deletes.close()
        self.dirindex.stop()
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        self._head_pool.shutdown(wait=False, cancel_futures=True)
        self._copy_pool.shutdown(wait=False, cancel_futures=True)
        self._stream_pool.shutdown(wait=False, cancel_futures=True)
