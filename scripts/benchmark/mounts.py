"""The filesystems under test, each mounted on its own directory over its own bucket:
ssecfs (through its CLI), s3fs-fuse and rclone mount (as our own child processes)."""

from __future__ import annotations

import base64
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

from ssecfs.mount.registry import read_registry

from .common import (BenchError, log_tail, pid_alive, progress, run, stop_process,
                     wait_pid_gone)


class Target:
    """A filesystem under test, mounted on self.mnt over s3://self.bucket. `b` is the run
    (benchmark.runner.Bench): its work dir, key files, endpoints and options."""

    name = column = "?"

    def __init__(self, bench, bucket: str):
        self.b = bench
        self.have: set[str] = set()      # what earlier steps left in the bucket, by name
        self.bucket = bucket
        self.mnt = bench.mkdir(f"mnt-{self.name}")
        self.log = os.path.join(bench.work, f"{self.name}.log")

    def p(self, rel: str) -> str:
        return os.path.join(self.mnt, rel)

    def mounted(self) -> bool:
        return os.path.ismount(self.mnt)

    def cold(self, drop: bool = True) -> None:
        """Unmount, clear the local cache, drop the kernel caches (if drop), mount again."""
        self.unmount()
        self.clear_cache()
        if drop:
            self.b.drop_caches()
        self.mount()

    def healthy(self) -> bool:
        if not self.mounted():
            return False
        try:
            return subprocess.run(["stat", "-t", self.mnt], capture_output=True,
                                  timeout=30).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def extra_log_errors(self) -> list[str]:
        return []

    def status(self) -> str:
        return ""

    def mount(self) -> None: ...
    def unmount(self) -> None: ...
    def clear_cache(self) -> None: ...
    def pid(self) -> int | None: ...
    def cleanup(self) -> None: ...


class SsecfsTarget(Target):
    name = column = "ssecfs"

    def __init__(self, bench):
        super().__init__(bench, "bench-ssecfs")
        self.cache = os.path.join(bench.work, "cache-ssecfs")
        self._pid: int | None = None
        self._log_pos = 0
        cli = os.path.join(os.path.dirname(sys.executable), "ssecfs")
        self.cli = [cli] if os.path.exists(cli) else [sys.executable, "-m", "ssecfs"]
        self.env: dict | None = None          # of every ssecfs command (None: ours)

    def mount_argv(self) -> list[str]:
        b = self.b
        argv = [*self.cli, "mount", self.bucket, self.mnt, "--keyfile", b.keyfile,
                "--endpoint-url", b.endpoint, "--cache-dir", self.cache, "--log-file", self.log]
        if b.args.tls:
            argv += ["--ca-bundle", b.cert]
        return argv + shlex.split(b.args.ssecfs_args or "")

    def mount(self) -> None:
        if self.mounted():
            return
        # own session: a Ctrl-C on the terminal must not hit `ssecfs mount` half-way
        proc = subprocess.Popen(self.mount_argv(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env=self.env)
        try:
            out, err = proc.communicate(timeout=360)
        except KeyboardInterrupt:
            # Killing `ssecfs mount` would leave its daemon starting up unseen: let it finish,
            # so that cleanup finds (and unmounts) what it mounted.
            progress("interrupted while ssecfs mounts: waiting for the mount to finish")
            try:
                proc.communicate(timeout=360)
            except subprocess.TimeoutExpired:
                proc.kill()
            self._pid = self.pid()
            raise
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise BenchError(f"ssecfs mount did not return within 360s -- daemon log {self.log}")
        if proc.returncode != 0 or not self.mounted():
            msg = [ln for ln in (err or out).splitlines() if ln.strip()]
            raise BenchError(f"ssecfs mount failed (exit {proc.returncode}): "
                             f"{msg[-1] if msg else ''} -- daemon log {self.log}")
        self._pid = self.pid()

    def unmount(self) -> None:
        if self.mounted():
            r = run([*self.cli, "umount", self.mnt], timeout=self.b.timeout_big + 120,
                    env=self.env)
            if r.returncode != 0:
                raise BenchError(f"ssecfs umount failed (exit {r.returncode}): "
                                 f"{r.stderr.strip()} -- daemon log {self.log}")
        if self._pid and not wait_pid_gone(self._pid, 60):
            raise BenchError(f"ssecfs daemon {self._pid} still running 60s after umount "
                             f"-- daemon log {self.log}")
        self._pid = None

    def clear_cache(self) -> None:
        if not os.path.isdir(self.cache):
            return
        for name in os.listdir(self.cache):
            p = os.path.join(self.cache, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)

    def pid(self) -> int | None:
        reg = read_registry(self.mnt)
        return reg["pid"] if reg else None

    def status(self) -> str:
        try:
            r = subprocess.run([*self.cli, "status", self.mnt], capture_output=True, text=True,
                               timeout=15, env=self.env)
            return (r.stdout or r.stderr).strip()
        except subprocess.TimeoutExpired:
            return "(ssecfs status did not answer in 15s)"

    def extra_log_errors(self) -> list[str]:
        """ERROR/Traceback lines the daemon logged since the last call."""
        try:
            with open(self.log, errors="replace") as f:
                f.seek(self._log_pos)
                text = f.read()
                self._log_pos = f.tell()
        except OSError:
            return []
        return [ln for ln in text.splitlines()
                if " ERROR " in ln or " CRITICAL " in ln or ln.startswith("Traceback")]

    def cleanup(self) -> None:
        pid = self._pid or self.pid()
        try:
            if self.mounted():
                subprocess.run([*self.cli, "umount", "--timeout", "60", self.mnt],
                               capture_output=True, timeout=120, env=self.env)
        except Exception as e:  # noqa: BLE001 - best effort
            progress(f"ssecfs cleanup: umount: {e}")
        if self.mounted():
            subprocess.run(["fusermount", "-u", "-z", self.mnt], capture_output=True)
        if pid_alive(pid) and not wait_pid_gone(pid, 30):
            progress(f"ssecfs cleanup: daemon {pid} still alive; SIGTERM")
            os.kill(pid, signal.SIGTERM)
            if not wait_pid_gone(pid, 15):
                os.kill(pid, signal.SIGKILL)
        self._pid = None


class BaselineTarget(SsecfsTarget):
    """ssecfs as it was at a git revision (--baseline REV): that revision's ssecfs/ package
    (exported with `git archive`) run by this venv's Python, the daemon included
    (PYTHONPATH comes before the editable install)."""

    name = column = "baseline"

    def __init__(self, bench, rev: str):
        Target.__init__(self, bench, "bench-baseline")
        self.cache = os.path.join(bench.work, "cache-baseline")
        self._pid = None
        self._log_pos = 0
        src = bench.mkdir("baseline-src")
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        archive = subprocess.run(["git", "-C", repo, "archive", rev, "ssecfs"],
                                 capture_output=True, timeout=60)
        if archive.returncode != 0:
            raise BenchError(f"--baseline {rev}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", src], input=archive.stdout, check=True, timeout=60)
        self.cli = [sys.executable, "-m", "ssecfs"]
        # (PYTHONSAFEPATH: `python -m` must not put the working directory, which may be
        # this checkout, before PYTHONPATH)
        self.env = {**os.environ, "PYTHONPATH": src, "PYTHONSAFEPATH": "1"}


class ProcTarget(Target):
    """A FUSE filesystem we run in the foreground as our own child process."""

    def __init__(self, bench, bucket: str):
        super().__init__(bench, bucket)
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]: ...
    def env(self) -> dict: ...

    def mount(self) -> None:
        if self.mounted():
            return
        with open(self.log, "ab") as logf:
            logf.write(f"\n==== {time.ctime()} mount\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, env=self.env(),
                                         start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.mounted():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        stop_process(self.proc, 60)
        self.proc = None
        raise BenchError(f"{self.name} mount failed; log {self.log}:\n{log_tail(self.log, 8)}")

    def unmount(self) -> None:
        if self.mounted():
            err = ""
            for _ in range(20):
                r = subprocess.run(["fusermount", "-u", self.mnt], capture_output=True, text=True)
                if r.returncode == 0 or not self.mounted():
                    break
                err = r.stderr.strip()
                time.sleep(0.5)
            else:
                raise BenchError(f"cannot unmount {self.name}: {err}")
        stop_process(self.proc, 60)
        self.proc = None

    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def cleanup(self) -> None:
        if self.mounted():
            r = subprocess.run(["fusermount", "-u", self.mnt], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["fusermount", "-u", "-z", self.mnt], capture_output=True)
        stop_process(self.proc, 20)
        self.proc = None


class S3fsTarget(ProcTarget):
    """s3fs-fuse with default options plus SSE-C (its key file holds the base64 key)."""

    name = "s3fs"
    column = "s3fs-fuse"

    def __init__(self, bench):
        super().__init__(bench, "bench-s3fs")
        self.passwd = os.path.join(bench.work, "s3fs.passwd")
        env = bench.sw.env()
        with open(self.passwd, "w", opener=lambda p, f: os.open(p, f, 0o600)) as f:
            f.write(f"{env['AWS_ACCESS_KEY_ID']}:{env['AWS_SECRET_ACCESS_KEY']}\n")

    def argv(self) -> list[str]:
        b = self.b
        return ["s3fs", self.bucket, self.mnt, "-f",
                "-o", f"url={b.endpoint},use_path_request_style",
                "-o", f"passwd_file={self.passwd}",
                "-o", f"use_sse=custom:{b.keyfile_b64}"]

    def env(self) -> dict:
        env = dict(os.environ)
        if self.b.args.tls:
            env["CURL_CA_BUNDLE"] = self.b.cert
        return env

    def clear_cache(self) -> None:
        pass        # default options: no local cache (use_cache is off)


class RcloneTarget(ProcTarget):
    """rclone mount, --vfs-cache-mode full, SSE-C; always over https (the AWS SDK for Go
    refuses to send SSE-C keys over plain http)."""

    name = column = "rclone"
    REMOTE = "BENCHS3"

    def __init__(self, bench):
        super().__init__(bench, "bench-rclone")
        self.cache = os.path.join(bench.work, "cache-rclone")
        self.conf = os.path.join(bench.work, "rclone.conf")
        open(self.conf, "a").close()     # empty: the remote comes from RCLONE_CONFIG_*

    def argv(self) -> list[str]:
        # The key goes in RCLONE_S3_SSE_CUSTOMER_KEY_BASE64 (same as --s3-sse-customer-key-base64,
        # but not visible in ps).
        return ["rclone", "mount", f"{self.REMOTE.lower()}:{self.bucket}", self.mnt,
                "--config", self.conf, "--vfs-cache-mode", "full", "--cache-dir", self.cache,
                "--s3-sse-customer-algorithm", "AES256", "--ca-cert", self.b.cert]

    def env(self) -> dict:
        b = self.b
        creds = b.sw.env()
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        p = f"RCLONE_CONFIG_{self.REMOTE}_"
        env.update({p + "TYPE": "s3", p + "PROVIDER": "Other", p + "ENV_AUTH": "false",
                    p + "ACCESS_KEY_ID": creds["AWS_ACCESS_KEY_ID"],
                    p + "SECRET_ACCESS_KEY": creds["AWS_SECRET_ACCESS_KEY"],
                    p + "REGION": "us-east-1", p + "ENDPOINT": b.https_endpoint,
                    p + "FORCE_PATH_STYLE": "true",
                    "RCLONE_S3_SSE_CUSTOMER_KEY_BASE64": base64.b64encode(b.raw_key).decode()})
        return env

    def clear_cache(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)

