"""The S3 implementation of the store: what ssecfs asks of S3, and what it verifies.

Every data/metadata request carries SSE-C headers of a ring key. What the service did is
verified: a write must echo AES256 and our key MD5 (CopyObject and CompleteMultipartUpload
answers that carry no echo are verified with a HEAD under the destination key), and so must a
read (a server may serve a plaintext object to a GET that carries SSE-C headers). Errors are
translated to domain errors here, from the S3 error code in the answer's body where S3 puts
one (a HEAD has no body: by status); throttling, 5xx and connection failures have been
retried by the transport and surface as StoreUnavailable.

Requests go through transport.Client (awscrt); nothing here parses HTTP or signs.

Lock order: _hint_lock is a leaf lock (guards _key_hint only).
"""

from __future__ import annotations

import base64
import calendar
import email.utils
import hashlib
import logging
import threading
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from cachetools import LRUCache

from . import s3xml
from ..errors import (EncryptionNotApplied, KeyMismatch, NotFound, NotSupported,
                     PermissionDenied, Stale, StoreError, StoreUnavailable, SecurityRefusal,
                     StoreSetupError)
from ..crypto.keys import Key, KeyRing
from .contract import LOCKED, OPEN, PLAINTEXT, Body, ListedObject, ListPage, ObjectInfo, Reader
from .transport import (Answer, Client, Transport,
                        TransportFailure, resolve_transport)

log = logging.getLogger("ssecfs.store")

MiB = 1024 * 1024
SINGLE_PUT_MAX = 16 * MiB
MIN_PART = 8 * MiB
MAX_PARTS = 10000
COPY_MAX = 5 * 1024 * MiB
KEY_FP_META = "ssecfs-key"
PROBE_DATA = b"ssecfs probe\n"   # probe_sse writes it with the key, must not read it without
SSEC_BLOCKED_HINT = ("the bucket blocks SSE-C writes: the bucket owner must allow SSE-C in the "
                     "bucket's default encryption settings (remove SSE-C from its blocked "
                     "encryption types)")
ECHO_MD5 = "x-amz-server-side-encryption-customer-key-md5"
ECHO_ALG = "x-amz-server-side-encryption-customer-algorithm"
# 403s that are about the request's credentials or signature, not about the object's key
AUTH_CODES = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "ExpiredToken", "InvalidToken",
              "TokenRefreshRequired", "AuthorizationHeaderMalformed", "RequestTimeTooSkewed",
              "InvalidSecurity", "MissingSecurityHeader"}
BUSY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
              "RequestLimitExceeded", "ServiceUnavailable", "InternalError"}


_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}


def _http_date(value: str | None) -> float | None:
    """An HTTP date header as epoch seconds (None if absent or unreadable). Two of them in
    every answer: the usual form ("Sun, 06 Nov 1994 08:49:37 GMT") is read directly (the
    email package takes ten times as long), anything else by the email package."""
    if not value:
        return None
    p = value.split()
    if len(p) == 6 and p[5] == "GMT" and p[2] in _MONTHS:
        try:
            hh, mm, ss = p[4].split(":")
            return float(calendar.timegm((int(p[3]), _MONTHS[p[2]], int(p[1]),
                                          int(hh), int(mm), int(ss))))
        except ValueError:
            pass
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def _header_safe(text: str) -> bool:
    """Sendable as an HTTP header as it is: printable ASCII, no surrounding blanks."""
    return text.isascii() and text.isprintable() and text == text.strip()


def _echo_fps(value: str | None) -> set[str]:
    # Some servers send the header twice (SeaweedFS: "md5, md5" once joined).
    return {v.strip() for v in value.split(",") if v.strip()} if value else set()


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
        self._key_hint: LRUCache = LRUCache(maxsize=100_000)
        # Key -> (fingerprint, SSE-C headers), each an MD5 and base64 to make: made once per key
        self._memo: dict = {}
        self._hint_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3part")
        self._upc_unsupported = False

    def __repr__(self) -> str:
        return f"S3Store({self.bucket!r}, {self.endpoint_url!r})"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.wire.close()

    # -- requests and error translation ---------------------------------------------------
    def _failure(self, e: TransportFailure, op: str, key: str) -> Exception:
        where = f"{op} {key!r}"
        if e.no_credentials:
            return StoreError(f"{where}: no AWS credentials found")
        if e.credentials:
            return StoreError(f"{where}: AWS credentials unavailable ({e.name})")
        if e.tls:
            return StoreUnavailable(f"{where}: TLS failed ({e.name})")
        if e.code == "RequestTimeTooSkewed":
            return StoreError(f"{where}: RequestTimeTooSkewed (this host's clock is off)")
        if e.code:
            return StoreUnavailable(f"{where}: {e.code} (retried)")
        return StoreUnavailable(f"{where}: {e.name}")

    def _status_error(self, a: Answer, op: str, key: str) -> Exception:
        where = f"{op} {key!r}"
        code, message = s3xml.error_code(a.body)
        st = a.status
        if code in AUTH_CODES:
            return StoreError(f"{where}: credentials refused ({code})")
        if code == "NoSuchBucket":
            return StoreError(f"{where}: bucket {self.bucket!r} does not exist")
        if st == 404 or code in ("NoSuchKey", "NotFound"):
            return NotFound(where)
        if st == 412 or code == "PreconditionFailed":
            return Stale(f"{where}: object changed while reading")
        if st == 403 and self._mentions_ssec_block(message):
            return PermissionDenied(f"{where}: {SSEC_BLOCKED_HINT}")
        if st == 403:
            return PermissionDenied(f"{where}: access denied ({code or st})")
        if st == 501 or code == "NotImplemented":
            return NotSupported(f"{where}: not implemented by the server")
        if st >= 500 or code in BUSY_CODES:
            return StoreUnavailable(f"{where}: {code or st}")
        return StoreError(f"{where}: {code or st}")

    @staticmethod
    def _mentions_ssec_block(message: str) -> bool:
        msg = message.lower()
        return "encryption" in msg and ("sse-c" in msg or "customer" in msg or "blocked" in msg)

    def _try(self, op: str, method: str, key: str | None, **kw) -> Answer:
        """A request whose every HTTP answer the caller looks at itself."""
        try:
            return self.wire.send(op, method, key, **kw)
        except TransportFailure as e:
            raise self._failure(e, op, key or "") from None

    def _send(self, op: str, method: str, key: str | None, **kw) -> Answer:
        """A request that must succeed (2xx), else its translated error."""
        a = self._try(op, method, key, **kw)
        if not a.ok:
            raise self._status_error(a, op, key or "")
        return a

    # -- key choice -----------------------------------------------------------------------------
    def _memo_of(self, k: Key) -> tuple[str, dict]:
        m = self._memo.get(k)
        if m is None:
            m = self._memo[k] = (k.fingerprint, k.sse_headers())
        return m

    def _fp(self, k: Key) -> str:
        return self._memo_of(k)[0]

    def _sse(self, k: Key) -> dict:
        """k's SSE-C headers (a fresh dict the caller may add to)."""
        return dict(self._memo_of(k)[1])

    def _copy_source_sse(self, k: Key) -> dict:
        return {"x-amz-copy-source-" + n[len("x-amz-"):]: v for n, v in self._memo_of(k)[1].items()}

    def _hint(self, key: str) -> str | None:
        with self._hint_lock:
            return self._key_hint.get(key)

    def _remember(self, key: str, fp: str | None) -> None:
        with self._hint_lock:
            if fp:
                self._key_hint[key] = fp
            else:
                self._key_hint.pop(key, None)

    def _check_write_echo(self, a: Answer, key: str, op: str, want: Key) -> None:
        echoed = _echo_fps(a.headers.get(ECHO_MD5))
        alg = _echo_fps(a.headers.get(ECHO_ALG))
        if echoed != {self._fp(want)} or alg != {"AES256"}:
            log.error("endpoint %s did not confirm SSE-C with our key on %s of %r; "
                      "treating the write as failed", self.endpoint_url or "AWS", op, key)
            raise EncryptionNotApplied(f"{op} {key!r}: server did not apply SSE-C")

    def _verify_by_head(self, key: str, want: Key, op: str) -> ObjectInfo:
        """For answers that carry no echo (CopyObject, CompleteMultipartUpload on some
        servers): HEAD with the key; only an echo of our key MD5 proves the encryption."""
        a = self._send("HeadObject", "HEAD", key, headers=self._sse(want))
        if _echo_fps(a.headers.get(ECHO_MD5)) != {self._fp(want)}:
            log.error("endpoint %s stored %r without SSE-C after %s", self.endpoint_url or "AWS",
                      key, op)
            raise EncryptionNotApplied(f"{op} {key!r}: server did not apply SSE-C")
        self._remember(key, self._fp(want))
        return self._info(key, a, OPEN, self._fp(want))

    @staticmethod
    def _info(key: str, a: Answer, access: str, fp: str | None) -> ObjectInfo:
        h = a.headers
        return ObjectInfo(key=key, size=int(h.get("content-length", 0) or 0),
                          etag=h.get("etag", "").strip('"'),
                          mtime=_http_date(h.get("last-modified")) or 0.0,
                          metadata={n[len("x-amz-meta-"):]: v for n, v in h.items()
                                    if n.startswith("x-amz-meta-")},
                          access=access, key_fp=fp, observed=_http_date(h.get("date")))

    # -- reads --------------------------------------------------------------------------------
    def _head_answer(self, key: str, k: Key | None) -> Answer:
        return self._try("HeadObject", "HEAD", key, headers=self._sse(k) if k else None)

    def head(self, key: str, denied: Key | None = None) -> ObjectInfo:
        """denied: a key the caller already saw refused for this object (not asked again)."""
        last_denied = PermissionDenied(f"HeadObject {key!r}: access denied") if denied else None
        for k in self.ring.candidates(self._hint(key)):
            if k is denied:
                continue
            a = self._head_answer(key, k)
            if a.status == 400:
                return self._head_plain(key)     # AWS: SSE-C headers on a plaintext object
            if a.status == 403:                  # (a HEAD has no body to say more)
                last_denied = PermissionDenied(f"HeadObject {key!r}: access denied (403)")
                continue
            if not a.ok:
                raise self._status_error(a, "HeadObject", key)
            if not _echo_fps(a.headers.get(ECHO_MD5)):
                return self._info(key, a, PLAINTEXT, None)
            self._remember(key, self._fp(k))
            return self._info(key, a, OPEN, self._fp(k))
        # No key opens it: still report it (listing works without a key) so it lists.
        listed = self._list_one(key)
        if listed is None:
            raise last_denied or NotFound(key)
        self._remember(key, None)
        return ObjectInfo(key=key, size=listed.size, etag=listed.etag, mtime=listed.mtime,
                          access=LOCKED)

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
            k = self.ring.by_fingerprint(self._hint(key)) or self.ring.current
            try:
                sent[self.wire.submit("HeadObject", "HEAD", key, headers=self._sse(k))] = (key, k)
            except TransportFailure as e:
                settle(key, self._failure(e, "HeadObject", key))
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
            return self._failure(e, "HeadObject", key)
        if a.ok and _echo_fps(a.headers.get(ECHO_MD5)) == {self._fp(k)}:
            self._remember(key, self._fp(k))
            return self._info(key, a, OPEN, self._fp(k))
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
        k = self.ring.by_fingerprint(self._hint(key)) or self.ring.current
        a = self._try("GetObject", "GET", key,
                      headers={"range": f"bytes=0-{nbytes - 1}", **self._sse(k)})
        if a.status == 404:
            raise NotFound(f"GetObject {key!r}")
        if a.status == 403 and s3xml.error_code(a.body)[0] not in AUTH_CODES:
            return self.head(key, denied=k)      # not this key: the others, or LOCKED
        if a.status == 403:
            raise self._status_error(a, "GetObject", key)
        if not a.ok or a.status not in (200, 206) or \
                _echo_fps(a.headers.get(ECHO_MD5)) != {self._fp(k)}:
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
        self._remember(key, self._fp(k))
        return replace(self._info(key, a, OPEN, self._fp(k)), size=size, start=body)

    def _head_plain(self, key: str) -> ObjectInfo:
        return self._info(key, self._send("HeadObject", "HEAD", key), PLAINTEXT, None)

    def _list_one(self, key: str) -> ListedObject | None:
        for page in self.list_page_iter(key, delimiter=None, max_keys=1):
            for o in page.objects:
                if o.key == key:
                    return o
            return None
        return None

    def get_range(self, key: str, start: int, length: int, key_fp: str | None,
                  etag: str | None = None, shared: bool = False) -> bytes:
        """Plaintext bytes [start, start + length) of the object. shared=True: a big body may
        come back as pooled receive buffers (buffers.Segments, not copied again): the
        caller reads it through memoryviews (store.pieces) and drops them when done.
        Otherwise the answer is bytes."""
        if length <= 0:
            return b""
        k = self.ring.by_fingerprint(key_fp) or self.ring.current
        h = self._sse(k)
        if etag:
            h["if-match"] = f'"{etag}"'
        try:
            a = self.wire.get(key, start, length, h, shared=shared)
        except TransportFailure as e:
            raise self._failure(e, "GetObject", key) from None
        if not a.ok:
            raise self._status_error(a, "GetObject", key)
        if _echo_fps(a.headers.get(ECHO_MD5)) != {self._fp(k)}:
            log.warning("%r was served without SSE-C (a plaintext object): refused", key)
            raise KeyMismatch(f"{key!r} is not encrypted with SSE-C: refused")
        return a.body

    # -- writes -------------------------------------------------------------------------------
    def _meta(self, metadata: dict, k: Key) -> dict:
        return {**{str(a): str(b) for a, b in metadata.items()}, KEY_FP_META: self._fp(k)}

    @staticmethod
    def _meta_headers(meta: dict, op: str, key: str) -> dict:
        for name, value in meta.items():
            if not _header_safe(name) or not _header_safe(value):
                raise NotSupported(f"{op} {key!r}: metadata {name!r} is not printable ASCII")
        return {f"x-amz-meta-{a}": b for a, b in meta.items()}

    def put(self, key: str, data: Body, metadata: dict) -> ObjectInfo:
        k = self.ring.current
        h = {**self._meta_headers(self._meta(metadata, k), "PutObject", key), **self._sse(k)}
        a = self._send("PutObject", "PUT", key, headers=h, body=data)
        if not (key.endswith("/") and not data and not a.headers.get(ECHO_MD5)):
            # A zero-byte directory marker holds no data; SeaweedFS stores it as a filer
            # directory and does not echo SSE-C for it. Everything else must be confirmed.
            self._check_write_echo(a, key, "PutObject", k)
        self._remember(key, self._fp(k))
        return ObjectInfo(key=key, size=len(data), etag=a.headers.get("etag", "").strip('"'),
                          mtime=0.0, metadata=dict(metadata), access=OPEN, key_fp=self._fp(k))

    @staticmethod
    def part_size_for(size: int) -> int:
        ps = MIN_PART
        while size > ps * MAX_PARTS:
            ps *= 2
        return ps

    def upload(self, key: str, size: int, reader: Reader, metadata: dict) -> ObjectInfo:
        """Up to SINGLE_PUT_MAX one PutObject, else a multipart upload of read-unit parts,
        each read (reader) and sent by this store's threads (awscrt's threads never call the
        reader: it may decrypt the cache or fetch from the store itself)."""
        if size <= SINGLE_PUT_MAX:
            return self.put(key, reader(0, size), metadata)
        ps = self.part_size_for(size)
        n = (size + ps - 1) // ps

        def part(i: int, up_id: str, k: Key):
            off = i * ps
            body = reader(off, min(ps, size - off))
            return self._upload_part(key, up_id, i + 1, body, k)

        return self._multipart(key, metadata, n, part)

    def _upload_part(self, key: str, up_id: str, num: int, body: Body, k: Key) -> dict:
        a = self._send("UploadPart", "PUT", key, query={"partNumber": str(num), "uploadId": up_id},
                       headers=self._sse(k), body=body)
        self._check_write_echo(a, key, "UploadPart", k)
        etag = a.headers.get("etag")
        if not etag:
            raise StoreError(f"UploadPart {key!r}: the answer has no ETag")
        return {"PartNumber": num, "ETag": etag}

    def _multipart(self, key: str, metadata: dict, nparts: int, part_fn) -> ObjectInfo:
        up_id, fp = self.mpu_begin(key, metadata)
        k = self.ring.by_fingerprint(fp)
        futs = []
        try:
            # Bounded window: at most 2x workers parts in flight (memory stays bounded).
            parts, window = [], 2 * self._pool._max_workers
            for i in range(nparts):
                futs.append(self._pool.submit(part_fn, i, up_id, k))
                if len(futs) >= window:
                    parts.append(futs.pop(0).result())
            parts.extend(f.result() for f in futs)
            return self.mpu_complete(key, up_id, [(p["PartNumber"], p["ETag"]) for p in parts], fp)
        except BaseException:
            for f in futs:
                f.cancel()
            self.mpu_abort(key, up_id)
            raise

    # -- multipart uploads driven by the caller (a file uploaded while it is being written) ----
    def mpu_begin(self, key: str, metadata: dict) -> tuple[str, str]:
        """CreateMultipartUpload under the current key: (upload id, key fingerprint)."""
        k = self.ring.current
        h = {**self._meta_headers(self._meta(metadata, k), "CreateMultipartUpload", key),
             **self._sse(k)}
        a = self._send("CreateMultipartUpload", "POST", key, query={"uploads": None}, headers=h)
        up_id = s3xml.upload_id(a.body)
        if not up_id:
            raise StoreError(f"CreateMultipartUpload {key!r}: the answer has no UploadId")
        return up_id, self._fp(k)

    def mpu_part(self, key: str, upload_id: str, number: int, body: Body, key_fp: str) -> str:
        """UploadPart (the echo is checked); returns the part's ETag."""
        k = self.ring.by_fingerprint(key_fp) or self.ring.current
        return self._upload_part(key, upload_id, number, body, k)["ETag"]

    def mpu_complete(self, key: str, upload_id: str, parts: list[tuple[int, str]],
                     key_fp: str) -> ObjectInfo:
        k = self.ring.by_fingerprint(key_fp) or self.ring.current
        a = self._send("CompleteMultipartUpload", "POST", key, query={"uploadId": upload_id},
                       headers={"content-type": "application/xml", **self._sse(k)},
                       body=s3xml.complete_body(parts))
        if a.headers.get(ECHO_MD5):
            self._check_write_echo(a, key, "CompleteMultipartUpload", k)
            self._remember(key, self._fp(k))
            return self.head(key)
        return self._verify_by_head(key, k, "CompleteMultipartUpload")

    def mpu_abort(self, key: str, upload_id: str) -> None:
        """Best effort: the original error matters more than a failed abort."""
        try:
            self._send("AbortMultipartUpload", "DELETE", key, query={"uploadId": upload_id})
        except Exception:  # noqa: BLE001
            log.warning("could not abort multipart upload of %r", key)

    # -- copies -------------------------------------------------------------------------------
    def _copy_headers(self, src: str, sk: Key, dk: Key, meta: dict | None, dst: str) -> dict:
        """CopyObject's headers: meta given, REPLACE the metadata, else COPY it."""
        h = {"x-amz-copy-source": self.wire.copy_source(src),
             "x-amz-metadata-directive": "COPY" if meta is None else "REPLACE",
             **self._copy_source_sse(sk), **self._sse(dk)}
        if meta is not None:
            h.update(self._meta_headers(meta, "CopyObject", dst))
        return h

    def _copied(self, a: Answer, dst: str, size: int, metadata: dict, k: Key) -> ObjectInfo:
        result = s3xml.parse_copy_result(a.body)
        if result is None:
            raise StoreError(f"CopyObject {dst!r}: the answer is no CopyObjectResult")
        if a.headers.get(ECHO_MD5):
            self._check_write_echo(a, dst, "CopyObject", k)
            self._remember(dst, self._fp(k))
            return ObjectInfo(key=dst, size=size, etag=result["ETag"].strip('"'), mtime=0.0,
                              metadata=dict(metadata), access=OPEN, key_fp=self._fp(k))
        return self._verify_by_head(dst, k, "CopyObject")

    def copy(self, src: str, dst: str, size: int, metadata: dict,
             src_key_fp: str | None, src_etag: str | None = None) -> ObjectInfo:
        """Server-side copy, decrypting with the source's key and encrypting with the current
        key (this is where old-key objects are re-encrypted). Objects over 5 GiB use
        UploadPartCopy, falling back to a streamed re-upload where the server refuses it."""
        sk = self.ring.by_fingerprint(src_key_fp) or self.ring.current
        dk = self.ring.current
        if size > COPY_MAX:
            return self._copy_multipart(src, dst, size, metadata, sk)
        h = self._copy_headers(src, sk, dk, self._meta(metadata, dk), dst)
        if src_etag:
            h["x-amz-copy-source-if-match"] = f'"{src_etag}"'
        a = self._send("CopyObject", "PUT", dst, headers=h)
        return self._copied(a, dst, size, metadata, dk)

    def copy_as_is(self, src: str, dst: str, size: int) -> ObjectInfo:
        """Copy keeping the metadata, assuming the source is under the current key (one
        request, no HEAD first). PermissionDenied if it is not; NotSupported above 5 GiB."""
        if size > COPY_MAX:
            raise NotSupported("copy_as_is: object over 5 GiB")
        k = self.ring.current
        hint = self._hint(src)
        if (hint and hint != self._fp(k)) or (len(self.ring) > 1 and hint is None):
            # with several keys, guessing wrong costs more than a HEAD (SeaweedFS answers a
            # copy with the wrong source key with 500, which is retried)
            raise PermissionDenied(f"{src!r}: key not known")
        a = self._try("CopyObject", "PUT", dst, headers=self._copy_headers(src, k, k, None, dst))
        if a.status in (400, 403) and s3xml.error_code(a.body)[0] not in AUTH_CODES:
            raise PermissionDenied(f"CopyObject {src!r}: not under the current key")
        if not a.ok:
            raise self._status_error(a, "CopyObject", dst)
        return self._copied(a, dst, size, {}, k)

    def _copy_multipart(self, src: str, dst: str, size: int, metadata: dict, sk: Key) -> ObjectInfo:
        ps = max(self.part_size_for(size), 512 * MiB)
        n = (size + ps - 1) // ps
        if not self._upc_unsupported:
            def part(i, up_id, k):
                lo, hi = i * ps, min(size, (i + 1) * ps) - 1
                h = {"x-amz-copy-source": self.wire.copy_source(src),
                     "x-amz-copy-source-range": f"bytes={lo}-{hi}",
                     **self._copy_source_sse(sk), **self._sse(k)}
                a = self._send("UploadPartCopy", "PUT", dst, headers=h,
                               query={"partNumber": str(i + 1), "uploadId": up_id})
                result = s3xml.parse_copy_result(a.body, "CopyPartResult")
                if result is None:
                    raise StoreError(f"UploadPartCopy {dst!r}: the answer is no CopyPartResult")
                return {"PartNumber": i + 1, "ETag": result["ETag"]}
            try:
                return self._multipart(dst, metadata, n, part)
            except NotSupported:
                self._upc_unsupported = True
                log.warning("server refuses UploadPartCopy with SSE-C; copying %r by streaming "
                            "it through this host (logged once)", src)
        src_fp = self._fp(sk)
        return self.upload(dst, size, lambda off, ln: self.get_range(src, off, ln, src_fp), metadata)

    # -- deletes and listings -------------------------------------------------------------------
    def delete(self, key: str) -> None:
        self._send("DeleteObject", "DELETE", key)     # S3: 204 whether or not it existed
        self._remember(key, None)

    def delete_many(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            body = s3xml.delete_body(batch)
            md5 = base64.b64encode(hashlib.md5(body).digest()).decode()   # S3 requires it
            a = self._send("DeleteObjects", "POST", None, query={"delete": None}, body=body,
                           headers={"content-md5": md5, "content-type": "application/xml"})
            errs = s3xml.delete_errors(a.body)
            if errs:
                raise StoreError(f"DeleteObjects: {len(errs)} keys not deleted "
                                 f"(first {errs[0]['Key']!r}: {errs[0]['Code']})")
            for k in batch:
                self._remember(k, None)

    def list_page_iter(self, prefix: str, delimiter: str | None = "/", max_keys: int = 1000,
                       start_after: str | None = None):
        """Pages of ListObjectsV2 (keys after start_after only, if given)."""
        q = {"list-type": "2", "prefix": prefix, "max-keys": str(max_keys),
             "encoding-type": "url"}
        if delimiter:
            q["delimiter"] = delimiter
        if start_after:
            q["start-after"] = start_after
        while True:
            a = self._send("ListObjectsV2", "GET", None, query=q)
            try:
                resp = s3xml.parse_list_v2(a.body)
            except ValueError:
                raise StoreError(f"ListObjectsV2 {prefix!r}: the answer is not a listing") from None
            objs = [ListedObject(key=o["Key"], size=o["Size"], etag=o["ETag"].strip('"'),
                                 mtime=o["LastModified"].timestamp() if o["LastModified"] else 0.0)
                    for o in resp["Contents"]]
            yield ListPage(objs, [p["Prefix"] for p in resp["CommonPrefixes"]])
            token = resp["NextContinuationToken"]
            if max_keys < 1000 or not resp["IsTruncated"] or not token:
                return
            q["continuation-token"] = token

    # -- mount-time checks --------------------------------------------------------------------
    def check_bucket(self) -> None:
        """The bucket exists and the credentials may list it (ListObjectsV2, one key: unlike
        HeadBucket its refusal says why in an error code). The first attempt is not retried
        when no answer comes (refused, unresolvable, TLS verification failed: retrying those
        only delays the one line the user needs); a 5xx or throttling answer is."""
        at = self.endpoint_url or "AWS"
        q = {"list-type": "2", "max-keys": "1"}
        once = Client(self.transport, self.bucket, max_attempts=1, connections=1)
        try:
            a = once.send("ListObjectsV2", "GET", None, query=q)
            if a.status >= 500 or s3xml.error_code(a.body)[0] in BUSY_CODES:
                a = self.wire.send("ListObjectsV2", "GET", None, query=q)
        except TransportFailure as e:
            if e.no_credentials:
                raise StoreSetupError("no AWS credentials found (environment, profile or config "
                                      "files)") from None
            if e.credentials:
                raise StoreSetupError(f"AWS credentials could not be obtained ({e.name}; see the "
                                      "log)") from None
            if e.tls:
                raise StoreSetupError(f"TLS verification failed for {self.transport.url} "
                                      f"({e.name}); use --ca-bundle for a private CA") from None
            raise StoreSetupError(f"endpoint {at} unreachable ({e.name})") from None
        finally:
            once.close()
        if a.ok:
            return
        code = s3xml.error_code(a.body)[0]
        if a.status == 404 or code == "NoSuchBucket":
            raise StoreSetupError(f"bucket {self.bucket!r} does not exist at {at}")
        if a.status == 403:
            raise StoreSetupError(f"credentials refused for bucket {self.bucket!r} ({code or 403})")
        raise StoreSetupError(f"bucket {self.bucket!r}: {code or a.status}")

    def probe_sse(self, probe_key: str) -> None:
        """Prove the endpoint enforces SSE-C: write a probe with the key, then a GET without
        the key must be refused. Removes the probe afterwards."""
        k = self.ring.current
        try:
            self.put(probe_key, PROBE_DATA, {})
        except EncryptionNotApplied:
            raise SecurityRefusal(f"endpoint {self.endpoint_url or 'AWS'} does not apply SSE-C "
                            "(no key echo on PUT): refusing to mount") from None
        except PermissionDenied as e:
            if self.ssec_blocked():
                raise StoreSetupError(f"bucket {self.bucket!r}: {SSEC_BLOCKED_HINT}") from None
            raise StoreSetupError(f"cannot write to bucket {self.bucket!r}: {e}") from None
        except (StoreError, StoreUnavailable) as e:
            raise StoreSetupError(f"cannot write to bucket {self.bucket!r}: {e}") from None
        try:
            a = self._try("GetObject", "GET", probe_key)
            served = bytes(a.body) if a.ok else None
            if served == PROBE_DATA:
                raise SecurityRefusal(f"endpoint {self.endpoint_url or 'AWS'} serves SSE-C objects "
                                "without the key: refusing to mount")
            if served is not None:
                # Served, but not the plaintext (the stored, encrypted bytes): no secret is
                # revealed, so mount, and say so.
                log.warning("endpoint %s answered a GET without the key with %d stored bytes "
                            "of an SSE-C object (not its plaintext)",
                            self.endpoint_url or "AWS", len(served))
            got = self.get_range(probe_key, 0, len(PROBE_DATA), self._fp(k))
            if got != PROBE_DATA:
                raise SecurityRefusal("SSE-C probe read back wrong data: refusing to mount")
        finally:
            try:
                self.delete(probe_key)
            except Exception:  # noqa: BLE001
                log.warning("could not delete probe object %r", probe_key)

    # -- diagnostics (ssecfs check, rekey) ------------------------------------------------------
    def ssec_blocked(self) -> bool:
        """True if the bucket's default encryption blocks SSE-C writes (AWS, since April 2026
        the default for new buckets: such writes get 403 AccessDenied)."""
        try:
            a = self.wire.send("GetBucketEncryption", "GET", None, query={"encryption": None})
        except TransportFailure:
            return False
        return a.ok and s3xml.blocks_ssec(a.body)

    def head_with(self, key: str, k: Key | None) -> tuple[str, ObjectInfo | None]:
        """HEAD with one given key (None: no SSE-C headers). Returns (verdict, info):
        verdict is 'open', 'denied' (403), 'bad-request' (400) or 'plaintext'."""
        a = self._head_answer(key, k)
        if a.status == 403:
            return "denied", None
        if a.status == 400:
            return "bad-request", None
        if not a.ok:
            raise self._status_error(a, "HeadObject", key)
        if k and _echo_fps(a.headers.get(ECHO_MD5)) == {self._fp(k)}:
            return "open", self._info(key, a, OPEN, self._fp(k))
        return "plaintext", self._info(key, a, PLAINTEXT, None)

    def get_status(self, key: str, k: Key | None) -> int:
        """HTTP status of a GET of `key` with key k (None: without SSE-C headers)."""
        return self._try("GetObject", "GET", key, headers=self._sse(k) if k else None).status

    def server_time_skew(self) -> float | None:
        """Seconds the server's clock is ahead of ours (from the Date header), or None."""
        import time as _time
        t0 = _time.time()
        try:
            a = self.wire.send("ListObjectsV2", "GET", None, query={"list-type": "2", "max-keys": "1"})
        except TransportFailure:
            return None
        t1 = _time.time()
        server = _http_date(a.headers.get("date"))
        return None if server is None else server - (t0 + t1) / 2
