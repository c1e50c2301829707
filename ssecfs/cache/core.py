"""Encrypted on-disk chunk cache.

Layout (format 6, see docs/CACHE.md):
    CACHE_DIR/                      mode 0700, flock'ed by the daemon that uses it (LOCK)
        VERSION                     "ssecfs-cache 6"; any other format is refused
        entries/ID.data             two record slots (at 0 and RSLOT), then chunk slots:
                                    chunk i has two, at BASE + (2i + p) * SLOT, p = 0, 1
A record slot holds the entry's journal record (JSON, sealed):
  "SSR6" | key fingerprint (24 ASCII bytes) | u64 sequence | u32 length | sealed record
written to slot seq % 2, never over the newest record known flushed (a sequence number is
skipped if need be), so that a write torn by a crash leaves a flushed record whole; the
valid record with the highest sequence is the entry's state. After the flush of a close, the
same state is written once more (not flushed) to confirm the chunks that flush wrote.
A chunk slot holds one version of its chunk, in one of two forms (crypto.FORMS):
  magic | u32 plaintext length | u64 generation | nonce | AEAD(chunk) | tag     (whole)
  magic | u32 plaintext length | u64 generation | write id (8) | sub-block 0 | ...  (split)
where sub-block j = nonce | AEAD(plaintext[j*SUB:(j+1)*SUB]) | tag (SUB = 4 KiB). Every
write of a chunk takes the entry's next generation, bound into the associated data. An
all-zero slot header means "absent" (never written, or a hole punched).

Copy-on-write. A chunk's newest version that may be acknowledged (a flush, fdatasync, of
the entry started after it was written) is never overwritten while the entry's record on
disk may say dirty: a write of such a chunk goes to its other slot, and the older copy
there is punched once the new one is durable (after the next flush completes). Until the
first dirty record, and once a clean record is flushed, nothing on disk is needed after a
crash (recovery removes such entries): chunks are rewritten in place. A first write of a
chunk goes to its slot 0, so writing new data costs one slot write per chunk.
Recovery takes a chunk's newest version whose generation the record confirms (up to its
"flushed_gen": flushed before the record was written) as it is: if it fails, the chunk
reads EIO, never an older version. A newer version (written after that flush, maybe torn
by the crash) is verified at the chunk's first use (_resolve); if it fails, the version
before it is used, or, with none, the chunk is absent, as before its first write.

Chunks are sealed whole (one AEAD call: written and sequentially fetched data); a chunk of
an entry that needs nothing on disk after a crash (clean, with no dirty record on disk),
read at random, is sealed again in sub-blocks by its reader, so that the next small reads
of it decrypt 4 KiB, not 128.

Invariants
  * no plaintext is ever written to this directory (chunks and records are sealed, each
    entry under its own keys: crypto.Sealer.entry);
  * dirty chunks are never evicted; an entry is dirty from its first write until the
    write-back layer reports the generation it uploaded as durable; its chunks are evicted
    only once a clean record is durable (else a crash would recover the dirty record
    without the chunks it names);
  * a torn or altered slot or record fails authentication and is reported, never served.

Locks (order: an entry's io_lock and the cache's _lock are never held together; no
fdatasync runs under either):
  Cache._lock        guards _used, _dirty_bytes, _lru, _entries, _by_object, _by_key
  CacheEntry.io_lock guards the entry's fd, its chunk maps (present, pending, slots, stale,
                     _unresolved) and generation counters, and its record state
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
from typing import NamedTuple

from ..crypto.aead import (FORMS, NONCE_LEN, OVERHEAD, SPLIT_GCM, SPLIT_OCB, WHOLE_GCM, WHOLE_OCB,
                     WRITE_ID_LEN, Sealer, chunk_aad, open_subs, record_aad, seal_chunk,
                     sealed_len)
from ..errors import IntegrityError, NameTooLong, NoSpace, CacheDirError

log = logging.getLogger("ssecfs.cache")

CHUNK = 128 * 1024
HEADER = struct.Struct(">4sIQ")       # magic, plaintext length, generation
SLOT_MAGIC = {WHOLE_OCB: b"SCWO", SPLIT_OCB: b"SCSO", WHOLE_GCM: b"SCWG", SPLIT_GCM: b"SCSG"}
SLOT_FORM = {magic: form for form, magic in SLOT_MAGIC.items()}
SUBS_AT = HEADER.size + WRITE_ID_LEN                  # where a split slot's sub-blocks start
SLOT = (SUBS_AT + sealed_len(CHUNK) + 4095) // 4096 * 4096   # block aligned, so that a
assert SLOT == 135168                                        # punched slot frees its blocks


def _cost(length: int) -> int:
    """Disk blocks a slot holding `length` plaintext bytes occupies (what the bound counts)."""
    return (SUBS_AT + sealed_len(length) + 4095) // 4096 * 4096


SEALER_THREADS = 2
MAX_PENDING = 256                    # chunks (32 MiB) of plaintext waiting to be sealed
SEAL_BATCH = 16                      # a fetcher that waits for room waits for this much
FORMAT = 6
VERSION_TEXT = f"ssecfs-cache {FORMAT}\n"
GONE = ".gone"                  # suffix of a discarded entry's data file until it is removed
RSLOT = 64 * 1024               # one record slot (a record is a few hundred bytes: sparse)
BASE = 2 * RSLOT                # where the chunk slots start
RHEADER = struct.Struct(">4s24sQI")   # magic, key fingerprint, sequence, sealed length
RMAGIC = b"SSR6"
NEVER = 1 << 62                 # a generation no write reaches

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


def _low_priority() -> None:
    """This thread's CPU (the kernel's work of its unlinks included) goes last (nice 19)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        log.debug("removing %s: %s", path, e.strerror)


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    r = _libc.fallocate(ctypes.c_int(fd), ctypes.c_int(_FALLOC_PUNCH),
                        ctypes.c_longlong(offset), ctypes.c_longlong(length))
    return r == 0


def _oserror_to_domain(e: OSError) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace("cache disk full")
    return e


class Slot(NamedTuple):
    """One version of a chunk on disk."""
    pos: int                  # 0 or 1: which of the chunk's two slots
    gen: int                  # its generation (higher: written later)
    form: int                 # crypto.FORMS
    length: int               # plaintext bytes
    wid: bytes | None         # write id of a split form
    epoch: int = 0            # CacheEntry._epoch when it was written (0: found on disk)

    def size(self) -> int:
        """Bytes of the slot that hold it."""
        if FORMS[self.form][0]:
            return SUBS_AT + sealed_len(self.length, FORMS[self.form][0])
        return HEADER.size + self.length + OVERHEAD


def _parse_header(raw: bytes, pos: int) -> Slot | None:
    """The version a slot header announces (not authenticated), or None (absent)."""
    if len(raw) < HEADER.size:
        return None
    magic, length, gen = HEADER.unpack_from(raw)
    form = SLOT_FORM.get(magic)
    if form is None or not 0 < length <= CHUNK:
        return None
    if FORMS[form][0]:
        if len(raw) < SUBS_AT:
            return None
        return Slot(pos, gen, form, length, bytes(raw[HEADER.size:SUBS_AT]))
    return Slot(pos, gen, form, length, None)


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

    def __init__(self, cache: "Cache", entry_id: str, key_fp: str | None = None):
        self.cache = cache
        self._seq = -1                        # sequence of the last record written or read
        self._durable_seq = -1                # of the newest record known flushed: the next
                                              # record goes to the other record slot
        self._named = False                   # the data file's name is durable (dir fsynced)
        self.key_fp = key_fp or cache.key_fp        # which ring key's cache key seals it
        self.id = entry_id
        self.bid = bytes.fromhex(entry_id)
        self.sealer = cache.sealers[self.key_fp].entry(self.bid)
        self.io_lock = threading.Lock()
        self.present: dict[int, int] = {}   # chunk index -> plaintext length (pending or on disk)
        self.slots: dict[int, Slot] = {}    # chunk index -> its newest version on disk
        self.stale: dict[int, int] = {}     # chunk index -> disk bytes of an older version in
                                            # its other slot (punched once the newer is durable)
        self._unresolved: dict[int, list[Slot]] = {}   # after a crash: versions on disk, newest
                                            # first, the newest not verified yet (see _resolve)
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
        # flushes: a slot written in epoch n is durable once a flush that started in a
        # later epoch completed; one a flush has started on may be acknowledged
        self._epoch = 1                       # each flush starts a new one
        self._durable_epoch = 0               # the newest epoch a completed flush covers
        # generations: every slot write takes the next one
        self._gen = 0                         # the last one taken
        self._sealing: dict[int, tuple] = {}  # taken by a write not finished yet: its
                                              # (chunk index, plaintext)
        self._durable_gen = 0                 # every slot of a generation <= it is flushed
        self._trusted = -1                    # of the record recovered: its flushed_gen
        self._floor = NEVER                   # no record claims a generation >= it (those
                                              # recovered unverified, maybe torn)
        # what the newest record on disk may say
        self._disk_dirty = False              # a dirty one (no clean one flushed after it)
        self._newest_clean = False            # the newest written says clean
        self._evict_deferred = False          # eviction waited for a clean record

    def __repr__(self) -> str:
        return f"CacheEntry({self.id[:8]}, {len(self.present)} chunks, dirty={self.dirty})"

    @property
    def data_path(self) -> str:
        return os.path.join(self.cache.entries_dir, self.id + ".data")

    def _fdl(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o600)
        return self._fd

    @staticmethod
    def _off(index: int, pos: int = 0) -> int:
        return BASE + (2 * index + pos) * SLOT

    def held(self) -> int:
        """Disk bytes the bound counts for this entry (its chunks and their older copies)."""
        return sum(map(_cost, list(self.present.values()))) + sum(list(self.stale.values()))

    # -- chunks -------------------------------------------------------------------------------
    def has(self, index: int) -> bool:
        return index in self.present

    def read_chunk(self, index: int) -> bytes | None:
        """The plaintext of chunk `index`, or None if absent. IntegrityError if tampered/torn."""
        self._resolve(index)
        with self.io_lock:
            if index not in self.present:
                return None
            data = self.pending.get(index)
            if data is not None:        # not sealed yet: a read still makes it recently used
                self.cache._touch(self, index)
                return bytes(data)      # a view into a fetched buffer: callers get bytes
            slot = self.slots.get(index)
            if slot is None:            # (a chunk whose write failed is still pending)
                raise IntegrityError(f"cache entry {self.id[:8]} chunk {index}: not on disk")
            raw = os.pread(self._fdl(), slot.size(), self._off(index, slot.pos))
        try:
            data = self._decode(index, slot, raw)
        except IntegrityError as e:
            self._report_corrupt(index, e)
            raise
        self.cache._touch(self, index)
        return data

    def _decode(self, index: int, slot: Slot, raw) -> bytes:
        """The plaintext of the version `slot` of chunk `index`, from its slot's bytes."""
        if len(raw) < HEADER.size or HEADER.unpack_from(raw) != (
                SLOT_MAGIC[slot.form], slot.length, slot.gen):
            raise IntegrityError("bad slot header (corrupt or torn)")
        body = memoryview(raw)[HEADER.size:]
        size = FORMS[slot.form][0]
        if not size:
            return self.sealer.open(body, chunk_aad(self.bid, index, slot.gen, slot.length,
                                                    slot.form), slot.form)
        if bytes(body[:WRITE_ID_LEN]) != slot.wid:
            raise IntegrityError("bad slot header (corrupt or torn)")
        return open_subs(self.sealer, body[WRITE_ID_LEN:], self.bid, index, slot.gen,
                         slot.length, slot.wid, 0, -(-slot.length // size), slot.form)

    def read_range(self, index: int, lo: int, hi: int, random: bool = False) -> bytes | None:
        """Plaintext bytes [lo, hi) of chunk `index` (shorter if the chunk is: zeros follow),
        or None if absent. From a slot sealed in sub-blocks, decrypts only those that hold
        them: a 4 KiB read costs a 4 KiB pread and decryption, not 128 KiB. random=True (a
        read that is not part of a sequential stream) of a whole-sealed chunk of a clean entry
        has it sealed again in sub-blocks. IntegrityError if tampered/torn."""
        self._resolve(index)
        with self.io_lock:
            writes_seen = self.writes
            if index not in self.present:
                return None
            data = self.pending.get(index)
            if data is not None:
                self.cache._touch(self, index)
                return bytes(data[lo:hi])
            slot = self.slots[index]
            sub = FORMS[slot.form][0]
            if sub:                 # (the slot's header need not be read: length, generation
                length = slot.length        # and write id are known, and bound by every tag)
                hi = min(hi, length)
                if lo >= hi:
                    return b""
                first, last = lo // sub, (hi - 1) // sub
                at = first * (sub + OVERHEAD)
                raw = os.pread(self._fdl(), sealed_len(min(length, (last + 1) * sub), sub) - at,
                               self._off(index, slot.pos) + SUBS_AT + at)
        if not sub:
            data = self.read_chunk(index)
            if data is None:
                return None
            if random:
                self._resplit(index, data, writes_seen)
            return data[lo:hi]
        try:
            data = open_subs(self.sealer, raw, self.bid, index, slot.gen, length, slot.wid,
                             first, last - first + 1, slot.form)
        except IntegrityError as e:
            self._report_corrupt(index, e)
            raise
        self.cache._touch(self, index)
        base = first * sub
        return data[lo - base:hi - base]

    def _resplit(self, index: int, data: bytes, writes_seen: int) -> None:
        """Seal again in sub-blocks a whole-sealed chunk just read at random (same bytes, in
        place). Only for an entry that needs nothing on disk after a crash: not dirty, no
        dirty record on disk (its clean record is flushed first, once); skipped if a write
        came in meanwhile. The reader does it itself: it holds the plaintext already, and a
        sealer thread doing it meanwhile made the other FUSE calls wait (fio 4 KiB random
        reads over whole-sealed chunks: 5.3k IOPS queued, 7.0-8.0k inline)."""
        if self.dirty or (self._disk_dirty and not self._settle()):
            return
        with self.io_lock:
            if not (self.writes == writes_seen and not self.dirty and not self._disk_dirty
                    and not self.discarded and self.present.get(index) == len(data)
                    and index not in self.pending):
                return
            self.pending[index] = data      # readers meanwhile are served from memory, and
            self._split.add(index)          # a write meanwhile makes _seal_one skip this one
        self._seal_one(index)

    def _report_corrupt(self, index: int, e: IntegrityError) -> None:
        log.error("cache entry %s chunk %d failed authentication (%s: corrupt or torn); "
                  "not served", self.id[:8], index, e)

    # -- versions recovered after a crash -------------------------------------------------------
    def _resolve(self, index: int) -> None:
        """Decide which version of a chunk recovered unverified is its content (if it is)."""
        if index not in self._unresolved:        # (one dict lookup: the common case)
            return
        with self.io_lock:
            freed, gone = self._resolve_locked(index)
        if freed:
            self.cache._forget(self, gone, freed)

    def _resolve_locked(self, index: int) -> tuple[int, list[int]]:
        """Caller holds io_lock. The newest version that the recovered record confirms
        (trusted), or that authenticates, wins; a newer one that fails was torn by the crash
        (written after the last flush the record confirms) and is dropped; with none left
        the chunk is absent, as it was before its first write. The losers are punched.
        Returns (bytes freed, [index] if the chunk became absent)."""
        cands = self._unresolved.pop(index, None)
        if cands is None:
            return 0, []
        pending = index in self.pending
        before = self.stale.pop(index, 0) + (0 if pending else _cost(self.present[index]))
        chosen = None
        for c in cands:
            if c.gen <= self._trusted or not self.sealer.can_open(c.form):
                chosen = c          # (a cipher this OpenSSL lacks: a failure, not a tear)
                break
            try:
                raw = os.pread(self._fdl(), c.size(), self._off(index, c.pos))
                self._decode(index, c, raw)
            except IntegrityError as e:
                log.warning("cache entry %s chunk %d: the version written after the last "
                            "flush (generation %d) does not authenticate (%s: torn by the "
                            "crash); the version before it is used", self.id[:8], index,
                            c.gen, e)
                continue
            chosen = c
            break
        for c in cands:
            if c is not chosen:
                self._punch_pos(index, c.pos)
        gone = []
        if chosen is None:
            self.slots.pop(index, None)
            if not pending:
                del self.present[index]
                gone = [index]
            return before, gone
        self.slots[index] = chosen
        if pending:
            return before, gone
        self.present[index] = chosen.length
        return before - _cost(chosen.length), gone

    def _punch_pos(self, index: int, pos: int, fd: int | None = None) -> None:
        """Caller holds io_lock. Free one slot of a chunk (or make it read as absent)."""
        fd = self._fdl() if fd is None else fd
        if not _punch_hole(fd, self._off(index, pos), SLOT):
            os.pwrite(fd, bytes(HEADER.size), self._off(index, pos))

    # -- writes -------------------------------------------------------------------------------
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

    def _target(self, old: Slot | None) -> int:
        """Caller holds io_lock. Where the next version of a chunk goes: never over its
        newest version that may be durable (a flush started after it was written: it may be
        acknowledged) while the record on disk may say dirty (copy-on-write), else over the
        version there (a first write: position 0)."""
        if old is None:
            return 0
        if self._disk_dirty and old.epoch < self._epoch:
            return 1 - old.pos
        return old.pos

    def _seal_one(self, index: int, nonce: bytes | None = None) -> None:
        """Sealer thread: seal and write the pending plaintext of one chunk. Only the latest
        data of a chunk is written (identity check under io_lock), so a stale seal never
        overwrites newer data, and a dropped (truncated/evicted/discarded) chunk is skipped.
        `nonce`: fresh random bytes for a whole-sealed chunk (else drawn here)."""
        with self.io_lock:
            data = self.pending.get(index)
            self._queued.discard(index)
            if data is None:
                return
            split = index in self._split
            self._gen += 1                       # in the order the versions were stored
            gen = self._gen
            self._sealing[gen] = (index, data)
        delta, writeout = 0, None
        try:
            delta, writeout = self._write_version(index, data, gen, split, nonce)
        finally:
            with self.io_lock:
                del self._sealing[gen]
            if delta:
                self.cache._adjust(self, delta)
        if writeout is not None:
            try:
                _start_writeout(writeout)
            finally:
                os.close(writeout)

    def _write_version(self, index: int, data, gen: int, split: bool,
                       nonce: bytes | None) -> tuple[int, int | None]:
        """Seal `data` as generation `gen` of chunk `index` and write it where _target says.
        Returns (change of the bytes the bound counts, a fd to start a write-out on)."""
        length = len(data)
        if split:
            wid, form = os.urandom(WRITE_ID_LEN), self.sealer.split_form
            parts = [HEADER.pack(SLOT_MAGIC[form], length, gen), wid,
                     *seal_chunk(self.sealer, data, self.bid, index, gen, wid)]
        else:
            wid, form = None, self.sealer.whole_form
            parts = [HEADER.pack(SLOT_MAGIC[form], length, gen),
                     *self.sealer.seal_parts(data, chunk_aad(self.bid, index, gen, length, form),
                                             nonce, form)]
        delta = 0
        for attempt in range(2):
            with self.io_lock:
                if self.pending.get(index) is not data:
                    return delta, None
                if split and (self.dirty or self._disk_dirty or index not in self._split):
                    # its slot is rewritten in place only while a slot torn by a crash
                    # cannot cost anything; the one on disk holds the same bytes
                    del self.pending[index]
                    self._split.discard(index)
                    if not self.pending:
                        self._drained.notify_all()
                    return delta, None
                if index in self._unresolved:
                    freed, _ = self._resolve_locked(index)   # which version to keep
                    delta -= freed
                old = self.slots.get(index)
                pos = self._target(old)
                try:
                    if os.pwritev(self._fdl(), parts, self._off(index, pos)) != \
                            sum(map(len, parts)):
                        # a short write (disk full mid-slot) is not success: keep the data in
                        # memory and report ENOSPC, never a torn slot taken as written
                        raise OSError(errno.ENOSPC, "short write to the cache")
                except OSError as e:
                    if attempt or e.errno not in (errno.ENOSPC, errno.EDQUOT):
                        self.error = _oserror_to_domain(e)
                        log.error("cache entry %s: writing chunk %d failed: %s", self.id[:8],
                                  index, e)
                        self._drained.notify_all()
                        return delta, None
                else:
                    del self.pending[index]
                    self._split.discard(index)
                    self.slots[index] = Slot(pos, gen, form, length, wid, self._epoch)
                    if old is not None and pos != old.pos:    # the older version stays
                        delta += _cost(old.length) - self.stale.get(index, 0)
                        self.stale[index] = _cost(old.length)
                    if not self.pending:
                        self._drained.notify_all()
                    self._unsynced += SLOT
                    if self._unsynced >= WRITEOUT_EVERY and self.dirty:
                        self._unsynced = 0
                        return delta, os.dup(self._fd)
                    return delta, None
            self.cache.free_disk_space()       # make room (without io_lock), try once more
        return delta, None

    def drain(self) -> None:
        """Wait until every pending chunk is sealed and written; raise a write error."""
        with self.io_lock:
            while self.pending and self.error is None:
                self._drained.wait(timeout=1.0)
            if self.error is not None:
                raise self.error

    def drop_chunks_from(self, first: int) -> None:
        """Forget chunks >= first (truncate): both slots of each go."""
        with self.io_lock:
            gone = [i for i in self.present if i >= first]
            freed = sum(_cost(self.present.pop(i)) for i in gone)
            freed += sum(self.stale.pop(i) for i in [i for i in self.stale if i >= first])
            for i in [i for i in self.slots if i >= first]:
                del self.slots[i]
            for i in [i for i in self._unresolved if i >= first]:
                del self._unresolved[i]
            for i in gone:
                self.pending.pop(i, None)
                self._split.discard(i)
            if not self.pending:
                self._drained.notify_all()
            if self._fd is not None or os.path.exists(self.data_path):
                os.ftruncate(self._fdl(), self._off(first))
        self.cache._forget(self, gone, freed)

    # -- flushes ------------------------------------------------------------------------------
    def sync(self) -> None:
        """Every chunk written so far is on disk when it returns."""
        self._seal_waiting()
        self.drain()
        self._flush()

    def _flush(self, fd: int | None = None) -> None:
        """fdatasync the data file (`fd`: a descriptor of it that is closed here; else one
        made here), without io_lock: readers of the entry (the upload of the same file) go
        on meanwhile. Then what it made durable counts as such: the versions written before
        it, and a clean record that is still the newest; older copies of chunks now durable
        are punched."""
        with self.io_lock:
            if fd is None:
                try:
                    fd = os.dup(self._fd) if self._fd is not None else \
                        os.open(self.data_path, os.O_RDWR)      # (never created here)
                except FileNotFoundError:
                    self._disk_dirty = False      # no file, no record
                    return
            epoch = self._epoch                   # what is written by now
            self._epoch += 1
            flushed = self._written_gen()
            seq = self._seq
        try:
            os.fdatasync(fd)
            freed = 0
            with self.io_lock:
                self._durable_epoch = max(self._durable_epoch, epoch)
                self._durable_gen = max(self._durable_gen, flushed)
                self._durable_seq = max(self._durable_seq, seq)
                if self._seq == seq and self._newest_clean:
                    self._disk_dirty = False
                if not self.discarded:
                    for i in [i for i in self.stale if i not in self._unresolved]:
                        s = self.slots.get(i)
                        if s is not None and s.epoch <= self._durable_epoch:
                            self._punch_pos(i, 1 - s.pos, fd)
                            freed += self.stale.pop(i)
        finally:
            os.close(fd)
        if freed:
            self.cache._forget(self, [], freed)

    def _written_gen(self) -> int:
        """Caller holds io_lock. The highest generation g such that every slot of a
        generation <= g is written, or will never be (a seal whose plaintext is no longer
        the chunk's pending one is dropped)."""
        live = [g for g, (i, data) in self._sealing.items() if self.pending.get(i) is data]
        return min(live) - 1 if live else self._gen

    def _settle(self) -> bool:
        """Make sure no dirty record is the newest on disk (what evicting or re-sealing in
        place needs): flush the clean record written last. False while the newest record
        written says dirty."""
        with self.io_lock:
            if not self._disk_dirty:
                return True
            if not self._newest_clean:
                return False
        self._flush()
        return not self._disk_dirty

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
        """Evict one clean chunk (both its slots); returns bytes freed (0 if it was not there,
        or if the entry's record on disk may still say dirty: see _settle). The last chunk
        of an entry goes with its file, record included: no flush needed first."""
        with self.io_lock:
            if self.dirty or index not in self.present:
                return 0          # became dirty since the evictor picked it: never evict
            last = len(self.present) == 1
        if not last and not self._settle():
            with self.io_lock:
                self._evict_deferred = True       # drop_state offers its chunks again
            return 0
        with self.io_lock:
            last = len(self.present) == 1
            if self.dirty or (self._disk_dirty and not last):
                return 0
            length = self.present.pop(index, None)
            if length is None:
                return 0
            freed = _cost(length) + self.stale.pop(index, 0)
            on_disk = self.slots.pop(index, None) is not None
            self._unresolved.pop(index, None)
            self._split.discard(index)
            if self.pending.pop(index, None) is not None and not self.pending:
                self._drained.notify_all()
            if not self.present and not self.pending:
                # fully evicted: nothing of it needs to stay on disk (its data is in the
                # bucket; a crash leaves the file whole, or no file)
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
                self.cache._remove_files(self)
                self._seq, self._durable_seq, self._named = -1, -1, False  # a later
                self._disk_dirty = self._newest_clean = False      # record: a new file
            elif on_disk:
                fd = self._fdl()
                if not _punch_hole(fd, self._off(index), 2 * SLOT):      # both slots
                    for pos in (0, 1):
                        os.pwrite(fd, bytes(HEADER.size), self._off(index, pos))
            return freed

    # -- journal record -----------------------------------------------------------------------
    def save_state(self, state: dict, sync: bool = True) -> None:
        """Write the entry's journal record. sync=True: when it returns, the record and every
        chunk written before it are on disk (the chunks still waiting to be sealed are sealed
        first; then one fdatasync of the data file, and for a new entry one fsync of
        `entries/`, so that its name survives a power cut too)."""
        if sync:
            self._seal_waiting()
            self.drain()
        dirty = bool(state.get("dirty"))
        try:
            seq, fd, trusted = self._write_record(state, dirty, keep_fd=sync)
            if sync:
                self._flush(fd)
                if not self._named:
                    self.cache.sync_entries_dir()
                    self._named = True
        except OSError as e:
            raise _oserror_to_domain(e) from None
        if sync and dirty:
            self._confirm(state, seq, trusted)

    def _write_record(self, state: dict, dirty: bool, keep_fd: bool,
                      after: int | None = None) -> tuple[int, int | None, int]:
        """Write a record (not flushed); returns (its sequence, a duplicate fd of the file it
        went to if keep_fd, the flushed_gen it says). A record never goes over the newest
        one known flushed: if it is torn, that one is whole in the other slot. after: write
        it only if the newest record is still that one (else sequence -1)."""
        with self.io_lock:
            seq = self._seq + 1
            if self._durable_seq >= 0 and seq % 2 == self._durable_seq % 2:
                seq += 1
            # what this record confirms: flushed before it is written (its own flush, which
            # may not complete, is not counted), and no version recovered unverified
            trusted = min(self._durable_gen, self._floor - 1)
        blob = self.sealer.seal(json.dumps({"state": state, "flushed_gen": trusted}).encode(),
                                self._record_aad(seq))
        record = RHEADER.pack(RMAGIC, self.key_fp.encode(), seq, len(blob)) + blob
        if len(record) > RSLOT:
            raise NameTooLong("journal record too long (path or key)")
        for attempt in range(2):
            try:
                with self.io_lock:
                    if after is not None and self._seq != after:
                        return -1, None, trusted
                    fd = self._fdl()
                    if dirty:
                        self._disk_dirty = True     # from the moment it may be on disk
                    if os.pwrite(fd, record, (seq % 2) * RSLOT) != len(record):
                        raise OSError(errno.ENOSPC, "short write to the cache")
                    self._seq = seq
                    self._newest_clean = not dirty
                    # the file the record went to, even if another thread closes the
                    # entry's fd before the fdatasync (which runs without io_lock)
                    return seq, (os.dup(fd) if keep_fd else None), trusted
            except OSError as e:
                if attempt or e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                self.cache.free_disk_space()
        raise AssertionError("unreachable")

    def _confirm(self, state: dict, seq: int, trusted: int) -> None:
        """After the flush of record `seq`: the same state again, in the other slot, saying
        that the chunks it flushed are whole (a record cannot say so of its own flush, which
        a power cut may interrupt). Not flushed: if it reaches the disk, that flush had
        completed. Without it, a crash before the next close would have those chunks
        verified instead of trusted."""
        with self.io_lock:
            if self._seq != seq or min(self._durable_gen, self._floor - 1) <= trusted:
                return                          # a newer record, or nothing to confirm
        try:
            self._write_record(state, True, keep_fd=False, after=seq)
        except OSError as e:                    # only the confirmation is missing
            log.debug("cache entry %s: confirmation record not written: %s", self.id[:8], e)

    def drop_state(self) -> None:
        """The entry is clean (uploaded): a record that says so replaces the dirty one, without
        a flush (a crash that loses it leaves the dirty record: uploaded once more; eviction,
        which would take chunks that record names, flushes it first). Recovery removes a
        clean entry."""
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
                self._seq, self._durable_seq, self._named = -1, -1, False
                self._disk_dirty = False
        if not empty:
            self.save_state({"dirty": False}, sync=False)
        with self.io_lock:
            offer, self._evict_deferred = self._evict_deferred, False
        if offer:
            self.cache._offer(self)

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
        """The record slots of a data file that carry a record header, newest first:
        (sequence, key fingerprint, sealed record). Not authenticated yet."""
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
        for seq, fp, blob in self.read_records(self.data_path):
            if fp != self.key_fp:
                continue
            try:
                record = json.loads(self.sealer.open(blob, self._record_aad(seq)))
                state, trusted = record["state"], int(record["flushed_gen"])
            except (IntegrityError, ValueError, KeyError, TypeError):
                log.warning("cache entry %s: record %d does not authenticate (torn?); trying "
                            "the previous one", self.id[:8], seq)
                continue
            self._seq = self._durable_seq = seq       # (scan_slots flushes the file)
            self._trusted = trusted
            return state
        raise IntegrityError(f"cache entry {self.id[:8]}: no record authenticates")

    def scan_slots(self) -> None:
        """After a restart: rebuild the chunk maps from the slot headers. The data file is
        flushed first, so that every version found is durable. A chunk whose newest version
        the record confirms (generation <= its flushed_gen) takes it, and its older copy is
        punched; a newer one is verified at the chunk's first use (_resolve)."""
        with self.io_lock:
            try:
                fd = os.dup(self._fdl())
            except OSError:
                return
        try:
            os.fdatasync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        with self.io_lock:
            fd = self._fd
            for i in range(max(0, size - BASE + 2 * SLOT - 1) // (2 * SLOT)):
                found = [_parse_header(os.pread(fd, SUBS_AT, self._off(i, p)), p)
                         for p in (0, 1)]
                cands = sorted((s for s in found if s is not None), key=lambda s: s.gen,
                               reverse=True)
                if not cands:
                    continue
                top = cands[0]
                self._gen = max(self._gen, top.gen)
                self.present[i] = top.length
                self.slots[i] = top
                if top.gen <= self._trusted:
                    for c in cands[1:]:
                        self._punch_pos(i, c.pos)
                else:
                    self._unresolved[i] = cands
                    self._floor = min(self._floor, top.gen)
                    if len(cands) > 1:
                        self.stale[i] = _cost(cands[1].length)
            self._durable_gen = self._gen


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
        # removes the files of discarded entries (see discard)
        self._reaper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reap",
                                          initializer=_low_priority)
        self._pending_slots = Slots(MAX_PENDING)

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
            raise CacheDirError(f"cache dir {self.dir} is in use by another ssecfs "
                                "daemon") from None
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
            _unlink_quietly(os.path.join(self.entries_dir, n))     # discarded before a crash
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
                self._remove_files(e)
                continue
            e.dirty = e._disk_dirty = True
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
            records = CacheEntry.read_records(os.path.join(self.entries_dir, eid + ".data"))
        if not records:
            self._remove_files(CacheEntry(self, eid))
            return None, {}
        ours = [fp for _, fp, _ in records if fp in self.sealers]
        if not ours:
            raise IntegrityError("sealed under a key that is not in the ring")
        e = CacheEntry(self, eid, ours[0])
        e._named = True
        return e, e.load_state()

    @staticmethod
    def _remove_files(e: CacheEntry) -> None:
        try:
            os.unlink(e.data_path)
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
            e._unresolved.clear()
            e._split.clear()
            e.discarded = True
            e._drained.notify_all()
        e.close_fd()
        gone = e.data_path + GONE
        try:
            os.rename(e.data_path, gone)
        except FileNotFoundError:
            return
        try:
            self._reaper.submit(_unlink_quietly, gone)
        except RuntimeError:         # closing
            _unlink_quietly(gone)

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
                    "cache_max_bytes": self.max_bytes, "cache_entries": len(self._entries)}


def default_cache_size(directory: str) -> int:
    """10% of the free space of the cache directory's disk, between 256 MiB and 10 GiB."""
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "/"
    free = shutil.disk_usage(probe).free
    return max(256 * 1024 * 1024, min(10 * 1024 ** 3, free // 10))
