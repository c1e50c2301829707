"""The Linux calls the cache needs beyond the os module: hole punching, starting a file's
write-out without waiting for it, a low CPU priority for background removal; and the
mapping of a full disk to the project's error."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import threading

from ..errors import NoSpace

log = logging.getLogger("ssecfs.cache")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
_SYNC_FILE_RANGE_WRITE = 2


def start_writeout(fd: int) -> None:
    """Start (not wait for) the disk write of the file's dirty pages: sync_file_range with
    SYNC_FILE_RANGE_WRITE. Without it the kernel keeps a big file's cache slots in memory
    until close(), whose fdatasync then writes them all at once while nothing else moves.
    Durability still comes from sync(); this only makes it quick."""
    try:
        _libc.sync_file_range(ctypes.c_int(fd), ctypes.c_int64(0), ctypes.c_int64(0),
                              ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))
    except (AttributeError, OSError):      # not Linux: the fdatasync at close does it all
        pass


def low_priority() -> None:
    """This thread's CPU (the kernel's work of its unlinks included) goes last (nice 19)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:
        pass


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        log.debug("removing %s: %s", path, e.strerror)


def punch_hole(fd: int, offset: int, length: int) -> bool:
    r = _libc.fallocate(ctypes.c_int(fd), ctypes.c_int(_FALLOC_PUNCH),
                        ctypes.c_longlong(offset), ctypes.c_longlong(length))
    return r == 0


def oserror_to_domain(e: OSError) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace("cache disk full")
    return e
