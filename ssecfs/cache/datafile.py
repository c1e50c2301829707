"""One entry's data file: its descriptor, and the reading, writing and punching of its chunk
slots and record slots at the places the layout gives them. Bytes in, bytes out: what they
mean (sealing, generations, which slot) is the entry's business."""

from __future__ import annotations

import errno
import os

from . import oscalls
from .layout import HEADER, RSLOT, SLOT, SUBS_AT, Slot, parse_header, slot_offset


class DataFile:
    """entries/ID.data of one entry. The descriptor is opened at first use (the file
    created with it) and kept until close(). Not thread-safe: the entry's io_lock guards
    it, and callers hold that lock for every method except those given a descriptor of
    their own (`fd=`), which is how an fdatasync runs without the lock."""

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None

    def fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        return self._fd

    def dup(self, create: bool = True) -> int:
        """A descriptor of the file of one's own (to close): it stays valid when the entry's
        is closed meanwhile. create=False: FileNotFoundError rather than a new file."""
        if self._fd is None and not create:
            return os.open(self.path, os.O_RDWR)
        return os.dup(self.fd())

    def is_open(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        """Close and unlink the file (gone already: nothing to do)."""
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- chunk slots --------------------------------------------------------------------------
    def read_slot(self, index: int, slot: Slot) -> bytes:
        """The bytes of the version `slot` of chunk `index`."""
        return os.pread(self.fd(), slot.size(), slot_offset(index, slot.pos))

    def read_subs(self, index: int, pos: int, at: int, n: int) -> bytes:
        """`n` bytes from `at` within slot `pos` of chunk `index` (sub-blocks of it)."""
        return os.pread(self.fd(), n, slot_offset(index, pos) + at)

    def read_header(self, index: int, pos: int) -> Slot | None:
        """The version slot `pos` of chunk `index` announces (not authenticated)."""
        return parse_header(os.pread(self.fd(), SUBS_AT, slot_offset(index, pos)), pos)

    def write_slot(self, index: int, pos: int, parts: list) -> None:
        """Write a version's bytes to slot `pos` of chunk `index`. A short write (disk full
        mid-slot) is not success: it raises ENOSPC, so that a torn slot is never taken as
        written."""
        if os.pwritev(self.fd(), parts, slot_offset(index, pos)) != sum(map(len, parts)):
            raise OSError(errno.ENOSPC, "short write to the cache")

    def punch(self, index: int, pos: int, fd: int | None = None) -> None:
        """Free one slot of a chunk (or make it read as absent)."""
        fd = self.fd() if fd is None else fd
        if not oscalls.punch_hole(fd, slot_offset(index, pos), SLOT):
            os.pwrite(fd, bytes(HEADER.size), slot_offset(index, pos))

    def punch_chunk(self, index: int) -> None:
        """Free both slots of a chunk."""
        fd = self.fd()
        if not oscalls.punch_hole(fd, slot_offset(index), 2 * SLOT):
            for pos in (0, 1):
                os.pwrite(fd, bytes(HEADER.size), slot_offset(index, pos))

    def truncate_chunks(self, first: int) -> None:
        """Drop the slots of chunks >= first (a file never created stays so)."""
        if self._fd is not None or os.path.exists(self.path):
            os.ftruncate(self.fd(), slot_offset(first))

    # -- record slots -------------------------------------------------------------------------
    def write_record(self, seq: int, record: bytes) -> None:
        """Write record `seq` to its record slot (seq % 2); ENOSPC if cut short."""
        if os.pwrite(self.fd(), record, (seq % 2) * RSLOT) != len(record):
            raise OSError(errno.ENOSPC, "short write to the cache")
