"""Fixtures: a real SeaweedFS per test session, fresh buckets and keys, real FUSE mounts.

Every mount is torn down even when a test fails (fusermount -u -z, then the daemon is
killed), so no test leaves anything mounted.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import uuid

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
sys.path.insert(0, os.path.dirname(__file__))

from helpers import run_ssecfs, wait_until  # noqa: E402
from proxy import S3Proxy  # noqa: E402
from seaweed import SeaweedFS  # noqa: E402


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount") is not None \
        and os.geteuid() == 0


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    sw = SeaweedFS(str(tmp_path_factory.mktemp("seaweed"))).start()
    os.environ.update(sw.env())
    yield sw
    sw.stop()


@pytest.fixture
def s3(seaweed):
    return seaweed.client()


@pytest.fixture
def bucket(seaweed):
    name = "t-" + uuid.uuid4().hex[:12]
    seaweed.create_bucket(name)
    yield name
    seaweed.delete_bucket(name)


def make_keyfile(path, raw: bytes | None = None) -> bytes:
    raw = raw or os.urandom(32)
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    return raw


@pytest.fixture
def key(tmp_path):
    """(path of a fresh raw key file, raw key bytes)"""
    p = tmp_path / "sse.key"
    return str(p), make_keyfile(p)


class Mount:
    def __init__(self, path, cache_dir, source, keyfile, endpoint, args, log_file=None):
        from ssecfs.mount.daemon import default_log_file
        self.path = str(path)
        self.cache_dir = str(cache_dir)
        self.source = source
        self.keyfile = keyfile
        self.endpoint = endpoint
        self.log_file = str(log_file) if log_file else default_log_file(self.cache_dir)
        self.args = list(args) + (["--log-file", self.log_file] if log_file else [])

    @property
    def log(self) -> str:
        try:
            with open(self.log_file) as f:
                return f.read()
        except OSError:
            return ""

    def pid(self) -> int | None:
        from ssecfs.mount.registry import read_registry
        reg = read_registry(self.path)
        return reg["pid"] if reg else None

    def mount(self, check=True) -> subprocess.CompletedProcess:
        r = run_ssecfs("mount", self.source, self.path, "--keyfile", self.keyfile,
                       "--endpoint-url", self.endpoint, "--cache-dir", self.cache_dir,
                       *self.args)
        if check:
            assert r.returncode == 0, f"mount failed: {r.stderr}\n{self.log[-3000:]}"
            assert os.path.ismount(self.path)
        return r

    def umount(self, check=True) -> subprocess.CompletedProcess:
        r = run_ssecfs("umount", self.path, timeout=300)
        if check:
            assert r.returncode == 0, f"umount failed: {r.stderr}"
            assert not os.path.ismount(self.path)
        return r

    def kill9(self) -> None:
        """Simulate a crash: SIGKILL the daemon, then clear the dead mount."""
        pid = self.pid()
        assert pid, "no daemon registered"
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _alive(pid), 10, what="daemon to die")
        subprocess.run(["fusermount", "-u", "-z", self.path], capture_output=True)
        wait_until(lambda: not os.path.ismount(self.path), 10, what="dead mount to go")

    def cleanup(self) -> None:
        pid = self.pid()
        if os.path.ismount(self.path):
            subprocess.run(["fusermount", "-u", "-z", self.path], capture_output=True)
        if pid and _alive(pid):
            try:
                wait_until(lambda: not _alive(pid), 30, what="daemon exit")
            except AssertionError:
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
    return True


@pytest.fixture
def mounter(seaweed, tmp_path, bucket):
    # (depends on `bucket` so that the bucket is deleted only after every mount is gone)
    """Factory: mounter(bucket, keyfile, *args, name="mnt") -> mounted Mount."""
    if not fuse_available():
        pytest.skip("FUSE needs /dev/fuse, fusermount and root")
    made: list[Mount] = []

    def make(bucket, keyfile, *args, name="mnt", cache_dir=None, mount=True,
             endpoint=None, default_log=False) -> Mount:
        """default_log: log where the daemon logs by default (else beside the test's files)."""
        mp = tmp_path / name
        mp.mkdir(exist_ok=True)
        cd = cache_dir or (tmp_path / f"cache-{name}")
        m = Mount(mp, cd, bucket, keyfile, endpoint or seaweed.endpoint,
                  ["--writeback-delay", "0.2", *args],
                  log_file=None if default_log else tmp_path / f"ssecfs-{name}.log")
        made.append(m)
        if mount:
            m.mount()
        return m

    yield make
    for m in made:
        m.cleanup()


@pytest.fixture
def mnt(mounter, bucket, key):
    """A mounted bucket: (Mount, bucket name, raw key)."""
    return mounter(bucket, key[0]), bucket, key[1]


# ---------------------------------------------------------------------------- other users
@pytest.fixture(scope="module")
def users():
    """Two throw-away system users, each with a group of its own; removed afterwards."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("setpriv"):
        pytest.skip("needs root, useradd and setpriv")
    made = []
    try:
        for _ in range(2):
            name = f"ssecfs-test-{uuid.uuid4().hex[:6]}"
            r = subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                                "--shell", "/usr/sbin/nologin", name],
                               capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot add a throw-away user: {r.stderr.strip()}")
            made.append(name)
        yield [pwd.getpwnam(n) for n in made]
    finally:
        for name in made:
            subprocess.run(["userdel", name], capture_output=True)
            subprocess.run(["groupdel", name], capture_output=True)   # if userdel left it


# ---------------------------------------------------------------------------- fault proxy
@pytest.fixture(scope="session")
def proxy_server(seaweed):
    """A fault-injecting S3 proxy (tests/proxy.py) in front of the session's SeaweedFS."""
    p = S3Proxy(seaweed.endpoint).start()
    yield p
    p.stop()


@pytest.fixture
def proxy(proxy_server, mounter):
    """The session's proxy, without faults. Depends on `mounter` so that its teardown (which
    releases every hold and removes every fault) runs before the mounts are cleaned up: a
    daemon flushing at unmount must not wait for a held upload."""
    proxy_server.clear()
    yield proxy_server
    proxy_server.clear()
