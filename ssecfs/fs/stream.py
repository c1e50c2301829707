"""Uploads that start while a big file is still being written (part of the write-back).

A file written from empty, sequentially, past STREAM_START bytes gets a multipart upload at
once; each 8 MiB part is sent as soon as the writer has moved past it, at most STREAM_WINDOW
parts at a time per file. When the write-back later uploads the file (after close and the
write-back delay, or at fsync), only the parts not sent yet, or written again since they were
sent, go out before CompleteMultipartUpload. A 1 GiB `cp` is then durable shortly after
close() instead of one whole upload later.

What makes a streamed part stale: every write bumps a version counter of the parts it
touches; a part counts at completion only if it was sent at its current version and with its
final length. Truncate, unlink, rename, and changes of mode, owner or mtime drop the stream
(AbortMultipartUpload) and the file is uploaded whole as before: the object's metadata is fixed
when the multipart upload begins. For the same reason a streamed object carries no mtime in
its metadata: its modification time is the object's Last-Modified (see docs/SEMANTICS.md).
A daemon killed mid-stream leaves an incomplete multipart upload behind (the data itself is
safe in the cache journal and is uploaded whole after the restart).

Locks: a stream's fields are guarded by the file's st.lock; `begin_lock` serialises
CreateMultipartUpload.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from ..errors import StoreError
from .meta import meta_headers
from ..store.contract import MULTIPART_MAX_PARTS, MULTIPART_MIN_PART

log = logging.getLogger("ssecfs.stream")

STREAM_PART = MULTIPART_MIN_PART
STREAM_START = 3 * STREAM_PART       # files smaller than this are uploaded whole (one PUT)
STREAM_WINDOW = 8                    # parts of one file being sent at once
STREAM_CLOSE_DELAY = 0.5             # write-back delay after close of a streamed file (s)
STREAM_MAX_PARTS = MULTIPART_MAX_PARTS


class PartStream:
    def __init__(self, key: str, meta_headers: dict, ident: tuple):
        self.key = key
        self.meta = meta_headers          # without mtime/ctime (see module docstring)
        self.ident = ident                # (mode, uid, gid) the upload was begun with
        self.upload_id: str | None = None
        self.key_fp: str | None = None
        self.versions: dict[int, int] = {}     # part index -> writes seen
        self.sent: dict[int, tuple] = {}       # part index -> (version, etag, length)
        self.inflight: dict[int, object] = {}  # part index -> Future
        self.next_part = 0
        self.broken = False
        self.finishing = False                 # the write-back sends the rest: no more pumping
        self.abort_sent = False
        self.begin_lock = threading.Lock()


class Streams:
    """The early part uploads of files being written: the parts are read through the
    Reader and sent to the store from a pool of their own."""

    def __init__(self, store, reader, workers: int):
        self.store = store
        self.reader = reader
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stream")

    # -- called with st.lock held ----------------------------------------------------------------
    def on_write(self, st, offset: int, end: int) -> None:
        if offset <= st.seq_end:
            st.seq_end = max(st.seq_end, end)        # written without a hole from 0 so far
        s = st.stream
        if s is None:
            if (st.no_stream or st.remote_valid or st.seq_end != st.size or st.size < STREAM_START
                    or st.size > STREAM_PART * STREAM_MAX_PARTS // 2):
                return
            m = st.meta
            meta = {k: v for k, v in meta_headers(m).items() if k not in ("mtime", "ctime")}
            st.stream = s = PartStream(st.key, meta, (m["mode"], m["uid"], m["gid"]))
            log.debug("%s: uploading while written (multipart)", st.path)
        for p in range(offset // STREAM_PART, (end - 1) // STREAM_PART + 1):
            s.versions[p] = s.versions.get(p, 0) + 1
        self._pump(st)

    def _pump(self, st) -> None:
        s = st.stream
        if s is None or s.broken or s.finishing:
            return
        whole = st.size // STREAM_PART - 1     # leave the last whole part: it may grow on
        while s.next_part < whole and len(s.inflight) < STREAM_WINDOW:
            p = s.next_part
            s.next_part += 1
            s.inflight[p] = self._pool.submit(self._send, st, s, p)

    def drop(self, st, reason: str, for_good: bool = False) -> None:
        """Give up the stream of st (the file is then uploaded whole)."""
        s = st.stream
        if for_good:
            st.no_stream = True
        if s is None:
            return
        st.stream = None
        s.broken = True
        log.debug("%s: multipart stream dropped (%s)", st.path, reason)
        self._maybe_abort(s)

    def _maybe_abort(self, s: PartStream) -> None:
        """Abort a dropped stream once no part of it is on its way (a part that lands after
        the abort could otherwise be left behind)."""
        if s.broken and not s.inflight and not s.abort_sent:
            s.abort_sent = True
            self._pool.submit(self._abort, s)

    # -- worker side (never waits for another task of the pool) ----------------------------------
    def _abort(self, s: PartStream) -> None:
        with s.begin_lock:
            if s.upload_id is not None:
                self.store.mpu_abort(s.key, s.upload_id)
                s.upload_id = None

    def _begin(self, s: PartStream) -> None:
        with s.begin_lock:
            if s.upload_id is None and not s.broken:
                s.upload_id, s.key_fp = self.store.mpu_begin(s.key, s.meta)

    def _send(self, st, s: PartStream, p: int) -> None:
        try:
            with st.lock:
                if st.stream is not s:
                    return
                ver = s.versions.get(p, 0)
                length = min(STREAM_PART, st.size - p * STREAM_PART)
            self._begin(s)
            if s.upload_id is None:
                return
            body = self.reader.for_upload(st, p * STREAM_PART, length)
            etag = self.store.mpu_part(s.key, s.upload_id, p + 1, body, s.key_fp)
            with st.lock:
                s.sent[p] = (ver, etag, length)
        except Exception as e:  # noqa: BLE001 - the whole-file upload will do it instead
            log.warning("%s: early upload of part %d failed (%s); the file will be uploaded "
                        "whole", st.path, p + 1, e)
            with st.lock:
                if st.stream is s:
                    self.drop(st, "a part failed")
        finally:
            with st.lock:
                s.inflight.pop(p, None)
                if st.stream is s:
                    self._pump(st)
                else:
                    self._maybe_abort(s)

    def finish(self, st, key: str, size: int):
        """Write-back side: complete st's stream as the upload of (key, size), or None when
        there is no usable stream (the caller uploads the file whole)."""
        with st.lock:
            s = st.stream
            if s is None:
                return None
            m = st.meta
            if (s.key != key or s.broken or size < STREAM_START
                    or size > STREAM_PART * STREAM_MAX_PARTS
                    or s.ident != (m["mode"], m["uid"], m["gid"])):
                self.drop(st, "file changed shape")
                return None
            # from here on the parts not sent yet are sent below, once each: the pump would
            # send them a second time (and the late ones to a completed upload)
            s.finishing = True
            pending = list(s.inflight.values())
        for f in pending:
            f.result()
        self._begin(s)
        with st.lock:
            if st.stream is not s or s.upload_id is None:
                return None
            n = (size + STREAM_PART - 1) // STREAM_PART
            todo, done = [], {}
            for p in range(n):
                length = min(STREAM_PART, size - p * STREAM_PART)
                sent = s.sent.get(p)
                if sent and sent[0] == s.versions.get(p, 0) and sent[2] == length:
                    done[p] = sent[1]
                else:
                    todo.append((p, s.versions.get(p, 0), length))

        def send(item):
            p, ver, length = item
            body = self.reader.for_upload(st, p * STREAM_PART, length)
            return p, ver, length, self.store.mpu_part(s.key, s.upload_id, p + 1, body, s.key_fp)

        try:
            for p, ver, length, etag in self._pool.map(send, todo):
                done[p] = etag
                with st.lock:
                    s.sent[p] = (ver, etag, length)
            info = self.store.mpu_complete(s.key, s.upload_id,
                                           [(p + 1, done[p]) for p in range(n)], s.key_fp)
        except StoreError:
            with st.lock:
                if st.stream is s:
                    self.drop(st, "completion failed")
            raise
        with st.lock:
            if st.stream is s:
                st.stream = None
        log.info("%s: %d of %d parts were sent while it was written", st.path,
                  n - len(todo), n)
        return info

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
