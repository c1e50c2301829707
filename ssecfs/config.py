"""Validated, frozen configuration, one dataclass per layer. No I/O, no argv."""

from __future__ import annotations

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
            raise UserError(f"invalid bucket name {b!r} (3-63 characters: letters, digits, - . _)", 2)


@dataclass(frozen=True)
class FsConfig:
    prefix: str = ""                 # "" or ends with "/"
    read_only: bool = False
    attr_timeout: float = 1.0
    writeback_delay: float = 2.0
    upload_workers: int = 8
    fsync_timeout: float = 0.0       # 0: wait until durable, however long
    dir_index: bool = True           # read and write per-directory attribute indexes
    uid: int | None = None
    gid: int | None = None

    def __post_init__(self):
        if self.prefix and (not self.prefix.endswith("/") or self.prefix.startswith("/")):
            raise UserError(f"invalid prefix {self.prefix!r}", 2)
        if self.upload_workers < 1:
            raise UserError("--upload-workers must be at least 1", 2)
        if self.writeback_delay < 0 or self.attr_timeout < 0 or self.fsync_timeout < 0:
            raise UserError("delays and timeouts must not be negative", 2)


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
        raise UserError(f"invalid size {text!r} (examples: 512M, 10G)", 2) from None
    if value <= 0:
        raise UserError(f"invalid size {text!r}: must be positive", 2)
    return int(value)
