"""Concurrency through a real mount: many threads at once, for a bounded time, then every byte
accounted for -- through the mount, after a remount, and in the bucket.

* 16 "owner" threads, each with its own file: rewrite it whole, patch it in the middle with
  pwrite, read it back, rename it between two names in two directories, sometimes fsync. A
  file has one writer, so every read must return exactly that writer's last content.
* 4 threads pwrite() the same file through their own descriptors, each in its own region. The
  regions are 100,003 bytes long: neighbours share 128 KiB cache chunks, so a lost update of a
  shared chunk (read-modify-write race) shows up as another thread's stale bytes.
A watchdog bounds everything: a thread still running long after the deadline is a deadlock.
SSECFS_CONCURRENCY_SECONDS changes the duration (default 20).

A last test aims at one interleaving: a file opened again just as the write-back layer
finishes uploading it (the moment the proxy answers the upload). The data written through
that handle, and through the next one, must all survive.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time

import pytest

from helpers import read_cold, sse

pytestmark = pytest.mark.mount

DURATION = float(os.environ.get("SSECFS_CONCURRENCY_SECONDS", "20"))
OWNERS = 16
SHARED_WRITERS = 4
REGION = 100_003
WATCHDOG = DURATION + 90          # a thread still running then is stuck


def digest(b: bytes) -> str:
    return f"{len(b)} bytes sha256:{hashlib.sha256(b).hexdigest()[:12]}"


def stamp(tag: str, version: int, size: int, rng: random.Random) -> bytes:
    head = f"[{tag} v{version}]".encode()
    return (head + rng.randbytes(max(0, size - len(head))))[:size]


class Worker(threading.Thread):
    def __init__(self, name: str, fn, deadline: float):
        super().__init__(name=name, daemon=True)
        self.fn, self.deadline = fn, deadline
        self.error: BaseException | None = None
        self.ops = 0
        self.last_op = "start"

    def run(self):
        try:
            self.fn(self)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def owner(mnt: str, i: int, final: dict):
    rng = random.Random(i)
    names = [f"left/own-{i}", f"right/own-{i}"]
    cur, data, version = 0, b"", 0

    def path(k):
        return os.path.join(mnt, names[k])

    def body(w: Worker):
        nonlocal cur, data, version
        while time.monotonic() < w.deadline:
            version += 1
            w.last_op = f"rewrite v{version}"
            new = stamp(f"owner {i}", version, rng.choice([0, 1, 4096, 131072, 131073,
                                                            rng.randrange(300_000)]), rng)
            fd = os.open(path(cur), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                assert os.write(fd, new) == len(new)
                if version % 7 == 0:
                    w.last_op = f"fsync v{version}"
                    os.fsync(fd)
            finally:
                os.close(fd)
            data = new
            if version % 2 == 0 and data:
                w.last_op = f"patch v{version}"
                off = rng.randrange(len(data))
                patch = stamp(f"patch {i}.{version}", version, rng.randrange(1, 70_000), rng)
                fd = os.open(path(cur), os.O_RDWR)
                try:
                    os.pwrite(fd, patch, off)
                finally:
                    os.close(fd)
                buf = bytearray(data)
                buf[off:off + len(patch)] = patch
                data = bytes(buf)
            w.last_op = f"read v{version}"
            got = read_cold(path(cur))
            assert got == data, (f"owner {i} read {digest(got)} from {names[cur]}, its last "
                                 f"write was {digest(data)}")
            if version % 3 == 0:
                w.last_op = f"rename v{version}"
                os.rename(path(cur), path(1 - cur))
                cur = 1 - cur
                assert not os.path.lexists(path(1 - cur)), f"{names[1 - cur]} still there"
                got = read_cold(path(cur))
                assert got == data, f"owner {i} after rename: {digest(got)} != {digest(data)}"
            w.ops += 1
        final[i] = (names[cur], names[1 - cur], data)
    return body


def shared_writer(shared: str, j: int, final: dict):
    rng = random.Random(1000 + j)

    def body(w: Worker):
        fd = os.open(shared, os.O_RDWR)
        try:
            version = 0
            last = None
            while time.monotonic() < w.deadline:
                version += 1
                w.last_op = f"pwrite v{version}"
                block = stamp(f"shared {j}", version, REGION, rng)
                assert os.pwrite(fd, block, j * REGION) == REGION
                last = block
                if version % 10 == 0:
                    w.last_op = f"fsync v{version}"
                    os.fsync(fd)
                if version % 4 == 0:
                    w.last_op = f"pread v{version}"
                    got = os.pread(fd, REGION, j * REGION)
                    assert got == block, (f"shared writer {j} read back {digest(got)}, "
                                          f"wrote {digest(block)}")
                w.ops += 1
            final[j] = last
        finally:
            os.close(fd)
    return body


def test_many_threads_no_lost_or_torn_writes(mounter, bucket, key, s3):
    keyfile, raw = key
    m = mounter(bucket, keyfile, "--upload-workers", "4")
    os.mkdir(os.path.join(m.path, "left"))
    os.mkdir(os.path.join(m.path, "right"))
    shared = os.path.join(m.path, "shared.bin")
    with open(shared, "wb") as f:
        f.write(bytes(SHARED_WRITERS * REGION))

    owners_final: dict = {}
    shared_final: dict = {}
    deadline = time.monotonic() + DURATION
    workers = [Worker(f"owner-{i}", owner(m.path, i, owners_final), deadline)
               for i in range(OWNERS)]
    workers += [Worker(f"shared-{j}", shared_writer(shared, j, shared_final), deadline)
                for j in range(SHARED_WRITERS)]
    for w in workers:
        w.start()
    watchdog_end = time.monotonic() + WATCHDOG
    for w in workers:
        w.join(max(0.0, watchdog_end - time.monotonic()))
    stuck = [f"{w.name} (in {w.last_op}, {w.ops} ops done)" for w in workers if w.is_alive()]
    if stuck:
        from ssecfs.mount.registry import query_control, read_registry
        try:
            st = query_control(read_registry(m.path)["control"], timeout=5)
        except Exception as e:  # noqa: BLE001 - the daemon may be wedged too
            st = f"status unavailable: {e!r}"
        pytest.fail(f"deadlock: {len(stuck)} thread(s) still running {WATCHDOG:.0f}s after "
                    f"the start: {stuck}\ndaemon status: {st}\n{m.log[-4000:]}")
    errors = [f"{w.name}: {type(w.error).__name__}: {w.error}" for w in workers if w.error]
    assert not errors, "\n".join(errors) + f"\n--- daemon log ---\n{m.log[-4000:]}"
    assert all(w.ops >= 3 for w in workers), [(w.name, w.ops) for w in workers]
    assert len(owners_final) == OWNERS and len(shared_final) == SHARED_WRITERS

    expected = {name: data for name, _gone, data in owners_final.values()}
    expected["shared.bin"] = b"".join(shared_final[j] for j in range(SHARED_WRITERS))

    def check_mount(when: str):
        for i, (name, gone, data) in owners_final.items():
            got = read_cold(os.path.join(m.path, name))
            assert got == data, f"{when}: {name}: {digest(got)}, last write {digest(data)}"
            assert not os.path.lexists(os.path.join(m.path, gone)), f"{when}: {gone} is back"
        got = read_cold(shared)
        for j in range(SHARED_WRITERS):
            part = got[j * REGION:(j + 1) * REGION]
            assert part == shared_final[j], (f"{when}: shared.bin region {j}: {digest(part)} "
                                             f"starts {part[:24]!r}, want "
                                             f"{shared_final[j][:24]!r}")
        assert len(got) == SHARED_WRITERS * REGION
        names = {f"left/{n}" for n in os.listdir(os.path.join(m.path, "left"))} | \
                {f"right/{n}" for n in os.listdir(os.path.join(m.path, "right"))}
        assert names == {n for n in expected if n != "shared.bin"}, when

    check_mount("after the run")
    t0 = time.monotonic()
    m.umount()                          # uploads everything pending
    umount_took = time.monotonic() - t0
    in_bucket = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents") or []:
            if not o["Key"].endswith("/"):
                in_bucket[o["Key"]] = o["Size"]
    assert set(in_bucket) == set(expected), sorted(set(in_bucket) ^ set(expected))
    for name, data in expected.items():
        got = s3.get_object(Bucket=bucket, Key=name, **sse(raw))["Body"].read()
        assert got == data, f"bucket {name}: {digest(got)}, want {digest(data)}"
    m.mount()
    check_mount("after a remount")
    assert umount_took < 120, f"umount took {umount_took:.0f}s"


# ---------------------------------------------------------------------------- reopen vs upload
def test_reopen_as_the_upload_completes_loses_nothing(proxy, mounter, bucket, key, s3):
    """close() schedules an upload; when it completes, the daemon forgets the (clean) file.
    An open() at that very moment must still see one file: an append through it and a
    pwrite through the next open must both be in the final content, on the mount and in the
    bucket. Each round opens the file again the moment the proxy has answered the upload."""
    keyfile, raw = key
    m = mounter(bucket, keyfile, endpoint=proxy.url)
    want = {}
    for i in range(20):
        name = f"reopen-{i}"
        path = os.path.join(m.path, name)
        base = os.urandom(278)
        mark = proxy.mark()
        with open(path, "wb") as f:
            f.write(base)
        proxy.wait_for(1, timeout=30, since=mark, key=name, op="PutObject", status=200)
        tail = os.urandom(131073)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, tail)
        finally:
            os.close(fd)
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, b"ZZZZ", 0)
        finally:
            os.close(fd)
        want[name] = b"ZZZZ" + base[4:] + tail
    m.umount()                                   # every upload done
    lost = {}
    for name, data in want.items():
        got = s3.get_object(Bucket=bucket, Key=name, **sse(raw))["Body"].read()
        if got != data:
            lost[name] = f"{len(got)} bytes (want {len(data)}), starts {got[:4]!r}"
    m.mount()
    for name, data in want.items():
        got = read_cold(os.path.join(m.path, name))
        if got != data and name not in lost:
            lost[name] = f"mount: {len(got)} bytes (want {len(data)})"
    assert not lost, f"{len(lost)}/{len(want)} files lost a write: {lost}"
