"""The cache: its directory (lock, format version, recovery after a restart), its entries by
id and by the remote object they hold, the sealer threads, and the bound on disk use:
accounting, LRU eviction of clean chunks and backpressure on writers.

Locks: Cache._lock guards _used, _dirty_bytes, _lru, _entries, _by_object, _by_key; it is
never held together with an entry's io_lock, and no fdatasync runs under it (see
entry.CacheEntry for the entry's locks).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from ..crypto.aead import NONCE_LEN, Sealer
from ..errors import CacheDirError, IntegrityError
from . import oscalls
from .entry import CacheEntry
from .layout import FORMAT, GONE, VERSION_TEXT, read_records
from .pending import Slots
from .spares import Spares

log = logging.getLogger("ssecfs.cache")

SEALER_THREADS = 2
MAX_PENDING = 256                    # chunks (32 MiB) of plaintext waiting to be sealed
SEAL_BATCH = 16                      # a fetcher that waits for room waits for this much


class Cache:
    def __init__(self, directory: str, sealers: dict[str, Sealer], max_bytes: int, key_fp: str):
        """sealers: one per ring key (by key fingerprint); key_fp: the current key's."""
        self.dir = directory
        self.entries_dir = os.path.join(directory, "entries")
        self.sealers = sealers
        self.max_bytes = max_bytes
        self.key_fp = key_fp
        self._lock = threading.Condition()
        self._used = 0
        self._dirty_bytes = 0
        self._lru: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._entries: dict[str, CacheEntry] = {}
        self._by_object: dict[tuple, CacheEntry] = {}
        self._by_key: dict[str, set[str]] = {}      # object key -> ETags in _by_object
        self._lock_fd: int | None = None
        self._dir_fd: int | None = None      # entries/, for fsync after a record's rename
        self._sealers = ThreadPoolExecutor(max_workers=SEALER_THREADS, thread_name_prefix="seal")
        # removes the files of discarded entries (see discard), makes spare data files
        # (spares.py), writes confirmation records (journal.py): nothing a writer waits for
        self._reaper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reap",
                                          initializer=oscalls.low_priority)
        self._pending_slots = Slots(MAX_PENDING)
        self._spares = Spares(self.entries_dir, self.sync_entries_dir, self._reaper)

    # -- lifecycle ----------------------------------------------------------------------------
    def open(self) -> None:
        """Create/lock the directory (0700). Refuses a directory locked by another daemon."""
        try:
            os.makedirs(self.entries_dir, mode=0o700, exist_ok=True)
            os.chmod(self.dir, 0o700)
            os.chmod(self.entries_dir, 0o700)
        except OSError as e:
            raise CacheDirError(f"cache dir {self.dir}: {e.strerror}") from None
        vpath = os.path.join(self.dir, "VERSION")
        version = None
        if os.path.exists(vpath):
            with open(vpath, "rb") as f:
                version = f.read(64)
            if version != VERSION_TEXT.encode():
                found = version.decode("ascii", "replace").strip()[:40]
                raise CacheDirError(
                    f"cache dir {self.dir}: format {found!r} is not this version's ({FORMAT}); "
                    "if it holds pending uploads, mount it once with the ssecfs version that "
                    "wrote it and unmount (that uploads everything), then remove the "
                    "directory")
        self._lock_fd = os.open(os.path.join(self.dir, "LOCK"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise CacheDirError(f"cache dir {self.dir} is in use by another ssecfs daemon") from None
        if version is None:
            tmp = vpath + ".tmp"
            with open(tmp, "w") as f:
                f.write(VERSION_TEXT)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, vpath)
        self._dir_fd = os.open(self.entries_dir, os.O_RDONLY | os.O_DIRECTORY)
        for d in (os.path.dirname(os.path.abspath(self.dir)), self.dir):
            try:                                   # a new cache dir's own names: best effort
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)   # (a parent may be unreadable)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                log.debug("fsync of %s: %s", d, e.strerror)

    def sync_entries_dir(self) -> None:
        """fsync the entries directory: names created or renamed in it are durable after."""
        fd = self._dir_fd
        if fd is None:
            fd = os.open(self.entries_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        os.fsync(fd)

    def later(self, fn, *args) -> None:
        """Run fn(*args) on the cache's background thread (here, if the cache is closing)."""
        try:
            self._reaper.submit(fn, *args)
        except RuntimeError:
            fn(*args)

    def _submit_seals(self, e: CacheEntry, indexes: list[int]) -> None:
        """Hand chunks of `e` to the sealers, as few jobs as the bound on plaintext waiting
        in memory (MAX_PENDING chunks) allows: one per fetched read unit when there is room,
        else batches of SEAL_BATCH as room comes (backpressure). Slots are taken only
        together with the chunks they are for, never held while waiting."""
        done = 0
        while done < len(indexes):
            left = len(indexes) - done
            got = self._pending_slots.take(left, least=min(left, SEAL_BATCH))
            self._submit_job(e, indexes[done:done + got])
            done += got

    def _submit_job(self, e: CacheEntry, batch: list[int]) -> None:
        def job():
            nonces = os.urandom(NONCE_LEN * len(batch))     # one getrandom for the batch
            for n, index in enumerate(batch):
                try:
                    e._seal_one(index, nonces[n * NONCE_LEN:(n + 1) * NONCE_LEN])
                except BaseException:
                    self._pending_slots.give(len(batch) - n)
                    raise
                self._pending_slots.give()
        try:
            self._sealers.submit(job)
        except RuntimeError:        # closing (a late read-ahead or upload thread): seal here,
            job()                   # or the chunk would stay pending and close() wait forever

    def close(self) -> None:
        self._sealers.shutdown(wait=True)
        self._reaper.shutdown(wait=True)
        self._spares.close()
        for e in list(self._entries.values()):
            e.close_fd()
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def recover(self) -> tuple[list[tuple[CacheEntry, dict]], list[str]]:
        """After a (re)start: return dirty entries with their journal state; remove clean and
        half-created ones. Entries whose record does not authenticate (another key, or torn)
        are left on disk and reported, never deleted: they may hold the only copy of data."""
        dirty, bad = [], []
        names = set(os.listdir(self.entries_dir))
        for n in [n for n in names if n.endswith(GONE)]:
            oscalls.unlink_quietly(os.path.join(self.entries_dir, n))     # discarded before a crash
            names.discard(n)
        for eid in sorted({n.split(".")[0] for n in names}):
            if len(eid) != 32:
                continue
            try:
                e, state = self._recover_one(eid, names)
            except (IntegrityError, ValueError, OSError):
                bad.append(eid)
                log.error("cache entry %s: journal record does not authenticate with this key "
                          "(another key, or torn); left untouched", eid[:8])
                continue
            if e is None:
                continue
            if not state.get("dirty"):
                e.file.remove()
                continue
            e.dirty = e.ledger.disk_dirty = True
            try:
                e.scan_slots()
            except OSError as err:
                e.close_fd()
                bad.append(eid)
                log.error("cache entry %s: its chunks cannot be read (%s); left untouched",
                          eid[:8], err.strerror)
                continue
            with self._lock:
                self._entries[eid] = e
                n = e.held()
                self._used += n
                self._dirty_bytes += n
            dirty.append((e, state))
        return dirty, bad

    def _recover_one(self, eid: str, names: set) -> tuple[CacheEntry | None, dict]:
        """The entry `eid` and its newest authentic record; (None, {}) for an entry without a
        record (never closed, or half-created), whose files are removed."""
        records = []
        if eid + ".data" in names:
            records = read_records(os.path.join(self.entries_dir, eid + ".data"))
        if not records:
            CacheEntry(self, eid).file.remove()
            return None, {}
        ours = [fp for _, fp, _ in records if fp in self.sealers]
        if not ours:
            raise IntegrityError("sealed under a key that is not in the ring")
        e = CacheEntry(self, eid, ours[0], named=True)
        return e, e.load_state()

    # -- entries ------------------------------------------------------------------------------
    def new_entry(self) -> CacheEntry:
        spare = self._spares.take()
        e = CacheEntry(self, spare or uuid.uuid4().hex, named=spare is not None)
        with self._lock:
            self._entries[e.id] = e
        return e

    def lookup_clean(self, key: str, etag: str) -> CacheEntry | None:
        with self._lock:
            return self._by_object.get((key, etag))

    def index_clean(self, e: CacheEntry, key: str, etag: str) -> None:
        with self._lock:
            self._unindex_locked(e)
            old = self._by_object.get((key, etag))
            e.object_key = (key, etag)
            self._by_object[(key, etag)] = e
            self._by_key.setdefault(key, set()).add(etag)
        if old is not None and old is not e:
            self.discard(old)

    def unindex(self, e: CacheEntry) -> None:
        with self._lock:
            self._unindex_locked(e)
            e.object_key = None

    def _unindex_locked(self, e: CacheEntry) -> None:
        if e.object_key and self._by_object.get(e.object_key) is e:
            del self._by_object[e.object_key]
            key, etag = e.object_key
            etags = self._by_key.get(key)
            if etags is not None:
                etags.discard(etag)
                if not etags:
                    del self._by_key[key]

    def discard_key(self, key: str) -> None:
        """The object `key` is gone (unlinked, or replaced): its clean cached versions can
        serve nothing any more; remove them now rather than when the LRU gets to them (their
        disk space may be what the next write needs)."""
        with self._lock:
            gone = [self._by_object[(key, etag)] for etag in self._by_key.get(key, ())]
        for e in gone:
            self.discard(e)

    def set_dirty(self, e: CacheEntry, dirty: bool) -> None:
        with self._lock:
            if e.dirty == dirty:
                return
            e.dirty = dirty
            n = e.held()
            if dirty:
                self._dirty_bytes += n
                for i in e.present:
                    self._lru.pop((e.id, i), None)
            else:
                self._dirty_bytes -= n
                for i in e.present:
                    self._lru[(e.id, i)] = None
                self._lock.notify_all()
        if not dirty:
            self._evict_if_needed()

    def discard(self, e: CacheEntry) -> None:
        """Remove an entry and its files (after its data is durable, or the file deleted).
        Its data file is renamed to NAME.gone at once (recovery removes such files and never
        reads them: a file unlinked before its upload does not come back after a crash) and
        removed in the background (an unlink of a recently written cache file costs about a
        millisecond, on the time of the unlink or rename that dropped the entry)."""
        with self._lock:
            self._entries.pop(e.id, None)
            self._unindex_locked(e)
            n = e.held()
            self._used -= n
            if e.dirty:
                self._dirty_bytes -= n
            for i in e.present:
                self._lru.pop((e.id, i), None)
            self._lock.notify_all()
        with e.io_lock:
            e.pending.clear()
            e.present.clear()
            e.slots.clear()
            e.stale.clear()
            e.unverified.clear()
            e._split.clear()
            e.discarded = True
            e._drained.notify_all()
        e.close_fd()
        gone = e.data_path + GONE
        try:
            os.rename(e.data_path, gone)
        except FileNotFoundError:
            return
        self.later(oscalls.unlink_quietly, gone)

    # -- accounting and eviction --------------------------------------------------------------
    def _account(self, e: CacheEntry, index: int, delta: int, clean: bool) -> None:
        with self._lock:
            self._used += delta
            if e.dirty:
                self._dirty_bytes += delta
            elif clean:
                self._lru[(e.id, index)] = None
                self._lru.move_to_end((e.id, index))
        self._evict_if_needed()

    def _adjust(self, e: CacheEntry, delta: int) -> None:
        """Bytes the bound counts for `e` changed by `delta` (an older copy of a chunk kept,
        or freed): accounted without touching the LRU."""
        if delta < 0:
            self._forget(e, [], -delta)
            return
        with self._lock:
            self._used += delta
            if e.dirty:
                self._dirty_bytes += delta
        self._evict_if_needed()

    def _offer(self, e: CacheEntry) -> None:
        """Make the chunks of a clean entry evictable again (the evictor skipped them while a
        dirty record of it was the newest on disk)."""
        with self._lock:
            if e.dirty or e.discarded or self._entries.get(e.id) is not e:
                return
            for i in list(e.present):
                self._lru.setdefault((e.id, i), None)
        self._evict_if_needed()

    def _forget(self, e: CacheEntry, gone: list[int], freed: int) -> None:
        with self._lock:
            self._used -= freed
            if e.dirty:
                self._dirty_bytes -= freed
            for i in gone:
                self._lru.pop((e.id, i), None)
            self._lock.notify_all()

    def _touch(self, e: CacheEntry, index: int) -> None:
        # without the lock: move_to_end is one call into C, atomic under the GIL; a key the
        # evictor took meanwhile is simply gone (every read of a cached chunk comes here)
        try:
            self._lru.move_to_end((e.id, index))
        except KeyError:
            pass

    def _evict_if_needed(self) -> None:
        while True:
            with self._lock:
                if self._used <= self.max_bytes:
                    return
            if self._evict_one() is None:
                return

    def _evict_one(self) -> int | None:
        """Evict the least recently used clean chunk: the bytes freed (0 if it was gone or had
        turned dirty), None when there is nothing left to evict."""
        with self._lock:
            if not self._lru:
                return None
            (eid, idx), _ = self._lru.popitem(last=False)
            e = self._entries.get(eid)
        if e is None or e.dirty:
            return 0
        freed = e._punch(idx)
        with self._lock:
            self._used -= freed
        return freed

    def free_disk_space(self, nbytes: int = 8 * 1024 * 1024) -> int:
        """The disk under the cache is full (ENOSPC) before the bound is reached: evict up
        to `nbytes` of clean chunks, least recently used first, so that dirty data (which
        exists nowhere else) can be written; ENOSPC is left for a disk that holds nothing
        evictable. Called without any io_lock held. Returns the bytes freed."""
        freed = 0
        while freed < nbytes:
            n = self._evict_one()
            if n is None:
                break
            freed += n
        if freed:
            log.warning("cache disk full: evicted %d bytes of clean cached data", freed)
        return freed

    def wait_for_room(self, nbytes: int, owner: CacheEntry, progress=lambda: True,
                      deadline: float | None = None) -> None:
        """Backpressure: block a writer while dirty data exceeds the bound and uploads in
        progress (`progress()` true: files queued or uploading) can free room. Dirty data that
        cannot be uploaded yet (files still open, never closed) does not block anyone, so the
        bound may be exceeded by open files being written."""
        with self._lock:
            while self._dirty_bytes + nbytes > self.max_bytes:
                if not progress():
                    return
                if deadline is not None and time.monotonic() > deadline:
                    return
                self._lock.wait(timeout=0.5)

    def stats(self) -> dict:
        with self._lock:
            return {"cache_used_bytes": self._used, "cache_dirty_bytes": self._dirty_bytes,
                    "cache_max_bytes": self.max_bytes, "cache_entries": len(self._entries),
                    "cache_spares": self._spares.count()}


def default_cache_size(directory: str) -> int:
    """10% of the free space of the cache directory's disk, between 256 MiB and 10 GiB."""
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "/"
    free = shutil.disk_usage(probe).free
    return max(256 * 1024 * 1024, min(10 * 1024 ** 3, free // 10))
