"""Changes of an entry's attributes: chmod, chown, utimens (FUSE's setattr, but the size).

Ownership and mode follow the POSIX rules for the Caller that asks (the kernel checks them
too, the mount uses default_permissions; this keeps the filesystem right on its own). A file
open or dirty here takes the change in its state and uploads it with its data; any other
entry is changed on the server: a directory's marker is written anew, an object is copied
onto itself with the new metadata (CopyObject re-encrypts it under the current key). A file
unlinked while open (orphans.py: `alias` is the name it is known by) takes the change in its
state only: nothing of it is uploaded.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from ..errors import KeyMismatch, NotPermitted
from ..store.contract import OPEN
from .meta import Attr, meta_headers, now

NO_ID = (-1, 0xFFFFFFFF)  # chown(2): leave the owner (group) as it is


@dataclass(frozen=True)
class Caller:
    """The process asking for a change of owner or mode (from the FUSE request)."""
    uid: int
    gid: int
    groups: frozenset = frozenset()      # supplementary groups

    def may_use_group(self, gid: int) -> bool:
        return self.uid == 0 or gid == self.gid or gid in self.groups


class SetAttrs:
    def __init__(self, ns):
        self.ns = ns                  # namespace.Namespace: its lock and parts

    def _attr(self, path: str, alias: str | None) -> Attr:
        if alias is None:
            return self.ns.attrs.getattr(path)
        return self.ns.orphans.attr(self.ns.orphans.by_alias(path, alias))

    def _change_meta(self, path: str, alias: str | None = None, **changes) -> None:
        ns = self.ns
        ns.check_writable()
        if alias is not None:
            st = ns.orphans.by_alias(path, alias)
            with st.lock:
                st.meta.update(changes)
            return
        if path == "/":
            raise NotPermitted("/: the owner, group and mode of the mount's root are mount "
                               "options (--uid, --gid, --dir-mode)")
        with ns.lock:
            st = ns.files.get(path)
            if st is not None:
                with st.lock:
                    # an upload that just ended may have dropped it from the table (clean):
                    # then the object is up to date and is changed instead (below)
                    live = ns.files.get(path) is st
                    if live:
                        st.meta.update(changes)
                        if set(changes) - {"ctime"}:  # fixed when a multipart upload begins
                            ns.uploads.streams.drop(st, "metadata changed", for_good=True)
                        ns.writer.begin_change(st, data=False)
                if live:
                    ns.uploads.persist_and_schedule(st)
                    return
            attr = ns.attrs.getattr(path)
            if stat.S_ISDIR(attr.mode):
                meta = {**ns.meta.meta_of_attr(attr), "ctime": now(), **changes}
                ns.store.put(ns.names.dir_key(path), b"", meta_headers(meta))
                ns.attrs.remember_dir_meta(path, meta)
            else:
                key = ns.names.key_of(path)
                info = ns.store.head(key)
                if info.access != OPEN:
                    raise KeyMismatch(path)
                meta = ns.meta.of(info, stat.S_IFREG)
                meta.update(changes)
                meta.setdefault("ctime", now())
                ns.store.copy(key, key, info.size, meta_headers(meta), info.key_fp)
            ns.attrs.invalidate(path)

    def chmod(self, path: str, mode: int, caller: Caller | None = None,
              alias: str | None = None) -> None:
        """Only the owner (or root) changes the mode, and sets set-group-ID only with a group
        it belongs to. A change that only clears set-id bits is allowed to anyone: the kernel
        asks for it, on behalf of the writer, when someone else writes to or truncates such a
        file. caller None: no check."""
        attr = self._attr(path, alias)
        mode &= 0o7777
        old = stat.S_IMODE(attr.mode)
        if caller is not None and caller.uid != 0:
            if caller.uid != attr.uid:
                if mode == old or mode != old & ~(stat.S_ISUID | stat.S_ISGID):
                    raise NotPermitted(f"chmod {path}: not the owner")
            elif not caller.may_use_group(attr.gid):
                mode &= ~stat.S_ISGID
        self._change_meta(path, alias, mode=stat.S_IFMT(attr.mode) | mode, ctime=now())

    def chown(self, path: str, uid: int, gid: int, caller: Caller | None = None,
              alias: str | None = None) -> None:
        """POSIX with _POSIX_CHOWN_RESTRICTED, as Linux: only root changes the owner; the
        owner may change the group to one it belongs to. A change of a file's owner or group
        clears its set-user-ID bit, and its set-group-ID bit if group-execute is set (without
        it the bit marks mandatory locking, not a privilege). caller None: no check."""
        attr = self._attr(path, alias)
        new_uid = None if uid in NO_ID else uid
        new_gid = None if gid in NO_ID else gid
        if caller is not None and caller.uid != 0:
            if new_uid is not None and (caller.uid != attr.uid or new_uid != attr.uid):
                raise NotPermitted(f"chown {path}: only root may change the owner")
            if new_gid is not None and (caller.uid != attr.uid or not (
                    new_gid == attr.gid or caller.may_use_group(new_gid))):
                raise NotPermitted(f"chown {path}: only the owner may change the group, to "
                                   "one it belongs to")
        if new_uid is None and new_gid is None:
            return
        ch = {"uid": attr.uid if new_uid is None else new_uid,
              "gid": attr.gid if new_gid is None else new_gid}
        mode = attr.mode
        if not stat.S_ISDIR(mode):
            mode &= ~stat.S_ISUID
            if mode & stat.S_IXGRP:
                mode &= ~stat.S_ISGID
        if (ch["uid"], ch["gid"], mode) != (attr.uid, attr.gid, attr.mode):
            self._change_meta(path, alias, **ch, mode=mode, ctime=now())

    def utimens(self, path: str, atime: float | None, mtime: float | None,
                alias: str | None = None) -> None:
        """None: that time stays. An object without an atime (written by another tool)
        reads it as its mtime: a change of the mtime alone first pins the atime where it
        read."""
        if atime is None and mtime is None:
            return
        ch = {"ctime": now()}
        if mtime is not None:
            ch["mtime"] = mtime
            if atime is None:
                a = self._attr(path, alias)
                if a.atime is None:
                    atime = a.mtime
        if atime is not None:
            ch["atime"] = atime
        self._change_meta(path, alias, **ch)
