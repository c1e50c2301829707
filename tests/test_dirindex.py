"""Per-directory attribute indexes (ssecfs/dirindex.py): a cold `ls -l` answers from one GET,
and never from an entry that could describe another version of the file.

Unit tests run over the SSE-C-enforcing in-memory store; the mount test at the end runs a
real mount against SeaweedFS behind the counting proxy."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import threading

import botocore.exceptions
import pytest

from helpers import sse, wait_until
from memstore import MemStore
from ssecfs.fs import attrs
from ssecfs.fs import dirindex
from ssecfs.fs import prefetch
from ssecfs.fs.dirindex import INDEX_NAME, MIN_FILES, Entry, decode, encode
from ssecfs.errors import InvalidName, NotFound
from ssecfs.store.contract import ListedObject
from test_fs_unit import make_fs, ring, settle, store, write_file  # noqa: F401 - fixtures

N = MIN_FILES + 8
# The attribute timeout of these mounts. The tests count requests and end a timeout with
# expire_attrs(), never by waiting; with the 1 s default, a loaded machine took longer than
# that (or than half of it, after which a window of names is checked again) between a
# listing and the getattrs, and the answers were rightly asked again.
LONG = 60


def age(store: MemStore, seconds: float = 10) -> None:
    """Make every object look written `seconds` ago: answers about them are then mature."""
    for o in store._objects.values():
        o.mtime -= seconds


def heads_of_files(store: MemStore, since: int = 0) -> list[str]:
    """Files in directories (not indexes, not the directories' own lookups) that were asked
    with a HEAD or a GET since log position `since`."""
    return [k for op, k in store.log[since:] if op in ("head", "get_range")
            and "/" in k.rstrip("/") and not k.endswith(("/", INDEX_NAME))]


def others_files(store: MemStore, n: int, d: str = "o") -> None:
    """n files d/f00.. of i bytes each, mode 0640, put by another client a while ago."""
    for i in range(n):
        store.put(f"{d}/f{i:02d}", b"x" * i, {"mode": str(stat.S_IFREG | 0o640)})
    age(store)


def make_dir(fs, d: str = "/d", n: int = N) -> dict:
    """n files in d, some with their own mode and times; returns name -> attr."""
    fs.mkdir(d, 0o755)
    for i in range(n):
        write_file(fs, f"{d}/f{i:02d}", os.urandom(100 + i), mode=0o600 if i % 3 else 0o644)
    fs.chmod(f"{d}/f01", 0o751)
    fs.utimens(f"{d}/f02", 0, 1_600_000_000.25)
    settle(fs)
    return {f"f{i:02d}": fs.getattr(f"{d}/f{i:02d}") for i in range(n)}


def indexed_dir(make_fs, store) -> tuple:
    """A mount that made /d (make_dir) and wrote its index, the versions old enough to be
    indexed. Returns (that mount, name -> attr)."""
    fs = make_fs(attr_timeout=LONG)
    want = make_dir(fs)
    age(store)
    assert fs.dirindex.flush(10)
    return fs, want


def listed_attrs(fs, d: str = "/d") -> dict:
    names = [n for n in fs.readdir(d) if n not in (".", "..")]
    return {n: fs.getattr(f"{d}/{n}") for n in names}


def expire_attrs(fs) -> None:
    """As if the attribute timeout had passed (the caches of lookups and listings)."""
    a = fs.attrs
    with a.lock:
        for c in (a._attrs, a._infos, a._starts, a._listings):
            c.clear()


def ls_l_late(fs, store: MemStore, d: str = "/o") -> tuple[dict, int]:
    """`ls -l` of d whose getattrs come after the attribute timeout of its listing (as in a
    big directory). Returns (name -> attr, log position before the getattrs)."""
    expire_attrs(fs)
    names = [n for n in fs.readdir(d) if n not in (".", "..")]
    expire_attrs(fs)
    mark = len(store.log)
    got = {n: fs.getattr(f"{d}/{n}") for n in names}
    wait_until(lambda: not fs.attrs.prefetch.heads, 10, what="prefetches to finish")
    return got, mark


def same(a, b) -> bool:
    return (a.mode, a.size, a.mtime, a.uid, a.gid) == (b.mode, b.size, b.mtime, b.uid, b.gid)


# ------------------------------------------------------------------------------ the format
def test_encode_decode_round_trip_and_malformed_input_is_refused():
    e = Entry("abc", 1700000000, 5, stat.S_IFREG | 0o600, 1, 2, 1.5, 2.0, 1700000003, None, 0)
    dev = Entry("d", 1700000000, 0, stat.S_IFCHR | 0o600, 1, 2, 1.5, 2.0, 1700000003, 9.25,
                os.makedev(4, 64))
    assert decode(encode({"x y": e, "tty": dev})) == {"x y": e, "tty": dev}
    for bad in (b"", b"\xff\xfe", b"[]", b'{"ssecfs-index": 3, "entries": {}}',
                b'{"ssecfs-index": 1, "entries": {"a": ["e",1,1,1,1,1,1,1,1]}}',  # format 1
                b'{"ssecfs-index": 2, "entries": {"a/b": ["e",1,1,1,1,1,1,1,1,null,0]}}',
                b'{"ssecfs-index": 2, "entries": {"a": ["e",1,1,1,1,1,1,1,1,null]}}',
                b'{"ssecfs-index": 2, "entries": {"a": ["e","1",1,1,1,1,1,1,1,null,0]}}',
                b'{"ssecfs-index": 2, "entries": {"a": ["e",true,1,1,1,1,1,1,1,null,0]}}',
                b'{"ssecfs-index": 2, "entries": {"a": ["e",1,1,1,1,1,1,1,1,"1",0]}}',
                b'{"ssecfs-index": 2, "entries": {"a": ["e",1,1,1,1,1,1,1,1,null,-1]}}'):
        with pytest.raises(ValueError):
            decode(bad)


def test_an_entry_matches_only_its_version_and_only_when_seen_later():
    e = Entry("etag", 1000, 7, 0o100644, 0, 0, 1.0, 1.0, 1002, None, 0)
    assert e.matches(ListedObject("k", 7, "etag", 1000.0))
    assert e.matches(ListedObject("k", 7, "etag", 1000.9))           # same second
    assert not e.matches(ListedObject("k", 7, "other", 1000.0))       # content changed
    assert not e.matches(ListedObject("k", 8, "etag", 1000.0))
    assert not e.matches(ListedObject("k", 7, "etag", 1001.0))        # rewritten later
    # seen less than MATURE seconds after Last-Modified: another version with the same ETag
    # and Last-Modified could still follow (same-second metadata change) -> never used
    young = Entry("etag", 1000, 7, 0o100644, 0, 0, 1.0, 1.0, 1001, None, 0)
    assert not young.matches(ListedObject("k", 7, "etag", 1000.0))


# ------------------------------------------------------------------------- over the store
def test_a_cold_listing_takes_attributes_from_the_index_without_heads(make_fs, store):
    _, want = indexed_dir(make_fs, store)
    assert "d/" + INDEX_NAME in store.keys()
    assert store.calls["put"] >= 1

    fs2 = make_fs(attr_timeout=LONG)  # cold: another mount, empty caches
    mark = len(store.log)
    got = listed_attrs(fs2)
    assert set(got) == set(want), "the index object is hidden from listings"
    assert heads_of_files(store, mark) == []
    for n in want:
        assert same(got[n], want[n]), n
    assert stat.S_IMODE(got["f01"].mode) == 0o751 and got["f02"].mtime == 1_600_000_000.25


def test_the_listing_tells_whether_to_read_the_index(make_fs, store):
    """No request for an index the listing does not show; none either for one already read
    with the ETag the listing shows; read again once it changed."""
    fs1 = make_fs(attr_timeout=LONG)
    make_dir(fs1, "/none")
    fs1.dirindex.forget("none/")
    want = make_dir(fs1)
    age(store)
    assert fs1.dirindex.flush(10)
    store.delete("none/" + INDEX_NAME)
    ikey = "d/" + INDEX_NAME

    fs2 = make_fs(attr_timeout=LONG)
    mark = len(store.log)
    listed_attrs(fs2, "/none")
    assert not any(k.endswith(INDEX_NAME) for _op, k in store.log[mark:])
    got = listed_attrs(fs2)
    assert [op for op, k in store.log[mark:] if k == ikey] == ["head"]      # read once
    mark = len(store.log)
    expire_attrs(fs2)
    again = listed_attrs(fs2)
    assert [k for _op, k in store.log[mark:] if k == ikey] == []
    assert heads_of_files(store, mark) == []
    assert all(same(again[n], want[n]) and same(got[n], want[n]) for n in want)
    fs1.chmod("/d/f07", 0o700)
    settle(fs1)
    age(store)
    assert fs1.dirindex.flush(10)
    mark = len(store.log)
    expire_attrs(fs2)
    again = listed_attrs(fs2)
    assert [op for op, k in store.log[mark:] if k == ikey] == ["head"]      # changed: read
    assert heads_of_files(store, mark) == []
    assert stat.S_IMODE(again["f07"].mode) == 0o700


def test_files_changed_by_others_are_asked_again(make_fs, store):
    indexed_dir(make_fs, store)
    # another client: new content for f03, a metadata-only change of f04 (new version,
    # later Last-Modified), a new file; f05 deleted
    store.put("d/f03", b"new content", {"mode": str(stat.S_IFREG | 0o640)})
    o = store._objects["d/f04"]
    o.metadata = {**o.metadata, "mode": str(stat.S_IFREG | 0o604)}
    o.mtime += 5
    store.put("d/new", b"n", {"mode": str(stat.S_IFREG | 0o606)})
    store.delete("d/f05")

    fs2 = make_fs(attr_timeout=LONG)
    mark = len(store.log)
    got = listed_attrs(fs2)
    assert sorted(heads_of_files(store, mark)) == ["d/f03", "d/f04", "d/new"]
    assert "f05" not in got
    assert (stat.S_IMODE(got["f03"].mode), got["f03"].size) == (0o640, 11)
    assert stat.S_IMODE(got["f04"].mode) == 0o604
    assert stat.S_IMODE(got["new"].mode) == 0o606


def test_an_entry_seen_too_soon_is_not_used(make_fs, store, monkeypatch):
    """Same ETag, same Last-Modified second, other metadata (SeaweedFS: a chmod by CopyObject
    in the second of the write): an entry taken from an answer in that second must not be
    trusted, whatever the index says."""
    _, want = indexed_dir(make_fs, store)
    data = store._objects["d/" + INDEX_NAME].data
    entries = decode(data)
    # rewrite f06's entry as if seen in its own second, with a mode the object does not have
    e = entries["f06"]
    entries["f06"] = dataclasses.replace(e, mode=stat.S_IFREG | 0o777, seen=e.lm)
    store.put("d/" + INDEX_NAME, encode(entries), {})
    fs2 = make_fs(attr_timeout=LONG)
    mark = len(store.log)
    got = listed_attrs(fs2)
    assert heads_of_files(store, mark) == ["d/f06"]
    assert same(got["f06"], want["f06"]) and stat.S_IMODE(got["f06"].mode) != 0o777


def test_a_damaged_or_foreign_index_is_ignored(make_fs, store, ring, caplog):
    _, want = indexed_dir(make_fs, store)
    store.put("d/" + INDEX_NAME, b'{"ssecfs-index": 1, "entries": {"f00": [1]}}', {})
    fs2 = make_fs(attr_timeout=LONG)
    mark = len(store.log)
    got = listed_attrs(fs2)
    assert len(heads_of_files(store, mark)) == N
    assert all(same(got[n], want[n]) for n in want)
    assert "not an index of ours" in caplog.text


def test_an_object_of_that_name_that_is_no_index_of_ours_is_never_overwritten(make_fs, store,
                                                                            caplog, monkeypatch):
    monkeypatch.setattr(dirindex, "QUIET", 3600)     # indexes are written at flush() only
    fs = make_fs(attr_timeout=LONG)
    make_dir(fs, "/e")
    want = make_dir(fs)
    store.put("d/" + INDEX_NAME, b"a user's file, put there by another tool\n", {})
    store.put("e/" + INDEX_NAME, encode({}), {})
    e = store._objects["e/" + INDEX_NAME]
    e.key_fp = "another key"                         # written by a mount with another key
    age(store)
    assert fs.dirindex.flush(10)
    assert store._objects["d/" + INDEX_NAME].data == b"a user's file, put there by another tool\n"
    assert store._objects["e/" + INDEX_NAME] is e
    assert "not an index of ours" in caplog.text
    got = listed_attrs(make_fs(attr_timeout=LONG))  # listings still work (with HEADs)
    assert all(same(got[n], want[n]) for n in want)


def test_a_build_after_a_remount_reuses_the_stored_entries(make_fs, store):
    indexed_dir(make_fs, store)
    fs2 = make_fs(attr_timeout=LONG)  # no observations of its own
    write_file(fs2, "/d/f00", b"changed")
    settle(fs2)
    store._objects["d/f00"].mtime -= 10              # (the others keep their Last-Modified)
    mark = len(store.log)
    assert fs2.dirindex.flush(10)
    assert heads_of_files(store, mark) == ["d/f00"]  # only the file it changed
    assert decode(store._objects["d/" + INDEX_NAME].data)["f00"].size == len(b"changed")


def test_small_directories_get_no_index_and_a_shrinking_one_loses_it(make_fs, store):
    fs = make_fs(attr_timeout=LONG)
    make_dir(fs, "/small", MIN_FILES - 1)
    make_dir(fs, "/big", MIN_FILES + 2)
    age(store)
    assert fs.dirindex.flush(10)
    assert "small/" + INDEX_NAME not in store.keys()
    assert "big/" + INDEX_NAME in store.keys()
    for i in range(3):
        fs.unlink(f"/big/f{i:02d}")
    assert fs.dirindex.flush(10)
    assert "big/" + INDEX_NAME not in store.keys()


def test_the_index_name_is_reserved_and_rmdir_and_rename_handle_it(make_fs, store,
                                                                   monkeypatch):
    monkeypatch.setattr(dirindex, "QUIET", 3600)     # indexes are written at flush() only
    fs = make_fs(attr_timeout=LONG)
    make_dir(fs)
    age(store)
    assert fs.dirindex.flush(10)
    with pytest.raises(NotFound):
        fs.getattr("/d/" + INDEX_NAME)
    for call in (lambda: fs.create("/d/" + INDEX_NAME, 0o644),
                 lambda: fs.mkdir("/" + INDEX_NAME, 0o755),
                 lambda: fs.rename("/d/f00", "/d/" + INDEX_NAME)):
        with pytest.raises(InvalidName):
            call()
    fs.rename("/d", "/e")
    assert not any(k.startswith("d/") for k in store.keys())
    assert "e/" + INDEX_NAME not in store.keys()      # copies are new versions: not carried
    age(store)
    assert fs.dirindex.flush(10)
    assert "e/" + INDEX_NAME in store.keys()          # written anew for the moved files
    for n in [n for n in fs.readdir("/e") if n not in (".", "..")]:
        fs.unlink("/e/" + n)
    age(store)
    assert fs.dirindex.flush(10)
    fs.rmdir("/e")
    assert not any(k.startswith("e/") for k in store.keys())


def test_a_build_never_puts_back_the_index_of_a_directory_removed_meanwhile(make_fs, store,
                                                                          monkeypatch):
    monkeypatch.setattr(dirindex, "QUIET", 3600)     # no build but the one started here
    fs1 = make_fs(attr_timeout=LONG)
    make_dir(fs1)
    age(store)
    fs = make_fs(attr_timeout=LONG)  # no observations: its build HEADs every file
    go, inside = threading.Event(), threading.Event()

    def hold(key, *args):
        if key.startswith("d/f"):
            inside.set()
            assert go.wait(10)
    store.before["head"] = hold
    builder = threading.Thread(target=fs.dirindex.build, args=("d/",))
    builder.start()
    try:
        assert inside.wait(10), "the build did not start its HEADs"
        del store.before["head"]
        for n in [n for n in fs.readdir("/d") if n not in (".", "..")]:
            fs.unlink("/d/" + n)
        fs.rmdir("/d")
    finally:
        go.set()
        builder.join(10)
    assert not builder.is_alive()
    assert not any(k.startswith("d/") for k in store.keys()), store.keys()


def test_rmdir_removes_an_index_left_alone_in_a_directory(make_fs, store):
    fs = make_fs(attr_timeout=LONG)
    fs.mkdir("/lone", 0o755)
    settle(fs)
    store.put("lone/" + INDEX_NAME, encode({}), {})
    fs2 = make_fs(attr_timeout=LONG)
    assert [n for n in fs2.readdir("/lone") if n not in (".", "..")] == []
    fs2.rmdir("/lone")
    assert not any(k.startswith("lone/") for k in store.keys())


def test_a_read_only_mount_reads_indexes_but_never_writes_one(make_fs, store):
    indexed_dir(make_fs, store)
    ro = make_fs(read_only=True, attr_timeout=LONG)
    mark = len(store.log)
    listed_attrs(ro)
    assert heads_of_files(store, mark) == []          # the index is read
    store.delete("d/" + INDEX_NAME)
    ro2 = make_fs(read_only=True, attr_timeout=LONG)
    listed_attrs(ro2)                    # many files without an entry: would ask for a build
    assert not ro2.dirindex.writable
    assert ro2.dirindex.flush(5)
    assert "d/" + INDEX_NAME not in store.keys()
    assert not any(op in ("put", "upload", "copy") for op, _k in store.log[mark:])


def test_a_listing_of_files_written_by_others_heals_the_index(make_fs, store, monkeypatch):
    monkeypatch.setattr(dirindex, "QUIET", 0.05)
    for i in range(N):
        store.put(f"o/f{i}", b"x" * i, {"mode": str(stat.S_IFREG | 0o640)})
    age(store)
    fs = make_fs(attr_timeout=LONG)
    listed_attrs(fs, "/o")               # HEADs (no index yet): their answers are kept
    wait_until(lambda: "o/" + INDEX_NAME in store.keys(), 10, what="the healed index")
    fs2 = make_fs(attr_timeout=LONG)
    mark = len(store.log)
    got = listed_attrs(fs2, "/o")
    assert heads_of_files(store, mark) == []
    assert all(stat.S_IMODE(a.mode) == 0o640 for a in got.values())


def test_a_directory_too_big_for_an_index_is_listed_again_without_a_head_per_file(
        make_fs, store, monkeypatch):
    """No index object past MAX_ENTRIES files, but the answers this mount has seen serve its
    next listing (an `ls -l` of 100,000 files written by another tool took 200 s every time,
    one HEAD per file); a file changed meanwhile is still asked again."""
    monkeypatch.setattr(dirindex, "MAX_ENTRIES", N - 1)
    monkeypatch.setattr(dirindex, "QUIET", 0.05)
    others_files(store, N)
    fs = make_fs(attr_timeout=LONG)
    mark = len(store.log)
    first = listed_attrs(fs, "/o")
    assert len(heads_of_files(store, mark)) == N
    expire_attrs(fs)
    mark = len(store.log)
    again = listed_attrs(fs, "/o")
    assert heads_of_files(store, mark) == []
    assert all(same(again[n], first[n]) for n in first) and len(again) == N
    store.put("o/f03", b"new content", {"mode": str(stat.S_IFREG | 0o604)})
    expire_attrs(fs)
    mark = len(store.log)
    changed = listed_attrs(fs, "/o")
    assert heads_of_files(store, mark) == ["o/f03"]
    assert (stat.S_IMODE(changed["f03"].mode), changed["f03"].size) == (0o604, 11)
    assert fs.dirindex.flush(10)
    assert "o/" + INDEX_NAME not in store.keys()


def test_a_long_ls_l_of_a_directory_seen_before_checks_listing_pages_not_each_file(
        make_fs, store, monkeypatch):
    """`ls -l` of a big directory reaches most names after the attribute timeout of the
    listing it started with: each window of names is then checked against one fresh page of
    the listing (a HEAD only for files that changed), not one HEAD per file."""
    monkeypatch.setattr(dirindex, "MAX_ENTRIES", N - 1)
    others_files(store, N)
    fs = make_fs(attr_timeout=LONG)
    first = listed_attrs(fs, "/o")                    # HEADs: the answers are kept
    store.put("o/f03", b"changed by another client", {"mode": str(stat.S_IFREG | 0o600)})
    got, mark = ls_l_late(fs, store)
    assert heads_of_files(store, mark) == ["o/f03"]
    assert [op for op, _k in store.log[mark:]].count("list") == 1
    assert (stat.S_IMODE(got["f03"].mode), got["f03"].size) == (0o600, 25)
    assert all(same(got[n], first[n]) for n in first if n != "f03")


def test_rm_r_of_a_directory_seen_before_asks_no_removed_file_again(make_fs, store, monkeypatch):
    """`rm -r` looks each file up (after the attribute timeout of its readdir) and unlinks
    it. The listing page that checks a window of names again must not HEAD the files that
    are gone since (it asked each removed file again every half attribute timeout: 3-4
    HEADs per file), and the files left are vouched for by the page, not asked."""
    monkeypatch.setattr(dirindex, "MAX_ENTRIES", N - 1)     # no index object: memory only
    others_files(store, N)
    fs = make_fs(attr_timeout=LONG)
    listed_attrs(fs, "/o")                            # the answers are kept
    expire_attrs(fs)
    names = [n for n in fs.readdir("/o") if n not in (".", "..")]
    mark = len(store.log)
    for n in names:
        expire_attrs(fs)                              # as if the timeout had passed again
        with fs.attrs.lock:
            fs.attrs.prefetch._runs["/o"]["checked"].clear()
        assert stat.S_ISREG(fs.getattr(f"/o/{n}").mode)
        fs.unlink(f"/o/{n}")
    wait_until(lambda: not fs.attrs.prefetch.heads, 10, what="prefetches to finish")
    assert heads_of_files(store, mark) == []
    assert [k for op, k in store.log[mark:] if op == "delete"] == [f"o/{n}" for n in names]
    assert [op for op, _k in store.log[mark:]].count("list") >= len(names)   # checked each time


def test_a_directory_listed_again_within_the_timeout_costs_one_listing(make_fs, store):
    _, want = indexed_dir(make_fs, store)
    fs2 = make_fs(attr_timeout=LONG)
    listed_attrs(fs2)                                 # reads the index: answers kept
    expire_attrs(fs2)
    fs2.getattr("/d")                                 # (the directory's own lookup)
    mark = len(store.log)
    got = listed_attrs(fs2)                           # names found cached from the listing
    wait_until(lambda: not fs2.attrs.prefetch.heads, 10, what="prefetches to finish")
    assert store.log[mark:] == [("list", "d/")], store.log[mark:]
    assert all(same(got[n], want[n]) for n in want)


def test_a_big_directory_is_asked_a_listing_page_at_a_time(make_fs, store, monkeypatch):
    """Names past what a prefetch run holds (LISTING_CACHE_MAX) get their HEADs from a page
    of the listing at a time, in parallel, each file asked once (it was one HEAD after the
    other, as `ls` reached them); listed again, the page vouches for the files that did not
    change, and only the changed one is asked."""
    monkeypatch.setattr(attrs, "LISTING_CACHE_MAX", 5)
    monkeypatch.setattr(prefetch, "WINDOW", 10)
    monkeypatch.setattr(dirindex, "MAX_ENTRIES", 20)          # no index object: memory only
    n = 45
    others_files(store, n)
    fs = make_fs(attr_timeout=LONG)
    mark = len(store.log)
    first = listed_attrs(fs, "/o")
    asked = heads_of_files(store, mark)
    assert sorted(asked) == sorted(f"o/f{i:02d}" for i in range(n)), "each file asked once"
    assert all(stat.S_IMODE(a.mode) == 0o640 and a.size == int(p[1:]) for p, a in first.items())
    store.put("o/f33", b"changed", {"mode": str(stat.S_IFREG | 0o600)})
    got, mark = ls_l_late(fs, store)
    # (the first two lookups past the prefetch run are asked by themselves: a lone stat or
    # create in a big directory costs one request, not a page and its HEADs)
    assert heads_of_files(store, mark) == ["o/f05", "o/f06", "o/f33"]
    assert [op for op, _k in store.log[mark:]].count("list") <= n // 10 + 2
    mark = len(store.log)
    with pytest.raises(NotFound):
        fs.getattr("/o/new")
    wait_until(lambda: not fs.attrs.prefetch.heads, 10, what="prefetches to finish")
    assert set(heads_of_files(store, mark)) == {"o/new"}     # no page, no neighbour asked
    assert (stat.S_IMODE(got["f33"].mode), got["f33"].size) == (0o600, 7)
    assert all(same(got[x], first[x]) for x in first if x != "f33")


def test_answers_kept_in_memory_are_bounded_in_all(make_fs, store, monkeypatch):
    monkeypatch.setattr(dirindex, "OBS_TOTAL", N + 5)
    monkeypatch.setattr(dirindex, "MAX_ENTRIES", N - 1)      # no index objects: memory only
    for d in ("a", "b"):
        for i in range(N):
            store.put(f"{d}/f{i:02d}", b"y", {})
    age(store)
    fs = make_fs(attr_timeout=LONG)
    listed_attrs(fs, "/a")
    listed_attrs(fs, "/b")
    obs = fs.dirindex._obs
    assert obs.entries == sum(len(v) for v in obs.values()) == N + 5
    fs.dirindex.forget("a/")
    assert obs.entries == sum(len(v) for v in obs.values()) == 5


def test_disabled_indexes_are_neither_read_nor_written(make_fs, store):
    indexed_dir(make_fs, store)
    off = make_fs(dir_index=False, attr_timeout=LONG)
    mark = len(store.log)
    listed_attrs(off)
    assert len(heads_of_files(store, mark)) == N
    assert not any(k.endswith(INDEX_NAME) for op, k in store.log[mark:])


# -------------------------------------------------------------------- a real mount (SeaweedFS)
def stats(root: str) -> dict:
    out = {}
    for n in sorted(os.listdir(root)):
        st = os.lstat(os.path.join(root, n))
        out[n] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_uid, st.st_gid)
    return out


def test_mount_writes_an_encrypted_index_and_a_cold_ls_l_needs_no_head(mounter, bucket, key, s3,
                                                                      proxy):
    keyfile, raw = key
    m = mounter(bucket, keyfile, endpoint=proxy.url)
    d = os.path.join(m.path, "d")
    os.mkdir(d)
    for i in range(N):
        with open(os.path.join(d, f"f{i:02d}"), "wb") as f:
            f.write(os.urandom(1000 + i))
    os.chmod(os.path.join(d, "f01"), 0o600)
    os.utime(os.path.join(d, "f02"), ns=(0, 1_500_000_000_123_456_789))
    before = stats(d)
    m.umount()                      # uploads, then writes the index (waits for it to mature)

    ikey = "d/" + INDEX_NAME
    body = s3.get_object(Bucket=bucket, Key=ikey, **sse(raw))["Body"].read()
    assert set(decode(body)) == set(before)
    with pytest.raises(botocore.exceptions.ClientError) as e:    # SSE-C like every object
        s3.get_object(Bucket=bucket, Key=ikey)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400

    m2 = mounter(bucket, keyfile, endpoint=proxy.url, name="mnt2")
    mark = proxy.mark()
    r = subprocess.run(["ls", "-l", "--full-time", os.path.join(m2.path, "d")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    asked = [q.key for q in proxy.requests(since=mark, bucket=bucket)
             if q.op in ("HeadObject", "GetObject") and q.key.startswith("d/f")]
    assert asked == [], f"cold ls -l asked for {len(asked)} files: {asked[:5]}"
    assert stats(os.path.join(m2.path, "d")) == before
    assert INDEX_NAME not in r.stdout

    # another client changes a file's mode in place (same bytes, same ETag on SeaweedFS):
    # a later Last-Modified, so the entry no longer matches and the mount asks again
    meta = s3.head_object(Bucket=bucket, Key="d/f03", **sse(raw))["Metadata"]
    s3.copy_object(Bucket=bucket, Key="d/f03", CopySource={"Bucket": bucket, "Key": "d/f03"},
                   Metadata={**meta, "mode": str(stat.S_IFREG | 0o604)},
                   MetadataDirective="REPLACE", **sse(raw),
                   **{"CopySource" + k: v for k, v in sse(raw).items()})
    m2.umount()
    m3 = mounter(bucket, keyfile, endpoint=proxy.url, name="mnt3")
    mark = proxy.mark()
    now = stats(os.path.join(m3.path, "d"))
    asked = [q.key for q in proxy.requests(since=mark, bucket=bucket)
             if q.op in ("HeadObject", "GetObject") and q.key.startswith("d/f")]
    assert asked == ["d/f03"]
    assert stat.S_IMODE(now.pop("f03")[0]) == 0o604
    before.pop("f03")
    assert now == before
