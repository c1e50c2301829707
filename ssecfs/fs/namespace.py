"""Namespace operations of the filesystem: directories, unlink, rename, metadata changes,
symlinks. A mixin of fs.Filesystem (same object, same locks: see the lock order in fs.py);
split out only to keep modules small.

Ownership: a new file, directory or symlink belongs to the process that makes it (the FUSE
adapter passes its uid and gid), with the group of a set-group-ID parent. chown and chmod
follow the POSIX rules for the Caller that asks (the kernel checks them too, the mount uses
default_permissions; this keeps the filesystem right on its own).
"""

from __future__ import annotations

import logging
import posixpath
import stat
from dataclasses import dataclass, replace

from ..errors import (Exists, InvalidName, IsADirectory, KeyMismatch, NotADirectory, NotEmpty,
                     NotFound, NotPermitted, NotSupported, PermissionDenied)
from .attrs import LISTING_CACHE_MAX, _now
from .dirindex import HEAL_MIN, INDEX_NAME, MAX_ENTRIES
from ..store.contract import OPEN

log = logging.getLogger("ssecfs.fs")

NO_ID = (-1, 0xFFFFFFFF)  # chown(2): leave the owner (group) as it is


@dataclass(frozen=True)
class Caller:
    """The process asking for a change of owner or mode (from the FUSE request)."""
    uid: int
    gid: int
    groups: frozenset = frozenset()      # supplementary groups

    def may_use_group(self, gid: int) -> bool:
        return self.uid == 0 or gid == self.gid or gid in self.groups


class NamespaceOps:
    def _dir_exists(self, path: str) -> bool:
        dkey = self.dir_key(path)
        for page in self.store.list_page_iter(dkey, delimiter="/", max_keys=1):
            return bool(page.objects or page.prefixes) or self._has_pending_under(path)
        return False

    def _remember_dir_meta(self, path: str, meta: dict | None) -> None:
        with self._attr_lock:
            if meta is None:
                pfx = path.rstrip("/") + "/"
                for p in [p for p in self._dir_meta if p == path or p.startswith(pfx)]:
                    del self._dir_meta[p]
            else:
                self._dir_meta[path] = dict(meta)

    # ===================================================================== directories
    def readdir(self, path: str):
        """Yields names; streams the listing page by page (bounded memory)."""
        if path != "/" and not self.is_dir(path):
            raise NotADirectory(path)
        dkey = "" if path == "/" else self.dir_key(path)
        dkey = self.prefix + dkey if path == "/" else dkey
        seen_local = set()
        pfx = "/" if path == "/" else path.rstrip("/") + "/"
        with self._files_lock:
            local = {p[len(pfx):] for p in self._files if p.startswith(pfx)
                     and "/" not in p[len(pfx):]}
        with self._attr_lock:
            mark = self._name_changes.mark()
            seq0 = self._seq
        yield "."
        yield ".."
        complete = False
        index = None
        unindexed = 0
        for page_no, page in enumerate(self.store.list_page_iter(dkey, delimiter="/")):
            batch = []
            for o in page.objects:
                name = o.key[len(dkey):]
                if not name or "/" in name or name == INDEX_NAME:
                    continue            # the directory's own marker, its index
                seen_local.add(name)
                if len(seen_local) <= LISTING_CACHE_MAX:
                    batch.append((pfx + name, o.key, o))
                elif len(seen_local) == LISTING_CACHE_MAX + 1:
                    self._note_big_dir(path, dkey)
            if self._use_index and index is None:
                # one GET for the attrs of many files (none if the listing shows no index,
                # or the same one as last time)
                index = self.dirindex.for_listing(dkey, page.objects)
            unindexed += (self._seed_from_index(index, batch, seq0) if index is not None
                          else len(batch))
            self._prefetch_attrs(path, batch, first=page_no == 0)
            for o in page.objects:
                name = o.key[len(dkey):]
                if name and "/" not in name and name != INDEX_NAME:
                    yield name
            for p in page.prefixes:
                name = p[len(dkey):].rstrip("/")
                if name and "/" not in name and name not in seen_local:
                    seen_local.add(name)
                    yield name
        else:
            complete = True
        with self._attr_lock:
            complete = complete and not self._name_changes.changed_since(path, mark)
        if complete:
            self._set_children(path, (seen_local | local)
                               if len(seen_local) <= LISTING_CACHE_MAX else None)
            if unindexed >= HEAL_MIN and len(seen_local) <= MAX_ENTRIES:
                self.dirindex.changed(dkey, ours=False)   # index what the HEADs now see
        for name in sorted(local - seen_local):
            yield name

    def _new_meta(self, path: str, mode: int, uid: int | None, gid: int | None) -> dict:
        """Metadata of a new entry at path: owned by uid, gid (the creating process's; None:
        the mount's defaults). In a set-group-ID directory the group is the directory's, and
        a new directory is set-group-ID too (as Linux does)."""
        meta = self._default_meta(mode)
        if uid is not None:
            meta["uid"] = uid
        if gid is not None:
            meta["gid"] = gid
        try:
            parent = self.getattr(posixpath.dirname(path) or "/")
        except NotFound:
            return meta
        if parent.mode & stat.S_ISGID:
            meta["gid"] = parent.gid
            if stat.S_ISDIR(mode):
                meta["mode"] |= stat.S_ISGID
        return meta

    def mkdir(self, path: str, mode: int, uid: int | None = None, gid: int | None = None) -> None:
        self._check_writable()
        with self._ns_lock:
            if self._exists(path):
                raise Exists(path)
            self._check_parent(path)
            meta = self._new_meta(path, stat.S_IFDIR | (mode & 0o7777), uid, gid)
            self.store.put(self.dir_key(path), b"", self._meta_headers(meta))
            self._remember_dir_meta(path, meta)
            self._invalidate(path)
            self._note_child(path, True)
            self._set_children(path, set())
            with self._attr_lock:
                self._attrs[path] = self._attr_from_meta(meta, nlink=2)

    def rmdir(self, path: str) -> None:
        self._check_writable()
        with self._ns_lock:
            attr = self.getattr(path)
            if not stat.S_ISDIR(attr.mode):
                raise NotADirectory(path)
            dkey = self.dir_key(path)
            if self._has_pending_under(path):
                raise NotEmpty(path)
            ikey = dkey + INDEX_NAME
            for page in self.store.list_page_iter(dkey, delimiter=None, max_keys=3):
                if any(o.key not in (dkey, ikey) for o in page.objects):
                    raise NotEmpty(path)
            self.dirindex.forget(dkey)
            for k in (ikey, dkey):
                try:
                    self.store.delete(k)
                except NotFound:
                    pass
            self._remember_dir_meta(path, None)
            self._invalidate(path)
            self._note_child(path, False)
            self._set_children(path, None)

    # ===================================================================== unlink / rename
    def _idle_uploads(self, *paths: str):
        """Hold the uploads of the files at paths (and under them, for directories) and wait,
        WITHOUT the namespace lock, for those in flight to end: a stuck upload then delays
        only the operation on its own file, not every namespace operation of the mount.
        Returns the held states (release with _release_uploads)."""
        with self._files_lock:
            held = [st for p, st in self._files.items()
                    if any(p == q or p.startswith(q.rstrip("/") + "/") for q in paths)]
        for st in held:
            self.wb.hold(st)
        for st in held:
            self.wb.wait_idle(st)
        return held

    def _release_uploads(self, held) -> None:
        for st in held:
            self.wb.unhold(st)

    def unlink(self, path: str) -> None:
        self._check_writable()
        held = self._idle_uploads(path)
        try:
            self._unlink(path)
        finally:
            self._release_uploads(held)

    def _unlink(self, path: str) -> None:
        with self._ns_lock:
            attr = self.getattr(path)
            if stat.S_ISDIR(attr.mode):
                raise IsADirectory(path)
            self._drop_state(path)
            try:
                self.store.delete(self.key_of(path))
            except NotFound:
                pass
            self._invalidate(path)
            self._note_child(path, False)

    def _drop_state(self, path: str) -> None:
        """Caller holds _ns_lock. Forget a file's local state for good (unlinked/replaced)."""
        self.cache.discard_key(self.key_of(path))      # its clean cached versions too
        st = self._state(path)
        if st is None:
            return
        self.wb.quiesce(st)
        with st.lock:
            st.deleted = True
            self._stream_drop(st, "unlinked", for_good=True)
            st.uploaded_gen = st.generation
            if st.entry is not None:
                self.cache.discard(st.entry)
                st.entry = None
        with self._files_lock:
            if self._files.get(path) is st:
                del self._files[path]

    def rename(self, old: str, new: str) -> None:
        self._check_writable()
        if old == new:
            return
        held = self._idle_uploads(old, new)
        try:
            self._rename(old, new)
        finally:
            self._release_uploads(held)

    def _rename(self, old: str, new: str) -> None:
        with self._ns_lock:
            a = self.getattr(old)
            if (new + "/").startswith(old.rstrip("/") + "/") and stat.S_ISDIR(a.mode):
                raise InvalidName("cannot move a directory into itself")
            try:
                b = self.getattr(new)
            except NotFound:
                b = None
                self._check_parent(new)
            if stat.S_ISDIR(a.mode):
                if b is not None:
                    if not stat.S_ISDIR(b.mode):
                        raise NotADirectory(new)
                    self.rmdir(new)          # raises NotEmpty unless empty
                self._rename_dir(old, new)
            else:
                if b is not None and stat.S_ISDIR(b.mode):
                    raise IsADirectory(new)
                self._rename_file(old, new, replacing=b is not None)
            self._invalidate(old, new)
            if stat.S_ISDIR(a.mode):
                with self._attr_lock:
                    self._listings.clear()
                    self._name_changes.note(None)
            else:
                self._note_child(old, False)
                self._note_child(new, True)

    def _rename_file(self, old: str, new: str, replacing: bool) -> None:
        okey, nkey = self.key_of(old), self.key_of(new)
        if replacing:
            self._drop_state(new)
        st = self._state(old)
        if st is None:
            info = self.store.head(okey)
            if info.access != OPEN:
                raise KeyMismatch(old)
            self.store.copy(okey, nkey, info.size, info.metadata, info.key_fp)
            self.store.delete(okey)
            return
        requeue = self.wb.quiesce(st)
        try:
            with st.lock:
                st.meta["ctime"] = _now()
                remote = st.remote
                if remote is not None and remote.key == okey:
                    meta = self._meta_headers(st.meta)
                    info = self.store.copy(okey, nkey, remote.size, meta, remote.key_fp)
                    st.remote = replace(remote, key=nkey, etag=info.etag, key_fp=info.key_fp)
                    st.readahead.clear()
                    st.hot.clear()
                    self.store.delete(okey)
                with self._files_lock:
                    if self._files.get(old) is st:
                        del self._files[old]
                    self._files[new] = st
                st.path, st.key = new, nkey
                self._stream_drop(st, "renamed")
                if st.entry is not None and not st.dirty and st.remote is not None:
                    self.cache.index_clean(st.entry, nkey, st.remote.etag)
                if st.dirty and st.entry is not None:
                    st.entry.save_state(st.journal())
        finally:
            # whatever happened, a dirty file goes back in the upload queue
            if st.dirty or requeue:
                self.wb.schedule(st, 0 if requeue else None)

    def _rename_dir(self, old: str, new: str) -> None:
        okey, nkey = self.dir_key(old), self.dir_key(new)
        opfx, npfx = old.rstrip("/") + "/", new.rstrip("/") + "/"
        with self._files_lock:
            local = [st for p, st in self._files.items() if p.startswith(opfx)]
        for st in local:
            self.wb.quiesce(st)
        try:
            self.dirindex.forget(okey)
            copied = self._copy_tree(okey, nkey)
            for st in local:
                self._move_state(st, opfx, npfx, okey, nkey, copied)
        finally:
            for st in local:
                if st.dirty and not st.deleted:
                    self.wb.schedule(st, 0)
        with self._attr_lock:
            self._attrs.clear()
            moved = {npfx + p[len(opfx):]: m for p, m in self._dir_meta.items() if p.startswith(opfx)}
            if old in self._dir_meta:
                moved[new] = self._dir_meta[old]
        self._remember_dir_meta(old, None)
        with self._attr_lock:
            self._dir_meta.update(moved)
        if self._use_index:
            self.dirindex.changed(nkey)

    def _copy_tree(self, okey: str, nkey: str) -> dict:
        """Copy every object under okey to nkey (in parallel), then delete the old ones.
        Returns {old key: ObjectInfo of the copy}. If any copy fails, the copies already made
        are deleted again (the source tree is untouched) and the error is raised."""
        objs: list[str] = []
        futs: dict = {}
        copied: dict = {}
        try:
            for page in self.store.list_page_iter(okey, delimiter=None):
                for o in page.objects:
                    objs.append(o.key)
                    if o.key.endswith("/" + INDEX_NAME):
                        continue          # indexes are not carried over (copies are new versions)
                    futs[o.key] = self._copy_pool.submit(self._move_copy, o.key,
                                                         nkey + o.key[len(okey):], o.size)
                    if len(futs) >= 1000:
                        self._drain(futs, copied)
            self._drain(futs, copied)
            if okey not in copied:
                # no marker: make one so an empty directory survives the move; without
                # metadata, like the directory it replaces (the mount's defaults)
                copied[okey] = self.store.put(nkey, b"", {})
        except BaseException:
            made = [info.key for info in copied.values() if info is not None]
            log.warning("moving %r failed; removing the %d copies already made", okey, len(made))
            try:
                self._delete_tree(made, nkey)
            except Exception:  # noqa: BLE001 - the original error is what matters
                log.error("could not remove partial copies under %r", nkey)
            raise
        self._delete_tree(objs, okey)
        return copied

    def _delete_tree(self, keys: list[str], root: str) -> None:
        """Delete a set of keys deepest first, then the directory keys they imply. SeaweedFS
        keeps a "dir/" key that still has children (and an emptied implicit directory) listed;
        deleting children before parents, then each implied "dir/", leaves nothing behind.
        On AWS deleting a key that does not exist is harmless."""
        implied = set()
        for k in keys:
            parts = k.rstrip("/").split("/")[:-1]
            for n in range(1, len(parts) + 1):
                implied.add("/".join(parts[:n]) + "/")
        implied = {d for d in implied if d.startswith(root)}     # never above the moved tree
        todo = set(keys) | implied
        # the files first, then the directory keys level by level, deepest first (deletes.py
        # sends a group as a few DeleteObjects requests at once)
        files = sorted(k for k in todo if not k.endswith("/"))
        levels: dict[int, list[str]] = {}
        for k in todo:
            if k.endswith("/"):
                levels.setdefault(k.count("/"), []).append(k)
        for group in [files] + [sorted(levels[n]) for n in sorted(levels, reverse=True)]:
            if group:
                self.store.delete_many(group)

    def _move_state(self, st, opfx: str, npfx: str, okey: str, nkey: str, copied: dict) -> None:
        with st.lock:
            p = st.path
            np_ = npfx + p[len(opfx):]
            with self._files_lock:
                if self._files.get(p) is st:
                    del self._files[p]
                self._files[np_] = st
            st.path, st.key = np_, self.key_of(np_)
            r = st.remote
            if r is not None and r.key.startswith(okey):
                info = copied.get(r.key)
                if info is not None:
                    st.remote = replace(r, key=info.key, etag=info.etag, key_fp=info.key_fp)
                else:          # its object was not there any more: nothing to fetch from
                    st.remote, st.remote_valid = None, 0
                st.readahead.clear()
                st.hot.clear()
            if st.dirty and st.entry is not None:
                st.entry.save_state(st.journal())

    @staticmethod
    def _drain(futs: dict, results: dict) -> None:
        """Collect results; on an error, still wait for the others (recording successes)
        so that a rollback knows every copy made, then raise the first error."""
        first = None
        for k, f in futs.items():
            try:
                results[k] = f.result()
            except BaseException as e:  # noqa: BLE001
                first = first or e
        futs.clear()
        if first is not None:
            raise first

    def _move_copy(self, src: str, dst: str, size: int):
        if not src.endswith("/"):
            try:        # one request: most objects are under the current key
                return self.store.copy_as_is(src, dst, size)
            except (KeyMismatch, PermissionDenied, NotSupported):
                pass    # under an older key (or big): HEAD to learn which, then copy
        info = self.store.head(src)
        if src.endswith("/") and info.size == 0:
            # a directory marker, made anew under our key: it must not make metadata that
            # no key vouched for (a plaintext marker's owner, mode 0777) trusted
            return self.store.put(dst, b"", info.metadata if info.access == OPEN else {})
        if info.access != OPEN:
            raise KeyMismatch(src)
        return self.store.copy(src, dst, info.size, info.metadata, info.key_fp)

    # ===================================================================== metadata changes
    def _change_meta(self, path: str, **changes) -> None:
        self._check_writable()
        if path == "/":
            raise NotPermitted("/: the owner, group and mode of the mount's root are mount "
                               "options (--uid, --gid, --dir-mode)")
        with self._ns_lock:
            st = self._state(path)
            if st is not None:
                with st.lock:
                    # an upload that just ended may have dropped it from the table (clean):
                    # then the object is up to date and is changed instead (below)
                    with self._files_lock:
                        live = self._files.get(path) is st
                    if live:
                        st.meta.update(changes)
                        if set(changes) - {"ctime"}:  # fixed when a multipart upload begins
                            self._stream_drop(st, "metadata changed", for_good=True)
                        self._begin_change(st, data=False)
                if live:
                    self._persist_and_schedule(st)
                    return
            attr = self.getattr(path)
            if stat.S_ISDIR(attr.mode):
                meta = {"mode": attr.mode, "uid": attr.uid, "gid": attr.gid,
                        "mtime": attr.mtime, "ctime": _now(), **changes}
                self.store.put(self.dir_key(path), b"", self._meta_headers(meta))
                self._remember_dir_meta(path, meta)
            else:
                key = self.key_of(path)
                info = self.store.head(key)
                if info.access != OPEN:
                    raise KeyMismatch(path)
                meta = self._meta_of(info, stat.S_IFREG)
                meta.update(changes)
                meta.setdefault("ctime", _now())
                self.store.copy(key, key, info.size, self._meta_headers(meta), info.key_fp)
            self._invalidate(path)

    def chmod(self, path: str, mode: int, caller: Caller | None = None) -> None:
        """Only the owner (or root) changes the mode, and sets set-group-ID only with a group
        it belongs to. A change that only clears set-id bits is allowed to anyone: the kernel
        asks for it, on behalf of the writer, when someone else writes to or truncates such a
        file. caller None: no check."""
        attr = self.getattr(path)
        mode &= 0o7777
        old = stat.S_IMODE(attr.mode)
        if caller is not None and caller.uid != 0:
            if caller.uid != attr.uid:
                if mode == old or mode != old & ~(stat.S_ISUID | stat.S_ISGID):
                    raise NotPermitted(f"chmod {path}: not the owner")
            elif not caller.may_use_group(attr.gid):
                mode &= ~stat.S_ISGID
        self._change_meta(path, mode=stat.S_IFMT(attr.mode) | mode, ctime=_now())

    def chown(self, path: str, uid: int, gid: int, caller: Caller | None = None) -> None:
        """POSIX with _POSIX_CHOWN_RESTRICTED, as Linux: only root changes the owner; the
        owner may change the group to one it belongs to. A change of a file's owner or group
        clears its set-user-ID bit, and its set-group-ID bit if group-execute is set (without
        it the bit marks mandatory locking, not a privilege). caller None: no check."""
        attr = self.getattr(path)
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
            self._change_meta(path, **ch, mode=mode, ctime=_now())

    def utimens(self, path: str, atime: float, mtime: float) -> None:
        self._change_meta(path, mtime=mtime, ctime=_now())

    # ===================================================================== symlinks
    def symlink(self, path: str, target: str, uid: int | None = None, gid: int | None = None) -> None:
        self._check_writable()
        with self._ns_lock:
            if self._exists(path):
                raise Exists(path)
            self._check_parent(path)
            meta = self._new_meta(path, stat.S_IFLNK | 0o777, uid, gid)
            self.store.put(self.key_of(path), target.encode("utf-8", "surrogateescape"),
                           self._meta_headers(meta))
            self._invalidate(path)
            self._note_child(path, True)

    def readlink(self, path: str) -> str:
        attr = self.getattr(path)
        if not stat.S_ISLNK(attr.mode):
            raise InvalidName(f"{path} is not a symlink")
        key = self.key_of(path)
        info = self.store.head(key)
        if info.access != OPEN:
            raise KeyMismatch(path)
        return self.store.get_range(key, 0, info.size, info.key_fp).decode("utf-8", "surrogateescape")
