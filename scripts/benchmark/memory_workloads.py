"""Memory workloads (--memory, or named in --only), on mounted filesystems only:
`ls -l` of a directory of many files another tool wrote, and a huge file written and read
back, each with the daemon's peak RSS."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .common import MB, MiB, BenchError, progress, vm_hwm_kib
from .fs_workloads import ls_count

POOL = 64 * MiB          # random bytes the huge file is made of


def ensure_big_dir(b, t) -> str:
    """b.big_dir_n objects PUT straight into the target's bucket (as another tool would leave
    them: no attributes of any mount's own), once per bucket; untimed, so they go to
    SeaweedFS directly (the poller's client), not through the delay proxy."""
    d = "bigdir"
    if d in t.have:
        return d
    n = b.big_dir_n
    progress(f"{t.column}: putting {n:,} objects under {d}/ with boto3 (untimed)")
    done = [0]
    lock = threading.Lock()

    def put(i: int) -> None:
        b.poller.s3.put_object(Bucket=t.bucket, Key=f"{d}/f{i:07d}", Body=b"%016d" % i,
                               **b.sse)
        with lock:
            done[0] += 1
            if done[0] % 10_000 == 0:
                progress(f"{t.column}: {done[0]:,} of {n:,} put")
    with ThreadPoolExecutor(max_workers=32) as ex:
        list(ex.map(put, range(n)))
    t.have.add(d)
    return d


def big_dir(b, t):
    d = ensure_big_dir(b, t)
    t.cold()                  # a fresh daemon: VmHWM covers these listings only
    pid = t.pid()
    if not pid:
        raise BenchError("no daemon pid")
    timeout = 600 + b.big_dir_n / 50
    first = ls_count(t.p(d), b.big_dir_n, "16", timeout)
    again = ls_count(t.p(d), b.big_dir_n, "16", timeout)
    hwm = vm_hwm_kib(pid)
    return ({"big_dir_ls": first, "big_dir_ls2": again, "big_dir_rss": hwm / 1024},
            {"pid": pid, "files": b.big_dir_n})


class HugeData:
    """MiB number i of the huge file: a slice of a random pool at an offset that moves with
    i (no two neighbouring MiBs alike; random, so nothing compresses)."""

    def __init__(self):
        self.pool = os.urandom(POOL)

    def block(self, i: int) -> memoryview:
        off = (i * 257 * 4096) % (POOL - MiB)
        return memoryview(self.pool)[off:off + MiB]


def fresh_pid(t, drop: bool) -> int:
    t.cold(drop=drop)         # a fresh daemon: VmHWM covers what follows only
    pid = t.pid()
    if not pid:
        raise BenchError("no daemon pid")
    return pid


def write_huge(path: str, size: int, data: HugeData) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(size // MiB):
            view = data.block(i)
            while view:
                view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def read_huge(path: str, size: int, data: HugeData) -> None:
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(MiB)
    try:
        for i in range(size // MiB):
            got = 0
            while got < MiB:
                n = os.preadv(fd, [memoryview(buf)[got:]], i * MiB + got)
                if not n:
                    raise BenchError(f"{path}: short read at {i * MiB + got}")
                got += n
            if buf != data.block(i):
                raise BenchError(f"{path}: WRONG DATA read back in MiB {i}")
        if os.pread(fd, 1, size):
            raise BenchError(f"{path}: longer than {size} bytes")
    finally:
        os.close(fd)


def huge(b, t, run_no: int):
    rel, size = f"huge-{run_no}.bin", b.huge_size
    data = b.huge_data = b.huge_data or HugeData()
    pid = fresh_pid(t, drop=False)
    t0 = time.monotonic()
    write_huge(t.p(rel), size, data)
    t_dur = b.poller.wait_object(t.bucket, rel, size, 600 + size / (10 * MB))  # >= 10 MB/s
    hwm_w = vm_hwm_kib(pid)
    pid_r = fresh_pid(t, drop=True)   # another fresh daemon, empty cache, caches dropped
    t1 = time.monotonic()
    read_huge(t.p(rel), size, data)
    t2 = time.monotonic()
    hwm_r = vm_hwm_kib(pid_r)
    os.unlink(t.p(rel))       # (frees the space for the next run)
    return ({"huge_rss_write": hwm_w / 1024, "huge_rss_read": hwm_r / 1024},
            {"write_durable_mb_s": size / MB / (t_dur - t0),
             "read_cold_mb_s": size / MB / (t2 - t1)})
