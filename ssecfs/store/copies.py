"""Server-side copies: CopyObject, decrypting with the source's key and encrypting with the
current one (this is where old-key objects are re-encrypted); objects over S3's CopyObject
limit (COPY_MAX) are copied in parts (UploadPartCopy), or streamed through this host where
the server refuses that with SSE-C.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from . import s3xml
from ..errors import NotSupported, PermissionDenied, StoreError
from ..crypto.keys import Key
from .client import Answer, Client, TransportFailure
from .contract import COPY_MAX, ObjectInfo, OPEN
from .multipart import Multipart, part_size_for
from .s3requests import AUTH_CODES, Requests
from .ssec import ECHO_MD5, SseC, meta_headers

log = logging.getLogger("ssecfs.store")

MiB = 1024 * 1024
COPY_PART_MIN = 512 * MiB     # parts of an UploadPartCopy: few requests for a big object


@dataclass(eq=False, repr=False)
class Copies:
    """Copies within one bucket. get_range and upload: the store's, for the streamed copy."""

    wire: Client
    requests: Requests
    sse: SseC
    multipart: Multipart
    get_range: Callable
    upload: Callable
    _upc_unsupported: bool = field(default=False, init=False)

    def _headers(self, src: str, sk: Key, dk: Key, meta: dict | None, dst: str) -> dict:
        """CopyObject's headers: meta given, REPLACE the metadata, else COPY it."""
        h = {"x-amz-copy-source": self.wire.copy_source(src),
             "x-amz-metadata-directive": "COPY" if meta is None else "REPLACE",
             **self.sse.copy_source_headers(sk), **self.sse.headers(dk)}
        if meta is not None:
            h.update(meta_headers(meta, "CopyObject", dst))
        return h

    def _copied(self, a: Answer, dst: str, size: int, metadata: dict, k: Key,
                verify: bool = True) -> ObjectInfo | None:
        """The copy `a` answers. An answer without the SSE-C echo (SeaweedFS) is verified by a
        HEAD of the copy; verify False: not here, None is returned for the caller to."""
        result = s3xml.parse_copy_result(a.body)
        if result is None:
            raise StoreError(f"CopyObject {dst!r}: the answer is no CopyObjectResult")
        if a.headers.get(ECHO_MD5):
            self.sse.check_write_echo(a, dst, "CopyObject", k)
            self.sse.remember(dst, self.sse.fp(k))
            return ObjectInfo(key=dst, size=size, etag=result["ETag"].strip('"'), mtime=0.0,
                              metadata=dict(metadata), access=OPEN, key_fp=self.sse.fp(k))
        return self.sse.verify_by_head(dst, k, "CopyObject") if verify else None

    def copy(self, src: str, dst: str, size: int, metadata: dict,
             src_key_fp: str | None, src_etag: str | None = None) -> ObjectInfo:
        sk = self.sse.by_fp(src_key_fp)
        dk = self.sse.ring.current
        if size > COPY_MAX:
            return self._copy_multipart(src, dst, size, metadata, sk)
        h = self._headers(src, sk, dk, self.sse.meta(metadata, dk), dst)
        if src_etag:
            h["x-amz-copy-source-if-match"] = f'"{src_etag}"'
        a = self.requests.send("CopyObject", "PUT", dst, headers=h)
        return self._copied(a, dst, size, metadata, dk)

    def copy_as_is(self, src: str, dst: str, size: int) -> ObjectInfo:
        k = self._as_is_key(src, size)
        a = self.requests.try_("CopyObject", "PUT", dst,
                               headers=self._headers(src, k, k, None, dst))
        return self._as_is_copied(a, src, dst, size, k)

    def copy_as_is_many(self, items: list[tuple[str, str, int]]) -> list:
        """copy_as_is of each (src, dst, size), all the requests in flight at once, without a
        thread each: in order, the ObjectInfo of each copy or the error its copy_as_is would
        raise."""
        out: list = [None] * len(items)
        sent = []
        for n, (src, dst, size) in enumerate(items):
            try:
                k = self._as_is_key(src, size)
                fut = self.wire.submit("CopyObject", "PUT", dst,
                                       headers=self._headers(src, k, k, None, dst))
                sent.append((n, k, fut))
            except Exception as e:  # noqa: BLE001 - handed back, as copy_as_is would raise it
                out[n] = e
        heads = []
        for n, k, fut in sent:
            src, dst, size = items[n]
            try:
                out[n] = self._as_is_copied(self.wire.wait(fut), src, dst, size, k, False)
                if out[n] is None:        # no echo: a HEAD of each copy, all at once too
                    heads.append((n, k, self.wire.submit("HeadObject", "HEAD", dst,
                                                         headers=self.sse.headers(k))))
            except TransportFailure as e:
                out[n] = self.requests.failure(e, "CopyObject", dst)
            except Exception as e:  # noqa: BLE001 - handed back
                out[n] = e
        for n, k, fut in heads:
            dst = items[n][1]
            try:
                a = self.wire.wait(fut)
                if not a.ok:
                    raise self.requests.status_error(a, "HeadObject", dst)
                out[n] = self.sse.verified(a, dst, k, "CopyObject")
            except TransportFailure as e:
                out[n] = self.requests.failure(e, "HeadObject", dst)
            except Exception as e:  # noqa: BLE001 - handed back
                out[n] = e
        return out

    def _as_is_key(self, src: str, size: int) -> Key:
        """The key a copy of src keeping its metadata is made with: the current one, when it
        is known (or the only one) to be src's."""
        if size > COPY_MAX:
            raise NotSupported("copy_as_is: object over 5 GiB")
        k = self.sse.ring.current
        hint = self.sse.hint(src)
        if (hint and hint != self.sse.fp(k)) or (len(self.sse.ring) > 1 and hint is None):
            # with several keys, guessing wrong costs more than a HEAD (SeaweedFS answers a
            # copy with the wrong source key with 500, which is retried)
            raise PermissionDenied(f"{src!r}: key not known")
        return k

    def _as_is_copied(self, a: Answer, src: str, dst: str, size: int, k: Key,
                      verify: bool = True) -> ObjectInfo | None:
        if a.status in (400, 403) and s3xml.error_code(a.body)[0] not in AUTH_CODES:
            raise PermissionDenied(f"CopyObject {src!r}: not under the current key")
        if not a.ok:
            raise self.requests.status_error(a, "CopyObject", dst)
        return self._copied(a, dst, size, {}, k, verify)

    def _copy_multipart(self, src: str, dst: str, size: int, metadata: dict, sk: Key) -> ObjectInfo:
        ps = max(part_size_for(size), COPY_PART_MIN)
        n = (size + ps - 1) // ps
        if not self._upc_unsupported:
            def part(i, up_id, k):
                lo, hi = i * ps, min(size, (i + 1) * ps) - 1
                h = {"x-amz-copy-source": self.wire.copy_source(src),
                     "x-amz-copy-source-range": f"bytes={lo}-{hi}",
                     **self.sse.copy_source_headers(sk), **self.sse.headers(k)}
                a = self.requests.send("UploadPartCopy", "PUT", dst, headers=h,
                                       query={"partNumber": str(i + 1), "uploadId": up_id})
                result = s3xml.parse_copy_result(a.body, "CopyPartResult")
                if result is None:
                    raise StoreError(f"UploadPartCopy {dst!r}: the answer is no CopyPartResult")
                return {"PartNumber": i + 1, "ETag": result["ETag"]}
            try:
                return self.multipart.run(dst, metadata, n, part)
            except NotSupported:
                self._upc_unsupported = True
                log.warning("server refuses UploadPartCopy with SSE-C; copying %r by streaming "
                            "it through this host (logged once)", src)
        src_fp = self.sse.fp(sk)
        return self.upload(dst, size, lambda off, ln: self.get_range(src, off, ln, src_fp),
                           metadata)
