"""Attributes and the object metadata that carries them.

Metadata (s3fs-compatible): mode (with the file type bits), uid, gid, mtime, ctime, atime
(an object without one, written by another tool, reads its atime as its mtime), as decimal
strings; rdev, a device node's number (dev_t), which
s3fs-fuse does not keep. It is believed
only of objects a key of the ring opens (`Metadata.own`): anyone who may write to the bucket
can store an object without SSE-C, or under another key, with any metadata. What an object
lacks, or may not claim, is the mount's default (FsConfig uid, gid, file_mode, dir_mode) and
its Last-Modified; the root and directories without a marker get the defaults too.
"""

from __future__ import annotations

import math
import os
import stat
import time
from dataclasses import dataclass

from ..config import ID_MAX, RDEV_MAX
from ..store.contract import OPEN, ObjectInfo


@dataclass
class Attr:
    mode: int
    size: int
    mtime: float
    ctime: float
    uid: int
    gid: int
    nlink: int = 1
    atime: float | None = None      # None: the object has none (reads as mtime)
    rdev: int = 0                   # a device node's number


def now() -> float:
    return time.time()


def _fmt_time(t: float) -> str:
    """Seconds, with all nine digits of a fraction: s3fs-fuse reads the digits after the
    point as nanoseconds (".5" would be 5 ns)."""
    s = f"{t:.9f}"
    return s[:-10] if s.endswith(".000000000") else s


def meta_headers(meta: dict) -> dict:
    """The object metadata that stores meta (mode, uid, gid, mtime, ctime; atime and rdev
    where meta has them)."""
    h = {"mode": str(int(meta["mode"])), "uid": str(int(meta["uid"])),
         "gid": str(int(meta["gid"])), "mtime": _fmt_time(meta["mtime"]),
         "ctime": _fmt_time(meta["ctime"])}
    if meta.get("atime") is not None:
        h["atime"] = _fmt_time(meta["atime"])
    if meta.get("rdev"):
        h["rdev"] = str(int(meta["rdev"]))
    return h


def attr_from_meta(m: dict, size: int = 0, nlink: int = 1) -> Attr:
    return Attr(mode=m["mode"], size=size, mtime=m["mtime"], ctime=m["ctime"],
                uid=m["uid"], gid=m["gid"], nlink=nlink, atime=m.get("atime"),
                rdev=m.get("rdev", 0))


def own_meta(info: ObjectInfo, kind: int) -> dict:
    """The attributes an object's metadata sets, each only if well-formed, and none of an
    object that no key of the ring opens (plaintext, or another key: anyone with write
    access to the bucket can make such objects, e.g. a directory marker owned by an
    accomplice, mode 0777, or a file mode 04755 owned by root; nothing vouches for them).
    kind (stat.S_IFREG or stat.S_IFDIR): the type of a mode without one."""
    if info.access != OPEN:
        return {}
    md = info.metadata
    own = {}
    for name, conv in (("mode", int), ("uid", int), ("gid", int), ("mtime", float),
                       ("ctime", float), ("atime", float), ("rdev", int)):
        try:
            own[name] = conv(md[name])
        except (KeyError, ValueError, TypeError):
            pass
    if not 0 <= own.get("mode", 0) <= 0o177777:
        del own["mode"]
    elif "mode" in own and stat.S_IFMT(own["mode"]) == 0:
        own["mode"] |= kind
    for name in ("uid", "gid"):
        if not 0 <= own.get(name, 0) <= ID_MAX:
            del own[name]
    if not 0 <= own.get("rdev", 0) <= RDEV_MAX:
        del own["rdev"]
    for name in ("mtime", "ctime", "atime"):
        if not math.isfinite(own.get(name, 0.0)):
            del own[name]
    return own


def index_attr_of(info: ObjectInfo) -> Attr:
    """An object's attributes as a directory index keeps them: mode, uid and gid -1 where
    the object sets none (each mount that reads the index applies its own defaults)."""
    own = own_meta(info, stat.S_IFREG)
    mtime = own.get("mtime", info.mtime)
    return Attr(mode=own.get("mode", -1), size=info.size, mtime=mtime,
                ctime=own.get("ctime", mtime), uid=own.get("uid", -1), gid=own.get("gid", -1),
                atime=own.get("atime"), rdev=own.get("rdev", 0))


class Metadata:
    """The mount's defaults, and the attributes of objects, directories and open files."""

    def __init__(self, config):
        self.uid = config.uid if config.uid is not None else os.getuid()
        self.gid = config.gid if config.gid is not None else os.getgid()
        self.file_mode = config.file_mode
        self.dir_mode = config.dir_mode
        self.mount_time = now()

    def default(self, mode: int) -> dict:
        """A new entry's metadata: its atime is its creation time, and moves only when set
        (reads leave it: the mount behaves as a noatime mount)."""
        t = now()
        return {"mode": mode, "uid": self.uid, "gid": self.gid, "mtime": t, "ctime": t,
                "atime": t}

    def default_mode(self, kind: int) -> int:
        """The mode of what carries none we trust: kind is stat.S_IFREG or stat.S_IFDIR."""
        return kind | (self.dir_mode if kind == stat.S_IFDIR else self.file_mode)

    def of(self, info: ObjectInfo, kind: int) -> dict:
        """mode, uid, gid, mtime, ctime of an object: what its metadata sets (own_meta),
        the rest the mount's defaults and the object's Last-Modified (set by the server)."""
        own = own_meta(info, kind)
        mtime = own.get("mtime", info.mtime)
        m = {"mode": own.get("mode", self.default_mode(kind)),
             "uid": own.get("uid", self.uid), "gid": own.get("gid", self.gid),
             "mtime": mtime, "ctime": own.get("ctime", mtime)}
        for name in ("atime", "rdev"):
            if name in own:
                m[name] = own[name]
        return m

    def attr_of_info(self, info: ObjectInfo) -> Attr:
        return attr_from_meta(self.of(info, stat.S_IFREG), info.size)

    def attr_of_entry(self, e) -> Attr:
        """The attributes of a file from an index entry (dirindex.Entry; -1: our default)."""
        return Attr(e.mode if e.mode != -1 else self.default_mode(stat.S_IFREG), e.size,
                    e.mtime, e.ctime, e.uid if e.uid != -1 else self.uid,
                    e.gid if e.gid != -1 else self.gid, atime=e.atime, rdev=e.rdev)

    @staticmethod
    def meta_of_attr(a: Attr) -> dict:
        """The metadata that stores attributes a (the inverse of attr_from_meta)."""
        m = {"mode": a.mode, "uid": a.uid, "gid": a.gid, "mtime": a.mtime, "ctime": a.ctime}
        if a.atime is not None:
            m["atime"] = a.atime
        if a.rdev:
            m["rdev"] = a.rdev
        return m

    def default_dir(self, t: float | None = None) -> Attr:
        """A directory that carries no attributes we trust (the root, one without a marker)."""
        t = self.mount_time if t is None else t
        return Attr(self.default_mode(stat.S_IFDIR), 0, t, t, self.uid, self.gid, 2)
