"""Deferred deletes (ssecfs/store/deferred.py) under the filesystem, over the SSE-C-enforcing
in-memory store: unlink returns once journaled, names vanish at once, keys go out in
batches, writes to a key wait for its delete, and the journal survives a crash."""

from __future__ import annotations

import os
import threading

import pytest

from helpers import wait_until
from memstore import MemStore
from ssecfs.store import delqueue as deletes
from ssecfs.store.deljournal import DeleteJournal
from ssecfs.errors import NotFound
from test_fs_unit import (in_thread, make_fs, open_cache, read_all, remote_file,  # noqa: F401
                          ring, store, write_file)


@pytest.fixture
def dfs(make_fs):
    """A filesystem with deferred deletes, its journal taken up (as the daemon does)."""
    def make(**cfg):
        fs = make_fs(defer_deletes=True, **cfg)
        fs.recover()
        return fs
    return make


class Hold:
    """Blocks every DeleteObjects until released."""

    def __init__(self, store: MemStore):
        self.release = threading.Event()
        self.started = threading.Event()

        def hook(key, *args):
            self.started.set()
            assert self.release.wait(20), "deletes never released"
        store.before["delete_many"] = hook


def deleted_keys(store: MemStore) -> list[str]:
    return [k for op, k in store.log if op in ("delete", "delete_many")]


def test_unlink_returns_before_the_delete_and_the_name_is_gone_at_once(dfs, store):
    fs = dfs()
    for n in range(3):
        remote_file(store, f"d/f{n}", b"x" * 100)
    assert sorted(fs.readdir("/d"))[2:] == ["f0", "f1", "f2"]
    hold = Hold(store)
    fs.unlink("/d/f1")                      # returns although DeleteObjects is blocked
    assert store.exists("d/f1")
    with pytest.raises(NotFound):
        fs.getattr("/d/f1")
    assert sorted(fs.readdir("/d"))[2:] == ["f0", "f2"]
    with pytest.raises(NotFound):
        fs.open("/d/f1", os.O_RDONLY)
    hold.release.set()
    assert wait_until(lambda: not store.exists("d/f1"), timeout=10)
    assert store.exists("d/f0") and store.exists("d/f2")
    assert fs.status()["deletes_pending"] == 0


def test_many_unlinks_go_out_in_few_requests(dfs, store):
    fs = dfs()
    for n in range(300):
        remote_file(store, f"many/f{n:03d}", b"y")
    hold = Hold(store)
    for n in range(300):
        fs.unlink(f"/many/f{n:03d}")
    hold.release.set()
    fs.fsyncdir("/many")
    assert not [k for k in store.keys() if k.startswith("many/f")]
    assert store.calls["delete"] == 0
    # a few requests at once, of at least MIN_BATCH keys each while that many wait
    assert store.calls["delete_many"] <= 300 // deletes.MIN_BATCH, store.calls


def test_rm_r_leaves_nothing_and_the_directory_goes_after_its_files(dfs, store):
    fs = dfs()
    fs.mkdir("/t", 0o755)
    fs.mkdir("/t/sub", 0o755)
    for n in range(5):
        write_file(fs, f"/t/sub/f{n}", b"z")
    assert fs.flush_all(timeout=10) and store.exists("t/sub/f4")
    hold = Hold(store)
    for n in range(5):
        fs.unlink(f"/t/sub/f{n}")
    fs.rmdir("/t/sub")                       # empty although its files are still there
    assert list(fs.readdir("/t")) == [".", ".."]
    fs.rmdir("/t")
    with pytest.raises(NotFound):
        fs.getattr("/t")
    hold.release.set()
    assert fs.flush_all(timeout=10)
    assert [k for k in store.keys() if k.startswith("t/")] == []
    order = deleted_keys(store)
    assert order.index("t/sub/") > order.index("t/sub/f0")


def test_a_file_created_again_is_written_after_the_delete_of_its_old_self(dfs, store):
    fs = dfs()
    remote_file(store, "again", b"old")
    n0 = len(store.log)
    hold = Hold(store)
    fs.unlink("/again")
    write_file(fs, "/again", b"new content")  # close returns: the upload waits for the delete
    assert read_all(fs, "/again") == b"new content"
    hold.release.set()
    assert fs.flush_all(timeout=10)
    assert store.data("again") == b"new content"
    ops = [op for op, k in store.log[n0:]
           if k == "again" and op in ("delete_many", "put", "upload")]
    assert ops[0] == "delete_many" and ops[-1] in ("put", "upload"), ops


def waits_for_the_delete(fs, store, gone: str, fn, *args) -> None:
    """Unlink `gone` with DeleteObjects held: fn(*args), in a thread, must still be running
    once the delete was sent, and end once it is let through."""
    hold = Hold(store)
    fs.unlink(gone)
    t, result = in_thread(fn, *args)
    assert hold.started.wait(10)
    assert t.is_alive(), "it did not wait for the delete"
    hold.release.set()
    t.join(20)
    assert "error" not in result, result


def test_rename_onto_a_name_being_deleted_copies_after_the_delete(dfs, store):
    fs = dfs()
    remote_file(store, "target", b"old target")
    remote_file(store, "source", b"source data")
    waits_for_the_delete(fs, store, "/target", fs.rename, "/source", "/target")
    assert fs.flush_all(timeout=10)
    assert store.data("target") == b"source data" and not store.exists("source")


def test_a_directory_made_where_a_file_is_being_deleted_is_written_after_the_delete(dfs,
                                                                                   store):
    """SeaweedFS and MinIO refuse `b/` while a file `b` exists (ExistingObjectIsFile): the
    marker waits for the delete of the file."""
    fs = dfs()
    remote_file(store, "b", b"a file")
    waits_for_the_delete(fs, store, "/b", fs.mkdir, "/b", 0o755)
    assert store.exists("b/") and not store.exists("b")
    fs.mkdir("/b/sub", 0o755)
    assert store.exists("b/sub/")


def test_a_file_made_where_a_directory_is_being_deleted_is_written_after_its_keys_go(dfs,
                                                                                     store):
    """...and a file `c` while keys under `c/` exist."""
    fs = dfs()
    fs.mkdir("/c", 0o755)
    write_file(fs, "/c/x", b"1")
    assert fs.flush_all(timeout=10) and store.exists("c/x")
    n0 = len(store.log)
    hold = Hold(store)
    fs.unlink("/c/x")
    fs.rmdir("/c")
    write_file(fs, "/c", b"now a file")     # close returns: the upload waits
    assert hold.started.wait(10)
    assert not store.exists("c") or store.data("c") != b"now a file"
    hold.release.set()
    assert fs.flush_all(timeout=10)
    assert store.data("c") == b"now a file" and not store.exists("c/x")
    ops = [(op, k) for op, k in store.log[n0:]
           if op in ("delete_many", "put", "upload") and k in ("c", "c/", "c/x")]
    written = ops.index(next(o for o in ops if o[1] == "c"))
    assert {k for op, k in ops[:written]} == {"c/", "c/x"}, ops


def test_fsyncdir_returns_once_the_deletes_under_it_are_done(dfs, store):
    fs = dfs()
    remote_file(store, "s/a", b"1")
    remote_file(store, "other", b"2")
    waits_for_the_delete(fs, store, "/s/a", fs.fsyncdir, "/s")
    assert not store.exists("s/a")


def test_failed_deletes_are_retried_and_reported(dfs, store):
    fs = dfs()
    remote_file(store, "r", b"1")
    store.fail("delete_many", n=2)
    fs.unlink("/r")
    assert wait_until(lambda: fs.status()["delete_error"], timeout=10)
    with pytest.raises(NotFound):
        fs.getattr("/r")                     # still gone for the mount meanwhile
    assert wait_until(lambda: not store.exists("r"), timeout=20)
    assert fs.status()["delete_error"] is None and fs.status()["deletes_pending"] == 0


def crash(fs) -> None:
    """The daemon dies: nothing more is sent; the cache dir is free for the next one."""
    fs.shutdown()
    fs.cache.close()


def test_deletes_journaled_before_a_crash_are_sent_by_the_next_daemon(tmp_path, dfs, store):
    fs1 = dfs(cache_dir=tmp_path / "c")
    for name in ("a", "b"):
        remote_file(store, f"j/{name}", b"data")
    assert sorted(fs1.readdir("/j"))[2:] == ["a", "b"]      # (their ETags are known)
    store.fail("delete_many", n=1000)
    fs1.unlink("/j/a")
    fs1.unlink("/j/b")
    crash(fs1)
    raw = (tmp_path / "c" / "deletes").read_bytes()
    assert b"j/a" not in raw and b"j/b" not in raw           # key names are sealed
    store.fail("delete_many", n=0)
    remote_file(store, "j/b", b"written by another client since")
    fs2 = dfs(cache_dir=tmp_path / "c")
    assert fs2.flush_all(timeout=10)
    assert not store.exists("j/a")
    assert store.data("j/b") == b"written by another client since"   # not ours any more
    crash(fs2)
    assert DeleteJournal(str(tmp_path / "c" / "deletes"), fs2.cache.sealers,
                         fs2.cache.key_fp).load() == []


def test_a_journal_cut_by_a_crash_keeps_its_whole_records(tmp_path, dfs, store):
    fs1 = dfs(cache_dir=tmp_path / "c")
    for n in range(3):
        remote_file(store, f"k{n}", b"data")
        fs1.getattr(f"/k{n}")
    store.fail("delete_many", n=1000)
    for n in range(3):
        fs1.unlink(f"/k{n}")
    crash(fs1)
    path = tmp_path / "c" / "deletes"
    path.write_bytes(path.read_bytes()[:-10])                 # the last record torn
    store.fail("delete_many", n=0)
    fs2 = dfs(cache_dir=tmp_path / "c")
    assert fs2.flush_all(timeout=10)
    assert not store.exists("k0") and not store.exists("k1") and store.exists("k2")


def test_a_replayed_delete_without_etag_spares_an_object_written_after_it(tmp_path, ring,
                                                                          store):
    import time
    from ssecfs.store.deferred import DeferredDeletes
    cache = open_cache(tmp_path / "c", ring)
    now = time.time()
    remote_file(store, "older", b"1")
    remote_file(store, "newer", b"2")
    store._objects["older"].mtime = now - 100     # before the delete was journaled
    store._objects["newer"].mtime = now + 5       # written since (another client)
    path = str(tmp_path / "c" / "deletes")
    DeleteJournal(path, cache.sealers, cache.key_fp).start(
        [[1, "older", None, now], [2, "newer", None, now]])
    d = DeferredDeletes(store, DeleteJournal(path, cache.sealers, cache.key_fp))
    try:
        assert d.recover() == 2
        assert d.flush(timeout=10)
        assert not store.exists("older") and store.data("newer") == b"2"
    finally:
        d.close()
        cache.close()


def test_a_listing_sent_before_a_delete_was_done_does_not_show_its_key(dfs, store):
    """The race of rm -r: rmdir lists the directory, the last delete completes while the
    answer is on its way (the answer still has the key): the directory is empty all the same."""
    fs = dfs()
    fs.mkdir("/e", 0o755)
    write_file(fs, "/e/last", b"1")
    assert fs.flush_all(timeout=10)
    hold = Hold(store)
    fs.unlink("/e/last")
    assert hold.started.wait(10)
    listed = threading.Event()
    original = store.list_page_iter

    def list_then_complete(prefix, *args, **kw):
        for page in original(prefix, *args, **kw):
            if prefix == "e/" and not listed.is_set():    # the answer has the key; the
                listed.set()                             # delete completes meanwhile
                hold.release.set()
                assert wait_until(lambda: fs.deletes.pending() == 0, timeout=10)
                assert any(o.key == "e/last" for o in page.objects)
            yield page
    store.list_page_iter = list_then_complete
    fs.rmdir("/e")
    assert listed.is_set()
    assert fs.flush_all(timeout=10) and not [k for k in store.keys() if k.startswith("e/")]


def test_keys_deleted_together_go_out_without_waiting_for_more(tmp_path, ring, store):
    from ssecfs.store.deferred import DeferredDeletes
    d = DeferredDeletes(store, delay=3600)         # a lone key would wait an hour
    try:
        remote_file(store, "t/a", b"1")
        remote_file(store, "t/b", b"2")
        d.delete_many(["t/a", "t/b"])
        assert wait_until(lambda: not store.exists("t/a") and not store.exists("t/b"), 10)
    finally:
        d.close()


def test_a_moved_tree_goes_in_requests_at_once_files_first_then_directories_deepest_first(
        dfs, store, monkeypatch):
    """The old keys go in several DeleteObjects requests at once, but never a directory key
    before everything under it (SeaweedFS keeps a "dir/" listed that still has children)."""
    fs = dfs()
    for i in range(120):
        store.put(f"t/f{i:03d}", b"f", {})
    for i in range(30):
        store.put(f"t/s/g{i:02d}", b"g", {})
    store.put("t/", b"", {})
    store.put("t/s/", b"", {})
    batches, lock = [], threading.Lock()
    real = store.delete_many

    def recording(keys):
        with lock:
            batches.append(list(keys))
        real(keys)
    monkeypatch.setattr(store, "delete_many", recording)
    fs.rename("/t", "/u")
    assert fs.flush_all(timeout=10)
    assert not [k for k in store.keys() if k.startswith("t/")]
    assert len([k for k in store.keys() if k.startswith("u/")]) == 152
    deleted = [k for b in batches for k in b]
    assert sorted(deleted) == sorted(["t/", "t/s/"] + [f"t/f{i:03d}" for i in range(120)]
                                     + [f"t/s/g{i:02d}" for i in range(30)])
    file_batches = [b for b in batches if not any(k.endswith("/") for k in b)]
    assert len(file_batches) == len(batches) - 2 >= deletes.STREAMS    # the 150 files
    assert batches[-2:] == [["t/s/"], ["t/"]]                # then the deepest directory first
