"""Small parts every module of the benchmark uses: units, progress lines, the one error type,
SSE-C parameters, processes, and file I/O with checks."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from seaweed import copy_source_sse, sse_params  # noqa: F401  (re-exported)
from ssecfs.commands.cli import pid_alive  # noqa: F401  (re-exported for the mounts)

MiB = 1024 * 1024
GiB = 1024 * MiB
MB = 1e6
SMALL = 4096            # bytes of each small file
DIR_FILES = 100         # files of the directory that mv_dir moves

T_START = time.monotonic()


def progress(msg: str) -> None:
    try:
        print(f"[bench {time.monotonic() - T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)
    except OSError:
        pass        # stderr on a full disk: the run (and its cleanup) goes on without it


class BenchError(Exception):
    pass


def human(n: int) -> str:
    if n % GiB == 0:
        return f"{n // GiB} GiB"
    if n % MiB == 0:
        return f"{n // MiB} MiB"
    return f"{n / MiB:.1f} MiB"


def fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def echoed(md5_header: str | None) -> set:
    """The key MD5s an SSE-C answer echoes (SeaweedFS repeats it: "md5, md5")."""
    return {x.strip() for x in (md5_header or "").split(",") if x.strip()}


def wait_pid_gone(pid: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def proc_cpu(pid: int) -> float:
    """CPU-seconds (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise BenchError(f"no VmHWM in /proc/{pid}/status")


def stop_process(proc: subprocess.Popen | None, grace: float) -> None:
    """Wait up to `grace` s for a child to end, then terminate it, then kill it."""
    if proc is None or proc.poll() is not None:
        return
    for action, wait in ((None, grace), (proc.terminate, 10), (proc.kill, None)):
        if action is not None:
            action()
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(path: str, n: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return f"(no log at {path})"


def run(argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, **kw)
    except subprocess.TimeoutExpired:
        raise BenchError(f"`{' '.join(argv)}` did not finish within {timeout:.0f}s "
                         "(hung?)") from None


def check_run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """run(), and a BenchError naming the command when it fails."""
    r = run(argv, timeout)
    if r.returncode != 0:
        raise BenchError(f"{argv[0]} failed (exit {r.returncode}): {r.stderr.strip()[:300]}")
    return r


def write_file_from(src_fd: int, dst: str, size: int, bs: int = MiB) -> None:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pos = 0
        while pos < size:
            buf = os.pread(src_fd, min(bs, size - pos), pos)
            if not buf:
                raise BenchError("source file too short")
            view = memoryview(buf)
            while view:
                view = view[os.write(fd, view):]
            pos += len(buf)
    finally:
        os.close(fd)


def read_and_verify(path: str, expect_mm, size: int, bs: int = MiB) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while True:
            buf = os.read(fd, bs)
            if not buf:
                break
            if expect_mm is not None and buf != expect_mm[pos:pos + len(buf)]:
                raise BenchError(f"{path}: WRONG DATA read back in bytes {pos}..{pos + len(buf)}")
            pos += len(buf)
    finally:
        os.close(fd)
    if pos != size:
        raise BenchError(f"{path}: read {pos} bytes, expected {size}")


def write_small(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if os.write(fd, data) != len(data):
            raise BenchError(f"{path}: short write")
    finally:
        os.close(fd)


def read_small(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        out = b""
        while True:
            b = os.read(fd, 65536)
            if not b:
                return out
            out += b
    finally:
        os.close(fd)


def write_secret(path: str, data: bytes) -> None:
    """A new file only its owner can read (keys)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
