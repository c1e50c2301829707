"""Model-based fuzzing: random sequences of file operations run on a real ssecfs mount AND on a
plain local directory (the model); after every step both must agree.

Compared after every step (tree walk of both sides, symlinks not followed):
  * sorted listing of every directory;
  * kind of every entry (file, directory, symlink, FIFO, device, socket), each symlink's
    target, each device's number;
  * size and content of every file;
  * permission bits and owner of every entry; mtime and atime of all but directories (within
    a second: both sides are changed within milliseconds of each other). The model lives on
    a tmpfs mounted noatime,nodev: ssecfs keeps atime as a noatime mount does, and opens no
    device (FUSE mounts are nodev).
  * SEMANTICS: SeaweedFS drops the metadata of `dir/` markers, so directory modes and owners
    hold for the life of a mount and read back as 0755 root:root after a remount -- the model
    resets its directories so at every remount/crash.
Every open adds O_NONBLOCK: a FIFO then opens (or fails) at once on both sides instead of
waiting for a peer.
Compared per operation: the return value (bytes read, readlink target...) or the errno.

Remount (`ssecfs umount` + mount) and crash (kill -9 + mount on the same cache dir) are done
with every handle closed: SEMANTICS promises every closed file survives both, and says data
written but not closed/fsynced may be lost at a crash, so no open handle is carried over.
Open handles stay open when their file is unlinked or replaced by a rename: such a file
stays usable through them until the last close, on both sides.

One mount serves the whole run; each example works in a fresh directory of it (removed at
the end of the example). Scale it up with SSECFS_FUZZ_EXAMPLES / SSECFS_FUZZ_STEPS (and
SSECFS_FUZZ_LIFECYCLE: remounts + crashes allowed per example); SSECFS_FUZZ_REPORT=FILE
writes the counters there. scripts/soak runs this for hours.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import random
import shutil
import stat
import subprocess
import sys
import time

import pytest
from helpers import utimens
from hypothesis import HealthCheck, settings
from hypothesis.errors import FlakyStrategyDefinition
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)

pytestmark = pytest.mark.mount

EXAMPLES = int(os.environ.get("SSECFS_FUZZ_EXAMPLES", "25"))
STEPS = int(os.environ.get("SSECFS_FUZZ_STEPS", "25"))
LIFECYCLE = int(os.environ.get("SSECFS_FUZZ_LIFECYCLE", "1"))   # remounts+crashes per example
# Time box: no example starts after this many seconds (unless one has failed: hypothesis must
# then be free to replay and shrink it).
SECONDS = float(os.environ.get("SSECFS_FUZZ_SECONDS", "120"))
MAX_HANDLES = 3
MTIME_SLACK = 1.0

ERRNOS: dict = {}
STATS = {"examples": 0, "steps": 0, "remounts": 0, "crashes": 0, "errno_agreements": 0,
         "time_boxed": 0}
BOX = {"deadline": float("inf"), "failed": False}

# ---------------------------------------------------------------------------- strategies
LEAVES = ["a", "b", "c", "d", "e"]
FILLERS = 20                # files of a "big" example directory (>= dirindex.MIN_FILES)
PARENTS = ["", "", "", "d", "e", "d/e", "e/d"]          # top level more often
paths = st.builds(lambda parent, leaf: f"{parent}/{leaf}" if parent else leaf,
                  st.sampled_from(PARENTS), st.sampled_from(LEAVES))
CHUNK = 128 * 1024
offsets = st.one_of(st.sampled_from([0, 1, 4095, 4096, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK]),
                    st.integers(0, 3 * CHUNK))
lengths = st.one_of(st.integers(0, 64),
                    st.sampled_from([4095, 4096, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 7]),
                    st.integers(0, 2 * CHUNK + 100))
file_modes = st.sampled_from([0o644, 0o600, 0o755, 0o400, 0o000, 0o777, 0o640, 0o711,
                              0o4755, 0o2755, 0o6711, 0o2644])
node_kinds = st.sampled_from([("fifo", stat.S_IFIFO, 0), ("chr", stat.S_IFCHR, os.makedev(1, 3)),
                              ("blk", stat.S_IFBLK, os.makedev(7, 9)),
                              ("sock", stat.S_IFSOCK, 0)])
owners = st.sampled_from([-1, 0, 1, 1000, 4242, 65534])
dir_modes = st.sampled_from([0o755, 0o700, 0o777, 0o750, 0o711])
link_targets = st.sampled_from(["a", "b", "d", "e", "d/a", "c/x", "zz"])
mtimes = st.one_of(st.sampled_from([0, 1, 1_000_000_000, 1_700_000_000, 2_000_000_000]),
                   st.integers(1, 2_100_000_000))
atimes = st.one_of(st.none(), mtimes)              # None: UTIME_OMIT
OPEN_FLAGS = {
    "RDWR": os.O_RDWR,
    "RDWR|CREAT": os.O_RDWR | os.O_CREAT,
    "RDWR|TRUNC": os.O_RDWR | os.O_TRUNC,
    "RDWR|CREAT|EXCL": os.O_RDWR | os.O_CREAT | os.O_EXCL,
    "RDONLY": os.O_RDONLY,
    "WRONLY|APPEND|CREAT": os.O_WRONLY | os.O_APPEND | os.O_CREAT,
}
open_flags = st.sampled_from(sorted(OPEN_FLAGS))
handle_index = st.integers(0, MAX_HANDLES - 1)


class Blob:
    """Pseudo-random bytes, printed as (seed, length) in a failing sequence."""

    def __init__(self, seed: int, n: int):
        self.seed, self.n = seed, n
        self.data = random.Random(seed).randbytes(n)

    def __repr__(self) -> str:
        return f"Blob(seed={self.seed}, n={self.n})"


blobs = st.builds(Blob, st.integers(0, 255), lengths)


# ---------------------------------------------------------------------------- comparing
def show(v) -> str:
    if isinstance(v, (bytes, bytearray)) and len(v) > 48:
        return f"<{len(v)} bytes sha256 {hashlib.sha256(v).hexdigest()[:12]}>"
    return repr(v)


def outcome(fn):
    """('ok', value) or ('err', errno name)."""
    try:
        return ("ok", fn())
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


def opened(path: str, flags: int, fn, mode: int = 0o777):
    """fn(fd) on path opened with flags; the fd is closed whatever fn does."""
    fd = os.open(path, flags | os.O_NONBLOCK, mode)
    try:
        return fn(fd)
    finally:
        os.close(fd)


def regular_size(fd: int) -> int:
    """The size of the open file; EISDIR unless it is a regular file."""
    s = os.fstat(fd)
    if not stat.S_ISREG(s.st_mode):
        raise OSError(errno.EISDIR, "not a file")
    return s.st_size


def first_difference(a: bytes, b: bytes) -> str:
    n = min(len(a), len(b))
    for i in range(0, n, 4096):
        if a[i:i + 4096] != b[i:i + 4096]:
            for j in range(i, min(i + 4096, n)):
                if a[j] != b[j]:
                    return (f"first difference at offset {j} (model {a[j:j+8].hex()}, "
                            f"mount {b[j:j+8].hex()}); sizes {len(a)} / {len(b)}")
    return f"sizes {len(a)} / {len(b)} (one is a prefix of the other)"


def snapshot(root: str) -> dict:
    """relpath -> description, for the whole tree under root (symlinks not followed)."""
    out: dict = {}

    def walk(rel: str) -> None:
        full = os.path.join(root, rel) if rel else root
        names = sorted(os.listdir(full))
        out[rel or "."] = ("listing", names)
        for n in names:
            r = f"{rel}/{n}" if rel else n
            p = os.path.join(root, r)
            s = os.lstat(p)
            ids = (s.st_uid, s.st_gid)
            times = (s.st_mtime, s.st_atime)
            if stat.S_ISDIR(s.st_mode):
                out[r] = ("dir", oct(stat.S_IMODE(s.st_mode)), ids)
                walk(r)
            elif stat.S_ISLNK(s.st_mode):
                out[r] = ("symlink", os.readlink(p), ids, times)
            elif stat.S_ISREG(s.st_mode):
                with open(p, "rb") as f:
                    data = f.read()
                out[r] = ("file", oct(stat.S_IMODE(s.st_mode)), ids, times, s.st_size, data)
            else:
                out[r] = ("other", oct(s.st_mode), ids, times, s.st_rdev)
    walk("")
    return out


def diff_snapshots(model: dict, mount: dict) -> list[str]:
    problems = []
    for path in sorted(set(model) | set(mount)):
        a, b = model.get(path), mount.get(path)
        if a is None or b is None:
            if path not in model:
                problems.append(f"{path}: only on the mount: {b[:3] if b else b!r}")
            else:
                problems.append(f"{path}: missing on the mount (model: {a[:3]})")
            continue
        if a[0] != b[0]:
            problems.append(f"{path}: kind {a[0]} on the model, {b[0]} on the mount")
            continue
        if a[0] == "file":
            size_a, data_a, size_b, data_b = a[4], a[5], b[4], b[5]
            if size_a != size_b:
                problems.append(f"{path}: size {size_a} on the model, {size_b} on the mount")
            if data_a != data_b:
                problems.append(f"{path}: content differs: {first_difference(data_a, data_b)}")
            a, b = a[:4], b[:4]
        if a[0] in ("file", "symlink", "other"):
            for what, ta, tb in zip(("mtime", "atime"), a[3], b[3]):
                if abs(ta - tb) > MTIME_SLACK:
                    problems.append(f"{path}: {what} {ta:.3f} on the model, {tb:.3f} on the "
                                    "mount")
            a, b = a[:3] + a[4:], b[:3] + b[4:]
        if a != b:
            problems.append(f"{path}: model {a!r}, mount {b!r}")
    return problems


class TimeBoxOver(BaseException):
    """Raised when an example would start after the time box (SSECFS_FUZZ_SECONDS). Not an
    Exception, so hypothesis does not replay or shrink it; it may report it as
    FlakyStrategyDefinition (an example stopped earlier than the same choices did before),
    which the test then also takes as the end of the time box."""


class Handle:
    def __init__(self, flags: str, local_fd: int, mount_fd: int):
        self.flags, self.local_fd, self.mount_fd = flags, local_fd, mount_fd

    def __repr__(self) -> str:
        return f"<handle {self.flags}>"


# ---------------------------------------------------------------------------- the machine
class FuzzMachine(RuleBasedStateMachine):
    # Set by the test: the Mount (conftest.Mount) and the local base directory of the model.
    m = None
    local_base: str = ""

    def __init__(self):
        super().__init__()
        self.handles: list[Handle] = []
        self.lifecycle = 0
        self.local = self.mnt = ""
        self.trace: list[str] = []

    # -- helpers ------------------------------------------------------------------------------
    def _step(self) -> None:
        """Count a step and record it (rule name and arguments, from the caller's frame)."""
        STATS["steps"] += 1
        frame = sys._getframe(1)
        args = {k: v for k, v in frame.f_locals.items() if k not in ("self", "pick_")}
        if "i" in args and self.handles:
            h = self.pick(args["i"])
            args["i"] = f"{args['i']} -> {h!r} on {self._handle_rel(h)!r}"
        self.trace.append(f"{frame.f_code.co_name}("
                          + ", ".join(f"{k}={v}" if k == "i" else f"{k}={v!r}"
                                      for k, v in args.items()) + ")")

    def _context(self) -> str:
        """The steps of this example so far and the tail of the daemon log, for a failure."""
        steps = "\n".join(f"  {i + 1:3d}. {d}" for i, d in enumerate(self.trace))
        return (f"\n--- steps of this example ---\n{steps}"
                f"\n--- daemon log (tail) ---\n{self.m.log[-2500:]}")

    def both(self, what: str, fn):
        """Run fn(root) on the model, then on the mount; both outcomes must agree."""
        a = outcome(lambda: fn(self.local))
        b = outcome(lambda: fn(self.mnt))
        assert a == b, (f"{what}: model {a[0]} {show(a[1])}, mount {b[0]} {show(b[1])}"
                        + self._context())
        if a[0] == "err":
            STATS["errno_agreements"] += 1
            ERRNOS[f"{what.split()[0]} {a[1]}"] = ERRNOS.get(f"{what.split()[0]} {a[1]}", 0) + 1
        return a

    def both_h(self, what: str, h: Handle, fn):
        a = outcome(lambda: fn(h.local_fd))
        b = outcome(lambda: fn(h.mount_fd))
        assert a == b, (f"{what} via {h!r}: model {a[0]} {show(a[1])}, mount {b[0]} "
                        f"{show(b[1])}" + self._context())
        return a

    def existing(self) -> list[str]:
        """Every entry of the model (symlinks to directories included, not followed)."""
        out = []
        for dirpath, dirs, files in os.walk(self.local):
            rel = os.path.relpath(dirpath, self.local)
            out += [n if rel == "." else f"{rel}/{n}" for n in dirs + files]
        return sorted(out)

    def draw_path(self, data) -> str:
        """Mostly an entry that exists in the model, else any name of the alphabet."""
        ex = self.existing()
        if ex and data.draw(st.integers(0, 3)) > 0:
            return data.draw(st.sampled_from(ex))
        return data.draw(paths)

    def pick(self, i: int) -> Handle:
        return self.handles[i % len(self.handles)]

    def _handle_rel(self, h: Handle) -> str | None:
        """The model-relative path of the file a handle has open (None if unlinked)."""
        target = os.readlink(f"/proc/self/fd/{h.local_fd}")
        if target.endswith(" (deleted)") or not target.startswith(self.local + "/"):
            return None
        return target[len(self.local) + 1:]

    def _close(self, h: Handle) -> None:
        self.handles.remove(h)
        a = outcome(lambda: os.close(h.local_fd))
        b = outcome(lambda: os.close(h.mount_fd))
        assert a == b, f"close of {h!r}: model {a}, mount {b}" + self._context()

    def _close_all(self) -> None:
        for h in list(self.handles):
            self._close(h)

    # -- setup / teardown ---------------------------------------------------------------------
    @initialize(seed=st.sampled_from(["empty", "tree", "big"]), data=blobs)
    def setup_dirs(self, seed, data):
        """A fresh directory per example; "tree" starts it with d/, e/, a, d/b (so that more
        operations meet existing entries); "big" adds FILLERS files beside them, enough for
        the directory to get an attribute index (docs/SEMANTICS.md) at the next remount."""
        if not BOX["failed"] and time.monotonic() > BOX["deadline"]:
            # Stop the whole run here (the test catches it and passes). Changing which rules
            # may run instead would make hypothesis see other draws for the same choices
            # (FlakyStrategyDefinition).
            STATS["time_boxed"] = 1
            raise TimeBoxOver(f"time box of {SECONDS:.0f}s over")
        STATS["examples"] += 1
        self.trace.append(f"setup_dirs(seed={seed!r}, data={data!r})")
        name = f"ex{STATS['examples']}-{os.getpid()}"
        self.local = os.path.join(self.local_base, name)
        self.mnt = os.path.join(self.m.path, name)
        for root in (self.local, self.mnt):
            os.mkdir(root)
            if seed in ("tree", "big"):
                os.mkdir(os.path.join(root, "d"))
                os.mkdir(os.path.join(root, "e"))
                fillers = [f"f{i:02d}" for i in range(FILLERS)] if seed == "big" else []
                for f in ("a", "d/b", *fillers):
                    with open(os.path.join(root, f), "wb") as fh:
                        fh.write(data.data)

    def teardown(self):
        exc = sys.exc_info()[0]
        if exc is not None and exc is not TimeBoxOver and \
                not exc.__module__.startswith("hypothesis"):
            BOX["failed"] = True        # let hypothesis replay and shrink, time box or not
        try:
            self._teardown()
        except BaseException:
            BOX["failed"] = True
            raise

    def _teardown(self):
        self._close_all()
        if self.mnt and os.path.ismount(self.m.path):
            shutil.rmtree(self.mnt)
            assert not os.path.exists(self.mnt), "example directory still there after rmtree"
        if self.local and os.path.exists(self.local):
            shutil.rmtree(self.local)

    # -- whole files --------------------------------------------------------------------------
    @rule(pick_=st.data(), mode=file_modes, data=blobs)
    def create_and_write(self, pick_, mode, data):
        """open(O_WRONLY|O_CREAT|O_TRUNC, mode), write, close."""
        p = self.draw_path(pick_)
        self._step()

        self.both(f"create_and_write {p}",
                  lambda root: opened(os.path.join(root, p),
                                      os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                      lambda fd: os.write(fd, data.data), mode))

    @rule(pick_=st.data(), data=blobs)
    def append(self, pick_, data):
        p = self.draw_path(pick_)
        self._step()

        self.both(f"append {p}",
                  lambda root: opened(os.path.join(root, p), os.O_WRONLY | os.O_APPEND,
                                      lambda fd: os.write(fd, data.data)))

    @rule(pick_=st.data(), length=offsets)
    def truncate(self, pick_, length):
        p = self.draw_path(pick_)
        self._step()
        self.both(f"truncate {p} {length}", lambda root: os.truncate(os.path.join(root, p),
                                                                     length))

    @rule(pick_=st.data(), off=offsets, n=lengths)
    def read_file(self, pick_, off, n):
        """open O_RDONLY, pread at a random offset, close."""
        p = self.draw_path(pick_)
        self._step()

        self.both(f"read_file {p} @{off}+{n}",
                  lambda root: opened(os.path.join(root, p), os.O_RDONLY,
                                      lambda fd: os.pread(fd, n, off)))

    # -- open handles -------------------------------------------------------------------------
    @precondition(lambda self: len(self.handles) < MAX_HANDLES)
    @rule(pick_=st.data(), flags=open_flags, mode=file_modes)
    def open_handle(self, pick_, flags, mode):
        p = self.draw_path(pick_)
        self._step()
        fl = OPEN_FLAGS[flags]
        lo = outcome(lambda: os.open(os.path.join(self.local, p), fl | os.O_NONBLOCK, mode))
        mo = outcome(lambda: os.open(os.path.join(self.mnt, p), fl | os.O_NONBLOCK, mode))
        if lo[0] == "ok" and mo[0] == "ok":
            self.handles.append(Handle(flags, lo[1], mo[1]))
            return
        for o in (lo, mo):
            if o[0] == "ok":
                os.close(o[1])
        assert lo[0] == mo[0] and lo[1] == mo[1], (
            f"open {p} {flags}: model {lo}, mount {mo}" + self._context())
        STATS["errno_agreements"] += 1

    @precondition(lambda self: self.handles)
    @rule(i=handle_index, off=offsets, data=blobs)
    def pwrite(self, i, off, data):
        self._step()
        h = self.pick(i)
        self.both_h(f"pwrite @{off} {data!r}", h, lambda fd: os.pwrite(fd, data.data, off))

    @precondition(lambda self: self.handles)
    @rule(i=handle_index, data=blobs)
    def write_at_position(self, i, data):
        """write() at the handle's file position (O_APPEND handles: at the end)."""
        self._step()
        h = self.pick(i)
        self.both_h(f"write {data!r}", h, lambda fd: os.write(fd, data.data))

    @precondition(lambda self: self.handles)
    @rule(i=handle_index, off=offsets, n=lengths)
    def pread(self, i, off, n):
        self._step()
        h = self.pick(i)
        self.both_h(f"pread @{off}+{n}", h, lambda fd: os.pread(fd, n, off))

    @precondition(lambda self: self.handles)
    @rule(i=handle_index, length=offsets)
    def ftruncate(self, i, length):
        self._step()
        h = self.pick(i)
        self.both_h(f"ftruncate {length}", h, lambda fd: os.ftruncate(fd, length))

    @precondition(lambda self: self.handles)
    @rule(i=handle_index)
    def fsync(self, i):
        self._step()
        h = self.pick(i)
        self.both_h("fsync", h, os.fsync)

    @precondition(lambda self: self.handles)
    @rule(i=handle_index)
    def close(self, i):
        self._step()
        self._close(self.pick(i))

    @precondition(lambda self: self.handles)
    @rule(i=handle_index)
    def close_and_reopen(self, i):
        self._step()
        h = self.pick(i)
        rel = self._handle_rel(h)
        self._close(h)
        if rel is None:
            return
        fl = OPEN_FLAGS[h.flags] & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
        lo = outcome(lambda: os.open(os.path.join(self.local, rel), fl | os.O_NONBLOCK))
        mo = outcome(lambda: os.open(os.path.join(self.mnt, rel), fl | os.O_NONBLOCK))
        if lo[0] == "ok" and mo[0] == "ok":
            self.handles.append(Handle(h.flags, lo[1], mo[1]))
            return
        for o in (lo, mo):
            if o[0] == "ok":
                os.close(o[1])
        assert lo == mo, f"reopen {rel}: model {lo}, mount {mo}" + self._context()

    # -- mmap ---------------------------------------------------------------------------------
    @rule(pick_=st.data())
    def mmap_read(self, pick_):
        p = self.draw_path(pick_)
        self._step()

        def op(fd):
            size = regular_size(fd)
            if size == 0:
                return b""
            with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
                return mm[:]
        self.both(f"mmap_read {p}", lambda root: opened(os.path.join(root, p), os.O_RDONLY, op))

    @rule(pick_=st.data(), off=offsets, data=blobs)
    def mmap_write(self, pick_, off, data):
        """Shared writable mapping of an existing file: change bytes inside it, msync, close."""
        p = self.draw_path(pick_)
        self._step()

        def op(fd):
            size = regular_size(fd)
            if size == 0:
                return 0
            o = off % size
            piece = data.data[:size - o]
            with mmap.mmap(fd, size) as mm:
                mm[o:o + len(piece)] = piece
                mm.flush()
            return len(piece)
        self.both(f"mmap_write {p} @{off}",
                  lambda root: opened(os.path.join(root, p), os.O_RDWR, op))

    # -- namespace ----------------------------------------------------------------------------
    @rule(pick_=st.data())
    def rename(self, pick_):
        src = self.draw_path(pick_)
        dst = self.draw_path(pick_)
        self._step()
        self.both(f"rename {src} -> {dst}",
                  lambda root: os.rename(os.path.join(root, src), os.path.join(root, dst)))

    @rule(pick_=st.data())
    def unlink(self, pick_):
        p = self.draw_path(pick_)
        self._step()
        self.both(f"unlink {p}", lambda root: os.unlink(os.path.join(root, p)))

    @rule(pick_=st.data(), mode=dir_modes)
    def mkdir(self, pick_, mode):
        p = self.draw_path(pick_)
        self._step()
        self.both(f"mkdir {p}", lambda root: os.mkdir(os.path.join(root, p), mode))

    @rule(pick_=st.data())
    def rmdir(self, pick_):
        p = self.draw_path(pick_)
        self._step()
        self.both(f"rmdir {p}", lambda root: os.rmdir(os.path.join(root, p)))

    @rule(pick_=st.data(), mode=st.one_of(file_modes, dir_modes))
    def chmod(self, pick_, mode):
        p = self.draw_path(pick_)
        self._step()
        self.both(f"chmod {p} {oct(mode)}", lambda root: os.chmod(os.path.join(root, p), mode))

    @rule(pick_=st.data(), atime=atimes, mtime=mtimes)
    def utime(self, pick_, atime, mtime):
        """utimensat with an atime of its own, or UTIME_OMIT for it (touch -m)."""
        p = self.draw_path(pick_)
        self._step()
        self.both(f"utime {p} {atime} {mtime}",
                  lambda root: utimens(os.path.join(root, p), atime, mtime))

    @rule(pick_=st.data(), uid=owners, gid=owners)
    def chown(self, pick_, uid, gid):
        """To another owner and group (-1: unchanged); clears set-ID bits as Linux does."""
        p = self.draw_path(pick_)
        self._step()
        self.both(f"chown {p} {uid}:{gid}",
                  lambda root: os.chown(os.path.join(root, p), uid, gid))

    @rule(pick_=st.data(), kind=node_kinds, mode=file_modes)
    def mknod(self, pick_, kind, mode):
        p = self.draw_path(pick_)
        self._step()
        name, fmt, dev = kind
        self.both(f"mknod {p} {name} {oct(mode)}",
                  lambda root: os.mknod(os.path.join(root, p), fmt | mode, dev))

    @rule(pick_=st.data(), dest=link_targets)
    def symlink(self, pick_, dest):
        p = self.draw_path(pick_)
        self._step()
        self.both(f"symlink {p} -> {dest}",
                  lambda root: os.symlink(dest, os.path.join(root, p)))

    @rule(pick_=st.data())
    def readlink(self, pick_):
        p = self.draw_path(pick_)
        self._step()
        self.both(f"readlink {p}", lambda root: os.readlink(os.path.join(root, p)))

    # -- mount lifecycle ----------------------------------------------------------------------
    def _after_remount(self) -> None:
        # SEMANTICS: on SeaweedFS directory attributes read back as 0755, owned by the
        # mounting user (root), after a remount.
        for dirpath, dirs, _files in os.walk(self.local):
            for d in dirs:
                p = os.path.join(dirpath, d)
                if not os.path.islink(p):
                    os.chmod(p, 0o755)
                    os.chown(p, 0, 0)

    def _restart(self, counter: str, stop) -> None:
        """Close every file, stop the daemon with stop(mount), mount again."""
        self._step()
        self.lifecycle += 1
        STATS[counter] += 1
        self._close_all()
        stop(self.m)
        self.m.mount()
        self._after_remount()

    @precondition(lambda self: self.lifecycle < LIFECYCLE)
    @rule()
    def remount(self):
        self._restart("remounts", lambda m: m.umount())

    @precondition(lambda self: self.lifecycle < LIFECYCLE)
    @rule()
    def crash(self):
        """kill -9 of the daemon with every file closed, then mount on the same cache dir."""
        self._restart("crashes", lambda m: m.kill9())

    # -- the invariant ------------------------------------------------------------------------
    @invariant()
    def trees_agree(self):
        if not self.local:
            return
        model = snapshot(self.local)
        mount = snapshot(self.mnt)
        problems = diff_snapshots(model, mount)
        assert not problems, ("mount differs from the model:\n  " + "\n  ".join(problems)
                              + self._context())


# ---------------------------------------------------------------------------- the test
def report(elapsed: float, outcome_: str) -> str:
    idle = " (stopped by the time box)" if STATS["time_boxed"] else ""
    line = (f"ssecfs fuzz: {STATS['examples']} examples{idle}, {STATS['steps']} steps "
            f"({STATS['remounts']} remounts, {STATS['crashes']} crashes, "
            f"{STATS['errno_agreements']} failing calls with matching errno) "
            f"in {elapsed:.0f}s: {outcome_}")
    path = os.environ.get("SSECFS_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({**STATS, "elapsed": round(elapsed, 1), "outcome": outcome_}, f)
            f.write("\n")
    return line


def test_fuzz_against_local_model(mounter, bucket, key, tmp_path):
    m = mounter(bucket, key[0], name="fuzz")
    model = tmp_path / "model"
    model.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "noatime,nodev,size=512m", "fuzz-model",
                    str(model)], check=True)
    FuzzMachine.m = m
    FuzzMachine.local_base = str(model)
    for k in STATS:
        STATS[k] = 0
    BOX["deadline"] = time.monotonic() + SECONDS
    BOX["failed"] = False
    old_umask = os.umask(0o022)
    t0 = time.monotonic()
    result = "failed"
    try:
        run_state_machine_as_test(FuzzMachine, settings=settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
            suppress_health_check=list(HealthCheck), derandomize=False,
            report_multiple_bugs=False))
        result = "passed"
    except (TimeBoxOver, FlakyStrategyDefinition):
        if not STATS["time_boxed"] or BOX["failed"]:
            raise
        result = "passed (time box reached)"
    finally:
        os.umask(old_umask)
        subprocess.run(["umount", "-l", str(model)], check=False)
        print("\n" + report(time.monotonic() - t0, result))
        if os.environ.get("SSECFS_FUZZ_VERBOSE"):
            print(sorted(ERRNOS.items(), key=lambda kv: -kv[1]))
    assert STATS["steps"] > 0
    # the mount is still healthy and holds nothing but what the examples left (nothing)
    assert os.path.ismount(m.path)
    assert os.listdir(m.path) == []
