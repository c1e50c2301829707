"""Special files and atime on a real mount (SeaweedFS, SSE-C), with real tools: mkfifo, mknod,
tar, cp -a, touch; as root and as a throw-away unprivileged user through --allow-other.
The rules themselves are unit-tested in tests/test_nodes.py."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import threading

import pytest

from helpers import as_user, assert_sse_c_only, sse
from test_ownership_mount import DENIED, NOT_PERMITTED, ok, refused, shared_dir

pytestmark = pytest.mark.mount

NULL = os.makedev(1, 3)
LOOP = os.makedev(7, 200)
NODES = {"fifo": (stat.S_IFIFO, 0), "null": (stat.S_IFCHR, NULL),
         "loop": (stat.S_IFBLK, LOOP), "sock": (stat.S_IFSOCK, 0)}


def make_nodes(d: str) -> None:
    for name, (kind, dev) in NODES.items():
        os.mknod(os.path.join(d, name), kind | 0o640, dev)


def kind_of(path: str) -> tuple:
    s = os.lstat(path)
    return stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_rdev


def test_special_files_are_stored_and_read_back_after_a_remount(mnt, s3):
    m, bucket, raw = mnt
    make_nodes(m.path)
    for name, (kind, dev) in NODES.items():
        assert kind_of(os.path.join(m.path, name)) == (kind, 0o640, dev), name
        h = s3.head_object(Bucket=bucket, Key=name, **sse(raw))
        assert h["ContentLength"] == 0
        assert int(h["Metadata"]["mode"]) == kind | 0o640
        assert h["Metadata"].get("rdev") == (str(dev) if dev else None)
        assert_sse_c_only(s3, bucket, name)
    m.umount()
    m.mount()
    for name, (kind, dev) in NODES.items():
        assert kind_of(os.path.join(m.path, name)) == (kind, 0o640, dev), name
    listing = subprocess.run(["ls", "-l", m.path], capture_output=True, text=True,
                             check=True).stdout.splitlines()[1:]
    assert sorted(line[0] + line.split()[-1] for line in listing) == \
        ["bloop", "cnull", "pfifo", "ssock"]


def test_chmod_chown_utime_rename_unlink_of_special_files(mnt):
    m, _, _ = mnt
    make_nodes(m.path)
    for name, (kind, dev) in NODES.items():
        p = os.path.join(m.path, name)
        os.chmod(p, 0o604)
        os.chown(p, 123, 456)
        os.utime(p, ns=(1_400_000_000_500_000_000, 1_500_000_000_250_000_000))
        q = p + ".moved"
        os.rename(p, q)
        assert not os.path.lexists(p)
        s = os.lstat(q)
        assert (s.st_mode, s.st_rdev, s.st_uid, s.st_gid) == (kind | 0o604, dev, 123, 456)
        assert (s.st_atime_ns, s.st_mtime_ns) == (1_400_000_000_500_000_000,
                                                  1_500_000_000_250_000_000)
        os.unlink(q)
        assert not os.path.lexists(q)
    assert os.listdir(m.path) == []


def test_a_fifo_is_a_pipe_of_this_machine_and_a_device_node_opens_nothing(mnt):
    """FUSE does not route the I/O of special files to the filesystem: the kernel opens a
    FIFO as a local pipe; the mount is nodev (as FUSE mounts are), so a device node in a
    bucket never opens a device of the machine."""
    m, _, _ = mnt
    make_nodes(m.path)
    got = []
    reader = threading.Thread(target=lambda: got.append(
        open(os.path.join(m.path, "fifo"), "rb").read()))
    reader.start()
    with open(os.path.join(m.path, "fifo"), "wb") as w:
        w.write(b"through the pipe")
    reader.join(30)
    assert got == [b"through the pipe"]
    with pytest.raises(PermissionError):
        open(os.path.join(m.path, "null"), "rb")


def test_tar_and_cp_a_carry_a_tree_with_special_files_both_ways(mnt, tmp_path):
    m, _, _ = mnt
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"file")
    os.symlink("sub/f", src / "link")
    make_nodes(str(src / "sub"))
    dst = os.path.join(m.path, "t")
    os.mkdir(dst)
    subprocess.run(f"tar -C {src} -cf - . | tar -C {dst} -xpf -", shell=True, check=True)
    subprocess.run(["cp", "-a", str(src), os.path.join(m.path, "c")], check=True)
    back = tmp_path / "back"
    back.mkdir()
    subprocess.run(f"tar -C {dst} -cf - . | tar -C {back} -xpf -", shell=True, check=True)
    for root in (dst, os.path.join(m.path, "c"), str(back)):
        for name, (kind, dev) in NODES.items():
            if name == "sock" and root != os.path.join(m.path, "c"):
                continue                    # tar does not archive sockets; cp -a copies them
            p = os.path.join(root, "sub", name)
            assert kind_of(p) == (kind, 0o640, dev), p
            assert os.lstat(p).st_mtime_ns // 10**9 == os.lstat(src / "sub" / name).st_mtime_ns // 10**9
        assert open(os.path.join(root, "link"), "rb").read() == b"file"


def test_a_read_only_mount_refuses_special_files(mounter, bucket, key):
    m = mounter(bucket, key[0], "--read-only")
    for make in (lambda p: os.mkfifo(p), lambda p: os.mknod(p, stat.S_IFCHR | 0o600, NULL)):
        with pytest.raises(OSError) as e:
            make(os.path.join(m.path, "x"))
        assert e.value.errno == errno.EROFS


def test_atime_is_kept_when_set_and_not_moved_by_reads(mnt, s3):
    m, bucket, raw = mnt
    p = os.path.join(m.path, "f")
    with open(p, "wb") as f:
        f.write(b"data")
    os.utime(p, ns=(1_300_000_000_125_000_000, 1_600_000_000_000_000_000))
    with open(p, "rb") as f:
        assert f.read() == b"data"
    subprocess.run(["touch", "-m", "-d", "@1700000000", p], check=True)
    s = os.stat(p)
    assert (s.st_atime_ns, s.st_mtime_ns) == (1_300_000_000_125_000_000,
                                              1_700_000_000_000_000_000)
    subprocess.run(["touch", "-a", "-d", "@1350000000", p], check=True)
    m.umount()
    assert s3.head_object(Bucket=bucket, Key="f", **sse(raw))["Metadata"]["atime"] == \
        "1350000000"
    m.mount()
    with open(p, "rb") as f:
        f.read()
    s = os.stat(p)
    assert (s.st_atime, s.st_mtime) == (1_350_000_000, 1_700_000_000)
    d = os.path.join(m.path, "d")
    os.mkdir(d)
    os.utime(d, (1_100_000_000, 1_200_000_000))
    assert (os.stat(d).st_atime, os.stat(d).st_mtime) == (1_100_000_000, 1_200_000_000)


def test_other_users_special_files_and_times_are_their_own(mounter, bucket, key, users):
    a, b = users
    m = mounter(bucket, key[0], "--allow-other")
    shared = shared_dir(m)
    ok(as_user(a, "mkfifo p && python3 -c 'import os; "
                  "os.mknod(\"s\", 0o140600)' && touch f && "
                  "touch -a -d @1300000000 f && touch -m -d @1400000000 p", shared))
    for name, kind in (("p", stat.S_IFIFO), ("s", stat.S_IFSOCK), ("f", stat.S_IFREG)):
        s = os.lstat(os.path.join(shared, name))
        assert (stat.S_IFMT(s.st_mode), s.st_uid, s.st_gid) == (kind, a.pw_uid, a.pw_gid), name
    assert os.stat(os.path.join(shared, "f")).st_atime == 1_300_000_000
    assert os.lstat(os.path.join(shared, "p")).st_mtime == 1_400_000_000
    # devices need CAP_MKNOD (the kernel says so before the mount is asked); times and
    # modes of another user's entry are not b's to change
    refused(as_user(a, "mknod c c 1 3", shared), NOT_PERMITTED)
    refused(as_user(b, "touch -a -d @1 f", shared), DENIED)
    refused(as_user(b, "chmod 666 p", shared), NOT_PERMITTED)
    ok(as_user(a, "chmod 600 p && rm p s", shared))
    assert sorted(os.listdir(shared)) == ["f"]
