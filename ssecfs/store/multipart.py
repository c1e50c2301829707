"""Multipart uploads: a big object sent as parts by the store's threads (Multipart.upload),
or part by part by the caller (begin, part, complete, abort: a file uploaded while it is
being written). Every part carries SSE-C and its echo is checked; a completion is verified
like any write (ssec.SseC).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from . import s3xml
from ..errors import StoreError
from ..crypto.keys import Key
from .contract import MULTIPART_MAX_PARTS, MULTIPART_MIN_PART, Body, ObjectInfo, Reader
from .s3requests import Requests
from .ssec import ECHO_MD5, SseC, meta_headers

log = logging.getLogger("ssecfs.store")

MiB = 1024 * 1024
SINGLE_PUT_MAX = 16 * MiB     # objects up to this size are one PutObject


def part_size_for(size: int) -> int:
    """The part size of an upload of size bytes: the smallest part, doubled until the parts
    fit S3's count."""
    ps = MULTIPART_MIN_PART
    while size > ps * MULTIPART_MAX_PARTS:
        ps *= 2
    return ps


class Multipart:
    """Multipart uploads of one bucket. head(key): the store's HEAD, for a completion whose
    answer echoed the key (its size and ETag are the object's, not the answer's)."""

    def __init__(self, requests: Requests, sse: SseC, pool: ThreadPoolExecutor,
                 head: Callable[[str], ObjectInfo]):
        self.requests = requests
        self.sse = sse
        self.pool = pool
        self.head = head

    def upload(self, key: str, size: int, reader: Reader, metadata: dict) -> ObjectInfo:
        """Parts of part_size_for(size), each read (reader) and sent by the pool's threads
        (awscrt's threads never call the reader: it may decrypt the cache or fetch from the
        store itself)."""
        ps = part_size_for(size)
        n = (size + ps - 1) // ps

        def part(i: int, up_id: str, k: Key):
            off = i * ps
            body = reader(off, min(ps, size - off))
            return self.upload_part(key, up_id, i + 1, body, k)

        return self.run(key, metadata, n, part)

    def upload_part(self, key: str, up_id: str, num: int, body: Body, k: Key) -> dict:
        a = self.requests.send("UploadPart", "PUT", key,
                               query={"partNumber": str(num), "uploadId": up_id},
                               headers=self.sse.headers(k), body=body)
        self.sse.check_write_echo(a, key, "UploadPart", k)
        etag = a.headers.get("etag")
        if not etag:
            raise StoreError(f"UploadPart {key!r}: the answer has no ETag")
        return {"PartNumber": num, "ETag": etag}

    def run(self, key: str, metadata: dict, nparts: int, part_fn) -> ObjectInfo:
        """An upload of nparts parts, part_fn(index, upload id, key) sending each; aborted
        if any fails."""
        up_id, fp = self.begin(key, metadata)
        k = self.sse.ring.by_fingerprint(fp)
        futs = []
        try:
            # Bounded window: at most 2x workers parts in flight (memory stays bounded).
            parts, window = [], 2 * self.pool._max_workers
            for i in range(nparts):
                futs.append(self.pool.submit(part_fn, i, up_id, k))
                if len(futs) >= window:
                    parts.append(futs.pop(0).result())
            parts.extend(f.result() for f in futs)
            return self.complete(key, up_id, [(p["PartNumber"], p["ETag"]) for p in parts], fp)
        except BaseException:
            for f in futs:
                f.cancel()
            self.abort(key, up_id)
            raise

    # -- driven by the caller -------------------------------------------------------------------
    def begin(self, key: str, metadata: dict) -> tuple[str, str]:
        """CreateMultipartUpload under the current key: (upload id, key fingerprint)."""
        k = self.sse.ring.current
        h = {**meta_headers(self.sse.meta(metadata, k), "CreateMultipartUpload", key),
             **self.sse.headers(k)}
        a = self.requests.send("CreateMultipartUpload", "POST", key, query={"uploads": None},
                               headers=h)
        up_id = s3xml.upload_id(a.body)
        if not up_id:
            raise StoreError(f"CreateMultipartUpload {key!r}: the answer has no UploadId")
        return up_id, self.sse.fp(k)

    def part(self, key: str, upload_id: str, number: int, body: Body, key_fp: str) -> str:
        """UploadPart (the echo is checked); returns the part's ETag."""
        return self.upload_part(key, upload_id, number, body, self.sse.by_fp(key_fp))["ETag"]

    def complete(self, key: str, upload_id: str, parts: list[tuple[int, str]],
                 key_fp: str) -> ObjectInfo:
        k = self.sse.by_fp(key_fp)
        a = self.requests.send("CompleteMultipartUpload", "POST", key,
                               query={"uploadId": upload_id},
                               headers={"content-type": "application/xml", **self.sse.headers(k)},
                               body=s3xml.complete_body(parts))
        if a.headers.get(ECHO_MD5):
            self.sse.check_write_echo(a, key, "CompleteMultipartUpload", k)
            self.sse.remember(key, self.sse.fp(k))
            return self.head(key)
        return self.sse.verify_by_head(key, k, "CompleteMultipartUpload")

    def abort(self, key: str, upload_id: str) -> None:
        """Best effort: the original error matters more than a failed abort."""
        try:
            self.requests.send("AbortMultipartUpload", "DELETE", key,
                               query={"uploadId": upload_id})
        except Exception:  # noqa: BLE001
            log.warning("could not abort multipart upload of %r", key)
