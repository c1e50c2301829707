"""Special files (mknod of FIFOs, devices, sockets) and atime, without a kernel: over the
SSE-C-enforcing in-memory store. The same on a real mount: tests/test_posix_mount.py."""

from __future__ import annotations

import os
import stat

import pytest

from ssecfs.errors import Exists, InvalidName, NotFound, ReadOnly
from ssecfs.fs.dirindex import MIN_FILES
from test_dirindex import LONG, age, heads_of_files, listed_attrs
from test_fs_unit import make_fs, ring, settle, store, write_file  # noqa: F401 - fixtures

TTY = os.makedev(4, 64)
LOOP = os.makedev(7, 3)
SPECIAL = [(stat.S_IFIFO, 0), (stat.S_IFCHR, TTY), (stat.S_IFBLK, LOOP), (stat.S_IFSOCK, 0)]


@pytest.mark.parametrize("kind,rdev", SPECIAL, ids=["fifo", "chr", "blk", "sock"])
def test_mknod_stores_a_zero_byte_object_with_the_type_in_its_mode(make_fs, store, kind, rdev):
    fs = make_fs()
    fs.mknod("/n", kind | 0o640, rdev, 1001, 1002)
    md = store.meta("n")
    assert store.data("n") == b""
    assert int(md["mode"]) == kind | 0o640, "the type bits as s3fs-fuse writes them"
    assert (int(md["uid"]), int(md["gid"])) == (1001, 1002)
    assert md.get("rdev") == (str(rdev) if rdev else None), "a number only for devices"
    for mount in (fs, make_fs()):                 # this mount, and a cold one
        a = mount.getattr("/n")
        assert (a.mode, a.rdev, a.size, a.uid, a.gid) == (kind | 0o640, rdev, 0, 1001, 1002)
        assert mount.known_kind("/n") == kind


def test_mknod_refuses_what_is_not_a_special_file_and_names_taken(make_fs):
    fs = make_fs()
    with pytest.raises(InvalidName):
        fs.mknod("/d", stat.S_IFDIR | 0o755, 0)
    fs.mknod("/p", stat.S_IFIFO | 0o644, 0)
    with pytest.raises(Exists):
        fs.mknod("/p", stat.S_IFIFO | 0o644, 0)
    with pytest.raises(NotFound):
        fs.mknod("/missing/p", stat.S_IFIFO | 0o644, 0)
    with pytest.raises(ReadOnly):
        make_fs(read_only=True).mknod("/q", stat.S_IFIFO | 0o644, 0)


def test_a_device_node_keeps_its_type_and_number_through_every_change(make_fs, store):
    fs = make_fs()
    fs.mknod("/dev0", stat.S_IFCHR | 0o600, TTY)
    fs.chmod("/dev0", 0o660)
    fs.chown("/dev0", 7, 8)
    fs.utimens("/dev0", 1_500_000_000.5, 1_600_000_000.25)
    fs.rename("/dev0", "/tty")
    assert "dev0" not in store.keys()
    for mount in (fs, make_fs()):
        a = mount.getattr("/tty")
        assert (a.mode, a.rdev, a.uid, a.gid) == (stat.S_IFCHR | 0o660, TTY, 7, 8)
        assert (a.atime, a.mtime) == (1_500_000_000.5, 1_600_000_000.25)
    fs.unlink("/tty")
    assert "tty" not in store.keys()
    with pytest.raises(NotFound):
        make_fs().getattr("/tty")


def test_atime_is_the_creation_time_until_set_and_reads_leave_it(make_fs, store):
    fs = make_fs()
    fh = fs.create("/f", 0o644)
    born = fs.getattr("/f").atime
    fs.write(fh, b"data", 0)
    fs.release(fh)
    settle(fs)
    assert fs.getattr("/f").mtime > born and float(store.meta("f")["atime"]) == born
    fh = fs.open("/f", os.O_RDONLY)
    assert fs.read(fh, 10, 0) == b"data"
    fs.release(fh)
    assert make_fs().getattr("/f").atime == born, "a read does not move it (noatime)"

    fs.utimens("/f", 1_400_000_000.125, 1_600_000_000)
    assert store.meta("f")["atime"] == "1400000000.125000000", "s3fs-fuse's name and format"
    fs.utimens("/f", None, 1_700_000_000)            # touch -m: the atime stays
    fs.utimens("/f", None, None)                     # both omitted: nothing changes
    cold = make_fs()
    assert (cold.getattr("/f").atime, cold.getattr("/f").mtime) == \
        (1_400_000_000.125, 1_700_000_000)
    cold.utimens("/f", 1_450_000_000, None)          # touch -a: the mtime stays
    assert make_fs().getattr("/f").mtime == 1_700_000_000


def test_an_object_without_atime_reads_it_as_its_mtime_until_one_is_set(make_fs, store):
    store.put("aws", b"x", {"mtime": "1500000000"})   # as another tool writes it
    fs = make_fs()
    assert fs.getattr("/aws").atime is None
    fs.utimens("/aws", None, 1_000_000_000)          # touch -m: atime pinned where it read
    assert make_fs().getattr("/aws").atime == 1_500_000_000


def test_atime_of_an_open_dirty_file_and_of_a_directory(make_fs, store):
    fs = make_fs()
    fh = fs.create("/o", 0o644)
    fs.write(fh, b"abc", 0)
    fs.utimens("/o", 1_300_000_000, 1_300_000_001)
    fs.release(fh)
    settle(fs)
    assert float(store.meta("o")["atime"]) == 1_300_000_000
    fs.mkdir("/d", 0o755)
    fs.utimens("/d", 1_200_000_000, 1_200_000_001)
    assert (fs.getattr("/d").atime, fs.getattr("/d").mtime) == (1_200_000_000, 1_200_000_001)
    assert float(store.meta("d/")["atime"]) == 1_200_000_000


def test_metadata_written_by_s3fs_fuse_reads_back(make_fs, store):
    store.put("pipe", b"", {"mode": str(stat.S_IFIFO | 0o644), "uid": "5", "gid": "6",
                            "mtime": "1600000000", "atime": "1500000000"})
    store.put("bad", b"", {"mode": str(stat.S_IFREG | 0o644), "atime": "nan", "rdev": "-1"})
    a = make_fs().getattr("/pipe")
    assert (a.mode, a.atime, a.mtime, a.uid) == (stat.S_IFIFO | 0o644, 1_500_000_000,
                                                  1_600_000_000, 5)
    b = make_fs().getattr("/bad")
    assert (b.atime, b.rdev) == (None, 0), "malformed values are not believed"


def test_the_directory_index_carries_atime_and_device_numbers(make_fs, store):
    fs = make_fs(attr_timeout=LONG)
    fs.mkdir("/d", 0o755)
    for i in range(MIN_FILES + 2):
        write_file(fs, f"/d/f{i:02d}", b"x" * i)
    fs.mknod("/d/tty", stat.S_IFCHR | 0o620, TTY)
    fs.mknod("/d/fifo", stat.S_IFIFO | 0o600, 0)
    fs.utimens("/d/f01", 1_400_000_000.5, 1_600_000_000)
    settle(fs)
    age(store)
    assert fs.dirindex.flush(10)
    cold = make_fs(attr_timeout=LONG)
    mark = len(store.log)
    got = listed_attrs(cold)
    assert heads_of_files(store, mark) == [], "attributes from the index, no HEAD per file"
    assert (got["tty"].mode, got["tty"].rdev) == (stat.S_IFCHR | 0o620, TTY)
    assert got["fifo"].mode == stat.S_IFIFO | 0o600
    assert got["f01"].atime == 1_400_000_000.5
    assert got["f02"].atime == float(store.meta("d/f02")["atime"])
