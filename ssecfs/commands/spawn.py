"""Starting the mount daemon in the background (`ssecfs mount` without --foreground): hand it
the validated MountConfig, wait for its first word, and turn that into an exit code.
"""

from __future__ import annotations

import dataclasses
import os
import select
import subprocess
import sys
import time

from ..config import MountConfig
from ..errors import EXIT_FAILURE

# glibc: serve the daemon's multi-MiB buffers (range GETs, upload parts) from the heap and
# keep it, instead of an mmap + page faults + munmap per buffer.
# Applied to the daemon `ssecfs mount` starts (the environment wins); the systemd unit sets
# the same.
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20),
                 "MALLOC_ARENA_MAX": "4"}


def spawn_daemon(cfg: MountConfig) -> int:
    """Start the daemon (python -m ssecfs.mount) in a new session, hand it `cfg` and wait for
    its first line: READY (exit 0) or ERROR CODE MESSAGE (print MESSAGE, exit CODE).

    The daemon gets the config this process validated, as JSON on an inherited pipe, rather
    than a command line rebuilt from it: an option is then declared once (parser, and its
    field in MountConfig), with nothing to keep in step. The JSON names the key file; the
    daemon reads the keys itself, after hardening its process."""
    from ..mount.daemon import default_log_file, open_log_file
    os.makedirs(cfg.cache_dir, mode=0o700, exist_ok=True)
    log_file = os.path.abspath(cfg.log_file or default_log_file(cfg.cache_dir))
    os.close(open_log_file(log_file))       # its problems are said here, in one line
    cfg = dataclasses.replace(cfg, log_file=log_file)
    cfg_r, cfg_w = os.pipe()
    ready_r, ready_w = os.pipe()
    argv = [sys.executable, "-m", "ssecfs.mount", "--config-fd", str(cfg_r),
            "--ready-fd", str(ready_w), cfg.source, cfg.mountpoint]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, pass_fds=(cfg_r, ready_w),
                            start_new_session=True, close_fds=True,
                            env={**MALLOC_TUNING, **os.environ})
    os.close(cfg_r)
    os.close(ready_w)
    try:
        os.write(cfg_w, cfg.to_json().encode())    # far below a pipe's capacity: one write
    except BrokenPipeError:             # the daemon is gone already: said below
        pass
    finally:
        os.close(cfg_w)
    line = _first_line(ready_r, proc, deadline=time.monotonic() + 300)
    return _outcome(line, proc, log_file)


def _first_line(fd: int, proc: subprocess.Popen, deadline: float) -> str:
    """The first line the daemon writes on `fd` ("" if it exits or the deadline passes)."""
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            part = os.read(fd, 4096)
            if not part:
                break
            buf += part
            if b"\n" in buf:
                break
        elif proc.poll() is not None:
            break
    os.close(fd)
    return buf.decode(errors="replace").strip()


def _outcome(line: str, proc: subprocess.Popen, log_file: str) -> int:
    if line == "READY":
        return 0
    if line.startswith("ERROR "):
        _, code, msg = line.split(" ", 2)
        print(f"ssecfs: {msg}", file=sys.stderr)
        return int(code)
    if proc.poll() is None:
        proc.terminate()
        print(f"ssecfs: mount did not become ready in time (see {log_file})", file=sys.stderr)
    else:
        print(f"ssecfs: daemon exited with status {proc.returncode} (see {log_file})",
              file=sys.stderr)
    return EXIT_FAILURE
