"""Attributes of files and directories: how they are kept in object metadata, and the caches
that answer lookups without a request (attributes, directory listings, HEAD answers, the
readdir HEAD prefetch). A mixin of fs.Filesystem (same object, same locks: see the lock order
in fs.py); split out to keep modules small.

Metadata (s3fs-compatible): mode, uid, gid, mtime, ctime as decimal strings. It is believed
only of objects a key of the ring opens (`_meta_of`): anyone who may write to the bucket can
store an object without SSE-C, or under another key, with any metadata. What an object lacks,
or may not claim, is the mount's default (FsConfig uid, gid, file_mode, dir_mode) and its
Last-Modified; the root and directories without a marker get the defaults too.

Consistency: every cache here lives for the attribute timeout at most, and every change made
through this mount updates or voids what it touches. `_seq` counts our changes: a lookup's
answer is cached only if no change to its path (or a directory above it) happened while it
was on its way (`_changes`). `_name_changes` does the
same per directory for listings (names only: uploads of existing files do not void them).
"""

from __future__ import annotations

import logging
import posixpath
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

from cachetools import LRUCache, TTLCache

from ..config import ID_MAX
from .dirindex import HEAL_MIN, INDEX_NAME, DirIndexes
from ..errors import KeyMismatch, NotFound, PermissionDenied, StoreUnavailable
from ..store.contract import OPEN, ObjectInfo

log = logging.getLogger("ssecfs.fs")

LISTING_CACHE_MAX = 5000             # directories up to this size have their names cached
HEAD_WORKERS = 32                    # parallel HEADs of a readdir prefetch
PREFETCH_AHEAD = 256                 # HEADs a readdir prefetch runs ahead of the getattrs
HEAD_BATCH = 64                      # HEADs one prefetch task sends at once (head_many)
WINDOW = 1000                        # names one listing page checks against known answers
BIG_MISSES = 3                       # lookups in a row that make a big directory's pages start
LOOKUP_START = 16 * 1024             # a lookup fetches this much of the object with its attrs
STARTS_MAX = 32 * 1024 * 1024        # bytes of such starts kept for the open that follows
SIBLINGS_AHEAD = 32                  # files looked up ahead of a reader going in listing order


@dataclass
class Attr:
    mode: int
    size: int
    mtime: float
    ctime: float
    uid: int
    gid: int
    nlink: int = 1


def _now() -> float:
    return time.time()


def _fmt_time(t: float) -> str:
    s = f"{t:.9f}".rstrip("0").rstrip(".")
    return s or "0"


class _Stamps(LRUCache):
    """Name -> stamp of its last change. A name that fell out of the LRU counts as changed
    at the newest stamp evicted (`_floor`: never "unchanged" wrongly). Callers hold
    Filesystem._attr_lock."""

    def __init__(self, maxsize: int):
        super().__init__(maxsize=maxsize)
        self._floor = 0

    def popitem(self):
        key, stamp = super().popitem()
        self._floor = max(self._floor, stamp)
        return key, stamp


class _ChangeLog(_Stamps):
    """Directory -> stamp of its last name change, from one counter of its own."""

    def __init__(self, maxsize: int):
        super().__init__(maxsize=maxsize)
        self._clock = 0

    def mark(self) -> int:
        return self._clock

    def note(self, d: str | None = None) -> None:
        """A name in d changed (d=None: names anywhere, e.g. a directory rename)."""
        self._clock += 1
        if d is None:
            self._floor = self._clock
        else:
            self[d] = self._clock

    def changed_since(self, d: str, mark: int) -> bool:
        return max(self.get(d, 0), self._floor) > mark


class _PathChanges(_Stamps):
    """Path -> stamp (Filesystem._seq) of the last change of ours to it. An answer about a
    path asked at stamp seq0 is stale if the path, or a directory above it (a rename or
    removal changes every name under it), changed since; a change of another file does not
    touch it (`rm -r` unlinks one file while the next ones are being looked up)."""

    def changed_since(self, path: str, seq0: int) -> bool:
        if self._floor > seq0:
            return True
        while True:
            if self.get(path, 0) > seq0:
                return True
            if path in ("/", ""):
                return False
            path = posixpath.dirname(path)


class AttrOps:
    """Mixin for Filesystem: getattr and the attribute/listing caches."""

    def _init_attrs(self, config) -> None:
        self._attr_lock = threading.Lock()
        # Directory attributes set through this mount. Some servers (SeaweedFS) drop the
        # metadata of "dir/" marker objects; the attributes then last as long as the mount.
        self._dir_meta: dict[str, dict] = {}
        self._attrs: TTLCache = TTLCache(maxsize=100_000, ttl=max(config.attr_timeout, 0.001))
        # Names in small directories (<= LISTING_CACHE_MAX entries), to answer lookups of
        # names that do not exist (create, editors' temp files) without two requests each.
        self._listings: TTLCache = TTLCache(maxsize=2_000, ttl=max(config.attr_timeout, 0.001))
        self._small_dirs: LRUCache = LRUCache(maxsize=10_000)
        self._heads: dict[str, Future] = {}          # HEADs in flight (readdir prefetch)
        # Per listed directory: its names in listing order and how far the HEAD prefetch
        # went. Prefetch runs PREFETCH_AHEAD names ahead of the getattr calls that follow a
        # readdir (`ls -l`), so answers are fresh (well within the attribute timeout) when
        # they are used, and a reader that stops early costs few requests.
        self._prefetch_runs: LRUCache = LRUCache(maxsize=64)
        # Directories listed with more names than a prefetch run holds (LISTING_CACHE_MAX):
        # the names past those are asked a page of the listing at a time (_big_follow).
        self._big_dirs: LRUCache = LRUCache(maxsize=64)
        self._sibling_opens: LRUCache = LRUCache(maxsize=64)   # opens per unlisted directory
        self._seq = 0          # bumped by every change of ours (guards lookups in flight)
        self._changes = _PathChanges(maxsize=100_000)   # which paths each change touched
        # Changes of names (create, unlink, rename, mkdir, rmdir) per directory: a listing
        # taken while a name of its directory changed is not cached. Uploads of files that
        # exist do not count, so a busy write-back does not void every listing.
        self._name_changes = _ChangeLog(maxsize=10_000)
        # The last HEAD answer per path (ETag, key, metadata): an open within the attribute
        # timeout of a lookup uses it instead of asking again.
        self._infos: TTLCache = TTLCache(maxsize=20_000, ttl=max(config.attr_timeout, 0.001))
        # Small objects a lookup fetched whole (path -> (etag, bytes)): the open and read
        # that usually follow need no request. Bounded in bytes, same lifetime as _infos.
        self._starts: TTLCache = TTLCache(maxsize=STARTS_MAX, ttl=max(config.attr_timeout, 0.001),
                                          getsizeof=lambda v: len(v[1]) + 64)
        self._head_pool = ThreadPoolExecutor(max_workers=HEAD_WORKERS, thread_name_prefix="head")
        # Per-directory attribute indexes (dirindex.py): a cold `ls -l` without a HEAD per file.
        self._use_index = config.dir_index
        self.dirindex = DirIndexes(self.store, self._index_attr_of, self._head_pool,
                                   writable=config.dir_index and not config.read_only)

    def _default_meta(self, mode: int) -> dict:
        t = _now()
        return {"mode": mode, "uid": self.uid, "gid": self.gid, "mtime": t, "ctime": t}

    def _default_mode(self, kind: int) -> int:
        """The mode of what carries none we trust: kind is stat.S_IFREG or stat.S_IFDIR."""
        return kind | (self.dir_mode if kind == stat.S_IFDIR else self.file_mode)

    @staticmethod
    def _own_meta(info: ObjectInfo, kind: int) -> dict:
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
                           ("ctime", float)):
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
        return own

    def _meta_of(self, info: ObjectInfo, kind: int) -> dict:
        """mode, uid, gid, mtime, ctime of an object: what its metadata sets (_own_meta),
        the rest the mount's defaults and the object's Last-Modified (set by the server)."""
        own = self._own_meta(info, kind)
        mtime = own.get("mtime", info.mtime)
        return {"mode": own.get("mode", self._default_mode(kind)),
                "uid": own.get("uid", self.uid), "gid": own.get("gid", self.gid),
                "mtime": mtime, "ctime": own.get("ctime", mtime)}

    def _index_attr_of(self, info: ObjectInfo) -> Attr:
        """An object's attributes as a directory index keeps them: mode, uid and gid -1 where
        the object sets none (each mount that reads the index applies its own defaults)."""
        own = self._own_meta(info, stat.S_IFREG)
        mtime = own.get("mtime", info.mtime)
        return Attr(mode=own.get("mode", -1), size=info.size, mtime=mtime,
                    ctime=own.get("ctime", mtime), uid=own.get("uid", -1),
                    gid=own.get("gid", -1))

    def _attr_of_entry(self, e) -> Attr:
        """The attributes of a file from an index entry (dirindex.Entry; -1: our default)."""
        return Attr(e.mode if e.mode != -1 else self._default_mode(stat.S_IFREG), e.size,
                    e.mtime, e.ctime, e.uid if e.uid != -1 else self.uid,
                    e.gid if e.gid != -1 else self.gid)

    @staticmethod
    def _meta_headers(meta: dict) -> dict:
        return {"mode": str(int(meta["mode"])), "uid": str(int(meta["uid"])),
                "gid": str(int(meta["gid"])), "mtime": _fmt_time(meta["mtime"]),
                "ctime": _fmt_time(meta["ctime"])}

    @staticmethod
    def _attr_from_meta(m: dict, size: int = 0, nlink: int = 1) -> Attr:
        return Attr(mode=m["mode"], size=size, mtime=m["mtime"], ctime=m["ctime"],
                    uid=m["uid"], gid=m["gid"], nlink=nlink)

    def _attr_of_state(self, st) -> Attr:
        m = st.meta
        return Attr(mode=m["mode"], size=st.size, mtime=m["mtime"], ctime=m["ctime"],
                    uid=m["uid"], gid=m["gid"])

    def _invalidate(self, *paths: str) -> None:
        """A change of ours to paths: void what the caches say of them, and have the
        indexes of their directories written again."""
        with self._attr_lock:
            self._seq += 1
            for p in paths:
                self._changes[p] = self._seq
                self._attrs.pop(p, None)
                self._infos.pop(p, None)
                self._starts.pop(p, None)
        if self._use_index:
            for p in paths:
                if p != "/":
                    self.dirindex.changed(self._dkey_name(self.key_of(p))[0])

    @staticmethod
    def _dkey_name(key: str) -> tuple[str, str]:
        """An object key as (its directory's key, its name)."""
        i = key.rfind("/")
        return key[:i + 1], key[i + 1:]

    def _observe(self, key: str, info: ObjectInfo) -> None:
        """One answer of the server about key: material for its directory's index."""
        if self._use_index:
            self.dirindex.observe(*self._dkey_name(key), info)

    def _seed_from_index(self, idx: dict, batch: list, seq0: int) -> int:
        """Attributes of listed files from their directory's index or the answers this mount
        kept (entries matching the listing: dirindex.Entry.matches), cached like a HEAD's
        answer (the HEAD prefetch skips them while they last). Returns how many files had
        no usable entry."""
        seeds = []
        for path, key, o in batch:
            e = idx.get(self._dkey_name(key)[1])
            if e is not None and e.matches(o):
                seeds.append((path, self._attr_of_entry(e)))
        unseeded = len(batch)
        with self._attr_lock:
            for path, a in seeds:
                # a file we changed while listing: trust a HEAD, not this
                if not self._changes.changed_since(path, seq0):
                    unseeded -= 1
                    if not self._attrs.get(path, False):
                        self._attrs[path] = a
        return unseeded

    def getattr(self, path: str) -> Attr:
        if path == "/":
            return Attr(mode=self._default_mode(stat.S_IFDIR), size=0, mtime=self.mount_time,
                        ctime=self.mount_time, uid=self.uid, gid=self.gid, nlink=2)
        if path.endswith("/" + INDEX_NAME):
            raise NotFound(path)             # reserved for the directory index (hidden)
        st = self._state(path)
        if st is not None:
            with st.lock:
                return self._attr_of_state(st)
        self._prefetch_follow(path)
        with self._attr_lock:
            # both in one look: a prefetch caches its answer, then leaves _heads; looked at
            # one after the other, one that ended in between was missed and asked again
            hit = self._attrs.get(path, False)
            pending = None if hit or hit is None else self._heads.get(path)
        if hit is None:
            raise NotFound(path)
        if hit:
            return hit
        while pending is not None:       # a readdir prefetch is fetching it right now
            try:
                pending.result()
            except Exception:  # noqa: BLE001 - fall back to our own lookup
                pass
            with self._attr_lock:
                hit = self._attrs.get(path, False)
                again = self._heads.get(path)
            if hit:
                return hit
            # a listing page that did not vouch for it hands it on to a HEAD: wait for that
            pending = again if again is not pending else None
        with self._attr_lock:
            seq0 = self._seq
        parent, name = posixpath.split(path)
        names = self._children(parent or "/")
        if names is not None and name not in names:
            self._cache_attr(path, None, seq0)
            raise NotFound(path)
        try:
            attr = self._lookup(path, seq0)
        except NotFound:
            self._cache_attr(path, None, seq0)
            raise
        self._cache_attr(path, attr, seq0)
        return attr

    def known_kind(self, path: str) -> int:
        """The file type bits (S_IFMT) of path when known without a request, else 0: the
        d_type of a directory entry, so that `rm -r`, `find` and `ls` need no stat for it."""
        st = self._state(path)
        if st is not None:
            return stat.S_IFMT(st.meta["mode"])
        with self._attr_lock:
            a = self._attrs.get(path)
        return stat.S_IFMT(a.mode) if a else 0

    def _cache_attr(self, path: str, attr: Attr | None, seq0: int, info=None) -> None:
        """Cache a lookup's answer, unless a change of ours happened while it was on its way
        (it could describe the object as it was before our own write/rename/unlink)."""
        with self._attr_lock:
            if not self._changes.changed_since(path, seq0):
                self._attrs[path] = attr
                if info is not None:
                    self._infos[path] = info

    def _children(self, d: str) -> set | None:
        """Names in directory d if it is small enough to cache (listed again when the cached
        copy is older than the attribute timeout), else None."""
        with self._attr_lock:
            names = self._listings.get(d)
            small = d in self._small_dirs
            mark = self._name_changes.mark()
        if names is not None or not small:
            return names
        pfx = d.rstrip("/") + "/"
        with self._files_lock:        # before listing: a file uploaded after this is listed
            names = {p[len(pfx):] for p in self._files
                     if p.startswith(pfx) and "/" not in p[len(pfx):]}
        dkey = self.prefix if d == "/" else self.dir_key(d)
        for page in self.store.list_page_iter(dkey, delimiter="/"):
            names.update(o.key[len(dkey):] for o in page.objects)
            names.update(p[len(dkey):].rstrip("/") for p in page.prefixes)
            if len(names) > LISTING_CACHE_MAX:
                with self._attr_lock:
                    self._small_dirs.pop(d, None)
                return None
        names.discard("")
        with self._attr_lock:
            if self._name_changes.changed_since(d, mark):
                return None       # changed under us: do not answer "absent" from this listing
        self._set_children(d, names)
        return names

    def _set_children(self, d: str, names: set | None) -> None:
        with self._attr_lock:
            if names is None or len(names) > LISTING_CACHE_MAX:
                self._listings.pop(d, None)
                self._small_dirs.pop(d, None)
            else:
                self._listings[d] = names
                self._small_dirs[d] = True

    def _note_child(self, path: str, present: bool, changed: bool = True) -> None:
        """Keep cached listings true to our own creates and deletes. changed=False: the
        object itself did not change (a clean file forgotten at close), so lookups in flight
        stay valid (the open that follows a lookup then reuses its answer)."""
        parent, name = posixpath.split(path)
        with self._attr_lock:
            if changed:
                self._seq += 1
                self._changes[path] = self._seq
                self._name_changes.note(parent or "/")
            names = self._listings.get(parent or "/")
            if names is not None:
                (names.add if present else names.discard)(name)
            if present:
                self._attrs.pop(path, None)

    def _prefetch_attrs(self, d: str, paths_keys: list, first: bool) -> None:
        """Parallel HEADs for the names of a listing, so that `ls -l` is not one round trip
        per file; getattr of a name being fetched waits for it instead of asking again.
        Only the first PREFETCH_AHEAD are asked now; getattr of a listed name moves the
        window on (_prefetch_follow)."""
        with self._attr_lock:
            run = self._prefetch_runs.get(d)
            if run is None or first:          # a new listing of d starts a new run
                dkey = self._dkey_name(paths_keys[0][1])[0] if paths_keys else ""
                known = self.dirindex.observed(dkey) if self._use_index and dkey else None
                run = {"items": [], "index": {}, "next": 0, "dkey": dkey, "checked": {},
                       "known": known is not None and len(known) >= HEAL_MIN}
                self._prefetch_runs[d] = run
            for path, key, _listed in paths_keys:
                run["index"][path] = len(run["items"])
                run["items"].append((path, key))
        if not run["known"]:
            self._prefetch_upto(run, PREFETCH_AHEAD)

    def _prefetch_follow(self, path: str) -> None:
        parent = posixpath.dirname(path) or "/"
        with self._attr_lock:
            run = self._prefetch_runs.get(parent)
            i = run["index"].get(path) if run is not None else None
        if i is not None:
            if run["known"]:
                self._window_follow(run, i, path)
            else:
                self._prefetch_upto(run, i + 1 + PREFETCH_AHEAD)
        else:
            self._big_follow(path, parent)

    def _note_big_dir(self, d: str, dkey: str) -> None:
        """A listing of d went past LISTING_CACHE_MAX names (the getattrs that follow start
        from its first pages again)."""
        with self._attr_lock:
            self._big_dirs[d] = {"dkey": dkey, "last": None, "mid": None, "more": False,
                                 "ahead": None, "misses": []}

    def _big_follow(self, path: str, parent: str) -> None:
        """getattr of a name of a big directory that no prefetch run holds. Such names are
        asked a page of the listing at a time (_big_window): a page gives each of its files
        the attributes of an answer seen before that still matches it, or a HEAD, in
        parallel. A name that is neither cached nor being asked starts a page from itself,
        once BIG_MISSES such names came within a second (`ls -l`; a lone stat or create is
        asked by itself); once the getattrs reach the middle of the latest page, the next
        page is asked ahead (and a name past the latest page waits for that one first)."""
        with self._attr_lock:
            big = self._big_dirs.get(parent)
            if big is None:
                return
            key = self.key_of(path)
            if big["more"] and big["ahead"] is None and big["mid"] <= key <= big["last"]:
                ahead: Future = Future()
                big["ahead"] = (big["last"], ahead)
                self._head_pool.submit(self._big_window, parent, big, big["last"], None,
                                       self._seq, ahead)
            if self._attrs.get(path, False) or path in self._heads:
                return
            wait = big["ahead"][1] if big["ahead"] and key > big["ahead"][0] else None
        if wait is not None:
            wait.result()
        with self._attr_lock:
            if self._attrs.get(path, False) or path in self._heads:
                return
            now = time.monotonic()
            big["misses"] = [t for t in big["misses"] if now - t < 1.0][-(BIG_MISSES - 1):]
            big["misses"].append(now)
            if len(big["misses"]) < BIG_MISSES:
                return
            fut: Future = Future()
            self._heads[path] = fut
            # (key[:-1] sorts just before key: the page starts at key, or a few names before)
            self._head_pool.submit(self._big_window, parent, big, key[:-1], (path, key, fut),
                                   self._seq)

    def _prefetch_upto(self, run: dict, upto: int) -> None:
        with self._attr_lock:
            items = run["items"]
            upto = min(upto, len(items))
            if run["next"] and upto < len(items) and upto - run["next"] < HEAD_BATCH:
                return              # the window moves on a batch at a time
            batch = []
            while run["next"] < upto:
                path, key = items[run["next"]]
                run["next"] += 1
                if path in self._heads or self._attrs.get(path, False):
                    continue
                self._heads[path] = fut = Future()
                batch.append((path, key, fut))
            seq0 = self._seq
        for i in range(0, len(batch), HEAD_BATCH):
            self._head_pool.submit(self._prefetch_batch, batch[i:i + HEAD_BATCH], seq0)

    def _prefetch_batch(self, batch: list, seq0: int) -> None:
        """HEADs of a listing's names, sent at once (Store.head_many); each answer cached as
        _prefetch_one does, and the getattr waiting for it woken."""
        waiting = {key: (path, fut) for path, key, fut in batch}

        def each(key, info):
            path, fut = waiting.pop(key)
            try:
                self._prefetched(path, key, info, seq0)
            finally:
                with self._attr_lock:
                    if self._heads.get(path) is fut:
                        del self._heads[path]
                fut.set_result(None)
        try:
            self.store.head_many(list(waiting), each)
        finally:
            for key in list(waiting):           # (an error before every answer came)
                each(key, StoreUnavailable(key))

    def _window_follow(self, run: dict, i: int, path: str) -> None:
        """getattr of the i-th name of a listing of a directory seen before (its answers are
        kept: dirindex.observed), not cached: the window of WINDOW names it falls in, and
        from its middle on the next one, are checked against a fresh page of the listing
        (_validate_window), unless checked lately. Checked when reached rather than at the
        readdir: `ls -l` of a big directory reaches most names after the attribute timeout
        of its listing (a small one finds them cached from the listing, and asks nothing)."""
        now = time.monotonic()
        w = i // WINDOW
        with self._attr_lock:
            if self._attrs.get(path, False):
                return
            items = run["items"]
            for v in (w, w + 1) if i % WINDOW >= WINDOW // 2 else (w,):
                if v * WINDOW >= len(items) or \
                        now - run["checked"].get(v, -1e9) < self._attrs.ttl / 2:
                    continue
                run["checked"][v] = now
                window = items[v * WINDOW:(v + 1) * WINDOW]
                fut: Future = Future()
                for p, _k in window:
                    self._heads.setdefault(p, fut)
                self._head_pool.submit(self._validate_window, run, window,
                                       items[v * WINDOW - 1][1] if v else None, self._seq, fut)

    def _validate_window(self, run: dict, window: list, after: str | None, seq0: int,
                         fut: Future) -> None:
        """List the page of the directory that holds `window` (names in listing order) and
        take the attributes of each file whose listed ETag, size and Last-Modified match an
        answer seen before (dirindex.Entry.matches, as for an index); HEAD the others, except
        those the page shows are gone (`rm -r` has deleted them since the readdir: asking
        each again every half attribute timeout made it 3-4 HEADs per file it removed)."""
        gone: set = set()
        try:
            page = next(iter(self.store.list_page_iter(run["dkey"], "/", WINDOW,
                                                       start_after=after)), None)
            listed = {o.key: o for o in page.objects} if page is not None else {}
            self._seed_from_index(self.dirindex.observed(run["dkey"]) or {},
                                  [(p, k, listed[k]) for p, k in window if k in listed], seq0)
            if page is not None:
                # the page covers every key up to its last one (and all of them if it is
                # not full): a window's key below that and not listed no longer exists
                full = len(page.objects) + len(page.prefixes) >= WINDOW
                bound = max([o.key for o in page.objects[-1:]] + page.prefixes[-1:], default="")
                gone = {k for _p, k in window
                        if k not in listed and (not full or k < bound)}
        except Exception as e:  # noqa: BLE001 - a prefetch: the HEADs below (or getattr) ask
            log.debug("listing page of %r: %s", run["dkey"], e)
        finally:
            self._hand_on(window, fut, seq0, gone)

    def _hand_on(self, items: list, fut: Future, seq0: int, gone: set = frozenset()) -> None:
        """A listing page registered as asking for items (path, key) is done: each that it
        did not vouch for, and does not show gone, is handed on to a HEAD; then whoever
        waits on fut looks again (a getattr of a gone one asks the server itself)."""
        with self._attr_lock:
            for path, key in items:
                if self._heads.get(path) is fut:
                    if key in gone or self._attrs.get(path, False):
                        del self._heads[path]
                    else:
                        self._heads[path] = self._head_pool.submit(self._prefetch_one, path,
                                                                   key, seq0)
        fut.set_result(None)

    def _big_window(self, parent: str, big: dict, after: str, asked, seq0: int,
                    ahead: Future | None = None) -> None:
        """One page of a big directory's listing, keys after `after`: files whose listed
        ETag, size and Last-Modified match an answer seen before get its attributes; the
        others a HEAD each (prefetch). asked: (path, key, future) of the getattr waiting;
        ahead: the future of a page asked ahead."""
        pfx = parent.rstrip("/") + "/"
        dkey = big["dkey"]
        try:
            page = next(iter(self.store.list_page_iter(dkey, "/", WINDOW, start_after=after)),
                        None)
            batch = [(pfx + o.key[len(dkey):], o.key, o) for o in
                     (page.objects if page is not None else [])
                     if o.key[len(dkey):] and "/" not in o.key[len(dkey):]
                     and o.key[len(dkey):] != INDEX_NAME]
            if self._use_index:
                self._seed_from_index(self.dirindex.observed(dkey) or {}, batch, seq0)
            with self._attr_lock:
                for path, key, _o in batch:
                    if path not in self._heads and not self._attrs.get(path, False):
                        self._heads[path] = self._head_pool.submit(self._prefetch_one, path,
                                                                   key, seq0)
                if page is not None and page.objects and \
                        (big["last"] is None or page.objects[-1].key > big["last"]):
                    big.update(last=page.objects[-1].key,
                               mid=page.objects[len(page.objects) // 2].key,
                               more=len(page.objects) + len(page.prefixes) >= WINDOW)
        except Exception as e:  # noqa: BLE001 - a prefetch: getattr asks itself
            log.debug("listing page of %r: %s", dkey, e)
        finally:
            if ahead is not None:
                with self._attr_lock:
                    if big["ahead"] is not None and big["ahead"][1] is ahead:
                        big["ahead"] = None
                ahead.set_result(None)
            if asked is not None:
                path, key, fut = asked
                self._hand_on([(path, key)], fut, seq0)

    def _follow_siblings(self, path: str) -> None:
        """A file opened for reading. Once the files of its directory are being opened one
        after the other in the order of its last listing (`cp -r`, `tar c`, `rsync`,
        `cat *`, `grep -r`), the next SIBLINGS_AHEAD are looked up ahead of the reader, in
        parallel, each with its first LOOKUP_START bytes (one ranged GET): their opens then
        need no request, as after any lookup within the attribute timeout (the open checks
        the ETag of what it is given)."""
        parent = posixpath.dirname(path) or "/"
        with self._attr_lock:
            run = self._prefetch_runs.get(parent)
            i = run["index"].get(path) if run is not None else None
            if i is None:
                # opens by name in a directory not listed lately (a program that knows its
                # files' names): the second one lists it, in the background, for the order
                opened = self._sibling_opens.get(parent, 0) + 1
                self._sibling_opens[parent] = opened
                if opened == 2 and run is None:
                    self._head_pool.submit(self._list_quietly, parent)
                return
            last, run["opened"] = run.get("opened"), i
            if last is None or not 0 < i - last <= 2:
                return                        # not (yet) in listing order
            items = run["items"]
            upto = min(i + 1 + SIBLINGS_AHEAD, len(items))
            for p, key in items[max(i + 1, run.get("siblings", 0)):upto]:
                if p not in self._heads and p not in self._starts:
                    self._heads[p] = self._head_pool.submit(self._prefetch_one, p, key,
                                                            self._seq, True)
            run["siblings"] = max(upto, run.get("siblings", 0))

    def _list_quietly(self, d: str) -> None:
        try:
            for _ in self.readdir(d):
                pass
        except Exception as e:  # noqa: BLE001 - only a lookahead is lost
            log.debug("%s: listing for the lookahead failed: %s", d, e)

    def _prefetch_one(self, path: str, key: str, seq0: int, start: bool = False) -> None:
        try:
            info = self._head_keep_start(path, key) if start else self.store.head(key)
        except Exception as e:  # noqa: BLE001 - handed to _prefetched like head_many's
            info = e
        try:
            self._prefetched(path, key, info, seq0)
        finally:
            with self._attr_lock:
                self._heads.pop(path, None)

    def _prefetched(self, path: str, key: str, info, seq0: int) -> None:
        """A prefetch's answer (ObjectInfo, or the exception the lookup raised): cached as
        a getattr's would be; an error is not (getattr will ask again and report it)."""
        if isinstance(info, Exception):
            return
        try:
            attr = self._attr_of_info(info)
            self._observe(key, info)            # kept before a getattr can see the answer
            self._cache_attr(path, attr, seq0, info)
        except Exception:  # noqa: BLE001 - as an error of the lookup itself
            pass

    def _lookup(self, path: str, seq0: int = -1) -> Attr:
        key = self.key_of(path)
        try:
            info = self._head_keep_start(path, key)
            attr = self._attr_of_info(info)
            self._observe(key, info)
            with self._attr_lock:
                if not self._changes.changed_since(path, seq0):
                    self._infos[path] = info
                else:
                    self._starts.pop(path, None)
            return attr
        except NotFound:
            pass
        return self._dir_attr(path)

    def _head_keep_start(self, path: str, key: str) -> ObjectInfo:
        """HEAD, fetching a small object whole on the way (one ranged GET answers both);
        its bytes wait in _starts for the open that follows. Returns the info without them."""
        info = self.store.head_with_start(key, LOOKUP_START)
        if info.start is None:
            return info
        if 0 < info.size <= len(info.start):
            with self._attr_lock:
                try:
                    self._starts[path] = (info.etag, info.start)
                except ValueError:            # larger than the whole budget: not kept
                    pass
        return replace(info, start=None)

    def take_start(self, path: str, etag: str) -> bytes | None:
        """The whole content of a small object a lookup fetched, if it is still that version."""
        with self._attr_lock:
            got = self._starts.pop(path, None)
        return got[1] if got is not None and got[0] == etag else None

    def _attr_of_info(self, info: ObjectInfo) -> Attr:
        m = self._meta_of(info, stat.S_IFREG)
        return Attr(mode=m["mode"], size=info.size, mtime=m["mtime"], ctime=m["ctime"],
                    uid=m["uid"], gid=m["gid"])

    def _dir_attr(self, path: str) -> Attr:
        with self._attr_lock:
            m = self._dir_meta.get(path)
        if m is not None and self._dir_exists(path):
            return Attr(m["mode"], 0, m["mtime"], m["ctime"], m["uid"], m["gid"], 2)
        dkey = self.dir_key(path)
        for page in self.store.list_page_iter(dkey, delimiter="/", max_keys=1):
            if not page.objects and not page.prefixes:
                break
            if page.objects and page.objects[0].key == dkey:
                try:
                    info = self.store.head(dkey)
                    m = self._meta_of(info, stat.S_IFDIR)
                    if stat.S_ISDIR(m["mode"]):
                        return Attr(m["mode"], 0, m["mtime"], m["ctime"], m["uid"], m["gid"], 2)
                except (NotFound, KeyMismatch, PermissionDenied):
                    pass
            t = page.objects[0].mtime if page.objects else self.mount_time
            return Attr(self._default_mode(stat.S_IFDIR), 0, t, t, self.uid, self.gid, 2)
        if self._has_pending_under(path):
            return Attr(self._default_mode(stat.S_IFDIR), 0, self.mount_time, self.mount_time,
                        self.uid, self.gid, 2)
        raise NotFound(path)

    def _has_pending_under(self, path: str) -> bool:
        pfx = path.rstrip("/") + "/"
        with self._files_lock:
            return any(p.startswith(pfx) for p in self._files)

    def is_dir(self, path: str) -> bool:
        try:
            return stat.S_ISDIR(self.getattr(path).mode)
        except NotFound:
            return False
