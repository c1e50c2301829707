"""Validated, frozen configuration, one dataclass per layer, and the parsing of option
values. No I/O, no argv."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .errors import UserError


@dataclass(frozen=True)
class StoreConfig:
    bucket: str
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    ca_bundle: str | None = None
    workers: int = 8

    def __post_init__(self):
        b = self.bucket
        if not (3 <= len(b) <= 63) or not all(c.isalnum() or c in "-._" for c in b) \
                or not b[0].isalnum():
            raise UserError(f"invalid bucket name {b!r} (3-63 characters: letters, digits, - . _)")


ID_MAX = 0xFFFFFFFE          # (uid_t) -1 means "no change" to chown(2): never an owner
RDEV_MAX = (1 << 64) - 1      # dev_t


@dataclass(frozen=True)
class FsConfig:
    prefix: str = ""                 # "" or ends with "/"
    read_only: bool = False
    attr_timeout: float = 1.0
    writeback_delay: float = 2.0
    upload_workers: int = 8
    fsync_timeout: float = 0.0       # 0: wait until durable, however long
    dir_index: bool = True           # read and write per-directory attribute indexes
    cache_every_read: bool = False   # cache a big file's units the first time they are read
    defer_deletes: bool = True       # journaled deletes sent in batches (store.deferred)
    # Owner and permission bits of what carries no attributes we can trust: objects without
    # ssecfs metadata or that no key of the ring opens, the root, directories without a
    # marker (attrs.AttrOps._meta_of). None: the mounting process's uid / gid.
    uid: int | None = None
    gid: int | None = None
    file_mode: int = 0o644
    dir_mode: int = 0o755

    def __post_init__(self):
        if self.prefix and (not self.prefix.endswith("/") or self.prefix.startswith("/")):
            raise UserError(f"invalid prefix {self.prefix!r}")
        for name in ("uid", "gid"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and 0 <= v <= ID_MAX):
                raise UserError(f"--{name} must be a number from 0 to {ID_MAX}")
        for name in ("file_mode", "dir_mode"):
            v = getattr(self, name)
            if not (isinstance(v, int) and 0 <= v <= 0o777):
                raise UserError(f"--{name.replace('_', '-')} must be permission bits "
                                "from 000 to 777 (octal)")
        if self.upload_workers < 1:
            raise UserError("--upload-workers must be at least 1")
        if self.writeback_delay < 0 or self.attr_timeout < 0 or self.fsync_timeout < 0:
            raise UserError("delays and timeouts must not be negative")


@dataclass(frozen=True)
class MountConfig:
    store: StoreConfig
    fs: FsConfig
    mountpoint: str
    keyfile: str
    cache_dir: str
    cache_size: int
    foreground: bool = False
    allow_other: bool = False
    fuse_options: tuple[str, ...] = ()
    log_level: str = "INFO"
    force: bool = False
    flush_timeout: float = 0.0
    source: str = field(default="")
    log_file: str | None = None

    # The daemon `ssecfs mount` starts in the background receives the validated config in
    # this form (mount/__main__.py): every option is then defined once, by its field here.
    # It names the key file, never a key.
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> MountConfig:
        d = json.loads(text)
        return cls(**{**d, "store": StoreConfig(**d["store"]), "fs": FsConfig(**d["fs"]),
                      "fuse_options": tuple(d["fuse_options"])})


def parse_source(source: str) -> tuple[str, str]:
    """BUCKET or BUCKET:PREFIX -> (bucket, prefix with a trailing slash or "")."""
    bucket, _, prefix = source.partition(":")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")


def parse_size(text: str) -> int:
    """'512M', '10G', '1048576' -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        value = float(t) * mult
    except ValueError:
        raise UserError(f"invalid size {text!r} (examples: 512M, 10G)") from None
    if value <= 0:
        raise UserError(f"invalid size {text!r}: must be positive")
    return int(value)


def parse_id(text: str, option: str) -> int:
    """'1000' -> 1000: a numeric user or group id, as mount(8) options give them."""
    t = text.strip()
    if not t.isdigit() or int(t) > ID_MAX:
        hint = "getent group NAME" if "gid" in option else "id -u NAME"
        raise UserError(f"invalid {option} {text!r}: a numeric id from 0 to {ID_MAX} "
                        f"(`{hint}` tells it)")
    return int(t)


def parse_mode(text: str, option: str) -> int:
    """'0640', '640' -> 0o640: permission bits in octal (no set-id or sticky bits)."""
    t = text.strip()
    if not t or any(c not in "01234567" for c in t) or int(t, 8) > 0o777:
        raise UserError(f"invalid {option} {text!r}: permission bits in octal, from 000 to "
                        "777 (e.g. 0640)")
    return int(t, 8)
