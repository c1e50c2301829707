"""S3Store: the store contract on S3, with SSE-C on every data and metadata request.

The façade the filesystem is given. It does the reads (HEAD, ranged GET) and the simple
writes and deletes itself, and composes the parts that own the other jobs:
  s3requests.Requests  sending a request, and what its failures and error answers mean;
  ssec.SseC            which key of the ring a request carries, and the checks that the
                       server applied SSE-C with it (writes and reads alike: a server may
                       serve a plaintext object to a GET that carries SSE-C headers);
  multipart.Multipart  multipart uploads; copies.Copies: server-side copies;
  listing.Listing      ListObjectsV2 pages;  probe.Probe: mount-time checks, diagnostics.
Requests go through client.Client (awscrt); nothing here parses HTTP or signs.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from . import s3xml
from ..crypto.keys import Key, KeyRing
from ..errors import KeyMismatch, NotFound, PermissionDenied, StoreError
from .client import Answer, Client, TransportFailure
from .contract import (DELETE_MAX, LIST_PAGE_MAX, LOCKED, OPEN, PLAINTEXT, Body, ObjectInfo,
                       Reader)
from .copies import Copies
from .listing import Listing
from .multipart import SINGLE_PUT_MAX, Multipart
from .probe import Probe
from .s3requests import AUTH_CODES, Requests, info_of
from .ssec import ECHO_MD5, SseC, meta_headers
from .transport import Transport, resolve_transport

log = logging.getLogger("ssecfs.store")


class S3Store:
    def __init__(self, bucket: str, ring: KeyRing, endpoint_url: str | None = None,
                 region: str | None = None, profile: str | None = None,
                 ca_bundle: str | None = None, workers: int = 8,
                 max_attempts: int = 5, connect_timeout: float = 5, stall_timeout: float = 600,
                 transport: Transport | None = None):
        # Resolved once (or given); the client is given exactly this.
        self.transport = t = transport or resolve_transport(
            endpoint_url, profile=profile, region=region, ca_bundle=ca_bundle)
        self.bucket = bucket
        self.ring = ring
        self.endpoint_url = t.url if t.custom else None
        self.wire = Client(t, bucket, max_attempts=max_attempts, connect_timeout=connect_timeout,
                           stall_timeout=stall_timeout, connections=max(48, 4 * workers))
        log.info("endpoint %s (%s), %s requests%s", t.url, t.where,
                 "virtual-hosted" if t.virtual_for(bucket) else "path-style",
                 f", through proxy {t.proxy_shown()}" if t.proxy else "")
        self.requests = Requests(self.wire, bucket)
        self.sse = SseC(ring, self.requests, self.endpoint_url)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3part")
        self.multipart = Multipart(self.requests, self.sse, self._pool, self.head)
        self.copies = Copies(self.wire, self.requests, self.sse, self.multipart,
                             self.get_range, self.upload)
        self.listing = Listing(self.requests)
        self.probe = Probe(self)

    def __repr__(self) -> str:
        return f"S3Store({self.bucket!r}, {self.endpoint_url!r})"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.wire.close()

    # -- reads --------------------------------------------------------------------------------
    def head_answer(self, key: str, k: Key | None) -> Answer:
        """The answer to a HEAD with key k (None: without SSE-C headers), whatever it is."""
        return self.requests.try_("HeadObject", "HEAD", key,
                                  headers=self.sse.headers(k) if k else None)

    def head(self, key: str, denied: Key | None = None) -> ObjectInfo:
        """denied: a key the caller already saw refused for this object (not asked again)."""
        last_denied = PermissionDenied(f"HeadObject {key!r}: access denied") if denied else None
        for k in self.ring.candidates(self.sse.hint(key)):
            if k is denied:
                continue
            a = self.head_answer(key, k)
            if a.status == 400:
                return self._head_plain(key)     # AWS: SSE-C headers on a plaintext object
            if a.status == 403:                  # (a HEAD has no body to say more)
                last_denied = PermissionDenied(f"HeadObject {key!r}: access denied (403)")
                continue
            if not a.ok:
                raise self.requests.status_error(a, "HeadObject", key)
            if not self.sse.echoed(a):
                return info_of(key, a, PLAINTEXT, None)
            self.sse.remember(key, self.sse.fp(k))
            return info_of(key, a, OPEN, self.sse.fp(k))
        # No key opens it: still report it (listing works without a key) so it lists.
        listed = self.listing.one(key)
        if listed is None:
            raise last_denied or NotFound(key)
        self.sse.remember(key, None)
        return ObjectInfo(key=key, size=listed.size, etag=listed.etag, mtime=listed.mtime,
                          access=LOCKED)

    def _head_plain(self, key: str) -> ObjectInfo:
        return info_of(key, self.requests.send("HeadObject", "HEAD", key), PLAINTEXT, None)

    def head_many(self, keys: list[str], each=None) -> dict:
        """HEAD of many keys at once, without a thread waiting for each: {key: ObjectInfo or
        the exception head() would raise}; each(key, that) is called as each answer comes.
        Each is asked with the key of the ring that opened it last (else the current one);
        an answer that is not a plain yes or no (an object under another key, plaintext, an
        error) is asked again through head()."""
        out, sent = {}, {}

        def settle(key, value):
            out[key] = value
            if each is not None:
                each(key, value)
        for key in keys:
            k = self.sse.hinted(key)
            try:
                sent[self.wire.submit("HeadObject", "HEAD", key,
                                      headers=self.sse.headers(k))] = (key, k)
            except TransportFailure as e:
                settle(key, self.requests.failure(e, "HeadObject", key))
        while sent:
            done, _ = futures.wait(sent, timeout=1.0, return_when=futures.FIRST_COMPLETED)
            for fut in done or [next(iter(sent))]:      # none done: check the oldest stalls
                if not fut.done() and not self.wire.stalled(fut):
                    continue
                key, k = sent.pop(fut)
                settle(key, self._head_of(key, k, fut))
        return out

    def _head_of(self, key: str, k: Key, fut) -> ObjectInfo | Exception:
        try:
            a = self.wire.wait(fut)
        except TransportFailure as e:
            return self.requests.failure(e, "HeadObject", key)
        if a.ok and self.sse.opened_by(a, k):
            self.sse.remember(key, self.sse.fp(k))
            return info_of(key, a, OPEN, self.sse.fp(k))
        if a.status == 404:
            return NotFound(key)
        try:
            return self.head(key, denied=k if a.status == 403 else None)
        except Exception as e:  # noqa: BLE001 - the caller gets it per key
            return e

    def head_with_start(self, key: str, nbytes: int) -> ObjectInfo:
        """head(), plus the object's first nbytes in info.start when one ranged GET can tell
        both: a small file looked up and then read costs one round trip, not two. Anything
        unusual (another key, a plaintext or empty object, an odd answer) is left to
        head()."""
        k = self.sse.hinted(key)
        a = self.requests.try_("GetObject", "GET", key,
                               headers={"range": f"bytes=0-{nbytes - 1}", **self.sse.headers(k)})
        if a.status == 404:
            raise NotFound(f"GetObject {key!r}")
        if a.status == 403 and s3xml.error_code(a.body)[0] not in AUTH_CODES:
            return self.head(key, denied=k)      # not this key: the others, or LOCKED
        if a.status == 403:
            raise self.requests.status_error(a, "GetObject", key)
        if not a.ok or a.status not in (200, 206) or not self.sse.opened_by(a, k):
            return self.head(key)
        body = bytes(a.body)
        size = len(body)
        if a.status == 206:
            total = a.headers.get("content-range", "").rpartition("/")[2]
            if not total.isdigit():
                return self.head(key)
            size = int(total)
        if size < len(body):
            return self.head(key)
        self.sse.remember(key, self.sse.fp(k))
        return replace(info_of(key, a, OPEN, self.sse.fp(k)), size=size, start=body)

    def get_range(self, key: str, start: int, length: int, key_fp: str | None,
                  etag: str | None = None, shared: bool = False) -> bytes:
        """Plaintext bytes [start, start + length) of the object. shared=True: a big body may
        come back as pooled receive buffers (buffers.Segments, not copied again): the
        caller reads it through memoryviews (store.pieces) and drops them when done.
        Otherwise the answer is bytes."""
        if length <= 0:
            return b""
        k = self.sse.by_fp(key_fp)
        h = self.sse.headers(k)
        if etag:
            h["if-match"] = f'"{etag}"'
        try:
            a = self.wire.get(key, start, length, h, shared=shared)
        except TransportFailure as e:
            raise self.requests.failure(e, "GetObject", key) from None
        if not a.ok:
            raise self.requests.status_error(a, "GetObject", key)
        if not self.sse.opened_by(a, k):
            log.warning("%r was served without SSE-C (a plaintext object): refused", key)
            raise KeyMismatch(f"{key!r} is not encrypted with SSE-C: refused")
        return a.body

    # -- writes -------------------------------------------------------------------------------
    def put(self, key: str, data: Body, metadata: dict) -> ObjectInfo:
        out = self.put_many([(key, data, metadata)])[0]
        if isinstance(out, Exception):
            raise out
        return out

    def put_many(self, items: list[tuple[str, Body, dict]]) -> list:
        """put of each (key, data, metadata), all the requests in flight at once, without a
        thread each: in order, the ObjectInfo of each or the error its put would raise."""
        k = self.ring.current
        out: list = [None] * len(items)
        sent = []
        for n, (key, data, metadata) in enumerate(items):
            h = {**meta_headers(self.sse.meta(metadata, k), "PutObject", key),
                 **self.sse.headers(k)}
            try:
                sent.append((n, self.wire.submit("PutObject", "PUT", key, headers=h, body=data)))
            except TransportFailure as e:
                out[n] = self.requests.failure(e, "PutObject", key)
        for n, fut in sent:
            key, data, metadata = items[n]
            try:
                a = self.wire.wait(fut)
                if not a.ok:
                    raise self.requests.status_error(a, "PutObject", key)
                out[n] = self._put_done(a, key, data, metadata, k)
            except TransportFailure as e:
                out[n] = self.requests.failure(e, "PutObject", key)
            except Exception as e:  # noqa: BLE001 - handed back, as put raises it
                out[n] = e
        return out

    def _put_done(self, a: Answer, key: str, data: Body, metadata: dict, k: Key) -> ObjectInfo:
        if not (key.endswith("/") and not data and not a.headers.get(ECHO_MD5)):
            # A zero-byte directory marker holds no data; SeaweedFS stores it as a filer
            # directory and does not echo SSE-C for it. Everything else must be confirmed.
            self.sse.check_write_echo(a, key, "PutObject", k)
        self.sse.remember(key, self.sse.fp(k))
        return ObjectInfo(key=key, size=len(data), etag=a.headers.get("etag", "").strip('"'),
                          mtime=0.0, metadata=dict(metadata), access=OPEN, key_fp=self.sse.fp(k))

    def upload(self, key: str, size: int, reader: Reader, metadata: dict) -> ObjectInfo:
        """Up to SINGLE_PUT_MAX one PutObject, else a multipart upload (Multipart.upload)."""
        if size <= SINGLE_PUT_MAX:
            return self.put(key, reader(0, size), metadata)
        return self.multipart.upload(key, size, reader, metadata)

    def mpu_begin(self, key: str, metadata: dict) -> tuple[str, str]:
        return self.multipart.begin(key, metadata)

    def mpu_part(self, key: str, upload_id: str, number: int, body: Body, key_fp: str) -> str:
        return self.multipart.part(key, upload_id, number, body, key_fp)

    def mpu_complete(self, key: str, upload_id: str, parts: list[tuple[int, str]],
                     key_fp: str) -> ObjectInfo:
        return self.multipart.complete(key, upload_id, parts, key_fp)

    def mpu_abort(self, key: str, upload_id: str) -> None:
        self.multipart.abort(key, upload_id)

    def copy(self, src: str, dst: str, size: int, metadata: dict,
             src_key_fp: str | None, src_etag: str | None = None) -> ObjectInfo:
        """Server-side copy, re-encrypted under the current key (copies.Copies.copy)."""
        return self.copies.copy(src, dst, size, metadata, src_key_fp, src_etag)

    def copy_as_is(self, src: str, dst: str, size: int) -> ObjectInfo:
        """Copy keeping the metadata, assuming the source is under the current key (one
        request, no HEAD first). PermissionDenied if it is not; NotSupported above COPY_MAX."""
        return self.copies.copy_as_is(src, dst, size)

    def copy_as_is_many(self, items: list[tuple[str, str, int]]) -> list:
        """copy_as_is of each (src, dst, size), all at once: each one's ObjectInfo or error."""
        return self.copies.copy_as_is_many(items)

    # -- deletes and listings -------------------------------------------------------------------
    def delete(self, key: str) -> None:
        self.requests.send("DeleteObject", "DELETE", key)     # S3: 204 whether or not it existed
        self.sse.remember(key, None)

    def delete_many(self, keys: list[str]) -> None:
        for i in range(0, len(keys), DELETE_MAX):
            batch = keys[i:i + DELETE_MAX]
            body = s3xml.delete_body(batch)
            md5 = base64.b64encode(hashlib.md5(body).digest()).decode()   # S3 requires it
            a = self.requests.send("DeleteObjects", "POST", None, query={"delete": None},
                                   body=body,
                                   headers={"content-md5": md5, "content-type": "application/xml"})
            errs = s3xml.delete_errors(a.body)
            if errs:
                raise StoreError(f"DeleteObjects: {len(errs)} keys not deleted "
                                 f"(first {errs[0]['Key']!r}: {errs[0]['Code']})")
            for k in batch:
                self.sse.remember(k, None)

    def list_page_iter(self, prefix: str, delimiter: str | None = "/",
                       max_keys: int = LIST_PAGE_MAX, start_after: str | None = None):
        return self.listing.pages(prefix, delimiter, max_keys, start_after)

    # -- mount-time checks and diagnostics (probe.Probe) ----------------------------------------
    def check_bucket(self) -> None:
        self.probe.check_bucket()

    def probe_sse(self, probe_key: str) -> None:
        self.probe.probe_sse(probe_key)

    def ssec_blocked(self) -> bool:
        return self.probe.ssec_blocked()

    def head_with(self, key: str, k: Key | None) -> tuple[str, ObjectInfo | None]:
        return self.probe.head_with(key, k)

    def get_status(self, key: str, k: Key | None) -> int:
        return self.probe.get_status(key, k)

    def server_time_skew(self) -> float | None:
        return self.probe.server_time_skew()
