"""What a crash would keep of one entry: the generations of its chunk versions, the flushes
(epochs) that made them durable, the sequence of its journal records and what the newest
record on disk may say. Bookkeeping only, no I/O: the entry asks it where a version may go
and what a record may confirm, and tells it what it wrote and flushed.

Copy-on-write. A chunk's newest version that may be acknowledged (a flush, fdatasync, of
the entry started after it was written) is never overwritten while the entry's record on
disk may say dirty: a write of such a chunk goes to its other slot, and the older copy
there is punched once the new one is durable (after the next flush completes). Until the
first dirty record, and once a clean record is flushed, nothing on disk is needed after a
crash (recovery removes such entries): chunks are rewritten in place. A first write of a
chunk goes to its slot 0, so writing new data costs one slot write per chunk.
"""

from __future__ import annotations

from typing import NamedTuple

from .layout import NEVER, Slot


class Flush(NamedTuple):
    """What a flush (fdatasync) makes durable, taken when it starts."""
    epoch: int                # the versions written in this epoch or before
    gen: int                  # every version of a generation up to this one
    seq: int                  # the records up to this one


class Ledger:
    """The durability state of one entry. Not thread-safe: the entry's io_lock guards it.

    A version written in epoch n is durable once a flush that started in a later epoch
    completed; one a flush has started on may be acknowledged. Every version takes the next
    generation, in the order the versions were stored."""

    def __init__(self) -> None:
        self.seq = -1                   # sequence of the last record written or read
        self.durable_seq = -1           # of the newest record known flushed: the next record
                                        # goes to the other record slot
        self.epoch = 1                  # each flush starts a new one
        self.durable_epoch = 0          # the newest epoch a completed flush covers
        self.gen = 0                    # the last generation taken
        self.sealing: dict[int, tuple] = {}   # taken by a write not finished yet: its
                                              # (chunk index, plaintext)
        self.durable_gen = 0            # every slot of a generation <= it is flushed
        self.trusted = -1               # of the record recovered: its flushed_gen
        self.floor = NEVER              # no record claims a generation >= it (those
                                        # recovered unverified, maybe torn)
        # what the newest record on disk may say
        self.disk_dirty = False         # a dirty one (no clean one flushed after it)
        self.newest_clean = False       # the newest written says clean

    # -- chunk versions -----------------------------------------------------------------------
    def take_gen(self, index: int, data) -> int:
        """The generation of a version of chunk `index` about to be sealed from `data`."""
        self.gen += 1
        self.sealing[self.gen] = (index, data)
        return self.gen

    def sealed(self, gen: int) -> None:
        """The write of generation `gen` finished (written, or given up)."""
        del self.sealing[gen]

    def written_gen(self, pending: dict) -> int:
        """The highest generation g such that every slot of a generation <= g is written, or
        will never be (a seal whose plaintext is no longer the chunk's `pending` one is
        dropped)."""
        live = [g for g, (i, data) in self.sealing.items() if pending.get(i) is data]
        return min(live) - 1 if live else self.gen

    def target(self, old: Slot | None) -> int:
        """Where the next version of a chunk goes: never over its newest version that may be
        durable (a flush started after it was written: it may be acknowledged) while the
        record on disk may say dirty (copy-on-write), else over the version there (a first
        write: position 0)."""
        if old is None:
            return 0
        if self.disk_dirty and old.epoch < self.epoch:
            return 1 - old.pos
        return old.pos

    def is_durable(self, slot: Slot) -> bool:
        return slot.epoch <= self.durable_epoch

    def found(self, top: Slot) -> bool:
        """After a restart: `top` is the newest version of a chunk on disk. True if the
        recovered record confirms it (flushed before that record); else it is unverified
        and no record written from now on confirms its generation or a higher one."""
        self.gen = max(self.gen, top.gen)
        if top.gen <= self.trusted:
            return True
        self.floor = min(self.floor, top.gen)
        return False

    def trusts(self, gen: int) -> bool:
        return gen <= self.trusted

    # -- flushes ------------------------------------------------------------------------------
    def start_flush(self, pending: dict) -> Flush:
        flush = Flush(self.epoch, self.written_gen(pending), self.seq)
        self.epoch += 1
        return flush

    def flushed(self, flush: Flush) -> None:
        """`flush` completed."""
        self.durable_epoch = max(self.durable_epoch, flush.epoch)
        self.durable_gen = max(self.durable_gen, flush.gen)
        self.durable_seq = max(self.durable_seq, flush.seq)
        if self.seq == flush.seq and self.newest_clean:
            self.disk_dirty = False

    # -- records ------------------------------------------------------------------------------
    def next_record(self) -> tuple[int, int]:
        """(sequence, flushed_gen) of the next record. A record never goes over the newest
        one known flushed (if it is torn, that one is whole in the other slot); it confirms
        what was flushed before it is written (its own flush, which may not complete, is not
        counted), and no version recovered unverified."""
        seq = self.seq + 1
        if self.durable_seq >= 0 and seq % 2 == self.durable_seq % 2:
            seq += 1
        return seq, self.confirmable()

    def confirmable(self) -> int:
        return min(self.durable_gen, self.floor - 1)

    def writing_record(self, dirty: bool) -> None:
        """A record is about to be written: a dirty one may be on disk from now on."""
        if dirty:
            self.disk_dirty = True

    def wrote_record(self, seq: int, dirty: bool) -> None:
        self.seq = seq
        self.newest_clean = not dirty

    def recovered(self, seq: int, trusted: int) -> None:
        """Record `seq`, saying flushed_gen `trusted`, was read at a restart (flushed)."""
        self.seq = self.durable_seq = seq
        self.trusted = trusted

    def forget_records(self) -> None:
        """The data file is gone: a later record starts a new one."""
        self.seq, self.durable_seq = -1, -1
        self.disk_dirty = self.newest_clean = False
