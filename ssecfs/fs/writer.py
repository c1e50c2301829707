"""Writing: changes of an open file's bytes and size, into its cache entry (which then holds
the file's only up-to-date copy: it is dirty until uploaded), with the early part uploads of a
file written from its start (stream.Streams). Caller of every method: holds no lock but may
hold the namespace lock; each method takes st.lock itself (begin_change: the caller holds it).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cache import CHUNK, Cache
from .attrs import AttrCache
from .files import FileState, OpenFiles
from .meta import now
from .reader import Reader
from .stream import Streams
from .writeback import WriteBack


@dataclass(eq=False, repr=False)
class Writer:
    cache: Cache
    files: OpenFiles
    reader: Reader
    attrs: AttrCache
    streams: Streams
    wb: WriteBack

    def begin_change(self, st: FileState, data: bool) -> None:
        """Caller holds st.lock. Marks the file dirty (its cache entry too)."""
        st.changed(data)
        if data:
            entry = self.files.entry_of(st)
            if not entry.dirty:
                self.cache.unindex(entry)
                self.cache.set_dirty(entry, True)

    def write(self, st: FileState, data: bytes, offset: int) -> int:
        entry = self.files.entry_of(st)
        self.cache.wait_for_room(len(data), entry, progress=lambda: self.wb.pending() > 0)
        end = offset + len(data)
        with st.lock:
            self.begin_change(st, data=True)
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
                    base = bytearray(self.reader.chunk_locked(st, i))
                    want = max(len(base), hi)
                    if len(base) < want:
                        base.extend(bytes(want - len(base)))
                    base[lo:hi] = view[pos - offset:pos - offset + (hi - lo)]
                    entry.write_chunk(i, bytes(base))
                pos = cstart + hi
            st.size = max(st.size, end)
            st.meta["mtime"] = st.meta["ctime"] = now()
            self.streams.on_write(st, offset, end)
        return len(data)

    def truncate(self, st: FileState, length: int) -> None:
        with st.lock:
            if length == st.size:
                st.meta["mtime"] = st.meta["ctime"] = now()
                self.begin_change(st, data=False)
                return
            self.begin_change(st, data=True)
            self.streams.drop(st, "truncated")
            st.seq_end = min(st.seq_end, length)
            st.trunc_epoch += 1
            entry = self.files.entry_of(st)
            if length < st.size:
                k, rem = divmod(length, CHUNK)
                if rem:
                    tail = self.reader.chunk_locked(st, k)[:rem]
                    if tail:
                        entry.write_chunk(k, tail.ljust(rem, b"\0"))
                    entry.drop_chunks_from(k + 1)
                else:
                    entry.drop_chunks_from(k)
                st.remote_valid = min(st.remote_valid, length)
            st.size = length
            st.meta["mtime"] = st.meta["ctime"] = now()
        self.attrs.invalidate(st.path)
