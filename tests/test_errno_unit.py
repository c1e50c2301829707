"""The length limits of names as the filesystem checks them, without a kernel (the errno
precedence on a real mount, against Linux: tests/test_errno_precedence.py).

A lookup of a path that cannot be there for its length (a component over 255 bytes, an object
key over 1,024) is NameTooLong, whatever the caches say of its directory."""

from __future__ import annotations

import pytest

import test_fs_unit as unit
from ssecfs.errors import NameTooLong, NotFound
from test_fs_unit import settle, write_file

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
