"""The S3 store (ssecfs.store.s3.S3Store, on awscrt) against a real SeaweedFS: SSE-C headers
on the wire for every data/metadata request (seen by a recording proxy in front of the server,
so the requests awscrt makes on its own are seen too), verification of what the server did,
re-encryption on copy, the UploadPartCopy fallback, LOCKED/PLAINTEXT detection, and the same
contract test on the fake store (tests/memstore.py) and the real one."""

from __future__ import annotations

import base64
import hashlib
import logging
import mmap
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from botocore.exceptions import ClientError

from helpers import assert_sse_c_only, sse
from ssecfs import buffers
from ssecfs.store import copies, multipart
from ssecfs.cache import CHUNK
from ssecfs.errors import (EXIT_SECURITY, EncryptionNotApplied, KeyMismatch, NotFound,
                           PermissionDenied, Stale, StoreError, StoreUnavailable, UserError)
from ssecfs.crypto.keys import Key, KeyRing
from ssecfs.store.probe import PROBE_DATA
from ssecfs.store.s3 import S3Store
from ssecfs.store.ssec import KEY_FP_META
from ssecfs.store.contract import LOCKED, MULTIPART_MIN_PART, OPEN, PLAINTEXT, delete_tree, pieces
from ssecfs.buffers import Segments
from ssecfs.store.transport import check_endpoint
from wire import TamperProxy, Wire

pytestmark = pytest.mark.seaweed

MiB = 1024 * 1024
SSE_HDR = "x-amz-server-side-encryption-customer-"
COPY_HDR = "x-amz-copy-source-server-side-encryption-customer-"
ECHO_MD5 = "x-amz-server-side-encryption-customer-key-md5"
ECHO_ALG = "x-amz-server-side-encryption-customer-algorithm"
NEEDS_SSE = {"PutObject", "GetObject", "HeadObject", "CopyObject", "CreateMultipartUpload",
             "UploadPart", "CompleteMultipartUpload", "UploadPartCopy"}
NEEDS_COPY_SSE = {"CopyObject", "UploadPartCopy"}
NO_SSE = {"ListObjectsV2", "DeleteObject", "DeleteObjects", "AbortMultipartUpload"}


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
    """make(*ring_keys) -> (store, its Wire): each store talks to SeaweedFS through its own
    recording proxy (wire.proxy can rewrite answers)."""
    made = []

    def make(*keys: Key, **kw) -> tuple[S3Store, Wire]:
        proxy = TamperProxy(seaweed.endpoint).start()
        st = S3Store(kw.pop("bucket", bucket), KeyRing(list(keys)), endpoint_url=proxy.url, **kw)
        made.append((st, proxy))
        return st, Wire(proxy)

    yield make
    for st, proxy in made:
        st.close()
        proxy.stop()


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
    assert_sse_c_only(s3, bucket, "dir/obj")
    assert s3.get_object(Bucket=bucket, Key="dir/obj", **sse(raw_of(k1)))["Body"].read() == data

    ops = wire.ops()
    assert {"PutObject", "GetObject", "HeadObject"} <= set(ops)
    assert all("range" in h for h in wire.of("GetObject"))
    check_wire(wire, [k1])


def test_big_range_get_into_pooled_buffers(make_store, k1):
    """A read unit (8 MiB) comes back whole, as one ranged GET on the wire. Asked with
    shared=True (the read path) it is received into pooled buffers (1 MiB segments) handed
    over as they are, not copied again; a segment is received into again only once no view
    of it is left. Otherwise the caller gets bytes."""
    store, wire = make_store(k1)
    data = os.urandom(10 * MiB)
    store.put("big", data, {})
    wire.clear()
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
    assert wire.ops() == ["GetObject"] * 3
    assert [h["range"] for h in wire.of("GetObject")] == [
        f"bytes={MiB + 7}-{9 * MiB + 6}"] * 2 + [f"bytes=0-{8 * MiB - 1}"]
    check_wire(wire, [k1])


def test_range_gets_over_a_part_are_parallel_part_gets_with_the_key(make_store, k1):
    """A range over the part size is fetched by awscrt as several part GETs: every one of
    them carries the key and the ETag condition; the body comes back whole and in order."""
    store, wire = make_store(k1)
    size = 20 * MiB + 333
    data = os.urandom(size)
    store.upload("parts", size, lambda off, ln: data[off:off + ln], {})
    etag = store.head("parts").etag
    wire.clear()
    got = store.get_range("parts", 5, size - 5, k1.fingerprint, etag=etag, shared=True)
    assert bytes(got) == data[5:]
    gets = wire.of("GetObject")
    assert len(gets) == 3, wire.ops()
    assert all(h.get("if-match") == f'"{etag}"' for h in gets)
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
    size = multipart.SINGLE_PUT_MAX + MiB + 12345
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
    parts = -(-size // MULTIPART_MIN_PART)
    assert ops.count("UploadPart") == parts == len(reads)
    assert sorted(reads) == [(i * MULTIPART_MIN_PART, min(MULTIPART_MIN_PART, size - i * MULTIPART_MIN_PART))
                             for i in range(parts)]
    got = s3.get_object(Bucket=bucket, Key="big", **sse(raw_of(k1)))["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    with pytest.raises(ClientError):
        s3.get_object(Bucket=bucket, Key="big")
    check_wire(wire, [k1])


def test_segmented_bodies_arrive_whole_and_are_let_go_of_once_sent(make_store, k1, s3, bucket):
    """The fs hands each part over as the cache chunks it decrypted (buffers.Segments, pieces
    of any length, bytes or views): the object holds exactly those bytes, and every body was
    emptied by the send (a part in flight is held once, by awscrt)."""
    store, _ = make_store(k1)
    size = multipart.SINGLE_PUT_MAX + MiB + 777
    data = os.urandom(size)
    bodies = []

    def reader(off, ln):
        view, cuts = memoryview(data)[off:off + ln], [0, 1, 4096, 131072 + 3, ln // 2, ln]
        cuts = sorted(set(c for c in cuts if c <= ln))
        body = buffers.Segments([bytes(view[a:b]) if i % 2 else view[a:b]
                                 for i, (a, b) in enumerate(zip(cuts, cuts[1:]))])
        bodies.append(body)
        return body

    store.upload("segmented", size, reader, {})
    got = s3.get_object(Bucket=bucket, Key="segmented", **sse(raw_of(k1)))["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    small = buffers.Segments([b"abc", memoryview(b"defgh")[1:], b""])
    store.put("small-segmented", small, {})
    assert store.get_range("small-segmented", 0, 7, k1.fingerprint) == b"abcefgh"
    assert len(bodies) == -(-size // MULTIPART_MIN_PART)
    assert all(b.parts == [] for b in bodies + [small])


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
    monkeypatch.setattr(copies, "COPY_MAX", 1 * MiB)
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
    store.delete("l/a")
    store.delete("l/never-there")                       # S3: deleting a missing key is fine
    store.delete_many(["l/b", "l/sub/c"])
    assert [o.key for p in store.list_page_iter("l/", delimiter=None) for o in p.objects] == []
    assert set(wire.ops()) <= NO_SSE
    assert wire.ops().count("DeleteObject") == 2 and wire.ops().count("DeleteObjects") == 1
    check_wire(wire, [k1])


# ------------------------------------------------------------------------- verification
def _tamper(wire: Wire, op: str, fn):
    """Alter the answers to `op` on the wire: fn(headers as a list of (name, value)) returns
    the headers the store gets."""
    wire.proxy.rewrite(lambda r, st, hs, body: (st, fn(list(hs)), body), op=op)


def _without(*names):
    return lambda hs: [(n, v) for n, v in hs if n.lower() not in names]


def _echoing(fp):
    return lambda hs: [(n, fp if n.lower() == ECHO_MD5 else v) for n, v in hs]


@pytest.mark.parametrize("tamper", [
    _without(ECHO_MD5),
    _echoing(Key(os.urandom(32)).fingerprint),
    _without(ECHO_ALG),
], ids=["without_echo", "with_other_key_echo", "without_algorithm_echo"])
def test_put_with_a_missing_or_wrong_echo_is_refused(make_store, k1, tamper):
    store, wire = make_store(k1)
    _tamper(wire, "PutObject", tamper)
    with pytest.raises(EncryptionNotApplied):
        store.put("obj", b"data", {})


def test_directory_marker_without_echo_is_accepted(make_store, k1):
    store, wire = make_store(k1)
    _tamper(wire, "PutObject", _without(ECHO_MD5))
    store.put("somedir/", b"", {"mode": "16877"})          # zero bytes: nothing to encrypt
    with pytest.raises(EncryptionNotApplied):
        store.put("somedir/data", b"x", {})


def test_multipart_part_without_echo_is_refused_and_aborted(make_store, k1):
    store, wire = make_store(k1)
    _tamper(wire, "UploadPart", _without(ECHO_MD5))
    size = multipart.SINGLE_PUT_MAX + 1
    with pytest.raises(EncryptionNotApplied):
        store.upload("mp", size, lambda off, ln: bytes(ln), {})
    assert "AbortMultipartUpload" in wire.ops()
    assert "CompleteMultipartUpload" not in wire.ops()
    with pytest.raises(NotFound):
        store.head("mp")


def test_copy_without_any_echo_is_refused(make_store, k1):
    store, wire = make_store(k1)
    store.put("c-src", b"copy me", {})
    _tamper(wire, "CopyObject", _without(ECHO_MD5))
    _tamper(wire, "HeadObject", _without(ECHO_MD5))
    with pytest.raises(EncryptionNotApplied):
        store.copy("c-src", "c-dst", 7, {}, k1.fingerprint)


def test_copy_without_echo_is_verified_by_head(make_store, k1):
    store, wire = make_store(k1)
    store.put("v-src", b"copy me", {})
    _tamper(wire, "CopyObject", _without(ECHO_MD5))
    wire.clear()
    info = store.copy("v-src", "v-dst", 7, {}, k1.fingerprint)
    assert info.key_fp == k1.fingerprint
    assert wire.ops()[-1] == "HeadObject"
    check_wire(wire, [k1])


def test_copies_at_once_without_echo_are_verified_by_heads_at_once(make_store, k1):
    """copy_as_is_many (a renamed directory): copies whose answers carry no echo (SeaweedFS)
    are verified by a HEAD each, sent together; a copy the HEAD shows unencrypted fails."""
    store, wire = make_store(k1)
    for name in ("a", "b", "c"):
        store.put(f"m-src/{name}", name.encode(), {})
    _tamper(wire, "CopyObject", _without(ECHO_MD5))
    wire.clear()
    out = store.copy_as_is_many([(f"m-src/{n}", f"m-dst/{n}", 1) for n in ("a", "b", "c")])
    assert [o.key_fp for o in out] == [k1.fingerprint] * 3
    assert sorted(wire.ops()) == ["CopyObject"] * 3 + ["HeadObject"] * 3
    check_wire(wire, [k1])
    _tamper(wire, "HeadObject", _without(ECHO_MD5))
    out = store.copy_as_is_many([("m-src/a", "m-dst/x", 1)])
    assert isinstance(out[0], EncryptionNotApplied)


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
    assert e.value.exit_code == EXIT_SECURITY and "https" in str(e.value)
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

    # head_many answers each key as head() does: open, locked, plaintext, missing
    many = st.head_many(["c/a", "c/foreign", "c/plain", "c/missing"])
    assert [(many[k].access, many[k].size) for k in ("c/a", "c/foreign", "c/plain")] == \
        [(OPEN, 5000), (LOCKED, 777), (PLAINTEXT, 33)]
    assert many["c/a"].etag == st.head("c/a").etag and many["c/a"].key_fp == k1.fingerprint
    assert many["c/a"].metadata["mode"] == "33188"
    assert isinstance(many["c/missing"], NotFound)

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


def test_store_contract_delete_many(contract, k1):
    """delete_many, the filesystem's batch delete: every key given goes, whatever key opens
    it (or none), a missing key is no error, an empty list does nothing, the rest stays."""
    st, put_foreign, put_plain = contract
    for name in ("a", "b", "sub/c"):
        st.put(f"dm/{name}", name.encode(), {})
    put_foreign("dm/foreign", b"f")
    put_plain("dm/plain", b"p")
    st.delete_many([])
    st.delete_many(["dm/a", "dm/sub/c", "dm/foreign", "dm/plain", "dm/missing"])
    assert [o.key for p in st.list_page_iter("dm/", delimiter=None) for o in p.objects] == \
        ["dm/b"]
    for key in ("dm/a", "dm/sub/c", "dm/foreign", "dm/plain"):
        with pytest.raises(NotFound):
            st.head(key)
    assert st.get_range("dm/b", 0, 1, k1.fingerprint) == b"b"
    st.delete_many(["dm/b"])
    assert [o for p in st.list_page_iter("dm/", delimiter=None) for o in p.objects] == []


def test_store_contract_copy_as_is_many(contract, k1):
    """copy_as_is_many, the copies of a moved directory: each is made as copy_as_is makes it
    (the metadata kept, under the current key) or comes back as the error copy_as_is raises,
    in the order asked; one failing leaves the others made."""
    st = contract[0]
    st.put("cm/a", b"aa", {"mode": "33188"})
    st.put("cm/b", b"bbb", {})
    out = st.copy_as_is_many([("cm/a", "cm/x/a", 2), ("cm/missing", "cm/x/m", 1),
                              ("cm/b", "cm/x/b", 3)])
    assert [type(r).__name__ for r in out] == ["ObjectInfo", "NotFound", "ObjectInfo"], out
    assert (out[0].key, out[0].key_fp, out[2].key) == ("cm/x/a", k1.fingerprint, "cm/x/b")
    assert st.get_range("cm/x/a", 0, 2, k1.fingerprint) == b"aa"
    assert st.get_range("cm/x/b", 0, 3, k1.fingerprint) == b"bbb"
    assert st.head("cm/x/a").metadata.get("mode") == "33188"
    with pytest.raises(NotFound):
        st.head("cm/x/m")
    assert st.copy_as_is_many([]) == []


def test_store_contract_put_many(contract, k1):
    """put_many, the uploads of a burst of small files: each is stored as put stores it
    (under the current key, its metadata kept), answers in the order asked."""
    st = contract[0]
    blobs = {f"pm/f{i}": os.urandom(i * 100) for i in range(1, 7)}
    out = st.put_many([(k, v, {"mode": "33188", "n": k[-1]}) for k, v in blobs.items()])
    assert [(o.key, o.size, o.key_fp) for o in out] == [(k, len(v), k1.fingerprint)
                                                        for k, v in blobs.items()]
    for k, v in blobs.items():
        assert st.get_range(k, 0, len(v), k1.fingerprint) == v
        assert st.head(k).metadata.get("n") == k[-1]
    assert st.put_many([]) == []


def test_puts_at_once_carry_the_key_and_each_must_be_confirmed(make_store, k1):
    """put_many sends every PUT with the key; an answer without the SSE-C echo fails that
    PUT (handed back, not raised), as put would refuse it."""
    store, wire = make_store(k1)
    wire.reqs.clear()
    out = store.put_many([(f"pk/{i}", b"x" * i, {}) for i in range(1, 9)])
    assert all(o.key_fp == k1.fingerprint for o in out)
    assert wire.ops().count("PutObject") == 8
    check_wire(wire, [k1])
    _tamper(wire, "PutObject", _without(ECHO_MD5))
    out = store.put_many([("pk/a", b"a", {}), ("pk/b", b"b", {})])
    assert [type(o) for o in out] == [EncryptionNotApplied] * 2


def test_store_contract_delete_tree(contract):
    """delete_tree, the deletes of a moved directory: its files, markers and the directories
    they imply below the root go, none above it, and nothing of the tree is listed after
    (SeaweedFS lists an emptied implicit directory until its "d/" key is deleted)."""
    st, _, _ = contract
    keys = ["dt/t/a", "dt/t/s/", "dt/t/s/b", "dt/t/s/u/c"]
    for k in keys + ["dt/keep"]:
        st.put(k, b"" if k.endswith("/") else k.encode(), {})
    delete_tree(st, keys, "dt/t/")
    assert [o.key for p in st.list_page_iter("dt/t/", delimiter=None) for o in p.objects] == []
    top = list(st.list_page_iter("dt/", delimiter="/"))
    assert [o.key for p in top for o in p.objects] == ["dt/keep"]
    assert [q for p in top for q in p.prefixes] == []


# ------------------------------------------------------------------------- request shapes
def test_list_pagination_and_delete_batches(make_store, k1, s3, bucket):
    """Listings follow continuation tokens (1,000 keys a page), start_after is honoured,
    max_keys < 1000 means one page, and deletes go 1,000 keys a request."""
    keys = [f"p/{i:05d}" for i in range(1003)] + ["p/sub/x", "q/other"]
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=b""), keys))
    store, wire = make_store(k1)
    pages = list(store.list_page_iter("p/", delimiter=None))
    listed = [o.key for p in pages for o in p.objects]
    assert listed == sorted(k for k in keys if k.startswith("p/"))
    assert [len(p.objects) for p in pages] == [1000, 4]
    assert wire.ops() == ["ListObjectsV2"] * 2
    first, second = wire.proxy.requests()
    assert "continuation-token" not in first.query and second.query.get("continuation-token")
    tail = store.list_page_iter("p/", delimiter=None, start_after="p/01000")
    assert [o.key for p in tail for o in p.objects] == ["p/01001", "p/01002", "p/sub/x"]
    assert len(list(store.list_page_iter("p/", delimiter=None, max_keys=2))) == 1
    wire.clear()
    store.delete_many([k for k in keys if k.startswith("p/")])
    deletes = wire.proxy.requests(op="DeleteObjects")
    assert len(deletes) == 2 and all(r.status == 200 for r in deletes)
    assert all(r.headers.get("content-md5") for r in deletes)      # S3 requires it
    left = [o.key for p in store.list_page_iter("", delimiter=None) for o in p.objects]
    assert left == ["q/other"]


# ------------------------------------------------------------------------- requests and answers
def test_head_and_small_gets_carry_the_key(make_store, k1, bucket, s3):
    """HEAD and small range GETs carry the SSE-C headers, see the echo, and give the same
    answers as boto3 would (incl. 403/404/412), one request each."""
    store, wire = make_store(k1)
    data = os.urandom(300_000)
    store.put("raw/obj one+%", data, {"mode": "33261", "mtime": "1700000000.25"})
    wire.clear()
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
    check_wire(wire, [k1])
    other, _ = make_store(Key(os.urandom(32)))
    with pytest.raises(PermissionDenied):
        other.get_range("raw/obj one+%", 0, 10, None)
    h2 = other.head("raw/obj one+%")                 # no ring key opens it: listed as LOCKED
    assert h2.access == LOCKED and h2.size == len(data)
    # a plaintext object: HEAD says so; a GET of it is refused
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


@pytest.mark.parametrize("strip", [ECHO_MD5, ECHO_ALG])
def test_answers_without_the_echo_are_refused(make_store, k1, strip):
    """A PUT, a caller-driven UploadPart or a GET (small, or a read unit) answered without
    the SSE-C echo: the write fails (EncryptionNotApplied), the read is not served."""
    store, wire = make_store(k1)
    store.put("echo/ok", b"fine", {})
    store.put("echo/unit", os.urandom(2 * MiB), {})
    wire.proxy.strip(strip, op={"PutObject", "UploadPart", "GetObject"})
    with pytest.raises(EncryptionNotApplied):
        store.put("echo/new", b"data", {})
    up, fp = store.mpu_begin("echo/parts", {})
    with pytest.raises(EncryptionNotApplied):
        store.mpu_part("echo/parts", up, 1, b"p" * 1024, fp)
    store.mpu_abort("echo/parts", up)
    if strip == ECHO_MD5:
        with pytest.raises(KeyMismatch):
            store.get_range("echo/ok", 0, 4, k1.fingerprint)
        with pytest.raises(KeyMismatch):
            store.get_range("echo/unit", 0, 2 * MiB, k1.fingerprint, shared=True)


def test_copy_reencrypts_replaces_or_keeps_metadata(make_store, s3, bucket):
    """CopyObject: one request with the source's and the destination's SSE-C headers;
    re-encrypts to the current key; copy() replaces the metadata, copy_as_is() keeps it; a
    failed ETag precondition is Stale."""
    old, new = Key(os.urandom(32)), Key(os.urandom(32))
    writer, _ = make_store(old)
    data = os.urandom(100_000)
    writer.put("rc/src one+%", data, {"mode": "33188"})
    store, wire = make_store(new, old)
    etag = store.head("rc/src one+%").etag
    wire.clear()
    info = store.copy("rc/src one+%", "rc/dst", len(data), {"mode": "33261"}, old.fingerprint,
                      etag)
    assert (info.key_fp, info.access) == (new.fingerprint, OPEN) and info.etag
    assert [op for op in wire.ops() if op == "CopyObject"] == ["CopyObject"]
    cp = wire.of("CopyObject")[0]
    assert cp["x-amz-copy-source-if-match"] == f'"{etag}"'
    assert cp["x-amz-metadata-directive"] == "REPLACE" and cp["x-amz-meta-mode"] == "33261"
    assert s3.get_object(Bucket=bucket, Key="rc/dst", **sse(raw_of(new)))["Body"].read() == data
    with pytest.raises(ClientError):
        s3.get_object(Bucket=bucket, Key="rc/dst", **sse(raw_of(old)))
    assert store.head("rc/dst").metadata["mode"] == "33261"
    with pytest.raises(Stale):
        store.copy("rc/src one+%", "rc/dst2", len(data), {}, old.fingerprint, "0" * 32)
    with pytest.raises(NotFound):
        store.head("rc/dst2")
    current, cwire = make_store(new)
    current.copy_as_is("rc/dst", "rc/kept", len(data))
    assert cwire.ops()[0] == "CopyObject"
    assert cwire.of("CopyObject")[0]["x-amz-metadata-directive"] == "COPY"
    h = current.head("rc/kept")
    assert h.metadata["mode"] == "33261" and h.key_fp == new.fingerprint
    assert current.get_range("rc/kept", 0, len(data), new.fingerprint) == data
    check_wire(wire, [new, old])


def test_listing_matches_boto3(make_store, k1, s3, bucket):
    """ListObjectsV2 (own XML parse, encoding-type=url) lists exactly what boto3 lists: same
    keys (odd characters too), sizes, ETags, times, common prefixes."""
    store, wire = make_store(k1)
    names = ["l/a b", "l/plus+x", "l/pct%41", "l/ünï", "l/sub/x", "l/sub2/y", "l/q?#&=",
             "l/tab\tx", "l/<amp&>"]
    for n in names:
        store.put(n, b"x" * len(n), {})

    def flat(pages):
        objs, pfx = [], []
        for p in pages:
            objs += [(o.key, o.size, o.etag, round(o.mtime)) for o in p.objects]
            pfx += p.prefixes
        return objs, pfx

    def boto(delimiter):
        kw = {"Delimiter": delimiter} if delimiter else {}
        r = s3.list_objects_v2(Bucket=bucket, Prefix="l/", **kw)
        return ([(o["Key"], o["Size"], o["ETag"].strip('"'), round(o["LastModified"].timestamp()))
                 for o in r.get("Contents", [])], [p["Prefix"] for p in r.get("CommonPrefixes", [])])

    wire.clear()
    mine = {d: flat(store.list_page_iter("l/", d)) for d in ("/", None)}
    assert set(wire.ops()) == {"ListObjectsV2"}
    assert mine == {d: boto(d) for d in ("/", None)}
    assert sorted(k for k, *_ in mine[None][0]) == sorted(names)
    assert mine["/"][1] == ["l/sub/", "l/sub2/"]


# ------------------------------------------------------------------------- the mount's probe
def test_probe_refuses_an_endpoint_that_serves_the_plaintext_without_the_key(
        make_store, k1, s3, bucket, caplog):
    """SeaweedFS enforces SSE-C: the probe passes and leaves nothing behind. An endpoint that
    answers the GET without the key with the plaintext is refused; one that answers with the
    stored (encrypted) bytes reveals nothing: the probe passes and says so in the log."""
    store, wire = make_store(k1)
    store.probe_sse(".probe-a")
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix=".probe-")

    served = {}
    wire.proxy.rewrite(lambda r, st, hs, body: (200, [("Content-Type", "binary/octet-stream")],
                                                served["body"]),
                       op="GetObject", where=lambda r: SSE_HDR + "key" not in r.headers)

    served["body"] = PROBE_DATA
    with pytest.raises(UserError) as e:
        store.probe_sse(".probe-b")
    assert e.value.exit_code == EXIT_SECURITY and "without the key" in str(e.value)

    served["body"] = os.urandom(len(PROBE_DATA) + 16)
    with caplog.at_level(logging.WARNING, logger="ssecfs.store"):
        store.probe_sse(".probe-c")
    assert "not its plaintext" in caplog.text
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix=".probe-")


def test_head_many_sends_the_heads_at_once_with_the_key(make_store, k1):
    """HEADs of a listing go out together (no thread waiting for each), each with the ring
    key that opened the object last; an object under an older key of the ring is asked
    again with that one."""
    old = Key(os.urandom(32))
    old_store, _ = make_store(old)
    old_store.put("m/old", b"o" * 10, {})
    store, wire = make_store(k1, old)
    for i in range(40):
        store.put(f"m/f{i:02d}", b"x" * i, {"mode": "33188"})
    wire.reqs.clear()
    got = store.head_many([f"m/f{i:02d}" for i in range(40)] + ["m/old", "m/none"])
    assert [got[f"m/f{i:02d}"].size for i in range(40)] == list(range(40))
    assert got["m/old"].access == OPEN and got["m/old"].key_fp == old.fingerprint
    assert isinstance(got["m/none"], NotFound)
    check_wire(wire, [k1, old])
    assert wire.ops().count("HeadObject") == 40 + 3     # m/old twice (k1 first), m/none once
