"""Entries whose content is not file data: symlinks (the target is the object's body) and
special files (FIFOs, character and block devices, sockets: a zero-byte object).

An entry's type is in the mode its object's metadata carries (x-amz-meta-mode, as s3fs-fuse
writes it), so both tools read each other's; a device's number in x-amz-meta-rdev. FUSE does
not route the I/O of special files to the filesystem: the kernel opens a FIFO as a local pipe
and a device node as that device of the machine it is opened on.
"""

from __future__ import annotations

import stat

from ..errors import InvalidName, KeyMismatch
from ..store.contract import OPEN

SPECIAL = (stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK)


class Nodes:
    def __init__(self, ns):
        self.ns = ns                  # namespace.Namespace: its lock and parts

    def symlink(self, path: str, target: str, uid: int | None = None,
                gid: int | None = None) -> None:
        ns = self.ns
        ns.check_writable()
        with ns.lock:
            ns.put_new(path, ns.names.key_of(path), target.encode("utf-8", "surrogateescape"),
                       stat.S_IFLNK | 0o777, uid, gid)
            ns.attrs.invalidate(path)
            ns.attrs.note_child(path, True)

    def mknod(self, path: str, mode: int, rdev: int, uid: int | None = None,
              gid: int | None = None) -> None:
        """A FIFO, device or socket file at path (mode has its type); rdev: a device's number
        (kept only for devices, as Linux does)."""
        kind = stat.S_IFMT(mode)
        if kind not in SPECIAL:
            raise InvalidName(f"mknod {path}: not a special file type ({kind:#o})")
        ns = self.ns
        ns.check_writable()
        with ns.lock:
            ns.put_new(path, ns.names.key_of(path), b"", kind | (mode & 0o7777), uid, gid,
                       rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0)
            ns.attrs.invalidate(path)
            ns.attrs.note_child(path, True)

    def readlink(self, path: str) -> str:
        ns = self.ns
        attr = ns.attrs.getattr(path)
        if not stat.S_ISLNK(attr.mode):
            raise InvalidName(f"{path} is not a symlink")
        key = ns.names.key_of(path)
        info = ns.store.head(key)
        if info.access != OPEN:
            raise KeyMismatch(path)
        return ns.store.get_range(key, 0, info.size, info.key_fp).decode(
            "utf-8", "surrogateescape")
