"""Entries whose content is not file data: symlinks (the target is the object's body).

An entry's type is in the mode its object's metadata carries (x-amz-meta-mode, as s3fs-fuse
writes it), so both tools read each other's.
"""

from __future__ import annotations

import stat

from ..errors import InvalidName, KeyMismatch
from ..store.contract import OPEN


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
