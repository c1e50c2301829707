"""Files unlinked, or replaced by a rename, while open (ssecfs/fs/orphans.py): usable through
their handles until the last close, kept in the cache only, never uploaded under any name,
and nothing of them recovered after a crash. Over the in-memory store, without a kernel."""

from __future__ import annotations

import errno
import os
from types import SimpleNamespace

import fuse
import pytest

from memstore import MemStore
from ssecfs.cache import CHUNK
from ssecfs.config import FsConfig, MountConfig
from ssecfs.crypto.keys import Key, KeyRing
from ssecfs.errors import NotFound
from ssecfs.fs.reader import READ_UNIT
from ssecfs.mount.adapter import FuseAdapter
from ssecfs.mount.daemon import fuse_mount_options
from test_fs_unit import (WRITE_OPS, crash_child, fs, make_fs, read_all, remote_file,  # noqa: F401
                          ring, scan_min, settle, store, write_file)

SIZE = 2 * READ_UNIT + 3 * CHUNK + 777       # past any prefetch at open, several read units


def read_fh(fs, fh, size: int, piece: int = 128 * 1024) -> bytes:
    out = bytearray()
    while len(out) < size:
        got = fs.read(fh, piece, len(out))
        assert got, f"short read at {len(out)}"
        out += got
    assert fs.read(fh, piece, len(out)) == b""
    return bytes(out)


def writes_since(store: MemStore, mark: int) -> list:
    return [(op, k) for op, k in store.log[mark:] if op in WRITE_OPS or op.startswith("mpu")]


def test_an_open_clean_file_unlinked_before_it_is_cached_stays_readable(fs, store):
    data = os.urandom(SIZE)
    remote_file(store, "f", data)
    fh = fs.open("/f", os.O_RDONLY)
    assert fs.read(fh, 10, 0) == data[:10]             # only the start is fetched
    fs.unlink("/f")
    assert not store.exists("f")
    with pytest.raises(NotFound):
        fs.getattr("/f")
    gets = store.calls["get_range"]
    assert read_fh(fs, fh, SIZE) == data               # all of it, from the cache alone
    assert store.calls["get_range"] == gets
    a = fs.getattr(None, fh)                           # fstat
    assert (a.size, a.nlink) == (SIZE, 0)
    fs.release(fh)
    assert store.keys() == []


def test_a_big_file_read_once_is_kept_whole_when_unlinked(fs, store, scan_min):
    """Scan resistance leaves the read units of a first sequential read out of the cache:
    the unlink fetches them all the same."""
    data = os.urandom(scan_min)
    remote_file(store, "big", data)
    fh = fs.open("/big", os.O_RDONLY)
    assert read_fh(fs, fh, scan_min) == data
    fs.unlink("/big")
    assert read_fh(fs, fh, scan_min) == data
    fs.release(fh)


def test_an_orphan_is_not_evicted(make_fs, store):
    fs = make_fs(max_bytes=4 * 1024 * 1024)
    data = os.urandom(3 * 1024 * 1024)
    remote_file(store, "kept", data)
    remote_file(store, "other", os.urandom(3 * READ_UNIT))
    fh = fs.open("/kept", os.O_RDONLY)
    fs.unlink("/kept")
    read_all(fs, "/other")                              # fills the cache over and over
    assert read_fh(fs, fh, len(data)) == data
    fs.release(fh)


def test_writes_after_unlink_are_read_back_and_never_uploaded(fs, store):
    fh = fs.create("/t", 0o600)
    fs.write(fh, b"a" * 3 * CHUNK, 0)
    fs.flush(fh)                                       # journaled, maybe uploading
    fs.unlink("/t")
    mark = len(store.log)
    assert fs.write(fh, b"b" * 100, CHUNK - 50) == 100
    fs.truncate(None, 2 * CHUNK + 10, fh)
    fs.fsync(fh)                                       # succeeds, sends nothing
    want = b"a" * (CHUNK - 50) + b"b" * 100 + b"a" * (CHUNK - 50) + b"a" * 10
    assert read_fh(fs, fh, len(want)) == want
    assert fs.getattr(None, fh).size == len(want)
    fs.release(fh)
    assert fs.flush_all(timeout=10)
    settle(fs)
    assert store.keys() == []
    assert writes_since(store, mark) == []


def test_a_new_file_of_the_name_is_unrelated_to_the_orphan(fs, store):
    fh1 = fs.create("/n", 0o644)
    fs.write(fh1, b"old", 0)
    fs.flush(fh1)
    fs.unlink("/n")
    fh2 = fs.create("/n", 0o644)
    fs.write(fh2, b"new!", 0)
    fs.write(fh1, b"OLD-and-longer", 0)
    fs.release(fh2)
    settle(fs)
    assert read_fh(fs, fh1, 14) == b"OLD-and-longer"
    assert fs.getattr("/n").size == 4
    fs.release(fh1)
    settle(fs)
    assert store.keys() == ["n"] and store.data("n") == b"new!"
    assert read_all(fs, "/n") == b"new!"


def test_a_file_replaced_by_a_rename_stays_usable_through_its_handle(fs, store):
    old = os.urandom(SIZE)
    remote_file(store, "dst", old)
    fh = fs.open("/dst", os.O_RDWR)
    write_file(fs, "/src", b"replacement")
    settle(fs)
    fs.rename("/src", "/dst")
    assert read_fh(fs, fh, SIZE) == old
    fs.write(fh, b"still mine", 0)
    assert fs.read(fh, 10, 0) == b"still mine"
    fs.release(fh)
    settle(fs)
    assert store.keys() == ["dst"] and store.data("dst") == b"replacement"


def test_the_last_close_frees_the_cache_space(fs, store):
    remote_file(store, "c", os.urandom(SIZE))
    fh1 = fs.open("/c", os.O_RDONLY)
    fh2 = fs.open("/c", os.O_RDWR)
    fs.write(fh2, b"x" * CHUNK, 0)
    fs.unlink("/c")
    held = fs.cache.stats()
    assert held["cache_dirty_bytes"] >= SIZE           # pinned: counted as dirty
    fs.release(fh2)
    assert fs.cache.stats() == held                    # one handle left
    assert fs.read(fh1, CHUNK, 0) == b"x" * CHUNK
    fs.release(fh1)
    s = fs.cache.stats()
    assert (s["cache_used_bytes"], s["cache_dirty_bytes"], s["cache_entries"]) == (0, 0, 0)


CRASH_WITH_ORPHAN = r"""
fh = fs.create("/gone.bin", 0o640)
fs.write(fh, os.urandom(3 * 128 * 1024), 0)
fs.flush(fh)                               # journaled dirty: recovery would upload it
fs.unlink("/gone.bin")
fs.write(fh, b"after the unlink", 0)
print("written", flush=True)
os._exit(0)                                # crash with the orphan open
"""


def test_nothing_of_an_orphan_is_recovered_after_a_crash(tmp_path, make_fs):
    raw, cache_dir = crash_child(tmp_path, CRASH_WITH_ORPHAN)
    entries = os.path.join(cache_dir, "entries")
    assert os.listdir(entries)                          # its data was there at the crash
    st2 = MemStore(KeyRing([Key(raw)]))
    fs = make_fs(cache_dir=cache_dir, st=st2)
    assert fs.recover() == 0
    assert fs.uploads.bad_entries == []
    assert fs.flush_all(timeout=10)
    assert st2.keys() == [] and writes_since(st2, 0) == []
    assert os.listdir(entries) == []


# ------------------------------------------------------------------------- the FUSE adapter
def test_libfuse_hidden_names_are_unlinks_of_open_files_and_never_reach_the_store():
    """Without hard_remove (with it, libfuse itself fails the fstat of an open unlinked file),
    libfuse renames such a file to `.fuse_hidden…` (looking the name up first), reaches the
    file by that name until the last close, then unlinks the name: an unlink with an alias,
    the alias's file, ENOENT without a request."""
    calls = []

    def getattr_(path, fh=None, alias=None):
        calls.append(("getattr", path, fh, alias))
        raise NotFound(path)
    fsx = SimpleNamespace(unlink=lambda p, alias=None: calls.append(("unlink", p, alias)),
                          rename=lambda a, b: calls.append(("rename", a, b)),
                          getattr=getattr_)
    a = FuseAdapter(fsx)
    hid = "/d/.fuse_hidden0000000a00000003"
    a("rename", "/d/f", hid)
    a("rename", "/d/f", "/d/.fuse_hidden-not-libfuse")
    for op in ("getattr", "unlink"):
        with pytest.raises(fuse.FuseOSError) as e:
            a(op, hid)
        assert e.value.errno == errno.ENOENT
    assert calls == [("unlink", "/d/f", ".fuse_hidden0000000a00000003"),
                     ("rename", "/d/f", "/d/.fuse_hidden-not-libfuse"),
                     ("getattr", hid, None, ".fuse_hidden0000000a00000003")]
    cfg = MountConfig(store=None, fs=FsConfig(), mountpoint="/m", keyfile="k", cache_dir="c",
                      cache_size=1)
    assert "hard_remove" not in fuse_mount_options(cfg)
