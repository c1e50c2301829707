"""End-to-end tests of the encrypted write-back cache (real FUSE mount, real SeaweedFS).

Most mounts go through tests/proxy.py, a reverse proxy in front of SeaweedFS that counts the
S3 requests and injects faults: it holds uploads (a threading.Event, released by the test),
answers 503 SlowDown, or adds latency. Nothing here sleeps to wait for something: every wait
is a poll with a deadline (helpers.wait_until) or an event of the proxy.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import subprocess
import threading
import time

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError

from helpers import fsync_dir, run_ssecfs, ssecfs_cmd, sse, wait_until
from ssecfs.cache.layout import BASE, SLOT

pytestmark = pytest.mark.mount

MiB = 1024 * 1024
WRITES = ("PUT", "POST")          # methods that create or change an object


# ---------------------------------------------------------------------------- helpers
# (the fault proxy fixtures `proxy_server` and `proxy` are in conftest.py)
class Background(threading.Thread):
    """Run fn in a thread; result(timeout) returns its value or raises its exception."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args = fn, args
        self.value = self.error = None
        self.done = threading.Event()
        self.start()

    def run(self):
        try:
            self.value = self.fn(*self.args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self.error = e
        finally:
            self.done.set()

    def result(self, timeout: float, what: str = "call"):
        if not self.done.wait(timeout):
            raise AssertionError(f"{what} did not return within {timeout}s")
        if self.error is not None:
            raise self.error
        return self.value


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read_file(path: str) -> bytes:
    drop_page_cache(path)
    with open(path, "rb") as f:
        return f.read()


def drop_page_cache(path: str) -> None:
    """Make the next read of `path` reach the daemon (no system-wide drop_caches)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def obj(s3, bucket: str, key: str, raw: bytes) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key, **sse(raw))["Body"].read()


def in_bucket(s3, bucket: str, key: str) -> bool:
    resp = s3.list_objects_v2(Bucket=bucket, Prefix=key)
    return any(o["Key"] == key for o in resp.get("Contents") or [])


def wait_durable(s3, bucket: str, key: str, raw: bytes, data: bytes, timeout: float = 60):
    want = sha(data)
    wait_until(lambda: sha(obj(s3, bucket, key, raw)) == want, timeout,
               interval=0.1, what=f"{key} durable with the exact bytes")


def status(m) -> dict:
    from ssecfs.mount.registry import query_control, read_registry
    return query_control(read_registry(m.path)["control"])


def wait_idle(m, timeout: float = 60) -> dict:
    """Wait until the daemon has nothing dirty and no upload in flight."""
    def idle():
        s = status(m)
        return s if s["dirty_files"] == 0 and s["uploads_in_flight"] == 0 else None
    return wait_until(idle, timeout, interval=0.05, what="the daemon to be idle")


def cache_disk_usage(m) -> int:
    """Bytes allocated on disk by the cache entries (sum of st_blocks * 512)."""
    total = 0
    root = os.path.join(m.cache_dir, "entries")
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


# ---------------------------------------------------------------------------- the proxy itself
def test_proxy_passes_s3_through_and_injects_faults(proxy, seaweed, bucket, key):
    """The proxy is transparent for what ssecfs uses (SSE-C single and multipart uploads,
    ranged GETs, HEAD, listing) and its faults do what they say."""
    raw = key[1]
    c = seaweed.client(endpoint=proxy.url)
    big = os.urandom(17 * MiB + 5)
    c.put_object(Bucket=bucket, Key="p/one", Body=big, **sse(raw))
    up = c.create_multipart_upload(Bucket=bucket, Key="p/multi", **sse(raw))["UploadId"]
    parts = [{"PartNumber": i + 1, "ETag": c.upload_part(
        Bucket=bucket, Key="p/multi", UploadId=up, PartNumber=i + 1,
        Body=big[i * 8 * MiB:(i + 1) * 8 * MiB], **sse(raw))["ETag"]} for i in range(3)]
    c.complete_multipart_upload(Bucket=bucket, Key="p/multi", UploadId=up,
                                MultipartUpload={"Parts": parts}, **sse(raw))
    for k in ("p/one", "p/multi"):
        assert c.get_object(Bucket=bucket, Key=k, **sse(raw))["Body"].read() == big
        got = c.get_object(Bucket=bucket, Key=k, Range="bytes=1000-1999", **sse(raw))
        assert got["Body"].read() == big[1000:2000]
        # (SeaweedFS sends the echo header twice; botocore joins them with ", ")
        assert {v.strip() for v in got["SSECustomerKeyMD5"].split(",")} == \
            {sse(raw)["SSECustomerKeyMD5"]}
        assert c.head_object(Bucket=bucket, Key=k, **sse(raw))["ContentLength"] == len(big)
    assert sorted(o["Key"] for o in c.list_objects_v2(Bucket=bucket)["Contents"]) == \
        ["p/multi", "p/one"]
    assert proxy.count(op="UploadPart", bucket=bucket, kind="partNumber+uploadId",
                       status=200) == 3
    assert proxy.count(op="PutObject", bucket=bucket, key="p/one") == 1
    assert proxy.requests(op="PutObject", bucket=bucket)[0].body_bytes == len(big)

    one_try = seaweed.client(Config(retries={"total_max_attempts": 1, "mode": "standard"}),
                             endpoint=proxy.url)
    with proxy.fail(503, times=1, op="GetObject", bucket=bucket) as rule:
        with pytest.raises(ClientError) as e:
            one_try.get_object(Bucket=bucket, Key="p/one", **sse(raw))
        assert e.value.response["Error"]["Code"] == "SlowDown"
        assert one_try.get_object(Bucket=bucket, Key="p/one", **sse(raw))["Body"].read() == big
        assert rule.hits == 1
    with proxy.drop(times=1, op="HeadObject", bucket=bucket) as rule:
        assert c.head_object(Bucket=bucket, Key="p/one", **sse(raw))["ContentLength"] == len(big)
        assert rule.hits == 1         # the client retried after the connection was dropped
    assert proxy.count(op="HeadObject", bucket=bucket, outcome="dropped") == 1
    with proxy.delay(0.5, op="HeadObject", bucket=bucket):
        t0 = time.monotonic()
        one_try.head_object(Bucket=bucket, Key="p/one", **sse(raw))
        assert time.monotonic() - t0 >= 0.5
    proxy.down()
    with pytest.raises(EndpointConnectionError):
        one_try.head_object(Bucket=bucket, Key="p/one", **sse(raw))
    proxy.up()
    assert one_try.head_object(Bucket=bucket, Key="p/one", **sse(raw))["ContentLength"] == len(big)
    held = proxy.hold(op="HeadObject", bucket=bucket)
    t = Background(lambda: c.head_object(Bucket=bucket, Key="p/one", **sse(raw)))
    held.wait_held(1, timeout=10)
    assert not t.done.is_set()
    held.release()
    assert t.result(10)["ContentLength"] == len(big)


# ---------------------------------------------------------------------------- a. close first
def test_close_returns_before_the_upload(proxy, mounter, bucket, key, s3):
    m = mounter(bucket, key[0], endpoint=proxy.url)
    held = proxy.hold(method=WRITES, bucket=bucket, key="early.bin")
    path = os.path.join(m.path, "early.bin")
    data = os.urandom(3 * MiB + 12345)

    Background(write_file, path, data).result(20, "write + close while the upload is held")
    held.wait_held(1, timeout=20)               # the upload started and is stuck at the proxy
    assert not in_bucket(s3, bucket, "early.bin")
    assert os.stat(path).st_size == len(data)
    assert read_file(path) == data               # served by the local cache
    assert status(m)["dirty_files"] == 1
    assert not in_bucket(s3, bucket, "early.bin")

    held.release()
    wait_durable(s3, bucket, "early.bin", key[1], data)
    assert proxy.count(op="PutObject", bucket=bucket, key="early.bin", status=2) == 1


def test_dd_into_the_mount_sends_each_part_once(proxy, mounter, bucket, key, s3, tmp_path):
    """`dd of=F` (and `cmd > F`) closes the descriptor it dup'ed onto stdout before it
    writes, and that close() queues the upload. While the big file is still being written
    the upload must wait for the last close: completing the multipart stream at a partial
    size would send every later part again."""
    m = mounter(bucket, key[0], "--writeback-delay", "0.2", endpoint=proxy.url)
    fifo = str(tmp_path / "in.fifo")
    os.mkfifo(fifo)
    data = os.urandom(41 * MiB + 123)                      # 6 parts of 8 MiB
    dd = subprocess.Popen(["dd", f"if={fifo}", f"of={m.path}/dd.bin", "bs=1M",
                           "iflag=fullblock", "status=none"])
    try:
        with open(fifo, "wb") as w:
            w.write(data[:32 * MiB])                       # the stream starts at 24 MiB
            w.flush()
            wait_until(lambda: "dd.bin: still being written" in m.log, 30,
                       what="the upload queued by dd's first close() to wait")
            assert proxy.count(op="CompleteMultipartUpload", bucket=bucket) == 0
            w.write(data[32 * MiB:])
        assert dd.wait(timeout=60) == 0
    finally:
        dd.kill()
    wait_durable(s3, bucket, "dd.bin", key[1], data)
    wait_idle(m)
    assert proxy.count(op="CompleteMultipartUpload", bucket=bucket, key="dd.bin") == 1
    assert proxy.count(op="PutObject", bucket=bucket, key="dd.bin") == 0
    assert proxy.count(op="UploadPart", bucket=bucket, key="dd.bin", status=2) == 6


def test_overwrite_while_the_upload_is_in_flight_ends_with_the_new_content(proxy, mounter,
                                                                         bucket, key, s3):
    m = mounter(bucket, key[0], endpoint=proxy.url)
    held = proxy.hold(method=WRITES, bucket=bucket, key="twice.bin")
    path = os.path.join(m.path, "twice.bin")
    v1, v2 = os.urandom(2 * MiB + 1), os.urandom(MiB // 2 + 3)    # the second one is shorter
    write_file(path, v1)
    held.wait_held(1, timeout=20)                # v1 is on its way
    Background(write_file, path, v2).result(20, "overwrite while v1 is uploading")
    assert read_file(path) == v2
    held.release()
    wait_durable(s3, bucket, "twice.bin", key[1], v2, timeout=30)
    wait_idle(m)
    assert obj(s3, bucket, "twice.bin", key[1]) == v2
    assert read_file(path) == v2


# ---------------------------------------------------------------------------- b. crash
def test_kill_9_before_upload_then_remount_uploads_from_the_cache(proxy, mounter, bucket, key,
                                                                 s3):
    m = mounter(bucket, key[0], endpoint=proxy.url)
    held = proxy.hold(method="PUT", bucket=bucket, key="big.bin")   # PutObject / UploadPart
    path = os.path.join(m.path, "big.bin")
    data = os.urandom(50 * MiB)
    digest = sha(data)

    Background(write_file, path, data).result(120, "write + close of 50 MiB")
    held.wait_held(1, timeout=30)
    m.kill9()
    assert not in_bucket(s3, bucket, "big.bin")

    mark = proxy.mark()
    m.mount()                                    # same --cache-dir; the hold is still on
    assert re.search(r"1 file\(s\) recovered|recovered 1 dirty file", m.log), m.log[-3000:]
    # The recovered upload is stuck at the proxy again: what we read comes from the cache.
    proxy.wait_for(1, timeout=30, since=mark, method="PUT", bucket=bucket, key="big.bin")
    assert "big.bin" in os.listdir(m.path)
    assert os.stat(path).st_size == len(data)
    assert sha(read_file(path)) == digest
    assert not in_bucket(s3, bucket, "big.bin")

    held.release()
    wait_until(lambda: sha(obj(s3, bucket, "big.bin", key[1])) == digest, 120, interval=0.25,
               what="big.bin durable with the exact sha256")
    # Requests of the killed daemon that were held are not forwarded after it died.
    assert not [r for r in proxy.requests(bucket=bucket, key="big.bin")
                if r.seq <= mark and r.outcome == "forwarded" and r.method == "PUT"]
    wait_idle(m)
    assert sha(read_file(path)) == digest


def test_kill_9_after_a_partial_overwrite_merges_with_the_remote_object(proxy, mounter,
                                                                      bucket, key, s3):
    """Only the changed chunks are in the cache; after the crash the upload must combine them
    with the unchanged parts of the object that is in the bucket."""
    m = mounter(bucket, key[0], endpoint=proxy.url)
    path = os.path.join(m.path, "db.bin")
    base = os.urandom(20 * MiB)
    write_file(path, base)
    wait_durable(s3, bucket, "db.bin", key[1], base)
    wait_idle(m)

    patch = os.urandom(MiB + 333)
    want = bytearray(base)
    want[5 * MiB + 17:5 * MiB + 17 + len(patch)] = patch
    want += b"tail"
    held = proxy.hold(method=WRITES, bucket=bucket, key="db.bin")
    with open(path, "r+b") as f:
        f.seek(5 * MiB + 17)
        f.write(patch)
        f.seek(0, os.SEEK_END)
        f.write(b"tail")
    held.wait_held(1, timeout=30)
    m.kill9()
    assert sha(obj(s3, bucket, "db.bin", key[1])) == sha(base)

    m.mount()
    assert sha(read_file(path)) == sha(bytes(want))
    held.release()
    wait_until(lambda: sha(obj(s3, bucket, "db.bin", key[1])) == sha(bytes(want)), 90,
               interval=0.25, what="the merged object in the bucket")
    wait_idle(m)


# ---------------------------------------------------------------------------- c. outage
def test_store_outage_writes_succeed_fsync_waits_nothing_lost(proxy, mounter, bucket, key, s3):
    m = mounter(bucket, key[0], endpoint=proxy.url)
    raw = key[1]
    old = os.urandom(300_000)
    write_file(os.path.join(m.path, "existing.bin"), old)
    wait_durable(s3, bucket, "existing.bin", raw, old)
    wait_idle(m)

    # Open the files before the outage: creating a name needs a lookup in the store.
    sizes = {"small.txt": 1000, "medium.bin": 3 * MiB + 7, "large.bin": 20 * MiB + 3,
             "existing.bin": 200_000, "synced.bin": 2 * MiB}
    data = {n: os.urandom(s) for n, s in sizes.items()}
    fds = {n: os.open(os.path.join(m.path, n), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
           for n in sizes}

    mark = proxy.mark()
    outage = proxy.fail(503, bucket=bucket)          # every request: 503 SlowDown

    def write_and_close(name):
        os.write(fds[name], data[name])
        os.close(fds.pop(name))
    for name in ("small.txt", "medium.bin", "large.bin", "existing.bin"):
        Background(write_and_close, name).result(30, f"write + close of {name} in the outage")

    os.write(fds["synced.bin"], data["synced.bin"])
    fsync = Background(os.fsync, fds["synced.bin"])
    # fsync is still waiting after the store refused that upload twice.
    proxy.wait_for(2, timeout=60, since=mark, bucket=bucket, key="synced.bin", method="PUT",
                   status=503)
    assert not fsync.done.is_set(), "fsync returned while the store was unavailable"
    # Let the outage outlast the store client's own retries: whole upload attempts fail and
    # are rescheduled by the write-back layer.
    wait_until(lambda: status(m)["upload_errors"] >= 1, 90, interval=0.1,
               what="a failed upload attempt")
    assert not fsync.done.is_set(), "fsync returned while the store was unavailable"
    for name in sizes:
        assert not in_bucket(s3, bucket, name) or name == "existing.bin"
    assert obj(s3, bucket, "existing.bin", raw) == old

    outage.remove()
    fsync.result(90, "fsync after the outage ended")
    assert obj(s3, bucket, "synced.bin", raw) == data["synced.bin"]   # durable when it returned
    os.close(fds.pop("synced.bin"))

    for name in ("small.txt", "medium.bin", "large.bin", "existing.bin"):
        wait_durable(s3, bucket, name, raw, data[name], timeout=45)
        assert read_file(os.path.join(m.path, name)) == data[name]
    s = wait_idle(m)
    assert s["upload_errors"] >= 1 and "SlowDown" in (s["last_error"] or ""), s
    for name in sizes:      # every upload met the outage, and still nothing was lost
        assert proxy.count(since=mark, bucket=bucket, key=name, status=503) >= 1, name


def test_fsync_timeout_fails_with_eio_during_outage(proxy, mounter, bucket, key, s3):
    m = mounter(bucket, key[0], "--fsync-timeout", "2", endpoint=proxy.url)
    path = os.path.join(m.path, "f.bin")
    data = os.urandom(500_000)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        held = proxy.hold(bucket=bucket)             # the store hangs: no answer at all
        os.write(fd, data)
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            Background(os.fsync, fd).result(30, "fsync with --fsync-timeout 2")
        elapsed = time.monotonic() - t0
        assert e.value.errno == errno.EIO
        assert 1.5 <= elapsed < 20, elapsed
        assert held.held >= 1                     # its upload was really stuck at the proxy
    finally:
        os.close(fd)
    assert re.search(r"fsync .*f\.bin.*(not durable|TimedOut)", m.log), m.log[-2000:]
    assert not in_bucket(s3, bucket, "f.bin")
    held.release()
    wait_durable(s3, bucket, "f.bin", key[1], data)


# ---------------------------------------------------------------------------- d. cache bound
def test_cache_stays_bounded_while_copying_three_times_its_size(proxy, mounter, bucket, key,
                                                                 s3):
    """--cache-size 64M, 12 files of 16 MiB written through the mount.

    Bound asserted at every sample: 64 MiB (the cache size) + 16 MiB (one file: the file being
    written is admitted even when the cache is full of dirty data, see Cache.wait_for_room)
    + 1 MiB slack. The slack covers what the daemon does not count: 8 bytes of slot header
    per 128 KiB chunk (~4 KiB for 64 MiB), the 4 KiB block rounding at the ends of each
    entry's run of slots and its journal record (~12 KiB per entry, 12 entries): ~150 KiB.
    Once everything is uploaded and nothing is open: 64 MiB + 1 MiB (clean data beyond the
    bound is evicted), and the blocks on disk match what the daemon accounts for (+-1 MiB):
    otherwise the disk use grows with the data that went through, i.e. it is not bounded."""
    bound, one_file, slack, n = 64 * MiB, 16 * MiB, 1 * MiB, 12
    m = mounter(bucket, key[0], "--cache-size", "64M", endpoint=proxy.url)
    digests = {}
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], cache_disk_usage(m))
            stop.wait(0.05)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for i in range(n):
            data = os.urandom(16 * MiB)
            digests[f"f{i:02d}.bin"] = sha(data)
            Background(write_file, os.path.join(m.path, f"f{i:02d}.bin"), data).result(
                120, f"write of file {i}")
            peak[0] = max(peak[0], cache_disk_usage(m))
            assert peak[0] <= bound + one_file + slack, \
                f"cache uses {peak[0] / MiB:.1f} MiB after file {i}"
        s = wait_idle(m, timeout=120)
    finally:
        stop.set()
        sampler.join()
    after = cache_disk_usage(m)
    assert peak[0] <= bound + one_file + slack, f"peak {peak[0] / MiB:.1f} MiB"
    for name, digest in digests.items():
        assert sha(obj(s3, bucket, name, key[1])) == digest, name
    assert s["cache_used_bytes"] <= bound
    assert after <= bound + slack, \
        f"{after / MiB:.1f} MiB on disk after the copy (peak {peak[0] / MiB:.1f} MiB)"
    assert abs(after - s["cache_used_bytes"]) <= slack, \
        f"disk {after / MiB:.1f} MiB vs accounted {s['cache_used_bytes'] / MiB:.1f} MiB"


# ---------------------------------------------------------------------------- e. coalescing
def test_editor_saves_coalesce_into_one_upload(proxy, mounter, bucket, key, s3):
    m = mounter(bucket, key[0], "--writeback-delay", "2", endpoint=proxy.url)
    path = os.path.join(m.path, "notes.txt")
    versions = [os.urandom(50_000 + i) for i in range(5)]
    t0 = time.monotonic()
    for v in versions:                          # open(O_TRUNC) / write / close, five times
        write_file(path, v)
    assert time.monotonic() - t0 < 2, "the five saves took longer than the write-back delay"
    wait_durable(s3, bucket, "notes.txt", key[1], versions[-1])
    wait_idle(m)
    puts = proxy.count(bucket=bucket, key="notes.txt", method=WRITES)
    assert 1 <= puts <= 2, proxy.requests(bucket=bucket, key="notes.txt", method=WRITES)
    assert read_file(path) == versions[-1]


# ---------------------------------------------------------------------------- f. two mounts
def test_two_mounts_see_each_others_changes(mounter, bucket, key, s3):
    a = mounter(bucket, key[0], "--attr-timeout", "1", name="a")
    b = mounter(bucket, key[0], "--attr-timeout", "1", name="b")
    pa, pb = os.path.join(a.path, "shared.bin"), os.path.join(b.path, "shared.bin")
    assert not os.path.exists(pb)               # B has looked the name up: not there
    v1, v2 = os.urandom(700_000), os.urandom(700_000)

    write_file(pa, v1)
    wait_durable(s3, bucket, "shared.bin", key[1], v1)
    wait_until(lambda: read_file(pb) == v1, 1 + 3, interval=0.05,
               what="B to see the new file within the attribute timeout")
    assert read_file(pb) == v1                  # now cached by B (its chunk cache)
    etag1 = s3.head_object(Bucket=bucket, Key="shared.bin", **sse(key[1]))["ETag"]

    write_file(pa, v2)                          # same size, other content
    wait_durable(s3, bucket, "shared.bin", key[1], v2)
    assert s3.head_object(Bucket=bucket, Key="shared.bin", **sse(key[1]))["ETag"] != etag1
    wait_until(lambda: read_file(pb) == v2, 1 + 3, interval=0.05,
               what="B to see the overwrite on a fresh open")
    with open(pb, "rb") as f:
        assert f.read() == v2


# ---------------------------------------------------------------------------- g. corruption
def test_corrupt_cache_chunk_is_never_served(mounter, bucket, key, s3):
    m = mounter(bucket, key[0])
    path = os.path.join(m.path, "c.bin")
    data = os.urandom(1 * MiB)
    write_file(path, data)
    wait_durable(s3, bucket, "c.bin", key[1], data)
    wait_idle(m)
    assert read_file(path) == data              # cached now
    entries = os.path.join(m.cache_dir, "entries")
    datas = [os.path.join(entries, n) for n in os.listdir(entries) if n.endswith(".data")]
    newest = max(datas, key=os.path.getmtime)
    assert os.path.getsize(newest) > BASE + 8 * SLOT
    # In the middle of chunk 4's first slot: inside its sealed ciphertext (docs/CACHE.md layout)
    off = BASE + 8 * SLOT + 64 * 1024
    with open(newest, "r+b") as f:
        f.seek(off)
        chunk = f.read(16)
        f.seek(off)
        f.write(bytes(b ^ 0xA5 for b in chunk))

    try:
        got = read_file(path)
    except OSError as e:
        assert e.errno == errno.EIO, e
    else:
        assert got == data, "altered bytes were served from a corrupt cache chunk"
    with open(path, "rb") as f:        # page by page too: no read may return altered bytes
        for off in range(0, len(data), 65536):
            try:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                piece = os.pread(f.fileno(), 65536, off)
            except OSError as e:
                assert e.errno == errno.EIO, e
                continue
            # a chunk may be sealed in 4 KiB sub-blocks, each checked on its own: a read may
            # return the intact part before the damaged sub-block (a short read, the bytes
            # authentic), and the read of what follows then fails
            assert piece == data[off:off + len(piece)], f"altered bytes at offset {off}"
            if len(piece) < 65536:
                with pytest.raises(OSError) as exc:
                    os.pread(f.fileno(), 65536 - len(piece), off + len(piece))
                assert exc.value.errno == errno.EIO
    assert re.search(r"failed authentication", m.log), m.log[-2000:]
    assert re.search(r"read /c\.bin: IntegrityError: .* -> EIO", m.log), m.log[-2000:]


# ---------------------------------------------------------------------------- h. rename/unlink
def test_rename_and_unlink_of_queued_dirty_files(proxy, mounter, bucket, key, s3):
    """One upload worker, busy with a held upload: the other dirty files wait in the queue.
    Renamed, one is uploaded under its new name only; unlinked, the other is never sent."""
    m = mounter(bucket, key[0], "--upload-workers", "1", endpoint=proxy.url)
    raw = key[1]
    blocker = proxy.hold(method=WRITES, bucket=bucket, key="blocker.bin")
    blocker_data = os.urandom(100_000)
    write_file(os.path.join(m.path, "blocker.bin"), blocker_data)
    blocker.wait_held(1, timeout=20)
    moved, gone = os.urandom(400_000), os.urandom(400_000)
    write_file(os.path.join(m.path, "draft.bin"), moved)
    write_file(os.path.join(m.path, "scratch.bin"), gone)
    assert status(m)["dirty_files"] == 3

    Background(os.rename, os.path.join(m.path, "draft.bin"),
               os.path.join(m.path, "final.bin")).result(20, "rename of a queued dirty file")
    Background(os.unlink, os.path.join(m.path, "scratch.bin")).result(
        20, "unlink of a queued dirty file")
    assert read_file(os.path.join(m.path, "final.bin")) == moved
    assert not os.path.exists(os.path.join(m.path, "scratch.bin"))

    blocker.release()
    wait_durable(s3, bucket, "final.bin", raw, moved)
    wait_durable(s3, bucket, "blocker.bin", raw, blocker_data)
    wait_idle(m)
    # Nothing was ever sent for the old name nor for the unlinked file: proven by the proxy.
    assert proxy.count(bucket=bucket, key="draft.bin", method=WRITES) == 0
    assert proxy.count(bucket=bucket, key="scratch.bin", method=WRITES) == 0
    assert not in_bucket(s3, bucket, "draft.bin")
    assert not in_bucket(s3, bucket, "scratch.bin")


def test_rename_and_unlink_while_the_upload_is_in_flight(proxy, mounter, bucket, key, s3):
    """The upload of the file itself is stuck at the proxy when it is renamed / unlinked:
    after the release the object exists under the new name only, the unlinked one not at all."""
    m = mounter(bucket, key[0], endpoint=proxy.url)
    raw = key[1]
    held = proxy.hold(method=WRITES, bucket=bucket, key_prefix="inflight-")
    a, b = os.urandom(300_000), os.urandom(300_000)
    write_file(os.path.join(m.path, "inflight-a.bin"), a)
    write_file(os.path.join(m.path, "inflight-b.bin"), b)
    held.wait_held(2, timeout=20)
    ren = Background(os.rename, os.path.join(m.path, "inflight-a.bin"),
                     os.path.join(m.path, "moved-a.bin"))
    unl = Background(os.unlink, os.path.join(m.path, "inflight-b.bin"))
    held.release()
    ren.result(60, "rename")
    unl.result(60, "unlink")
    wait_durable(s3, bucket, "moved-a.bin", raw, a)
    wait_idle(m)
    fsync_dir(m.path)            # the deletes are done (SEMANTICS, "Deletes")
    assert not in_bucket(s3, bucket, "inflight-a.bin")
    assert not in_bucket(s3, bucket, "inflight-b.bin")
    assert read_file(os.path.join(m.path, "moved-a.bin")) == a
    assert not os.path.exists(os.path.join(m.path, "inflight-b.bin"))
    assert not os.path.exists(os.path.join(m.path, "inflight-a.bin"))


def test_a_stuck_upload_being_renamed_does_not_freeze_other_files(proxy, mounter, bucket, key,
                                                                  s3):
    """A rename must wait for the upload of its own file, not block the rest of the mount:
    while it waits, another (already durable) file in another directory opens and reads."""
    m = mounter(bucket, key[0], endpoint=proxy.url)
    os.mkdir(os.path.join(m.path, "other"))
    other = os.path.join(m.path, "other", "readme.txt")
    write_file(other, b"unrelated\n")
    wait_durable(s3, bucket, "other/readme.txt", key[1], b"unrelated\n")
    wait_idle(m)
    assert read_file(other) == b"unrelated\n"

    held = proxy.hold(method=WRITES, bucket=bucket, key="stuck.bin")
    data = os.urandom(200_000)
    write_file(os.path.join(m.path, "stuck.bin"), data)
    held.wait_held(1, timeout=20)
    ren = Background(os.rename, os.path.join(m.path, "stuck.bin"),
                     os.path.join(m.path, "renamed.bin"))
    try:
        # For two seconds of the rename's wait, open and read the other file over and over:
        # each must come back promptly (the upload stays stuck all along).
        deadline = time.monotonic() + 2
        reads = 0
        while time.monotonic() < deadline:
            got = Background(read_file, other).result(
                10, "open + read of an unrelated file while a rename waits for a stuck upload")
            assert got == b"unrelated\n"
            reads += 1
        assert not ren.done.is_set() and held.held >= 1, "the rename did not wait"
        assert reads > 1
    finally:
        held.release()
        ren.result(60, "rename after the release")
    wait_durable(s3, bucket, "renamed.bin", key[1], data)


# ---------------------------------------------------------------------------- i. umount
def test_umount_waits_for_pending_uploads_and_status_shows_them(proxy, mounter, bucket, key,
                                                                s3):
    m = mounter(bucket, key[0], "--writeback-delay", "30", endpoint=proxy.url)
    proxy.delay(1.0, method=WRITES, bucket=bucket, key_prefix="slow-")
    files = {f"slow-{i}.bin": os.urandom(1 * MiB + i) for i in range(4)}
    for name, data in files.items():
        write_file(os.path.join(m.path, name), data)

    r = run_ssecfs("status", m.path)
    assert r.returncode == 0, r.stderr
    got = re.search(r"dirty files:\s+(\d+)", r.stdout)
    assert got and int(got.group(1)) == len(files), r.stdout
    # a reader that goes away (`ssecfs status | head -1`): no traceback, SIGPIPE's status
    rd, wr = os.pipe()
    os.close(rd)
    try:
        p = subprocess.run(ssecfs_cmd() + ["status", m.path], stdout=wr, stderr=subprocess.PIPE,
                           text=True, timeout=60)
    finally:
        os.close(wr)
    assert p.returncode == 141 and "Traceback" not in p.stderr, (p.returncode, p.stderr)
    for name in files:
        assert not in_bucket(s3, bucket, name)

    t0 = time.monotonic()
    m.umount()
    assert time.monotonic() - t0 >= 1.0          # it did wait for the slow uploads
    for name, data in files.items():              # no polling: durable when umount returned
        assert obj(s3, bucket, name, key[1]) == data, name
    assert proxy.count(bucket=bucket, key_prefix="slow-", method=WRITES, status=2) >= len(files)
