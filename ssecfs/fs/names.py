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

    def key_of(self, path: str) -> str:
        rel = path.lstrip("/")
        for comp in rel.split("/"):
            if _bytes(comp) > NAME_MAX:
                raise NameTooLong(path)
            if comp == INDEX_NAME:
                raise InvalidName(f"{path}: the name {INDEX_NAME} is reserved (directory index)")
        key = self.prefix + rel
        if _bytes(key) > KEY_MAX:
            raise NameTooLong(path)
        return key

    def dir_key(self, path: str) -> str:
        """The key of directory path's marker (the prefix itself for the root)."""
        k = self.key_of(path)
        k = k + "/" if k and not k.endswith("/") else k
        if _bytes(k) > KEY_MAX:
            raise NameTooLong(path)          # the marker "dir/" is one byte longer
        return k

    @staticmethod
    def split_key(key: str) -> tuple[str, str]:
        """An object key as (its directory's key, its name)."""
        i = key.rfind("/")
        return key[:i + 1], key[i + 1:]
