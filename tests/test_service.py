"""Run as a service: the systemd unit (systemd/ssecfs@.service), sd_notify readiness and stop,
keys passed with LoadCredential=, the mount.fuse / fstab calling convention, and a real
`mount -t fuse.ssecfs` through mount(8) and mount.fuse.

systemd is not PID 1 here, so the unit cannot be started for real. Besides
`systemd-analyze verify`, one test runs the unit's own command lines the way systemd would:
specifiers and environment expanded, credentials loaded, its capability bounding set,
no_new_privs and system call filter applied, a notify socket that only counts messages from the
main PID (NotifyAccess=main); then stop, a crash, the restart that re-uploads, a busy stop.
"""

from __future__ import annotations

import argparse
import ctypes.util
import errno
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest
from botocore.exceptions import ClientError

from conftest import _alive, fuse_available, make_keyfile
from helpers import REPO, sse, wait_until
from ssecfs.commands import cli
from ssecfs.mount.daemon import default_log_file
from ssecfs.errors import EXIT_FAILURE, UserError

UNIT = os.path.join(REPO, "systemd", "ssecfs@.service")
SSECFS_BIN = "/usr/local/bin/ssecfs"            # what the unit runs and mount.fuse finds
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# ============================================================================ helpers
def need_fuse() -> None:
    if not fuse_available():
        pytest.skip("FUSE needs /dev/fuse, fusermount and root")


def need_installed_bin() -> None:
    if not os.access(SSECFS_BIN, os.X_OK):
        pytest.skip(f"{SSECFS_BIN} missing: run scripts/install as root")


def fs_type_at(path: str) -> str | None:
    """The file system type mounted at `path` per /proc/self/mounts (works for dead FUSE
    mounts too, where os.path.ismount() says False)."""
    want = os.path.abspath(path)
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])
            if target == want:
                found = parts[2]          # the last one is the one on top
    return found


def object_bytes(s3, bucket, key, raw) -> bytes | None:
    try:
        return s3.get_object(Bucket=bucket, Key=key, **sse(raw))["Body"].read()
    except ClientError as e:
        if e.response["ResponseMetadata"]["HTTPStatusCode"] == 404:
            return None
        raise


def assert_all_in_bucket(s3, bucket, raw, files: dict[str, bytes], prefix: str = "") -> None:
    for name, data in files.items():
        got = object_bytes(s3, bucket, prefix + name, raw)
        assert got is not None, f"{name} is not in the bucket"
        assert got == data, f"{name}: {len(got)} bytes in the bucket, {len(data)} written"


def assert_none_in_bucket(s3, bucket, raw, files, prefix: str = "") -> None:
    for name in files:
        assert object_bytes(s3, bucket, prefix + name, raw) is None, \
            f"{name} already uploaded: the test needs its upload pending"


def some_files() -> dict[str, bytes]:
    return {"empty": b"", "one": b"1", "text.txt": b"hello service\n" * 100,
            "random.bin": os.urandom(700_000)}


def write_files(root: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)


def put_visible_file(s3, bucket, raw, key="already-there.txt", data=b"present before mount\n"):
    s3.put_object(Bucket=bucket, Key=key, Body=data, **sse(raw))
    return key, data


class NotifySocket:
    """Stands in for systemd's notify socket. Records (sender pid, fields) of every datagram;
    the sender's pid comes from SCM_CREDENTIALS, as systemd checks it for NotifyAccess=main."""

    def __init__(self, directory):
        path = os.path.join(str(directory), "notify.sock")
        if len(path) > 100:
            path = "@ssecfs-test-notify-" + uuid.uuid4().hex
        self.address = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + path[1:] if path.startswith("@") else path)
        self.messages: list[tuple[int, dict, float]] = []
        self._seen = 0

    def wait_for(self, key: str, value: str, timeout: float, proc=None, log=None):
        """Return (pid, fields, arrival time) of the next message with key=value, looking only
        at messages not examined by an earlier call. Fails at the deadline, or early if `proc`
        exits."""
        deadline = time.monotonic() + timeout
        while True:
            while self._seen < len(self.messages):
                pid, fields, t = self.messages[self._seen]
                self._seen += 1
                if fields.get(key) == value:
                    return pid, fields, t
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value} within {timeout}s; got {self.messages}"
                                     + (f"\nlog:\n{log()}" if log else ""))
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"process exited ({proc.returncode}) before {key}={value};"
                                     f" messages {self.messages}" + (f"\nlog:\n{log()}" if log else ""))
            self.sock.settimeout(min(left, 0.2))
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except socket.timeout:
                continue
            t = time.monotonic()
            pid = -1
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", cdata[:12])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((pid, fields, t))

    def close(self):
        self.sock.close()


class Cleanup:
    """Undo what a test started, even when it fails: only our own mounts and processes."""

    def __init__(self):
        self.mountpoints: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.pids: list[int] = []
        self.dirs: list[str] = []

    def run(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for mp in self.mountpoints:
            if fs_type_at(mp) == "fuse.ssecfs":
                subprocess.run(["fusermount", "-u", "-z", mp], capture_output=True)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for pid in self.pids:
            try:
                wait_until(lambda: not _alive(pid), 30, what=f"pid {pid} to exit")
            except AssertionError:
                os.kill(pid, signal.SIGKILL)
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def cleanup():
    c = Cleanup()
    yield c
    c.run()


# ============================================================================ (a) the unit file
@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    """systemd-analyze, installed from Debian's `systemd` package if missing."""
    tool = shutil.which("systemd-analyze")
    if tool:
        return tool
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("systemd-analyze is missing and cannot be installed here (needs root and "
                    "apt-get): apt-get install systemd")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "systemd"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:      # stale package lists: update once, then retry
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=900)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    tool = shutil.which("systemd-analyze")
    if not tool:
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
        pytest.skip(f"systemd-analyze is missing and `apt-get install systemd` failed: {last[0]}")
    return tool


def verify_problems(tool: str, unit_text: str, directory) -> tuple[int, list[str]]:
    """Run `systemd-analyze verify` on unit_text saved as ssecfs@test.service. Returns its exit
    code and the lines about this unit that report something ignored or wrong (those are
    only printed at debug level, and verify still exits 0 for them)."""
    path = os.path.join(str(directory), "ssecfs@test.service")
    with open(path, "w") as f:
        f.write(unit_text)
    r = subprocess.run([tool, "verify", path], capture_output=True, text=True, timeout=120,
                       cwd=str(directory), env={**os.environ, "SYSTEMD_LOG_LEVEL": "debug"})
    bad = re.compile(r"ignor|invalid|unknown|not executable|fail|error|missing|bad ", re.I)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines()
                if ("ssecfs@test.service:" in ln or path + ":" in ln) and bad.search(ln)
                # @system-service lists calls newer than this libseccomp knows: not ours
                and "Failed to parse system call" not in ln]
    return r.returncode, problems


def test_unit_passes_systemd_analyze_verify(systemd_analyze, tmp_path):
    need_installed_bin()
    with open(UNIT) as f:
        text = f.read()
    rc, problems = verify_problems(systemd_analyze, text, tmp_path)
    assert rc == 0 and not problems, "\n".join(problems)
    # The check itself catches a setting systemd ignores.
    (tmp_path / "broken").mkdir()
    rc, problems = verify_problems(systemd_analyze, text.replace(
        "[Service]\n", "[Service]\nNotifyAcess=main\n", 1), tmp_path / "broken")
    assert problems, "a misspelt setting went unnoticed"


class UnitFile:
    """Minimal reader of a unit file: sections, comments, continuation lines."""

    def __init__(self, path: str):
        self.entries: list[tuple[str, str, str]] = []
        section = ""
        pending = ""
        with open(path) as f:
            for raw in f:
                line = raw.rstrip("\n")
                if not pending and (not line.strip() or line.lstrip()[:1] in "#;"):
                    continue
                if line.endswith("\\"):
                    pending += line[:-1] + " "
                    continue
                line, pending = pending + line, ""
                if line.startswith("["):
                    section = line.strip("[] ")
                    continue
                key, _, value = line.partition("=")
                self.entries.append((section, key.strip(), value.strip()))

    def get(self, section: str, key: str) -> list[str]:
        return [v for s, k, v in self.entries if s == section and k == key]

    def one(self, section: str, key: str) -> str:
        values = self.get(section, key)
        assert len(values) == 1, f"{key}=: {values}"
        return values[0]


def test_unit_contract():
    u = UnitFile(UNIT)
    assert u.one("Service", "Type") == "notify"
    assert u.one("Service", "NotifyAccess") == "main"
    assert "network-online.target" in u.one("Unit", "After").split()
    assert "network-online.target" in u.one("Unit", "Wants").split()
    assert u.one("Service", "EnvironmentFile") == "/etc/ssecfs/%i.conf"
    assert "key:/etc/ssecfs/%i.key" in u.get("Service", "LoadCredential")
    start = shlex.split(u.one("Service", "ExecStart"))
    assert start[:2] == [SSECFS_BIN, "mount"]
    assert "--foreground" in start
    assert start[start.index("--keyfile") + 1] == "key"       # bare: from $CREDENTIALS_DIRECTORY
    assert u.one("Service", "CacheDirectory") == "ssecfs"
    assert u.one("Service", "Restart") == "on-failure"
    assert "/dev/fuse rw" in u.get("Service", "DeviceAllow")
    assert u.one("Service", "NoNewPrivileges") == "yes"
    assert u.one("Service", "LimitCORE") == "0"
    assert "umount" in u.one("Service", "ExecStop")
    stop = u.one("Service", "TimeoutStopSec")
    assert re.fullmatch(r"(\d+)min", stop) and int(stop[:-3]) >= 10, stop
    assert "CAP_SYS_ADMIN" in u.one("Service", "CapabilityBoundingSet").split()


# Each of these gives the service its own mount namespace, whose mounts are slaves of the
# host's: the FUSE mount would only exist inside the service (systemd.exec(5), MountFlags=).
NAMESPACING = {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
               "PrivateNetwork", "PrivateIPC", "PrivateUsers", "ReadWritePaths", "ReadOnlyPaths",
               "InaccessiblePaths", "ExecPaths", "NoExecPaths", "TemporaryFileSystem",
               "BindPaths", "BindReadOnlyPaths", "ProtectKernelTunables", "ProtectKernelModules",
               "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "ProcSubset",
               "RootDirectory", "RootImage", "MountAPIVFS", "LogNamespace", "DynamicUser",
               "MountFlags", "NetworkNamespacePath", "MountImages", "ExtensionImages"}


def test_unit_keeps_the_mount_visible_to_the_host():
    u = UnitFile(UNIT)
    offending = [(k, v) for s, k, v in u.entries
                 if s == "Service" and k in NAMESPACING and v not in ("no", "false", "0", "")]
    assert not offending, f"these settings hide the FUSE mount from the host: {offending}"
    assert not u.get("Service", "User"), "a non-root daemon cannot mount under NoNewPrivileges"
    # A RuntimeDirectory= is deleted when any instance stops, taking the others' registries.
    assert not u.get("Service", "RuntimeDirectory") or \
        u.get("Service", "RuntimeDirectoryPreserve") == ["yes"]


# ============================================================================ (c) mount.fuse argv
def parse(argv: list[str]):
    return cli._parser().parse_args(cli.normalize_argv(argv))


def test_mount_fuse_convention_is_a_mount(tmp_path):
    # mount.fuse runs `ssecfs SOURCE MOUNTPOINT -o OPTS`: mount(8) has dropped x-* and comment=,
    # mount.fuse drops _netdev, noauto, nofail, user and appends dev,suid (unless nodev/nosuid).
    key = tmp_path / "k"
    make_keyfile(key)
    args = parse(["my-bucket:photos/2024", "/mnt/secure", "-o",
                  f"rw,keyfile={key},endpoint_url=https://s3.example.net,dev,suid,_netdev"])
    assert args.command == "mount"
    cfg = cli.build_mount_config(args)
    assert cfg.store.bucket == "my-bucket" and cfg.fs.prefix == "photos/2024/"
    assert cfg.keyfile == str(key)
    assert cfg.store.endpoint_url == "https://s3.example.net"
    assert cfg.mountpoint == "/mnt/secure"
    assert not cfg.foreground and not cfg.fs.read_only and not cfg.allow_other
    assert cfg.fuse_options == ()
    # As mount.fuse passes ro,nodev,nosuid,noatime and ownership options.
    c = cli.build_mount_config(parse(["my-bucket", "/mnt/secure", "-o",
                                      "ro,nodev,nosuid,noatime,keyfile=/etc/ssecfs/key,"
                                      "endpoint_url=https://s3.example.net,allow_other,"
                                      "uid=1000,gid=1000,suid"]))
    assert c.keyfile == "/etc/ssecfs/key" and c.store.endpoint_url == "https://s3.example.net"
    assert c.fs.read_only and c.allow_other and (c.fs.uid, c.fs.gid) == (1000, 1000)


def test_fstab_options_as_written_are_accepted():
    # mount(8) strips x-* and comment= before it runs mount.fuse, but the same option string is
    # also given to `ssecfs SOURCE MP -o ...` by hand or by other tools: they are comments.
    opts = ("keyfile=/etc/ssecfs/key,endpoint_url=https://s3.example.net,_netdev,noauto,"
            "x-systemd.automount,x-systemd.mount-timeout=15min,nofail,comment=systemd.automount")
    c = cli.build_mount_config(parse(["my-bucket:prefix", "/mnt/secure", "-o", opts]))
    assert c.keyfile == "/etc/ssecfs/key" and c.store.endpoint_url == "https://s3.example.net"
    assert c.fuse_options == ()


def _mount_option_actions():
    p = cli._parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["mount"]._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest in ("help", "options") or action.help == argparse.SUPPRESS:
            continue
        yield action, longs[0]


SAMPLE_VALUES = {"keyfile": "/etc/ssecfs/other.key", "endpoint_url": "https://s3.example.net",
                 "region": "eu-west-3", "profile": "backup", "cache_dir": "/var/cache/x",
                 "cache_size": "3G", "log_level": "debug", "log_file": "/var/log/x.log",
                 "writeback_delay": "7.5", "upload_workers": "3", "attr_timeout": "4",
                 "fsync_timeout": "9", "flush_timeout": "600", "uid": "1234", "gid": "2345",
                 "file_mode": "0640", "dir_mode": "0750"}


def test_every_cli_option_has_an_o_spelling(tmp_path, monkeypatch):
    cfg = tmp_path / "aws-config"          # the profile SAMPLE_VALUES names must exist
    cfg.write_text("[profile backup]\nregion = eu-west-3\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(cfg))
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    values = {**SAMPLE_VALUES, "ca_bundle": str(ca)}
    src = ["b-u-c", "/mnt/x"]

    def build(argv):
        a = parse(argv)
        return cli.build_mount_config(a), a.log_file   # log_file is not part of MountConfig
    seen = []
    for action, flag in _mount_option_actions():
        name = flag[2:].replace("-", "_")
        seen.append(name)
        assert name in cli.O_VALUE or name in cli.O_FLAG, f"{flag} has no -o spelling"
        common = ([] if name == "keyfile" else ["--keyfile", "/etc/ssecfs/k"]) + \
                 ([] if name == "cache_size" else ["--cache-size", "1G"])
        if action.nargs == 0:
            via_cli, via_o = src + common + [flag], src + common + ["-o", name]
        else:
            v = values[name]
            via_cli, via_o = src + common + [flag, v], src + common + ["-o", f"{name}={v}"]
        got_cli, got_o = build(via_cli), build(via_o)
        assert got_cli == got_o, f"{flag} and -o {name} differ:\n{got_cli}\n{got_o}"
        if name not in ("keyfile", "cache_size"):
            assert got_o != build(src + common), f"-o {name} had no effect"
    assert {"keyfile", "endpoint_url", "cache_dir", "cache_size", "foreground", "read_only",
            "flush_timeout", "writeback_delay"} <= set(seen)


@pytest.mark.parametrize("opts", ["bogus", "keyfile=/k,frobnicate=3", "endpoint-urll=https://x"])
def test_unknown_o_option_is_one_line_usage_error(opts, capsys):
    with pytest.raises(UserError) as e:
        cli.build_mount_config(parse(["bkt", "/mnt/x", "--keyfile", "/k", "-o", opts]))
    assert e.value.exit_code == 2
    assert "\n" not in str(e.value) and "unknown mount option" in str(e.value)
    rc = cli.main(["bkt", "/mnt/x", "-o", f"keyfile=/k,{opts}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("ssecfs: unknown mount option"), err


def test_keyfile_bare_name_comes_from_credentials_directory(tmp_path, monkeypatch):
    from ssecfs.crypto.keys import load_keyring
    creds = tmp_path / "creds"
    creds.mkdir()
    raw = make_keyfile(creds / "key")
    os.chmod(creds / "key", 0o400)                 # as systemd writes credentials
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    # The CLI keeps the bare name (it must not become $PWD/key) ...
    cfg = cli.build_mount_config(parse(["bkt", "/mnt/x", "--keyfile", "key", "--cache-size", "1G"]))
    assert cfg.keyfile == "key"
    # ... and the key ring is the credential.
    ring = load_keyring(cfg.keyfile)
    assert ring.current.secret_forms()[0] == raw
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(UserError) as e:
        load_keyring("key")
    assert e.value.exit_code == 3


# ============================================================================ (b) foreground + sd_notify
def foreground(args, env, log_path, cleanup) -> subprocess.Popen:
    log = open(log_path, "ab")
    p = subprocess.Popen([sys.executable, "-m", "ssecfs", "mount", *args, "--foreground"],
                         env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                         cwd=REPO)
    log.close()
    cleanup.procs.append(p)
    return p


def read(path) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-4000:]
    except OSError:
        return ""


@pytest.mark.mount
def test_foreground_notify_ready_then_sigterm_flushes(seaweed, s3, bucket, tmp_path, cleanup):
    need_fuse()
    raw = os.urandom(32)
    creds = tmp_path / "creds"
    creds.mkdir()
    make_keyfile(creds / "key", raw)
    os.chmod(creds / "key", 0o400)
    seen_key, seen_data = put_visible_file(s3, bucket, raw)
    mp = tmp_path / "mnt"
    mp.mkdir()
    cleanup.mountpoints.append(str(mp))
    notify = NotifySocket(tmp_path)
    env = {**os.environ, "NOTIFY_SOCKET": notify.address, "CREDENTIALS_DIRECTORY": str(creds),
           "INVOCATION_ID": uuid.uuid4().hex}
    log = tmp_path / "daemon.log"
    proc = foreground([bucket, str(mp), "--keyfile", "key", "--endpoint-url", seaweed.endpoint,
                       "--cache-dir", str(tmp_path / "cache"), "--writeback-delay", "30"],
                      env, log, cleanup)

    pid, fields, _ = notify.wait_for("READY", "1", 60, proc, lambda: read(log))
    # At the moment READY=1 arrives the mount answers.
    assert os.path.ismount(mp), "READY=1 before the mount point is mounted"
    st = os.stat(mp / seen_key)
    assert st.st_size == len(seen_data)
    assert pid == proc.pid, "READY=1 must come from the main process (NotifyAccess=main)"

    files = some_files()
    write_files(str(mp), files)
    assert_none_in_bucket(s3, bucket, raw, files)            # pending (write-back delay 30 s)

    proc.send_signal(signal.SIGTERM)
    pid, _, _ = notify.wait_for("STOPPING", "1", 30, log=lambda: read(log))
    assert pid == proc.pid
    assert proc.wait(timeout=90) == 0, read(log)
    assert not os.path.ismount(mp)
    # Everything was uploaded before the process exited: no waiting here.
    assert_all_in_bucket(s3, bucket, raw, files)
    assert "Traceback" not in read(log), read(log)
    notify.close()


def ready_in_foreground(seaweed, bucket, keyfile, tmp_path, cleanup):
    """A daemon in the foreground on tmp_path/mnt, its uploads 30 s away, once READY=1:
    .proc, .mp, .notify, .log, and .args, .env to start it again."""
    need_fuse()
    mp = tmp_path / "mnt"
    mp.mkdir()
    cleanup.mountpoints.append(str(mp))
    notify = NotifySocket(tmp_path)
    env = {**os.environ, "NOTIFY_SOCKET": notify.address}
    log = tmp_path / "daemon.log"
    args = [bucket, str(mp), "--keyfile", keyfile, "--endpoint-url", seaweed.endpoint,
            "--cache-dir", str(tmp_path / "cache"), "--writeback-delay", "30"]
    proc = foreground(args, env, log, cleanup)
    notify.wait_for("READY", "1", 60, proc, lambda: read(log))
    return argparse.Namespace(proc=proc, mp=mp, notify=notify, log=log, args=args, env=env)


@pytest.mark.mount
def test_second_sigterm_during_final_upload_exits_cleanly(seaweed, s3, bucket, key, tmp_path,
                                                        cleanup):
    """systemd sends SIGTERM again when TimeoutStopSec= expires, and after a umount(8) of an
    fstab mount the daemon's unit is stopped with SIGTERM while it still uploads. That signal
    must not kill the daemon on the spot: it stops waiting, keeps the rest in the cache journal
    and exits 0; the next mount uploads what was left. Nothing is lost either way."""
    raw = key[1]
    d = ready_in_foreground(seaweed, bucket, key[0], tmp_path, cleanup)
    proc, mp, notify, log, args, env = d.proc, d.mp, d.notify, d.log, d.args, d.env
    files = {f"big{i}": os.urandom(16 << 20) for i in range(3)}
    write_files(str(mp), files)

    proc.send_signal(signal.SIGTERM)
    notify.wait_for("STOPPING", "1", 30, log=lambda: read(log))
    proc.send_signal(signal.SIGTERM)                       # while the uploads run
    rc = proc.wait(timeout=90)
    assert rc == 0, f"a SIGTERM during the final upload ended the daemon with {rc}\n{read(log)}"

    # Whatever was not uploaded is uploaded by the next mount: nothing lost.
    proc = foreground(args[:-2] + ["--writeback-delay", "0.2"], env, log, cleanup)
    notify.wait_for("READY", "1", 60, proc, lambda: read(log))
    wait_until(lambda: all(object_bytes(s3, bucket, n, raw) == d for n, d in files.items()),
               90, what="files left by the interrupted flush to be uploaded")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    notify.close()


def abort_fuse_connection(dev: int) -> None:
    """Cut a mount's connection to the kernel, as fusectl's `abort` does (fusectl is mounted
    if it is not: systemd mounts it at boot)."""
    conn = "/sys/fs/fuse/connections"
    if not os.path.ismount(conn):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", conn], check=True,
                       capture_output=True)
    assert os.major(dev) == 0, f"a FUSE mount has an anonymous device, not {dev:#x}"
    with open(f"{conn}/{os.minor(dev)}/abort", "w") as f:
        f.write("1")


@pytest.mark.mount
@pytest.mark.parametrize("detached", [True, False], ids=["detached", "attached"])
def test_connection_cut_under_the_daemon(seaweed, s3, bucket, key, tmp_path, cleanup, detached):
    """A connection cut (fusectl's abort) under a mount still attached leaves a dead mount:
    exit 1 and a line that says how to remove it. Cut after a lazy detach, it is an end the
    user asked for: exit 0. Either way the pending files are uploaded before the exit."""
    raw = key[1]
    d = ready_in_foreground(seaweed, bucket, key[0], tmp_path, cleanup)
    proc, mp, notify, log = d.proc, d.mp, d.notify, d.log
    files = some_files()
    write_files(str(mp), files)
    dev = os.stat(mp).st_dev
    holder = open(mp / next(iter(files)), "rb")
    try:
        if detached:
            subprocess.run(["umount", "-l", str(mp)], check=True, capture_output=True)
            assert fs_type_at(str(mp)) is None
        abort_fuse_connection(dev)
        rc = proc.wait(timeout=90)
    finally:
        try:
            holder.close()
        except OSError as e:               # the flush of close() met the cut connection
            if e.errno != errno.ENOTCONN:
                raise
    assert_all_in_bucket(s3, bucket, raw, files)
    text = read(log)
    if detached:
        assert rc == 0, text
        assert "unmounted" in text, text
    else:
        assert rc == EXIT_FAILURE, text
        assert f"connection of {mp} was cut" in text and "fusermount -u" in text, text
        assert fs_type_at(str(mp)) == "fuse.ssecfs", "the dead mount is not there any more"
        assert "unmounted" not in text, text
    assert "Traceback" not in text, text
    notify.close()


@pytest.mark.parametrize("dev, error, code, says", [
    (None, RuntimeError(1), EXIT_FAILURE, "FUSE mount of"),        # failed before serving
    ("gone", RuntimeError(1), 0, "as the kernel closed the detached mount"),
    ("gone", None, 0, None),                                         # umount: the usual end
    ("here", RuntimeError(1), EXIT_FAILURE, "was cut"),
    ("here", None, EXIT_FAILURE, "was cut"),                         # fusectl abort
], ids=["mount-failed", "detached-loop-error", "unmounted", "cut-loop-error", "cut"])
def test_how_the_fuse_loop_ended_decides_the_exit_code(monkeypatch, caplog, dev, error, code,
                                                       says):
    """The kernel ends a lazily detached mount when its last file closes and aborts the
    requests still queued; a libfuse thread that had just taken one reads ECONNABORTED and
    libfuse reports its loop as failed. No real mount loses that race on demand, so the
    decision is tested here: a loop error after the mount is gone is a normal end."""
    from types import SimpleNamespace
    from ssecfs.mount import adapter, daemon
    said: list[str] = []
    m = daemon.Mount(SimpleNamespace(mountpoint="/mnt/x"), None, None, None,
                     SimpleNamespace(say=said.append))

    def loop(ops, mountpoint, **options):
        m._dev = {None: None, "gone": os.makedev(0, 0xFFFFF), "here": os.stat("/").st_dev}[dev]
        if error:
            raise error
    monkeypatch.setattr(adapter, "SsecfsFUSE", loop)
    monkeypatch.setattr(daemon, "fuse_mount_options", lambda cfg: {})
    caplog.set_level("INFO", logger="ssecfs")
    assert m.serve() == code
    assert (says in caplog.text) if says else not caplog.text, caplog.text
    assert bool(said) == (dev is None), "only a mount that never served reports to the parent"


# ============================================================================ the unit, emulated
SECCOMP_WRAPPER = r'''
import ctypes, ctypes.util, json, os, sys
cfg = json.load(open(sys.argv[1]))
lib = ctypes.CDLL(ctypes.util.find_library("seccomp"), use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                       ctypes.c_uint, ctypes.c_void_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64),
                ("b", ctypes.c_uint64)]
ALLOW = 0x7fff0000
ctx = lib.seccomp_init(0x00050000 | cfg["errno"])
for name in cfg["allow"]:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        continue
    if name == "socket" and cfg["families"] is not None:
        for fam in cfg["families"]:
            cmp = Cmp(0, 4, fam, 0)                       # SCMP_CMP_EQ on the family
            assert lib.seccomp_rule_add_array(ctx, ALLOW, nr, 1, ctypes.byref(cmp)) == 0
        continue
    assert lib.seccomp_rule_add_array(ctx, ALLOW, nr, 0, None) == 0, name
assert lib.seccomp_load(ctx) == 0
os.execvpe(sys.argv[2], sys.argv[2:], os.environ)
'''


def syscall_groups(tool: str) -> dict[str, list[str]]:
    out = subprocess.run([tool, "syscall-filter"], capture_output=True, text=True,
                         check=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#") and current is not None:
            current.append(line.strip())
    return groups


def expand_syscalls(names, groups, out=None) -> set[str]:
    out = set() if out is None else out
    for n in names:
        if n.startswith("@"):
            expand_syscalls(groups[n], groups, out)
        else:
            out.add(n)
    return out


class EmulatedService:
    """Runs ssecfs@INSTANCE's command lines as systemd would, without systemd. /etc/ssecfs is
    redirected to a directory of the test; everything else is the unit's."""

    def __init__(self, unit: UnitFile, instance: str, etc: str, state: str, cache_root: str,
                 tool: str):
        self.unit, self.instance, self.etc, self.state = unit, instance, etc, state
        self.creds = os.path.join(state, "credentials", f"ssecfs@{instance}.service")
        # Short: the daemon binds CACHE_DIR/control.sock, and sun_path holds 107 bytes.
        self.cache_root = cache_root
        self.notify = NotifySocket(state)
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(state, "journal.log")
        svc = "Service"
        # Sandbox: NoNewPrivileges, CapabilityBoundingSet, SystemCallFilter (+ErrorNumber),
        # RestrictAddressFamilies. (DeviceAllow= is a cgroup filter: not emulated.)
        assert unit.one(svc, "NoNewPrivileges") == "yes"
        caps = [c.lower().removeprefix("cap_") for c in unit.one(svc, "CapabilityBoundingSet").split()]
        self.setpriv = ["setpriv", "--no-new-privs", "--bounding-set",
                        ",".join(["-all"] + ["+" + c for c in caps]), "--"]
        groups = syscall_groups(tool)
        allow = expand_syscalls(["@default"] + " ".join(unit.get(svc, "SystemCallFilter")).split(),
                                groups)
        fams = {"AF_UNIX": socket.AF_UNIX, "AF_INET": socket.AF_INET, "AF_INET6": socket.AF_INET6,
                "AF_NETLINK": socket.AF_NETLINK}
        families = [int(fams[f]) for f in unit.one(svc, "RestrictAddressFamilies").split()]
        cfg = {"allow": sorted(allow), "families": families,
               "errno": getattr(errno, unit.one(svc, "SystemCallErrorNumber"))}
        self.seccomp_cfg = os.path.join(state, "seccomp.json")
        with open(self.seccomp_cfg, "w") as f:
            json.dump(cfg, f)
        self.wrapper = os.path.join(state, "seccomp_exec.py")
        with open(self.wrapper, "w") as f:
            f.write(SECCOMP_WRAPPER)

    # -- systemd's expansions
    def spec(self, text: str) -> str:
        table = {"i": self.instance, "I": self.instance, "d": self.creds, "%": "%",
                 "n": f"ssecfs@{self.instance}.service"}

        def one(m):
            assert m.group(1) in table, f"specifier %{m.group(1)} not emulated"
            return table[m.group(1)]
        return re.sub(r"%(.)", one, text)

    def etc_path(self, path: str) -> str:
        assert path.startswith("/etc/ssecfs/"), path
        return os.path.join(self.etc, path[len("/etc/ssecfs/"):])

    def environment(self, extra: dict) -> dict:
        env = {"PATH": SYSTEMD_PATH, "INVOCATION_ID": uuid.uuid4().hex,
               "NOTIFY_SOCKET": self.notify.address, "CREDENTIALS_DIRECTORY": self.creds}
        cache = self.unit.get("Service", "CacheDirectory")
        if cache:
            env["CACHE_DIRECTORY"] = os.path.join(self.cache_root, cache[0])
        for value in self.unit.get("Service", "Environment"):
            for assignment in shlex.split(self.spec(value)):
                k, _, v = assignment.partition("=")
                env[k] = v
        for value in self.unit.get("Service", "EnvironmentFile"):
            path = self.etc_path(self.spec(value.lstrip("-")))
            with open(path) as f:
                for line in f:
                    line = line.strip()
                    if line and not line.startswith("#") and "=" in line:
                        k, _, v = line.partition("=")
                        env[k.strip()] = v.strip().strip('"')
        env.update(extra)
        return env

    def argv(self, line: str, env: dict) -> tuple[list[str], bool]:
        line = self.spec(line)
        ignore_failure = line.startswith("-")
        words = shlex.split(line.lstrip("-@+!:"))
        out = []
        for w in words:
            m = re.fullmatch(r"\$(\w+)", w)
            if m:
                out += env.get(m.group(1), "").split()
                continue
            out.append(re.sub(r"\$\$|\$\{(\w+)\}",
                              lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), ""), w))
        return out, ignore_failure

    def sandboxed(self, argv: list[str]) -> list[str]:
        return self.setpriv + [sys.executable, self.wrapper, self.seccomp_cfg] + argv

    def journal(self) -> str:
        return read(self.log_path)

    def run_control(self, key: str, extra: dict | None = None, timeout: float = 120):
        results = []
        for line in self.unit.get("Service", key):
            env = self.environment(extra or {})
            argv, ignore = self.argv(line, env)
            with open(self.log_path, "ab") as log:
                r = subprocess.run(self.sandboxed(argv), env=env, stdout=log,
                                   stderr=subprocess.STDOUT, timeout=timeout)
            assert r.returncode == 0 or ignore, f"{key} failed ({r.returncode}): {argv}\n{self.journal()}"
            results.append(r.returncode)
        return results

    # -- lifecycle
    def load_credentials(self):
        if os.path.isdir(self.creds):
            shutil.rmtree(self.creds)
        os.makedirs(self.creds, mode=0o700)
        sets = {}
        for value in self.unit.get("Service", "SetCredential"):
            cid, _, data = self.spec(value).partition(":")
            sets[cid] = data
        for value in self.unit.get("Service", "LoadCredential"):
            cid, _, path = self.spec(value).partition(":")
            src = self.etc_path(path)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(self.creds, cid))
            elif cid in sets:
                with open(os.path.join(self.creds, cid), "w") as f:
                    f.write(sets[cid])
            else:
                raise AssertionError(f"start fails: credential {cid} ({path}) missing")
            os.chmod(os.path.join(self.creds, cid), 0o400)

    def start(self, cleanup: Cleanup, timeout: float = 90):
        self.load_credentials()
        os.makedirs(self.environment({})["CACHE_DIRECTORY"], mode=0o700, exist_ok=True)
        self.run_control("ExecStartPre")
        env = self.environment({})
        argv, _ = self.argv(self.unit.one("Service", "ExecStart"), env)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.sandboxed(argv), env=env, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        cleanup.procs.append(self.proc)
        # PID 1 reaps its children at once; `ssecfs umount` counts a zombie as alive.
        threading.Thread(target=self.proc.wait, daemon=True).start()
        pid, fields, _ = self.notify.wait_for("READY", "1", timeout, self.proc, self.journal)
        assert pid == self.proc.pid, f"READY=1 from pid {pid}, main pid {self.proc.pid}: " \
            "systemd would ignore it (NotifyAccess=main)"
        return fields

    def stop(self, timeout: float = 120):
        """ExecStop= with $MAINPID, then what systemd does after it, then ExecStopPost=."""
        alive = self.proc.poll() is None
        extra = {"MAINPID": str(self.proc.pid)} if alive else {}
        self.run_control("ExecStop", extra, timeout)
        stopped_on_its_own = self.proc.poll() is not None or _wait_exit(self.proc, 5)
        if not stopped_on_its_own:            # systemd: SIGTERM the rest after ExecStop
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        self.run_control("ExecStopPost")
        return stopped_on_its_own

    def crash(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


def _wait_exit(proc, timeout) -> bool:
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


@pytest.mark.mount
def test_unit_lifecycle_emulated(systemd_analyze, seaweed, s3, bucket, tmp_path, cleanup):
    need_fuse()
    need_installed_bin()
    if not shutil.which("setpriv") or not ctypes.util.find_library("seccomp"):
        pytest.skip("needs setpriv (util-linux) and libseccomp to emulate the unit's sandbox")
    raw = os.urandom(32)
    etc = tmp_path / "etc-ssecfs"
    etc.mkdir(mode=0o700)
    make_keyfile(etc / "photos.key", raw)
    os.chmod(etc / "photos.key", 0o400)
    mp = tmp_path / "mnt"
    mp.mkdir()
    cleanup.mountpoints.append(str(mp))
    # Credentials through the optional AWS credentials file (LoadCredential=aws), not the conf.
    sw = seaweed.env()
    (etc / "photos.aws").write_text(f"[default]\naws_access_key_id = {sw['AWS_ACCESS_KEY_ID']}\n"
                                    f"aws_secret_access_key = {sw['AWS_SECRET_ACCESS_KEY']}\n")
    (etc / "photos.conf").write_text(
        "# ssecfs@photos\n"
        f"SSECFS_SOURCE={bucket}:pics\n"
        f"SSECFS_MOUNTPOINT={mp}\n"
        f"SSECFS_OPTIONS=endpoint_url={seaweed.endpoint},region=us-east-1,writeback_delay=30\n"
        "AWS_EC2_METADATA_DISABLED=true\n")
    state = tmp_path / "state"
    state.mkdir()
    cache_root = tempfile.mkdtemp(prefix="ssecfs-svc-", dir="/tmp")
    cleanup.dirs.append(cache_root)
    svc = EmulatedService(UnitFile(UNIT), "photos", str(etc), str(state), cache_root,
                          systemd_analyze)

    # start: READY=1 from the main pid, the mount answers, the cache is under CacheDirectory=
    fields = svc.start(cleanup)
    assert os.path.ismount(mp) and fs_type_at(str(mp)) == "fuse.ssecfs"
    status = dict(ln.split(":\t", 1) for ln in open(f"/proc/{svc.proc.pid}/status").read()
                  .splitlines() if ":\t" in ln)
    assert status["Seccomp"].strip() == "2" and status["NoNewPrivs"].strip() == "1", status
    assert int(status["CapEff"], 16) == (1 << 21) | (1 << 2), status     # SYS_ADMIN, DAC_READ_SEARCH
    assert fields.get("STATUS")
    assert os.listdir(os.path.join(cache_root, "ssecfs")), "cache not under $CACHE_DIRECTORY"
    files = some_files()
    write_files(str(mp), files)
    assert_none_in_bucket(s3, bucket, raw, files, "pics/")

    # crash: SIGKILL leaves a dead mount; the stop commands clear it, the restart re-uploads
    svc.crash()
    assert fs_type_at(str(mp)) == "fuse.ssecfs"
    svc.stop()
    assert fs_type_at(str(mp)) is None, f"dead mount left behind\n{svc.journal()}"
    svc.start(cleanup)
    for name, data in files.items():
        with open(mp / name, "rb") as f:
            assert f.read() == data, f"{name} changed across the crash"

    # stop: ExecStop unmounts and returns only once everything is uploaded and the daemon is gone
    more = {"after-restart.txt": os.urandom(300_000)}
    write_files(str(mp), more)
    assert svc.stop(), f"the daemon was still running after ExecStop\n{svc.journal()}"
    assert svc.proc.returncode == 0, svc.journal()
    pid, _, _ = svc.notify.wait_for("STOPPING", "1", 5)
    assert pid == svc.proc.pid
    assert fs_type_at(str(mp)) is None
    assert_all_in_bucket(s3, bucket, raw, {**files, **more}, "pics/")

    # busy: a file open in the mount makes the clean unmount fail; ExecStop detaches lazily,
    # says so, and the daemon uploads and exits once the file is closed. This time without
    # /etc/ssecfs/photos.aws (SetCredential= fallback): the credentials are in the conf file.
    os.unlink(etc / "photos.aws")
    with open(etc / "photos.conf", "a") as f:
        f.write(f"AWS_ACCESS_KEY_ID={sw['AWS_ACCESS_KEY_ID']}\n"
                f"AWS_SECRET_ACCESS_KEY={sw['AWS_SECRET_ACCESS_KEY']}\n")
    svc.start(cleanup)
    busy = {"busy.txt": b"written while busy\n"}
    write_files(str(mp), busy)
    holder = open(mp / "text.txt", "rb")
    outcome: list = []

    def stop_in_background():
        try:
            outcome.append(svc.stop())
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            outcome.append(e)
    try:
        stopper = threading.Thread(target=stop_in_background, daemon=True)
        stopper.start()
        wait_until(lambda: fs_type_at(str(mp)) is None or outcome, 30,
                   what="lazy detach of the busy mount")
        assert not outcome, f"stop ended while a file was open: {outcome}\n{svc.journal()}"
        assert svc.proc.poll() is None, "the daemon exited while a file was still open"
    finally:
        holder.close()
    stopper.join(120)
    assert not stopper.is_alive(), "ExecStop did not return after the last file was closed"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    assert svc.proc.returncode == 0, svc.journal()
    assert "detaching it lazily" in svc.journal()
    assert_all_in_bucket(s3, bucket, raw, busy, "pics/")
    assert "Traceback" not in svc.journal(), svc.journal()
    svc.notify.close()


# ============================================================================ (d) mount(8) / fstab
def mount_helper_env(seaweed) -> dict:
    # mount(8) -> mount.fuse -> /bin/sh -c 'ssecfs ...' keeps the environment (mount drops a few
    # dangerous variables such as LD_*), so the AWS credentials reach the daemon this way.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(seaweed.env())
    env["PATH"] = SYSTEMD_PATH
    return env


@pytest.mark.mount
def test_mount_t_fuse_ssecfs_then_umount_and_fusermount(seaweed, s3, bucket, key, tmp_path,
                                                        cleanup):
    need_fuse()
    need_installed_bin()
    if not shutil.which("mount.fuse") and not os.path.exists("/sbin/mount.fuse"):
        pytest.skip("mount.fuse (package fuse3) not installed")
    keyfile, raw = key
    mp = tmp_path / "point"
    mp.mkdir()
    cleanup.mountpoints.append(str(mp))
    cache = tmp_path / "cache"
    opts = (f"keyfile={keyfile},endpoint_url={seaweed.endpoint},cache_dir={cache},"
            "writeback_delay=30,_netdev,noauto,x-systemd.automount")
    env = mount_helper_env(seaweed)
    seen_key, seen_data = put_visible_file(s3, bucket, raw, key="docs/seen.txt")

    for round_, unmount in enumerate((["umount", str(mp)], ["fusermount", "-u", str(mp)])):
        r = subprocess.run(["mount", "-t", "fuse.ssecfs", f"{bucket}:docs", str(mp), "-o", opts],
                           env=env, capture_output=True, text=True, timeout=120)
        log = lambda: read(default_log_file(str(cache)))  # noqa: E731
        assert r.returncode == 0, f"mount failed: {r.stderr}\n{log()}"
        assert os.path.ismount(mp) and fs_type_at(str(mp)) == "fuse.ssecfs"
        with open(mp / "seen.txt", "rb") as f:
            assert f.read() == seen_data
        from ssecfs.mount.registry import read_registry
        pid = read_registry(str(mp))["pid"]
        cleanup.pids.append(pid)
        files = {f"r{round_}-{n}": d for n, d in some_files().items()}
        write_files(str(mp), files)
        assert_none_in_bucket(s3, bucket, raw, files, "docs/")

        r = subprocess.run(unmount, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{unmount}: {r.stderr}"
        assert not os.path.ismount(mp)
        # umount returns at once; the daemon uploads, then exits.
        wait_until(lambda: not _alive(pid), 90, what=f"daemon to finish uploading after {unmount[0]}")
        assert_all_in_bucket(s3, bucket, raw, files, "docs/")
        assert "unmounted" in log()


def test_umount_counts_an_exited_unreaped_daemon_as_gone():
    """`ssecfs umount` waits for the daemon's exit. The daemon is reparented once `ssecfs
    mount` returns, and some inits reap late (seconds): a zombie has exited."""
    live = subprocess.Popen(["sleep", "30"])
    dead = subprocess.Popen(["true"])
    try:
        def state(pid):
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[-1].split()[0]
        wait_until(lambda: state(dead.pid) == "Z", 10, what="the child to exit")
        assert not cli.pid_alive(dead.pid)
        assert cli.pid_alive(live.pid)
    finally:
        live.kill()
        live.wait()
        dead.wait()
    assert not cli.pid_alive(dead.pid)
