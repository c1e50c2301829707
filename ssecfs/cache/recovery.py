"""Which version of each chunk of an entry survives a crash. At a restart the slot headers
of the entry's data file are read; a chunk whose newest version the recovered record
confirms (its generation up to the record's "flushed_gen": flushed before the record was
written) takes it as it is: if it fails, the chunk reads EIO, never an older version. A
newer version (written after that flush, maybe torn by the crash) is verified at the
chunk's first use; if it fails, the version before it is used, or, with none, the chunk is
absent, as before its first write."""

from __future__ import annotations

import logging

from ..errors import IntegrityError
from .datafile import DataFile
from .layout import BASE, SLOT, Slot, _cost, decode_version
from .ledger import Ledger

log = logging.getLogger("ssecfs.cache")


class Unverified:
    """The chunks of one entry whose newest version on disk no record confirms: their
    versions, newest first, until the chunk's first use chooses one. Works on the entry's
    chunk maps, which it is given; not thread-safe: the caller holds the entry's io_lock,
    except for a membership test (one dict lookup)."""

    def __init__(self, entry_id: str, sealer, file: DataFile, ledger: Ledger):
        self.id = entry_id
        self.bid = bytes.fromhex(entry_id)
        self.sealer = sealer
        self.file = file
        self.ledger = ledger
        self.chunks: dict[int, list[Slot]] = {}

    def __contains__(self, index: int) -> bool:
        return index in self.chunks

    def forget(self, index: int) -> None:
        self.chunks.pop(index, None)

    def clear(self) -> None:
        self.chunks.clear()

    def forget_from(self, first: int) -> None:
        for i in [i for i in self.chunks if i >= first]:
            del self.chunks[i]

    def scan(self, size: int, present: dict, slots: dict, stale: dict) -> None:
        """Fill the chunk maps from the slot headers of a data file of `size` bytes (flushed:
        every version found is durable). A chunk whose newest version the record confirms
        takes it, and its older copy is punched; a newer one waits here."""
        for i in range(max(0, size - BASE + 2 * SLOT - 1) // (2 * SLOT)):
            found = [self.file.read_header(i, p) for p in (0, 1)]
            cands = sorted((s for s in found if s is not None), key=lambda s: s.gen,
                           reverse=True)
            if not cands:
                continue
            top = cands[0]
            present[i] = top.length
            slots[i] = top
            if self.ledger.found(top):
                for c in cands[1:]:
                    self.file.punch(i, c.pos)
            else:
                self.chunks[i] = cands
                if len(cands) > 1:
                    stale[i] = _cost(cands[1].length)
        self.ledger.durable_gen = self.ledger.gen

    def resolve(self, index: int, present: dict, slots: dict, stale: dict,
                pending: dict) -> tuple[int, list[int]]:
        """The newest version that the recovered record confirms (trusted), or that
        authenticates, wins; a newer one that fails was torn by the crash and is dropped;
        with none left the chunk is absent, as it was before its first write. The losers
        are punched. Returns (bytes freed, [index] if the chunk became absent)."""
        cands = self.chunks.pop(index, None)
        if cands is None:
            return 0, []
        is_pending = index in pending
        before = stale.pop(index, 0) + (0 if is_pending else _cost(present[index]))
        chosen = self._choose(index, cands)
        for c in cands:
            if c is not chosen:
                self.file.punch(index, c.pos)
        gone = []
        if chosen is None:
            slots.pop(index, None)
            if not is_pending:
                del present[index]
                gone = [index]
            return before, gone
        slots[index] = chosen
        if is_pending:
            return before, gone
        present[index] = chosen.length
        return before - _cost(chosen.length), gone

    def _choose(self, index: int, cands: list[Slot]) -> Slot | None:
        for c in cands:
            if self.ledger.trusts(c.gen) or not self.sealer.can_open(c.form):
                return c            # (a cipher this OpenSSL lacks: a failure, not a tear)
            try:
                decode_version(self.sealer, self.bid, index, c, self.file.read_slot(index, c))
            except IntegrityError as e:
                log.warning("cache entry %s chunk %d: the version written after the last "
                            "flush (generation %d) does not authenticate (%s: torn by the "
                            "crash); the version before it is used", self.id[:8], index,
                            c.gen, e)
                continue
            return c
        return None
