"""An in-memory object store for fast, kernel-free tests of the filesystem layer.

It implements the same contract as ssecfs.store.s3.S3Store and, like a real S3 server, it
ENFORCES SSE-C: every object remembers the fingerprint of the key it was written with, a read
or copy with another key is refused (PermissionDenied, as S3Store translates a 403), a
plaintext object is never served as data (KeyMismatch, as S3Store refuses it), and head()
reports LOCKED / PLAINTEXT like S3Store does. Never use it to prove encryption claims about
S3Store itself: that is what the SeaweedFS tests are for.

Test hooks
  * ``calls``: a Counter of calls per operation name ("head", "get_range", "put", ...);
  * ``fail(op, n, exc)``: the next n calls of op raise exc (default StoreUnavailable);
  * ``before[op] = fn``: fn(*args) runs before op (e.g. to block an upload on an Event);
  * ``put_plain`` / ``put_foreign``: objects stored without SSE-C or under another key, with
    any metadata (what someone with write access to the bucket but no key can make). As from
    S3Store, head() reports a plaintext object's metadata (PLAINTEXT: anyone may have set
    it) and none of a LOCKED one (S3Store learns of it from a listing, the HEAD is refused);
  * ``data(key)`` / ``key_fp_of(key)`` / ``meta(key)``: what the "server" holds.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace

from ssecfs.errors import (KeyMismatch, NotFound, PermissionDenied, Stale, StoreError,
                           StoreUnavailable)
from ssecfs.crypto.keys import Key, KeyRing
from ssecfs.store.ssec import KEY_FP_META
from ssecfs.store.contract import (DELETE_MAX, LIST_PAGE_MAX, LOCKED, OPEN, PLAINTEXT, ListedObject,
                                   ListPage, ObjectInfo)

PART = 8 * 1024 * 1024


@dataclass
class _Obj:
    data: bytes
    metadata: dict
    key_fp: str | None            # None: stored without SSE-C (plaintext)
    etag: str = field(default_factory=lambda: uuid.uuid4().hex)
    mtime: float = field(default_factory=time.time)


class MemStore:
    def __init__(self, ring: KeyRing):
        self.ring = ring
        self._lock = threading.Lock()
        self._objects: dict[str, _Obj] = {}
        self._uploads: dict[str, dict] = {}
        self.calls: Counter = Counter()
        self._faults: dict[str, list] = {}
        self.before: dict[str, object] = {}
        self.log: list[tuple[str, str]] = []      # (op, key) of every call, in order

    def __repr__(self) -> str:
        return f"MemStore({len(self._objects)} objects)"

    # -- test hooks ---------------------------------------------------------------------------
    def fail(self, op: str, n: int = 1, exc: Exception | type | None = None) -> None:
        """Make the next n calls of `op` raise `exc` (default StoreUnavailable)."""
        with self._lock:
            self._faults[op] = [n, exc or StoreUnavailable(f"{op}: injected fault")]

    def _enter(self, op: str, key: str, *args) -> None:
        with self._lock:
            self.calls[op] += 1
            self.log.append((op, key))
            fault = self._faults.get(op)
            exc = None
            if fault and fault[0] > 0:
                fault[0] -= 1
                exc = fault[1]
        hook = self.before.get(op)
        if hook is not None:
            hook(key, *args)
        if exc is not None:
            raise exc if isinstance(exc, BaseException) else exc(f"{op} {key!r}: injected")

    def put_plain(self, key: str, data: bytes, metadata: dict | None = None) -> None:
        """An object stored without SSE-C (e.g. uploaded by another tool)."""
        with self._lock:
            self._objects[key] = _Obj(bytes(data), {str(a): str(b) for a, b in
                                                   (metadata or {}).items()}, None)

    def put_foreign(self, key: str, data: bytes, key_obj: Key, metadata: dict | None = None) -> None:
        """An object stored with SSE-C under `key_obj` (typically a key not in the ring)."""
        md = {str(a): str(b) for a, b in (metadata or {}).items()}
        md[KEY_FP_META] = key_obj.fingerprint
        with self._lock:
            self._objects[key] = _Obj(bytes(data), md, key_obj.fingerprint)

    def data(self, key: str) -> bytes:
        with self._lock:
            return self._objects[key].data

    def meta(self, key: str) -> dict:
        with self._lock:
            return dict(self._objects[key].metadata)

    def key_fp_of(self, key: str) -> str | None:
        with self._lock:
            return self._objects[key].key_fp

    def exists(self, key: str) -> bool:
        with self._lock:
            return key in self._objects

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._objects)

    # -- helpers ------------------------------------------------------------------------------
    def _get(self, key: str, op: str) -> _Obj:
        obj = self._objects.get(key)
        if obj is None:
            raise NotFound(f"{op} {key!r}")
        return obj

    def _meta(self, metadata: dict, k: Key) -> dict:
        return {**{str(a): str(b) for a, b in metadata.items()}, KEY_FP_META: k.fingerprint}

    def _key_for(self, key_fp: str | None) -> Key:
        return self.ring.by_fingerprint(key_fp) or self.ring.current

    @staticmethod
    def _info(key: str, obj: _Obj, access: str) -> ObjectInfo:
        return ObjectInfo(key=key, size=len(obj.data), etag=obj.etag, mtime=obj.mtime,
                          metadata=dict(obj.metadata) if access != LOCKED else {},
                          access=access, key_fp=obj.key_fp if access == OPEN else None,
                          observed=time.time())

    # -- the store contract -------------------------------------------------------------------
    def head(self, key: str) -> ObjectInfo:
        self._enter("head", key)
        with self._lock:
            obj = self._get(key, "HeadObject")
            if obj.key_fp is None:
                return self._info(key, obj, PLAINTEXT)
            if self.ring.by_fingerprint(obj.key_fp) is not None:
                return self._info(key, obj, OPEN)
            return self._info(key, obj, LOCKED)

    def head_many(self, keys: list[str], each=None) -> dict:
        out = {}
        for key in keys:
            try:
                out[key] = self.head(key)
            except Exception as e:  # noqa: BLE001 - per key, as S3Store.head_many
                out[key] = e
            if each is not None:
                each(key, out[key])
        return out

    def head_with_start(self, key: str, nbytes: int) -> ObjectInfo:
        info = self.head(key)
        if info.access != OPEN:
            return info
        with self._lock:
            obj = self._objects.get(key)
            data = obj.data[:nbytes] if obj is not None and obj.etag == info.etag else None
        return replace(info, start=data) if data is not None else info

    def _sse_c_object(self, key: str, op: str, k, etag: str | None, changed: str,
                      plaintext: Exception):
        """The object an SSE-C read or copy under key k may use (self._lock held): Stale if
        it is no longer `etag`, `plaintext` if it is not SSE-C, 403 under another key."""
        obj = self._get(key, op)
        if etag is not None and etag != obj.etag:
            raise Stale(f"{op} {key!r}: {changed}")
        if obj.key_fp is None:
            raise plaintext
        if obj.key_fp != k.fingerprint:
            raise PermissionDenied(f"{op} {key!r}: access denied (403)")
        return obj

    def get_range(self, key: str, start: int, length: int, key_fp: str | None,
                  etag: str | None = None, shared: bool = False) -> bytes:
        self._enter("get_range", key, start, length)
        if length <= 0:
            return b""
        k = self._key_for(key_fp)
        with self._lock:
            obj = self._sse_c_object(key, "GetObject", k, etag, "object changed while reading",
                                     KeyMismatch(f"{key!r} is not encrypted with SSE-C: refused"))
            if start >= len(obj.data):
                raise StoreError(f"GetObject {key!r}: InvalidRange")
            return obj.data[start:start + length]

    def put(self, key: str, data: bytes, metadata: dict) -> ObjectInfo:
        self._enter("put", key, len(data))
        return self._store(key, bytes(data), metadata)

    def put_many(self, items: list[tuple[str, bytes, dict]]) -> list:
        """Each through put (its hooks included), errors handed back as S3Store does."""
        self._enter("put_many", items[0][0] if items else "", len(items))
        out = []
        for key, data, metadata in items:
            try:
                out.append(self.put(key, data, metadata))
            except Exception as e:  # noqa: BLE001 - handed back
                out.append(e)
        return out

    def _store(self, key: str, data: bytes, metadata: dict) -> ObjectInfo:
        k = self.ring.current
        obj = _Obj(data, self._meta(metadata, k), k.fingerprint)
        with self._lock:
            self._objects[key] = obj
        return ObjectInfo(key=key, size=len(data), etag=obj.etag, mtime=obj.mtime,
                          metadata=dict(metadata), access=OPEN, key_fp=k.fingerprint)

    def upload(self, key: str, size: int, reader, metadata: dict) -> ObjectInfo:
        self._enter("upload", key, size)
        parts = []
        for off in range(0, size, PART):
            piece = bytes(reader(off, min(PART, size - off)))
            if len(piece) != min(PART, size - off):
                raise AssertionError(f"reader returned {len(piece)} bytes at {off}, "
                                     f"expected {min(PART, size - off)}")
            parts.append(piece)
        return self._store(key, b"".join(parts), metadata)

    # -- caller-driven multipart uploads (parts may be re-sent; only listed ones count) ------
    def mpu_begin(self, key: str, metadata: dict) -> tuple[str, str]:
        self._enter("mpu_begin", key)
        k = self.ring.current
        up = uuid.uuid4().hex
        with self._lock:
            self._uploads[up] = {"key": key, "meta": dict(metadata), "fp": k.fingerprint,
                                 "parts": {}}
        return up, k.fingerprint

    def _upload_of(self, key: str, upload_id: str) -> dict:
        with self._lock:
            u = self._uploads.get(upload_id)
        if u is None or u["key"] != key:
            raise NotFound(f"upload {upload_id} of {key!r}")
        return u

    def mpu_part(self, key: str, upload_id: str, number: int, body: bytes, key_fp: str) -> str:
        self._enter("mpu_part", key, number, len(body))
        u = self._upload_of(key, upload_id)
        if key_fp != u["fp"]:
            raise PermissionDenied(f"UploadPart {key!r}: not the upload's key")
        etag = uuid.uuid4().hex
        with self._lock:
            u["parts"][number] = (etag, bytes(body))
        return etag

    def mpu_complete(self, key: str, upload_id: str, parts: list, key_fp: str) -> ObjectInfo:
        self._enter("mpu_complete", key, len(parts))
        u = self._upload_of(key, upload_id)
        nums = [n for n, _ in parts]
        if nums != sorted(set(nums)):
            raise StoreError("CompleteMultipartUpload: parts not in ascending order")
        blobs = []
        for i, (n, etag) in enumerate(parts):
            have = u["parts"].get(n)
            if have is None or have[0] != etag:
                raise StoreError(f"CompleteMultipartUpload: InvalidPart {n}")
            if i < len(parts) - 1 and len(have[1]) < 5 * 1024 * 1024:
                raise StoreError(f"CompleteMultipartUpload: EntityTooSmall (part {n})")
            blobs.append(have[1])
        with self._lock:
            self._uploads.pop(upload_id, None)
        return self._store(key, b"".join(blobs), u["meta"])

    def mpu_abort(self, key: str, upload_id: str) -> None:
        self._enter("mpu_abort", key)
        with self._lock:
            self._uploads.pop(upload_id, None)

    def uploads_open(self) -> int:
        with self._lock:
            return len(self._uploads)

    def copy(self, src: str, dst: str, size: int, metadata: dict,
             src_key_fp: str | None, src_etag: str | None = None) -> ObjectInfo:
        self._enter("copy", dst, src)
        sk = self._key_for(src_key_fp)
        with self._lock:
            # AWS answers 400 to copy-source SSE-C headers on a plaintext source.
            obj = self._sse_c_object(src, "CopyObject", sk, src_etag,
                                     "source changed (CopySourceIfMatch)",
                                     StoreError(f"CopyObject {src!r}: 400 (source is not SSE-C)"))
            data = obj.data
        return self._store(dst, data, metadata)

    def copy_as_is_many(self, items: list[tuple[str, str, int]]) -> list:
        self._enter("copy_as_is_many", items[0][1] if items else "", len(items))
        out = []
        for src, dst, size in items:
            try:
                out.append(self.copy_as_is(src, dst, size))
            except Exception as e:  # noqa: BLE001 - handed back, as S3Store does
                out.append(e)
        return out

    def copy_as_is(self, src: str, dst: str, size: int) -> ObjectInfo:
        """Like S3Store.copy_as_is: one copy keeping the metadata, only for objects under the
        ring's current key (PermissionDenied otherwise; NotSupported never: no size limit)."""
        self._enter("copy_as_is", dst, src)
        cur = self.ring.current.fingerprint
        with self._lock:
            obj = self._get(src, "CopyObject")
            if obj.key_fp != cur:
                raise PermissionDenied(f"CopyObject {src!r}: not under the current key")
            data, meta = obj.data, dict(obj.metadata)
        meta.pop(KEY_FP_META, None)
        return self._store(dst, data, meta)

    def delete(self, key: str) -> None:
        self._enter("delete", key)
        with self._lock:
            self._objects.pop(key, None)      # S3: deleting a missing key succeeds

    def delete_many(self, keys: list[str]) -> None:
        for i in range(0, len(keys), DELETE_MAX):
            batch = keys[i:i + DELETE_MAX]
            self._enter("delete_many", batch[0] if batch else "", len(batch))
            with self._lock:
                for k in batch:
                    self._objects.pop(k, None)

    def list_page_iter(self, prefix: str, delimiter: str | None = "/", max_keys: int = LIST_PAGE_MAX,
                       start_after: str | None = None):
        """ListObjectsV2 semantics: keys in order, common prefixes rolled up under the
        delimiter, max_keys entries (objects + prefixes) per page. Like S3Store, a caller
        asking for fewer than LIST_PAGE_MAX keys gets one page only."""
        self._enter("list", prefix)
        with self._lock:
            snapshot = sorted((k, o) for k, o in self._objects.items()
                              if k.startswith(prefix) and (start_after is None or k > start_after))
        entries: list[tuple[str, object]] = []
        seen_prefixes = set()
        for k, o in snapshot:
            rest = k[len(prefix):]
            if delimiter and delimiter in rest:
                cp = prefix + rest[:rest.index(delimiter) + len(delimiter)]
                if cp not in seen_prefixes:
                    seen_prefixes.add(cp)
                    entries.append((cp, None))
                continue
            entries.append((k, ListedObject(key=k, size=len(o.data), etag=o.etag, mtime=o.mtime)))
        i = 0
        while True:
            page = entries[i:i + max_keys]
            i += max_keys
            yield ListPage([e for _, e in page if e is not None],
                           [k for k, e in page if e is None])
            if max_keys < LIST_PAGE_MAX or i >= len(entries):
                return
            self._enter("list", prefix)
