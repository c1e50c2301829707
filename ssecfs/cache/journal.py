"""The journal record of one entry: the file's state (path, size, dirty...) written to the
entry's two record slots, confirmed after the flush of a close, and read back at a restart.

Record n goes to record slot n % 2, never over the newest record known flushed (a sequence
number is skipped if need be), so that a write torn by a crash leaves a flushed record
whole; the valid record with the highest sequence is the entry's state. After the flush of
a close, the same state is written once more (not flushed, and later, on the cache's
background thread) to confirm the chunks that flush wrote: a record cannot say so of its own
flush, which a power cut may interrupt."""

from __future__ import annotations

import errno
import logging
import threading
from typing import Callable

from ..errors import IntegrityError
from .datafile import DataFile
from .layout import decode_record, encode_record, read_records
from .ledger import Ledger

log = logging.getLogger("ssecfs.cache")


class Journal:
    """Writes and reads the records of one entry. Takes the entry's io_lock itself (never
    across the sealing of a record); the flushes are the entry's."""

    def __init__(self, entry_id: str, sealer, key_fp: str, file: DataFile, ledger: Ledger,
                 io_lock: threading.Lock, make_room: Callable[[], object]):
        self.id = entry_id
        self.bid = bytes.fromhex(entry_id)
        self.sealer = sealer
        self.key_fp = key_fp
        self.file = file
        self.ledger = ledger
        self.io_lock = io_lock
        self.make_room = make_room         # frees disk space (called without io_lock)

    def write(self, state: dict, dirty: bool, keep_fd: bool,
              after: int | None = None) -> tuple[int, int | None, int]:
        """Write a record (not flushed); returns (its sequence, a duplicate fd of the file it
        went to if keep_fd, the flushed_gen it says). after: write it only if the newest
        record is still that one (else sequence -1)."""
        with self.io_lock:
            seq, trusted = self.ledger.next_record()
        record = encode_record(self.sealer, self.bid, self.key_fp, seq, state, trusted)
        for attempt in range(2):
            try:
                with self.io_lock:
                    if after is not None and (self.ledger.seq != after
                                              or not self.file.is_open()):
                        # a newer record, or the entry closed (discarded: its file must not
                        # be made again)
                        return -1, None, trusted
                    self.file.fd()
                    self.ledger.writing_record(dirty)   # from the moment it may be on disk
                    self.file.write_record(seq, record)
                    self.ledger.wrote_record(seq, dirty)
                    # the file the record went to, even if another thread closes the
                    # entry's fd before the fdatasync (which runs without io_lock)
                    return seq, (self.file.dup() if keep_fd else None), trusted
            except OSError as e:
                if attempt or e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                self.make_room()
        raise AssertionError("unreachable")

    def confirm(self, state: dict, seq: int, trusted: int) -> None:
        """After the flush of record `seq`: the same state again, in the other slot, saying
        that the chunks it flushed are whole. Not flushed: if it reaches the disk, that
        flush had completed. Without it, a crash before the next close would have those
        chunks verified instead of trusted."""
        with self.io_lock:
            if self.ledger.seq != seq or self.ledger.confirmable() <= trusted:
                return                          # a newer record, or nothing to confirm
        try:
            self.write(state, True, keep_fd=False, after=seq)
        except OSError as e:                    # only the confirmation is missing
            log.debug("cache entry %s: confirmation record not written: %s", self.id[:8], e)

    def load(self) -> dict:
        """The newest record that authenticates (the previous one if the newest was torn by a
        crash); it becomes the entry's current record (the next goes to the other slot)."""
        for seq, fp, blob in read_records(self.file.path):
            if fp != self.key_fp:
                continue
            try:
                state, trusted = decode_record(self.sealer, self.bid, seq, blob)
            except (IntegrityError, ValueError, KeyError, TypeError):
                log.warning("cache entry %s: record %d does not authenticate (torn?); trying "
                            "the previous one", self.id[:8], seq)
                continue
            self.ledger.recovered(seq, trusted)       # (scan_slots flushes the file)
            return state
        raise IntegrityError(f"cache entry {self.id[:8]}: no record authenticates")
