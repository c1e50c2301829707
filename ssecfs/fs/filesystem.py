"""The filesystem: the operations the FUSE adapter calls, over parts that each own one job and
its state:

  names.Names          paths <-> object keys
  meta.Metadata        attributes <-> object metadata, the mount's defaults
  files.OpenFiles      the files open or dirty (FileState) and their handles
  attrs.AttrCache      getattr and listings, and what is kept of them (prefetch.Prefetcher:
                       the lookups made ahead of the caller)
  reader.Reader        reads: cache, fetches, read-ahead
  writer.Writer        writes and truncates into the cache
  uploader.Uploader    dirty files to the store (write-back, multipart streams), fsync,
                       recovery after a crash
  namespace.Namespace  mkdir, rmdir, unlink, rename; the namespace lock
  orphans.Orphans      files unlinked while open, usable until their last close
  nodes.Nodes          symlinks, special files
  setattrs.SetAttrs    chmod, chown, utimens

The lock order is in files.py. This class only opens, creates and closes files (the file
table's life cycle) and hands every other operation to its part.
"""

from __future__ import annotations

import logging
import os
import stat
import time

from ..cache import CHUNK, Cache
from ..config import FsConfig
from ..errors import IsADirectory, KeyMismatch, TimedOut
from ..store.contract import LOCKED, PLAINTEXT, Store
from ..store.deferred import DeferredDeletes
from ..store.deljournal import DeleteJournal
from .attrs import AttrCache
from .files import FileState, OpenFiles, Remote
from .meta import Attr, Metadata, attr_from_meta
from .names import NAME_MAX, Names
from .namespace import Namespace
from .nodes import Nodes
from .orphans import Orphans
from .reader import Reader
from .setattrs import SetAttrs
from .uploader import Uploader
from .writer import Writer

log = logging.getLogger("ssecfs.fs")


class Filesystem:
    def __init__(self, store: Store, cache: Cache, config: FsConfig):
        # deletes return once journaled and go out in batches (store.deferred); recover()
        # takes up what an earlier daemon journaled
        self.deletes = DeferredDeletes(store, DeleteJournal(
            os.path.join(cache.dir, "deletes"), cache.sealers, cache.key_fp)) \
            if config.defer_deletes else None
        self.store = self.deletes or store
        self.cache = cache
        self.cfg = config
        self.names = Names(config.prefix)
        self.meta = Metadata(config)
        self.files = OpenFiles(cache)
        self.attrs = AttrCache(self.store, self.names, self.meta, self.files, config)
        self.dirindex = self.attrs.dirindex
        self.reader = Reader(self.store, cache, self.files, config)
        self.uploads = Uploader(self.store, cache, self.files, self.reader, self.attrs, config)
        self.writer = Writer(cache, self.files, self.reader, self.attrs, self.uploads.streams,
                             self.uploads.wb)
        self.orphans = Orphans(cache, self.files, self.reader, self.uploads.streams)
        self.ns = Namespace(self.store, cache, self.names, self.meta, self.files, self.attrs,
                            self.uploads, self.writer, config, self.orphans)
        self.nodes = Nodes(self.ns)
        self.setattrs = SetAttrs(self.ns)

    # -- attributes and listings ------------------------------------------------------------
    def getattr(self, path: str | None, fh: int | None = None, alias: str | None = None) -> Attr:
        """fh: of the file asked about (if given); alias: the path is the name an unlinked
        open file is known by (orphans.py), nothing of the bucket."""
        if alias is not None:
            return self.orphans.attr(self.orphans.by_alias(path, alias))
        st = self.files.handle_or_none(fh) if fh is not None else None
        if st is not None and (st.deleted or path is None):
            return self.orphans.attr(st)
        return self.attrs.getattr(path)

    def known_kind(self, path: str) -> int:
        return self.attrs.known_kind(path)

    def readdir(self, path: str):
        return self.attrs.readdir(path)

    # -- open files -------------------------------------------------------------------------
    def create(self, path: str, mode: int, uid: int | None = None, gid: int | None = None) -> int:
        """uid, gid: the creating process's (the FUSE request's; None: the mount's defaults)."""
        self.ns.check_writable()
        with self.ns.lock:
            if self.files.get(path) is not None:
                # O_CREAT on a file we have open/dirty: open it and truncate, like O_TRUNC
                fh = self.open(path, os.O_RDWR)
                self.truncate(path, 0, fh)
                return fh
            meta = self.ns.new_meta(path, stat.S_IFREG | (mode & 0o7777), uid, gid)
            st = FileState(path, self.names.key_of(path), meta)
            st.opens = st.writers = 1
            st.generation = st.data_generation = 1
            self.files.add(st)
            self.attrs.invalidate(path)
            self.attrs.note_child(path, True)
            return self.files.register(st, writer=True)

    def open(self, path: str, flags: int) -> int:
        writing = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND))
        if writing:
            self.ns.check_writable()
        with self.ns.lock:
            st = self.files.hold(path, writing, self._load_state)
            fh = self.files.register(st, writing)
        if flags & os.O_TRUNC:
            self.truncate(path, 0, fh)
        elif not writing:
            self.reader.prefetch_small(st)
            self.attrs.prefetch.follow_siblings(path)
        return fh

    def _load_state(self, path: str) -> FileState:
        key = self.names.key_of(path)
        info = self.attrs.take_info(path)        # looked up within the attribute timeout
        if info is None:
            info = self.attrs.head_keep_start(path, key)   # close-to-open: a fresh HEAD
        if info.access == LOCKED:
            log.warning("%s: no key of the ring opens this object (another key?)", path)
            raise KeyMismatch(path)
        if info.access == PLAINTEXT:
            log.warning("%s: object is stored without SSE-C (plaintext); refused", path)
            raise KeyMismatch(path)
        m = self.meta.of(info, stat.S_IFREG)
        if stat.S_ISDIR(m["mode"]):
            raise IsADirectory(path)
        st = FileState(path, key, m, info.size, Remote(key, info.etag, info.size, info.key_fp))
        st.entry = self.cache.lookup_clean(key, info.etag)
        data = self.attrs.take_start(path, info.etag)
        if data is not None and (st.entry is None or not st.entry.has(0)):
            # the lookup fetched the whole (small) object: cached and served like a fetch
            entry = self.files.entry_of(st)
            tag = (st.remote, st.trunc_epoch, st.data_generation)
            for off in range(0, len(data), CHUNK):
                piece = data[off:off + CHUNK]
                if entry.write_chunk(off // CHUNK, piece, dirty=False):
                    st.hot[off // CHUNK] = (tag, piece)
        self.files.add(st)
        self.attrs.set_attr(path, attr_from_meta(st.meta, st.size))
        return st

    def read(self, fh: int, size: int, offset: int, copy: bool = True) -> bytes:
        """Bytes [offset, offset + size) of the open file (fewer at its end). With copy=False
        the answer may be a memoryview of a fetched buffer (the FUSE adapter copies it into
        the kernel's reply buffer itself: one copy of each byte read less)."""
        return self.reader.read(self.files.handle(fh), size, offset, copy)

    def write(self, fh: int, data: bytes, offset: int) -> int:
        self.ns.check_writable()
        return self.writer.write(self.files.handle(fh), data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        self.ns.check_writable()
        if fh is not None:
            self.writer.truncate(self.files.handle(fh), length)
            return
        with self.ns.lock:
            st = self.files.hold(path, False, self._load_state)
        try:
            self.writer.truncate(st, length)
        finally:
            self.release(None, st=st)

    def flush(self, fh: int) -> None:
        self.uploads.persist_and_schedule(self.files.handle(fh))

    def fsync(self, fh: int) -> None:
        self.uploads.fsync(self.files.handle(fh))

    def release(self, fh: int | None, st: FileState | None = None) -> None:
        writer = False
        if st is None:
            st, writer = self.files.close_handle(fh)
            if st is None:
                return
        with st.lock:
            st.opens -= 1         # first: an upload that starts from here sees it closed
            st.writers -= writer
        try:
            self.uploads.persist_and_schedule(st)
        finally:
            with st.lock:
                self.orphans.release(st)
                self.uploads.forget_if_done(st)

    # -- the namespace ----------------------------------------------------------------------
    def mkdir(self, path: str, mode: int, uid: int | None = None, gid: int | None = None) -> None:
        self.ns.mkdir(path, mode, uid, gid)

    def rmdir(self, path: str) -> None:
        self.ns.rmdir(path)

    def unlink(self, path: str, alias: str | None = None) -> None:
        """A file still open stays usable through its handles until its last close, known
        by alias meanwhile (orphans.py)."""
        self.ns.unlink(path, alias)

    def rename(self, old: str, new: str) -> None:
        self.ns.rename(old, new)

    def symlink(self, path: str, target: str, uid: int | None = None,
                gid: int | None = None) -> None:
        self.nodes.symlink(path, target, uid, gid)

    def mknod(self, path: str, mode: int, rdev: int, uid: int | None = None,
              gid: int | None = None) -> None:
        """A regular file (made as by create, closed at once) or a special file."""
        if stat.S_ISREG(mode):
            self.release(self.create(path, mode, uid, gid))
        else:
            self.nodes.mknod(path, mode, rdev, uid, gid)

    def readlink(self, path: str) -> str:
        return self.nodes.readlink(path)

    # alias: path is the name a file unlinked while open is known by (orphans.py)
    def chmod(self, path: str, mode: int, caller=None, alias: str | None = None) -> None:
        self.setattrs.chmod(path, mode, caller, alias)

    def chown(self, path: str, uid: int, gid: int, caller=None, alias: str | None = None) -> None:
        self.setattrs.chown(path, uid, gid, caller, alias)

    def utimens(self, path: str, atime: float | None, mtime: float | None,
                alias: str | None = None) -> None:
        self.setattrs.utimens(path, atime, mtime, alias)

    def fsyncdir(self, path: str) -> None:
        """fsync() of a directory: the deletes under it are done when it returns."""
        if self.deletes is not None:
            if not self.deletes.flush(self.names.dir_key(path),
                                      timeout=self.cfg.fsync_timeout or None):
                raise TimedOut(f"{path}: deletes not done within --fsync-timeout")

    # -- the whole mount --------------------------------------------------------------------
    def statfs(self) -> dict:
        total = 1 << 50
        bs = 4096
        return {"f_bsize": bs, "f_frsize": bs, "f_blocks": total // bs, "f_bfree": total // bs,
                "f_bavail": total // bs, "f_files": 1 << 32, "f_ffree": 1 << 32,
                "f_favail": 1 << 32, "f_namemax": NAME_MAX}

    def dirty_files(self) -> list[FileState]:
        return self.files.dirty()

    def recover(self) -> int:
        """Re-adopt dirty files from the cache journal after a crash and queue their uploads;
        take up the deletes the delete journal holds."""
        if self.deletes is not None:
            self.deletes.recover()
        return self.uploads.recover()

    def flush_all(self, timeout: float | None = None, progress=None) -> bool:
        """Upload every dirty file now and wait, then for the deletes (unmount, SIGTERM)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.uploads.flush_all(timeout, progress):
            return False
        return self.deletes is None or self.deletes.flush(
            timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))

    def status(self) -> dict:
        return {**self.uploads.status(),
                **(self.deletes.status() if self.deletes is not None else {}),
                **self.cache.stats()}

    def shutdown(self) -> None:
        self.uploads.stop()
        if self.deletes is not None:
            self.deletes.close()
        self.attrs.stop()
        self.reader.stop()
        self.ns.stop()
