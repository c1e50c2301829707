"""Data files made ahead of need. A new entry's first close() would otherwise create its
data file's inode and then fsync `entries/` so that the name survives a power cut: on
ext4 that costs the writer about as much as the rest of a small file's close(). Spares are
created in batches on the cache's background thread, each batch's names made durable by
one fsync of `entries/` before any of them is handed out, so an entry made from a spare
starts with a durable name.

A spare is an empty `ID.data`: it holds no record, so recovery after a crash removes the
unused ones like any entry that was never closed; close() removes them."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import deque
from concurrent.futures import Executor
from typing import Callable

from . import oscalls

log = logging.getLogger("ssecfs.cache")

LOW = 32          # below this many, a batch is made
BATCH = 64


class Spares:
    def __init__(self, entries_dir: str, sync_dir: Callable[[], None], executor: Executor):
        self._dir = entries_dir
        self._sync_dir = sync_dir
        self._executor = executor
        self._lock = threading.Lock()
        self._ids: deque[str] = deque()
        self._filling = False
        self._closed = False

    def path(self, eid: str) -> str:
        return os.path.join(self._dir, eid + ".data")

    def take(self) -> str | None:
        """The id of a spare (its file exists, its name is durable), or None: then the
        entry creates its own file. Starts a batch when few are left."""
        with self._lock:
            eid = self._ids.popleft() if self._ids else None
            start = not self._filling and not self._closed and len(self._ids) < LOW
            self._filling = self._filling or start
        if start:
            try:
                self._executor.submit(self._fill)
            except RuntimeError:            # the cache is closing
                with self._lock:
                    self._filling = False
        return eid

    def _fill(self) -> None:
        made: list[str] = []
        try:
            for _ in range(BATCH):
                eid = uuid.uuid4().hex
                os.close(os.open(self.path(eid), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
                made.append(eid)
            self._sync_dir()
        except OSError as e:
            # (disk full...) entries create their own files meanwhile; none of these is
            # handed out, as their names may not be durable
            log.debug("cache: spare data files not made: %s", e.strerror)
            for eid in made:
                oscalls.unlink_quietly(self.path(eid))
            made = []
        with self._lock:
            if self._closed:
                for eid in made:
                    oscalls.unlink_quietly(self.path(eid))
            else:
                self._ids.extend(made)
            self._filling = False

    def close(self) -> None:
        """Remove the spares not taken (the executor has stopped: no batch is being made)."""
        with self._lock:
            self._closed = True
            ids, self._ids = list(self._ids), deque()
        for eid in ids:
            oscalls.unlink_quietly(self.path(eid))

    def count(self) -> int:
        with self._lock:
            return len(self._ids)
