"""Lookups ahead of the caller: the HEADs of a listing's names before `ls -l` asks for them,
a big directory's names a page at a time, and the files a reader opens one after the other
in listing order. Every answer goes into the attribute cache (attrs.AttrCache), which it
shares a lock with: `heads` (path -> Future of a lookup on its way) is guarded by that lock.
"""

from __future__ import annotations

import logging
import posixpath
import time
from concurrent.futures import Future

from cachetools import LRUCache

from ..errors import StoreUnavailable
from ..store.contract import Store
from .dirindex import HEAL_MIN, INDEX_NAME
from .names import Names

log = logging.getLogger("ssecfs.fs")

PREFETCH_AHEAD = 256                 # HEADs a readdir prefetch runs ahead of the getattrs
HEAD_BATCH = 64                      # HEADs one prefetch task sends at once (head_many)
WINDOW = 1000                        # names one listing page checks against known answers
BIG_MISSES = 3                       # lookups in a row that make a big directory's pages start
SIBLINGS_AHEAD = 32                  # files looked up ahead of a reader going in listing order


class Prefetcher:
    def __init__(self, attrs, store: Store, names: Names):
        self.attrs = attrs
        self.store = store
        self.names = names
        self.lock = attrs.lock
        self.pool = attrs.head_pool
        self.heads: dict[str, Future] = {}          # lookups in flight
        # Per listed directory: its names in listing order and how far the HEAD prefetch
        # went. Prefetch runs PREFETCH_AHEAD names ahead of the getattr calls that follow a
        # readdir (`ls -l`), so answers are fresh (well within the attribute timeout) when
        # they are used, and a reader that stops early costs few requests.
        self._runs: LRUCache = LRUCache(maxsize=64)
        # Directories listed with more names than a prefetch run holds (LISTING_CACHE_MAX):
        # the names past those are asked a page of the listing at a time (_big_follow).
        self._big_dirs: LRUCache = LRUCache(maxsize=64)
        self._sibling_opens: LRUCache = LRUCache(maxsize=64)   # opens per unlisted directory

    def _wanted(self, path: str) -> bool:
        """Caller holds lock. Neither cached nor being asked."""
        return path not in self.heads and not self.attrs.peek(path)

    # -- after a listing --------------------------------------------------------------------
    def listed(self, d: str, paths_keys: list, first: bool) -> None:
        """Parallel HEADs for the names of a listing, so that `ls -l` is not one round trip
        per file; getattr of a name being fetched waits for it instead of asking again.
        Only the first PREFETCH_AHEAD are asked now; getattr of a listed name moves the
        window on (follow)."""
        a = self.attrs
        with self.lock:
            run = self._runs.get(d)
            if run is None or first:          # a new listing of d starts a new run
                dkey = Names.split_key(paths_keys[0][1])[0] if paths_keys else ""
                known = a.dirindex.observed(dkey) if a.use_index and dkey else None
                run = {"items": [], "index": {}, "next": 0, "dkey": dkey, "checked": {},
                       "known": known is not None and len(known) >= HEAL_MIN}
                self._runs[d] = run
            for path, key, _listed in paths_keys:
                run["index"][path] = len(run["items"])
                run["items"].append((path, key))
        if not run["known"]:
            self._upto(run, PREFETCH_AHEAD)

    def note_big_dir(self, d: str, dkey: str) -> None:
        """A listing of d went past LISTING_CACHE_MAX names (the getattrs that follow start
        from its first pages again)."""
        with self.lock:
            self._big_dirs[d] = {"dkey": dkey, "last": None, "mid": None, "more": False,
                                 "ahead": None, "misses": []}

    def follow(self, path: str) -> None:
        """getattr of path is about to look: move the prefetch of its directory on."""
        parent = posixpath.dirname(path) or "/"
        with self.lock:
            run = self._runs.get(parent)
            i = run["index"].get(path) if run is not None else None
        if i is not None:
            if run["known"]:
                self._window_follow(run, i, path)
            else:
                self._upto(run, i + 1 + PREFETCH_AHEAD)
        else:
            self._big_follow(path, parent)

    def _upto(self, run: dict, upto: int) -> None:
        with self.lock:
            items = run["items"]
            upto = min(upto, len(items))
            if run["next"] and upto < len(items) and upto - run["next"] < HEAD_BATCH:
                return              # the window moves on a batch at a time
            batch = []
            while run["next"] < upto:
                path, key = items[run["next"]]
                run["next"] += 1
                if not self._wanted(path):
                    continue
                self.heads[path] = fut = Future()
                batch.append((path, key, fut))
            seq0 = self.attrs.seq
        for i in range(0, len(batch), HEAD_BATCH):
            self.pool.submit(self._batch, batch[i:i + HEAD_BATCH], seq0)

    def _batch(self, batch: list, seq0: int) -> None:
        """HEADs of a listing's names, sent at once (Store.head_many); each answer cached as
        _one does, and the getattr waiting for it woken."""
        waiting = {key: (path, fut) for path, key, fut in batch}

        def each(key, info):
            path, fut = waiting.pop(key)
            try:
                self._answered(path, key, info, seq0)
            finally:
                with self.lock:
                    if self.heads.get(path) is fut:
                        del self.heads[path]
                fut.set_result(None)
        try:
            self.store.head_many(list(waiting), each)
        finally:
            for key in list(waiting):           # (an error before every answer came)
                each(key, StoreUnavailable(key))

    # -- directories seen before: windows of the listing ------------------------------------
    def _window_follow(self, run: dict, i: int, path: str) -> None:
        """getattr of the i-th name of a listing of a directory seen before (its answers are
        kept: dirindex.observed), not cached: the window of WINDOW names it falls in, and
        from its middle on the next one, are checked against a fresh page of the listing
        (_validate_window), unless checked lately. Checked when reached rather than at the
        readdir: `ls -l` of a big directory reaches most names after the attribute timeout
        of its listing (a small one finds them cached from the listing, and asks nothing)."""
        now = time.monotonic()
        w = i // WINDOW
        with self.lock:
            if self.attrs.peek(path):
                return
            items = run["items"]
            for v in (w, w + 1) if i % WINDOW >= WINDOW // 2 else (w,):
                if v * WINDOW >= len(items) or \
                        now - run["checked"].get(v, -1e9) < self.attrs.ttl / 2:
                    continue
                run["checked"][v] = now
                window = items[v * WINDOW:(v + 1) * WINDOW]
                fut: Future = Future()
                for p, _k in window:
                    self.heads.setdefault(p, fut)
                self.pool.submit(self._validate_window, run, window,
                                 items[v * WINDOW - 1][1] if v else None, self.attrs.seq, fut)

    def _validate_window(self, run: dict, window: list, after: str | None, seq0: int,
                         fut: Future) -> None:
        """List the page of the directory that holds `window` (names in listing order) and
        take the attributes of each file whose listed ETag, size and Last-Modified match an
        answer seen before (dirindex.Entry.matches, as for an index); HEAD the others, except
        those the page shows are gone (`rm -r` has deleted them since the readdir: asking
        each again every half attribute timeout would cost several HEADs per file)."""
        gone: set = set()
        try:
            page = next(iter(self.store.list_page_iter(run["dkey"], "/", WINDOW,
                                                       start_after=after)), None)
            listed = {o.key: o for o in page.objects} if page is not None else {}
            self.attrs.seed_from_index(self.attrs.dirindex.observed(run["dkey"]) or {},
                                       [(p, k, listed[k]) for p, k in window if k in listed],
                                       seq0)
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
        with self.lock:
            for path, key in items:
                if self.heads.get(path) is fut:
                    if key in gone or self.attrs.peek(path):
                        del self.heads[path]
                    else:
                        self.heads[path] = self.pool.submit(self._one, path, key, seq0)
        fut.set_result(None)

    # -- big directories: a page at a time --------------------------------------------------
    def _big_follow(self, path: str, parent: str) -> None:
        """getattr of a name of a big directory that no prefetch run holds. Such names are
        asked a page of the listing at a time (_big_window): a page gives each of its files
        the attributes of an answer seen before that still matches it, or a HEAD, in
        parallel. A name that is neither cached nor being asked starts a page from itself,
        once BIG_MISSES such names came within a second (`ls -l`; a lone stat or create is
        asked by itself); once the getattrs reach the middle of the latest page, the next
        page is asked ahead (and a name past the latest page waits for that one first)."""
        with self.lock:
            big = self._big_dirs.get(parent)
            if big is None:
                return
            key = self.names.key_of(path)
            if big["more"] and big["ahead"] is None and big["mid"] <= key <= big["last"]:
                ahead: Future = Future()
                big["ahead"] = (big["last"], ahead)
                self.pool.submit(self._big_window, parent, big, big["last"], None,
                                 self.attrs.seq, ahead)
            if not self._wanted(path):
                return
            wait = big["ahead"][1] if big["ahead"] and key > big["ahead"][0] else None
        if wait is not None:
            wait.result()
        with self.lock:
            if not self._wanted(path):
                return
            now = time.monotonic()
            big["misses"] = [t for t in big["misses"] if now - t < 1.0][-(BIG_MISSES - 1):]
            big["misses"].append(now)
            if len(big["misses"]) < BIG_MISSES:
                return
            fut: Future = Future()
            self.heads[path] = fut
            # (key[:-1] sorts just before key: the page starts at key, or a few names before)
            self.pool.submit(self._big_window, parent, big, key[:-1], (path, key, fut),
                             self.attrs.seq)

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
            if self.attrs.use_index:
                self.attrs.seed_from_index(self.attrs.dirindex.observed(dkey) or {}, batch,
                                           seq0)
            with self.lock:
                for path, key, _o in batch:
                    if self._wanted(path):
                        self.heads[path] = self.pool.submit(self._one, path, key, seq0)
                if page is not None and page.objects and \
                        (big["last"] is None or page.objects[-1].key > big["last"]):
                    big.update(last=page.objects[-1].key,
                               mid=page.objects[len(page.objects) // 2].key,
                               more=len(page.objects) + len(page.prefixes) >= WINDOW)
        except Exception as e:  # noqa: BLE001 - a prefetch: getattr asks itself
            log.debug("listing page of %r: %s", dkey, e)
        finally:
            if ahead is not None:
                with self.lock:
                    if big["ahead"] is not None and big["ahead"][1] is ahead:
                        big["ahead"] = None
                ahead.set_result(None)
            if asked is not None:
                path, key, fut = asked
                self._hand_on([(path, key)], fut, seq0)

    # -- readers going in listing order -----------------------------------------------------
    def follow_siblings(self, path: str) -> None:
        """A file opened for reading. Once the files of its directory are being opened one
        after the other in the order of its last listing (`cp -r`, `tar c`, `rsync`,
        `cat *`, `grep -r`), the next SIBLINGS_AHEAD are looked up ahead of the reader, in
        parallel, each with its first bytes (attrs.LOOKUP_START, one ranged GET): their opens
        then need no request, as after any lookup within the attribute timeout (the open
        checks the ETag of what it is given)."""
        parent = posixpath.dirname(path) or "/"
        with self.lock:
            run = self._runs.get(parent)
            i = run["index"].get(path) if run is not None else None
            if i is None:
                # opens by name in a directory not listed lately (a program that knows its
                # files' names): the second one lists it, in the background, for the order
                opened = self._sibling_opens.get(parent, 0) + 1
                self._sibling_opens[parent] = opened
                if opened == 2 and run is None:
                    self.pool.submit(self._list_quietly, parent)
                return
            last, run["opened"] = run.get("opened"), i
            if last is None or not 0 < i - last <= 2:
                return                        # not (yet) in listing order
            items = run["items"]
            upto = min(i + 1 + SIBLINGS_AHEAD, len(items))
            for p, key in items[max(i + 1, run.get("siblings", 0)):upto]:
                if p not in self.heads and not self.attrs.has_start(p):
                    self.heads[p] = self.pool.submit(self._one, p, key, self.attrs.seq, True)
            run["siblings"] = max(upto, run.get("siblings", 0))

    def _list_quietly(self, d: str) -> None:
        try:
            for _ in self.attrs.readdir(d):
                pass
        except Exception as e:  # noqa: BLE001 - only a lookahead is lost
            log.debug("%s: listing for the lookahead failed: %s", d, e)

    # -- answers ----------------------------------------------------------------------------
    def _one(self, path: str, key: str, seq0: int, start: bool = False) -> None:
        try:
            info = self.attrs.head_keep_start(path, key) if start else self.store.head(key)
        except Exception as e:  # noqa: BLE001 - handed to _answered like head_many's
            info = e
        try:
            self._answered(path, key, info, seq0)
        finally:
            with self.lock:
                self.heads.pop(path, None)

    def _answered(self, path: str, key: str, info, seq0: int) -> None:
        """A prefetch's answer (ObjectInfo, or the exception the lookup raised): cached as
        a getattr's would be; an error is not (getattr will ask again and report it)."""
        if isinstance(info, Exception):
            return
        try:
            attr = self.attrs.meta.attr_of_info(info)
            self.attrs.observe(key, info)            # kept before a getattr can see the answer
            self.attrs.cache_attr(path, attr, seq0, info)
        except Exception:  # noqa: BLE001 - as an error of the lookup itself
            pass
