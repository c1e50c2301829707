"""Uploading: dirty files to the store, in the background (write-back), and what waits for it
(fsync, unmount, recovery after a crash).

A dirty file is journaled with its data in the cache (`persist_and_schedule`), then queued in
the WriteBack; a worker uploads its current generation (`_upload`): the parts already sent
while it was written (stream.Streams) and the rest, or one PUT, or only its metadata (a copy
onto itself). Uploads take FileState.lock and OpenFiles.lock only, never the namespace lock,
so namespace operations may wait for an upload in flight (WriteBack.quiesce) while holding it.
"""

from __future__ import annotations

import logging
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field

from ..cache import Cache
from ..errors import TimedOut
from ..store.contract import Store
from .attrs import AttrCache
from .files import FileState, OpenFiles, Remote
from .meta import attr_from_meta, meta_headers
from .reader import Reader
from .stream import STREAM_CLOSE_DELAY, Streams
from .writeback import WriteBack

log = logging.getLogger("ssecfs.fs")

# More upload workers (--upload-workers) hide the round trips of a distant endpoint from a
# burst of small files; uploads of big files stay few at once whatever their number, as each
# holds its body (up to 16 MiB) or a window of parts in memory.
BIG_UPLOAD = 1024 * 1024
BIG_UPLOADS = 8
# Files up to SMALL go out in batches of up to UPLOAD_BATCH PUTs in flight at once per worker
# when they wait for a worker (writeback.WriteBack): a burst of small files to a distant
# endpoint is then not bound by one round trip per file per worker.
SMALL = 256 * 1024
UPLOAD_BATCH = 8


@dataclass(eq=False, repr=False)
class Uploader:
    store: Store
    cache: Cache
    files: OpenFiles
    reader: Reader
    attrs: AttrCache
    cfg: object                               # FsConfig
    bad_entries: list = field(default_factory=list, init=False)   # cache.recover()'s

    def __post_init__(self):
        big = min(self.cfg.upload_workers, BIG_UPLOADS)
        self._big = threading.BoundedSemaphore(big)
        self.streams = Streams(self.store, self.reader, big)
        self.wb = WriteBack(self._upload, delay=self.cfg.writeback_delay,
                            workers=self.cfg.upload_workers, upload_many=self._upload_many,
                            small=self._small, batch=UPLOAD_BATCH)

    def persist_and_schedule(self, st: FileState, delay: float | None = None) -> None:
        """Journal st's state with its data (once per generation) and queue its upload
        (delay 0: now, and even while it is open for writing)."""
        with st.lock:
            if not st.dirty or st.deleted:
                return
            if delay == 0:
                st.urgent_gen = st.generation     # fsync, unmount: see _upload
            if delay is None and st.stream is not None:
                # mostly sent already: complete it soon (still late enough for the chmod /
                # utime that cp -p and rsync do right after close)
                delay = min(self.cfg.writeback_delay, STREAM_CLOSE_DELAY)
            if st.journaled_gen != st.generation:
                entry = self.files.entry_of(st)
                if not entry.dirty:
                    # a change of metadata only (chmod, utime, truncate to the same size):
                    # the entry must not be evicted, with its record, before the upload
                    self.cache.unindex(entry)
                    self.cache.set_dirty(entry, True)
                try:
                    entry.save_state(st.journal())     # with the data: durable
                except Exception:
                    # the caller hears of it (ENOSPC at close); the upload is still queued:
                    # what could not be written to disk is still in memory
                    self.wb.schedule(st, delay)
                    raise
                st.journaled_gen = st.generation
            elif delay is None and not st.deferred:
                return          # already journaled and queued (close after flush)
            st.deferred = False
        self.wb.schedule(st, delay)

    def fsync(self, st: FileState) -> None:
        with st.lock:
            if not st.dirty or st.deleted:
                return
            gen = st.generation
        self.persist_and_schedule(st, delay=0)
        self.wb.expedite(st)
        ok = self.wb.wait(lambda: st.uploaded_gen >= gen or st.deleted,
                          timeout=self.cfg.fsync_timeout)
        if not ok:
            raise TimedOut(f"fsync of {st.path}: not durable after {self.cfg.fsync_timeout}s "
                           f"({self.wb.last_error or 'upload pending'})")

    def forget_if_done(self, st: FileState) -> None:
        """Caller holds st.lock. Drop a closed, clean file from the table."""
        if st.opens > 0 or st.dirty:
            return
        self.files.discard(st)
        if st.entry is not None:
            st.entry.close_fd()
        st.hot.clear()
        if not st.deleted:
            self.attrs.note_child(st.path, True, changed=False)
            self.attrs.set_attr(st.path, attr_from_meta(st.meta, st.size))

    # -- the write-back worker's side -------------------------------------------------------
    def _upload(self, st: FileState) -> None:
        """Called by a write-back worker. Uploads the current generation of st."""
        plan = self._plan(st)
        if plan is not None:
            self._send(st, plan)

    def _send(self, st: FileState, plan) -> None:
        """Upload what _plan said of st: its metadata only, or the rest of its stream, or its
        whole content."""
        gen, key, size, meta, remote, meta_only = plan
        if meta_only:
            info = self.store.copy(key, key, size, meta, remote.key_fp)
        else:
            info = self.streams.finish(st, key, size)
            if info is None:
                with self._big if size > BIG_UPLOAD else nullcontext():
                    info = self.store.upload(
                        key, size, lambda off, ln: self.reader.for_upload(st, off, ln), meta)
        self._uploaded(st, key, size, gen, info)

    def _upload_many(self, sts: list[FileState]) -> list:
        """Called by a write-back worker with small files: one PUT each, all in flight at
        once (store.put_many); the others as _upload does. [None or the exception] in order."""
        out: list = [None] * len(sts)
        puts = []
        for n, st in enumerate(sts):
            try:
                plan = self._plan(st)
                if plan is None:
                    continue
                gen, key, size, meta, _remote, meta_only = plan
                if meta_only or size > SMALL or st.stream is not None:
                    self._send(st, plan)
                    continue
                puts.append((n, gen, size, (key, self.reader.for_upload(st, 0, size), meta)))
            except Exception as e:  # noqa: BLE001 - this one is retried
                out[n] = e
        results = self.store.put_many([item for *_, item in puts]) if puts else []
        for (n, gen, size, (key, _data, _meta)), info in zip(puts, results):
            try:
                if isinstance(info, Exception):
                    raise info
                self._uploaded(sts[n], key, size, gen, info)
            except Exception as e:  # noqa: BLE001 - this one is retried
                out[n] = e
        return out

    @staticmethod
    def _small(st: FileState) -> bool:
        # under the write-back's lock, without st.lock: a hint, checked again in _upload_many
        return st.size <= SMALL and st.stream is None

    def _plan(self, st: FileState):
        """What to upload of st now: (generation, key, size, metadata, remote, metadata
        only), or None: nothing (deleted, clean, or still open for writing)."""
        with st.lock:
            if st.deleted or not st.dirty:
                return None
            if st.writers > 0 and st.urgent_gen <= st.uploaded_gen:
                # Still open for writing: a close() of another descriptor of it queued this
                # upload (`dd` and shell redirections close the descriptor they dup'ed onto
                # stdout before they write; a reader closes). Uploading now would store a
                # partial object, or complete a multipart stream at a partial size and send
                # every later part again; the last writer's close (release) queues it again.
                st.deferred = True
                log.info("%s: still being written: its upload waits for the last close",
                         st.path)
                return None
            gen, key, size = st.generation, st.key, st.size
            remote = st.remote
            meta_only = (st.data_generation <= st.uploaded_gen and remote is not None
                         and remote.key == key and remote.size == size)
            return gen, key, size, meta_headers(st.meta), remote, meta_only

    def _uploaded(self, st: FileState, key: str, size: int, gen: int, info) -> None:
        """Generation gen of st is stored as (key, size): info, the store's answer."""
        with st.lock:
            if st.deleted or st.key != key:
                return      # unlinked/renamed meanwhile: the namespace op fixed the object
            st.uploaded(gen, Remote(key, info.etag, size, info.key_fp))
            if st.entry is not None:
                if not st.dirty:
                    self.cache.set_dirty(st.entry, False)
                    self.cache.index_clean(st.entry, key, info.etag)
                try:
                    if st.dirty:
                        st.entry.save_state(st.journal(), sync=False)
                    else:
                        st.entry.drop_state()
                except Exception as e:  # noqa: BLE001 - the object is durable already; at
                    # worst a crash before the next journal write uploads it once more
                    log.warning("%s: journal not updated after upload: %s", st.path, e)
            self.forget_if_done(st)
        self.attrs.invalidate(st.path)
        log.debug("uploaded %s (%d bytes, generation %d)", key, size, gen)

    # -- whole mount ------------------------------------------------------------------------
    def recover(self) -> int:
        """Re-adopt dirty files from the cache journal after a crash and queue their uploads."""
        entries, self.bad_entries = self.cache.recover()
        for entry, j in entries:
            r = j.get("remote")
            remote = Remote(*r) if r else None
            st = FileState(j["path"], j["key"], j["meta"], j["size"], remote)
            st.remote_valid = j.get("remote_valid", remote.size if remote else 0)
            st.entry = entry
            st.generation = st.data_generation = 1
            if j.get("data_generation", 1) < j.get("generation", 1) and remote is not None:
                st.data_generation = 0        # only metadata was pending
            self.files.add(st)
            self.wb.schedule(st, 0)
        if entries:
            log.info("recovered %d dirty file(s) from the cache journal; uploading",
                     len(entries))
        return len(entries)

    def flush_all(self, timeout: float | None = None, progress=None) -> bool:
        """Upload every dirty file now and wait for them."""
        for st in self.files.dirty():
            try:
                self.persist_and_schedule(st, delay=0)
            except Exception as e:  # noqa: BLE001 - one file's trouble must not stop the rest
                log.error("%s: could not journal before the final upload: %s", st.path, e)
        self.wb.expedite_all()

        def done() -> bool:
            left = self.files.dirty()
            if progress:
                progress(len(left), sum(s.size for s in left))
            return not left
        return self.wb.wait(done, timeout=timeout)

    def status(self) -> dict:
        left = self.files.dirty()
        return {"dirty_files": len(left), "bytes_pending": sum(s.size for s in left),
                "uploads_in_flight": self.wb.in_flight(), "uploads_done": self.wb.uploads_done,
                "upload_errors": self.wb.upload_errors, "last_error": self.wb.last_error}

    def stop(self) -> None:
        self.wb.stop()
        self.streams.stop()
