"""End-to-end error behaviour: CLI refusals (one line on stderr, documented exit code, no key
material), read-only mounts, wrong keys, plaintext objects, and errno values of ordinary
failing operations on a real mount.

Exit codes (each UserError class of ssecfs/errors.py carries its own): 1 failure at run time,
2 usage, 3 key file, 4 bucket/endpoint/credentials, 5 security refusal, 6 cache dir,
7 mountpoint, 8 wrong key.
"""

from __future__ import annotations

import base64
import errno
import os
import socket
import subprocess
import time
import uuid

import pytest

from helpers import bucket_etags, sse, wait_until
from ssecfs import errors
from ssecfs.commands import cli, spawn

pytestmark = pytest.mark.mount


# ---------------------------------------------------------------------------- helpers
def write_key(path, raw: bytes | None = None, mode: int = 0o600) -> bytes:
    raw = os.urandom(32) if raw is None else raw
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    os.chmod(path, mode)
    return raw


def secret_forms(raw: bytes) -> list[str]:
    return [base64.b64encode(raw).decode(), raw.hex(), raw.hex().upper(),
            base64.urlsafe_b64encode(raw).decode()]


def assert_no_key_material(text: str, *raws: bytes) -> None:
    for raw in raws:
        for form in secret_forms(raw):
            assert form not in text, "key material leaked"
        assert raw.decode("latin-1") not in text, "raw key bytes leaked"


def assert_refused(m, r: subprocess.CompletedProcess, code: int, *words: str,
                   raws: tuple[bytes, ...] = ()) -> str:
    """The mount was refused with exit `code` and exactly one stderr line "ssecfs: ..."
    (containing `words`), nothing got mounted, and no key material is in stderr or the log."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, f"exit {r.returncode} (want {code}); stderr: {r.stderr!r}"
    assert len(lines) == 1, f"want one line on stderr, got: {r.stderr!r}"
    assert lines[0].startswith("ssecfs: "), lines[0]
    for w in words:
        assert w.lower() in lines[0].lower(), f"{w!r} not in {lines[0]!r}"
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    assert not os.path.ismount(m.path)
    assert_no_key_material(r.stderr, *raws)
    assert_no_key_material(m.log, *raws)
    return lines[0]


def closed_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def errno_of(fn, *args) -> int:
    with pytest.raises(OSError) as e:
        fn(*args)
    return e.value.errno


def put_sse(s3, bucket, key, data, raw, mode=0o100644):
    s3.put_object(Bucket=bucket, Key=key, Body=data, **sse(raw),
                  Metadata={"mode": str(mode), "uid": str(os.getuid()),
                            "gid": str(os.getgid()), "mtime": "1700000000"})


# ---------------------------------------------------------------------------- exit codes
DOCUMENTED_EXIT_CODES = {errors.CommandFailed: 1, errors.UserError: 2, errors.KeyFileError: 3,
                         errors.StoreSetupError: 4, errors.SecurityRefusal: 5,
                         errors.CacheDirError: 6, errors.MountpointError: 7,
                         errors.WrongKeyError: 8}


def _user_error_classes(base=errors.UserError):
    yield base
    for cls in base.__subclasses__():
        yield from _user_error_classes(cls)


def test_every_exit_code_class_is_documented():
    assert set(_user_error_classes()) == set(DOCUMENTED_EXIT_CODES)


@pytest.mark.parametrize("cls, code", DOCUMENTED_EXIT_CODES.items(),
                         ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_each_error_class_exits_with_its_documented_code(cls, code, monkeypatch, capsys):
    """Raised in a command, the class's code is the exit status of `ssecfs`, with one line."""
    def refuse(_args):
        raise cls("the reason")
    monkeypatch.setitem(cli.COMMANDS, "status", refuse)
    assert cli.main(["status", "/mnt/x"]) == code
    assert capsys.readouterr().err == "ssecfs: the reason\n"


@pytest.mark.parametrize("cls, code", DOCUMENTED_EXIT_CODES.items(),
                         ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_each_error_class_of_the_daemon_is_the_exit_code_of_ssecfs_mount(cls, code, capsys):
    """Raised in the background daemon, it travels up the ready pipe (ERROR CODE MESSAGE) and
    becomes the exit status of the `ssecfs mount` that started it."""
    from ssecfs.mount.daemon import ParentPipe
    r, w = os.pipe()
    assert ParentPipe(w).refuse(cls("the reason")) == code
    line = os.read(r, 4096).decode().strip()
    os.close(r)
    assert spawn._outcome(line, None, "/log") == code
    assert capsys.readouterr().err == "ssecfs: the reason\n"


# ---------------------------------------------------------------------------- key file
def test_missing_key_file(mounter, bucket, tmp_path):
    missing = str(tmp_path / "no-such.key")
    m = mounter(bucket, missing, mount=False)
    assert_refused(m, m.mount(check=False), 3, "no-such.key")


def test_key_file_readable_by_others(mounter, bucket, tmp_path):
    path = tmp_path / "loose.key"
    raw = write_key(path, mode=0o644)
    m = mounter(bucket, str(path), mount=False)
    line = assert_refused(m, m.mount(check=False), 3, "loose.key", raws=(raw,))
    assert "0644" in line or "chmod" in line


def test_key_file_of_31_bytes(mounter, bucket, tmp_path):
    path = tmp_path / "short.key"
    raw = os.urandom(31)
    write_key(path, raw)
    m = mounter(bucket, str(path), mount=False)
    line = assert_refused(m, m.mount(check=False), 3, "short.key")
    assert "32" in line
    for form in (base64.b64encode(raw).decode(), raw.hex()):
        assert form not in line


# ---------------------------------------------------------------------------- store
def test_bucket_that_does_not_exist(mounter, key):
    keyfile, raw = key
    name = "no-such-" + uuid.uuid4().hex[:10]
    m = mounter(name, keyfile, mount=False)
    assert_refused(m, m.mount(check=False), 4, name, raws=(raw,))


def test_unreachable_endpoint(mounter, bucket, key):
    keyfile, raw = key
    url = f"http://127.0.0.1:{closed_loopback_port()}"
    m = mounter(bucket, keyfile, mount=False, endpoint=url)
    assert_refused(m, m.mount(check=False), 4, "unreachable", raws=(raw,))


def test_plain_http_to_a_remote_host_is_refused_before_connecting(mounter, bucket, key):
    keyfile, raw = key
    # 192.0.2.1 is TEST-NET-1: a connection attempt would hang until the connect timeout.
    m = mounter(bucket, keyfile, mount=False, endpoint="http://192.0.2.1:9000")
    t0 = time.monotonic()
    r = m.mount(check=False)
    elapsed = time.monotonic() - t0
    assert_refused(m, r, 5, "https", raws=(raw,))
    assert elapsed < 4.5, f"took {elapsed:.1f}s: a connection was tried"


# ---------------------------------------------------------------------------- mountpoint
def test_mountpoint_is_a_file(mounter, bucket, key):
    keyfile, raw = key
    m = mounter(bucket, keyfile, mount=False, name="mp-file")
    os.rmdir(m.path)
    with open(m.path, "w") as f:
        f.write("i am a file\n")
    assert_refused(m, m.mount(check=False), 7, "not a directory", raws=(raw,))
    with open(m.path) as f:
        assert f.read() == "i am a file\n"


def test_mountpoint_not_empty(mounter, bucket, key):
    keyfile, raw = key
    m = mounter(bucket, keyfile, mount=False, name="mp-full")
    with open(os.path.join(m.path, "precious.txt"), "w") as f:
        f.write("local data\n")
    assert_refused(m, m.mount(check=False), 7, "not empty", raws=(raw,))
    assert os.listdir(m.path) == ["precious.txt"]


def test_mountpoint_already_mounted(mounter, bucket, key, tmp_path):
    keyfile, raw = key
    first = mounter(bucket, keyfile, name="twice")
    with open(os.path.join(first.path, "f.txt"), "wb") as f:
        f.write(b"first mount\n")
    second = mounter(bucket, keyfile, name="twice", cache_dir=tmp_path / "cache-second",
                     mount=False)
    r = second.mount(check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 7, r.stderr
    assert len(lines) == 1 and lines[0].startswith("ssecfs: ") and "already" in lines[0], lines
    assert_no_key_material(r.stderr, raw)
    # the first mount is untouched
    assert os.path.ismount(first.path)
    with open(os.path.join(first.path, "f.txt"), "rb") as f:
        assert f.read() == b"first mount\n"


def test_unknown_mount_option(mounter, bucket, key):
    keyfile, raw = key
    m = mounter(bucket, keyfile, "-o", "ro,bogus_opt=1", mount=False)
    assert_refused(m, m.mount(check=False), 2, "bogus_opt", raws=(raw,))


# ---------------------------------------------------------------------------- read-only
def test_read_only_mount(mounter, bucket, key, s3):
    keyfile, raw = key
    data = os.urandom(50_000)
    put_sse(s3, bucket, "dir/", b"", raw, mode=0o040755)
    put_sse(s3, bucket, "dir/file.bin", data, raw)
    put_sse(s3, bucket, "top.txt", b"top\n", raw)
    before = bucket_etags(s3, bucket)
    m = mounter(bucket, keyfile, "--read-only")

    with open(os.path.join(m.path, "dir/file.bin"), "rb") as f:
        assert f.read() == data
    with open(os.path.join(m.path, "top.txt"), "rb") as f:
        assert f.read() == b"top\n"
    assert sorted(os.listdir(m.path)) == ["dir", "top.txt"]

    p = lambda *a: os.path.join(m.path, *a)  # noqa: E731
    assert errno_of(open, p("top.txt"), "wb") == errno.EROFS
    assert errno_of(open, p("top.txt"), "ab") == errno.EROFS
    assert errno_of(open, p("new.txt"), "wb") == errno.EROFS
    assert errno_of(os.mkdir, p("newdir")) == errno.EROFS
    assert errno_of(os.unlink, p("top.txt")) == errno.EROFS
    assert errno_of(os.rename, p("top.txt"), p("moved.txt")) == errno.EROFS
    assert errno_of(os.rmdir, p("dir")) == errno.EROFS
    assert errno_of(os.truncate, p("top.txt"), 0) == errno.EROFS
    assert errno_of(os.chmod, p("top.txt"), 0o600) == errno.EROFS
    assert errno_of(os.symlink, "top.txt", p("link")) == errno.EROFS
    assert bucket_etags(s3, bucket) == before


# ---------------------------------------------------------------------------- wrong key
def test_wrong_key_refused_then_forced(mounter, bucket, s3, tmp_path):
    raw_a = write_key(tmp_path / "a.key")
    raw_b = write_key(tmp_path / "b.key")
    data = os.urandom(70_000)
    put_sse(s3, bucket, "secret.bin", data, raw_a)
    put_sse(s3, bucket, "d/nested.txt", b"nested secret\n", raw_a)

    m = mounter(bucket, str(tmp_path / "b.key"), mount=False)
    line = assert_refused(m, m.mount(check=False), 8, "--force", raws=(raw_a, raw_b))
    assert "key" in line

    forced = mounter(bucket, str(tmp_path / "b.key"), "--force", name="forced")
    assert sorted(os.listdir(forced.path)) == ["d", "secret.bin"]
    assert os.stat(os.path.join(forced.path, "secret.bin")).st_size == len(data)
    with pytest.raises(PermissionError) as e:
        with open(os.path.join(forced.path, "secret.bin"), "rb") as f:
            f.read()
    assert e.value.errno == errno.EACCES
    assert errno_of(open, os.path.join(forced.path, "d/nested.txt"), "rb") == errno.EACCES
    r = subprocess.run(["cat", os.path.join(forced.path, "secret.bin")], capture_output=True)
    assert r.returncode != 0 and r.stdout == b""
    r = subprocess.run(["ls", "-l", forced.path], capture_output=True, text=True)
    assert r.returncode == 0 and "secret.bin" in r.stdout and str(len(data)) in r.stdout
    # the object is untouched and still opens with key A
    assert s3.get_object(Bucket=bucket, Key="secret.bin", **sse(raw_a))["Body"].read() == data
    assert_no_key_material(forced.log, raw_a, raw_b)


def test_plaintext_object_is_listed_but_not_opened(mounter, bucket, key, s3):
    keyfile, raw = key
    s3.put_object(Bucket=bucket, Key="plain.txt", Body=b"not encrypted\n")
    m = mounter(bucket, keyfile)
    assert os.listdir(m.path) == ["plain.txt"]
    assert os.stat(os.path.join(m.path, "plain.txt")).st_size == len(b"not encrypted\n")
    with pytest.raises(PermissionError) as e:
        with open(os.path.join(m.path, "plain.txt"), "rb") as f:
            f.read()
    assert e.value.errno == errno.EACCES
    wait_until(lambda: "plaintext" in m.log, 10, what="a log line naming the plaintext object")


# ---------------------------------------------------------------------------- errno values
def test_errno_of_failing_operations(mnt, s3):
    m, bucket, raw = mnt
    p = lambda *a: os.path.join(m.path, *a)  # noqa: E731
    os.makedirs(p("full/sub"))
    with open(p("full/f.txt"), "wb") as f:
        f.write(b"content\n")

    assert errno_of(os.rmdir, p("full")) == errno.ENOTEMPTY
    assert errno_of(os.rmdir, p("full/f.txt")) == errno.ENOTDIR
    assert errno_of(open, p("missing.txt"), "rb") == errno.ENOENT
    assert errno_of(os.stat, p("missing.txt")) == errno.ENOENT
    assert errno_of(open, p("no-dir/x.txt"), "wb") == errno.ENOENT
    assert errno_of(os.unlink, p("missing.txt")) == errno.ENOENT
    assert errno_of(os.link, p("full/f.txt"), p("hard.txt")) == errno.EPERM
    assert not os.path.exists(p("hard.txt"))
    assert errno_of(os.rename, p("full"), p("full/sub/inside")) == errno.EINVAL
    assert errno_of(os.rename, p("full"), p("full/inside")) == errno.EINVAL
    assert errno_of(os.mkdir, p("full")) == errno.EEXIST
    assert errno_of(os.unlink, p("full")) in (errno.EISDIR, errno.EPERM)

    # nothing moved
    assert sorted(os.listdir(p("full"))) == ["f.txt", "sub"]
    with open(p("full/f.txt"), "rb") as f:
        assert f.read() == b"content\n"
    wait_until(lambda: s3.get_object(Bucket=bucket, Key="full/f.txt", **sse(raw))["Body"].read()
               == b"content\n", 30, what="full/f.txt uploaded")
    keys = set(bucket_etags(s3, bucket))
    assert {k for k in keys if "inside" in k or "hard" in k} == set()
