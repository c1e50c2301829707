"""The FUSE adapter: fusepy Operations, one short method per operation, and THE error ->
errno boundary.

Only translation happens here. fusepy turns any exception that is not FuseOSError into EINVAL,
so every call goes through __call__ and fuse_error, which maps domain errors by ERRNO_TABLE
(the one place that picks an errno) and logs anything unexpected with its traceback (as EIO).
Operations this filesystem lacks and fusepy's defaults answer as wanted (listxattr: none;
setxattr, removexattr: ENOTSUP) are left to those defaults.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import math
import os
import posixpath
import re
import time

import fuse
from fuse import FuseOSError, Operations, fuse_get_context

from .. import errors as E
from ..fs.attrs import Attr
from ..fs.filesystem import Filesystem
from ..fs.setattrs import Caller
from .threadstates import ThreadStatePins

log = logging.getLogger("ssecfs.fuse")

ERRNO_TABLE: dict[type, int] = {
    E.NotPermitted: errno.EPERM,
    E.NotFound: errno.ENOENT,
    E.Exists: errno.EEXIST,
    E.NotEmpty: errno.ENOTEMPTY,
    E.IsADirectory: errno.EISDIR,
    E.NotADirectory: errno.ENOTDIR,
    E.NotSupported: errno.ENOTSUP,
    E.NameTooLong: errno.ENAMETOOLONG,
    E.InvalidName: errno.EINVAL,
    E.ReadOnly: errno.EROFS,
    E.PermissionDenied: errno.EACCES,
    E.KeyMismatch: errno.EACCES,
    E.EncryptionNotApplied: errno.EIO,
    E.StoreUnavailable: errno.EIO,
    E.StoreError: errno.EIO,
    E.IntegrityError: errno.EIO,
    E.NoSpace: errno.ENOSPC,
    E.Stale: errno.EIO,
    E.TimedOut: errno.EIO,
    E.Unimplemented: errno.ENOSYS,
}

# Errors that are part of normal operation (lookups of missing names...): no log line.
QUIET = (E.NotFound, E.Exists, E.NotEmpty, E.Unimplemented)


def errno_of(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        if cls in ERRNO_TABLE:
            return ERRNO_TABLE[cls]
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def fuse_error(op: str, path, e: Exception) -> FuseOSError:
    """THE translation of an exception into the errno FUSE returns (logged)."""
    if isinstance(e, FuseOSError):
        return e
    if isinstance(e, E.SsecfsError):
        code = errno_of(e)
        if not isinstance(e, QUIET):
            level = logging.ERROR if code == errno.EIO else logging.INFO
            log.log(level, "%s %s: %s: %s -> %s", op, path, type(e).__name__, e,
                    errno.errorcode.get(code, code))
        return FuseOSError(code)
    if isinstance(e, OSError):
        log.error("%s %s: %s", op, path, e)
        return FuseOSError(e.errno or errno.EIO)
    log.error("unexpected error in %s %s", op, path, exc_info=e)   # a bug: EIO
    return FuseOSError(errno.EIO)


def _ns(t: float) -> int:
    """Seconds as nanoseconds, the whole seconds apart: t * 1e9 in one product would be off
    by up to 128 ns even where t is exact (1500000000.25)."""
    whole = math.floor(t)
    return whole * 1_000_000_000 + round((t - whole) * 1e9)


def stat_of(a: Attr) -> dict:
    ns = _ns
    return {"st_mode": a.mode, "st_size": a.size, "st_nlink": a.nlink,
            "st_uid": a.uid, "st_gid": a.gid, "st_mtime": ns(a.mtime),
            "st_atime": ns(a.mtime if a.atime is None else a.atime), "st_ctime": ns(a.ctime),
            "st_blocks": (a.size + 511) // 512, "st_blksize": 131072, "st_rdev": a.rdev}


def groups_of(pid: int) -> frozenset:
    """The supplementary groups of a process (thread), as libfuse's fuse_getgroups reads
    them; none if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def caller() -> Caller:
    """Who sent the request being served (chown and chmod rules depend on it)."""
    uid, gid, pid = fuse_get_context()
    return Caller(uid, gid, groups_of(pid))


# Without hard_remove, libfuse keeps a file that is unlinked (or replaced by a rename) while
# open under a name of its own in the same directory, which it renames the file to instead of
# unlinking it; the kernel then reaches the open file by that name (fstat, ftruncate, ...)
# until the last close, after which libfuse unlinks the name. Such names are libfuse's: they
# never reach the bucket (Filesystem.unlink keeps the open file under it as an alias).
HIDDEN = re.compile(r"\.fuse_hidden[0-9a-f]{16}")


def hidden(path) -> str | None:
    """The alias of an open unlinked file that path names (None: path is no such name)."""
    name = posixpath.basename(path) if path else ""
    return name if HIDDEN.fullmatch(name) else None


UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class FuseAdapter(Operations):
    use_ns = True
    # Let libfuse pass UTIME_OMIT/UTIME_NOW through (else `touch -m` and tar's
    # futimens(fd, {UTIME_OMIT, mtime}) are answered "success" without reaching us).
    flag_utime_omit_ok = 1
    # An open file whose path libfuse cannot build any more (an unlinked file whose directory
    # is gone too) is still read, written, fstat'ed and closed by its handle: the operations
    # on a handle need no path here.
    flag_nullpath_ok = 1

    def __init__(self, fs: Filesystem, on_init=None, on_destroy=None):
        self.fs = fs
        self._on_init = on_init
        self._on_destroy = on_destroy
        self.thread_states = ThreadStatePins()

    def __call__(self, op, *args):
        self.thread_states.pin()
        try:
            return getattr(self, op)(*args)
        except Exception as e:  # noqa: BLE001 - every error leaves as an errno
            raise fuse_error(op, args[0] if args else "", e) from None

    # -- lifecycle ----------------------------------------------------------------------------
    def init(self, path):
        if self._on_init:
            self._on_init()

    def destroy(self, path):
        if self._on_destroy:
            self._on_destroy()

    # -- attributes ---------------------------------------------------------------------------
    def getattr(self, path, fh=None):
        return stat_of(self.fs.getattr(path, fh, hidden(path)))

    def access(self, path, amode):
        self.fs.getattr(path)
        if amode & os.W_OK and self.fs.cfg.read_only:
            raise E.ReadOnly(path)
        return 0

    def chmod(self, path, mode):
        self.fs.chmod(path, mode, caller(), hidden(path))
        return 0

    def chown(self, path, uid, gid):
        self.fs.chown(path, uid, gid, caller(), hidden(path))
        return 0

    def utimens(self, path, times=None):
        now = time.time()
        if times is None:
            times = (UTIME_NOW, UTIME_NOW)

        def conv(ns):      # with use_ns, fusepy gives tv_sec * 1e9 + tv_nsec
            if ns == UTIME_OMIT:
                return None
            if ns == UTIME_NOW:
                return now
            sec, nsec = divmod(ns, 1_000_000_000)   # ns / 1e9 would round ns to a float first
            return sec + nsec / 1e9
        self.fs.utimens(path, conv(times[0]), conv(times[1]), hidden(path))
        return 0

    def statfs(self, path):
        return self.fs.statfs()

    # -- directories --------------------------------------------------------------------------
    def readdir(self, path, fh):
        # fusepy consumes the generator after __call__ returned: translate its errors too
        try:
            for name in self.fs.readdir(path):
                kind = 0 if name in (".", "..") else \
                    self.fs.known_kind(posixpath.join(path, name))
                yield (name, {"st_mode": kind}, 0) if kind else name
        except Exception as e:  # noqa: BLE001
            raise fuse_error("readdir", path, e) from None

    def mkdir(self, path, mode):
        uid, gid, _ = fuse_get_context()
        self.fs.mkdir(path, mode, uid, gid)
        return 0

    def rmdir(self, path):
        self.fs.rmdir(path)
        return 0

    # -- files --------------------------------------------------------------------------------
    def create(self, path, mode, fi=None):
        uid, gid, _ = fuse_get_context()
        return self.fs.create(path, mode, uid, gid)

    def open(self, path, flags):
        return self.fs.open(path, flags)

    def read(self, path, size, offset, fh):
        return self.fs.read(fh, size, offset)

    def read_fh(self, fh, size, offset, raw_path=None):
        """read() as SsecfsFUSE calls it: without the dispatch of __call__; the path (bytes,
        as the kernel gave it) is decoded only for an error's log line."""
        self.thread_states.pin()
        try:
            return self.fs.read(fh, size, offset, copy=False)
        except Exception as e:  # noqa: BLE001 - every error leaves as an errno
            path = raw_path.decode("utf-8", "surrogateescape") if raw_path else f"(fh {fh})"
            raise fuse_error("read", path, e) from None

    def write(self, path, data, offset, fh):
        return self.fs.write(fh, data, offset)

    def truncate(self, path, length, fh=None):
        self.fs.truncate(path, length, fh)
        return 0

    def flush(self, path, fh):
        self.fs.flush(fh)
        return 0

    def fsync(self, path, datasync, fh):
        self.fs.fsync(fh)
        return 0

    def fsyncdir(self, path, datasync, fh):
        self.fs.fsyncdir(path)
        return 0

    def release(self, path, fh):
        self.fs.release(fh)
        return 0

    def unlink(self, path):
        if hidden(path):             # libfuse's, after the last close: nothing is left of it
            raise E.NotFound(path)
        self.fs.unlink(path)
        return 0

    def rename(self, old, new):
        alias = hidden(new)
        if alias:                    # libfuse hides an open file it is told to unlink or replace
            self.fs.unlink(old, alias)
        else:
            self.fs.rename(old, new)
        return 0

    def symlink(self, path, target):
        # fusepy passes (path of the new link, what it points to)
        uid, gid, _ = fuse_get_context()
        self.fs.symlink(path, target, uid, gid)
        return 0

    def readlink(self, path):
        return self.fs.readlink(path)

    def mknod(self, path, mode, dev):
        uid, gid, _ = fuse_get_context()
        self.fs.mknod(path, mode, dev, uid, gid)
        return 0

    # -- unsupported, loudly ------------------------------------------------------------------
    def link(self, target, source):
        raise E.NotPermitted(f"hard links are not supported: {target}")

    def getxattr(self, path, name, position=0):
        # ENOSYS: the kernel remembers that this filesystem has no xattrs and answers every
        # later getxattr itself with EOPNOTSUPP, so `ls -l` (security.selinux, POSIX ACLs)
        # costs no round trip to the daemon per file.
        raise E.Unimplemented("getxattr")


# ctypes.memmove releases the GIL around the copy and takes it back: two hand-offs of the GIL
# per read while fetch and sealer threads want it too, each a futex call or two, for a
# 128 KiB copy that takes a few microseconds. This one keeps the GIL.
_memmove_keep_gil = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_size_t)(ctypes._memmove_addr)


class SsecfsFUSE(fuse.FUSE):
    """fusepy's FUSE with the one callback whose own cost shows: read. fusepy decodes the
    path the kernel passes (a read needs only the file handle) and dispatches by name
    through Operations.__call__; this calls the adapter directly. Random 4 KiB reads of a
    cached file spend a good part of their time in such per-call Python."""

    def read(self, path, buf, size, offset, fip):
        data = self.operations.read_fh(fip.contents.fh, size, offset, path)
        n = len(data)
        if n > size:
            raise FuseOSError(errno.EIO)
        if not n:
            return 0
        if type(data) is not memoryview:
            _memmove_keep_gil(buf, data, n)
        elif data.readonly:
            _memmove_keep_gil(buf, bytes(data), n)
        else:
            # a view of a fetched buffer, copied once, straight into the reply. `data` holds
            # the buffer until the copy is done (no other fetch receives into it meanwhile)
            _memmove_keep_gil(buf, ctypes.addressof(ctypes.c_char.from_buffer(data)), n)
        return n
