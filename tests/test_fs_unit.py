"""Filesystem semantics (ssecfs.fs.filesystem.Filesystem) without a kernel: over the SSE-C-enforcing
in-memory store (tests/memstore.py) and a real encrypted cache in tmp_path."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from helpers import REPO, cache_files, wait_until
from memstore import MemStore
from ssecfs.cache import CHUNK, Cache
from ssecfs.config import FsConfig
from ssecfs.crypto.aead import Sealer
from ssecfs.errors import (Exists, InvalidName, IsADirectory, KeyMismatch, NotADirectory,
                           NotEmpty, NotFound, NotSupported, ReadOnly, StoreUnavailable,
                           TimedOut)
from ssecfs.fs import reader as reader_mod
from ssecfs.fs.filesystem import Filesystem
from ssecfs.fs.reader import READ_UNIT
from ssecfs.crypto.keys import Key, KeyRing

REG = stat.S_IFREG
DIR = stat.S_IFDIR
WRITE_OPS = ("put", "upload", "copy")


# ------------------------------------------------------------------------- fixtures
@pytest.fixture
def ring():
    return KeyRing([Key(os.urandom(32))])


@pytest.fixture
def store(ring):
    return MemStore(ring)


def open_cache(directory, ring, max_bytes=1 << 30) -> Cache:
    c = Cache(str(directory), {k.fingerprint: Sealer(k.cache_key()) for k in ring.keys},
              max_bytes, ring.current.fingerprint)
    c.open()
    return c


@pytest.fixture
def make_fs(tmp_path, ring, store):
    made = []

    def make(cache_dir=None, st=None, max_bytes=1 << 30, **cfg) -> Filesystem:
        cfg.setdefault("writeback_delay", 0)
        # deletes at once unless a test is about deferring them (tests/test_deletes.py)
        cfg.setdefault("defer_deletes", False)
        st = st or store
        cache = open_cache(cache_dir or tmp_path / f"cache{len(made)}", st.ring, max_bytes)
        fs = Filesystem(st, cache, FsConfig(**cfg))
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.shutdown()
        fs.cache.close()


@pytest.fixture
def fs(make_fs):
    return make_fs()


def settle(fs: Filesystem, timeout: float = 10) -> None:
    """Wait until every dirty file is durable and no upload runs."""
    ok = fs.uploads.wb.wait(lambda: not fs.dirty_files() and fs.uploads.wb.in_flight() == 0, timeout=timeout)
    assert ok, f"uploads not done: {fs.status()}"


def write_file(fs: Filesystem, path: str, data: bytes, mode: int = 0o644) -> None:
    fh = fs.create(path, mode)
    for off in range(0, len(data), 128 * 1024):          # the pieces FUSE hands us
        assert fs.write(fh, data[off:off + 128 * 1024], off) == len(data[off:off + 128 * 1024])
    fs.flush(fh)
    fs.release(fh)


def read_all(fs: Filesystem, path: str, piece: int = 128 * 1024) -> bytes:
    fh = fs.open(path, os.O_RDONLY)
    try:
        size = fs.getattr(path).size
        out = bytearray()
        while len(out) < size:
            got = fs.read(fh, piece, len(out))
            assert got, "short read"
            out += got
        assert fs.read(fh, piece, len(out)) == b""
        return bytes(out)
    finally:
        fs.release(fh)


def remote_file(store: MemStore, key: str, data: bytes, mode: int = REG | 0o644) -> None:
    """An object written by another client with the ring's current key."""
    store.put(key, data, {"mode": str(mode), "uid": "0", "gid": "0",
                          "mtime": "1700000000", "ctime": "1700000000"})


def written_keys(store: MemStore) -> set[str]:
    return {k for op, k in store.log if op in WRITE_OPS}


class Gate:
    """Blocks a store operation until released; tells when it started."""

    def __init__(self, store: MemStore, op: str, key: str):
        self.started = threading.Event()
        self.release = threading.Event()
        self.key = key
        prev = store.before.get(op)

        def hook(k, *args):
            if prev:
                prev(k, *args)
            if k == self.key:
                self.started.set()
                assert self.release.wait(20), "gate never released"
        store.before[op] = hook


def in_thread(fn, *args):
    result: dict = {}

    def run():
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001
            result["error"] = e
    t = threading.Thread(target=run)
    t.start()
    return t, result


def during_upload(fs, store, name: str, fn, *args) -> None:
    """Write b"racing" to /name, call fn(*args) while its upload is held, then let the
    upload finish: fn must return without an error and everything settle."""
    gate = Gate(store, "upload", name)
    write_file(fs, "/" + name, b"racing")
    assert gate.started.wait(10)
    t, res = in_thread(fn, *args)
    t.join(0.2)
    gate.release.set()
    t.join(10)
    assert not t.is_alive() and "error" not in res, res
    settle(fs)


# ------------------------------------------------------------------------- write / read
def test_create_write_read_upload(fs, store, ring):
    data = os.urandom(3 * CHUNK + 12345)
    fh = fs.create("/f.bin", 0o640)
    for off in range(0, len(data), 100_000):             # pieces not aligned to chunks
        fs.write(fh, data[off:off + 100_000], off)
    assert fs.getattr("/f.bin").size == len(data)
    assert fs.read(fh, len(data) + 10, 0) == data
    assert fs.read(fh, 50, CHUNK - 25) == data[CHUNK - 25:CHUNK + 25]
    fs.flush(fh)
    fs.release(fh)
    settle(fs)
    assert store.data("f.bin") == data
    assert store.key_fp_of("f.bin") == ring.current.fingerprint
    md = store.meta("f.bin")
    assert int(md["mode"]) == REG | 0o640
    assert int(md["uid"]) == os.getuid() and int(md["gid"]) == os.getgid()
    assert abs(float(md["mtime"]) - time.time()) < 60 and "ctime" in md
    assert read_all(fs, "/f.bin") == data
    a = fs.getattr("/f.bin")
    assert stat.S_ISREG(a.mode) and stat.S_IMODE(a.mode) == 0o640 and a.size == len(data)


def test_empty_file(fs, store):
    fh = fs.create("/empty", 0o644)
    fs.release(fh)
    settle(fs)
    assert store.data("empty") == b""
    assert fs.getattr("/empty").size == 0
    assert read_all(fs, "/empty") == b""


def test_close_returns_before_upload_and_reads_see_local_data(make_fs, store):
    fs = make_fs(writeback_delay=30)
    write_file(fs, "/later", b"pending data")
    assert not store.exists("later")
    assert fs.getattr("/later").size == 12
    assert read_all(fs, "/later") == b"pending data"
    assert fs.flush_all(timeout=10)
    assert store.data("later") == b"pending data"


def test_write_past_eof_leaves_zeros(fs, store):
    fh = fs.create("/sparse", 0o644)
    fs.write(fh, b"abc", 0)
    fs.write(fh, b"xyz", 2 * CHUNK + 100)
    fs.write(fh, b"mid", 10)                             # past EOF of chunk 0's data
    expected = bytearray(2 * CHUNK + 103)
    expected[0:3] = b"abc"
    expected[10:13] = b"mid"
    expected[-3:] = b"xyz"
    assert fs.getattr("/sparse").size == len(expected)
    assert fs.read(fh, len(expected), 0) == bytes(expected)
    fs.release(fh)
    settle(fs)
    assert store.data("sparse") == bytes(expected)


def test_truncate_down_then_up_reads_zeros(fs, store):
    data = os.urandom(3 * CHUNK)
    fh = fs.create("/t", 0o644)
    fs.write(fh, data, 0)
    fs.truncate("/t", 1000, fh)
    assert fs.getattr("/t").size == 1000
    fs.truncate("/t", 2 * CHUNK + 5, fh)
    expected = data[:1000] + bytes(2 * CHUNK + 5 - 1000)
    assert fs.read(fh, 3 * CHUNK, 0) == expected
    fs.release(fh)
    settle(fs)
    assert store.data("t") == expected


def test_truncate_remote_file_without_handle(fs, store):
    data = os.urandom(2 * CHUNK + 5000)
    remote_file(store, "r", data)
    fs.truncate("/r", CHUNK + 10)                         # inside chunk 1, nothing cached
    fs.truncate("/r", 3 * CHUNK)                          # and back up: a hole of zeros
    settle(fs)
    expected = data[:CHUNK + 10] + bytes(3 * CHUNK - CHUNK - 10)
    assert store.data("r") == expected
    assert read_all(fs, "/r") == expected


def test_truncate_to_chunk_boundary_and_zero(fs, store):
    data = os.urandom(2 * CHUNK + 7)
    remote_file(store, "b", data)
    fs.truncate("/b", CHUNK)
    settle(fs)
    assert store.data("b") == data[:CHUNK]
    fh = fs.open("/b", os.O_WRONLY | os.O_TRUNC)
    fs.write(fh, b"new", 0)
    fs.release(fh)
    settle(fs)
    assert store.data("b") == b"new"


def test_partial_overwrite_of_remote_file(fs, store):
    data = os.urandom(3 * CHUNK + 999)
    remote_file(store, "p", data)
    fh = fs.open("/p", os.O_RDWR)
    before = store.calls["get_range"]
    fs.write(fh, b"PATCH", CHUNK + 10)                   # middle of chunk 1
    fs.write(fh, b"ACROSS", 2 * CHUNK - 3)               # across chunks 1 and 2
    assert store.calls["get_range"] > before, "the missing chunk was fetched"
    expected = bytearray(data)
    expected[CHUNK + 10:CHUNK + 15] = b"PATCH"
    expected[2 * CHUNK - 3:2 * CHUNK + 3] = b"ACROSS"
    assert fs.read(fh, len(data), 0) == bytes(expected)
    fs.release(fh)
    settle(fs)
    assert store.data("p") == bytes(expected)
    assert int(store.meta("p")["mode"]) == REG | 0o644   # metadata kept


def test_sequential_read_of_large_remote_file(fs, store):
    data = os.urandom(9 * 1024 * 1024 + 123)             # several read units (readahead)
    remote_file(store, "big", data)
    assert read_all(fs, "/big") == data
    # a second, random-access read is served from the cache
    before = store.calls["get_range"]
    fh = fs.open("/big", os.O_RDONLY)
    assert fs.read(fh, 1000, 5 * 1024 * 1024 + 17) == data[5 * 1024 * 1024 + 17:][:1000]
    fs.release(fh)
    assert store.calls["get_range"] == before


def record_gets(store: MemStore) -> list:
    """The (start, length) of every GET of the store from now on."""
    got: list = []
    prev = store.before.get("get_range")

    def hook(key, start, length):
        if prev:
            prev(key, start, length)
        got.append((start, length))
    store.before["get_range"] = hook
    return got


@pytest.fixture
def scan_min(monkeypatch):
    """A small SCAN_MIN_SIZE (two read units), so that a "big" file takes 24 MiB."""
    monkeypatch.setattr(reader_mod, "SCAN_MIN_SIZE", 2 * READ_UNIT)
    return 3 * READ_UNIT + 4321


def test_a_big_file_read_end_to_end_is_cached_from_its_second_read(fs, store, scan_min):
    """Scan resistance: the first sequential read of a big file leaves nothing in the cache
    and fetches each read unit once (read-ahead never fetches a unit again that the reader
    has read already); the second read fetches the units again and caches them; the third
    sends nothing."""
    data = os.urandom(scan_min)
    remote_file(store, "big", data)
    gets = record_gets(store)
    assert read_all(fs, "/big") == data
    units = sorted(s for s, _ in gets)
    assert units == list(range(0, scan_min, READ_UNIT)), gets
    assert fs.cache.stats()["cache_used_bytes"] < READ_UNIT
    gets.clear()
    assert read_all(fs, "/big") == data
    assert sorted(s for s, _ in gets) == units
    assert wait_until(lambda: fs.cache.stats()["cache_used_bytes"] >= scan_min, timeout=10)
    gets.clear()
    assert read_all(fs, "/big") == data
    assert gets == []


def test_a_big_file_is_cached_at_its_first_read_with_cache_every_read(make_fs, store,
                                                                       scan_min):
    fs = make_fs(cache_every_read=True)
    data = os.urandom(scan_min)
    remote_file(store, "big", data)
    gets = record_gets(store)
    assert read_all(fs, "/big") == data
    assert len(gets) == 4
    gets.clear()
    assert read_all(fs, "/big") == data
    assert gets == []


def test_random_reads_of_a_big_file_are_cached_at_once(fs, store, scan_min):
    data = os.urandom(scan_min)
    remote_file(store, "big", data)
    gets = record_gets(store)
    fh = fs.open("/big", os.O_RDONLY)
    try:
        for off in (5 * READ_UNIT // 2, 17 * CHUNK, 2 * READ_UNIT + 99):
            assert fs.read(fh, 4096, off) == data[off:off + 4096]
        n = len(gets)
        for off in (5 * READ_UNIT // 2, 17 * CHUNK, 2 * READ_UNIT + 99):
            assert fs.read(fh, 4096, off) == data[off:off + 4096]
        assert len(gets) == n
    finally:
        fs.release(fh)


def test_a_big_file_with_unsent_writes_is_cached_as_it_is_read(fs, store, scan_min):
    """A file being written is not scanned past the cache: what a writer reads back around
    its own writes stays local."""
    data = os.urandom(scan_min)
    remote_file(store, "big", data)
    fh = fs.open("/big", os.O_RDWR)
    try:
        assert fs.write(fh, b"x" * 10, 3 * READ_UNIT) == 10
        gets = record_gets(store)
        for off in range(0, 3 * READ_UNIT, CHUNK):
            assert fs.read(fh, CHUNK, off) == data[off:off + CHUNK]
        n = len(gets)
        for off in range(0, 3 * READ_UNIT, CHUNK):
            assert fs.read(fh, CHUNK, off) == data[off:off + CHUNK]
        assert len(gets) == n
    finally:
        fs.release(fh)


def test_small_file_looked_up_is_read_without_another_request(fs, store):
    """The lookup of a small object fetches it whole (one ranged GET answers both); the
    open and read that follow send nothing, and later opens are served from the cache."""
    data = os.urandom(5000)
    remote_file(store, "small", data)
    assert fs.getattr("/small").size == 5000            # the lookup
    calls = sum(store.calls.values())
    assert read_all(fs, "/small") == data
    assert sum(store.calls.values()) == calls
    assert read_all(fs, "/small") == data                # cached: no request either
    assert store.calls["get_range"] == 0


def test_lookup_fetches_only_the_start_of_a_bigger_file(fs, store):
    data = os.urandom(300_000)
    remote_file(store, "bigger", data)
    assert fs.getattr("/bigger").size == 300_000
    assert read_all(fs, "/bigger") == data
    assert store.calls["get_range"] >= 1                 # the start alone was not kept


def test_small_file_changed_between_lookup_and_open_is_read_anew(make_fs, store):
    """Close-to-open: the bytes a lookup fetched serve the open only while the object is
    still that version (ETag); another writer's new version is fetched, never the old one."""
    fs = make_fs(attr_timeout=0.05)
    remote_file(store, "changing", b"old content")
    assert fs.getattr("/changing").size == 11
    remote_file(store, "changing", b"NEW content!")      # another mount wrote it meanwhile
    assert fs.attrs.take_start("/changing", store.head("changing").etag) is None
    remote_file(store, "changing", b"old content")
    assert fs.getattr("/changing").size == 11            # a lookup fetched this version
    remote_file(store, "changing", b"NEW content!")
    assert wait_until(lambda: fs.getattr("/changing").size == 12, timeout=10)
    assert read_all(fs, "/changing") == b"NEW content!"


def test_open_trunc_of_remote_file(fs, store):
    remote_file(store, "o", os.urandom(3 * CHUNK))
    fh = fs.open("/o", os.O_WRONLY | os.O_TRUNC)
    assert fs.getattr("/o").size == 0
    fs.write(fh, b"short", 0)
    fs.release(fh)
    settle(fs)
    assert store.data("o") == b"short"


# ------------------------------------------------------------------------- rename
def test_rename_file(fs, store, ring):
    data = os.urandom(2 * CHUNK + 3)
    remote_file(store, "old", data)
    fs.rename("/old", "/new")
    assert not store.exists("old")
    assert store.data("new") == data
    assert store.key_fp_of("new") == ring.current.fingerprint
    with pytest.raises(NotFound):
        fs.getattr("/old")
    assert fs.getattr("/new").size == len(data)
    assert read_all(fs, "/new") == data


def test_rename_open_dirty_file_uploads_under_new_name_only(fs, store):
    fh = fs.create("/n", 0o644)
    fs.write(fh, b"written before the rename", 0)
    fs.rename("/n", "/m")
    fs.write(fh, b"WRITTEN", 0)                          # the handle follows the file
    fs.release(fh)
    settle(fs)
    assert store.data("m") == b"WRITTEN before the rename"
    assert not store.exists("n")
    assert "n" not in written_keys(store), "the old name was uploaded"
    with pytest.raises(NotFound):
        fs.getattr("/n")


def test_rename_closed_dirty_file_not_yet_uploaded(make_fs, store):
    fs = make_fs(writeback_delay=30)
    write_file(fs, "/n", b"pending")
    fs.rename("/n", "/m")
    assert fs.flush_all(timeout=10)
    assert store.data("m") == b"pending"
    assert not store.exists("n") and "n" not in written_keys(store)


def test_rename_during_upload_does_not_resurrect_old_name(make_fs, store):
    fs = make_fs(writeback_delay=0)
    during_upload(fs, store, "n", fs.rename, "/n", "/m")
    assert store.data("m") == b"racing"
    assert not store.exists("n")


def test_rename_over_existing_file(fs, store):
    remote_file(store, "x", b"X data")
    remote_file(store, "y", b"Y data")
    fs.rename("/x", "/y")
    assert store.data("y") == b"X data" and not store.exists("x")
    assert read_all(fs, "/y") == b"X data"


def test_rename_over_dirty_target_cancels_its_upload(make_fs, store):
    fs = make_fs(writeback_delay=30)
    remote_file(store, "x", b"X data")
    write_file(fs, "/y", b"pending Y")                   # dirty, not uploaded
    fs.rename("/x", "/y")
    assert fs.flush_all(timeout=10)
    assert store.data("y") == b"X data"
    assert "y" not in {k for op, k in store.log if op in ("put", "upload")}
    assert read_all(fs, "/y") == b"X data"


def test_rename_file_onto_directory_refused(fs, store):
    remote_file(store, "f", b"f")
    fs.mkdir("/d", 0o755)
    with pytest.raises(IsADirectory):
        fs.rename("/f", "/d")
    assert store.data("f") == b"f"


def test_rename_directory_moves_all_objects(fs, store, ring):
    fs.mkdir("/d", 0o750)
    write_file(fs, "/d/x", b"x data")
    fs.mkdir("/d/sub", 0o755)
    write_file(fs, "/d/sub/y", b"y data")
    settle(fs)
    heads = store.calls["head"]
    fs.rename("/d", "/e")
    assert set(store.keys()) == {"e/", "e/x", "e/sub/", "e/sub/y"}
    # the files' copies in one go, without a HEAD each (the two markers get one)
    assert store.calls["copy_as_is_many"] == 1 and store.calls["copy_as_is"] == 2
    assert store.calls["head"] - heads <= 2 + 2     # + the lookups of /d and /e
    assert store.data("e/x") == b"x data" and store.data("e/sub/y") == b"y data"
    assert all(store.key_fp_of(k) == ring.current.fingerprint for k in store.keys())
    assert stat.S_IMODE(fs.getattr("/e").mode) == 0o750
    with pytest.raises(NotFound):
        fs.getattr("/d")
    assert set(fs.readdir("/e")) == {".", "..", "x", "sub"}
    assert read_all(fs, "/e/sub/y") == b"y data"


def test_rename_directory_with_pending_local_file(fs, store):
    fs.mkdir("/d", 0o755)
    fh = fs.create("/d/p", 0o644)
    fs.write(fh, b"local only", 0)
    fs.rename("/d", "/e")
    fs.release(fh)
    settle(fs)
    assert store.data("e/p") == b"local only"
    assert not any(k.startswith("d/") for k in store.keys())
    assert "d/p" not in written_keys(store)


def test_rename_directory_with_open_partially_cached_file(fs, store):
    """A file open under a renamed directory, only partly in the cache: its remaining chunks
    come from the moved object (whose ETag and key may differ from the original's)."""
    data = os.urandom(3 * CHUNK)
    fs.mkdir("/d", 0o755)
    remote_file(store, "d/big", data)
    fh = fs.open("/d/big", os.O_RDWR)
    fs.write(fh, b"PATCH", 5)                             # only chunk 0 is cached
    fs.rename("/d", "/e")
    assert fs.read(fh, 100, 2 * CHUNK + 7) == data[2 * CHUNK + 7:2 * CHUNK + 107]
    fs.release(fh)
    settle(fs)
    assert store.data("e/big") == data[:5] + b"PATCH" + data[10:]


@pytest.mark.parametrize("what", ["file", "directory"])
def test_failed_rename_keeps_the_pending_upload(make_fs, store, what):
    """A rename that fails at the store (after retries) must not drop the queued upload of
    the dirty file it was about to move: the written data must still reach the store."""
    fs = make_fs(writeback_delay=30)
    fs.mkdir("/d", 0o755)
    remote_file(store, "d/n", b"old content")
    fh = fs.open("/d/n", os.O_RDWR)
    fs.write(fh, b"NEW", 0)
    fs.release(fh)                                       # closed, dirty, queued
    assert fs.uploads.wb.pending() == 1
    store.fail("copy", 1)
    store.fail("copy_as_is", 1)                          # the one-request copy of dir moves
    with pytest.raises(StoreUnavailable):
        if what == "file":
            fs.rename("/d/n", "/d/m")
        else:
            fs.rename("/d", "/e")
    assert fs.dirty_files(), "the write is not durable yet"
    assert fs.uploads.wb.wait(lambda: fs.uploads.wb.pending() > 0 or not fs.dirty_files(), timeout=2), \
        "the dirty file was taken out of the upload queue and never put back"


def test_rename_directory_into_itself_refused(fs):
    fs.mkdir("/d", 0o755)
    fs.mkdir("/d/s", 0o755)
    with pytest.raises((InvalidName, NotSupported)):       # EINVAL (rename(2))
        fs.rename("/d", "/d/s/x")
    assert fs.attrs.is_dir("/d/s")


# ------------------------------------------------------------------------- unlink
def test_unlink_dirty_file_cancels_upload(make_fs, store):
    fs = make_fs(writeback_delay=30)
    write_file(fs, "/u", b"never uploaded")
    fs.unlink("/u")
    assert fs.flush_all(timeout=10)
    assert not store.exists("u") and "u" not in written_keys(store)
    with pytest.raises(NotFound):
        fs.getattr("/u")
    assert fs.cache.stats()["cache_entries"] == 0
    # (a discarded entry's file is removed by a low-priority thread)
    assert wait_until(lambda: cache_files(fs.cache.entries_dir) == [], timeout=10)


def test_unlink_open_file_before_close(fs, store):
    fh = fs.create("/u", 0o644)
    fs.write(fh, b"data", 0)
    fs.unlink("/u")
    fs.write(fh, b"more", 4)
    fs.flush(fh)
    fs.release(fh)
    settle(fs)
    assert not store.exists("u") and "u" not in written_keys(store)


def test_unlink_during_upload_leaves_nothing(make_fs, store):
    fs = make_fs(writeback_delay=0)
    during_upload(fs, store, "u", fs.unlink, "/u")
    assert not store.exists("u")


def test_unlink_remote_file_and_directory_refused(fs, store):
    remote_file(store, "r", b"r")
    fs.unlink("/r")
    assert not store.exists("r")
    fs.mkdir("/d", 0o755)
    with pytest.raises(IsADirectory):
        fs.unlink("/d")
    with pytest.raises(NotFound):
        fs.unlink("/missing")


# ------------------------------------------------------------------------- directories
def test_mkdir_rmdir(fs, store):
    fs.mkdir("/d", 0o750)
    assert store.exists("d/") and store.data("d/") == b""
    assert int(store.meta("d/")["mode"]) == DIR | 0o750
    a = fs.getattr("/d")
    assert stat.S_ISDIR(a.mode) and stat.S_IMODE(a.mode) == 0o750
    with pytest.raises(Exists):
        fs.mkdir("/d", 0o755)
    with pytest.raises(NotFound):
        fs.mkdir("/nope/sub", 0o755)
    write_file(fs, "/d/f", b"f")
    settle(fs)
    with pytest.raises(NotEmpty):
        fs.rmdir("/d")
    assert store.exists("d/")
    fs.unlink("/d/f")
    fs.rmdir("/d")
    assert not store.exists("d/")
    with pytest.raises(NotFound):
        fs.getattr("/d")
    with pytest.raises(NotFound):
        fs.rmdir("/d")


def test_rmdir_with_pending_local_file_is_not_empty(make_fs, store):
    fs = make_fs(writeback_delay=30)
    fs.mkdir("/d", 0o755)
    write_file(fs, "/d/pending", b"p")
    with pytest.raises(NotEmpty):
        fs.rmdir("/d")
    assert store.exists("d/")


def test_rmdir_on_file_and_nested_dirs(fs, store):
    remote_file(store, "f", b"f")
    with pytest.raises(NotADirectory):
        fs.rmdir("/f")
    fs.mkdir("/a", 0o755)
    fs.mkdir("/a/b", 0o755)
    with pytest.raises(NotEmpty):
        fs.rmdir("/a")
    fs.rmdir("/a/b")
    fs.rmdir("/a")
    assert not store.exists("a/") and not store.exists("a/b/")


def test_implicit_directory(fs, store):
    """A prefix without a marker (objects written by other tools) is a directory."""
    remote_file(store, "imp/sub/file", b"deep")
    assert stat.S_ISDIR(fs.getattr("/imp").mode)
    assert stat.S_ISDIR(fs.getattr("/imp/sub").mode)
    assert set(fs.readdir("/imp")) == {".", "..", "sub"}
    assert read_all(fs, "/imp/sub/file") == b"deep"


def test_readdir_merges_pending_local_files(make_fs, store):
    fs = make_fs(writeback_delay=30)
    remote_file(store, "a", b"a")
    remote_file(store, "d/inner", b"i")
    store.put("e/", b"", {"mode": str(DIR | 0o755)})
    write_file(fs, "/b", b"pending")                     # dirty, not uploaded
    fh = fs.open("/a", os.O_RDWR)                        # exists remotely and locally
    fs.write(fh, b"A", 0)
    fh2 = fs.create("/d/new", 0o644)
    names = list(fs.readdir("/"))
    assert sorted(names) == [".", "..", "a", "b", "d", "e"]
    assert len(names) == len(set(names)), "no duplicates"
    assert sorted(fs.readdir("/d")) == [".", "..", "inner", "new"]
    assert sorted(fs.readdir("/e")) == [".", ".."]
    with pytest.raises(NotADirectory):
        list(fs.readdir("/a"))
    fs.release(fh)
    fs.release(fh2)


def test_readdir_many_entries(fs, store):
    for i in range(1203):
        store.put(f"many/f{i:05d}", b"", {})
    names = [n for n in fs.readdir("/many") if n not in (".", "..")]
    assert names == [f"f{i:05d}" for i in range(1203)]


def test_listing_taken_during_an_upload_still_answers_missing_names(make_fs, store):
    """Creating files in a directory looks up each new name first. The directory's listing
    answers those lookups; an upload of another file that lands while the listing is being
    taken must not void it (it did: every create then listed the whole directory again,
    quadratic in its size)."""
    fs = make_fs(attr_timeout=60)
    fs.mkdir("/d", 0o755)
    write_file(fs, "/d/a", b"one")
    settle(fs)
    fh = fs.open("/d/a", os.O_RDWR)
    fs.attrs._listings.clear()                  # the cached listing expired

    def upload_meanwhile(key, *args):
        store.before.pop("list")
        fs.write(fh, b"two", 0)
        fs.fsync(fh)                      # an upload completes while the LIST is on its way

    store.before["list"] = upload_meanwhile
    with pytest.raises(NotFound):
        fs.getattr("/d/new1")
    lists = store.calls["list"]
    with pytest.raises(NotFound):
        fs.getattr("/d/new2")             # answered from the listing taken above
    assert store.calls["list"] == lists
    assert ("head", "d/new2") not in store.log
    fs.release(fh)


def test_listing_taken_while_a_name_changes_is_not_trusted(make_fs, store):
    """A create in the directory while its listing is on its way: the listing may miss the
    new name, so it must not answer "absent" for anything."""
    fs = make_fs(attr_timeout=60)
    fs.mkdir("/d", 0o755)
    settle(fs)
    fs.attrs._listings.clear()

    def create_meanwhile(key, *args):
        store.before.pop("list")
        store.put("d/other", b"x", {})    # another mount's file, seen by neither listing
        fs.release(fs.create("/d/mine", 0o644))

    store.before["list"] = create_meanwhile
    with pytest.raises(NotFound):
        fs.getattr("/d/new1")
    assert stat.S_ISREG(fs.getattr("/d/other").mode)   # not "absent" from a stale listing


def after_lookup(store: MemStore, key: str, fn) -> None:
    """Run fn once, right after the server answered a lookup of key (before the answer is
    cached): a change of ours that lands while the answer is on its way."""
    def wrapped(k, nbytes):
        info = MemStore.head_with_start(store, k, nbytes)
        if k == key and "head_with_start" in vars(store):
            del store.head_with_start
            fn()
        return info
    store.head_with_start = wrapped


def test_a_lookup_on_its_way_is_kept_when_another_file_changes(make_fs, store):
    """`rm -r` unlinks a file while the next ones are being looked up: a change of another
    file must not void those answers (every change of ours did, and each file was then
    asked again)."""
    fs = make_fs(attr_timeout=60)
    for n in "abc":
        remote_file(store, f"d/{n}", b"x")
    after_lookup(store, "d/a", lambda: fs.unlink("/d/b"))
    assert stat.S_ISREG(fs.getattr("/d/a").mode)
    asked = store.calls["head"]
    assert stat.S_ISREG(fs.getattr("/d/a").mode)      # kept: no request
    assert store.calls["head"] == asked
    with pytest.raises(NotFound):
        fs.getattr("/d/b")


@pytest.mark.parametrize("change", ["the file", "its directory"])
def test_a_lookup_on_its_way_is_not_kept_when_its_path_changes(make_fs, store, change):
    """The answer describes the object as it was before our change (of the file itself, or
    a rename of a directory above it): returned to its caller, never cached."""
    fs = make_fs(attr_timeout=60)
    for n in "ab":
        remote_file(store, f"d/{n}", b"x")
    if change == "the file":
        after_lookup(store, "d/a", lambda: fs.chmod("/d/a", 0o600))
    else:
        after_lookup(store, "d/a", lambda: fs.rename("/d", "/e"))
    assert stat.S_IMODE(fs.getattr("/d/a").mode) == 0o644      # the answer from before
    if change == "the file":
        assert stat.S_IMODE(fs.getattr("/d/a").mode) == 0o600
    else:
        with pytest.raises(NotFound):
            fs.getattr("/d/a")
        assert stat.S_ISREG(fs.getattr("/e/a").mode)


def test_path_changes_never_report_unchanged_wrongly():
    from ssecfs.fs.changes import PathChanges
    ch = PathChanges(maxsize=2)
    ch["/d/a"] = 1
    assert ch.changed_since("/d/a", 0) and not ch.changed_since("/d/b", 0)
    assert not ch.changed_since("/d/a", 1)
    ch["/d"] = 2                                      # a directory: every name under it
    assert ch.changed_since("/d/b", 1) and ch.changed_since("/d/x/y", 1)
    assert not ch.changed_since("/e/b", 1)
    ch["/f"] = 3                                      # evicts /d/a (stamp 1)
    assert ch.changed_since("/zzz", 0) and not ch.changed_since("/zzz", 1)


def test_change_log_never_reports_unchanged_wrongly():
    from ssecfs.fs.changes import ChangeLog
    log = ChangeLog(maxsize=2)
    m0 = log.mark()
    log.note("/a")
    assert log.changed_since("/a", m0) and not log.changed_since("/b", m0)
    m1 = log.mark()
    log.note("/b")
    log.note("/c")                        # evicts /a (stamp 1): it counts as changed at 1
    assert log.changed_since("/a", m0) and not log.changed_since("/a", m1)
    log.note("/d")                        # evicts /b (stamp 2 > m1)
    assert log.changed_since("/b", m1) and log.changed_since("/zzz", m1)
    m2 = log.mark()
    log.note(None)                        # a directory rename: everything changed
    assert log.changed_since("/zzz", m2)


# ------------------------------------------------------------------------- metadata
def test_chmod_and_utimens_update_metadata(fs, store, ring):
    data = os.urandom(CHUNK + 1)
    remote_file(store, "m", data)
    fs.chmod("/m", 0o600)
    md = store.meta("m")
    assert int(md["mode"]) == REG | 0o600
    assert set(md) >= {"mode", "uid", "gid", "mtime", "ctime"}
    assert stat.S_IMODE(fs.getattr("/m").mode) == 0o600
    fs.utimens("/m", 1_600_000_000, 1_234_567_890.25)
    md = store.meta("m")
    assert float(md["mtime"]) == 1_234_567_890.25 and md["mtime"] == "1234567890.250000000"
    assert int(md["mode"]) == REG | 0o600, "utimens keeps the mode"
    assert abs(float(md["ctime"]) - time.time()) < 60
    assert fs.getattr("/m").mtime == 1_234_567_890.25
    assert store.data("m") == data
    assert store.key_fp_of("m") == ring.current.fingerprint


def test_chmod_of_open_dirty_file(make_fs, store):
    fs = make_fs(writeback_delay=30)
    fh = fs.create("/c", 0o644)
    fs.write(fh, b"content", 0)
    fs.chmod("/c", 0o755)
    assert stat.S_IMODE(fs.getattr("/c").mode) == 0o755
    fs.release(fh)
    assert fs.flush_all(timeout=10)
    assert int(store.meta("c")["mode"]) == REG | 0o755
    assert store.data("c") == b"content"


def test_chmod_of_open_clean_file_is_metadata_only(fs, store):
    data = os.urandom(2 * CHUNK)
    remote_file(store, "oc", data)
    fh = fs.open("/oc", os.O_RDONLY)
    fs.chmod("/oc", 0o600)
    fs.release(fh)
    settle(fs)
    assert int(store.meta("oc")["mode"]) == REG | 0o600
    assert store.data("oc") == data
    assert store.calls["upload"] == 0, "a metadata change must not re-upload the data"


def test_chmod_as_the_upload_of_the_file_ends_is_seen_at_once(fs, store, monkeypatch):
    """The upload of a closed file ends (and the clean file leaves the table of open files)
    between the moment chmod finds the file there and the moment it changes it: the change
    must still show in the next stat, and reach the object once."""
    fs.release(fs.create("/f", 0o644))              # its upload is queued (delay 0)
    real = fs.files.get

    def state_then_upload_ends(path):
        st = real(path)
        if sys._getframe(1).f_code.co_name == "_change_meta":
            settle(fs)
        return st
    monkeypatch.setattr(fs.files, "get", state_then_upload_ends)
    fs.chmod("/f", 0o600)
    monkeypatch.undo()
    assert stat.S_IMODE(fs.getattr("/f").mode) == 0o600
    settle(fs)
    assert int(store.meta("f")["mode"]) == REG | 0o600
    assert stat.S_IMODE(fs.getattr("/f").mode) == 0o600


def test_chmod_directory(fs, store):
    fs.mkdir("/dd", 0o755)
    fs.chmod("/dd", 0o700)
    assert int(store.meta("dd/")["mode"]) == DIR | 0o700
    assert stat.S_IMODE(fs.getattr("/dd").mode) == 0o700
    fs.utimens("/dd", 0, 1_500_000_000)
    assert float(store.meta("dd/")["mtime"]) == 1_500_000_000
    assert int(store.meta("dd/")["mode"]) == DIR | 0o700


# ------------------------------------------------------------------------- read-only
def test_read_only(make_fs, store):
    remote_file(store, "f", b"readable")
    fs = make_fs(read_only=True)
    assert read_all(fs, "/f") == b"readable"
    before = {op: store.calls[op] for op in ("put", "upload", "copy", "delete")}
    attempts = [
        lambda: fs.create("/new", 0o644),
        lambda: fs.open("/f", os.O_WRONLY),
        lambda: fs.open("/f", os.O_RDWR),
        lambda: fs.mkdir("/d", 0o755),
        lambda: fs.unlink("/f"),
        lambda: fs.rename("/f", "/g"),
        lambda: fs.chmod("/f", 0o600),
        lambda: fs.utimens("/f", 0, 0),
        lambda: fs.truncate("/f", 0),
        lambda: fs.symlink("/l", "f"),
    ]
    for attempt in attempts:
        with pytest.raises(ReadOnly):
            attempt()
    assert {op: store.calls[op] for op in before} == before
    assert store.data("f") == b"readable"


# ------------------------------------------------------------------------- foreign objects
def test_object_under_another_key(fs, store):
    other = Key(os.urandom(32))
    store.put_foreign("locked.bin", b"secret of someone else", other,
                      {"mode": str(REG | 0o644)})
    a = fs.getattr("/locked.bin")
    assert stat.S_ISREG(a.mode) and a.size == 22
    assert "locked.bin" in list(fs.readdir("/"))
    for flags in (os.O_RDONLY, os.O_RDWR):
        with pytest.raises(KeyMismatch):
            fs.open("/locked.bin", flags)
    with pytest.raises(KeyMismatch):
        fs.rename("/locked.bin", "/elsewhere")
    with pytest.raises(KeyMismatch):
        fs.chmod("/locked.bin", 0o600)
    assert store.key_fp_of("locked.bin") == other.fingerprint
    assert store.data("locked.bin") == b"secret of someone else"
    assert not store.exists("elsewhere")


def test_plaintext_object_refused(fs, store):
    store.put_plain("plain.txt", b"not encrypted", {"mode": str(REG | 0o644)})
    a = fs.getattr("/plain.txt")
    assert stat.S_ISREG(a.mode) and a.size == 13
    with pytest.raises(KeyMismatch):
        fs.open("/plain.txt", os.O_RDONLY)
    with pytest.raises(KeyMismatch):
        fs.rename("/plain.txt", "/p2")
    assert store.key_fp_of("plain.txt") is None and not store.exists("p2")


def test_old_key_object_readable_and_reencrypted_on_rename(tmp_path, make_fs):
    old, new = Key(os.urandom(32)), Key(os.urandom(32))
    ring2 = KeyRing([new, old])
    st2 = MemStore(ring2)
    st2.put_foreign("o", b"old-key data", old, {"mode": str(REG | 0o644)})
    fs = make_fs(st=st2, cache_dir=tmp_path / "c2")
    assert read_all(fs, "/o") == b"old-key data"
    fs.rename("/o", "/p")
    assert st2.key_fp_of("p") == new.fingerprint and st2.data("p") == b"old-key data"


# ------------------------------------------------------------------------- fsync
def test_fsync_waits_until_durable(make_fs, store):
    fs = make_fs(writeback_delay=30)
    gate = Gate(store, "upload", "s")
    fh = fs.create("/s", 0o644)
    fs.write(fh, b"must be durable", 0)
    t, res = in_thread(fs.fsync, fh)
    assert gate.started.wait(10), "fsync did not start the upload at once"
    t.join(0.3)
    assert t.is_alive(), "fsync returned before the upload finished"
    gate.release.set()
    t.join(10)
    assert not t.is_alive() and "error" not in res, res
    assert store.data("s") == b"must be durable"
    fs.release(fh)


def test_fsync_retries_through_transient_errors(make_fs, store):
    fs = make_fs(writeback_delay=30)
    fh = fs.create("/s", 0o644)
    fs.write(fh, b"retry me", 0)
    store.fail("upload", 2)
    fs.fsync(fh)
    assert store.data("s") == b"retry me"
    assert store.calls["upload"] == 3
    fs.release(fh)


def test_fsync_timeout(make_fs, store):
    fs = make_fs(writeback_delay=30, fsync_timeout=0.5)
    fh = fs.create("/s", 0o644)
    fs.write(fh, b"x", 0)
    store.fail("upload", 10_000)
    t0 = time.monotonic()
    with pytest.raises(TimedOut):
        fs.fsync(fh)
    assert time.monotonic() - t0 < 5
    assert not store.exists("s")
    store.fail("upload", 0)
    fs.release(fh)
    assert fs.flush_all(timeout=20)                      # retried until it succeeds
    assert store.data("s") == b"x"


# ------------------------------------------------------------------------- crash recovery
CHILD_PRELUDE = r"""
import os, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from memstore import MemStore
from ssecfs.cache import Cache
from ssecfs.config import FsConfig
from ssecfs.crypto.aead import Sealer
from ssecfs.fs.filesystem import Filesystem
from ssecfs.crypto.keys import load_keyring
ring = load_keyring(sys.argv[3])
cache = Cache(sys.argv[4], {k.fingerprint: Sealer(k.cache_key()) for k in ring.keys},
              1 << 30, ring.current.fingerprint)
cache.open()
fs = Filesystem(MemStore(ring), cache, FsConfig(writeback_delay=3600, defer_deletes=False))
"""


def crash_child(tmp_path, body: str, *args: str) -> tuple[bytes, str]:
    """Run `body` on a Filesystem over a fresh cache in a child process that ends with
    os._exit (a crash: nothing closed, nothing uploaded); body prints "written" when done.
    Extra args are sys.argv[5:]. Returns (the raw key, the cache directory)."""
    raw = os.urandom(32)
    keyfile = tmp_path / "k"
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, raw)
    os.close(fd)
    cache_dir = str(tmp_path / "crash-cache")
    r = subprocess.run([sys.executable, "-c", CHILD_PRELUDE + body, os.path.join(REPO, "tests"),
                        REPO, str(keyfile), cache_dir, *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "written" in r.stdout, r.stderr
    return raw, cache_dir


CRASH = r"""
data = open(sys.argv[5], "rb").read()
fh = fs.create("/crash.bin", 0o640)
fs.write(fh, data, 0)
fs.flush(fh)
fs.release(fh)
fh = fs.create("/open-only.bin", 0o644)   # written, never flushed: not promised durable
fs.write(fh, b"x" * 10, 0)
print("written", flush=True)
os._exit(0)                                # crash: nothing closed, nothing uploaded
"""


def test_recover_after_crash_uploads_dirty_file(tmp_path, make_fs, store):
    data = os.urandom(2 * CHUNK + 777)
    (tmp_path / "data").write_bytes(data)
    raw, cache_dir = crash_child(tmp_path, CRASH, str(tmp_path / "data"))

    ring = KeyRing([Key(raw)])
    st2 = MemStore(ring)
    fs = make_fs(cache_dir=cache_dir, st=st2)            # Cache.open succeeds: lock died
    assert fs.recover() == 1
    assert fs.uploads.bad_entries == []
    settle(fs)
    assert st2.data("crash.bin") == data
    assert int(st2.meta("crash.bin")["mode"]) == REG | 0o640
    assert st2.key_fp_of("crash.bin") == ring.current.fingerprint
    assert fs.cache.stats()["cache_dirty_bytes"] == 0
    assert read_all(fs, "/crash.bin") == data


def test_recover_with_other_key_reports_entry(tmp_path, make_fs, ring):
    """A journal sealed under a key that is no longer in the ring is kept and reported."""
    cache_dir = tmp_path / "rc"
    other_ring = KeyRing([Key(os.urandom(32))])
    c = open_cache(cache_dir, other_ring)
    fs1 = Filesystem(MemStore(other_ring), c, FsConfig(writeback_delay=3600, defer_deletes=False))
    write_file(fs1, "/lost", b"sealed with another key")
    fs1.shutdown()
    c.close()
    fs = make_fs(cache_dir=cache_dir)
    assert fs.recover() == 0
    assert len(fs.uploads.bad_entries) == 1
    assert any(n.startswith(fs.uploads.bad_entries[0]) for n in os.listdir(fs.cache.entries_dir))


# ------------------------------------------------------------------------- misc
def test_symlink(fs, store):
    fs.symlink("/link", "target/file")
    assert stat.S_ISLNK(fs.getattr("/link").mode)
    assert fs.readlink("/link") == "target/file"
    assert store.data("link") == b"target/file"
    with pytest.raises(Exists):
        fs.symlink("/link", "x")


def test_upload_failure_keeps_data_and_retries(fs, store):
    store.fail("upload", 2)
    write_file(fs, "/r", b"eventually")
    settle(fs)
    assert store.data("r") == b"eventually"
    assert fs.status()["upload_errors"] == 2


def test_status_counts_pending(make_fs, store):
    fs = make_fs(writeback_delay=30)
    write_file(fs, "/a", b"12345")
    s = fs.status()
    assert s["dirty_files"] == 1 and s["bytes_pending"] == 5
    assert fs.flush_all(timeout=10)
    assert fs.status()["dirty_files"] == 0


def test_prefix(make_fs, store):
    fs = make_fs(prefix="base/")
    write_file(fs, "/f", b"under prefix")
    fs.mkdir("/d", 0o755)
    settle(fs)
    assert store.data("base/f") == b"under prefix" and store.exists("base/d/")
    assert sorted(fs.readdir("/")) == [".", "..", "d", "f"]


def test_getattr_missing_then_created(fs, store):
    with pytest.raises(NotFound):
        fs.getattr("/nothing")
    write_file(fs, "/nothing", b"now it exists")         # the negative entry is dropped
    assert fs.getattr("/nothing").size == 13
    settle(fs)
    assert fs.getattr("/nothing").size == 13


# ------------------------------------------------------------------------- a small cache
SLOT_COST = CHUNK + 28


def test_read_through_cache_smaller_than_a_read_unit(make_fs, store):
    """Clean chunks may be evicted at any time; a read must still return the data."""
    fs = make_fs(max_bytes=8 * SLOT_COST)
    data = os.urandom(48 * CHUNK + 5)
    remote_file(store, "big", data)
    assert read_all(fs, "/big") == data
    assert fs.cache.stats()["cache_used_bytes"] <= 8 * SLOT_COST


def test_write_larger_than_cache_then_read_back(make_fs, store):
    fs = make_fs(max_bytes=4 * SLOT_COST)
    data = os.urandom(10 * CHUNK + 1)
    write_file(fs, "/a", data)                           # one file may exceed the bound
    settle(fs)
    assert store.data("a") == data
    assert fs.cache.stats()["cache_used_bytes"] <= 4 * SLOT_COST    # clean now: evictable
    fh = fs.open("/a", os.O_RDONLY)
    assert fs.read(fh, 100, 7 * CHUNK + 3) == data[7 * CHUNK + 3:7 * CHUNK + 103]
    fs.release(fh)


def test_a_change_of_metadata_only_keeps_its_journal_out_of_eviction(make_fs, store):
    """chmod of an open file whose cached chunks are clean journals the change in the cache
    entry. Until it is uploaded, that entry must not be evicted (eviction of its last chunk
    removed the entry's file, and the record with it: a journal write then failed too)."""
    fs = make_fs(max_bytes=4 * SLOT_COST, writeback_delay=3600)
    data = os.urandom(2 * CHUNK)
    remote_file(store, "m", data)
    remote_file(store, "other", os.urandom(12 * CHUNK))
    fh = fs.open("/m", os.O_RDONLY)
    assert fs.read(fh, len(data), 0) == data            # cached, clean
    fs.chmod("/m", 0o600)
    entry = fs.files.handle(fh).entry
    assert entry.dirty
    read_all(fs, "/other")                               # pressure: evicts what it may
    assert entry.dirty and os.path.exists(entry.data_path)
    fs.release(fh)
    assert fs.flush_all(timeout=20)
    assert int(store.meta("m")["mode"]) == REG | 0o600 and store.data("m") == data
    assert not entry.dirty


def test_writer_not_blocked_forever_by_another_open_dirty_file(make_fs, store):
    """File A is open with more dirty data than the cache bound (it cannot be uploaded
    before it is closed); a write to file B must not hang forever waiting for room."""
    fs = make_fs(max_bytes=4 * SLOT_COST)
    fa = fs.create("/a", 0o644)
    fs.write(fa, os.urandom(6 * CHUNK), 0)
    fb = fs.create("/b", 0o644)
    t = threading.Thread(target=fs.write, args=(fb, b"x" * 100, 0), daemon=True)
    t.start()
    t.join(5)
    blocked = t.is_alive()
    fs.release(fa)                                       # lets a blocked writer go on
    t.join(20)
    fs.release(fb)
    assert not blocked, "write to /b blocked while /a (open, unuploadable) held the cache"
    settle(fs)
    assert store.data("b") == b"x" * 100


# ------------------------------------------------------------------------- the fake itself
def test_memstore_fault_hook_and_counters(ring):
    st = MemStore(ring)
    st.fail("put", 2)
    for _ in range(2):
        with pytest.raises(StoreUnavailable):
            st.put("k", b"v", {})
    assert not st.exists("k")
    st.put("k", b"v", {})
    assert st.calls["put"] == 3 and st.data("k") == b"v"
    st.fail("head", 1, NotFound)
    with pytest.raises(NotFound):
        st.head("k")
    assert st.head("k").size == 1
    seen = []
    st.before["get_range"] = lambda key, *a: seen.append((key, a))
    assert st.get_range("k", 0, 1, ring.current.fingerprint) == b"v"
    assert seen == [("k", (0, 1))]


# ------------------------------------------------------------------------- streamed uploads
from ssecfs.fs.stream import STREAM_PART, STREAM_START  # noqa: E402


def write_pieces(fs, fh, data: bytes, start: int = 0) -> None:
    for off in range(0, len(data), 128 * 1024):
        piece = data[off:off + 128 * 1024]
        assert fs.write(fh, piece, start + off) == len(piece)


def test_big_sequential_file_is_uploaded_while_written(make_fs, store):
    """Parts go out before close; at upload time only the tail is sent; the object is exact
    and carries no mtime (its Last-Modified is its mtime), mode and owner are kept."""
    fs = make_fs(writeback_delay=30)
    data = os.urandom(5 * STREAM_PART + 12345)
    fh = fs.create("/big.bin", 0o640)
    write_pieces(fs, fh, data)
    wait_until(lambda: store.calls["mpu_part"] >= 3, what="parts sent while written")
    assert not store.exists("big.bin")                  # nothing visible before completion
    fs.flush(fh)
    fs.release(fh)
    assert fs.flush_all(timeout=20)
    assert store.data("big.bin") == data
    assert store.calls["upload"] == 0 and store.calls["mpu_complete"] == 1
    assert store.calls["mpu_part"] == 6                  # each part exactly once
    meta = store.meta("big.bin")
    assert int(meta["mode"]) == REG | 0o640 and "mtime" not in meta
    assert read_all(fs, "/big.bin") == data
    assert store.uploads_open() == 0


def test_close_of_a_duplicate_descriptor_does_not_cut_the_stream(make_fs, store):
    """`dd of=F` and `cmd > F` close the descriptor they dup'ed onto stdout before writing:
    that close() queues an upload that comes due while the file is still being written. It
    must not complete the multipart stream at a partial size (every later part would then be
    sent again): the upload waits for the last close, and each part goes out once."""
    fs = make_fs(writeback_delay=0.2)
    data = os.urandom(5 * STREAM_PART + 777)
    fh = fs.create("/dd.bin", 0o644)
    fs.flush(fh)                                         # close() of the dup'ed descriptor
    st = fs.files.handle(fh)
    write_pieces(fs, fh, data[:4 * STREAM_PART])
    wait_until(lambda: st.deferred, what="the upload queued by the first close to be deferred")
    assert store.calls["mpu_complete"] == 0 and store.calls["upload"] == 0
    write_pieces(fs, fh, data[4 * STREAM_PART:], 4 * STREAM_PART)
    fs.flush(fh)
    fs.release(fh)
    settle(fs)
    assert store.data("dd.bin") == data
    assert store.calls["mpu_complete"] == 1 and store.calls["upload"] == 0
    assert store.calls["mpu_part"] == 6                  # each part exactly once


def test_upload_waits_for_the_last_writer_and_not_for_readers(make_fs, store):
    """A small file still open for writing is not uploaded when another descriptor closes
    (the dup'ed one, a reader's): it would store a partial object. The last writer's close
    uploads it once, even while a reader still holds it open."""
    fs = make_fs(writeback_delay=0.05)
    fh = fs.create("/log.txt", 0o644)
    st = fs.files.handle(fh)
    fs.write(fh, b"one\n", 0)
    fs.flush(fh)                                         # close() of the dup'ed descriptor
    wait_until(lambda: st.deferred, what="the upload queued by the flush to be deferred")
    rfh = fs.open("/log.txt", os.O_RDONLY)
    fs.write(fh, b"two\n", 4)
    fs.release(rfh)                                      # a reader closes
    wait_until(lambda: st.deferred, what="the upload queued by the reader's close to wait")
    assert store.calls["upload"] == 0 and not store.exists("log.txt")
    rfh = fs.open("/log.txt", os.O_RDONLY)               # a reader stays open
    fs.release(fh)                                       # the last writer closes
    wait_until(lambda: store.exists("log.txt"), what="the upload after the last writer's close")
    settle(fs)
    assert store.data("log.txt") == b"one\ntwo\n" and store.calls["upload"] == 1
    assert fs.read(rfh, 100, 0) == b"one\ntwo\n"
    fs.release(rfh)


def test_fsync_mid_stream_is_not_deferred(make_fs, store):
    fs = make_fs(writeback_delay=30)
    data = os.urandom(4 * STREAM_PART)
    fh = fs.create("/s.bin", 0o644)
    write_pieces(fs, fh, data)
    fs.fsync(fh)                                         # returns: durable now
    assert store.data("s.bin") == data
    fs.release(fh)
    assert fs.flush_all(timeout=20) and store.data("s.bin") == data


def test_parts_left_at_completion_are_sent_once(make_fs, store):
    """When the write-back completes a stream, it sends the parts not sent yet itself, once
    each: the stream's pump must not send them a second time (nor, later, to the completed
    upload). Parts 1-8 are held until the upload has started, the others until one is sent."""
    from ssecfs.fs.stream import STREAM_WINDOW
    fs = make_fs(writeback_delay=30)
    window, rest = threading.Event(), threading.Event()
    store.before["mpu_part"] = \
        lambda key, number, size: (window if number <= STREAM_WINDOW else rest).wait(60)
    nparts = STREAM_WINDOW + 5
    data = os.urandom(nparts * STREAM_PART - 1000)
    fh = fs.create("/w.bin", 0o644)
    st = fs.files.handle(fh)
    write_pieces(fs, fh, data)
    wait_until(lambda: len(st.stream.inflight) == STREAM_WINDOW, what="a window of parts held")
    fs.release(fh)
    done = threading.Thread(target=fs.flush_all, kwargs={"timeout": 60})
    done.start()
    wait_until(lambda: fs.uploads.wb.in_flight() == 1, what="the upload to start completing the stream")
    window.set()
    wait_until(lambda: store.calls["mpu_part"] > STREAM_WINDOW, what="the other parts to go")
    rest.set()
    done.join(60)
    assert store.data("w.bin") == data
    assert store.calls["mpu_part"] == nparts and store.calls["mpu_complete"] == 1


def test_part_rewritten_after_it_was_sent_is_sent_again(make_fs, store):
    fs = make_fs(writeback_delay=30)
    data = bytearray(os.urandom(5 * STREAM_PART))
    fh = fs.create("/r.bin", 0o644)
    write_pieces(fs, fh, bytes(data))
    wait_until(lambda: store.calls["mpu_part"] >= 1, what="first part sent")
    patch = os.urandom(1000)
    fs.write(fh, patch, 100)                             # e.g. a header written at the end
    data[100:1100] = patch
    fs.release(fh)
    assert fs.flush_all(timeout=20)
    assert store.data("r.bin") == bytes(data)


@pytest.mark.parametrize("change", ["chmod", "utimens", "truncate", "rename", "unlink"])
def test_stream_dropped_by_changes_it_cannot_carry(make_fs, store, change):
    """Metadata is fixed when a multipart upload begins, and a truncate or rename changes
    what is uploaded: the stream is aborted and the file uploaded whole, correctly."""
    fs = make_fs(writeback_delay=30)
    data = os.urandom(4 * STREAM_PART)
    fh = fs.create("/c.bin", 0o644)
    write_pieces(fs, fh, data)
    wait_until(lambda: store.calls["mpu_part"] >= 1, what="a part sent")
    expect_key, expect = "c.bin", data
    if change == "chmod":
        fs.chmod("/c.bin", 0o600)
    elif change == "utimens":
        fs.utimens("/c.bin", 1_600_000_000, 1_600_000_000)
    elif change == "truncate":
        fs.truncate("/c.bin", STREAM_START + 5, fh)
        expect = data[:STREAM_START + 5]
    elif change == "rename":
        fs.rename("/c.bin", "/d.bin")
        expect_key = "d.bin"
    else:
        fs.unlink("/c.bin")
    fs.release(fh)
    assert fs.flush_all(timeout=20)
    wait_until(lambda: store.uploads_open() == 0, what="the stream to be aborted")
    if change == "unlink":
        assert store.keys() == []
        return
    assert store.data(expect_key) == expect
    assert set(store.keys()) == {expect_key}
    meta = store.meta(expect_key)
    if change == "chmod":
        assert int(meta["mode"]) == REG | 0o600
    if change == "utimens":
        assert float(meta["mtime"]) == 1_600_000_000


def test_small_or_random_writes_do_not_stream(make_fs, store):
    fs = make_fs(writeback_delay=30)
    write_file(fs, "/small.bin", os.urandom(STREAM_START - 1))
    fh = fs.create("/sparse.bin", 0o644)
    fs.write(fh, b"x" * 1000, 4 * STREAM_PART)           # not sequential from empty
    fs.release(fh)
    assert fs.flush_all(timeout=20)
    assert store.calls["mpu_begin"] == 0
    assert len(store.data("sparse.bin")) == 4 * STREAM_PART + 1000


def test_failed_part_falls_back_to_whole_upload(make_fs, store):
    fs = make_fs(writeback_delay=30)
    store.fail("mpu_part", 1)
    data = os.urandom(4 * STREAM_PART + 7)
    write_file(fs, "/f.bin", data)
    assert fs.flush_all(timeout=30)
    assert store.data("f.bin") == data
    wait_until(lambda: store.uploads_open() == 0, what="the broken stream to be aborted")


def test_files_read_in_listing_order_are_looked_up_ahead_of_the_reader(make_fs, store):
    """`cp -r`/`tar`/`cat *`: from the second file opened in listing order, the next ones
    are looked up (with their content) ahead, in parallel; no file is asked twice."""
    from ssecfs.fs.prefetch import SIBLINGS_AHEAD
    fs = make_fs(attr_timeout=60)
    data = {f"f{n:03d}": os.urandom(3000 + n) for n in range(80)}
    for name, body in data.items():
        remote_file(store, f"sib/{name}", body)
    names = [n for n in fs.readdir("/sib") if n not in (".", "..")]
    assert names == sorted(data)
    assert wait_until(lambda: not fs.attrs.prefetch.heads, timeout=10)     # the listing's own HEADs
    n0 = len(store.log)
    # (MemStore's head_with_start logs as "head")
    asked = lambda: [k for op, k in store.log[n0:] if op == "head"]  # noqa: E731
    for n, name in enumerate(names):
        assert read_all(fs, f"/sib/{name}") == data[name]
        if n == 1:                    # the second open in order: the window is on its way
            ahead = f"sib/{names[1 + SIBLINGS_AHEAD]}"
            assert wait_until(lambda: ahead in asked(), timeout=10)
    # each file after the first two was fetched once, with its lookup; those two by a GET
    assert sorted(asked()) == sorted(f"sib/{n}" for n in names[2:])
    assert store.calls["get_range"] == 2


def test_files_opened_out_of_listing_order_are_not_looked_up_ahead(make_fs, store):
    fs = make_fs(attr_timeout=60)
    for n in range(40):
        remote_file(store, f"rnd/f{n:03d}", b"x" * 100)
    list(fs.readdir("/rnd"))
    assert wait_until(lambda: not fs.attrs.prefetch.heads, timeout=10)
    n0 = len(store.log)
    for n in (7, 30, 2, 19):
        assert read_all(fs, f"/rnd/f{n:03d}") == b"x" * 100
    fs.attrs.head_pool.submit(lambda: None).result()
    assert not [k for op, k in store.log[n0:] if op == "head"]
    assert store.calls["get_range"] == 4


def test_a_random_read_of_a_scanned_unit_fetches_it_whole_and_caches_it(fs, store, scan_min):
    """After a sequential read that left a big file uncached (its second read may come from
    the kernel's page cache, unseen), a random read of a unit fetches that unit whole, and
    caches it: the next random reads in it send nothing."""
    data = os.urandom(scan_min)
    remote_file(store, "big", data)
    assert read_all(fs, "/big") == data
    gets = record_gets(store)
    fh = fs.open("/big", os.O_RDONLY)
    try:
        off = READ_UNIT + 5 * CHUNK + 7
        assert fs.read(fh, 4096, off) == data[off:off + 4096]
        assert gets == [(READ_UNIT, READ_UNIT)]
        for off in (READ_UNIT + 60 * CHUNK, READ_UNIT + 3):
            assert fs.read(fh, 4096, off) == data[off:off + 4096]
        assert len(gets) == 1
    finally:
        fs.release(fh)


def test_files_opened_by_name_in_order_are_looked_up_ahead_once_listed(make_fs, store):
    """A program that opens f000, f001, ... by name, without listing: the second open lists
    the directory in the background, and the lookahead follows the listing's order."""
    fs = make_fs(attr_timeout=60)
    for n in range(60):
        remote_file(store, f"named/f{n:03d}", b"z" * (100 + n))
    for n in range(10):
        assert read_all(fs, f"/named/f{n:03d}") == b"z" * (100 + n)
        if n >= 1:
            assert wait_until(lambda: "/named" in fs.attrs.prefetch._runs, timeout=10)
    # its content was fetched with its lookup, before its open
    assert wait_until(lambda: fs.attrs.has_start("/named/f030"), timeout=10)


def test_small_files_waiting_for_a_worker_go_out_together(make_fs, store):
    """While the upload workers are busy, small files closed meanwhile wait; a worker then
    sends up to 8 of them at once (store.put_many), and each object is its file's content."""
    fs = make_fs(upload_workers=1)
    gate, first = threading.Event(), threading.Event()

    def hold_first(key, *a):
        if not first.is_set():
            first.set()
            assert gate.wait(10)
    store.before["put"] = store.before["upload"] = hold_first
    blobs = {f"/b{i:02d}": os.urandom(100 + i) for i in range(12)}
    for path, data in blobs.items():
        fh = fs.create(path, 0o644)
        fs.write(fh, data, 0)
        fs.flush(fh)
        fs.release(fh)
        if path == "/b00":
            assert first.wait(10)                # the only worker is busy with it
    gate.set()
    settle(fs)
    assert {"/" + k: store.data(k) for k in store.keys()} == blobs
    # one at a time through upload, together through put_many (which calls put for each)
    assert store.calls["upload"] + store.calls["put"] == 12
    assert store.calls["put_many"] >= 2 and store.calls["put"] >= 8
