"""The boto3 store (ssecfs.s3store.S3Store) against a real SeaweedFS: SSE-C headers on the
wire for every data/metadata request, verification of what the server did, re-encryption on
copy, the UploadPartCopy fallback, LOCKED/PLAINTEXT detection. Plus one moto test for API
shape only (moto ignores SSE-C: never use it for encryption claims)."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import mmap
import os
import threading

import pytest
from botocore.exceptions import ClientError

from helpers import sse
from ssecfs import s3store
from ssecfs.cache import CHUNK
from ssecfs.errors import (EncryptionNotApplied, KeyMismatch, NotFound, PermissionDenied,
                           Stale, StoreError, StoreUnavailable, UserError)
from ssecfs.http1 import Segments
from ssecfs.keys import Key, KeyRing
from ssecfs.s3store import EXIT_SECURITY, KEY_FP_META, PROBE_DATA, S3Store, check_endpoint
from ssecfs.store import LOCKED, OPEN, PLAINTEXT, pieces

pytestmark = pytest.mark.seaweed

MiB = 1024 * 1024
SSE_HDR = "x-amz-server-side-encryption-customer-"
COPY_HDR = "x-amz-copy-source-server-side-encryption-customer-"
NEEDS_SSE = {"PutObject", "GetObject", "HeadObject", "CopyObject", "CreateMultipartUpload",
             "UploadPart", "CompleteMultipartUpload", "UploadPartCopy"}
NEEDS_COPY_SSE = {"CopyObject", "UploadPartCopy"}
NO_SSE = {"ListObjectsV2", "DeleteObject", "DeleteObjects", "AbortMultipartUpload"}


def _str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Wire:
    """Records every request a client sends: (operation, lower-cased headers)."""

    def __init__(self, client, raw=None):
        self.lock = threading.Lock()
        self.reqs: list[tuple[str, dict]] = []
        client.meta.events.register("before-send.s3.*", self._on_send)
        if raw is not None:                  # the store's lean path for HEAD / small GETs
            raw.observers.append(self._on_raw)

    def _on_raw(self, op, headers):
        with self.lock:
            self.reqs.append((op, {k.lower(): _str(v) for k, v in headers.items()}))

    def _on_send(self, request, event_name=None, **kw):
        op = event_name.rsplit(".", 1)[-1]
        hdrs = {k.lower(): _str(v) for k, v in request.headers.items()}
        with self.lock:
            self.reqs.append((op, hdrs))

    def ops(self) -> list[str]:
        with self.lock:
            return [op for op, _ in self.reqs]

    def of(self, op: str) -> list[dict]:
        with self.lock:
            return [h for o, h in self.reqs if o == op]

    def clear(self) -> None:
        with self.lock:
            self.reqs.clear()


def key_in(hdrs: dict, prefix: str) -> Key | None:
    """The SSE-C key a request carries under `prefix` (checked for consistency), or None."""
    names = [prefix + s for s in ("algorithm", "key", "key-md5")]
    present = [n in hdrs for n in names]
    if not any(present):
        return None
    assert all(present), f"incomplete SSE-C headers: {sorted(h for h in hdrs if 'customer' in h)}"
    assert hdrs[names[0]] == "AES256"
    raw = base64.b64decode(hdrs[names[1]])
    assert len(raw) == 32
    assert hdrs[names[2]] == base64.b64encode(hashlib.md5(raw).digest()).decode()
    return Key(raw)


def check_wire(wire: Wire, ring_keys: list[Key]) -> None:
    """Every data/metadata request carries complete, consistent SSE-C headers of a ring key;
    copies carry the source's too; listing and deleting carry no key at all."""
    fps = {k.fingerprint for k in ring_keys}
    assert wire.reqs, "nothing recorded"
    for op, hdrs in wire.reqs:
        k = key_in(hdrs, SSE_HDR)
        if op in NEEDS_SSE:
            assert k is not None, f"{op} sent without SSE-C headers"
            assert k.fingerprint in fps, f"{op} sent a key not in the ring"
        if op in NEEDS_COPY_SSE:
            ck = key_in(hdrs, COPY_HDR)
            assert ck is not None, f"{op} sent without copy-source SSE-C headers"
            assert ck.fingerprint in fps
        if op in NO_SSE:
            assert k is None and key_in(hdrs, COPY_HDR) is None, f"{op} needlessly sent the key"


@pytest.fixture
def make_store(seaweed, bucket):
    made = []

    def make(*keys: Key, **kw) -> tuple[S3Store, Wire]:
        st = S3Store(kw.pop("bucket", bucket), KeyRing(list(keys)), endpoint_url=seaweed.endpoint,
                     **kw)
        made.append(st)
        return st, Wire(st.client, st.raw)

    yield make
    for st in made:
        st.close()


@pytest.fixture
def k1():
    return Key(os.urandom(32))


def raw_of(k: Key) -> bytes:
    return base64.b64decode(k.sse_params()["SSECustomerKey"])


# ------------------------------------------------------------------------- reads and writes
def test_put_get_range_head(make_store, k1, s3, bucket):
    store, wire = make_store(k1)
    data = os.urandom(100_000)
    info = store.put("dir/obj", data, {"mode": "33188", "mtime": "1700000000.5"})
    assert info.access == OPEN and info.key_fp == k1.fingerprint and info.size == len(data)
    assert store.get_range("dir/obj", 10, 1000, k1.fingerprint) == data[10:1010]
    assert store.get_range("dir/obj", 99_000, 5000, k1.fingerprint) == data[99_000:]
    h = store.head("dir/obj")
    assert h.access == OPEN and h.key_fp == k1.fingerprint and h.size == len(data)
    assert h.metadata["mode"] == "33188" and h.metadata["mtime"] == "1700000000.5"
    assert h.metadata[KEY_FP_META] == k1.fingerprint
    assert store.get_range("dir/obj", 0, 10, k1.fingerprint, etag=h.etag) == data[:10]
    with pytest.raises(Stale):
        store.get_range("dir/obj", 0, 10, k1.fingerprint, etag="0" * 32)
    # what the server holds: an SSE-C object (refused without the key, 403 with another)
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="dir/obj")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="dir/obj", **sse(os.urandom(32)))
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert s3.get_object(Bucket=bucket, Key="dir/obj", **sse(raw_of(k1)))["Body"].read() == data

    ops = wire.ops()
    assert {"PutObject", "GetObject", "HeadObject"} <= set(ops)
    assert all("range" in h for h in wire.of("GetObject"))
    check_wire(wire, [k1])


def test_big_range_get_on_the_lean_path(make_store, k1):
    """A read unit (8 MiB) comes back whole on the lean path. Asked with shared=True (the
    read path) it is the pooled receive buffers themselves (1 MiB segments), not a copy; a
    segment is received into again only once no view of it is left. Otherwise the caller
    gets bytes."""
    store, wire = make_store(k1)
    data = os.urandom(10 * MiB)
    store.put("big", data, {})
    want = data[MiB + 7:9 * MiB + 7]
    got = store.get_range("big", MiB + 7, 8 * MiB, k1.fingerprint)
    assert type(got) is bytes and got == want
    buf = store.get_range("big", MiB + 7, 8 * MiB, k1.fingerprint, shared=True)
    assert isinstance(buf, Segments) and len(buf) == 8 * MiB
    assert all(isinstance(s, mmap.mmap) for s in buf.parts)
    view = list(pieces(buf, CHUNK))[1]               # a chunk, as the read path keeps it
    first = id(buf.parts[0])
    del buf
    other = store.get_range("big", 0, 8 * MiB, k1.fingerprint, shared=True)
    assert first not in {id(s) for s in other.parts}, "received into a buffer a view showed"
    assert bytes(view) == want[CHUNK:2 * CHUNK] and bytes(other) == data[:8 * MiB]
    del view, other
    assert wire.of("GetObject"), "the lean path was not used"
    check_wire(wire, [k1])


def test_get_range_with_wrong_key_denied(make_store, k1):
    store, _ = make_store(k1)
    store.put("o", b"data" * 100, {})
    other, _ = make_store(Key(os.urandom(32)))
    with pytest.raises(PermissionDenied):
        other.get_range("o", 0, 10, k1.fingerprint)      # not in that ring: current key used
    with pytest.raises(NotFound):
        store.get_range("missing", 0, 10, k1.fingerprint)


def test_upload_over_16_mib_is_multipart(make_store, k1, s3, bucket):
    store, wire = make_store(k1)
    size = s3store.SINGLE_PUT_MAX + MiB + 12345
    data = os.urandom(size)
    reads = []

    def reader(off, ln):
        reads.append((off, ln))
        return data[off:off + ln]

    info = store.upload("big", size, reader, {"mode": "33188"})
    assert info.access == OPEN and info.key_fp == k1.fingerprint and info.size == size
    ops = wire.ops()
    assert "PutObject" not in ops
    assert ops.count("CreateMultipartUpload") == 1 and ops.count("CompleteMultipartUpload") == 1
    parts = -(-size // s3store.MIN_PART)
    assert ops.count("UploadPart") == parts == len(reads)
    assert sorted(reads) == [(i * s3store.MIN_PART, min(s3store.MIN_PART, size - i * s3store.MIN_PART))
                             for i in range(parts)]
    got = s3.get_object(Bucket=bucket, Key="big", **sse(raw_of(k1)))["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    with pytest.raises(ClientError):
        s3.get_object(Bucket=bucket, Key="big")
    check_wire(wire, [k1])


def test_small_upload_is_single_put(make_store, k1):
    store, wire = make_store(k1)
    store.upload("small", 10, lambda off, ln: b"0123456789"[off:off + ln], {})
    assert wire.ops().count("PutObject") == 1 and "CreateMultipartUpload" not in wire.ops()
    assert store.get_range("small", 0, 10, k1.fingerprint) == b"0123456789"


# ------------------------------------------------------------------------- copy
def test_copy_reencrypts_to_current_key(make_store, s3, bucket):
    old, new = Key(os.urandom(32)), Key(os.urandom(32))
    writer, _ = make_store(old)
    data = os.urandom(300_000)
    writer.put("src", data, {"mode": "33188"})
    store, wire = make_store(new, old)
    h = store.head("src")                                 # found with the second ring key
    assert h.access == OPEN and h.key_fp == old.fingerprint
    assert store.get_range("src", 0, 100, h.key_fp) == data[:100]
    info = store.copy("src", "dst", len(data), {"mode": "33261"}, old.fingerprint)
    assert info.access == OPEN and info.key_fp == new.fingerprint
    assert s3.get_object(Bucket=bucket, Key="dst", **sse(raw_of(new)))["Body"].read() == data
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="dst", **sse(raw_of(old)))
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    h = store.head("dst")
    assert h.key_fp == new.fingerprint and h.metadata["mode"] == "33261"
    cp = wire.of("CopyObject")
    assert cp, "CopyObject was used"
    assert key_in(cp[0], SSE_HDR).fingerprint == new.fingerprint
    assert key_in(cp[0], COPY_HDR).fingerprint == old.fingerprint
    check_wire(wire, [new, old])

    # in place (what chmod/utimens do): re-encrypted, metadata replaced, data kept
    wire.clear()
    info = store.copy("src", "src", len(data), {"mode": "33152"}, old.fingerprint)
    assert info.key_fp == new.fingerprint
    assert s3.get_object(Bucket=bucket, Key="src", **sse(raw_of(new)))["Body"].read() == data
    with pytest.raises(ClientError):
        s3.get_object(Bucket=bucket, Key="src", **sse(raw_of(old)))
    assert store.head("src").metadata["mode"] == "33152"
    check_wire(wire, [new, old])


def test_copy_over_copy_max_falls_back_to_streaming(make_store, monkeypatch, s3, bucket):
    old, new = Key(os.urandom(32)), Key(os.urandom(32))
    writer, _ = make_store(old)
    size = 20 * MiB + 4321
    data = os.urandom(size)
    writer.upload("large", size, lambda off, ln: data[off:off + ln], {"mode": "33188"})
    monkeypatch.setattr(s3store, "COPY_MAX", 1 * MiB)
    store, wire = make_store(new, old)
    info = store.copy("large", "large-copy", size, {"mode": "33188"}, old.fingerprint)
    assert info.key_fp == new.fingerprint and info.size == size
    ops = wire.ops()
    assert "UploadPartCopy" in ops, "UploadPartCopy is tried first"
    upc = wire.of("UploadPartCopy")[0]
    assert key_in(upc, SSE_HDR).fingerprint == new.fingerprint
    assert key_in(upc, COPY_HDR).fingerprint == old.fingerprint
    assert "AbortMultipartUpload" in ops, "the refused multipart upload is aborted"
    after = ops[ops.index("AbortMultipartUpload"):]
    assert "GetObject" in after and "UploadPart" in after, "then the data is streamed"
    got = s3.get_object(Bucket=bucket, Key="large-copy", **sse(raw_of(new)))["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    with pytest.raises(ClientError):
        s3.get_object(Bucket=bucket, Key="large-copy", **sse(raw_of(old)))
    for h in wire.of("GetObject"):
        assert key_in(h, SSE_HDR).fingerprint == old.fingerprint
    check_wire(wire, [new, old])
    # the refusal is remembered: the next large copy streams at once
    wire.clear()
    store.copy("large", "large-copy2", size, {}, old.fingerprint)
    assert "UploadPartCopy" not in wire.ops()
    assert store.head("large-copy2").size == size


# ------------------------------------------------------------------------- access states
def test_head_of_object_under_another_key_is_locked(make_store, k1):
    other, _ = make_store(Key(os.urandom(32)))
    other.put("theirs", b"x" * 12345, {"mode": "33188"})
    store, wire = make_store(k1)
    info = store.head("theirs")
    assert info.access == LOCKED and info.size == 12345 and info.key_fp is None
    assert info.metadata.get(KEY_FP_META) is None
    assert "ListObjectsV2" in wire.ops()
    with pytest.raises(PermissionDenied):
        store.get_range("theirs", 0, 10, None)
    with pytest.raises(NotFound):
        store.head("no-such-object")
    check_wire(wire, [k1])


def test_plaintext_object(make_store, k1, s3, bucket):
    s3.put_object(Bucket=bucket, Key="plain", Body=b"not encrypted at all",
                  Metadata={"mode": "33188"})
    store, wire = make_store(k1)
    info = store.head("plain")
    assert info.access == PLAINTEXT and info.size == 20 and info.key_fp is None
    with pytest.raises(KeyMismatch):
        store.get_range("plain", 0, 20, None)
    with pytest.raises(KeyMismatch):
        store.get_range("plain", 0, 20, k1.fingerprint)
    check_wire(wire, [k1])


def test_list_and_delete_send_no_key(make_store, k1):
    store, wire = make_store(k1)
    for name in ("l/a", "l/b", "l/sub/c"):
        store.put(name, b"1", {})
    wire.clear()
    pages = list(store.list_page_iter("l/", delimiter="/"))
    assert [o.key for p in pages for o in p.objects] == ["l/a", "l/b"]
    assert [x for p in pages for x in p.prefixes] == ["l/sub/"]
    raw_ops = []
    store.raw.observers.append(lambda op, hdrs: raw_ops.append(op))
    store.delete("l/a")
    store.delete("l/never-there")                       # S3: deleting a missing key is fine
    store.delete_many(["l/b", "l/sub/c"])
    assert [o.key for p in store.list_page_iter("l/", delimiter=None) for o in p.objects] == []
    assert set(wire.ops()) <= NO_SSE
    assert wire.ops().count("DeleteObject") == raw_ops.count("DeleteObject") == 2   # lean path
    check_wire(wire, [k1])


# ------------------------------------------------------------------------- verification
def _tamper(store, op: str, fn):
    """Alter botocore's parsed answers to `op` (the lean raw path is switched off: it would
    bypass botocore; test_raw_path_checks_the_echo_too covers it)."""
    store.raw = None
    client = store.client
    def handler(parsed, **kw):
        fn(parsed)
    client.meta.events.register(f"after-call.s3.{op}", handler)


def test_put_without_echo_is_refused(make_store, k1):
    store, _ = make_store(k1)
    _tamper(store, "PutObject", lambda p: p.pop("SSECustomerKeyMD5", None))
    with pytest.raises(EncryptionNotApplied):
        store.put("noecho", b"data", {})


def test_put_with_other_key_echo_is_refused(make_store, k1):
    store, _ = make_store(k1)
    bogus = Key(os.urandom(32)).fingerprint
    _tamper(store, "PutObject", lambda p: p.__setitem__("SSECustomerKeyMD5", bogus))
    with pytest.raises(EncryptionNotApplied):
        store.put("wrongecho", b"data", {})


def test_put_without_algorithm_echo_is_refused(make_store, k1):
    store, _ = make_store(k1)
    _tamper(store, "PutObject", lambda p: p.pop("SSECustomerAlgorithm", None))
    with pytest.raises(EncryptionNotApplied):
        store.put("noalg", b"data", {})


def test_directory_marker_without_echo_is_accepted(make_store, k1):
    store, _ = make_store(k1)
    _tamper(store, "PutObject", lambda p: p.pop("SSECustomerKeyMD5", None))
    store.put("somedir/", b"", {"mode": "16877"})          # zero bytes: nothing to encrypt
    with pytest.raises(EncryptionNotApplied):
        store.put("somedir/data", b"x", {})


def test_multipart_part_without_echo_is_refused_and_aborted(make_store, k1):
    store, wire = make_store(k1)
    _tamper(store, "UploadPart", lambda p: p.pop("SSECustomerKeyMD5", None))
    size = s3store.SINGLE_PUT_MAX + 1
    with pytest.raises(EncryptionNotApplied):
        store.upload("mp", size, lambda off, ln: bytes(ln), {})
    assert "AbortMultipartUpload" in wire.ops()
    assert "CompleteMultipartUpload" not in wire.ops()
    with pytest.raises(NotFound):
        store.head("mp")


def test_copy_without_any_echo_is_refused(make_store, k1):
    store, _ = make_store(k1)
    store.put("c-src", b"copy me", {})
    _tamper(store, "CopyObject", lambda p: p.pop("SSECustomerKeyMD5", None))
    _tamper(store, "HeadObject", lambda p: p.pop("SSECustomerKeyMD5", None))
    with pytest.raises(EncryptionNotApplied):
        store.copy("c-src", "c-dst", 7, {}, k1.fingerprint)


def test_copy_without_echo_is_verified_by_head(make_store, k1):
    store, wire = make_store(k1)
    store.put("v-src", b"copy me", {})
    _tamper(store, "CopyObject", lambda p: p.pop("SSECustomerKeyMD5", None))
    wire.clear()
    info = store.copy("v-src", "v-dst", 7, {}, k1.fingerprint)
    assert info.key_fp == k1.fingerprint
    assert wire.ops()[-1] == "HeadObject"
    check_wire(wire, [k1])


# ------------------------------------------------------------------------- endpoints
@pytest.mark.parametrize("url", ["http://127.0.0.1:8333", "http://localhost:9000",
                                 "http://[::1]:9000", "http://127.0.0.2", "https://s3.example.com",
                                 "https://10.0.0.5:9000", None, ""])
def test_check_endpoint_accepts(url):
    check_endpoint(url)


@pytest.mark.parametrize("url", ["http://s3.example.com", "http://10.0.0.5:9000",
                                 "http://192.168.1.10", "http://[2001:db8::1]:9000",
                                 "http://localhost.evil.com"])
def test_check_endpoint_refuses_plain_http(url):
    with pytest.raises(UserError) as e:
        check_endpoint(url)
    assert e.value.exit_code == s3store.EXIT_SECURITY and "https" in str(e.value)
    with pytest.raises(UserError):
        S3Store("bucket", KeyRing([Key(os.urandom(32))]), endpoint_url=url)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1", "127.0.0.1:9000", "https://"])
def test_check_endpoint_refuses_malformed(url):
    with pytest.raises(UserError):
        check_endpoint(url)


# ------------------------------------------------------------------------- the fake vs the real
@pytest.fixture(params=["memstore", "s3store"])
def contract(request, k1):
    """(store, put_foreign(key, data), put_plain(key, data)) for the fake and the real store:
    the same contract test runs on both, so the fake used by the fs tests stays faithful."""
    other = Key(os.urandom(32))
    if request.param == "memstore":
        from memstore import MemStore
        st = MemStore(KeyRing([k1]))
        return (st, lambda key, data: st.put_foreign(key, data, other),
                lambda key, data: st.put_plain(key, data))
    make_store = request.getfixturevalue("make_store")
    s3, bucket = request.getfixturevalue("s3"), request.getfixturevalue("bucket")
    st, _ = make_store(k1)
    foreign, _ = make_store(other)
    return (st, lambda key, data: foreign.put(key, data, {}),
            lambda key, data: s3.put_object(Bucket=bucket, Key=key, Body=data))


def test_store_contract(contract, k1):
    st, put_foreign, put_plain = contract
    data = os.urandom(5000)
    info = st.put("c/a", data, {"mode": "33188"})
    assert (info.access, info.key_fp, info.size) == (OPEN, k1.fingerprint, 5000)
    h = st.head("c/a")
    assert (h.access, h.key_fp, h.size) == (OPEN, k1.fingerprint, 5000)
    assert h.metadata["mode"] == "33188" and h.metadata[KEY_FP_META] == k1.fingerprint
    assert st.get_range("c/a", 100, 50, h.key_fp, etag=h.etag) == data[100:150]
    assert st.get_range("c/a", 4990, 100, h.key_fp) == data[4990:]
    assert st.get_range("c/a", 0, 0, h.key_fp) == b""
    with pytest.raises(Stale):
        st.get_range("c/a", 0, 10, h.key_fp, etag="0" * 32)
    with pytest.raises(NotFound):
        st.head("c/missing")
    with pytest.raises(NotFound):
        st.get_range("c/missing", 0, 1, None)

    put_foreign("c/foreign", b"f" * 777)
    h = st.head("c/foreign")
    assert (h.access, h.size, h.key_fp) == (LOCKED, 777, None)
    with pytest.raises(PermissionDenied):
        st.get_range("c/foreign", 0, 10, None)
    # SeaweedFS answers a copy whose source key is wrong with 500 InternalError (AWS: 403),
    # which surfaces as StoreUnavailable; either way nothing is copied.
    with pytest.raises((PermissionDenied, StoreUnavailable)):
        st.copy("c/foreign", "c/stolen", 777, {}, None)
    with pytest.raises(NotFound):
        st.head("c/stolen")

    put_plain("c/plain", b"p" * 33)
    h = st.head("c/plain")
    assert (h.access, h.size, h.key_fp) == (PLAINTEXT, 33, None)
    with pytest.raises(KeyMismatch):
        st.get_range("c/plain", 0, 10, None)

    with pytest.raises(Stale):
        st.copy("c/a", "c/stale", 5000, {}, k1.fingerprint, src_etag="0" * 32)
    with pytest.raises(NotFound):
        st.head("c/stale")
    etag = st.head("c/a").etag
    info = st.copy("c/a", "c/sub/b", 5000, {"mode": "33261"}, k1.fingerprint, src_etag=etag)
    assert info.key_fp == k1.fingerprint
    h = st.head("c/sub/b")
    assert h.access == OPEN and h.metadata["mode"] == "33261"
    assert st.get_range("c/sub/b", 0, 5000, h.key_fp) == data

    pages = list(st.list_page_iter("c/", delimiter="/"))
    assert sorted(o.key for p in pages for o in p.objects) == ["c/a", "c/foreign", "c/plain"]
    assert [x for p in pages for x in p.prefixes] == ["c/sub/"]
    assert [o.size for p in st.list_page_iter("c/a", delimiter=None) for o in p.objects] == [5000]
    after = list(st.list_page_iter("c/", delimiter="/", start_after="c/foreign"))
    assert [o.key for p in after for o in p.objects] == ["c/plain"]
    assert [x for p in after for x in p.prefixes] == ["c/sub/"]

    st.delete("c/a")
    st.delete("c/a")                                      # deleting a missing key is no error
    with pytest.raises(NotFound):
        st.head("c/a")
    st.delete_many(["c/foreign", "c/plain", "c/sub/b"])
    assert [o for p in st.list_page_iter("c/", delimiter=None) for o in p.objects] == []


# ------------------------------------------------------------------------- moto: shape only
def test_moto_list_pagination_and_delete_batches(monkeypatch):
    """moto ignores SSE-C: this checks request shapes only (pagination, batching)."""
    moto = pytest.importorskip("moto")
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with moto.mock_aws():
        store = S3Store("shape-bucket", KeyRing([Key(os.urandom(32))]), region="us-east-1")
        try:
            client = store.client
            client.create_bucket(Bucket="shape-bucket")
            keys = [f"p/{i:05d}" for i in range(1003)] + ["p/sub/x", "q/other"]
            _moto_fill(client, "shape-bucket", keys)
            wire = Wire(client)
            pages = list(store.list_page_iter("p/", delimiter=None))
            listed = [o.key for p in pages for o in p.objects]
            assert listed == sorted(k for k in keys if k.startswith("p/"))
            assert [len(p.objects) for p in pages] == [1000, 4]
            assert wire.ops() == ["ListObjectsV2"] * 2
            tail = store.list_page_iter("p/", delimiter=None, start_after="p/01000")
            assert [o.key for p in tail for o in p.objects] == ["p/01001", "p/01002", "p/sub/x"]
            wire.clear()
            # max_keys < 1000 means "one page" (existence probes)
            assert len(list(store.list_page_iter("p/", delimiter=None, max_keys=2))) == 1
            wire.clear()
            batches = []
            client.meta.events.register(
                "provide-client-params.s3.DeleteObjects",
                lambda params, **kw: batches.append(params["Delete"]["Objects"]))
            doomed = [k for k in keys if k.startswith("p/")]
            store.delete_many(doomed)
            assert wire.ops() == ["DeleteObjects"] * 2
            assert sorted(len(b) for b in batches) == [4, 1000]
            left = [o.key for p in store.list_page_iter("", delimiter=None) for o in p.objects]
            assert left == ["q/other"]
        finally:
            store.close()


def _moto_fill(client, bucket: str, keys: list[str]) -> None:
    """Create many empty objects: through moto's backend when it has the (internal) call,
    which is ~50x faster than one PutObject request each."""
    try:
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for k in keys:
            backend.put_object(bucket, k, b"")
    except (ImportError, KeyError, AttributeError, TypeError):
        for k in keys:
            client.put_object(Bucket=bucket, Key=k, Body=b"")


# ------------------------------------------------------------------------- the raw path
@pytest.mark.parametrize("key", ["plain", "dir/sub/file.txt", "with space", "plus+and%percent",
                                 "q?hash#amp&eq=", "ünïcödé/名前", "tilde~_-.dot", "a'b(c)*!"])
def test_raw_signature_matches_botocore(key):
    """s3raw signs by hand; it must produce exactly botocore's SigV4 signature (same URL path,
    canonical headers, scope) for any key, with and without a session token."""
    import datetime

    import botocore.auth
    import botocore.awsrequest
    import botocore.credentials

    from ssecfs.s3raw import RawS3
    for token in (None, "session-token/xyz=="):
        creds = botocore.credentials.Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", token)
        raw = RawS3("http://127.0.0.1:8333", "bkt", "eu-west-3", creds, None, 5, 5)
        k = Key(os.urandom(32))
        path = raw.path_of(key)
        req = botocore.awsrequest.AWSRequest(
            method="HEAD", url="http://127.0.0.1:8333" + path,
            headers={"Range": "bytes=0-9", **k.sse_headers()})
        botocore.auth.S3SigV4Auth(creds, "s3", "eu-west-3").add_auth(req)
        when = datetime.datetime.strptime(req.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
            tzinfo=datetime.timezone.utc)                       # sign at botocore's instant
        mine = raw.sign("HEAD", path, {"Range": "bytes=0-9", **k.sse_headers()}, now=when)
        assert mine["authorization"] == req.headers["Authorization"]
        # a listing: the query string is part of the signature
        query = {"list-type": "2", "prefix": key, "delimiter": "/", "max-keys": "1000",
                 "encoding-type": "url", "continuation-token": "a+b/c=="}
        bpath = raw.path_of("")
        req = botocore.awsrequest.AWSRequest(
            method="GET", url="http://127.0.0.1:8333" + bpath + "?" + raw.query_string(query))
        botocore.auth.S3SigV4Auth(creds, "s3", "eu-west-3").add_auth(req)
        when = datetime.datetime.strptime(req.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
            tzinfo=datetime.timezone.utc)
        mine = raw.sign("GET", bpath, {}, now=when, query=query)
        assert mine["authorization"] == req.headers["Authorization"]
        raw.close()


def test_raw_path_serves_head_and_small_gets_with_the_key(make_store, k1, bucket, s3):
    """HEAD and small range GETs take the lean path on a path-style endpoint; they carry the
    SSE-C headers, see the echo, and give the same answers as boto3 (incl. 403/404/412)."""
    store, wire = make_store(k1)
    assert store.raw is not None
    data = os.urandom(300_000)
    store.put("raw/obj one+%", data, {"mode": "33261", "mtime": "1700000000.25"})
    wire.clear()
    raw_ops = []
    store.raw.observers.append(lambda op, hdrs: raw_ops.append(op))
    h = store.head("raw/obj one+%")
    assert (h.access, h.size, h.key_fp) == (OPEN, len(data), k1.fingerprint)
    assert h.metadata["mode"] == "33261" and h.metadata["mtime"] == "1700000000.25"
    assert h.etag and h.mtime > 0
    assert store.get_range("raw/obj one+%", 1000, 5000, k1.fingerprint, etag=h.etag) == data[1000:6000]
    with pytest.raises(Stale):
        store.get_range("raw/obj one+%", 0, 10, k1.fingerprint, etag="0" * 32)
    with pytest.raises(NotFound):
        store.head("raw/missing")
    with pytest.raises(NotFound):
        store.get_range("raw/missing", 0, 10, k1.fingerprint)
    assert [op for op, _ in wire.reqs] == ["HeadObject", "GetObject", "GetObject",
                                           "HeadObject", "GetObject"]
    assert raw_ops == [op for op, _ in wire.reqs]          # all of them on the lean path
    check_wire(wire, [k1])
    other, _ = make_store(Key(os.urandom(32)))
    with pytest.raises(PermissionDenied):
        other.get_range("raw/obj one+%", 0, 10, None)
    h2 = other.head("raw/obj one+%")                 # no ring key opens it: listed as LOCKED
    assert h2.access == LOCKED and h2.size == len(data)
    # a plaintext object: HEAD says so; a GET through the lean path is refused like boto3's
    s3.put_object(Bucket=bucket, Key="raw/plain", Body=b"not encrypted")
    hp = store.head("raw/plain")
    assert hp.access == PLAINTEXT
    with pytest.raises((KeyMismatch, PermissionDenied, StoreError)):
        store.get_range("raw/plain", 0, 5, k1.fingerprint)


def test_head_with_start_matches_head(make_store, k1, bucket, s3):
    """A lookup that fetches the object's first bytes (one ranged GET with the key) tells
    what head() tells: size, ETag, metadata, key; and the bytes. Empty, missing, foreign-key
    and plaintext objects get head()'s answers."""
    store, wire = make_store(k1)
    small, big = os.urandom(3000), os.urandom(100_000)
    store.put("hs/small", small, {"mode": "33261", "mtime": "1700000000.25"})
    store.put("hs/big", big, {"mode": "33188"})
    store.put("hs/empty", b"", {"mode": "33188"})
    for name, data in (("hs/small", small), ("hs/big", big), ("hs/empty", b"")):
        h, w = store.head(name), store.head_with_start(name, 16384)
        assert (w.size, w.etag, w.metadata, w.key_fp, w.access) == \
            (h.size, h.etag, h.metadata, h.key_fp, h.access) == (len(data), h.etag, h.metadata,
                                                                 k1.fingerprint, OPEN)
        assert abs(w.mtime - h.mtime) < 1
        assert w.start is None if not data else w.start == data[:16384]
    with pytest.raises(NotFound):
        store.head_with_start("hs/missing", 16384)
    stranger, swire = make_store(Key(os.urandom(32)))
    assert stranger.head_with_start("hs/small", 16384).access == LOCKED
    assert swire.ops() == ["GetObject", "ListObjectsV2"]     # the refused key is not asked twice
    rotated, rwire = make_store(Key(os.urandom(32)), k1)      # k1 is the ring's older key now
    w = rotated.head_with_start("hs/small", 16384)
    assert (w.access, w.key_fp, w.start) == (OPEN, k1.fingerprint, None)
    assert rwire.ops() == ["GetObject", "HeadObject"]
    assert key_in(rwire.of("HeadObject")[0], SSE_HDR).fingerprint == k1.fingerprint
    s3.put_object(Bucket=bucket, Key="hs/plain", Body=b"not encrypted")
    p = store.head_with_start("hs/plain", 16384)
    assert p.access == PLAINTEXT and p.start is None
    check_wire(wire, [k1])


@pytest.mark.parametrize("strip", ["x-amz-server-side-encryption-customer-key-md5",
                                   "x-amz-server-side-encryption-customer-algorithm"])
def test_raw_path_checks_the_echo_too(make_store, k1, strip):
    """A PUT or GET answered on the lean path without the SSE-C echo is refused like one
    answered to botocore: the write fails (EncryptionNotApplied), the read is not served."""
    store, _ = make_store(k1)
    store.put("echo/ok", b"fine", {})
    real = store.raw.request

    def stripped(op, method, key, headers, body=None, query=None):
        r = real(op, method, key, headers, body, query=query)
        r.headers = {k: v for k, v in r.headers.items() if k.lower() != strip}
        return r
    store.raw.request = stripped
    with pytest.raises(EncryptionNotApplied):
        store.put("echo/new", b"data", {})
    up, fp = store.mpu_begin("echo/parts", {})
    with pytest.raises(EncryptionNotApplied):
        store.mpu_part("echo/parts", up, 1, b"p" * 1024, fp)
    store.mpu_abort("echo/parts", up)
    if strip.endswith("md5"):
        with pytest.raises(KeyMismatch):
            store.get_range("echo/ok", 0, 4, k1.fingerprint)


def test_raw_copy_reencrypts_replaces_or_keeps_metadata(make_store, s3, bucket):
    """CopyObject on the lean path: one request with the source's and the destination's
    SSE-C headers; re-encrypts to the current key; copy() replaces the metadata, copy_as_is()
    keeps it; a failed ETag precondition is Stale; the same answers as botocore's copy."""
    old, new = Key(os.urandom(32)), Key(os.urandom(32))
    writer, _ = make_store(old)
    data = os.urandom(100_000)
    writer.put("rc/src one+%", data, {"mode": "33188"})
    store, wire = make_store(new, old)
    raw_ops = []
    store.raw.observers.append(lambda op, hdrs: raw_ops.append(op))
    etag = store.head("rc/src one+%").etag
    wire.clear()
    info = store.copy("rc/src one+%", "rc/dst", len(data), {"mode": "33261"}, old.fingerprint,
                      etag)
    assert (info.key_fp, info.access) == (new.fingerprint, OPEN) and info.etag
    copies = [op for op in wire.ops() if op == "CopyObject"]
    assert copies == ["CopyObject"] and raw_ops.count("CopyObject") == 1   # no botocore resend
    assert s3.get_object(Bucket=bucket, Key="rc/dst", **sse(raw_of(new)))["Body"].read() == data
    with pytest.raises(ClientError):
        s3.get_object(Bucket=bucket, Key="rc/dst", **sse(raw_of(old)))
    assert store.head("rc/dst").metadata["mode"] == "33261"
    with pytest.raises(Stale):
        store.copy("rc/src one+%", "rc/dst2", len(data), {}, old.fingerprint, "0" * 32)
    with pytest.raises(NotFound):
        store.head("rc/dst2")
    current, _ = make_store(new)
    current.raw.observers.append(lambda op, hdrs: raw_ops.append(op))
    raw_ops.clear()
    current.copy_as_is("rc/dst", "rc/kept", len(data))
    assert raw_ops[0] == "CopyObject"
    h = current.head("rc/kept")
    assert h.metadata["mode"] == "33261" and h.key_fp == new.fingerprint
    assert current.get_range("rc/kept", 0, len(data), new.fingerprint) == data
    check_wire(wire, [new, old])


def test_raw_listing_matches_botocore(make_store, k1):
    """The lean ListObjectsV2 (own XML parse, encoding-type=url) lists exactly what botocore
    lists: same keys (odd characters too), sizes, ETags, times, common prefixes, pages."""
    store, _ = make_store(k1)
    names = ["l/a b", "l/plus+x", "l/pct%41", "l/ünï", "l/sub/x", "l/sub2/y", "l/q?#&=",
             "l/tab\tx", "l/<amp&>"]
    for n in names:
        store.put(n, b"x" * len(n), {})
    raw_ops = []
    store.raw.observers.append(lambda op, hdrs: raw_ops.append(op))

    def flat(pages):
        objs, pfx = [], []
        for p in pages:
            objs += [(o.key, o.size, o.etag, round(o.mtime)) for o in p.objects]
            pfx += p.prefixes
        return objs, pfx

    raw = {d: flat(store.list_page_iter("l/", d)) for d in ("/", None)}
    assert raw_ops and set(raw_ops) == {"ListObjectsV2"}
    lean, store.raw = store.raw, None
    boto = {d: flat(store.list_page_iter("l/", d)) for d in ("/", None)}
    store.raw = lean
    assert raw == boto
    assert sorted(k for k, *_ in raw[None][0]) == sorted(names)
    assert raw["/"][1] == ["l/sub/", "l/sub2/"]
    # pages: continuation tokens round-trip
    seen, token = [], None
    while True:
        resp = store._raw_list("l/", None, 2, token)
        seen += [c["Key"] for c in resp["Contents"]]
        token = resp["NextContinuationToken"]
        if not resp["IsTruncated"]:
            break
    assert sorted(seen) == sorted(names)


# ------------------------------------------------------------------------- the mount's probe
def test_probe_refuses_an_endpoint_that_serves_the_plaintext_without_the_key(
        make_store, k1, s3, bucket, monkeypatch, caplog):
    """SeaweedFS enforces SSE-C: the probe passes and leaves nothing behind. An endpoint that
    answers the GET without the key with the plaintext is refused; one that answers with the
    stored (encrypted) bytes reveals nothing: the probe passes and says so in the log."""
    store, _ = make_store(k1)
    store.probe_sse(".probe-a")
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix=".probe-")

    real_get = store.client.get_object
    served = {}

    def answer_without_key(**kw):
        if "SSECustomerKey" in kw:
            return real_get(**kw)
        return {"Body": io.BytesIO(served["body"])}
    monkeypatch.setattr(store.client, "get_object", answer_without_key)

    served["body"] = PROBE_DATA
    with pytest.raises(UserError) as e:
        store.probe_sse(".probe-b")
    assert e.value.exit_code == EXIT_SECURITY and "without the key" in str(e.value)

    served["body"] = os.urandom(len(PROBE_DATA) + 16)
    with caplog.at_level(logging.WARNING, logger="ssecfs.store"):
        store.probe_sse(".probe-c")
    assert "not its plaintext" in caplog.text
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix=".probe-")
