"""Security guarantees, each with a test: keys never leak, no plaintext on local disk, the cache
is useless without the key, safe mount defaults, rotation end to end, check and rekey."""

import base64
import os
import stat
import subprocess

import pytest
from botocore.exceptions import ClientError

from conftest import make_keyfile
from helpers import marker_blob, run_ssecfs, scan_dir_for, sse, wait_until

pytestmark = pytest.mark.mount


def ring_file(path, *raws):
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# ring: first line encrypts\n")
        for r in raws:
            f.write(base64.b64encode(r).decode() + "\n\n")
    return str(path)


def put(s3, bucket, key, data, raw):
    s3.put_object(Bucket=bucket, Key=key, Body=data, **sse(raw))


def opens_with(s3, bucket, key, raw) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key, **sse(raw))
        return True
    except ClientError:
        return False


def secret_forms(raw: bytes) -> list[bytes]:
    return [raw, base64.b64encode(raw), raw.hex().encode(), raw.hex().upper().encode()]


def test_key_never_in_logs_or_ps(mounter, bucket, key, s3, tmp_path):
    path, raw = key
    m = mounter(bucket, path, "--log-level", "DEBUG")
    marker, data = marker_blob()
    p = os.path.join(m.path, "f.bin")
    with open(p, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(p, os.path.join(m.path, "g.bin"))
    with open(os.path.join(m.path, "g.bin"), "rb") as f:
        assert f.read() == data
    os.mkdir(os.path.join(m.path, "d"))
    os.chmod(os.path.join(m.path, "g.bin"), 0o600)
    ps = subprocess.run(["ps", "auxww"], capture_output=True).stdout
    m.umount()
    log = open(m.log_file, "rb").read()
    assert b"DEBUG" in log, "the debug log level was not in effect"
    for form in secret_forms(raw):
        assert form not in log, "key material in the daemon log"
        assert form not in ps, "key material in ps output"


def test_no_plaintext_on_local_disk_after_rename_truncate_crash(mounter, bucket, key, seaweed):
    path, raw = key
    m = mounter(bucket, path, "--writeback-delay", "30")
    marker, data = marker_blob()
    with open(os.path.join(m.path, "a.bin"), "wb") as f:
        f.write(data * 40)
    os.rename(os.path.join(m.path, "a.bin"), os.path.join(m.path, "b.bin"))
    os.truncate(os.path.join(m.path, "b.bin"), len(data) * 20)
    with open(os.path.join(m.path, "c.bin"), "wb") as f:
        f.write(data)
    m.kill9()                                       # crash with uploads pending
    m.mount()                                       # recovery uploads them
    with open(os.path.join(m.path, "b.bin"), "rb") as f:
        assert f.read() == data * 20
    with open(os.path.join(m.path, "c.bin"), "rb") as f:
        assert f.read() == data
    m.umount()
    assert scan_dir_for(m.cache_dir, marker) == []
    assert scan_dir_for(seaweed.data_dir, marker) == []
    for dirpath, _, files in os.walk("/tmp"):
        if dirpath.startswith(m.path):
            continue
    # temp files: the daemon creates none outside the cache dir (checked by the cache scan)


def test_cache_useless_without_key(mounter, bucket, key, s3, tmp_path):
    path, raw = key
    m = mounter(bucket, path, "--writeback-delay", "3600")
    marker, data = marker_blob()
    with open(os.path.join(m.path, "pending.bin"), "wb") as f:
        f.write(data)
    m.kill9()                                      # the data exists only in the cache now
    other = str(tmp_path / "other.key")
    make_keyfile(other)
    m2 = mounter(bucket, other, name="mnt2", cache_dir=m.cache_dir, mount=False)
    m2.args += ["--force"]
    m2.mount()
    assert "pending.bin" not in os.listdir(m2.path), "a file from a foreign cache was served"
    assert "could not be opened with this key ring" in m2.log
    m2.umount()
    # the entry is kept (never deleted), and the right key still recovers it
    m.mount()
    wait_until(lambda: s3.get_object(Bucket=bucket, Key="pending.bin", **sse(raw))["Body"].read()
               == data, 30, what="recovered upload with the right key")


def test_safe_mount_defaults(mnt):
    m, bucket, raw = mnt
    opts = next(line.split()[3] for line in open("/proc/mounts") if line.split()[1] == m.path)
    assert "default_permissions" in opts.split(",")
    assert "allow_other" not in opts.split(",")
    assert stat.S_IMODE(os.stat(m.cache_dir).st_mode) == 0o700
    old = os.umask(0o027)
    try:
        fd = os.open(os.path.join(m.path, "masked"), os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        os.mkdir(os.path.join(m.path, "maskdir"), 0o777)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(os.path.join(m.path, "masked")).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(os.path.join(m.path, "maskdir")).st_mode) == 0o750


def test_rotation_end_to_end(mounter, bucket, tmp_path, s3, seaweed):
    a, b = os.urandom(32), os.urandom(32)
    for i in range(5):
        put(s3, bucket, f"old/{i}.txt", f"old object {i}".encode(), a)
    ring_ba = ring_file(tmp_path / "ring", b, a)
    m = mounter(bucket, ring_ba)
    for i in range(5):
        with open(os.path.join(m.path, "old", f"{i}.txt")) as f:
            assert f.read() == f"old object {i}"
    with open(os.path.join(m.path, "new.txt"), "w") as f:
        f.write("new object")
    os.chmod(os.path.join(m.path, "old", "0.txt"), 0o600)     # a rewrite re-encrypts under B
    m.umount()
    assert opens_with(s3, bucket, "new.txt", b) and not opens_with(s3, bucket, "new.txt", a)
    assert opens_with(s3, bucket, "old/0.txt", b)
    assert opens_with(s3, bucket, "old/1.txt", a)

    r = run_ssecfs("rekey", bucket, "--keyfile", ring_ba, "--endpoint-url", seaweed.endpoint)
    assert r.returncode == 0, r.stderr
    assert "re-encrypted: 4" in r.stdout
    for i in range(5):
        assert opens_with(s3, bucket, f"old/{i}.txt", b)
        assert not opens_with(s3, bucket, f"old/{i}.txt", a)
    again = run_ssecfs("rekey", bucket, "--keyfile", ring_ba, "--endpoint-url", seaweed.endpoint)
    assert again.returncode == 0 and "re-encrypted: 0" in again.stdout   # idempotent

    ring_b = ring_file(tmp_path / "ring-b", b)
    m2 = mounter(bucket, ring_b, name="mnt-b")
    for i in range(5):
        with open(os.path.join(m2.path, "old", f"{i}.txt")) as f:
            assert f.read() == f"old object {i}"
    with open(os.path.join(m2.path, "new.txt")) as f:
        assert f.read() == "new object"


def test_rekey_reports_unopenable_and_never_deletes(bucket, tmp_path, s3, seaweed):
    a, b, stranger = os.urandom(32), os.urandom(32), os.urandom(32)
    put(s3, bucket, "x.txt", b"x", a)
    put(s3, bucket, "foreign.txt", b"f", stranger)
    s3.put_object(Bucket=bucket, Key="plain.txt", Body=b"p")
    ring = ring_file(tmp_path / "ring", b, a)
    dry = run_ssecfs("rekey", bucket, "--keyfile", ring, "--endpoint-url", seaweed.endpoint,
                     "--dry-run")
    assert "would re-encrypt: 1" in dry.stdout and opens_with(s3, bucket, "x.txt", a)
    r = run_ssecfs("rekey", bucket, "--keyfile", ring, "--endpoint-url", seaweed.endpoint)
    assert r.returncode == 1
    assert "NOT OPENED" in r.stdout and "foreign.txt" in r.stdout
    assert opens_with(s3, bucket, "x.txt", b)
    assert opens_with(s3, bucket, "foreign.txt", stranger)          # left alone
    assert s3.get_object(Bucket=bucket, Key="plain.txt")["Body"].read() == b"p"


def test_check_verdicts(bucket, tmp_path, s3, seaweed):
    a = os.urandom(32)
    kf = str(tmp_path / "a.key")
    make_keyfile(kf, a)
    put(s3, bucket, "one.txt", b"1", a)
    ok = run_ssecfs("check", bucket, "--keyfile", kf, "--endpoint-url", seaweed.endpoint)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "SSE-C enforced" in ok.stdout and "verdict: safe" in ok.stdout
    other = str(tmp_path / "b.key")
    make_keyfile(other)
    bad = run_ssecfs("check", bucket, "--keyfile", other, "--endpoint-url", seaweed.endpoint)
    assert bad.returncode == 1 and "open with no key of the ring" in bad.stdout
    assert "NOT SAFE" in bad.stdout
    for form in secret_forms(a):
        assert form.decode("latin-1") not in ok.stdout + ok.stderr
