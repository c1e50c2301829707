"""Stamps of our own changes, so that an answer that was on its way while we changed what it
describes is not cached (attrs.AttrCache). Callers hold the attribute cache's lock."""

from __future__ import annotations

import posixpath

from cachetools import LRUCache


class _Stamps(LRUCache):
    """Name -> stamp of its last change. A name that fell out of the LRU counts as changed
    at the newest stamp evicted (`_floor`: never "unchanged" wrongly)."""

    def __init__(self, maxsize: int):
        super().__init__(maxsize=maxsize)
        self._floor = 0

    def popitem(self):
        key, stamp = super().popitem()
        self._floor = max(self._floor, stamp)
        return key, stamp


class ChangeLog(_Stamps):
    """Directory -> stamp of its last name change, from one counter of its own."""

    def __init__(self, maxsize: int):
        super().__init__(maxsize=maxsize)
        self._clock = 0

    def mark(self) -> int:
        return self._clock

    def note(self, d: str | None = None) -> None:
        """A name in d changed (d=None: names anywhere, e.g. a directory rename)."""
        self._clock += 1
        if d is None:
            self._floor = self._clock
        else:
            self[d] = self._clock

    def changed_since(self, d: str, mark: int) -> bool:
        return max(self.get(d, 0), self._floor) > mark


class PathChanges(_Stamps):
    """Path -> stamp (AttrCache.seq) of the last change of ours to it. An answer about a
    path asked at stamp seq0 is stale if the path, or a directory above it (a rename or
    removal changes every name under it), changed since; a change of another file does not
    touch it (`rm -r` unlinks one file while the next ones are being looked up)."""

    def changed_since(self, path: str, seq0: int) -> bool:
        if self._floor > seq0:
            return True
        while True:
            if self.get(path, 0) > seq0:
                return True
            if path in ("/", ""):
                return False
            path = posixpath.dirname(path)
