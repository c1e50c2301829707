"""Shared test helpers: waiting with deadlines, SSE-C parameters, the ssecfs CLI."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time

import pytest
from botocore.exceptions import ClientError

from seaweed import sse_params as sse  # scripts/: on the path by tests/conftest.py

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"   # not root's own
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cache_files(entries_dir: str) -> list[str]:
    """The files of a cache's entries/ that hold something: data files of entries, not the
    spares (empty files made ahead of need: ssecfs/cache/spares.py)."""
    out = []
    for n in os.listdir(entries_dir):
        try:
            if os.path.getsize(os.path.join(entries_dir, n)) > 0:
                out.append(n)
        except FileNotFoundError:
            pass
    return sorted(out)


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    """Poll predicate() until it returns a truthy value; fail after the deadline."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - keep polling, report the last failure
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f" (last error: {last_exc!r})" if last_exc else ""))


def bucket_etags(s3, bucket: str) -> dict[str, str]:
    """Every key of the bucket with its ETag."""
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents") or []:
            out[o["Key"]] = o["ETag"]
    return out


def assert_sse_c_only(s3, bucket: str, key: str) -> None:
    """The server refuses the object without its key (400) and with another key (403)."""
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key=key)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key=key, **sse(os.urandom(32)))
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def ssecfs_cmd() -> list[str]:
    return [sys.executable, "-m", "ssecfs"]


def run_ssecfs(*args, env=None, timeout=120, check=False) -> subprocess.CompletedProcess:
    return subprocess.run(ssecfs_cmd() + [str(a) for a in args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=check)


def marker_blob(tag: bytes = b"SSECFS-PLAINTEXT-MARKER") -> tuple[bytes, bytes]:
    """A marker surrounded by random bytes (SeaweedFS gzips compressible data on disk, so a
    plain-text marker alone would prove nothing), and the data to write."""
    marker = tag + os.urandom(8).hex().encode()
    data = os.urandom(4096) + marker + os.urandom(4096)
    return marker, data


def scan_dir_for(root: str, needle: bytes) -> list[str]:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            try:
                with open(p, "rb") as f:
                    prev = b""
                    while True:
                        block = f.read(1 << 20)
                        if not block:
                            break
                        if needle in prev[-len(needle):] + block:
                            hits.append(p)
                            break
                        prev = block
            except OSError:
                continue
    return hits


def read_cold(path: str) -> bytes:
    """Read through the daemon (drop this file's pages from the kernel cache first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = bytearray()
        while True:
            b = os.read(fd, 4 << 20)
            if not b:
                return bytes(out)
            out += b
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """fsync() a directory of the mount: the deletes under it are done when it returns
    (docs/SEMANTICS.md, "Deletes")."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_UTIME_OMIT = (1 << 30) - 2
_AT_FDCWD = -100


def utimens(target, atime: int | None, mtime: int) -> None:
    """utimensat(path) or futimens(fd) with {atime, mtime} in whole seconds; atime None is
    UTIME_OMIT (what GNU tar and `touch -m` send). Symlinks are followed."""
    libc = ctypes.CDLL(None, use_errno=True)
    times = (_Timespec * 2)(_Timespec(0, _UTIME_OMIT) if atime is None else _Timespec(atime, 0),
                            _Timespec(mtime, 0))
    rc = libc.futimens(target, times) if isinstance(target, int) else \
        libc.utimensat(_AT_FDCWD, os.fsencode(target), times, 0)
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), None if isinstance(target, int) else target)


def as_user(user, script: str, cwd, groups: tuple = ()) -> subprocess.CompletedProcess:
    """Run `sh -c script` as user (its primary group; supplementary groups: only `groups`).
    The working directory is entered as root first: the user needs no access to the
    directories above the mount point."""
    ids = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    return subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", *ids,
                           "--", "sh", "-c", script], cwd=str(cwd), capture_output=True,
                          text=True, timeout=60, env={"PATH": SYSTEM_PATH, "LC_ALL": "C"})
