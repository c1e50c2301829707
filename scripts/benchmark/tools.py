"""The tools around the benchmark: installing what is missing, fio, CPU pinning, versions."""

from __future__ import annotations

import os
import shutil
import subprocess

from .common import BenchError, progress


def apt_install(binary: str, package: str) -> bool:
    """Whether `binary` is there, after `apt-get install -y package` if it was not (root)."""
    if shutil.which(binary):
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        progress(f"{binary} is not installed and I cannot apt-get install it (not root)")
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in range(2):
        progress(f"apt-get install -y {package}")
        r = subprocess.run(["apt-get", "install", "-y", "-qq", package], capture_output=True,
                           text=True, env=env)
        if r.returncode == 0 and shutil.which(binary):
            return True
        if attempt == 0:
            progress("apt-get install failed; apt-get update and retry")
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
    progress(f"could not install {package}: {r.stderr.strip()[-300:]}")
    return False


def setup_fio(args, versions: dict) -> tuple[str, str]:
    """(label, description) of what measures the random reads: fio, else a Python loop."""
    rt = args.fio_runtime
    if not args.no_fio and apt_install("fio", "fio"):
        v = subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip()
        versions["fio"] = v
        return "fio", f"{v}, psync, O_DIRECT, {rt:g} s"
    why = "--no-fio" if args.no_fio else "fio unavailable"
    return "Python pread loop,", f"{why}: os.preadv loop, O_DIRECT, {rt:g} s"


def pin_cpus(server_pid: int, notes: list[str]) -> None:
    """--pin: SeaweedFS on one half of the CPUs, this process and all it starts (the raw
    clients, the mount daemons, cp/ls/fio, the delay proxy) on the other, as if the server
    were another machine (on a small machine the server's SSE-C work otherwise takes the
    client's CPU)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise BenchError("--pin needs at least 2 CPUs")
    half = len(cpus) // 2
    server, client = set(cpus[:half]), set(cpus[half:])
    for pid, cpuset in ((server_pid, server), (os.getpid(), client)):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), cpuset)
            except ProcessLookupError:
                pass
    notes.append(f"--pin: SeaweedFS on CPU {sorted(server)}, clients on CPU {sorted(client)}.")
    progress(f"pinned SeaweedFS to CPU {sorted(server)}, clients to CPU {sorted(client)}")


def tool_version(name: str) -> str:
    try:
        if name == "ssecfs":
            import ssecfs
            return ssecfs.__version__
        if name == "s3fs":
            out = subprocess.run(["s3fs", "--version"], capture_output=True, text=True).stdout
            return out.split("V", 1)[1].split()[0] if "V" in out else out.split("\n")[0]
        if name == "rclone":
            out = subprocess.run(["rclone", "version"], capture_output=True, text=True).stdout
            return out.split("\n")[0].replace("rclone ", "")
    except Exception:  # noqa: BLE001
        pass
    return "?"
