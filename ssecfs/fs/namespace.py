"""The namespace: names and directories (mkdir, rmdir, unlink, rename), and what every new
entry shares (new_meta, put_new; nodes.Nodes makes symlinks, setattrs.SetAttrs changes
attributes, both under this lock).

`lock` (the namespace lock, first in the lock order of files.py) serialises namespace changes
and the opens and creates of the Filesystem, so that they see a stable table of open files.
A namespace change of a file first holds its uploads and waits for one in flight, without the
lock (`_idle_uploads`): a stuck upload delays only the operation on its own file.

Ownership: a new file, directory, symlink or special file belongs to the process that makes
it (the FUSE adapter passes its uid and gid), with the group of a set-group-ID parent.
"""

from __future__ import annotations

import logging
import posixpath
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from ..cache import Cache
from ..errors import (Exists, InvalidName, IsADirectory, KeyMismatch, NotADirectory, NotEmpty,
                      NotFound, NotSupported, PermissionDenied, ReadOnly)
from ..store.contract import OPEN, Store, delete_tree
from .attrs import AttrCache
from .dirindex import INDEX_NAME
from .files import OpenFiles
from .meta import Metadata, attr_from_meta, meta_headers, now
from .names import Names
from .orphans import Orphans
from .uploader import Uploader
from .writer import Writer

log = logging.getLogger("ssecfs.fs")

COPY_WORKERS = 16                    # copies after a HEAD in flight when a directory is renamed
COPY_BATCH = 1000                    # copies of a renamed directory sent at once


@dataclass(eq=False, repr=False)
class Namespace:
    store: Store
    cache: Cache
    names: Names
    meta: Metadata
    files: OpenFiles
    attrs: AttrCache
    uploads: Uploader
    writer: Writer
    cfg: object                               # FsConfig
    orphans: Orphans
    lock: threading.RLock = field(default_factory=threading.RLock, init=False)
    _copy_pool: ThreadPoolExecutor = field(init=False, default_factory=lambda: ThreadPoolExecutor(
        max_workers=COPY_WORKERS, thread_name_prefix="copy"))

    def check_writable(self) -> None:
        if self.cfg.read_only:
            raise ReadOnly("read-only mount")

    def _exists(self, path: str) -> bool:
        try:
            self.attrs.getattr(path)
            return True
        except NotFound:
            return False

    def check_parent(self, path: str) -> None:
        parent = posixpath.dirname(path) or "/"
        if parent != "/" and not self.attrs.is_dir(parent):
            raise NotFound(parent)

    def new_meta(self, path: str, mode: int, uid: int | None, gid: int | None) -> dict:
        """Metadata of a new entry at path: owned by uid, gid (the creating process's; None:
        the mount's defaults). In a set-group-ID directory the group is the directory's, and
        a new directory is set-group-ID too (as Linux does)."""
        meta = self.meta.default(mode)
        if uid is not None:
            meta["uid"] = uid
        if gid is not None:
            meta["gid"] = gid
        try:
            parent = self.attrs.getattr(posixpath.dirname(path) or "/")
        except NotFound:
            return meta
        if parent.mode & stat.S_ISGID:
            meta["gid"] = parent.gid
            if stat.S_ISDIR(mode):
                meta["mode"] |= stat.S_ISGID
        return meta

    def put_new(self, path: str, key: str, body: bytes, mode: int, uid: int | None,
                 gid: int | None, rdev: int = 0) -> dict:
        """Caller holds lock. Store a new directory marker, symlink or special file for path,
        which must not exist; its metadata."""
        if self._exists(path):
            raise Exists(path)
        self.check_parent(path)
        meta = self.new_meta(path, mode, uid, gid)
        if rdev:
            meta["rdev"] = rdev
        self.store.put(key, body, meta_headers(meta))
        return meta

    def mkdir(self, path: str, mode: int, uid: int | None = None, gid: int | None = None) -> None:
        self.check_writable()
        with self.lock:
            meta = self.put_new(path, self.names.dir_key(path), b"",
                                 stat.S_IFDIR | (mode & 0o7777), uid, gid)
            self.attrs.remember_dir_meta(path, meta)
            self.attrs.invalidate(path)
            self.attrs.note_child(path, True)
            self.attrs.set_children(path, set())
            self.attrs.set_attr(path, attr_from_meta(meta, nlink=2))

    def rmdir(self, path: str) -> None:
        self.check_writable()
        with self.lock:
            attr = self.attrs.getattr(path)
            if not stat.S_ISDIR(attr.mode):
                raise NotADirectory(path)
            dkey = self.names.dir_key(path)
            if self.files.any_below(path):
                raise NotEmpty(path)
            ikey = dkey + INDEX_NAME
            for page in self.store.list_page_iter(dkey, delimiter=None, max_keys=3):
                if any(o.key not in (dkey, ikey) for o in page.objects):
                    raise NotEmpty(path)
            self.attrs.dirindex.forget(dkey)
            for k in (ikey, dkey):
                try:
                    self.store.delete(k)
                except NotFound:
                    pass
            self.attrs.remember_dir_meta(path, None)
            self.attrs.invalidate(path)
            self.attrs.note_child(path, False)
            self.attrs.set_children(path, None)

    # ===================================================================== unlink / rename
    def _idle_uploads(self, *paths: str):
        """Hold the uploads of the files at paths (and under them, for directories) and wait,
        WITHOUT the namespace lock, for those in flight to end: a stuck upload then delays
        only the operation on its own file, not every namespace operation of the mount.
        Returns the held states (release with _release_uploads)."""
        held = self.files.under(*paths)
        for st in held:
            self.uploads.wb.hold(st)
        for st in held:
            self.uploads.wb.wait_idle(st)
        return held

    def _release_uploads(self, held) -> None:
        for st in held:
            self.uploads.wb.unhold(st)

    def unlink(self, path: str, alias: str | None = None) -> None:
        """A file still open lives on until its last close, known by alias (orphans.py)."""
        self.check_writable()
        held = self._idle_uploads(path)
        try:
            with self.orphans.preparing(self.files.get(path)):
                self._unlink(path, alias)
        finally:
            self._release_uploads(held)

    def _unlink(self, path: str, alias: str | None) -> None:
        with self.lock:
            attr = self.attrs.getattr(path)
            if stat.S_ISDIR(attr.mode):
                raise IsADirectory(path)
            self.drop_state(path, alias)
            try:
                self.store.delete(self.names.key_of(path))
            except NotFound:
                pass
            self.attrs.invalidate(path)
            self.attrs.note_child(path, False)

    def drop_state(self, path: str, alias: str | None = None) -> None:
        """Caller holds lock. Forget a file's local state for good (unlinked/replaced), before
        its object goes; a file still open is kept as an orphan until its last close."""
        self.cache.discard_key(self.names.key_of(path))      # its clean cached versions too
        st = self.files.get(path)
        if st is None:
            return
        self.uploads.wb.quiesce(st)
        if self.orphans.keep(st, path, alias):
            return
        with st.lock:
            st.dropped()
            self.uploads.streams.drop(st, "unlinked", for_good=True)
            if st.entry is not None:
                self.cache.discard(st.entry)
                st.entry = None
        self.files.discard(st, path)

    def rename(self, old: str, new: str) -> None:
        self.check_writable()
        if old == new:
            return
        held = self._idle_uploads(old, new)
        try:
            with self.orphans.preparing(self.files.get(new)):
                self._rename(old, new)
        finally:
            self._release_uploads(held)

    def _rename(self, old: str, new: str) -> None:
        with self.lock:
            a = self.attrs.getattr(old)
            if (new + "/").startswith(old.rstrip("/") + "/") and stat.S_ISDIR(a.mode):
                raise InvalidName("cannot move a directory into itself")
            try:
                b = self.attrs.getattr(new)
            except NotFound:
                b = None
                self.check_parent(new)
            if stat.S_ISDIR(a.mode):
                self._check_keys_fit(old, new)
                if b is not None:
                    if not stat.S_ISDIR(b.mode):
                        raise NotADirectory(new)
                    self.rmdir(new)          # raises NotEmpty unless empty
                self._rename_dir(old, new)
            else:
                if b is not None and stat.S_ISDIR(b.mode):
                    raise IsADirectory(new)
                self._rename_file(old, new, replacing=b is not None)
            self.attrs.invalidate(old, new)
            if stat.S_ISDIR(a.mode):
                self.attrs.names_moved()
            else:
                self.attrs.note_child(old, False)
                self.attrs.note_child(new, True)

    def _rename_file(self, old: str, new: str, replacing: bool) -> None:
        okey, nkey = self.names.key_of(old), self.names.key_of(new)
        if replacing:
            self.drop_state(new)
        st = self.files.get(old)
        if st is None:
            info = self.store.head(okey)
            if info.access != OPEN:
                raise KeyMismatch(old)
            self.store.copy(okey, nkey, info.size, info.metadata, info.key_fp)
            self.store.delete(okey)
            return
        requeue = self.uploads.wb.quiesce(st)
        try:
            with st.lock:
                st.meta["ctime"] = now()
                remote = st.remote
                if remote is not None and remote.key == okey:
                    meta = meta_headers(st.meta)
                    info = self.store.copy(okey, nkey, remote.size, meta, remote.key_fp)
                    st.set_remote(replace(remote, key=nkey, etag=info.etag, key_fp=info.key_fp))
                    self.store.delete(okey)
                self.files.move(st, old, new)
                st.path, st.key = new, nkey
                self.uploads.streams.drop(st, "renamed")
                if st.entry is not None and not st.dirty and st.remote is not None:
                    self.cache.index_clean(st.entry, nkey, st.remote.etag)
                if st.dirty and st.entry is not None:
                    st.entry.save_state(st.journal())
        finally:
            # whatever happened, a dirty file goes back in the upload queue
            if st.dirty or requeue:
                self.uploads.wb.schedule(st, 0 if requeue else None)

    def _check_keys_fit(self, old: str, new: str) -> None:
        """NameTooLong unless every key under directory old fits under new (S3's limit),
        before anything changes (a target directory is removed first)."""
        opfx, npfx = old.rstrip("/") + "/", new.rstrip("/") + "/"
        if len(npfx.encode("utf-8", "surrogateescape")) <= \
                len(opfx.encode("utf-8", "surrogateescape")):
            return
        for st in self.files.below(old):
            self.names.check(npfx + st.path[len(opfx):])
        okey, nkey = self.names.dir_key(old), self.names.dir_key(new)
        for page in self.store.list_page_iter(okey, delimiter=None):
            for o in page.objects:
                if not o.key.endswith("/" + INDEX_NAME):
                    self.names.check_key(nkey + o.key[len(okey):])

    def _rename_dir(self, old: str, new: str) -> None:
        okey, nkey = self.names.dir_key(old), self.names.dir_key(new)
        opfx, npfx = old.rstrip("/") + "/", new.rstrip("/") + "/"
        local = self.files.below(old)
        for st in local:
            self.uploads.wb.quiesce(st)
        try:
            self.attrs.dirindex.forget(okey)
            copied = self._copy_tree(okey, nkey)
            for st in local:
                self._move_state(st, opfx, npfx, okey, nkey, copied)
        finally:
            for st in local:
                if st.dirty and not st.deleted:
                    self.uploads.wb.schedule(st, 0)
        self.attrs.dir_moved(old, new)
        if self.attrs.use_index:
            self.attrs.dirindex.changed(nkey)

    def _copy_tree(self, okey: str, nkey: str) -> dict:
        """Copy every object under okey to nkey (in parallel), then delete the old ones.
        Returns {old key: ObjectInfo of the copy}. If any copy fails, the copies already made
        are deleted again (the source tree is untouched) and the error is raised."""
        objs: list[str] = []
        batch: list = []
        copied: dict = {}
        try:
            for page in self.store.list_page_iter(okey, delimiter=None):
                for o in page.objects:
                    objs.append(o.key)
                    if o.key.endswith("/" + INDEX_NAME):
                        continue          # indexes are not carried over (copies are new versions)
                    self.names.check_key(nkey + o.key[len(okey):])   # else: undo, refuse
                    batch.append((o.key, nkey + o.key[len(okey):], o.size))
                    if len(batch) >= COPY_BATCH:
                        self._copy_batch(batch, copied)
                        batch = []
            self._copy_batch(batch, copied)
            if okey not in copied:
                # no marker: make one so an empty directory survives the move; without
                # metadata, like the directory it replaces (the mount's defaults)
                copied[okey] = self.store.put(nkey, b"", {})
        except BaseException:
            made = [info.key for info in copied.values() if info is not None]
            log.warning("moving %r failed; removing the %d copies already made", okey, len(made))
            try:
                delete_tree(self.store, made, nkey)
            except Exception:  # noqa: BLE001 - the original error is what matters
                log.error("could not remove partial copies under %r", nkey)
            raise
        delete_tree(self.store, objs, okey)
        return copied

    def _move_state(self, st, opfx: str, npfx: str, okey: str, nkey: str, copied: dict) -> None:
        with st.lock:
            p = st.path
            np_ = npfx + p[len(opfx):]
            self.files.move(st, p, np_)
            st.path, st.key = np_, self.names.key_of(np_)
            r = st.remote
            if r is not None and r.key.startswith(okey):
                info = copied.get(r.key)
                # (None: its object was not there any more: nothing to fetch from)
                st.set_remote(replace(r, key=info.key, etag=info.etag, key_fp=info.key_fp)
                              if info is not None else None)
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

    def _copy_batch(self, items: list, copied: dict) -> None:
        """Copy items (src, dst, size) into copied {src: ObjectInfo}: the files in one go, one
        request each and all at once (most are under the current key: Store.copy_as_is_many),
        directory markers and the files that turn out to be under an older key (or too big)
        after a HEAD each (_move_copy), in parallel. Every copy made is in copied before the
        first error is raised (the caller's rollback removes them)."""
        files = [i for i in items if not i[0].endswith("/")]
        slow = [i for i in items if i[0].endswith("/")]
        first = None
        for item, r in zip(files, self.store.copy_as_is_many(files)):
            if isinstance(r, (KeyMismatch, PermissionDenied, NotSupported)):
                slow.append(item)
            elif isinstance(r, Exception):
                first = first or r
            else:
                copied[item[0]] = r
        self._drain({src: self._copy_pool.submit(self._move_copy, src, dst)
                     for src, dst, _size in slow}, copied)
        if first is not None:
            raise first

    def _move_copy(self, src: str, dst: str):
        """Copy one object, with the key and metadata a HEAD of it shows."""
        info = self.store.head(src)
        if src.endswith("/") and info.size == 0:
            # a directory marker, made anew under our key: it must not make metadata that
            # no key vouched for (a plaintext marker's owner, mode 0777) trusted
            return self.store.put(dst, b"", info.metadata if info.access == OPEN else {})
        if info.access != OPEN:
            raise KeyMismatch(src)
        return self.store.copy(src, dst, info.size, info.metadata, info.key_fp)

    def stop(self) -> None:
        self._copy_pool.shutdown(wait=False, cancel_futures=True)
