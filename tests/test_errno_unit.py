"""The length limits of names as the filesystem checks them, without a kernel (the errno
precedence on a real mount, against Linux: tests/test_errno_precedence.py).

A lookup of a path that cannot be there for its length (a component over 255 bytes, an object
key over 1,024) is NameTooLong, whatever the caches say of its directory; a directory is
never renamed to where a key below it would pass 1,024 bytes."""

from __future__ import annotations

import pytest

import test_fs_unit as unit
from ssecfs.errors import NameTooLong, NotFound
from test_fs_unit import read_all, settle, write_file

fs, make_fs, ring, store = unit.fs, unit.make_fs, unit.ring, unit.store      # the fixtures

A, B, C, D = (c * 250 for c in "abcd")
DEEP = f"/{A}/{B}/{C}/{D}"                 # key: 1,003 bytes; its marker 1,004


def test_a_name_over_255_bytes_is_too_long_even_in_a_directory_known_to_lack_it(fs):
    fs.mkdir("/d", 0o755)
    assert set(fs.readdir("/d")) == {".", ".."}          # its listing is kept
    with pytest.raises(NotFound):
        fs.getattr("/d/" + "n" * 255)
    with pytest.raises(NameTooLong):
        fs.getattr("/d/" + "n" * 256)
    with pytest.raises(NameTooLong):
        fs.getattr("/" + "n" * 256 + "/x")


def test_lookups_at_and_over_the_key_limit(fs, store):
    fs.mkdir(f"/{A}", 0o755)
    fs.mkdir(f"/{A}/{B}", 0o755)
    fs.mkdir(f"/{A}/{B}/{C}", 0o755)
    fs.mkdir(DEEP, 0o755)
    at_limit = DEEP + "/" + "f" * 20               # key: 1,024 bytes
    with pytest.raises(NotFound):                  # may be a file; cannot be a directory
        fs.getattr(at_limit)
    write_file(fs, at_limit, b"at the limit")
    settle(fs)
    assert fs.getattr(at_limit).size == 12
    with pytest.raises(NameTooLong):
        fs.getattr(at_limit + "g")
    with pytest.raises(NameTooLong):
        fs.mkdir(DEEP + "/" + "g" * 20, 0o755)     # its marker would be 1,024 + 1 bytes
    fs.mkdir(DEEP + "/" + "g" * 19, 0o755)         # marker: 1,024 bytes
    assert max(len(k.encode()) for k in store.keys()) == 1024


@pytest.mark.parametrize("onto_empty_dir", [False, True])
@pytest.mark.parametrize("uploaded", [True, False])
def test_a_directory_is_not_renamed_where_its_keys_would_pass_the_limit(fs, store, uploaded,
                                                                         onto_empty_dir):
    if onto_empty_dir:
        fs.mkdir(f"/{A}x", 0o755)
    fs.mkdir(f"/{A}", 0o755)
    fs.mkdir(f"/{A}/{B}", 0o755)
    fs.mkdir(f"/{A}/{B}/{C}", 0o755)
    fs.mkdir(DEEP, 0o755)
    write_file(fs, f"/{A}/small", b"small")
    write_file(fs, DEEP + "/" + "f" * 20, b"at the limit")
    if uploaded:
        settle(fs)
        assert not fs.dirty_files()
    before = set(store.keys())
    with pytest.raises(NameTooLong):
        fs.rename(f"/{A}", f"/{A}x")
    assert sorted(e for e in fs.readdir("/") if e.startswith("a")) == \
        ([A, f"{A}x"] if onto_empty_dir else [A])
    assert read_all(fs, DEEP + "/" + "f" * 20) == b"at the limit"
    assert read_all(fs, f"/{A}/small") == b"small"
    settle(fs)
    assert set(store.keys()) == before | ({f"{A}/small", DEEP[1:] + "/" + "f" * 20}
                                          if not uploaded else set())
    fs.rename(f"/{A}/{B}", f"/{A}/{B[:-1]}")       # one byte shorter: fine
    assert read_all(fs, f"/{A}/{B[:-1]}/{C}/{D}/" + "f" * 20) == b"at the limit"


def test_keys_with_a_name_over_255_bytes_are_not_listed(fs, store):
    """Another tool may store them; they have no POSIX spelling (no lookup could reach
    them), like keys with an empty component."""
    store.put("d/" + "n" * 256, b"x", {})
    store.put("d/" + "p" * 256 + "/x", b"x", {})
    store.put("d/ok", b"x", {})
    assert set(fs.readdir("/d")) == {".", "..", "ok"}
    assert store.keys() == sorted(["d/" + "n" * 256, "d/" + "p" * 256 + "/x", "d/ok"])
