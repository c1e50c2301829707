"""Files unlinked while open, through a real FUSE mount: usable through their descriptors
until the last close (read, write, fstat, ftruncate, fsync), nothing of them ever sent to the
bucket under any name (libfuse's `.fuse_hidden…` names included), nothing recovered after a
crash. Every request of the daemon goes through the test proxy, which records it."""

from __future__ import annotations

import os
import re
import tempfile

import pytest

from helpers import as_user, bucket_etags, sse, wait_until

pytestmark = pytest.mark.mount

MiB = 1024 * 1024
SENDS = ("PutObject", "CopyObject", "CreateMultipartUpload", "UploadPart", "UploadPartCopy",
         "CompleteMultipartUpload")


def sent(proxy, bucket: str, since: int = 0) -> list:
    """The objects written since the mark (but the probe each mount makes)."""
    return [r for r in proxy.requests(since=since, bucket=bucket)
            if r.op in SENDS and not r.key.startswith(".ssecfs-probe")]


def no_hidden_name(proxy, bucket: str) -> None:
    """libfuse's names for open unlinked files never reach the store, not even in a HEAD."""
    assert [r for r in proxy.requests(bucket=bucket) if ".fuse_hidden" in r.key] == []


def pread_all(fd: int, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        got = os.pread(fd, min(MiB, size - len(out)), len(out))
        assert got, f"short read at {len(out)}"
        out += got
    assert os.pread(fd, 10, size) == b""
    return bytes(out)


def drop_page_cache(fd: int) -> None:
    """Reads after this reach the daemon, not the kernel's copy."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def test_an_open_file_unlinked_stays_usable_through_its_descriptor(proxy, mounter, bucket,
                                                                   key, s3):
    data = os.urandom(3 * MiB + 12345)
    m1 = mounter(bucket, key[0], name="writer")
    with open(os.path.join(m1.path, "f"), "wb") as f:
        f.write(data)
    m1.umount()                                        # uploaded; the reader's cache is cold
    assert s3.get_object(Bucket=bucket, Key="f", **sse(key[1]))["Body"].read() == data

    m = mounter(bucket, key[0], endpoint=proxy.url)
    path = os.path.join(m.path, "f")
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pread(fd, 10, 0) == data[:10]
        mark = proxy.mark()
        os.unlink(path)
        assert not os.path.exists(path) and "f" not in os.listdir(m.path)
        wait_until(lambda: "f" not in bucket_etags(s3, bucket), 30, what="object deleted")
        st = os.fstat(fd)
        assert (st.st_size, st.st_nlink) == (len(data), 0)
        drop_page_cache(fd)
        assert pread_all(fd, len(data)) == data

        assert os.pwrite(fd, b"written after the unlink", 100) == 24
        os.ftruncate(fd, 2 * MiB)
        os.fsync(fd)
        want = data[:100] + b"written after the unlink" + data[124:2 * MiB]
        assert os.fstat(fd).st_size == 2 * MiB
        drop_page_cache(fd)
        assert pread_all(fd, 2 * MiB) == want
    finally:
        os.close(fd)
    # a new file of the name is unrelated
    with open(path, "wb") as f:
        f.write(b"new")
    m.umount()
    assert bucket_etags(s3, bucket).keys() == {"f"}
    assert s3.get_object(Bucket=bucket, Key="f", **sse(key[1]))["Body"].read() == b"new"
    assert [r.key for r in sent(proxy, bucket, mark)] == ["f"]          # the new one only
    no_hidden_name(proxy, bucket)


def test_temporary_file_of_20_mib(proxy, mounter, bucket, key, s3):
    """TemporaryFile unlinks the file it makes at once (its fstat used to fail)."""
    m = mounter(bucket, key[0], endpoint=proxy.url)
    mark = proxy.mark()                                # (the mount's own probe before)
    data = os.urandom(20 * MiB)
    with tempfile.TemporaryFile(dir=m.path) as f:
        assert os.listdir(m.path) == []
        for off in range(0, len(data), MiB):
            f.write(data[off:off + MiB])
        f.flush()
        assert os.fstat(f.fileno()).st_size == len(data)
        os.fsync(f.fileno())
        drop_page_cache(f.fileno())
        f.seek(0)
        assert f.read() == data
        assert bucket_etags(s3, bucket) == {}
    m.umount()
    assert bucket_etags(s3, bucket) == {}
    assert sent(proxy, bucket, mark) == []
    no_hidden_name(proxy, bucket)


def test_a_file_replaced_by_rename_stays_usable(proxy, mounter, bucket, key, s3):
    m = mounter(bucket, key[0], endpoint=proxy.url)
    dst, src = os.path.join(m.path, "dst"), os.path.join(m.path, "src")
    with open(dst, "wb") as f:
        f.write(b"old content")
    with open(src, "wb") as f:
        f.write(b"replacement")
    with open(dst, "r+b") as f:
        os.rename(src, dst)
        assert sorted(os.listdir(m.path)) == ["dst"]
        f.write(b"OLD")
        f.flush()
        drop_page_cache(f.fileno())
        f.seek(0)
        assert f.read() == b"OLD content"
        assert os.fstat(f.fileno()).st_nlink == 0
        os.fchmod(f.fileno(), 0o600)                     # its attributes are its own
        os.fchown(f.fileno(), 123, 456)
        os.utime(f.fileno(), (1_000_000_000, 1_100_000_000))
        st = os.fstat(f.fileno())
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_atime, st.st_mtime) == \
            (0o600, 123, 456, 1_000_000_000, 1_100_000_000)
        assert os.stat(dst).st_uid == 0, "not the new file's"
    with open(dst, "rb") as f:
        assert f.read() == b"replacement"
    m.umount()
    assert bucket_etags(s3, bucket).keys() == {"dst"}
    assert s3.get_object(Bucket=bucket, Key="dst", **sse(key[1]))["Body"].read() == b"replacement"
    no_hidden_name(proxy, bucket)


def test_nothing_of_an_orphan_comes_back_after_a_crash(proxy, mounter, bucket, key, s3):
    m = mounter(bucket, key[0], endpoint=proxy.url)
    path = os.path.join(m.path, "c")
    base = os.urandom(MiB)
    with open(path, "wb") as f:
        f.write(base)
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDWR)
    tmp = tempfile.TemporaryFile(dir=m.path)
    try:
        os.pwrite(fd, b"dirty" * 1000, 0)
        os.close(os.open(path, os.O_RDONLY))           # a close journals the dirty file
        mark = proxy.mark()
        os.unlink(path)
        os.pwrite(fd, b"more after the unlink", 4096)
        tmp.write(os.urandom(3 * MiB))
        tmp.flush()
        wait_until(lambda: bucket_etags(s3, bucket) == {}, 30, what="object deleted")
        m.kill9()
    finally:
        for close in (lambda: os.close(fd), tmp.close):
            try:
                close()
            except OSError:
                pass                                   # the daemon is gone
    m.mount()
    assert re.search(r"0 file\(s\) recovered", m.log), m.log[-3000:]
    assert os.listdir(m.path) == []
    m.umount()
    assert bucket_etags(s3, bucket) == {}
    assert sent(proxy, bucket, mark) == []
    no_hidden_name(proxy, bucket)
    left = os.listdir(os.path.join(m.cache_dir, "entries"))
    assert left == [], left


def test_an_orphan_outlives_the_removal_of_its_directory(mounter, bucket, key):
    """Read and write go on through the handle; fstat asks libfuse by path, which it cannot
    build once the directory is gone too (docs/SEMANTICS.md)."""
    m = mounter(bucket, key[0])
    d = os.path.join(m.path, "d")
    os.mkdir(d)
    fd = os.open(os.path.join(d, "t"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"temporary")
        os.unlink(os.path.join(d, "t"))
        os.rmdir(d)
        assert not os.path.exists(d)
        assert os.pwrite(fd, b"T", 0) == 1
        drop_page_cache(fd)
        assert os.pread(fd, 100, 0) == b"Temporary"
        with pytest.raises(FileNotFoundError):
            os.fstat(fd)
    finally:
        os.close(fd)
    assert os.listdir(m.path) == []


def test_another_users_temporary_file_through_allow_other(mounter, bucket, key, users):
    """A temporary file of an unprivileged user: made, unlinked at once, used, closed."""
    a, _ = users
    m = mounter(bucket, key[0], "--allow-other")
    shared = os.path.join(m.path, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o1777)
    # what tmpfile() does, by a relative path (the user may not search the directories
    # above the mount point, which TemporaryFile's absolute path would need)
    script = ("import os\n"
              "fd = os.open('t', os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)\n"
              "os.unlink('t')\n"
              "os.write(fd, b'x' * 3000000); os.fsync(fd)\n"
              "st = os.fstat(fd)\n"
              "os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)\n"
              "n = len(os.pread(fd, 4000000, 0))\n"
              "print(st.st_uid, st.st_nlink, st.st_size, n, os.listdir('.'))\n")
    r = as_user(a, f"python3 -c \"{script}\"", shared)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(None, 4) == [str(a.pw_uid), "0", "3000000", "3000000", "[]\n"]
    assert os.listdir(shared) == []
