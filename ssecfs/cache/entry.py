"""One cached file version (an entry): its chunks in memory and on disk, their sealing by
the cache's sealer threads, copy-on-write of acknowledged chunks (where the ledger says),
flushes, eviction of its chunks, and its journal record (written by the journal)."""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import TYPE_CHECKING

from ..crypto.aead import FORMS, open_subs
from ..errors import IntegrityError
from . import oscalls
from .datafile import DataFile
from .layout import CHUNK, SLOT, Slot, _cost, decode_version, encode_version, sub_span
from .journal import Journal
from .ledger import Ledger
from .recovery import Unverified

if TYPE_CHECKING:
    from .cachedir import Cache

log = logging.getLogger("ssecfs.cache")

WRITEOUT_EVERY = 16 * 1024 * 1024    # bytes sealed to an entry between two early write-outs


class CacheEntry:
    """The cached content of one file version: chunk slots plus a sealed state record.

    Locks: io_lock, the cache's _lock and the sealers' bound (pending.Slots) are never held
    two at a time: the entry calls the cache's accounting after releasing io_lock (only
    Cache._touch, which takes no lock, runs under it), the cache takes io_lock only after
    releasing _lock, and a writer waits for room in either bound holding neither. No
    fdatasync runs under a lock: a flush works on a descriptor of its own.
      io_lock      guards the data file's descriptor (`file`), the chunk maps (present,
                   pending, slots, stale, unverified, _split, _queued), `writes`, the ledger
                   (generations, epochs, record sequences, what the record on disk may say),
                   `error`, `discarded`, `_unsynced` and `_evict_deferred`. `_drained`, a
                   condition on it, is notified when `pending` empties or `error` is set.
      Cache._lock  guards changes of `dirty` and `object_key` (set_dirty, index_clean).
    Read without io_lock: `dirty` (rechecked under it where it matters: eviction,
    re-sealing), `error`, membership in `unverified`, and, by the cache under its _lock,
    `present` and `stale` (held(), set_dirty, discard).
    """

    def __init__(self, cache: "Cache", entry_id: str, key_fp: str | None = None, named=False):
        self.cache = cache
        self._named = named                   # the data file's name is durable (dir fsynced)
        self.key_fp = key_fp or cache.key_fp        # which ring key's cache key seals it
        self.id = entry_id
        self.bid = bytes.fromhex(entry_id)
        self.sealer = cache.sealers[self.key_fp].entry(self.bid)
        self.data_path = os.path.join(cache.entries_dir, self.id + ".data")
        self.file = DataFile(self.data_path)
        self.ledger = Ledger()
        self.io_lock = threading.Lock()
        self.journal = Journal(entry_id, self.sealer, self.key_fp, self.file, self.ledger,
                               self.io_lock, cache.free_disk_space)
        self.present: dict[int, int] = {}   # chunk index -> plaintext length (pending or on disk)
        self.slots: dict[int, Slot] = {}    # chunk index -> its newest version on disk
        self.stale: dict[int, int] = {}     # chunk index -> disk bytes of an older version in
                                            # its other slot (punched once the newer is durable)
        self.unverified = Unverified(         # after a crash: versions not verified yet
            entry_id, self.sealer, self.file, self.ledger)
        self.writes = 0                     # write_chunk calls so far (re-split guard)
        self._split: set[int] = set()       # pending chunks to seal in sub-blocks
        self.dirty = False
        self.object_key: tuple | None = None  # (key, etag) while clean and indexed
        self.pending: dict[int, bytes] = {}   # chunks not yet sealed to disk (plaintext, RAM)
        self._queued: set[int] = set()        # chunks with a seal job queued
        self._drained = threading.Condition(self.io_lock)
        self.error: Exception | None = None   # a failed background write (ENOSPC...)
        self.discarded = False
        self._unsynced = 0                    # bytes sealed since the last early write-out
        self._evict_deferred = False          # eviction waited for a clean record

    def __repr__(self) -> str:
        return f"CacheEntry({self.id[:8]}, {len(self.present)} chunks, dirty={self.dirty})"

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
            raw = self.file.read_slot(index, slot)
        try:
            data = decode_version(self.sealer, self.bid, index, slot, raw)
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
                hi = min(hi, slot.length)   # and write id are known, and bound by every tag)
                if lo >= hi:
                    return b""
                first, count, at, n = sub_span(slot, lo, hi)
                raw = self.file.read_subs(index, slot.pos, at, n)
        if not sub:
            data = self.read_chunk(index)
            if data is None:
                return None
            if random:
                self._resplit(index, data, writes_seen)
            return data[lo:hi]
        try:
            data = open_subs(self.sealer, raw, self.bid, index, slot.gen, slot.length, slot.wid,
                             first, count, slot.form)
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
        came in meanwhile. The reader does it itself: it holds the plaintext already, and
        queued to a sealer thread it would make the other FUSE calls wait."""
        if self.dirty or (self.ledger.disk_dirty and not self._settle()):
            return
        with self.io_lock:
            if not (self.writes == writes_seen and not self.dirty and not self.ledger.disk_dirty
                    and not self.discarded and self.present.get(index) == len(data)
                    and index not in self.pending):
                return
            self.pending[index] = data      # readers meanwhile are served from memory, and
            self._split.add(index)          # a write meanwhile makes _seal_one skip this one
        self._seal_one(index)

    def _report_corrupt(self, index: int, e: IntegrityError) -> None:
        log.error("cache entry %s chunk %d failed authentication (%s: corrupt or torn); "
                  "not served", self.id[:8], index, e)

    def _resolve(self, index: int) -> None:
        """Decide which version of a chunk recovered unverified is its content (if it is)."""
        if index not in self.unverified:        # (one dict lookup: the common case)
            return
        with self.io_lock:
            freed, gone = self.unverified.resolve(index, self.present, self.slots, self.stale,
                                                  self.pending)
        if freed:
            self.cache._forget(self, gone, freed)

    def scan_slots(self) -> None:
        """After a restart: rebuild the chunk maps from the slot headers (Unverified.scan),
        the data file flushed first, so that every version found is durable."""
        with self.io_lock:
            try:
                fd = self.file.dup()
            except OSError:
                return
        try:
            os.fdatasync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        with self.io_lock:
            self.unverified.scan(size, self.present, self.slots, self.stale)

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
            gen = self.ledger.take_gen(index, data)   # in the order the versions were stored
        delta, writeout = 0, None
        try:
            new, parts = encode_version(self.sealer, self.bid, index, gen, data, split, nonce)
            delta, writeout = self._write_version(index, data, new, parts)
        finally:
            with self.io_lock:
                self.ledger.sealed(gen)
            if delta:
                self.cache._adjust(self, delta)
        if writeout is not None:
            try:
                oscalls.start_writeout(writeout)
            finally:
                os.close(writeout)

    def _write_version(self, index: int, data, new: Slot, parts: list) -> tuple[int, int | None]:
        """Write the version `new` of chunk `index` (sealed from `data` into `parts`) where
        the ledger says, unless `data` is no longer the chunk's pending plaintext. Returns
        (change of the bytes the bound counts, a fd to start a write-out on)."""
        delta = 0
        for attempt in range(2):
            with self.io_lock:
                if self.pending.get(index) is not data:
                    return delta, None
                if FORMS[new.form][0] and (self.dirty or self.ledger.disk_dirty
                                           or index not in self._split):
                    # its slot is rewritten in place only while a slot torn by a crash
                    # cannot cost anything; the one on disk holds the same bytes
                    self._sealed(index)
                    return delta, None
                if index in self.unverified:
                    freed, _ = self.unverified.resolve(      # which version to keep
                        index, self.present, self.slots, self.stale, self.pending)
                    delta -= freed
                old = self.slots.get(index)
                pos = self.ledger.target(old)
                try:
                    self.file.write_slot(index, pos, parts)
                except OSError as e:
                    if attempt or e.errno not in (errno.ENOSPC, errno.EDQUOT):
                        self.error = oscalls.oserror_to_domain(e)
                        log.error("cache entry %s: writing chunk %d failed: %s", self.id[:8],
                                  index, e)
                        self._drained.notify_all()
                        return delta, None
                else:
                    self._sealed(index)
                    self.slots[index] = new._replace(pos=pos, epoch=self.ledger.epoch)
                    if old is not None and pos != old.pos:    # the older version stays
                        delta += _cost(old.length) - self.stale.get(index, 0)
                        self.stale[index] = _cost(old.length)
                    self._unsynced += SLOT
                    if self._unsynced >= WRITEOUT_EVERY and self.dirty:
                        self._unsynced = 0
                        return delta, self.file.dup()
                    return delta, None
            self.cache.free_disk_space()       # make room (without io_lock), try once more
        return delta, None

    def _sealed(self, index: int) -> None:
        """Caller holds io_lock. The pending plaintext of chunk `index` is on disk."""
        del self.pending[index]
        self._split.discard(index)
        if not self.pending:
            self._drained.notify_all()

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
            self.unverified.forget_from(first)
            for i in gone:
                self.pending.pop(i, None)
                self._split.discard(i)
            if not self.pending:
                self._drained.notify_all()
            self.file.truncate_chunks(first)
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
                    fd = self.file.dup(create=False)
                except FileNotFoundError:
                    self.ledger.disk_dirty = False      # no file, no record
                    return
            flush = self.ledger.start_flush(self.pending)
        try:
            os.fdatasync(fd)
            freed = 0
            with self.io_lock:
                self.ledger.flushed(flush)
                if not self.discarded:
                    for i in [i for i in self.stale if i not in self.unverified]:
                        s = self.slots.get(i)
                        if s is not None and self.ledger.is_durable(s):
                            self.file.punch(i, 1 - s.pos, fd)
                            freed += self.stale.pop(i)
        finally:
            os.close(fd)
        if freed:
            self.cache._forget(self, [], freed)

    def _settle(self) -> bool:
        """Make sure no dirty record is the newest on disk (what evicting or re-sealing in
        place needs): flush the clean record written last. False while the newest record
        written says dirty."""
        with self.io_lock:
            if not self.ledger.disk_dirty:
                return True
            if not self.ledger.newest_clean:
                return False
        self._flush()
        return not self.ledger.disk_dirty

    def _seal_waiting(self) -> None:
        # seal what is still waiting here rather than wait for a sealer thread to get to it
        # (close of a small file: one thread hop less); a job already running is harmless,
        # _seal_one writes each version of a chunk once
        with self.io_lock:
            waiting = list(self.pending)
        for index in waiting:
            self._seal_one(index)

    def close_fd(self) -> None:
        try:
            self.drain()
        except Exception:  # noqa: BLE001 - the error was reported to the writer already
            pass
        with self.io_lock:
            self.file.close()

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
            if self.dirty or (self.ledger.disk_dirty and not last):
                return 0
            length = self.present.pop(index, None)
            if length is None:
                return 0
            freed = _cost(length) + self.stale.pop(index, 0)
            on_disk = self.slots.pop(index, None) is not None
            self.unverified.forget(index)
            self._split.discard(index)
            if self.pending.pop(index, None) is not None and not self.pending:
                self._drained.notify_all()
            if not self.present and not self.pending:
                # fully evicted: nothing of it needs to stay on disk (its data is in the
                # bucket; a crash leaves the file whole, or no file)
                self._forget_file()
            elif on_disk:
                self.file.punch_chunk(index)
            return freed

    def _forget_file(self) -> None:
        """Caller holds io_lock. Remove the data file and its records (a new record: a new file)."""
        self.file.remove()
        self._named = False
        self.ledger.forget_records()

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
            seq, fd, trusted = self.journal.write(state, dirty, keep_fd=sync)
            if sync:
                self._flush(fd)
                if not self._named:
                    self.cache.sync_entries_dir()
                    self._named = True
        except OSError as e:
            raise oscalls.oserror_to_domain(e) from None
        if sync and dirty:
            # off close()'s time; skipped if an upload's clean record comes first (journal.py)
            self.cache.later(self.journal.confirm, state, seq, trusted)

    def drop_state(self) -> None:
        """The entry is clean (uploaded): a record that says so replaces the dirty one, without
        a flush (a crash that loses it leaves the dirty record: uploaded once more; eviction,
        which would take chunks that record names, flushes it first). Recovery removes a
        clean entry."""
        if self.ledger.seq < 0:
            return                    # no record was ever written: nothing to supersede
        with self.io_lock:
            empty = not self.present and not self.pending
            if empty:
                # nothing cached (an empty file): its data file would only hold the record;
                # remove it rather than keep an inode per empty file until the next mount
                self._forget_file()
        if not empty:
            self.save_state({"dirty": False}, sync=False)
        with self.io_lock:
            offer, self._evict_deferred = self._evict_deferred, False
        if offer:
            self.cache._offer(self)

    def load_state(self) -> dict:
        """The newest record that authenticates; it becomes the entry's current record."""
        return self.journal.load()
