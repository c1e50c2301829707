"""Fault injection between the mount and the store (tests/proxy.py), a store that dies, and a
cache disk that fills up.

SEMANTICS ("Durability and crashes"): upload failures (network, 5xx, throttling) are retried
with backoff, forever while the mount lives, the data staying in the cache; a read is never
served altered bytes. Here: uploads finish through 503 SlowDown, 500 bursts and dropped
connections; a cold read succeeds through transient 503s and drops; latency corrupts nothing;
a CopyObject answered "200 OK" with an <Error> body (as S3 does) is not a success; SeaweedFS
killed and restarted under load is survived without a remount and without loss; a full cache
disk gives ENOSPC, keeps what was closed before, and the mount stays usable.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
import threading
import types

import pytest

from helpers import bucket_etags, read_cold, run_ssecfs, sse, wait_until

pytestmark = pytest.mark.mount

MiB = 1024 * 1024


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture
def small_tmpfs(tmp_path, mounter):
    """A 32 MiB tmpfs for a cache dir. Mounts made on it are registered in .mounts and torn
    down before the tmpfs is unmounted (depends on `mounter` for that order too)."""
    d = tmp_path / "tmpfs"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    holder = types.SimpleNamespace(path=str(d), mounts=[])
    try:
        yield holder
    finally:
        for m in holder.mounts:
            m.cleanup()
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


# ---------------------------------------------------------------------------- helpers
def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def fill_until_error(fd: int, mib: int = 64) -> tuple[list[int], int]:
    """Write `mib` MiB (more than the 32 MiB cache disk holds), then close fd: the errnos
    met by the writes and the close, and the bytes written before the first error."""
    errors, written = [], 0
    try:
        for _ in range(mib):
            os.write(fd, os.urandom(MiB))
            written += MiB
    except OSError as e:
        errors.append(e.errno)
    try:
        os.close(fd)
    except OSError as e:
        errors.append(e.errno)
    return errors, written


def obj(s3, bucket: str, key: str, raw: bytes) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key, **sse(raw))["Body"].read()


def wait_durable(s3, bucket, key, raw, data, timeout=90):
    want = sha(data)
    wait_until(lambda: sha(obj(s3, bucket, key, raw)) == want, timeout, interval=0.1,
               what=f"{key} durable in the bucket with the exact bytes")


def status(m) -> dict:
    from ssecfs.mount.registry import query_control, read_registry
    return query_control(read_registry(m.path)["control"])


def wait_idle(m, timeout=90) -> dict:
    def idle():
        s = status(m)
        return s if s["dirty_files"] == 0 and s["uploads_in_flight"] == 0 else None
    return wait_until(idle, timeout, interval=0.05, what="the daemon to be idle")


def errno_of(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


# ---------------------------------------------------------------------------- uploads
def test_uploads_complete_through_503_500_and_dropped_connections(proxy, mounter, bucket, key,
                                                                  s3):
    keyfile, raw = key
    m = mounter(bucket, keyfile, endpoint=proxy.url)
    files = {"small.txt": os.urandom(1000), "medium.bin": os.urandom(3 * MiB + 5),
             "multi.bin": os.urandom(20 * MiB + 7),          # multipart (> 16 MiB)
             "empty.bin": b"", "d/nested.bin": os.urandom(200_000)}
    os.mkdir(os.path.join(m.path, "d"))
    mark = proxy.mark()
    rules = [
        proxy.fail(503, code="SlowDown", times=3, op="PutObject", bucket=bucket),
        proxy.fail(500, times=3, op="PutObject", bucket=bucket),          # a burst of 500s
        proxy.drop(times=2, op="PutObject", bucket=bucket),
        proxy.fail(500, times=1, op="CreateMultipartUpload", bucket=bucket),
        proxy.fail(503, code="SlowDown", times=2, op="UploadPart", bucket=bucket),
        proxy.drop(times=1, op="UploadPart", bucket=bucket),
        proxy.fail(503, code="SlowDown", times=1, op="CompleteMultipartUpload", bucket=bucket),
    ]
    for name, data in files.items():
        write_file(os.path.join(m.path, name), data)
    for name, data in files.items():
        wait_durable(s3, bucket, name, raw, data, timeout=120)
    for r in rules:
        assert r.hits == r.times, f"fault not exercised: {r.__class__.__name__} " \
                                  f"{r.match.op} {r.hits}/{r.times}"
    assert proxy.count(since=mark, bucket=bucket, outcome="injected") == 10
    assert proxy.count(since=mark, bucket=bucket, outcome="dropped") == 3
    wait_idle(m)
    for name, data in files.items():
        assert read_cold(os.path.join(m.path, name)) == data, name
    # no half-finished multipart upload is left behind
    ups = s3.list_multipart_uploads(Bucket=bucket).get("Uploads") or []
    assert ups == [], [u["Key"] for u in ups]
    assert set(bucket_etags(s3, bucket)) == set(files) | {"d/"}
    m.umount()
    m.mount()
    for name, data in files.items():
        assert read_cold(os.path.join(m.path, name)) == data, name


# ---------------------------------------------------------------------------- reads
def test_cold_read_retries_through_transient_503_and_drops(proxy, mounter, bucket, key, s3):
    keyfile, raw = key
    data = os.urandom(9 * MiB + 11)
    s3.put_object(Bucket=bucket, Key="cold.bin", Body=data, **sse(raw))
    small = os.urandom(5000)
    s3.put_object(Bucket=bucket, Key="small.bin", Body=small, **sse(raw))
    m = mounter(bucket, keyfile, endpoint=proxy.url)
    mark = proxy.mark()
    # fewer failures in a row than the store client's attempts: the reader never notices
    r503 = proxy.fail(503, code="SlowDown", times=3, op="GetObject", bucket=bucket)
    rdrop = proxy.drop(times=1, op="GetObject", bucket=bucket)
    assert read_cold(os.path.join(m.path, "cold.bin")) == data
    assert (r503.hits, rdrop.hits) == (3, 1)
    # and random-access reads of another object through 500s
    r500 = proxy.fail(500, times=2, op="GetObject", bucket=bucket)
    fd = os.open(os.path.join(m.path, "small.bin"), os.O_RDONLY)
    try:
        assert os.pread(fd, 1000, 3000) == small[3000:4000]
    finally:
        os.close(fd)
    assert r500.hits == 2
    assert proxy.count(since=mark, op="GetObject", bucket=bucket, status=2) >= 1
    assert bucket_etags(s3, bucket).keys() == {"cold.bin", "small.bin"}


def test_slow_responses_do_not_corrupt(proxy, mounter, bucket, key, s3):
    keyfile, raw = key
    cold = os.urandom(6 * MiB + 1)
    s3.put_object(Bucket=bucket, Key="cold.bin", Body=cold, **sse(raw))
    m = mounter(bucket, keyfile, endpoint=proxy.url)
    mark = proxy.mark()
    proxy.delay(0.3, method=("GET", "PUT", "POST"), bucket=bucket)
    proxy.delay(0.1, method="HEAD", bucket=bucket)
    files = {f"slow-{i}.bin": os.urandom(size) for i, size in
             enumerate([10, 300_000, 2 * MiB + 3, 17 * MiB + 1])}
    errors = []

    def writer(name, data):
        try:
            write_file(os.path.join(m.path, name), data)
        except Exception as e:  # noqa: BLE001
            errors.append((name, e))
    threads = [threading.Thread(target=writer, args=kv, daemon=True) for kv in files.items()]
    for t in threads:
        t.start()
    assert read_cold(os.path.join(m.path, "cold.bin")) == cold
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads), errors
    for name, data in files.items():
        wait_durable(s3, bucket, name, raw, data, timeout=120)
        assert read_cold(os.path.join(m.path, name)) == data
    slow = [r for r in proxy.requests(since=mark, bucket=bucket, method=("GET", "PUT"))
            if r.ended and r.ended - r.started >= 0.3]
    assert len(slow) >= 5, "the latency was not applied"


def test_listing_while_the_store_fails_is_eio_then_recovers(proxy, mounter, bucket, key, s3):
    """A directory listing the store keeps refusing (5xx past the client's retries) fails
    with EIO -- the errno of a store failure, like every other operation -- and the next
    listing after the store is back works (no remount)."""
    keyfile, raw = key
    m = mounter(bucket, keyfile, endpoint=proxy.url)
    os.mkdir(os.path.join(m.path, "d"))
    write_file(os.path.join(m.path, "top.txt"), b"top\n")
    write_file(os.path.join(m.path, "d", "x.txt"), b"x\n")
    wait_durable(s3, bucket, "d/x.txt", raw, b"x\n")
    wait_idle(m)
    outage = proxy.fail(503, code="SlowDown", op=("ListObjectsV2", "ListObjects"),
                        bucket=bucket)
    got = errno_of(os.listdir, m.path)
    assert got == errno.EIO, f"listing during the outage: {errno.errorcode.get(got, got)}"
    assert outage.hits >= 1
    outage.remove()
    assert sorted(os.listdir(m.path)) == ["d", "top.txt"]
    assert os.listdir(os.path.join(m.path, "d")) == ["x.txt"]
    assert "Uncaught exception" not in m.log, m.log[-3000:]


# ---------------------------------------------------------------------------- 200 + <Error>
def test_copy_object_200_with_error_body_is_not_success(proxy, mounter, bucket, key, s3):
    """S3 may answer CopyObject with "200 OK" and an <Error> document in the body (the error
    happened after the headers were sent). Renames and metadata changes copy objects: such an
    answer must be retried or reported, and the source must never be lost."""
    keyfile, raw = key
    m = mounter(bucket, keyfile, endpoint=proxy.url)
    p = lambda *a: os.path.join(m.path, *a)  # noqa: E731
    data = {n: os.urandom(100_000 + i) for i, n in enumerate(["one.bin", "two.bin", "t/a.bin",
                                                               "t/b.bin"])}
    os.mkdir(p("t"))
    for n, d in data.items():
        write_file(p(n), d)
    for n, d in data.items():
        wait_durable(s3, bucket, n, raw, d)
    wait_idle(m)
    before = bucket_etags(s3, bucket)

    # one transient 200-error: the copy is retried, the rename succeeds, nothing is lost
    once = proxy.fail(200, code="InternalError", times=1, op="CopyObject", bucket=bucket,
                      message="We encountered an internal error. Please try again.")
    os.rename(p("one.bin"), p("one-renamed.bin"))
    assert once.hits == 1
    assert read_cold(p("one-renamed.bin")) == data["one.bin"]
    assert not os.path.lexists(p("one.bin"))
    assert obj(s3, bucket, "one-renamed.bin", raw) == data["one.bin"]
    assert "one.bin" not in bucket_etags(s3, bucket)

    # every CopyObject answered 200 + <Error>: rename and chmod fail, nothing moves or is lost
    always = proxy.fail(200, code="InternalError", op="CopyObject", bucket=bucket,
                        message="We encountered an internal error. Please try again.")
    mode_before = stat.S_IMODE(os.stat(p("two.bin")).st_mode)
    assert errno_of(os.rename, p("two.bin"), p("two-renamed.bin")) == errno.EIO
    assert errno_of(os.rename, p("t"), p("t-renamed")) == errno.EIO
    assert errno_of(os.chmod, p("two.bin"), 0o600) == errno.EIO
    assert always.hits >= 3
    always.remove()
    after = bucket_etags(s3, bucket)
    for n in ("two.bin", "t/a.bin", "t/b.bin"):
        assert after.get(n) == before[n], f"{n} changed or lost"
        assert obj(s3, bucket, n, raw) == data[n]
    assert not any(k.startswith(("two-renamed", "t-renamed")) for k in after), sorted(after)
    assert read_cold(p("two.bin")) == data["two.bin"]
    assert stat.S_IMODE(os.stat(p("two.bin")).st_mode) == mode_before
    assert sorted(os.listdir(p("t"))) == ["a.bin", "b.bin"]
    assert not os.path.lexists(p("two-renamed.bin")) and not os.path.lexists(p("t-renamed"))
    # and with the store healthy again the same operations work
    os.rename(p("t"), p("t-renamed"))
    assert read_cold(p("t-renamed", "a.bin")) == data["t/a.bin"]


# ---------------------------------------------------------------------------- store restart
def test_store_killed_and_restarted_under_load(mounter, bucket, key, s3, seaweed):
    """SeaweedFS is SIGKILLed while uploads and cold reads are in flight, then restarted on
    the same ports: the mount recovers by itself (no remount) and nothing is lost. During
    the outage a read may fail, but only with EIO, never with wrong bytes or ENOENT."""
    keyfile, raw = key
    endpoint_before = seaweed.endpoint
    m = mounter(bucket, keyfile)                        # straight to SeaweedFS
    cold = {f"cold-{i}.bin": os.urandom(6 * MiB + i) for i in range(3)}
    for k, d in cold.items():
        s3.put_object(Bucket=bucket, Key=k, Body=d, **sse(raw))
    # files opened before the outage (creating a name needs the store: a lookup)
    written = {f"w-{i}.bin": os.urandom(12 * MiB + i) for i in range(3)}
    fds = {n: os.open(os.path.join(m.path, n), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
           for n in written}
    big = os.urandom(40 * MiB)
    stop, killed, restarted = threading.Event(), threading.Event(), threading.Event()
    reads = {k: {"ok": 0, "ok_after": 0, "errnos": [], "bad": 0} for k in cold}
    writer_errors = []

    def reader(k):
        while not stop.is_set():
            try:
                got = read_cold(os.path.join(m.path, k))
            except OSError as e:
                reads[k]["errnos"].append(e.errno)
                continue
            if got != cold[k]:
                reads[k]["bad"] += 1
            else:
                reads[k]["ok"] += 1
                if restarted.is_set():
                    reads[k]["ok_after"] += 1

    def writer(n):
        try:
            d = written[n]
            for off in range(0, len(d), MiB):
                os.write(fds[n], d[off:off + MiB])
                if off == 4 * MiB:
                    killed.wait(60)          # the rest is written during the outage
            os.close(fds.pop(n))
        except Exception as e:  # noqa: BLE001
            writer_errors.append((n, e))

    readers = [threading.Thread(target=reader, args=(k,), daemon=True) for k in cold]
    writers = [threading.Thread(target=writer, args=(n,), daemon=True) for n in written]
    try:
        for t in readers + writers:
            t.start()
        wait_until(lambda: all(r["ok"] >= 1 for r in reads.values()), 60,
                   what="readers running")
        write_file(os.path.join(m.path, "big.bin"), big)
        wait_until(lambda: status(m)["uploads_in_flight"] >= 1, 30, interval=0.01,
                   what="the upload of big.bin to start")

        seaweed.kill()
        killed.set()
        for t in writers:
            t.join(60)
        assert not writer_errors, writer_errors
        assert not any(t.is_alive() for t in writers)
        # the outage is noticed: an upload attempt failed
        wait_until(lambda: status(m)["upload_errors"] >= 1, 90, interval=0.1,
                   what="an upload to fail during the outage")
        seaweed.start()
        restarted.set()
        assert seaweed.endpoint == endpoint_before, "SeaweedFS came back on another port"

        wait_until(lambda: all(r["ok_after"] >= 1 for r in reads.values()), 120, interval=0.1,
                   what="every reader to succeed again after the restart")
    finally:
        killed.set()
        stop.set()
        if seaweed.proc is None:          # never leave the session without its store
            seaweed.start()
    for t in readers:
        t.join(60)
    for k, r in reads.items():
        assert r["bad"] == 0, f"{k}: {r['bad']} read(s) returned wrong bytes"
        assert set(r["errnos"]) <= {errno.EIO}, f"{k}: read errors {set(r['errnos'])}"
    for n, d in {**written, "big.bin": big}.items():
        wait_durable(s3, bucket, n, raw, d, timeout=180)
    wait_idle(m, 120)
    for n, d in {**written, **cold, "big.bin": big}.items():
        assert read_cold(os.path.join(m.path, n)) == d, n
    m.umount()
    m.mount()
    assert sorted(os.listdir(m.path)) == sorted([*written, *cold, "big.bin"])
    for n, d in {**written, **cold, "big.bin": big}.items():
        assert read_cold(os.path.join(m.path, n)) == d, n


# ---------------------------------------------------------------------------- disk full
def test_cache_disk_full_gives_enospc_and_keeps_closed_files(small_tmpfs, proxy, mounter, bucket,
                                                             key, s3):
    keyfile, raw = key
    m = mounter(bucket, keyfile, endpoint=proxy.url,
                cache_dir=os.path.join(small_tmpfs.path, "cache"))
    small_tmpfs.mounts.append(m)
    p = lambda n: os.path.join(m.path, n)  # noqa: E731
    # closed before the disk fills, their uploads held: their only copy is in the cache
    hold = proxy.hold(method=("PUT", "POST"), bucket=bucket, key_prefix="before-")
    before = {f"before-{i}.bin": os.urandom(2 * MiB + i) for i in range(3)}
    for n, d in before.items():
        write_file(p(n), d)
    hold.wait_held(1, timeout=30)

    fd = os.open(p("big.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    errors, written = fill_until_error(fd)
    assert errors, f"{written // MiB} MiB written to a 32 MiB cache disk without an error"
    assert set(errors) == {errno.ENOSPC}, [errno.errorcode.get(e, e) for e in errors]

    hold.release()
    for n, d in before.items():
        wait_durable(s3, bucket, n, raw, d, timeout=60)
        assert read_cold(p(n)) == d
    # still usable: delete the big file, write again
    os.unlink(p("big.bin"))
    after = os.urandom(4 * MiB + 1)
    write_file(p("after.bin"), after)
    assert read_cold(p("after.bin")) == after
    wait_durable(s3, bucket, "after.bin", raw, after)
    assert set(bucket_etags(s3, bucket)) == {*before, "after.bin"}
    assert os.path.ismount(m.path)
    m.umount()


def test_clean_cached_data_gives_way_when_the_cache_disk_fills(small_tmpfs, mounter, bucket,
                                                                key, s3):
    """The disk under the cache fills up before the cache's bound (here 256 MiB on a 32 MiB
    disk): clean cached chunks (copies of what the bucket holds) are evicted to make room for
    new writes instead of failing them with ENOSPC."""
    keyfile, raw = key
    m = mounter(bucket, keyfile, cache_dir=os.path.join(small_tmpfs.path, "cache"))
    small_tmpfs.mounts.append(m)
    p = lambda n: os.path.join(m.path, n)  # noqa: E731
    first = os.urandom(20 * MiB)
    write_file(p("first.bin"), first)
    wait_durable(s3, bucket, "first.bin", raw, first)
    wait_idle(m)
    assert status(m)["cache_used_bytes"] >= 20 * MiB        # clean, still cached
    second = os.urandom(20 * MiB + 1)                       # does not fit beside it
    write_file(p("second.bin"), second)
    assert "cache disk full: evicted" in m.log
    wait_durable(s3, bucket, "second.bin", raw, second)
    assert read_cold(p("second.bin")) == second
    assert read_cold(p("first.bin")) == first               # fetched again


def test_umount_after_enospc_still_uploads_the_other_pending_files(small_tmpfs, mounter,
                                                                  bucket, key, s3):
    """SEMANTICS: `ssecfs umount` uploads every pending file before the daemon exits. A file
    whose writes failed with ENOSPC (and was closed, not deleted) must not stop that."""
    keyfile, raw = key
    m = mounter(bucket, keyfile, "--writeback-delay", "30",       # still pending at umount
                cache_dir=os.path.join(small_tmpfs.path, "cache"))
    small_tmpfs.mounts.append(m)
    fd = os.open(os.path.join(m.path, "big.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    pending = {f"pending-{i}.bin": os.urandom(MiB + i) for i in range(2)}
    for n, d in pending.items():
        write_file(os.path.join(m.path, n), d)
    errors, _ = fill_until_error(fd)
    assert errors and set(errors) == {errno.ENOSPC}, errors
    assert not set(pending) & set(bucket_etags(s3, bucket))       # nothing uploaded yet
    r = run_ssecfs("umount", m.path, timeout=90)              # bounded: it used to hang here
    assert r.returncode == 0, f"umount failed: {r.stderr}\n{m.log[-3000:]}"
    assert not os.path.ismount(m.path)
    for n, d in pending.items():
        assert n in bucket_etags(s3, bucket), \
            f"{n} not uploaded by umount\n--- daemon log ---\n{m.log[-3000:]}"
        assert obj(s3, bucket, n, raw) == d
