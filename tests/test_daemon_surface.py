"""The daemon's own surface: no core dumps or ptrace, a runtime directory and registry no other
user can plant, a log file opened through no link, and no file names in the cache directory."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from ssecfs.mount import daemon, registry
from ssecfs.errors import EXIT_SECURITY, UserError
from helpers import read_cold

OTHER_UID = 65534


def test_harden_process_disables_core_dumps_and_ptrace():
    """Run in a child: the settings last for the life of the process that makes them."""
    code = ("import ctypes, resource\n"
            "from ssecfs.mount.daemon import harden_process\n"
            "harden_process()\n"
            "libc = ctypes.CDLL(None)\n"
            "print(libc.prctl(3, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split(None, 1)
    assert out[0] == "0", "PR_GET_DUMPABLE must say 0 (not dumpable)"
    assert out[1].strip() == "(0, 0)", "RLIMIT_CORE soft and hard must be 0"


def test_runtime_dir_never_under_a_shared_tmp(monkeypatch, tmp_path):
    """Without XDG_RUNTIME_DIR, a user's runtime directory is under its home, not a /tmp
    path another user could create first."""
    for f in ("getuid", "geteuid"):
        monkeypatch.setattr(os, f, lambda: 4242)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    d = registry.runtime_dir()
    assert d.startswith(str(tmp_path) + "/") and not d.startswith("/tmp/ssecfs"), d
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/4242")
    assert registry.runtime_dir() == "/run/user/4242/ssecfs"


def test_private_dir_made_0700_and_checked(tmp_path):
    d = str(tmp_path / "a" / "run")
    assert registry.private_dir(d) == d
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700
    os.chmod(d, 0o755)                      # ours, only readable by others: tightened
    registry.private_dir(d)
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700


@pytest.mark.parametrize("plant", ["link", "other_owner", "world_writable", "file"])
def test_private_dir_refuses_what_another_user_could_have_planted(tmp_path, plant):
    d = tmp_path / "run"
    if plant == "link":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        os.symlink(tmp_path / "elsewhere", d)
    elif plant == "file":
        d.write_text("")
    else:
        d.mkdir(mode=0o700)
        if plant == "other_owner":
            os.chown(d, OTHER_UID, -1)
        else:
            os.chmod(d, 0o777)
    with pytest.raises(UserError) as e:
        registry.private_dir(str(d))
    assert e.value.exit_code == EXIT_SECURITY and "\n" not in str(e.value)
    assert str(d) in str(e.value)


def test_registry_written_through_no_link_and_not_read_from_a_foreign_dir(monkeypatch, tmp_path):
    run = tmp_path / "run"
    monkeypatch.setattr(registry, "runtime_dir", lambda: str(run))
    registry.private_dir(str(run))
    mp = str(tmp_path / "mnt")
    # a link planted at the registry's name must not redirect the write
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    os.symlink(victim, registry.registry_path(mp))
    registry.write_registry(mp, {"pid": 1})
    assert victim.read_text() == "untouched"
    assert not os.path.islink(registry.registry_path(mp))
    assert stat.S_IMODE(os.stat(registry.registry_path(mp)).st_mode) == 0o600
    assert registry.read_registry(mp) == {"pid": 1}
    # a runtime directory that is not ours alone: what is in it is not believed
    os.chmod(run, 0o777)
    assert registry.read_registry(mp) is None
    os.chmod(run, 0o700)
    os.chown(run, OTHER_UID, -1)
    assert registry.read_registry(mp) is None


def test_log_file_opened_through_no_link_mode_0600(tmp_path):
    target = tmp_path / "target"
    target.write_text("")
    link = tmp_path / "x.log"
    os.symlink(target, link)
    with pytest.raises(UserError) as e:
        daemon.open_log_file(str(link))
    assert "symbolic link" in str(e.value)
    p = tmp_path / "y.log"
    p.write_text("")
    os.chmod(p, 0o644)
    os.close(daemon.open_log_file(str(p)))
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    os.chown(p, OTHER_UID, -1)
    with pytest.raises(UserError):
        daemon.open_log_file(str(p))


def test_default_log_is_not_in_the_cache_dir(tmp_path):
    cache = str(tmp_path / "cache")
    log = daemon.default_log_file(cache)
    assert not log.startswith(cache + "/")
    assert log.startswith("/var/log/ssecfs/")     # as root
    assert daemon.default_log_file(cache) != daemon.default_log_file(cache + "2")


@pytest.mark.mount
def test_mounted_daemon_no_core_and_no_names_in_cache(mounter, bucket, key):
    """A real daemon: core dumps off (its limits), and nothing in the cache directory names
    a file: the log lives elsewhere, every file in the cache is sealed."""
    m = mounter(bucket, key[0], "--log-level", "DEBUG", default_log=True)
    pid = m.pid()
    with open(f"/proc/{pid}/limits") as f:
        core = [ln for ln in f if ln.startswith("Max core file size")][0].split()
    assert core[4:6] == ["0", "0"], core
    name = "distinctive-name-" + os.urandom(6).hex()
    with open(os.path.join(m.path, name), "wb") as f:
        f.write(os.urandom(300_000))
        f.flush()
        os.fsync(f.fileno())
    assert len(read_cold(os.path.join(m.path, name))) == 300_000
    reg = registry.read_registry(m.path)
    assert reg and stat.S_IMODE(os.stat(registry.registry_path(m.path)).st_mode) == 0o600
    m.umount()
    log = daemon.default_log_file(m.cache_dir)
    with open(log) as f:
        assert name in f.read(), "the DEBUG log should name the file (else this test proves nothing)"
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600
    for dirpath, _dirs, files in os.walk(m.cache_dir):
        for fn in files:
            assert name not in fn
            with open(os.path.join(dirpath, fn), "rb") as f:
                assert name.encode() not in f.read(), f"{fn} names a file in clear"
    os.unlink(log)
