"""The receive buffers of big GET bodies: pooled 1 MiB buffers (BufferPool) a body is received
into and handed over as is (Segments), so that what the read path keeps of it pins only the
buffers it shows.

Lock order: BufferPool._lock is a leaf lock.
"""

from __future__ import annotations

import mmap
import sys
import threading
import time

SEG = 1024 * 1024            # bytes of a big GET body per pooled buffer


class Segments:
    """A body held as several buffers, in order, never joined into one.

    Received: a big ranged-GET body in pooled buffers of SEG bytes each (the last may be
    shorter). The read path keeps 128 KiB chunks of it as views, and a view holds only its
    own buffer: chunks still waiting for a reader or a sealer keep 1 MiB each in memory, not
    the whole 8 MiB read unit they came in.

    Sent: a part to upload as the cache chunks it was decrypted into. The transport hands
    them to awscrt one by one and lets go of each once copied (it empties `parts`), so a part
    in flight is held once, in awscrt's buffer, instead of twice."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: list):
        self.parts = parts
        self.size = sum(len(p) for p in parts)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def views(self, step: int):
        """Memoryviews of step bytes each (the last may be shorter), in order; step must
        divide SEG."""
        if SEG % step:
            raise ValueError(f"{step} does not divide the segment size")
        for p in self.parts:
            v = memoryview(p)
            for off in range(0, len(v), step):
                yield v[off:off + step]


class BufferPool:
    """The receive buffers of big GET bodies (Segments), reused. A fresh bytearray is
    zero-filled while the GIL is held, and glibc often maps it anew, so every 4 KiB page
    faults in as well; a buffer here is an anonymous mmap, handed out again once nothing
    refers to it.

    A buffer is in use while anything refers to it: the chunks of a fetched read unit are
    memoryviews of it (in the cache's sealing queue, in a file's hot chunks, in a reader's
    hands), and every view holds a reference. So the reference count says when it is free,
    and a buffer someone can still see is never written into. At most `keep` buffers are
    remembered; one idle for `idle_s` seconds is dropped (by a short-lived reaper thread), so
    an idle mount holds none."""

    _FREE_REFS = 3          # the pool's list, the loop variable, getrefcount's argument

    def __init__(self, keep: int = 128, idle_s: float = 10.0):
        self.keep = keep
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._bufs: list = []                 # buffers, least recently handed out first
        self._last: dict[int, float] = {}     # id(buffer) -> when last handed out
        self._reaper: threading.Thread | None = None

    def get(self, n: int):
        """A writable buffer of exactly n bytes that nothing else refers to."""
        with self._lock:
            for b in self._bufs:
                if len(b) == n and sys.getrefcount(b) == self._FREE_REFS:
                    self._bufs.remove(b)          # (to the end: the most recently used)
                    break
            else:
                b = mmap.mmap(-1, n)
                if len(self._bufs) >= self.keep:
                    self._last.pop(id(self._bufs.pop(0)), None)   # (lives on while in use)
            self._bufs.append(b)
            self._last[id(b)] = time.monotonic()
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="bufpool", daemon=True)
                self._reaper.start()
            return b

    def trim(self, now: float) -> int:
        """Forget the buffers last handed out over idle_s before now; returns how many are
        left."""
        with self._lock:
            keep = [b for b in self._bufs if now - self._last[id(b)] < self.idle_s]
            self._last = {id(b): self._last[id(b)] for b in keep}
            self._bufs = keep
            return len(keep)

    def _reap(self) -> None:
        while True:
            time.sleep(self.idle_s / 2)
            with self._lock:
                if not self._bufs:
                    self._reaper = None
                    return
            self.trim(time.monotonic())


POOL = BufferPool()
