"""Per-directory attribute index: a cold `ls -l` of a directory answers from one GET instead
of one HEAD per file.

A file's mode, owner and times live in its object's metadata, which only a HEAD (or GET) with
the key returns; a listing gives key, size, ETag and Last-Modified. The index is one object
per directory, `DIR/.ssecfs-index` (SSE-C like every object), mapping each file's name to
the attributes last seen for it together with the ETag, size and Last-Modified of the version
they were seen on: those its metadata sets, -1 for a mode, uid or gid it does not set (each
mount that reads the index applies its own defaults there: FsConfig file_mode, uid, gid).
Only answers about objects a key of the ring opens make entries. A listed file whose ETag,
size and Last-Modified equal its entry's gets the entry's attributes; any other file is asked
with a HEAD, as without an index.

Why that match is sound: an entry is made from ONE answer of the server (a HEAD or GET), so
its attributes belong to the version with that ETag and Last-Modified. Another version with
the same ETag and Last-Modified can exist (SeaweedFS keeps both on a metadata-only CopyObject,
e.g. chmod by another client; Last-Modified has one-second steps), but only if it was
written in the same second. An entry is therefore used only if the answer it came from is
dated (server clock, `Date`) at least MATURE seconds after that Last-Modified: any version
written in that second was written before the answer, and the answer showed the newest.

Who writes it: a writable mount, for directories where it changed files (uploads, unlinks,
renames), and for directories whose listing found many files without a usable entry (written
by other tools). Built in the background once the directory has been quiet for QUIET
seconds, and at unmount. Mounts writing the same index race harmlessly: each entry is checked
on its own, a lost or stale index only costs HEADs. The name `.ssecfs-index` is reserved:
the mount hides it and refuses to create it (docs/SEMANTICS.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from cachetools import LRUCache

from ..config import ID_MAX, RDEV_MAX
from ..errors import KeyMismatch, NotFound, PermissionDenied
from ..store.contract import OPEN, ListedObject, ObjectInfo, Store

log = logging.getLogger("ssecfs.dirindex")

INDEX_NAME = ".ssecfs-index"
FORMAT = 2
MATURE = 2.0             # seconds between a version's Last-Modified and an answer we index
QUIET = 2.5              # build once the directory had no change of ours for this long
MAX_DELAY = 60.0         # ... or at the latest this long after the first change
MAX_ENTRIES = 10_000     # larger directories get no index object (its size, rewritten whole)
OBS_MAX = 200_000        # answers kept in memory per directory (a big one is listed again fast)
OBS_TOTAL = 200_000      # ... and in all, over the OBS_DIRS directories (~330 bytes each)
HEAL_MIN = 16            # a listing with this many files without an entry asks for a build
MIN_FILES = 16           # smaller directories get no index (a few HEADs in parallel are cheap)
LOAD_BYTES = 256 * 1024  # the first GET of an index asks this much (most are smaller)
OBS_DIRS = 8             # directories whose entries are kept in memory (LRU)


@dataclass(frozen=True, slots=True)
class Entry:
    etag: str
    lm: int              # Last-Modified of the version, whole seconds
    size: int
    mode: int            # -1: not in the object's metadata (the reading mount's default)
    uid: int             # -1: likewise
    gid: int             # -1: likewise
    mtime: float
    ctime: float
    seen: int            # server date of the answer the attributes come from, whole seconds
    atime: float | None  # None: not set explicitly
    rdev: int            # a device node's number, else 0

    def matches(self, o: ListedObject) -> bool:
        return (self.seen >= self.lm + MATURE and self.etag == o.etag and self.size == o.size
                and self.lm == int(o.mtime))


def entry_of(info: ObjectInfo, attr) -> Entry | None:
    """An entry from one answer (info) and the attributes read from it, if indexable."""
    if info.access != OPEN or not info.etag or info.observed is None or not info.mtime:
        return None
    return Entry(info.etag, int(info.mtime), info.size, attr.mode, attr.uid, attr.gid,
                 attr.mtime, attr.ctime, int(info.observed), attr.atime, attr.rdev)


def encode(entries: dict[str, Entry]) -> bytes:
    rows = {n: [e.etag, e.lm, e.size, e.mode, e.uid, e.gid, e.mtime, e.ctime, e.seen, e.atime,
                e.rdev]
            for n, e in sorted(entries.items())}
    return json.dumps({"ssecfs-index": FORMAT, "entries": rows},
                      separators=(",", ":")).encode()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_time(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def decode(data: bytes) -> dict[str, Entry]:
    """ValueError for anything but a well-formed index of our format."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON ({e.__class__.__name__})") from None
    if not isinstance(doc, dict) or doc.get("ssecfs-index") != FORMAT \
            or not isinstance(doc.get("entries"), dict):
        raise ValueError(f"not an index of format {FORMAT}")
    out = {}
    for name, row in doc["entries"].items():
        if not (isinstance(name, str) and name and "/" not in name and isinstance(row, list)
                and len(row) == 11 and isinstance(row[0], str)
                and all(_is_int(v) for v in (row[1], row[2], row[3], row[4], row[5], row[8],
                                             row[10]))
                and all(_is_time(v) for v in (row[6], row[7]))
                and (row[9] is None or _is_time(row[9]))
                and -1 <= row[3] <= 0o177777 and -1 <= row[4] <= ID_MAX
                and -1 <= row[5] <= ID_MAX and 0 <= row[10] <= RDEV_MAX):
            raise ValueError(f"bad entry for {name!r}")
        out[name] = Entry(row[0], row[1], row[2], row[3], row[4], row[5], float(row[6]),
                          float(row[7]), row[8], None if row[9] is None else float(row[9]),
                          row[10])
    return out


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class _Observations(LRUCache):
    """directory -> {name: Entry}, least recently used directory dropped first; `entries`
    counts the entries of all its dicts (DirIndexes._room adds, a dropped dict subtracts)."""

    def __init__(self, maxsize: int):
        super().__init__(maxsize=maxsize)
        self.entries = 0

    def __delitem__(self, key) -> None:
        gone = len(super().__getitem__(key))
        super().__delitem__(key)
        self.entries -= gone


class DirIndexes:
    """Observations per directory, loading indexes for listings, and the background builder.

    store: the object store; attr_of(info) -> Attr: a HEAD answer's attributes as an entry
    keeps them (-1 for what the object does not set); writable: False on a read-only mount
    (indexes are read, never written)."""

    def __init__(self, store: Store, attr_of: Callable, head_pool: ThreadPoolExecutor,
                 writable: bool):
        self.store = store
        self.attr_of = attr_of
        self.pool = head_pool
        self.writable = writable
        self._lock = threading.Condition()
        # directory -> {name: Entry}: answers seen by this mount, and loaded indexes. Bounded:
        # at most OBS_DIRS directories, OBS_TOTAL entries in all (~65 MB at most).
        self._obs = _Observations(maxsize=OBS_DIRS)
        self._stored: LRUCache = LRUCache(maxsize=10_000)   # dkey -> digest of what it holds
        self._loaded: LRUCache = LRUCache(maxsize=OBS_DIRS)  # dkey -> (ETag, entries) last read
        self._foreign: set[str] = set()          # dkeys whose index object is not ours to write
        self._due: dict[str, list] = {}          # dkey -> [quiet until, latest, ours]
        self._building = 0
        # Changes of ours per directory, and directories forgotten (rmdir, rename): a build
        # writes only if neither moved while it ran, so it never puts back the index of a
        # directory just removed (which would make it reappear) nor one older than a change.
        self._gens: dict[str, int] = {}
        self._forgets = 0
        self._write_lock = threading.Lock()      # the check and the write, against forget()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- what the filesystem tells us -----------------------------------------------------
    def observe(self, dkey: str, name: str, info: ObjectInfo) -> Entry | None:
        """One answer of the server about a file. Returns the entry it makes, if it can make
        one (never of an object no key of the ring opens: its metadata is no one's word)."""
        if info.access != OPEN or info.observed is None:
            return None
        e = entry_of(info, self.attr_of(info))
        if e is None:
            return None
        with self._lock:
            obs = self._obs_of(dkey)
            if name in obs or self._room(obs):
                obs[name] = e
        return e

    def observed(self, dkey: str) -> dict[str, Entry] | None:
        """The answers this mount keeps for a directory (name -> Entry), if any: the live
        dict, only to look names up in."""
        with self._lock:
            return self._obs.get(dkey)

    def _obs_of(self, dkey: str) -> dict:
        """Caller holds _lock."""
        obs = self._obs.get(dkey)
        if obs is None:
            obs = self._obs[dkey] = {}
        return obs

    def _room(self, obs: dict) -> bool:
        """Room for one more entry in obs; if so, counts it (caller holds _lock and adds it)."""
        if len(obs) >= OBS_MAX or self._obs.entries >= OBS_TOTAL:
            return False
        self._obs.entries += 1
        return True

    def changed(self, dkey: str, ours: bool = True) -> None:
        """ours: a change of ours in the directory (its build HEADs every file without a
        usable entry). Else a listing found many files without one: its build indexes only
        what this mount has seen (a plain `ls` must not cost a HEAD per file)."""
        if not self.writable:
            return
        now = time.monotonic()
        with self._lock:
            if ours:
                self._gens[dkey] = self._gens.get(dkey, 0) + 1
            d = self._due.get(dkey)
            if d is None:
                self._due[dkey] = [now + QUIET, now + MAX_DELAY, ours]
            else:
                d[0] = now + QUIET
                d[2] = d[2] or ours
            if self._thread is None and not self._stop:
                self._thread = threading.Thread(target=self._run, name="dirindex", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    def forget(self, dkey: str) -> None:
        """The directory is gone (rmdir, renamed away). Returns after any index write in
        progress: the caller deletes the index after this."""
        with self._write_lock, self._lock:
            self._forgets += 1
            for k in [k for k in self._obs if k.startswith(dkey)]:
                self._obs.pop(k, None)
            for k in [k for k in self._due if k.startswith(dkey)]:
                del self._due[k]
            for k in [k for k in self._stored if k.startswith(dkey)]:
                del self._stored[k]
            for k in [k for k in self._loaded if k.startswith(dkey)]:
                self._loaded.pop(k, None)
            self._foreign = {k for k in self._foreign if not k.startswith(dkey)}

    # -- listing side ---------------------------------------------------------------------
    def for_listing(self, dkey: str, objects: list[ListedObject]) -> dict[str, Entry] | None:
        """The index for a page of the directory's listing: read (or the copy read before, if
        the listing shows the same ETag) when the page lists it; when the page shows there is
        none (keys are listed in order and the page went past its name), what this mount has
        seen of the directory (a directory too big for an index object is listed again
        without a HEAD per file; the caller only looks names up in it); None when the page
        ends before its name (not known yet)."""
        key = dkey + INDEX_NAME
        for o in objects:
            if o.key == key:
                with self._lock:
                    got = self._loaded.get(dkey)
                return got[1] if got is not None and got[0] == o.etag else self.load(dkey)
        if not objects or objects[-1].key > key:
            return self.observed(dkey) or {}
        return None

    def load(self, dkey: str) -> dict[str, Entry]:
        """The stored index of a directory ({} if none or unreadable); its entries also join
        this mount's observations (a later build reuses them instead of asking again)."""
        key = dkey + INDEX_NAME
        try:
            info = self.store.head_with_start(key, LOAD_BYTES)
            if info.access != OPEN:
                raise KeyMismatch(key)               # plaintext, or a key not in our ring
            data = info.start
            if data is None or len(data) < info.size:
                data = self.store.get_range(key, 0, info.size, info.key_fp, info.etag)
            entries = decode(data)
        except NotFound:
            return {}
        except (KeyMismatch, PermissionDenied):
            log.info("index %r is under another key; not used, not overwritten", key)
            with self._lock:
                self._foreign.add(dkey)
            return {}
        except ValueError as e:
            log.warning("%r is not an index of ours (%s); not used, not overwritten", key, e)
            with self._lock:
                self._foreign.add(dkey)
            return {}
        with self._lock:
            self._foreign.discard(dkey)
            self._stored[dkey] = _digest(data)
            self._loaded[dkey] = (info.etag, entries)
            obs = self._obs_of(dkey)
            for name, e in entries.items():
                old = obs.get(name)
                if (old is None and self._room(obs)) or (old is not None and old.seen < e.seen):
                    obs[name] = e
        return entries

    # -- building -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop:
                    now = time.monotonic()
                    ready = [k for k, d in self._due.items() if now >= min(d[0], d[1])]
                    if ready:
                        break
                    nxt = min((min(d[0], d[1]) for d in self._due.values()), default=now + 3600)
                    self._lock.wait(max(0.05, nxt - now))
                if self._stop:
                    return
                dkey = ready[0]
                ask = self._due.pop(dkey)[2]
                self._building += 1
            try:
                again = self.build(dkey, ask)
            except Exception as e:  # noqa: BLE001 - an index is an optimisation: log, go on
                log.warning("index of %r not written: %s", dkey, e)
                again = False
            with self._lock:
                self._building -= 1
                if dkey not in self._due:
                    self._gens.pop(dkey, None)
                if again and dkey not in self._due:
                    now = time.monotonic()
                    self._due[dkey] = [now + MATURE, now + MATURE, ask]
                self._lock.notify_all()

    def build(self, dkey: str, ask: bool = True) -> bool:
        """List the directory, HEAD the files without a usable observation (ask=False: no
        HEADs, index what was seen), write the index if it changed. True: some files were
        too new to index yet (build again later)."""
        with self._lock:
            start = (self._forgets, self._gens.get(dkey, 0))
        listing = self._list_files(dkey)
        if listing is None:
            return False
        listed, present = listing
        with self._lock:
            known = dkey in self._stored and dkey in self._obs
        if present and not known:
            self.load(dkey)          # its entries spare HEADs; and is it ours to overwrite?
        with self._lock:
            if dkey in self._foreign:
                return False         # a file of that name from another tool, or another key
            obs = dict(self._obs.get(dkey) or {})
        keep, again = self._entries(dkey, listed, obs, ask)
        self._write(dkey, keep, present, start, len(listed))
        return again

    def _list_files(self, dkey: str) -> tuple[list[ListedObject], bool] | None:
        """The files of the directory, and whether it has an index object; None if it has
        more files than an index holds."""
        listed: list[ListedObject] = []
        present = False
        for page in self.store.list_page_iter(dkey, delimiter="/"):
            for o in page.objects:
                name = o.key[len(dkey):]
                if name == INDEX_NAME:
                    present = True
                elif name and "/" not in name:
                    listed.append(o)
            if len(listed) > MAX_ENTRIES:
                log.debug("index of %r: more than %d files, none kept", dkey, MAX_ENTRIES)
                return None
        return listed, present

    def _entries(self, dkey: str, listed: list, obs: dict, ask: bool) -> tuple[dict, bool]:
        """The entries of the listed files: the observations that match them, and (ask) the
        answers of HEADs for the others, in parallel. Also: whether some were too new."""
        keep: dict[str, Entry] = {}
        todo: list[tuple[str, ListedObject]] = []
        for o in listed:
            name = o.key[len(dkey):]
            e = obs.get(name)
            if e is not None and e.matches(o):
                keep[name] = e
            elif ask:
                todo.append((name, o))
        again = False
        futs = [(name, o, self.pool.submit(self.store.head, o.key)) for name, o in todo]
        for name, o, fut in futs:
            try:
                info = fut.result()
            except (NotFound, KeyMismatch, PermissionDenied):
                continue                     # gone, or not ours to describe
            e = self.observe(dkey, name, info)
            if e is not None and e.matches(o):
                keep[name] = e
            elif e is not None and e.etag == o.etag and e.seen < e.lm + MATURE:
                again = True                 # too new: the answer may not be the last word
        return keep, again

    def _write(self, dkey: str, keep: dict, present: bool, start: tuple, files: int) -> None:
        """Store the index of keep (or remove it: too few entries), unless it is what is
        stored already or the directory changed since the build started (start)."""
        data = encode(keep) if len(keep) >= MIN_FILES else None
        digest = _digest(data) if data is not None else None
        with self._write_lock:
            with self._lock:
                if (self._forgets, self._gens.get(dkey, 0)) != start:
                    return              # changed meanwhile: the next build (due) decides
                same = present == (data is not None) and self._stored.get(dkey) == digest
            if same:
                return
            if data is None:
                try:
                    self.store.delete(dkey + INDEX_NAME)
                except NotFound:
                    pass
            else:
                self.store.put(dkey + INDEX_NAME, data, {})
                log.debug("index of %r written: %d of %d files", dkey, len(keep), files)
            with self._lock:
                if digest is None:
                    self._stored.pop(dkey, None)
                else:
                    self._stored[dkey] = digest

    def flush(self, timeout: float) -> bool:
        """Build every index that is due now (unmount). Waits for versions to mature (at
        most MATURE seconds). False if the timeout ran out first."""
        end = time.monotonic() + timeout
        with self._lock:
            for d in self._due.values():
                d[0] = d[1] = min(d[1], time.monotonic())
            self._lock.notify_all()
            while self._due or self._building:
                left = end - time.monotonic()
                if left <= 0 or self._thread is None:
                    return not self._due and not self._building
                self._lock.wait(min(left, 0.2))
        return True

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
