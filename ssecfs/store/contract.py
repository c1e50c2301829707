"""The object-store contract the filesystem is written against: the Store protocol, the values
it answers with, and the S3 limits the filesystem plans its uploads with. Implemented by
s3.S3Store for real (deferred.DeferredDeletes in front of it), and by tests/memstore.MemStore
for fast unit tests; both enforce SSE-C.

Keys are object keys *relative to the bucket* (the filesystem adds the prefix). Every data
or metadata call is made with a key of the ring; the store picks which one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

from ..buffers import Segments

MiB = 1024 * 1024
# S3's limits, and the smallest part the store sends in a multipart upload (S3 allows 5 MiB;
# parts are made of whole 8 MiB read units of the cache)
MULTIPART_MIN_PART = 8 * MiB
MULTIPART_MAX_PARTS = 10_000          # parts of one upload
COPY_MAX = 5 * 1024 * MiB             # the largest object one CopyObject copies
LIST_PAGE_MAX = 1000                  # keys of one ListObjectsV2 answer, at most
DELETE_MAX = 1000                     # keys of one DeleteObjects request, at most

# Access states of an object, as far as our key ring is concerned.
OPEN = "open"            # a key of the ring opens it; key_fp says which
LOCKED = "locked"        # no key of the ring opens it (another key)
PLAINTEXT = "plaintext"  # stored without SSE-C


@dataclass
class ObjectInfo:
    key: str
    size: int
    etag: str
    mtime: float
    metadata: dict = field(default_factory=dict)
    access: str = OPEN
    key_fp: str | None = None
    start: bytes | None = None      # the object's first bytes, when a lookup fetched them
    observed: float | None = None   # server date (`Date`) of the answer this info comes from


@dataclass
class ListedObject:
    key: str
    size: int
    etag: str
    mtime: float


@dataclass
class ListPage:
    objects: list[ListedObject]
    prefixes: list[str]


# A body to send: bytes, or buffers.Segments (chunks not joined; sending consumes them)
Body = bytes | Segments
Reader = Callable[[int, int], Body]    # (offset, length) -> bytes of the file being uploaded


def pieces(body, step: int) -> Iterator[memoryview]:
    """Memoryviews of step bytes each (the last may be shorter), without a copy, of what
    get_range(shared=True) returned: bytes, a bytearray, or a body received into several
    buffers (anything with views(step), e.g. buffers.Segments)."""
    views = getattr(body, "views", None)
    if views is not None:
        return views(step)
    v = memoryview(body)
    return (v[off:off + step] for off in range(0, len(v), step))


class Store(Protocol):
    def head(self, key: str) -> ObjectInfo: ...
    def head_many(self, keys: list[str], each=None) -> dict: ...  # key -> info or exception
    def head_with_start(self, key: str, nbytes: int) -> ObjectInfo: ...
    def get_range(self, key: str, start: int, length: int, key_fp: str | None,
                  etag: str | None = None, shared: bool = False) -> bytes: ...
    def put(self, key: str, data: Body, metadata: dict) -> ObjectInfo: ...
    def put_many(self, items: list[tuple[str, Body, dict]]) -> list: ...  # info or exception
    def upload(self, key: str, size: int, reader: Reader, metadata: dict) -> ObjectInfo: ...
    def mpu_begin(self, key: str, metadata: dict) -> tuple[str, str]: ...
    def mpu_part(self, key: str, upload_id: str, number: int, body: Body,
                 key_fp: str) -> str: ...
    def mpu_complete(self, key: str, upload_id: str, parts: list[tuple[int, str]],
                     key_fp: str) -> ObjectInfo: ...
    def mpu_abort(self, key: str, upload_id: str) -> None: ...
    def copy(self, src: str, dst: str, size: int, metadata: dict,
             src_key_fp: str | None, src_etag: str | None = None) -> ObjectInfo: ...
    def copy_as_is(self, src: str, dst: str, size: int) -> ObjectInfo: ...
    def copy_as_is_many(self, items: list[tuple[str, str, int]]) -> list: ...
    def delete(self, key: str) -> None: ...
    def delete_many(self, keys: list[str]) -> None: ...
    def list_page_iter(self, prefix: str, delimiter: str | None = "/",
                       max_keys: int = 1000,
                       start_after: str | None = None) -> Iterator[ListPage]: ...


def delete_tree(store: Store, keys: list[str], root: str) -> None:
    """Delete a tree of keys under root and the directory keys ("d/") they imply below it,
    with store.delete_many, a group after the other (tree_groups)."""
    for group in tree_groups(keys, root):
        store.delete_many(group)


def tree_groups(keys: list[str], root: str) -> list[list[str]]:
    """The deletes of a tree of keys under root, as groups each sent after the one before:
    the files, then the directory keys ("d/") they imply below root, level by level, deepest
    first. SeaweedFS keeps listing a "d/" key that still has children, and an emptied
    implicit directory until its "d/" is deleted; in this order nothing is left behind. (On
    AWS deleting a key that does not exist is harmless.)"""
    implied = set()
    for k in keys:
        parts = k.rstrip("/").split("/")[:-1]
        for n in range(1, len(parts) + 1):
            implied.add("/".join(parts[:n]) + "/")
    todo = set(keys) | {d for d in implied if d.startswith(root)}   # never above the tree
    levels: dict[int, list[str]] = {}
    for k in todo:
        if k.endswith("/"):
            levels.setdefault(k.count("/"), []).append(k)
    groups = [sorted(k for k in todo if not k.endswith("/"))] + \
        [sorted(levels[n]) for n in sorted(levels, reverse=True)]
    return [g for g in groups if g]
