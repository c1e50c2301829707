"""The attribute cache: answers getattr and directory listings, from what it keeps when it
can, else from the store (a HEAD, a page of the listing), and keeps what comes back.

Consistency: every cache here lives for the attribute timeout at most, and every change made
through this mount updates or voids what it touches. `seq` counts our changes: a lookup's
answer is cached only if no change to its path (or a directory above it) happened while it
was on its way (`_changes`). `_name_changes` does the same per directory for listings (names
only: uploads of existing files do not void them).

Lock: `lock` guards every cache here and the Prefetcher's HEADs in flight (getattr must see a
cached answer and a HEAD on its way in one look). A leaf: nothing is called while holding it.
"""

from __future__ import annotations

import logging
import posixpath
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from cachetools import LRUCache, TTLCache

from ..errors import KeyMismatch, NotADirectory, NotFound, PermissionDenied
from ..store.contract import ObjectInfo, Store
from .changes import ChangeLog, PathChanges
from .dirindex import HEAL_MIN, INDEX_NAME, MAX_ENTRIES, DirIndexes
from .files import OpenFiles
from .meta import Attr, Metadata, attr_from_meta, index_attr_of
from .names import Names
from .prefetch import Prefetcher

log = logging.getLogger("ssecfs.fs")

LISTING_CACHE_MAX = 5000             # directories up to this size have their names cached
HEAD_WORKERS = 32                    # parallel HEADs of a readdir prefetch
LOOKUP_START = 16 * 1024             # a lookup fetches this much of the object with its attrs
STARTS_MAX = 32 * 1024 * 1024        # bytes of such starts kept for the open that follows


class AttrCache:
    def __init__(self, store: Store, names: Names, meta: Metadata, files: OpenFiles, config):
        self.store = store
        self.names = names
        self.meta = meta
        self.files = files
        self.lock = threading.Lock()
        ttl = max(config.attr_timeout, 0.001)
        # Directory attributes set through this mount. Some servers (SeaweedFS) drop the
        # metadata of "dir/" marker objects; the attributes then last as long as the mount.
        self._dir_meta: dict[str, dict] = {}
        self._attrs: TTLCache = TTLCache(maxsize=100_000, ttl=ttl)
        # Names in small directories (<= LISTING_CACHE_MAX entries), to answer lookups of
        # names that do not exist (create, editors' temp files) without two requests each.
        self._listings: TTLCache = TTLCache(maxsize=2_000, ttl=ttl)
        self._small_dirs: LRUCache = LRUCache(maxsize=10_000)
        self.seq = 0           # bumped by every change of ours (guards lookups in flight)
        self._changes = PathChanges(maxsize=100_000)   # which paths each change touched
        # Changes of names (create, unlink, rename, mkdir, rmdir) per directory: a listing
        # taken while a name of its directory changed is not cached. Uploads of files that
        # exist do not count, so a busy write-back does not void every listing.
        self._name_changes = ChangeLog(maxsize=10_000)
        # The last HEAD answer per path (ETag, key, metadata): an open within the attribute
        # timeout of a lookup uses it instead of asking again.
        self._infos: TTLCache = TTLCache(maxsize=20_000, ttl=ttl)
        # Small objects a lookup fetched whole (path -> (etag, bytes)): the open and read
        # that usually follow need no request. Bounded in bytes, same lifetime as _infos.
        self._starts: TTLCache = TTLCache(maxsize=STARTS_MAX, ttl=ttl,
                                          getsizeof=lambda v: len(v[1]) + 64)
        self.head_pool = ThreadPoolExecutor(max_workers=HEAD_WORKERS, thread_name_prefix="head")
        # Per-directory attribute indexes (dirindex.py): a cold `ls -l` without a HEAD per file.
        self.use_index = config.dir_index
        self.dirindex = DirIndexes(store, index_attr_of, self.head_pool,
                                   writable=config.dir_index and not config.read_only)
        self.prefetch = Prefetcher(self, store, names)

    @property
    def ttl(self) -> float:
        return self._attrs.ttl

    # -- what is kept (callers of peek / has_start hold lock) --------------------------------
    def peek(self, path: str):
        """The cached answer for path: an Attr, None (known absent), False (not cached)."""
        return self._attrs.get(path, False)

    def has_start(self, path: str) -> bool:
        return path in self._starts

    def set_attr(self, path: str, attr: Attr) -> None:
        with self.lock:
            self._attrs[path] = attr

    def cache_attr(self, path: str, attr: Attr | None, seq0: int, info=None) -> None:
        """Cache a lookup's answer, unless a change of ours happened while it was on its way
        (it could describe the object as it was before our own write/rename/unlink)."""
        with self.lock:
            if not self._changes.changed_since(path, seq0):
                self._attrs[path] = attr
                if info is not None:
                    self._infos[path] = info

    def take_info(self, path: str) -> ObjectInfo | None:
        """The HEAD answer for path a lookup got within the attribute timeout (waiting for a
        prefetch that is asking right now), for the open that follows; None if there is none."""
        with self.lock:
            pending = self.prefetch.heads.get(path)
        if pending is not None:
            try:
                pending.result()
            except Exception:  # noqa: BLE001 - then the caller asks itself
                pass
        with self.lock:
            return self._infos.pop(path, None)

    # -- changes of ours --------------------------------------------------------------------
    def invalidate(self, *paths: str) -> None:
        """A change of ours to paths: void what the caches say of them, and have the
        indexes of their directories written again."""
        with self.lock:
            self.seq += 1
            for p in paths:
                self._changes[p] = self.seq
                self._attrs.pop(p, None)
                self._infos.pop(p, None)
                self._starts.pop(p, None)
        if self.use_index:
            for p in paths:
                if p != "/":
                    self.dirindex.changed(Names.split_key(self.names.key_of(p))[0])

    def note_child(self, path: str, present: bool, changed: bool = True) -> None:
        """Keep cached listings true to our own creates and deletes. changed=False: the
        object itself did not change (a clean file forgotten at close), so lookups in flight
        stay valid (the open that follows a lookup then reuses its answer)."""
        parent, name = posixpath.split(path)
        with self.lock:
            if changed:
                self.seq += 1
                self._changes[path] = self.seq
                self._name_changes.note(parent or "/")
            names = self._listings.get(parent or "/")
            if names is not None:
                (names.add if present else names.discard)(name)
            if present:
                self._attrs.pop(path, None)

    def names_moved(self) -> None:
        """A directory was renamed: every listing kept may name old paths."""
        with self.lock:
            self._listings.clear()
            self._name_changes.note(None)

    def remember_dir_meta(self, path: str, meta: dict | None) -> None:
        """The attributes of directory path as set through this mount (None: forget them,
        and those of the directories below it)."""
        with self.lock:
            if meta is None:
                pfx = path.rstrip("/") + "/"
                for p in [p for p in self._dir_meta if p == path or p.startswith(pfx)]:
                    del self._dir_meta[p]
            else:
                self._dir_meta[path] = dict(meta)

    def dir_moved(self, old: str, new: str) -> None:
        """Directory old is now new: no attribute kept holds, the directory attributes set
        through this mount move with it."""
        opfx, npfx = old.rstrip("/") + "/", new.rstrip("/") + "/"
        with self.lock:
            self._attrs.clear()
            moved = {npfx + p[len(opfx):]: m for p, m in self._dir_meta.items()
                     if p.startswith(opfx)}
            if old in self._dir_meta:
                moved[new] = self._dir_meta[old]
        self.remember_dir_meta(old, None)
        with self.lock:
            self._dir_meta.update(moved)

    # -- answers of the server --------------------------------------------------------------
    def observe(self, key: str, info: ObjectInfo) -> None:
        """One answer of the server about key: material for its directory's index."""
        if self.use_index:
            self.dirindex.observe(*Names.split_key(key), info)

    def seed_from_index(self, idx: dict, batch: list, seq0: int) -> int:
        """Attributes of listed files from their directory's index or the answers this mount
        kept (entries matching the listing: dirindex.Entry.matches), cached like a HEAD's
        answer (the HEAD prefetch skips them while they last). Returns how many files had
        no usable entry."""
        seeds = []
        for path, key, o in batch:
            e = idx.get(Names.split_key(key)[1])
            if e is not None and e.matches(o):
                seeds.append((path, self.meta.attr_of_entry(e)))
        unseeded = len(batch)
        with self.lock:
            for path, a in seeds:
                # a file we changed while listing: trust a HEAD, not this
                if not self._changes.changed_since(path, seq0):
                    unseeded -= 1
                    if not self._attrs.get(path, False):
                        self._attrs[path] = a
        return unseeded

    # -- getattr ----------------------------------------------------------------------------
    def getattr(self, path: str) -> Attr:
        if path == "/":
            return self.meta.default_dir()
        self.names.check(path)               # before any "absent" a cache could answer
        if path.endswith("/" + INDEX_NAME):
            raise NotFound(path)             # reserved for the directory index (hidden)
        st = self.files.get(path)
        if st is not None:
            with st.lock:
                return attr_from_meta(st.meta, st.size)
        heads = self.prefetch.heads
        self.prefetch.follow(path)
        with self.lock:
            # both in one look: a prefetch caches its answer, then leaves heads; looked at
            # one after the other, one that ended in between was missed and asked again
            hit = self._attrs.get(path, False)
            pending = None if hit or hit is None else heads.get(path)
        if hit is None:
            raise NotFound(path)
        if hit:
            return hit
        while pending is not None:       # a readdir prefetch is fetching it right now
            try:
                pending.result()
            except Exception:  # noqa: BLE001 - fall back to our own lookup
                pass
            with self.lock:
                hit = self._attrs.get(path, False)
                again = heads.get(path)
            if hit:
                return hit
            # a listing page that did not vouch for it hands it on to a HEAD: wait for that
            pending = again if again is not pending else None
        with self.lock:
            seq0 = self.seq
        parent, name = posixpath.split(path)
        names = self.children(parent or "/")
        if names is not None and name not in names:
            self.cache_attr(path, None, seq0)
            raise NotFound(path)
        try:
            attr = self.lookup(path, seq0)
        except NotFound:
            self.cache_attr(path, None, seq0)
            raise
        self.cache_attr(path, attr, seq0)
        return attr

    def known_kind(self, path: str) -> int:
        """The file type bits (S_IFMT) of path when known without a request, else 0: the
        d_type of a directory entry, so that `rm -r`, `find` and `ls` need no stat for it."""
        st = self.files.get(path)
        if st is not None:
            return stat.S_IFMT(st.meta["mode"])
        with self.lock:
            a = self._attrs.get(path)
        return stat.S_IFMT(a.mode) if a else 0

    def is_dir(self, path: str) -> bool:
        try:
            return stat.S_ISDIR(self.getattr(path).mode)
        except NotFound:
            return False

    def lookup(self, path: str, seq0: int = -1) -> Attr:
        key = self.names.key_of(path)
        try:
            info = self.head_keep_start(path, key)
            attr = self.meta.attr_of_info(info)
            self.observe(key, info)
            with self.lock:
                if not self._changes.changed_since(path, seq0):
                    self._infos[path] = info
                else:
                    self._starts.pop(path, None)
            return attr
        except NotFound:
            pass
        return self._dir_attr(path)

    def head_keep_start(self, path: str, key: str) -> ObjectInfo:
        """HEAD, fetching a small object whole on the way (one ranged GET answers both);
        its bytes wait in _starts for the open that follows. Returns the info without them."""
        info = self.store.head_with_start(key, LOOKUP_START)
        if info.start is None:
            return info
        if 0 < info.size <= len(info.start):
            with self.lock:
                try:
                    self._starts[path] = (info.etag, info.start)
                except ValueError:            # larger than the whole budget: not kept
                    pass
        return replace(info, start=None)

    def take_start(self, path: str, etag: str) -> bytes | None:
        """The whole content of a small object a lookup fetched, if it is still that version."""
        with self.lock:
            got = self._starts.pop(path, None)
        return got[1] if got is not None and got[0] == etag else None

    def _dir_attr(self, path: str) -> Attr:
        if not self.names.can_be_dir(path):
            raise NotFound(path)             # a file's name may be that long, not a directory's
        with self.lock:
            m = self._dir_meta.get(path)
        if m is not None and self.dir_exists(path):
            return attr_from_meta(m, nlink=2)
        dkey = self.names.dir_key(path)
        for page in self.store.list_page_iter(dkey, delimiter="/", max_keys=1):
            if not page.objects and not page.prefixes:
                break
            if page.objects and page.objects[0].key == dkey:
                try:
                    m = self.meta.of(self.store.head(dkey), stat.S_IFDIR)
                    if stat.S_ISDIR(m["mode"]):
                        return attr_from_meta(m, nlink=2)
                except (NotFound, KeyMismatch, PermissionDenied):
                    pass
            return self.meta.default_dir(page.objects[0].mtime if page.objects else None)
        if self.files.any_below(path):
            return self.meta.default_dir()
        raise NotFound(path)

    def dir_exists(self, path: str) -> bool:
        dkey = self.names.dir_key(path)
        for page in self.store.list_page_iter(dkey, delimiter="/", max_keys=1):
            return bool(page.objects or page.prefixes) or self.files.any_below(path)
        return False

    # -- listings ---------------------------------------------------------------------------
    def children(self, d: str) -> set | None:
        """Names in directory d if it is small enough to cache (listed again when the cached
        copy is older than the attribute timeout), else None."""
        with self.lock:
            names = self._listings.get(d)
            small = d in self._small_dirs
            mark = self._name_changes.mark()
        if names is not None or not small:
            return names
        names = self.files.names_in(d)    # before listing: a file uploaded after this is listed
        dkey = self.names.dir_key(d)
        for page in self.store.list_page_iter(dkey, delimiter="/"):
            names.update(o.key[len(dkey):] for o in page.objects)
            names.update(p[len(dkey):].rstrip("/") for p in page.prefixes)
            if len(names) > LISTING_CACHE_MAX:
                with self.lock:
                    self._small_dirs.pop(d, None)
                return None
        names.discard("")
        with self.lock:
            if self._name_changes.changed_since(d, mark):
                return None       # changed under us: do not answer "absent" from this listing
        self.set_children(d, names)
        return names

    def set_children(self, d: str, names: set | None) -> None:
        with self.lock:
            if names is None or len(names) > LISTING_CACHE_MAX:
                self._listings.pop(d, None)
                self._small_dirs.pop(d, None)
            else:
                self._listings[d] = names
                self._small_dirs[d] = True

    def readdir(self, path: str):
        """Yields names; streams the listing page by page (bounded memory)."""
        if path != "/" and not self.is_dir(path):
            raise NotADirectory(path)
        dkey = self.names.dir_key(path)
        pfx = "/" if path == "/" else path.rstrip("/") + "/"
        local = self.files.names_in(path)
        with self.lock:
            mark = self._name_changes.mark()
            seq0 = self.seq
        yield "."
        yield ".."
        seen: set = set()
        state = {"complete": False, "index": None, "unindexed": 0}
        yield from self._list_pages(path, dkey, pfx, seen, seq0, state)
        with self.lock:
            complete = state["complete"] and not self._name_changes.changed_since(path, mark)
        if complete:
            self.set_children(path, (seen | local) if len(seen) <= LISTING_CACHE_MAX else None)
            if state["unindexed"] >= HEAL_MIN and len(seen) <= MAX_ENTRIES:
                self.dirindex.changed(dkey, ours=False)   # index what the HEADs now see
        for name in sorted(local - seen):
            yield name

    def _list_pages(self, path: str, dkey: str, pfx: str, seen: set, seq0: int, state: dict):
        """The names of readdir(path), page by page; each page's files seeded from the
        directory's index and handed to the HEAD prefetch."""
        for page_no, page in enumerate(self.store.list_page_iter(dkey, delimiter="/")):
            batch = []
            for o in page.objects:
                name = o.key[len(dkey):]
                if not self.names.listable(name):
                    continue            # the directory's own marker, its index...
                seen.add(name)
                if len(seen) <= LISTING_CACHE_MAX:
                    batch.append((pfx + name, o.key, o))
                elif len(seen) == LISTING_CACHE_MAX + 1:
                    self.prefetch.note_big_dir(path, dkey)
            if self.use_index and state["index"] is None:
                # one GET for the attrs of many files (none if the listing shows no index,
                # or the same one as last time)
                state["index"] = self.dirindex.for_listing(dkey, page.objects)
            index = state["index"]
            state["unindexed"] += (self.seed_from_index(index, batch, seq0)
                                   if index is not None else len(batch))
            self.prefetch.listed(path, batch, first=page_no == 0)
            for o in page.objects:
                name = o.key[len(dkey):]
                if self.names.listable(name):
                    yield name
            for p in page.prefixes:
                name = p[len(dkey):].rstrip("/")
                if self.names.listable(name) and name not in seen:
                    seen.add(name)
                    yield name
        state["complete"] = True

    def stop(self) -> None:
        self.dirindex.stop()
        self.head_pool.shutdown(wait=False, cancel_futures=True)
