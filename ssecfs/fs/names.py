"""Paths of the mount and the object keys they stand for: ``/a/b.txt`` <-> ``PREFIX + "a/b.txt"``,
a directory ``/a`` <-> its marker ``PREFIX + "a/"``. The limits of a name are checked here."""

from __future__ import annotations

from ..errors import InvalidName, NameTooLong
from .dirindex import INDEX_NAME

NAME_MAX = 255
KEY_MAX = 1024


def _bytes(s: str) -> int:
    return len(s.encode("utf-8", "surrogateescape"))


class Names:
    def __init__(self, prefix: str):
        self.prefix = prefix

    def check(self, path: str) -> None:
        """NameTooLong if path cannot be in this filesystem for its length: a component over
        NAME_MAX bytes, or an object key over KEY_MAX (S3's limit). A lookup checks first,
        as Linux's lookup of a name over 255 bytes answers ENAMETOOLONG whether or not the
        directory holds it: no such path can be there."""
        rel = path.lstrip("/").encode("utf-8", "surrogateescape")      # (once: every lookup)
        if _bytes(self.prefix) + len(rel) > KEY_MAX or (
                len(rel) > NAME_MAX and any(len(c) > NAME_MAX for c in rel.split(b"/"))):
            raise NameTooLong(path)

    @staticmethod
    def listable(name: str) -> bool:
        """Whether a name a listing shows (the part of a key below its directory's) is an
        entry of the mount: not the directory's own marker, not a deeper key, not the index,
        and short enough to be looked up (another tool may store longer names: like keys
        with an empty component, they have no POSIX spelling and are not shown)."""
        return bool(name) and "/" not in name and name != INDEX_NAME and _bytes(name) <= NAME_MAX

    def key_of(self, path: str) -> str:
        self.check(path)
        rel = path.lstrip("/")
        if INDEX_NAME in rel.split("/"):
            raise InvalidName(f"{path}: the name {INDEX_NAME} is reserved (directory index)")
        return self.prefix + rel

    def dir_key(self, path: str) -> str:
        """The key of directory path's marker (the prefix itself for the root)."""
        k = self.key_of(path)
        k = k + "/" if k and not k.endswith("/") else k
        if _bytes(k) > KEY_MAX:
            raise NameTooLong(path)          # the marker "dir/" is one byte longer
        return k

    @staticmethod
    def check_key(key: str) -> None:
        """NameTooLong if key is over KEY_MAX (a key a move would make)."""
        if _bytes(key) > KEY_MAX:
            raise NameTooLong(key)

    def can_be_dir(self, path: str) -> bool:
        """Whether path's marker key is within KEY_MAX (path itself is checked)."""
        return _bytes(self.key_of(path)) < KEY_MAX

    @staticmethod
    def split_key(key: str) -> tuple[str, str]:
        """An object key as (its directory's key, its name)."""
        i = key.rfind("/")
        return key[:i + 1], key[i + 1:]
