"""Interoperability with s3fs-fuse on real mounts of the same SSE-C bucket: special files
(FIFO, character device, socket), permission bits, owner, mtime and atime written by one tool
read the same through the other (ssecfs keeps them in s3fs-fuse's x-amz-meta-* names).

What s3fs-fuse does not keep: a device's number (x-amz-meta-rdev is ssecfs's own; s3fs shows
rdev 0 and its mknod stores none). Times: both write and read a fraction of nine digits
(s3fs reads the digits after the point as a count of nanoseconds: "1700000000.5" would be
5 ns past the second), so they agree on sub-second times both ways.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import stat
import subprocess

import pytest

from helpers import sse, wait_until

pytestmark = pytest.mark.mount

SEC = 1_000_000_000
ATIME_NS = 1_600_000_000 * SEC + 250_000_000     # distinct from mtime; both fractions exact
MTIME_NS = 1_700_000_000 * SEC + 500_000_000     # in binary (ssecfs keeps times as floats)
CHR_RDEV = os.makedev(1, 3)


def s3fs_binary() -> str:
    found = shutil.which("s3fs")
    if not found:
        pytest.skip("s3fs (s3fs-fuse) not installed: scripts/install apt-gets it")
    return found


class S3fsMount:
    """s3fs-fuse in the foreground, our child: SSE-C with the base64 of the raw key."""

    def __init__(self, binary, bucket, path, endpoint, passwd, keyfile_b64, log):
        self.argv = [binary, bucket, str(path), "-f",
                     "-o", f"url={endpoint},use_path_request_style",
                     "-o", f"passwd_file={passwd}", "-o", f"use_sse=custom:{keyfile_b64}"]
        self.path = str(path)
        self.log_path = str(log)
        self.proc: subprocess.Popen | None = None

    @property
    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def mount(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"s3fs exited with {self.proc.returncode}:\n"
                                     f"{self.log[-3000:]}")
            return os.path.ismount(self.path)
        try:
            wait_until(up, 60, interval=0.05, what="s3fs to mount")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log[-3000:]}") from None

    def cleanup(self) -> None:
        if os.path.ismount(self.path):
            def unmounted():
                subprocess.run(["fusermount", "-u", self.path], capture_output=True)
                return not os.path.ismount(self.path)
            try:
                wait_until(unmounted, 30, interval=0.2, what="s3fs to unmount")
            except AssertionError:
                subprocess.run(["fusermount", "-u", "-z", self.path], capture_output=True)
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def s3fs_mounter(mounter, seaweed, bucket, key, tmp_path):
    """Factory: s3fs_mounter(name) -> mounted S3fsMount of `bucket` under `key`.
    (Depends on `mounter` for its FUSE check, and so that s3fs is unmounted before the bucket
    is deleted.)"""
    binary = s3fs_binary()
    raw = key[1]
    keyfile_b64 = tmp_path / "sse.key.b64"
    passwd = tmp_path / "s3fs.passwd"
    creds = seaweed.env()
    for path, text in ((keyfile_b64, base64.b64encode(raw).decode() + "\n"),
                       (passwd, f"{creds['AWS_ACCESS_KEY_ID']}:{creds['AWS_SECRET_ACCESS_KEY']}\n")):
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    made: list[S3fsMount] = []

    def make(name="s3fs") -> S3fsMount:
        mp = tmp_path / name
        mp.mkdir(exist_ok=True)
        m = S3fsMount(binary, bucket, mp, seaweed.endpoint, passwd, keyfile_b64,
                      tmp_path / f"{name}.log")
        made.append(m)
        m.mount()
        return m

    yield make
    for m in made:
        m.cleanup()


def s3fs_version() -> str:
    r = subprocess.run([s3fs_binary(), "--version"], capture_output=True, text=True)
    return (r.stdout or r.stderr).splitlines()[0]


def wait_meta(s3, bucket, raw, key, want: dict) -> dict:
    """The object's x-amz-meta-* once it has every (name, value) of want (values compared as
    written, or by a predicate)."""
    def check():
        md = s3.head_object(Bucket=bucket, Key=key, **sse(raw))["Metadata"]
        for name, v in want.items():
            if name not in md or not (v(md[name]) if callable(v) else md[name] == v):
                return None
        return md
    return wait_until(check, 60, interval=0.1, what=f"metadata {want} on {key}")


def whole(value: str) -> int:
    """The whole seconds of a time as x-amz-meta-* spells it (decimal, optional fraction)."""
    return int(value.split(".")[0])


# What each test creates: name -> (type, permission bits, uid, gid)
SPECIALS = {"fifo": (stat.S_IFIFO, 0o640, 123, 456),
            "chr": (stat.S_IFCHR, 0o620, 124, 457),
            "sock": (stat.S_IFSOCK, 0o751, 125, 458)}
REG = ("file.txt", 0o604, 123, 456)


def make_specials(root: str) -> None:
    for name, (kind, perm, uid, gid) in SPECIALS.items():
        p = os.path.join(root, name)
        if kind == stat.S_IFIFO:
            os.mkfifo(p, 0o600)
        else:
            os.mknod(p, 0o600 | kind, CHR_RDEV if kind == stat.S_IFCHR else 0)
        os.chmod(p, perm)          # explicit: the umask does not decide the expected bits
        os.chown(p, uid, gid)


def make_file(root: str, data: bytes) -> str:
    name, perm, uid, gid = REG
    p = os.path.join(root, name)
    with open(p, "wb") as f:
        f.write(data)
    os.chmod(p, perm)
    os.chown(p, uid, gid)
    os.utime(p, ns=(ATIME_NS, MTIME_NS))
    return p


def assert_same_entry(name: str, a: os.stat_result, b: os.stat_result, kind: int, perm: int,
                      uid: int, gid: int) -> None:
    """Both views of name show the expected type, bits and owner, and the same whole seconds
    of mtime and atime."""
    for who, st in (("writer", a), ("reader", b)):
        got = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
        assert got == (kind, perm, uid, gid), \
            f"{name} through the {who}: (type, bits, uid, gid) {tuple(map(oct, got[:2]))}" \
            f"{got[2:]} != {(oct(kind), oct(perm), uid, gid)}"
    assert b.st_mtime_ns // SEC == a.st_mtime_ns // SEC, f"{name}: mtime {b} vs {a}"
    assert b.st_atime_ns // SEC == a.st_atime_ns // SEC, f"{name}: atime {b} vs {a}"


# ---------------------------------------------------------------------------- ssecfs -> s3fs
def test_s3fs_reads_what_ssecfs_writes(mounter, s3fs_mounter, bucket, key, s3):
    keyfile, raw = key
    m = mounter(bucket, keyfile)
    make_specials(m.path)
    data = b"written through ssecfs\n"
    make_file(m.path, data)

    # in the bucket, as s3fs-fuse spells it: the type in the mode, the owner, times in
    # seconds; the device's number in ssecfs's own x-amz-meta-rdev
    for n, (kind, perm, uid, gid) in SPECIALS.items():
        want = {"mode": str(kind | perm), "uid": str(uid), "gid": str(gid)}
        md = wait_meta(s3, bucket, raw, n, want)
        assert ("rdev" in md) == (kind == stat.S_IFCHR), f"{n}: {md}"
    fname, fperm, fuid, fgid = REG
    wait_meta(s3, bucket, raw, fname, {
        "mode": str(stat.S_IFREG | fperm), "uid": str(fuid), "gid": str(fgid),
        "mtime": lambda v: whole(v) == MTIME_NS // SEC,
        "atime": lambda v: whole(v) == ATIME_NS // SEC})
    assert s3.head_object(Bucket=bucket, Key="chr", **sse(raw))["Metadata"]["rdev"] \
        == str(CHR_RDEV)

    o = s3fs_mounter()                       # mounted now: nothing of ssecfs's is cached
    assert sorted(os.listdir(o.path)) == sorted([*SPECIALS, fname])
    for n, (kind, perm, uid, gid) in SPECIALS.items():
        a, b = os.lstat(os.path.join(m.path, n)), os.lstat(os.path.join(o.path, n))
        assert_same_entry(n, a, b, kind, perm, uid, gid)
        assert b.st_size == 0, f"{n}: {b}"
    a, b = os.lstat(os.path.join(m.path, fname)), os.lstat(os.path.join(o.path, fname))
    assert_same_entry(fname, a, b, stat.S_IFREG, fperm, fuid, fgid)
    # the times utime set, to the second, through both: s3fs reads x-amz-meta-atime
    assert (a.st_atime_ns // SEC, a.st_mtime_ns // SEC) == (ATIME_NS // SEC, MTIME_NS // SEC)
    assert (b.st_atime_ns // SEC, b.st_mtime_ns // SEC) == (ATIME_NS // SEC, MTIME_NS // SEC), \
        f"s3fs {s3fs_version()}: {b}"
    assert b.st_size == len(data)
    with open(os.path.join(o.path, fname), "rb") as f:
        assert f.read() == data              # the content too, under the same SSE-C key

    # rdev: ssecfs shows the device's number; s3fs-fuse ignores x-amz-meta-rdev (rdev 0)
    assert os.lstat(os.path.join(m.path, "chr")).st_rdev == CHR_RDEV
    assert os.lstat(os.path.join(o.path, "chr")).st_rdev == 0


def test_s3fs_reads_ssecfs_subsecond_times(mounter, s3fs_mounter, bucket, key, s3):
    """s3fs-fuse reads the digits after the point as nanoseconds: ssecfs writes all nine."""
    keyfile, raw = key
    m = mounter(bucket, keyfile)
    make_file(m.path, b"x")
    fname = REG[0]
    wait_meta(s3, bucket, raw, fname, {"mtime": lambda v: whole(v) == MTIME_NS // SEC,
                                      "atime": lambda v: whole(v) == ATIME_NS // SEC})
    o = s3fs_mounter()
    b = os.lstat(os.path.join(o.path, fname))
    assert (b.st_atime_ns, b.st_mtime_ns) == (ATIME_NS, MTIME_NS)


# ---------------------------------------------------------------------------- s3fs -> ssecfs
def test_ssecfs_reads_what_s3fs_writes(mounter, s3fs_mounter, bucket, key, s3):
    keyfile, raw = key
    o = s3fs_mounter()
    make_specials(o.path)
    data = b"written through s3fs-fuse\n"
    make_file(o.path, data)

    # what s3fs-fuse stores: the type in x-amz-meta-mode, the owner, and x-amz-meta-atime;
    # no device number
    for n, (kind, perm, uid, gid) in SPECIALS.items():
        md = wait_meta(s3, bucket, raw, n, {"mode": str(kind | perm), "uid": str(uid),
                                            "gid": str(gid)})
        assert "rdev" not in md, f"{n}: {md}"
    fname, fperm, fuid, fgid = REG
    md = wait_meta(s3, bucket, raw, fname, {
        "mode": str(stat.S_IFREG | fperm), "uid": str(fuid), "gid": str(fgid),
        "mtime": lambda v: whole(v) == MTIME_NS // SEC,
        "atime": lambda v: whole(v) == ATIME_NS // SEC})

    m = mounter(bucket, keyfile)             # mounted now: nothing cached
    assert sorted(os.listdir(m.path)) == sorted([*SPECIALS, fname])
    for n, (kind, perm, uid, gid) in SPECIALS.items():
        a, b = os.lstat(os.path.join(o.path, n)), os.lstat(os.path.join(m.path, n))
        assert_same_entry(n, a, b, kind, perm, uid, gid)
        # s3fs's times of a new entry are whole seconds: ssecfs reads them exactly
        assert (b.st_mtime_ns, b.st_atime_ns) == (a.st_mtime_ns, a.st_atime_ns), f"{n}"
        assert b.st_size == 0 and b.st_rdev == 0, f"{n}: {b}"   # no number to read
    a, b = os.lstat(os.path.join(o.path, fname)), os.lstat(os.path.join(m.path, fname))
    assert_same_entry(fname, a, b, stat.S_IFREG, fperm, fuid, fgid)
    # s3fs writes 9 digits of fraction: ssecfs reads the times utime set to the nanosecond
    assert (a.st_atime_ns, a.st_mtime_ns) == (ATIME_NS, MTIME_NS), f"s3fs {s3fs_version()}"
    assert (b.st_atime_ns, b.st_mtime_ns) == (ATIME_NS, MTIME_NS), f"ssecfs: {b} ({md})"
    assert b.st_size == len(data)
    with open(os.path.join(m.path, fname), "rb") as f:
        assert f.read() == data
