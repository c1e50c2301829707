"""The workloads on a mounted filesystem (ssecfs, s3fs-fuse, rclone): one method per step,
each returning ({row: value}, details)."""

from __future__ import annotations

import json
import mmap
import os
import random
import time

from .common import (DIR_FILES, MB, BenchError, check_run, human, progress,
                     read_and_verify, read_small, run, vm_hwm_kib, write_file_from, write_small)


class MountWorkloads:
    def __init__(self, bench, target):
        self.b = bench
        self.t = target
        self.column = target.column

    def run(self, step: str, run_no: int):
        return getattr(self, step)(run_no)

    # -- preparation (untimed) ----------------------------------------------------------------
    def ensure_big(self, run_no: int) -> str:
        b, t, rel = self.b, self.t, f"big-{run_no}.bin"
        if rel not in t.have:
            progress(f"{t.column}: preparing {rel} (untimed)")
            write_file_from(b.big_fd, t.p(rel), b.size)
            b.poller.wait_object(t.bucket, rel, b.size, b.timeout_big)
            t.have.add(rel)
        return rel

    def make_files(self, d: str, data: list[bytes]) -> None:
        os.mkdir(self.t.p(d))
        for i, blob in enumerate(data):
            write_small(self.t.p(f"{d}/f{i:05d}"), blob)

    def ensure_small(self, run_no: int) -> str:
        b, t, d = self.b, self.t, f"small-{run_no}"
        if d not in t.have:
            progress(f"{t.column}: preparing {b.n} small files (untimed)")
            self.make_files(d, b.small_data(run_no))
            b.poller.wait_listing(t.bucket, d + "/", b.small_expect(d), b.timeout_small)
            t.have.add(d)
        return d

    # -- big file -----------------------------------------------------------------------------
    def write(self, run_no: int):
        b, t, rel = self.b, self.t, f"big-{run_no}.bin"
        out = b.timed_write(t.bucket, rel, lambda: write_file_from(b.big_fd, t.p(rel), b.size),
                            returned="close_s")
        t.have.add(rel)
        return out

    def read_cold(self, run_no: int):
        b, t = self.b, self.t
        rel = self.ensure_big(run_no)
        t.cold()
        b.warm(b.src_big)
        t0 = time.monotonic()
        read_and_verify(t.p(rel), b.big_mm, b.size)
        dt = time.monotonic() - t0
        return {"read_cold": b.size / MB / dt}, {"seconds": dt}

    # -- small files --------------------------------------------------------------------------
    def small_create(self, run_no: int):
        b, t, d = self.b, self.t, f"small-{run_no}"
        t0 = time.monotonic()
        self.make_files(d, b.small_data(run_no))
        t_closed = time.monotonic()
        expect = b.small_expect(d)
        t_dur = b.poller.wait_listing(t.bucket, d + "/", expect, b.timeout_small)
        t.have.add(d)
        b.poller.verify_sse(t.bucket, expect)
        return ({"small_create": b.n / (t_dur - t0)},
                {"all_closed_s": t_closed - t0, "durable_s": t_dur - t0})

    def ls_cold(self, run_no: int):
        b, t = self.b, self.t
        d = self.ensure_small(run_no)
        t.cold()
        dt = ls_count(t.p(d), b.n, "4096", b.timeout_small)
        return {"ls_cold": dt}, {"seconds": dt}

    def small_read(self, run_no: int):
        b, t = self.b, self.t
        d = self.ensure_small(run_no)
        t.cold()
        t0 = time.monotonic()
        for i, blob in enumerate(b.small_data(run_no)):
            got = read_small(t.p(f"{d}/f{i:05d}"))
            if got != blob:
                raise BenchError(f"{d}/f{i:05d}: WRONG DATA ({len(got)} bytes read)")
        dt = time.monotonic() - t0
        return {"small_read": b.n / dt}, {"seconds": dt}

    def small_delete(self, run_no: int):
        b, t = self.b, self.t
        d = self.ensure_small(run_no)
        t0 = time.monotonic()
        check_run(["rm", "-r", t.p(d)], b.timeout_small)
        t_rm = time.monotonic()
        t.have.discard(d)
        t_gone = b.poller.wait_listing(t.bucket, d + "/", {}, b.timeout_small,
                                       gone_prefix=d + "/")
        if os.path.exists(t.p(d)):
            raise BenchError(f"after rm -r the mount still shows {d}")
        return {"small_delete": b.n / (t_gone - t0)}, {"rm_returned_s": t_rm - t0}

    # -- renames ------------------------------------------------------------------------------
    def mv_file(self, run_no: int):
        b, t = self.b, self.t
        src, dst = f"mv-{run_no}.bin", f"mv-{run_no}-moved.bin"
        progress(f"{t.column}: preparing a {human(b.mv_size)} file (untimed)")
        write_file_from(b.big_fd, t.p(src), b.mv_size)
        b.poller.wait_object(t.bucket, src, b.mv_size, b.timeout_big)
        t.cold(drop=False)
        t0 = time.monotonic()
        check_run(["mv", t.p(src), t.p(dst)], b.timeout_big)
        t_mv = time.monotonic()
        t_dur = b.poller.wait_object(t.bucket, dst, b.mv_size, b.timeout_big, gone=src)
        if os.path.exists(t.p(src)) or os.stat(t.p(dst)).st_size != b.mv_size:
            raise BenchError("after mv the mount shows the old name or a wrong size")
        return {"mv_file": t_dur - t0}, {"mv_returned_s": t_mv - t0}

    def mv_dir(self, run_no: int):
        b, t = self.b, self.t
        d, nd = f"dir-{run_no}", f"dir-{run_no}-moved"
        data = b.dir_data(run_no)
        progress(f"{t.column}: preparing a directory of {DIR_FILES} files (untimed)")
        self.make_files(d, data)
        b.poller.wait_listing(t.bucket, d + "/", b.small_expect(d, DIR_FILES), b.timeout_small)
        t.cold(drop=False)
        t0 = time.monotonic()
        check_run(["mv", t.p(d), t.p(nd)], b.timeout_small)
        t_mv = time.monotonic()
        expect = b.small_expect(nd, DIR_FILES)
        t_dur = b.poller.wait_listing(t.bucket, nd + "/", expect, b.timeout_small,
                                      gone_prefix=d + "/")
        b.poller.verify_sse(t.bucket, expect)
        names = sorted(os.listdir(t.p(nd)))
        if len(names) != DIR_FILES or read_small(t.p(f"{nd}/f00007")) != data[7]:
            raise BenchError(f"after mv the mount shows {len(names)} files in {nd} or wrong data")
        return {"mv_dir": t_dur - t0}, {"mv_returned_s": t_mv - t0}

    # -- random reads, memory -----------------------------------------------------------------
    def fio(self, run_no: int):
        b, t = self.b, self.t
        rel = self.ensure_big(run_no)
        path = t.p(rel)
        # twice, the kernel's page cache dropped in between (else the second read would not
        # reach the filesystem): ssecfs caches a big file read from start to end from its
        # second read on
        progress(f"{t.column}: reading {rel} twice so it is cached (untimed)")
        read_and_verify(path, None, b.size)
        b.drop_caches()
        read_and_verify(path, None, b.size)
        direct = True
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        except OSError as e:
            direct = False
            b.notes.append(f"{t.column}: O_DIRECT refused ({e.strerror}), so its random-read "
                           "figure is buffered I/O (kernel page cache)")
        if b.fio_label == "fio":
            iops = run_fio(path, direct, b.args.fio_runtime)
        else:
            iops = pread_loop(path, direct, b.size, b.args.fio_runtime)
        return {"fio": iops}, {"direct": direct, "tool": b.fio_label}

    def rss(self, run_no: int):
        b, t, rel = self.b, self.t, f"rss-{run_no}.bin"
        t.cold(drop=False)        # a fresh daemon: VmHWM covers this copy only
        pid = t.pid()
        if not pid:
            raise BenchError("no daemon pid (ssecfs: no mount registry entry)")
        b.warm(b.src_rss)
        start_kib = vm_hwm_kib(pid)
        t0 = time.monotonic()
        check_run(["cp", b.src_rss, t.p(rel)], b.timeout_big * 2)
        t_cp = time.monotonic()
        t_dur = b.poller.wait_object(t.bucket, rel, b.rss_size, b.timeout_big * 2)
        hwm = vm_hwm_kib(pid)
        return ({"rss": hwm / 1024},
                {"pid": pid, "hwm_before_mib": start_kib / 1024, "cp_s": t_cp - t0,
                 "durable_s": t_dur - t0})

    def big_dir(self, run_no: int):
        from .memory_workloads import big_dir
        return big_dir(self.b, self.t)

    def huge(self, run_no: int):
        from .memory_workloads import huge
        return huge(self.b, self.t, run_no)


def ls_count(path: str, n: int, size_text: str, timeout: float) -> float:
    """Seconds `ls -l path` takes; it must list n entries, each of that size."""
    t0 = time.monotonic()
    r = check_run(["ls", "-l", path], timeout)
    dt = time.monotonic() - t0
    lines = [ln for ln in r.stdout.splitlines() if ln and not ln.startswith("total")]
    bad = [ln for ln in lines if f" {size_text} " not in ln]
    if len(lines) != n or bad:
        raise BenchError(f"ls -l listed {len(lines)} entries (expected {n})"
                         + (f"; wrong size: {bad[0]!r}" if bad else ""))
    return dt


def run_fio(path: str, direct: bool, runtime: float) -> float:
    argv = ["fio", "--name=randread-qd1", f"--filename={path}", "--rw=randread", "--bs=4k",
            "--iodepth=1", "--numjobs=1", "--ioengine=psync", f"--direct={int(direct)}",
            "--readonly", "--time_based", f"--runtime={runtime:g}", "--ramp_time=1",
            "--norandommap", "--randrepeat=0", "--output-format=json"]
    r = run(argv, timeout=runtime + 120)
    if r.returncode != 0:
        raise BenchError(f"fio failed (exit {r.returncode}): "
                         f"{(r.stderr or r.stdout).strip()[-400:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}")
    return float(job["read"]["iops"])


def pread_loop(path: str, direct: bool, size: int, runtime: float) -> float:
    """4 KiB random reads for `runtime` s after a 1 s ramp, as fio's job above does."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    buf = mmap.mmap(-1, 4096)
    blocks = size // 4096
    rnd = random.Random(1)
    try:
        end = time.monotonic() + 1
        while time.monotonic() < end:
            os.preadv(fd, [buf], rnd.randrange(blocks) * 4096)
        n = 0
        t0 = time.monotonic()
        end = t0 + runtime
        while True:
            for _ in range(64):
                if os.preadv(fd, [buf], rnd.randrange(blocks) * 4096) != 4096:
                    raise BenchError("short 4 KiB read")
            n += 64
            if time.monotonic() >= end:
                break
        return n / (time.monotonic() - t0)
    finally:
        os.close(fd)
