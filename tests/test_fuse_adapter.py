"""SsecfsFUSE.read, the one callback that bypasses fusepy's dispatch: what it copies into the
kernel's reply buffer for each kind of answer the filesystem gives (bytes, or a view of a
fetched buffer). Mounted reads of every kind are covered by the mount tests. And what the
adapter passes on of the caller of a request (owner of new entries, chown/chmod rules)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
from types import SimpleNamespace

import fuse
import pytest

from ssecfs import errors
from ssecfs.mount import adapter as fuse_adapter
from ssecfs.mount.adapter import FuseAdapter, SsecfsFUSE


def call_read(answer, size=1 << 17):
    """Runs SsecfsFUSE.read as libfuse would, the filesystem answering `answer`; returns
    (bytes in the reply buffer, returned length, what read_fh was asked)."""
    asked = []

    def read_fh(fh, size, offset, raw_path):
        asked.append((fh, size, offset, raw_path))
        return answer

    me = SimpleNamespace(operations=SimpleNamespace(read_fh=read_fh))
    buf = ctypes.create_string_buffer(b"\xee" * size, size)
    info = fuse.fuse_file_info()
    info.fh = 7
    n = SsecfsFUSE.read(me, b"/dir/f", buf, size, 4096, ctypes.pointer(info))
    return buf.raw[:n], n, asked


def test_bytes_answer_is_copied():
    data = os.urandom(1000)
    got, n, asked = call_read(data)
    assert (got, n) == (data, 1000)
    assert asked == [(7, 1 << 17, 4096, b"/dir/f")]


def test_view_of_a_fetched_buffer_is_copied_straight_from_it():
    buf = mmap.mmap(-1, 3 << 17)               # a read unit received into a pooled buffer
    data = os.urandom(3 << 17)
    buf[:] = data
    view = memoryview(buf)[1 << 17:2 << 17]    # its second chunk
    got, n, _ = call_read(view)
    assert n == 1 << 17 and got == data[1 << 17:2 << 17]


def test_read_only_view_is_copied_too():
    data = os.urandom(5000)
    got, n, _ = call_read(memoryview(data)[100:4100])
    assert (got, n) == (data[100:4100], 4000)


def test_empty_answer_and_too_long_answer():
    assert call_read(b"")[1] == 0
    with pytest.raises(fuse.FuseOSError) as e:
        call_read(b"x" * 11, size=10)
    assert e.value.errno == errno.EIO


class Recorder:
    """A filesystem that records what the adapter asks of it (every call answers 7)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, args))
            return 7
        return call


def test_new_entries_and_changes_of_owner_carry_the_callers_identity(monkeypatch):
    from ssecfs.fs.setattrs import Caller
    monkeypatch.setattr(fuse_adapter, "fuse_get_context", lambda: (1001, 1002, os.getpid()))
    fs = Recorder()
    a = FuseAdapter(fs)
    a.mkdir("/d", 0o755)
    a.mknod("/n", stat.S_IFREG | 0o600, 0)
    a.create("/f", 0o644)
    a.symlink("/l", "f")
    a.chown("/f", 5, 6)
    a.chmod("/f", 0o600)
    me = Caller(1001, 1002, frozenset(os.getgroups()))
    assert fs.calls == [("mkdir", ("/d", 0o755, 1001, 1002)),
                        ("mknod", ("/n", stat.S_IFREG | 0o600, 0, 1001, 1002)),
                        ("create", ("/f", 0o644, 1001, 1002)),
                        ("symlink", ("/l", "f", 1001, 1002)),
                        ("chown", ("/f", 5, 6, me, None)), ("chmod", ("/f", 0o600, me, None))]


def test_supplementary_groups_of_a_caller_and_of_one_gone():
    assert fuse_adapter.groups_of(os.getpid()) == frozenset(os.getgroups())
    assert fuse_adapter.groups_of(2 ** 22 + 1) == frozenset()      # above pid_max: no such


def test_a_change_only_the_owner_may_make_is_eperm_not_eacces():
    from ssecfs.errors import NotPermitted
    assert fuse_adapter.fuse_error("chown", "/f", NotPermitted("x")).errno == errno.EPERM
    assert fuse_adapter.fuse_error("open", "/f", errors.PermissionDenied("x")).errno == \
        errno.EACCES


def _error_classes(base=errors.SsecfsError):
    for cls in base.__subclasses__():
        yield cls
        yield from _error_classes(cls)


ALL_ERRORS = sorted(set(_error_classes()), key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_class_has_its_errno_or_its_exit_code(cls):
    """Every domain error has a meaning at one boundary: the adapter's table names it (or a
    parent that is not the base), so that none reaches the kernel as a catch-all EIO by
    omission; or it is a UserError, the CLI's, and its class carries an exit code."""
    if issubclass(cls, errors.UserError):
        assert not any(c in fuse_adapter.ERRNO_TABLE for c in cls.__mro__)
        assert isinstance(cls.exit_code, int) and 1 <= cls.exit_code <= 8, cls.exit_code
        assert cls("x").exit_code == cls.exit_code
        return
    mapped = [c for c in cls.__mro__ if c in fuse_adapter.ERRNO_TABLE]
    assert mapped, f"{cls.__name__} has no errno in ERRNO_TABLE"
    assert fuse_adapter.fuse_error("op", "/p", cls("x")).errno == \
        fuse_adapter.ERRNO_TABLE[mapped[0]]


def test_an_unknown_exception_is_eio_with_its_traceback_logged(caplog):
    with caplog.at_level("ERROR", logger="ssecfs.fuse"):
        e = fuse_adapter.fuse_error("read", "/p", ZeroDivisionError("bug"))
    assert e.errno == errno.EIO
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)


def test_directory_entries_carry_their_type_when_it_is_known():
    """readdir passes the file type (d_type) of the names whose attributes are cached, so
    that `rm -r`, `find` and `ls` need no stat for them; the others go without (DT_UNKNOWN),
    never with a guessed type (a symlink must not read as a file)."""
    kinds = {"/d/file": stat.S_IFREG, "/d/link": stat.S_IFLNK, "/d/sub": stat.S_IFDIR}
    fs = SimpleNamespace(readdir=lambda path: iter([".", "..", "file", "link", "sub", "new"]),
                         known_kind=lambda path: kinds.get(path, 0))
    got = list(FuseAdapter(fs).readdir("/d", 0))
    assert got == [".", "..", ("file", {"st_mode": stat.S_IFREG}, 0),
                   ("link", {"st_mode": stat.S_IFLNK}, 0), ("sub", {"st_mode": stat.S_IFDIR}, 0),
                   "new"]


def test_known_kind_answers_from_what_is_cached_only(tmp_path):
    from memstore import MemStore
    from test_fs_unit import open_cache, remote_file
    from ssecfs.config import FsConfig
    from ssecfs.fs.filesystem import Filesystem
    from ssecfs.crypto.keys import Key, KeyRing
    ring = KeyRing([Key(os.urandom(32))])
    store = MemStore(ring)
    remote_file(store, "a", b"1")
    remote_file(store, "l", b"a", mode=stat.S_IFLNK | 0o777)
    fs = Filesystem(store, open_cache(tmp_path / "c", ring),
                    FsConfig(attr_timeout=60, defer_deletes=False))
    try:
        calls = sum(store.calls.values())
        assert fs.known_kind("/a") == 0 and sum(store.calls.values()) == calls
        fs.getattr("/a")
        fs.getattr("/l")
        assert fs.known_kind("/a") == stat.S_IFREG and fs.known_kind("/l") == stat.S_IFLNK
    finally:
        fs.shutdown()
        fs.cache.close()


def test_what_this_filesystem_lacks_is_answered_through_the_table(caplog):
    """No operation picks its own errno: a missing one raises a domain error that
    ERRNO_TABLE maps, or is fusepy's default (listxattr: none; setxattr, removexattr: ENOTSUP).
    getxattr's ENOSYS is said once per mount by the kernel's asking: never logged."""
    a = FuseAdapter(SimpleNamespace())
    lacking = [("link", ("/l", "/f"), errno.EPERM),
               ("getxattr", ("/f", "user.x"), errno.ENOSYS),
               ("setxattr", ("/f", "user.x", b"v", 0), errno.ENOTSUP),
               ("removexattr", ("/f", "user.x"), errno.ENOTSUP)]
    with caplog.at_level("INFO", logger="ssecfs.fuse"):
        for op, args, code in lacking:
            with pytest.raises(fuse.FuseOSError) as e:
                a(op, *args)
            assert e.value.errno == code, op
    assert a("listxattr", "/f") == []
    assert not any("getxattr" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("t_ns", [1_500_000_000_250_000_000, 1_400_000_000_123_456_789,
                                  999_999_999, 0, 2_100_000_000_999_999_999])
def test_timestamps_keep_their_nanoseconds_as_far_as_a_double_holds_them(t_ns):
    """utimens gives whole seconds * 1e9 + nanoseconds; stat answers the same way. Whole
    seconds and binary fractions come back exactly, other nanoseconds within 0.25 us (the
    spacing of doubles near 2**31 s)."""
    fs = Recorder()
    FuseAdapter(fs).utimens("/f", (t_ns, t_ns))
    (_, (path, atime, mtime, _alias)), = fs.calls
    a = fuse_adapter.Attr(stat.S_IFREG | 0o644, 0, mtime, mtime, 0, 0, atime=atime)
    st = fuse_adapter.stat_of(a)
    assert abs(st["st_mtime"] - t_ns) <= 250 and abs(st["st_atime"] - t_ns) <= 250
    if t_ns % 250_000_000 == 0:
        assert st["st_mtime"] == st["st_atime"] == t_ns
