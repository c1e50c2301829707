"""Reading: the plaintext of an open file's chunks, from the chunks fetched moments ago, the
encrypted cache, or the store (a read unit at a time for a sequential reader, with read-ahead;
one chunk for a random one). What a fetch brings goes into the cache, except what a reader
scanning a big file end to end brings the first time (`_admit`). The uploads read a dirty
file's bytes through here too (`for_upload`).

State: the fetch pool and the read units fetched once (`_scanned`, its own leaf lock); the
per-file read state lives in FileState (readahead, hot, ahead), under its lock.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

from cachetools import LRUCache

from ..buffers import Segments
from ..cache import CHUNK, Cache
from ..errors import Stale
from ..store.contract import Store, pieces
from .files import FileState, OpenFiles, Remote

READ_UNIT = 8 * 1024 * 1024          # range GET size for sequential reads
READAHEAD_UNITS = 4                  # units fetched ahead of a sequential reader
SEQ_SLACK = 2 * 1024 * 1024          # a read this close to the last one is sequential
HOT_CHUNKS = (READAHEAD_UNITS + 1) * READ_UNIT // (128 * 1024)   # per file, see FileState.hot
PREFETCH_ON_OPEN = 1024 * 1024      # files up to this size are fetched at open (read-only)
FETCH_WORKERS = 8
# Scan resistance: a read unit of a file this big that a sequential reader fetches is cached
# only when it is fetched a second time (docs/CACHE.md, "What a read leaves in the cache").
SCAN_MIN_SIZE = 64 * 1024 * 1024
SCANNED_UNITS = 16384                # read units remembered as fetched once (128 GiB of them)


class Reader:
    def __init__(self, store: Store, cache: Cache, files: OpenFiles, config):
        self.store = store
        self.cache = cache
        self.files = files
        self.cfg = config
        self._pool = ThreadPoolExecutor(max_workers=FETCH_WORKERS, thread_name_prefix="fetch")
        self._scanned = LRUCache(maxsize=SCANNED_UNITS)     # (key, etag, start): fetched once
        self._scanned_lock = threading.Lock()

    def prefetch_small(self, st: FileState) -> None:
        """A small file opened for reading is about to be read whole: start its GET now, so
        it travels while the kernel sends the first read."""
        with st.lock:
            if (st.remote is not None and 0 < st.remote_valid <= PREFETCH_ON_OPEN
                    and not st.dirty and (st.entry is None or not st.entry.has(0))):
                self.files.entry_of(st)
                self._fetch_async(st, 0, READ_UNIT)

    def read(self, st: FileState, size: int, offset: int, copy: bool = True) -> bytes:
        """Bytes [offset, offset + size) of the open file (fewer at its end). With copy=False
        the answer may be a memoryview of a fetched buffer (the FUSE adapter copies it into
        the kernel's reply buffer itself: one copy of each byte read less)."""
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
            piece = self.chunk(st, i, sequential, lo, hi)
            parts.append(piece)
            if len(piece) < hi - lo:
                parts.append(bytes(hi - lo - len(piece)))
        if sequential:
            self._readahead(st, end)
        if len(parts) > 1:
            return b"".join(parts)
        # a chunk may be a view into a fetched buffer (bytes(b) is b itself for bytes)
        return parts[0] if not copy else bytes(parts[0])

    def chunk(self, st: FileState, i: int, sequential: bool = True,
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
                entry = self.files.entry_of(st)
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
            fut = self._pool.submit(self._fetch, st, start, length, st.remote)
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

    def _fetch(self, st: FileState, start: int, length: int, remote: Remote,
               keep: bool = False) -> dict:
        """Range GET; stores the chunks in the cache (unless _admit says no, and keep does not
        insist) and returns {chunk index: bytes}."""
        with st.lock:
            valid = st.remote_valid if st.remote is remote else 0
            admit = keep or self._admit(st, start, length, remote)
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
            entry = self.files.entry_of(st)
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

    def chunk_locked(self, st: FileState, i: int) -> bytes:
        """Like _chunk, for a caller that holds st.lock (write/truncate): fetches inline."""
        data = self.files.entry_of(st).read_chunk(i)
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

    # -- the object is about to be deleted (orphans.py) ----------------------------------------
    @staticmethod
    def _missing(st: FileState) -> list[int]:
        """Caller holds st.lock. The chunks of st that only its remote object holds."""
        if st.remote is None:
            return []
        n = -(-min(st.remote_valid, st.size) // CHUNK)
        entry = st.entry
        return [i for i in range(n) if entry is None or not entry.has(i)]

    def make_local(self, st: FileState) -> None:
        """Fetch into st's cache entry every chunk that only its remote object holds, a read
        unit each, FETCH_WORKERS at once, without st.lock; a chunk written meanwhile wins (what
        a truncate voided is left to make_local_locked)."""
        with st.lock:
            remote = st.remote
            units = sorted({i * CHUNK // READ_UNIT * READ_UNIT for i in self._missing(st)})
        window: list[Future] = []
        for start in units:
            if len(window) >= FETCH_WORKERS:
                window.pop(0).result()
            window.append(self._pool.submit(self._fetch, st, start, READ_UNIT, remote, True))
        for fut in window:
            fut.result()

    def make_local_locked(self, st: FileState) -> None:
        """Caller holds st.lock: make_local of what is still missing, fetched inline."""
        for i in self._missing(st):
            data = self.chunk_locked(st, i)
            if data:
                self.files.entry_of(st).write_chunk(i, data, dirty=False)

    def for_upload(self, st: FileState, off: int, length: int) -> Segments:
        pieces = []
        pos, end = off, off + length
        while pos < end:
            i = pos // CHUNK
            data = self.chunk(st, i)
            lo = pos - i * CHUNK
            hi = min(end - i * CHUNK, CHUNK)
            piece = data[lo:hi] if lo or hi < len(data) else data     # whole chunk: no copy
            pieces.append(piece)
            if len(piece) < hi - lo:
                pieces.append(bytes(hi - lo - len(piece)))
            pos = i * CHUNK + hi
        return Segments(pieces)           # not joined: the transport copies them once


    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
