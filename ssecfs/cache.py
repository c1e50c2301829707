"""Encrypted on-disk chunk cache.

Layout (format version 5, see docs/CACHE.md):
    CACHE_DIR/                      mode 0700, flock'ed by the daemon that uses it (LOCK)
        VERSION                     "ssecfs-cache 5"
        entries/ID.data             two record slots (at 0 and RSLOT), then chunk slots:
                                    chunk i at BASE + i * SLOT
A record slot holds the entry's journal record (JSON, sealed):
  "SSR3" | key fingerprint (24 ASCII bytes) | u64 sequence | u32 length | sealed record
written alternately to slot seq % 2, so that a write torn by a crash leaves the previous
record whole; the valid record with the highest sequence is the entry's state. Format 2
entries (chunk i at i * SLOT, the record in a file ID.meta beside) are still read and
uploaded as they are; new entries are written in format 3.
A chunk slot holds its chunk in one of two forms:
  "SSC4" | u32 plaintext length | nonce | AES-OCB3(chunk) | tag           (whole)
  "SSC5" | u32 plaintext length | write id (8 random bytes) | sub-block 0 | sub-block 1 | ...
where sub-block j = nonce | AES-OCB3(plaintext[j*SUB:(j+1)*SUB]) | tag (SUB = 4 KiB), sealed
with associated data (form, entry id, chunk index, chunk length, j, write id). Chunks are
sealed whole (one AEAD call: written and sequentially fetched data); a clean chunk that is
read at random is sealed again in sub-blocks by its reader, so that the next small reads
of it decrypt 4 KiB, not 128. A slot torn between two writes of the chunk fails
authentication either way. Older caches' slots open as they are: "SSC1" and "SSC3" (the
same with AES-GCM, formats 1-4; also written where OpenSSL lacks OCB3) and "SSC2" (GCM in
32 KiB sub-blocks, formats 2 and 3); see crypto.FORMS.
An all-zero slot header means "absent" (never written, or evicted by punching a hole).

Invariants
  * no plaintext is ever written to this directory (chunks and records are sealed);
  * dirty chunks are never evicted; an entry is dirty from its first write until the
    write-back layer reports the generation it uploaded as durable;
  * a torn slot or record fails authentication and is reported, never served.

Locks (order: an entry's io_lock and the cache's _lock are never held together):
  Cache._lock        guards _used, _dirty_bytes, _lru, _entries, _by_object, _by_key
  CacheEntry.io_lock guards the entry's fd and its `present` map
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import os
import shutil
import struct
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from .crypto import (FORMS, NONCE_LEN, OVERHEAD, WRITE_ID_LEN, Sealer, chunk_aad,
                     open_subs, record_aad, seal_chunk, sealed_len)
from .errors import IntegrityError, NoSpace, UserError

log = logging.getLogger("ssecfs.cache")

CHUNK = 128 * 1024
HEADER = struct.Struct(">4sI")
SLOT_MAGIC = {form: b"SSC%d" % form for form in FORMS}     # a slot's magic names its form
SLOT_FORM = {magic: form for form, magic in SLOT_MAGIC.items()}
SUBS_AT = HEADER.size + WRITE_ID_LEN                  # where a split slot's sub-blocks start
SLOT = (SUBS_AT + sealed_len(CHUNK) + 4095) // 4096 * 4096   # block aligned, so an evicted
assert SLOT == 135168           # slot frees its blocks; format 1 used the same SLOT


def _cost(length: int) -> int:
    """Disk blocks a slot holding `length` plaintext bytes occupies (what the bound counts)."""
    return (SUBS_AT + sealed_len(length) + 4095) // 4096 * 4096
SEALER_THREADS = 2
MAX_PENDING = 256                    # chunks (32 MiB) of plaintext waiting to be sealed
SEAL_BATCH = 16                      # a fetcher that waits for room waits for this much
VERSION_TEXT = "ssecfs-cache 5\n"
OLD_VERSION_TEXTS = ("ssecfs-cache 1\n", "ssecfs-cache 2\n", "ssecfs-cache 3\n",
                     "ssecfs-cache 4\n")              # opened as they are; VERSION rewritten
RSLOT = 64 * 1024               # one record slot (a record is a few hundred bytes: sparse)
BASE = 2 * RSLOT                # where a format 3 entry's chunk slots start
RHEADER = struct.Struct(">4s24sQI")   # magic, key fingerprint, sequence, sealed length
RMAGIC = b"SSR3"
EXIT_CACHE = 6

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
_SYNC_FILE_RANGE_WRITE = 2
WRITEOUT_EVERY = 16 * 1024 * 1024    # bytes sealed to an entry between two early write-outs


def _start_writeout(fd: int) -> None:
    """Start (not wait for) the disk write of the file's dirty pages: sync_file_range with
    SYNC_FILE_RANGE_WRITE. Without it the kernel keeps a big file's cache slots in memory
    until close(), whose fdatasync then writes them all at once (2 s for 1 GiB here) while
    nothing else moves. Durability still comes from sync(); this only makes it quick."""
    try:
        _libc.sync_file_range(ctypes.c_int(fd), ctypes.c_int64(0), ctypes.c_int64(0),
                              ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))
    except (AttributeError, OSError):      # not Linux: the fdatasync at close does it all
        pass


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    r = _libc.fallocate(ctypes.c_int(fd), ctypes.c_int(_FALLOC_PUNCH),
                        ctypes.c_longlong(offset), ctypes.c_longlong(length))
    return r == 0


def _write_all(fd: int, data: bytes) -> None:
    """os.write until done; a write that makes no progress (disk full) is ENOSPC."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write to the cache")
        view = view[n:]


def _oserror_to_domain(e: OSError) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace("cache disk full")
    return e


class Slots:
    """The bound on plaintext waiting for the sealers, in chunks. take() waits until
    `least` are free and takes up to `want` at once: a waiter never holds some while it
    waits for more (so waiters cannot deadlock each other), and a fetcher whose read unit
    does not fit hands it over in batches of `least` chunks, not one by one (each hand-over
    is a sealer job: a queue put, a thread wake-up, a GIL exchange)."""

    def __init__(self, total: int):
        self.total = total
        self.free = total
        self._cond = threading.Condition(threading.Lock())
        self._waits: list[int] = []      # the `least` of each waiter

    def take(self, want: int, least: int = 1) -> int:
        least = max(1, min(least, want, self.total))
        with self._cond:
            if self.free < least:
                self._waits.append(least)
                try:
                    while self.free < least:
                        self._cond.wait()
                finally:
                    self._waits.remove(least)
            got = min(want, self.free)
            self.free -= got
            return got

    def give(self, n: int = 1) -> None:
        with self._cond:
            self.free += n
            assert self.free <= self.total, "more slots given back than taken"
            if self._waits and self.free >= min(self._waits):
                self._cond.notify_all()      # (a wake-up per slot given back would cost
                                             # more than the batching saves)


class CacheEntry:
    """The cached content of one file version: chunk slots plus a sealed state record."""

    def __init__(self, cache: "Cache", entry_id: str, key_fp: str | None = None,
                 legacy: bool = False):
        self.cache = cache
        # legacy: a format 2 entry found at recovery (record in ID.meta, chunks from 0)
        self.legacy = legacy
        self.base = 0 if legacy else BASE
        self._seq = -1                        # sequence of the last record written or read
        self._named = legacy                  # the data file's name is durable (dir fsynced)
        self.key_fp = key_fp or cache.key_fp        # which ring key's cache key seals it
        self.sealer = cache.sealers[self.key_fp]
        self.id = entry_id
        self.bid = bytes.fromhex(entry_id)
        self.io_lock = threading.Lock()
        self.present: dict[int, int] = {}   # chunk index -> plaintext length
        self.wids: dict[int, tuple[bytes, int]] = {}   # chunk index -> (write id, form)
                                                       # of its split slot
        self.writes = 0                     # write_chunk calls so far (re-split guard)
        self._split: set[int] = set()       # pending chunks to seal in sub-blocks
        self.dirty = False
        self.object_key: tuple | None = None  # (key, etag) while clean and indexed
        self._fd: int | None = None
        self.pending: dict[int, bytes] = {}   # chunks not yet sealed to disk (plaintext, RAM)
        self._queued: set[int] = set()        # chunks with a seal job queued
        self._drained = threading.Condition(self.io_lock)
        self.error: Exception | None = None   # a failed background write (ENOSPC...)
        self.discarded = False
        self._unsynced = 0                    # bytes sealed since the last early write-out

    def __repr__(self) -> str:
        return f"CacheEntry({self.id[:8]}, {len(self.present)} chunks, dirty={self.dirty})"

    @property
    def data_path(self) -> str:
        return os.path.join(self.cache.entries_dir, self.id + ".data")

    def _fdl(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o600)
        return self._fd

    def _off(self, index: int) -> int:
        return self.base + index * SLOT

    # -- chunks -------------------------------------------------------------------------------
    def has(self, index: int) -> bool:
        return index in self.present

    def read_chunk(self, index: int) -> bytes | None:
        """The plaintext of chunk `index`, or None if absent. IntegrityError if tampered/torn."""
        with self.io_lock:
            if index not in self.present:
                return None
            data = self.pending.get(index)
            if data is not None:        # not sealed yet: a read still makes it recently used
                self.cache._touch(self, index)
                return bytes(data)      # a view into a fetched buffer: callers get bytes
            raw = os.pread(self._fdl(), SLOT, self._off(index))
        magic, length = HEADER.unpack_from(raw) if len(raw) >= HEADER.size else (b"", 0)
        form = SLOT_FORM.get(magic)
        if form is None or length > CHUNK:
            log.error("cache entry %s chunk %d: bad slot header (corrupt or torn); not served",
                      self.id[:8], index)
            raise IntegrityError(f"cache entry {self.id[:8]} chunk {index}: bad slot header")
        body = memoryview(raw)[HEADER.size:]
        size = FORMS[form][0]
        try:
            if not size:
                data = self.sealer.open(body[:length + OVERHEAD],
                                        chunk_aad(self.bid, index, length, form), form)
            else:
                wid = bytes(body[:WRITE_ID_LEN])
                data = open_subs(self.sealer,
                                 body[WRITE_ID_LEN:WRITE_ID_LEN + sealed_len(length, size)],
                                 self.bid, index, length, wid, 0, -(-length // size), form)
        except IntegrityError as e:
            self._report_corrupt(index, e)
            raise
        self.cache._touch(self, index)
        return data

    def read_range(self, index: int, lo: int, hi: int, random: bool = False) -> bytes | None:
        """Plaintext bytes [lo, hi) of chunk `index` (shorter if the chunk is: zeros follow),
        or None if absent. From a slot sealed in sub-blocks, decrypts only those that hold
        them: a 4 KiB read costs a 4 KiB pread and decryption, not 128 KiB. random=True (a
        read that is not part of a sequential stream) of a whole-sealed chunk of a clean entry
        has it sealed again in sub-blocks. IntegrityError if tampered/torn."""
        with self.io_lock:
            writes_seen = self.writes
            if index not in self.present:
                return None
            data = self.pending.get(index)
            if data is not None:
                self.cache._touch(self, index)
                return bytes(data[lo:hi])
            split = self.wids.get(index)
            if split is not None:    # (the slot's header need not be read: length and write
                wid, form = split                # id are known, and bound by every tag)
                sub = FORMS[form][0]
                length = self.present[index]
                hi = min(hi, length)
                if lo >= hi:
                    return b""
                first, last = lo // sub, (hi - 1) // sub
                at = first * (sub + OVERHEAD)
                raw = os.pread(self._fdl(), sealed_len(min(length, (last + 1) * sub), sub) - at,
                               self._off(index) + SUBS_AT + at)
        if split is None:
            data = self.read_chunk(index)        # sealed whole (or a bad header: reported)
            if data is None:
                return None
            if random:
                self._resplit(index, data, writes_seen)
            return data[lo:hi]
        try:
            data = open_subs(self.sealer, raw, self.bid, index, length, wid, first,
                             last - first + 1, form)
        except IntegrityError as e:
            self._report_corrupt(index, e)
            raise
        self.cache._touch(self, index)
        base = first * sub
        return data[lo - base:hi - base]

    def _resplit(self, index: int, data: bytes, writes_seen: int) -> None:
        """Seal again in sub-blocks a whole-sealed chunk just read at random (same bytes;
        skipped if any write came in meanwhile or the entry is dirty). The reader does it
        itself: it holds the plaintext already, and a sealer thread doing it meanwhile made
        the other FUSE calls wait (fio 4 KiB random reads over whole-sealed chunks: 5.3k IOPS
        queued, 7.0-8.0k inline)."""
        with self.io_lock:
            if not (self.writes == writes_seen and not self.dirty and not self.discarded
                    and self.present.get(index) == len(data) and index not in self.pending):
                return
            self.pending[index] = data      # readers meanwhile are served from memory, and
            self._split.add(index)          # a write meanwhile makes _seal_one skip this one
        self._seal_one(index)

    def _report_corrupt(self, index: int, e: IntegrityError) -> None:
        log.error("cache entry %s chunk %d failed authentication (%s: corrupt or torn); "
                  "not served", self.id[:8], index, e)

    def write_chunk(self, index: int, data: bytes, dirty: bool = True,
                    only_if=None) -> bool:
        """Store a chunk. The plaintext is kept in memory (`pending`) and sealed and written
        by the cache's sealer threads, so the caller (a FUSE write) does not wait for the
        cipher or the disk; sync() waits for them. At most MAX_PENDING chunks wait in memory
        (writers block beyond that)."""
        stored, queue = self._store(index, data, dirty, only_if)
        if queue:
            self.cache._submit_seals(self, [index])
        return stored

    def write_chunks(self, chunks: dict, dirty: bool = True, only_if=None) -> list[int]:
        """write_chunk for several chunks (a fetched read unit): one job for the sealers
        seals them in order, instead of one hand-off per chunk. The indexes stored."""
        stored, queued = [], []
        for index, data in chunks.items():
            ok, queue = self._store(index, data, dirty, only_if)
            if ok:
                stored.append(index)
            if queue:
                queued.append(index)
        if queued:
            self.cache._submit_seals(self, queued)
        return stored

    def _store(self, index: int, data, dirty: bool, only_if) -> tuple[bool, bool]:
        """(stored, a seal is to be queued for it)."""
        length = len(data)
        assert 0 < length <= CHUNK
        if self.error is not None:
            raise self.error
        with self.io_lock:
            if only_if is not None and (index in self.present or not only_if()):
                return False, False   # a fetched chunk that lost a race with a write/truncate
            old = self.present.get(index)
            self.present[index] = length
            self.pending[index] = data
            self.writes += 1
            self._split.discard(index)
            queue = index not in self._queued
            if queue:
                self._queued.add(index)
        self.cache._account(self, index, _cost(length) - (_cost(old) if old else 0),
                            clean=not dirty and not self.dirty)
        return True, queue

    def _seal_one(self, index: int, nonce: bytes | None = None) -> None:
        """Sealer thread: seal and write the pending plaintext of one chunk. Only the latest
        data of a chunk is written (identity check under io_lock), so a stale seal never
        overwrites newer data, and a dropped (truncated/evicted/discarded) chunk is skipped.
        `nonce`: fresh random bytes for a whole-sealed chunk (else drawn here)."""
        with self.io_lock:
            data = self.pending.get(index)
            self._queued.discard(index)
            split = index in self._split
        if data is None:
            return
        length = len(data)
        if split:
            wid, form = os.urandom(WRITE_ID_LEN), self.sealer.split_form
            slot = [HEADER.pack(SLOT_MAGIC[form], length), wid,
                    *seal_chunk(self.sealer, data, self.bid, index, wid)]
        else:
            form = self.sealer.whole_form
            slot = [HEADER.pack(SLOT_MAGIC[form], length),
                    *self.sealer.seal_parts(data, chunk_aad(self.bid, index, length, form),
                                            nonce, form)]
        for attempt in range(2):
            with self.io_lock:
                if self.pending.get(index) is not data:
                    return
                if split and (self.dirty or index not in self._split):
                    # the entry became dirty since: its slot is not rewritten (a slot torn by
                    # a crash must never cost dirty data); the one on disk holds the same bytes
                    del self.pending[index]
                    self._split.discard(index)
                    if not self.pending:
                        self._drained.notify_all()
                    return
                try:
                    if os.pwritev(self._fdl(), slot, self._off(index)) != sum(map(len, slot)):
                        # a short write (disk full mid-slot) is not success: keep the data in
                        # memory and report ENOSPC, never a torn slot taken as written
                        raise OSError(errno.ENOSPC, "short write to the cache")
                except OSError as e:
                    if attempt == 0 and e.errno in (errno.ENOSPC, errno.EDQUOT):
                        retry = True          # make room (below, without io_lock), try again
                    else:
                        self.error = _oserror_to_domain(e)
                        log.error("cache entry %s: writing chunk %d failed: %s", self.id[:8],
                                  index, e)
                        self._drained.notify_all()
                        return
                else:
                    retry = False
                    del self.pending[index]
                    self._split.discard(index)
                    if split:
                        self.wids[index] = (wid, form)
                    else:
                        self.wids.pop(index, None)
                    if not self.pending:
                        self._drained.notify_all()
                    self._unsynced += SLOT
                    writeout = self._unsynced >= WRITEOUT_EVERY and self.dirty
                    if writeout:
                        self._unsynced = 0
                        fd = os.dup(self._fd)
            if not retry:
                break
            self.cache.free_disk_space()
        if writeout:
            try:
                _start_writeout(fd)
            finally:
                os.close(fd)

    def _synced_fd(self) -> int | None:
        """A duplicate of the entry's fd (the caller closes it), so that an fdatasync does not
        hold io_lock: readers of the entry (the upload of the same file) go on meanwhile."""
        with self.io_lock:
            return os.dup(self._fd) if self._fd is not None else None

    def drain(self) -> None:
        """Wait until every pending chunk is sealed and written; raise a write error."""
        with self.io_lock:
            while self.pending and self.error is None:
                self._drained.wait(timeout=1.0)
            if self.error is not None:
                raise self.error

    def drop_chunks_from(self, first: int) -> None:
        """Forget chunks >= first (truncate)."""
        with self.io_lock:
            gone = [i for i in self.present if i >= first]
            freed = sum(_cost(self.present.pop(i)) for i in gone)
            for i in gone:
                self.wids.pop(i, None)
                self.pending.pop(i, None)
                self._split.discard(i)
            if not self.pending:
                self._drained.notify_all()
            if self._fd is not None or os.path.exists(self.data_path):
                os.ftruncate(self._fdl(), self._off(first))
        self.cache._forget(self, gone, freed)

    def sync(self) -> None:
        """Every chunk written so far is on disk when it returns."""
        self._seal_waiting()
        self.drain()
        fd = self._synced_fd()
        if fd is not None:
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)

    def close_fd(self) -> None:
        try:
            self.drain()
        except Exception:  # noqa: BLE001 - the error was reported to the writer already
            pass
        with self.io_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _punch(self, index: int) -> int:
        """Evict one clean chunk; returns bytes freed (0 if it was not there)."""
        with self.io_lock:
            if self.dirty:
                return 0          # became dirty since the evictor picked it: never evict
            length = self.present.pop(index, None)
            if length is None:
                return 0
            self.wids.pop(index, None)
            self._split.discard(index)
            if self.pending.pop(index, None) is not None:
                if not self.pending:
                    self._drained.notify_all()
                return _cost(length)
            fd = self._fdl()
            if not _punch_hole(fd, self._off(index), SLOT):
                os.pwrite(fd, b"\0" * HEADER.size, self._off(index))
            if not self.present and not self.dirty:
                # fully evicted: nothing of it needs to stay on disk
                os.close(fd)
                self._fd = None
                self.cache._remove_files(self)
                self._seq, self._named = -1, False    # a later record starts a new file
            return _cost(length)

    # -- journal record -----------------------------------------------------------------------
    def save_state(self, state: dict, sync: bool = True) -> None:
        """Write the entry's journal record. sync=True: when it returns, the record and every
        chunk written before it are on disk (the chunks still waiting to be sealed are sealed
        first; then one fdatasync of the data file, and for a new entry one fsync of
        `entries/`, so that its name survives a power cut too)."""
        if self.legacy:
            if sync:
                self.sync()
            self._save_legacy(state, sync)
            return
        if sync:
            self._seal_waiting()
            self.drain()
        seq = self._seq + 1
        blob = self.sealer.seal(json.dumps(state).encode(), self._record_aad(seq))
        record = RHEADER.pack(RMAGIC, self.key_fp.encode(), seq, len(blob)) + blob
        if len(record) > RSLOT:
            raise OSError(errno.ENAMETOOLONG, "journal record too long (path or key)")
        try:
            for attempt in range(2):
                try:
                    with self.io_lock:
                        fd = self._fdl()
                        if os.pwrite(fd, record, (seq % 2) * RSLOT) != len(record):
                            raise OSError(errno.ENOSPC, "short write to the cache")
                        self._seq = seq
                        # the file the record went to, even if another thread closes the
                        # entry's fd before the fdatasync below (which runs without io_lock)
                        fd = os.dup(fd) if sync else None
                    break
                except OSError as e:
                    if attempt or e.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    self.cache.free_disk_space()
            if sync:
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
                if not self._named:
                    self.cache.sync_entries_dir()
                    self._named = True
        except OSError as e:
            raise _oserror_to_domain(e) from None

    def drop_state(self) -> None:
        """The entry is clean (uploaded): a record that says so replaces the dirty one, without
        a flush (a crash that loses it leaves the dirty record: uploaded once more). Recovery
        removes a clean entry."""
        if self.legacy:
            try:
                os.unlink(self.meta_path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise _oserror_to_domain(e) from None
            return
        if self._seq < 0:
            return                    # no record was ever written: nothing to supersede
        with self.io_lock:
            empty = not self.present and not self.pending
            if empty:
                # nothing cached (an empty file): its data file would only hold the record;
                # remove it rather than keep an inode per empty file until the next mount
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
                try:
                    os.unlink(self.data_path)
                except FileNotFoundError:
                    pass
                self._seq, self._named = -1, False
        if not empty:
            self.save_state({"dirty": False}, sync=False)

    def _record_aad(self, seq: int) -> bytes:
        return record_aad(b"meta" + struct.pack(">Q", seq), self.bid)

    def _seal_waiting(self) -> None:
        # seal what is still waiting here rather than wait for a sealer thread to get to it
        # (close of a small file: one thread hop less); a job already running is harmless,
        # _seal_one writes each version of a chunk once
        with self.io_lock:
            waiting = list(self.pending)
        for index in waiting:
            self._seal_one(index)

    @staticmethod
    def read_records(data_path: str) -> list[tuple[int, str, bytes]]:
        """The record slots of a format 3 data file that carry a record header, newest
        first: (sequence, key fingerprint, sealed record). Not authenticated yet."""
        found = []
        with open(data_path, "rb") as f:
            for slot in range(2):
                f.seek(slot * RSLOT)
                raw = f.read(RSLOT)
                if len(raw) < RHEADER.size:
                    continue
                magic, fp, seq, n = RHEADER.unpack_from(raw)
                if magic == RMAGIC and n <= RSLOT - RHEADER.size and seq % 2 == slot:
                    found.append((seq, fp.decode("ascii", "replace"),
                                  raw[RHEADER.size:RHEADER.size + n]))
        return sorted(found, reverse=True)

    def load_state(self) -> dict:
        """The newest record that authenticates (the previous one if the newest was torn by a
        crash); it becomes the entry's current record (the next goes to the other slot)."""
        if self.legacy:
            return self.load_legacy()
        for seq, fp, blob in self.read_records(self.data_path):
            if fp != self.key_fp:
                continue
            try:
                state = json.loads(self.sealer.open(blob, self._record_aad(seq)))
            except (IntegrityError, ValueError):
                log.warning("cache entry %s: record %d does not authenticate (torn?); trying "
                            "the previous one", self.id[:8], seq)
                continue
            self._seq = seq
            return state
        raise IntegrityError(f"cache entry {self.id[:8]}: no record authenticates")

    # -- format 2 records (a file ID.meta beside the data) ----------------------------------------
    @property
    def meta_path(self) -> str:
        return os.path.join(self.cache.entries_dir, self.id + ".meta")

    def _save_legacy(self, state: dict, sync: bool) -> None:
        """Atomically replace ID.meta (write temp, fsync, rename, fsync of entries/)."""
        blob = self.sealer.seal(json.dumps(state).encode(), record_aad(b"meta", self.bid))
        tmp = self.meta_path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, self.key_fp.encode() + b"\n" + blob)
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.meta_path)
            if sync:
                self.cache.sync_entries_dir()
        except OSError as e:
            raise _oserror_to_domain(e) from None

    @staticmethod
    def read_key_fp(meta_path: str) -> str:
        """The (non-secret) fingerprint of the key that sealed a format 2 entry: its record's
        first line."""
        with open(meta_path, "rb") as f:
            return f.readline().strip().decode("ascii", "replace")

    def load_legacy(self) -> dict:
        with open(self.meta_path, "rb") as f:
            f.readline()
            blob = f.read()
        return json.loads(self.sealer.open(blob, record_aad(b"meta", self.bid)))

    def scan_present(self) -> None:
        """Rebuild `present` from slot headers (after a restart)."""
        with self.io_lock:
            try:
                size = os.fstat(self._fdl()).st_size
            except OSError:
                return
            for i in range(max(0, size - self.base + SLOT - 1) // SLOT):
                hdr = os.pread(self._fd, SUBS_AT, self._off(i))
                if len(hdr) >= HEADER.size:
                    magic, length = HEADER.unpack_from(hdr)
                    form = SLOT_FORM.get(magic)
                    if form is not None and 0 < length <= CHUNK:
                        self.present[i] = length
                        if FORMS[form][0] and len(hdr) == SUBS_AT:
                            self.wids[i] = (hdr[HEADER.size:], form)


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
        self._pending_slots = Slots(MAX_PENDING)

    # -- lifecycle ----------------------------------------------------------------------------
    def open(self) -> None:
        """Create/lock the directory (0700). Refuses a directory locked by another daemon."""
        try:
            os.makedirs(self.entries_dir, mode=0o700, exist_ok=True)
            os.chmod(self.dir, 0o700)
            os.chmod(self.entries_dir, 0o700)
        except OSError as e:
            raise UserError(f"cache dir {self.dir}: {e.strerror}", EXIT_CACHE) from None
        vpath = os.path.join(self.dir, "VERSION")
        version = None
        if os.path.exists(vpath):
            with open(vpath) as f:
                version = f.read()
            if version != VERSION_TEXT and version not in OLD_VERSION_TEXTS:
                raise UserError(f"cache dir {self.dir}: unknown cache format", EXIT_CACHE)
        self._lock_fd = os.open(os.path.join(self.dir, "LOCK"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise UserError(f"cache dir {self.dir} is in use by another ssecfs daemon",
                            EXIT_CACHE) from None
        if version != VERSION_TEXT:
            # new, or format 1 or 2 (whose entries stay readable): from now on an older
            # ssecfs refuses this directory rather than miss the records of format 3
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
                self._remove_files(e)
                continue
            e.scan_present()
            e.dirty = True
            with self._lock:
                self._entries[eid] = e
                n = sum(_cost(ln) for ln in e.present.values())
                self._used += n
                self._dirty_bytes += n
            dirty.append((e, state))
        return dirty, bad

    def _recover_one(self, eid: str, names: set) -> tuple[CacheEntry | None, dict]:
        """The entry `eid` and its newest authentic record; (None, {}) for an entry without a
        record (never closed, or half-created), whose files are removed."""
        if eid + ".meta" in names:                        # format 2
            fp = CacheEntry.read_key_fp(os.path.join(self.entries_dir, eid + ".meta"))
            if fp not in self.sealers:
                raise IntegrityError("sealed under a key that is not in the ring")
            e = CacheEntry(self, eid, fp, legacy=True)
            return e, e.load_legacy()
        records = []
        if eid + ".data" in names:
            records = CacheEntry.read_records(os.path.join(self.entries_dir, eid + ".data"))
        if not records:
            e = CacheEntry(self, eid, legacy=eid + ".meta.tmp" in names)
            self._remove_files(e)
            return None, {}
        ours = [fp for _, fp, _ in records if fp in self.sealers]
        if not ours:
            raise IntegrityError("sealed under a key that is not in the ring")
        e = CacheEntry(self, eid, ours[0])
        e._named = True
        return e, e.load_state()

    def _remove_files(self, e: CacheEntry) -> None:
        paths = [e.data_path]
        if e.legacy:
            paths += [e.meta_path, e.meta_path + ".tmp"]
        for p in paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    # -- entries ------------------------------------------------------------------------------
    def new_entry(self) -> CacheEntry:
        e = CacheEntry(self, uuid.uuid4().hex)
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
            n = sum(_cost(ln) for ln in e.present.values())
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
        """Remove an entry and its files (after its data is durable, or the file deleted)."""
        with self._lock:
            self._entries.pop(e.id, None)
            self._unindex_locked(e)
            n = sum(_cost(ln) for ln in e.present.values())
            self._used -= n
            if e.dirty:
                self._dirty_bytes -= n
            for i in e.present:
                self._lru.pop((e.id, i), None)
            self._lock.notify_all()
        with e.io_lock:
            e.pending.clear()
            e.present.clear()
            e.wids.clear()
            e._split.clear()
            e.discarded = True
            e._drained.notify_all()
        e.close_fd()
        self._remove_files(e)

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
                    "cache_max_bytes": self.max_bytes, "cache_entries": len(self._entries)}


def default_cache_size(directory: str) -> int:
    """10% of the free space of the cache directory's disk, between 256 MiB and 10 GiB."""
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "/"
    free = shutil.disk_usage(probe).free
    return max(256 * 1024 * 1024, min(10 * 1024 ** 3, free // 10))
