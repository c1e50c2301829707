"""End-to-end: ordinary tools (cp, rsync, tar, mkdir, echo >>, truncate, mv, rm, sqlite3, git,
editor save-by-rename) on a real FUSE mount over a real SeaweedFS, and what lands in the bucket.

After each scenario at least one written object is checked on the server side with boto3: a GET
without the key is refused (400), a GET with another key is refused (403), a GET with the key
returns the exact bytes, and the object carries s3fs-style metadata (mode, uid, gid, mtime).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess

import pytest
from botocore.exceptions import ClientError

from helpers import fsync_dir, marker_blob, scan_dir_for, sse, utimens, wait_until

pytestmark = pytest.mark.mount

MiB = 1024 * 1024


# ---------------------------------------------------------------------------- helpers
def run(*cmd, cwd=None, env=None, timeout=120, input=None) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                       timeout=timeout, input=input)
    assert r.returncode == 0, (f"{cmd} exited {r.returncode}\nstdout: {r.stdout[-2000:]!r}\n"
                               f"stderr: {r.stderr[-2000:]!r}")
    return r


def need(*tools: str) -> None:
    for t in tools:
        if not shutil.which(t):
            pytest.skip(f"{t} not installed")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(4 * MiB)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def tree_digest(root) -> dict[str, str]:
    """relative path -> sha256 for files, "<dir>" for directories, "-> target" for symlinks."""
    out = {}
    root = str(root)
    for dirpath, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for d in dirs:
            p = os.path.join(dirpath, d)
            rel = os.path.normpath(os.path.join(rel_dir, d))
            out[rel] = "-> " + os.readlink(p) if os.path.islink(p) else "<dir>"
        for name in files:
            p = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            out[rel] = "-> " + os.readlink(p) if os.path.islink(p) else sha256_file(p)
    return out


def make_tree(root, big: int = 3 * MiB, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """A tree with nested dirs, an empty file, an empty dir, files across chunk boundaries and
    one file of a few MB. Returns relpath -> content of the files."""
    files = {
        "a.txt": b"hello, world\n",
        "empty": b"",
        "big.bin": os.urandom(big),
        "sub/b.txt": os.urandom(1000),
        "sub/deeper/c.bin": os.urandom(300_000),          # > 2 cache chunks (128 KiB)
        "sub/deeper/deepest/d.txt": b"deep\n" * 1000,
        "other/e.bin": os.urandom(131072),                 # exactly one chunk
        **(extra or {}),
    }
    for rel, data in files.items():
        p = os.path.join(str(root), rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    os.makedirs(os.path.join(str(root), "emptydir"), exist_ok=True)
    return files


def get_bytes(s3, bucket, key, raw) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key, **sse(raw))["Body"].read()


def durable(s3, bucket, key, raw, data, timeout=60) -> None:
    """Poll until the bucket holds exactly `data` under `key` (SSE-C with raw)."""
    def check():
        try:
            return get_bytes(s3, bucket, key, raw) == data
        except ClientError:
            return False
    wait_until(check, timeout, interval=0.1, what=f"{key!r} durable with the exact bytes")


def status_of(call) -> int:
    with pytest.raises(ClientError) as e:
        call()
    return e.value.response["ResponseMetadata"]["HTTPStatusCode"]


def assert_sse_c_object(s3, bucket, key, raw, data, local_path=None, meta=True) -> dict:
    """The object is durable with exactly `data`, unreadable without the key (400) or with
    another key (403), and carries s3fs metadata. Returns the metadata dict."""
    durable(s3, bucket, key, raw, data)
    assert status_of(lambda: s3.get_object(Bucket=bucket, Key=key)) == 400
    assert status_of(lambda: s3.get_object(Bucket=bucket, Key=key, **sse(os.urandom(32)))) == 403
    assert get_bytes(s3, bucket, key, raw) == data
    head = s3.head_object(Bucket=bucket, Key=key, **sse(raw))
    assert head["SSECustomerAlgorithm"] == "AES256"
    md = head["Metadata"]
    if not meta:
        return md
    for name in ("mode", "uid", "gid", "mtime"):
        assert name in md, f"{key!r}: metadata lacks {name!r}: {md}"
    assert stat.S_ISREG(int(md["mode"])), md
    int(md["uid"]), int(md["gid"]), float(md["mtime"])
    if local_path is not None:
        st = os.stat(local_path)
        assert int(md["mode"]) == st.st_mode, (md, oct(st.st_mode))
        assert int(md["uid"]) == st.st_uid and int(md["gid"]) == st.st_gid
        assert abs(float(md["mtime"]) - st.st_mtime) < 1.0, (md, st.st_mtime)
    return md


def bucket_keys(s3, bucket, prefix: str = "") -> set[str]:
    keys = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.update(o["Key"] for o in page.get("Contents") or [])
    return keys


def file_keys(s3, bucket, prefix: str = "") -> set[str]:
    """Object keys of files (directory markers `x/` left out)."""
    return {k for k in bucket_keys(s3, bucket, prefix) if not k.endswith("/")}


def wait_all_durable(s3, bucket, raw, prefix: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        durable(s3, bucket, prefix + rel, raw, data)


# ---------------------------------------------------------------------------- cp -r
def test_cp_r_tree_in_and_out(mnt, s3, seaweed, tmp_path):
    m, bucket, raw = mnt
    marker, blob = marker_blob()
    src = tmp_path / "src"
    files = make_tree(src, extra={"sub/secret.bin": blob})
    run("cp", "-r", src, os.path.join(m.path, "tree"))
    assert tree_digest(os.path.join(m.path, "tree")) == tree_digest(src)

    out = tmp_path / "out"
    run("cp", "-r", os.path.join(m.path, "tree"), out)
    assert tree_digest(out) == tree_digest(src)

    wait_all_durable(s3, bucket, raw, "tree/", files)
    assert file_keys(s3, bucket, "tree/") == {"tree/" + rel for rel in files}
    assert_sse_c_object(s3, bucket, "tree/sub/secret.bin", raw, blob,
                        os.path.join(m.path, "tree/sub/secret.bin"))
    assert_sse_c_object(s3, bucket, "tree/big.bin", raw, files["big.bin"])
    # The plaintext never reaches the server's disk nor the local cache.
    assert scan_dir_for(seaweed.data_dir, marker) == []
    assert scan_dir_for(m.cache_dir, marker) == []
    # nor does the key reach the daemon's log
    for form in (base64.b64encode(raw).decode(), raw.hex()):
        assert form not in m.log


# ---------------------------------------------------------------------------- rsync
def test_rsync_round_trip_and_noop_second_run(mnt, s3, tmp_path):
    need("rsync", "diff")
    m, bucket, raw = mnt
    src = tmp_path / "src"
    files = make_tree(src)
    os.symlink("a.txt", src / "link-to-a")
    os.chmod(src / "a.txt", 0o640)
    os.utime(src / "sub/b.txt", (1_500_000_000, 1_500_000_000))
    dst = os.path.join(m.path, "r")

    run("rsync", "-a", f"{src}/", f"{dst}/")
    assert tree_digest(dst) == tree_digest(src)
    assert stat.S_IMODE(os.stat(os.path.join(dst, "a.txt")).st_mode) == 0o640
    assert os.stat(os.path.join(dst, "sub/b.txt")).st_mtime == 1_500_000_000
    assert os.readlink(os.path.join(dst, "link-to-a")) == "a.txt"

    back = tmp_path / "back"
    run("rsync", "-a", f"{dst}/", f"{back}/")
    assert tree_digest(back) == tree_digest(src)
    run("diff", "-r", "--no-dereference", src, back)

    # Nothing changed: a second rsync transfers no file.
    r = run("rsync", "-a", "--stats", "-i", f"{src}/", f"{dst}/")
    out = r.stdout.decode()
    assert "Number of regular files transferred: 0" in out, out
    assert not [ln for ln in out.splitlines() if ln.startswith((">f", "<f", "cL", ">L"))], out

    wait_all_durable(s3, bucket, raw, "r/", files)
    md = assert_sse_c_object(s3, bucket, "r/sub/b.txt", raw, files["sub/b.txt"],
                             os.path.join(dst, "sub/b.txt"))
    assert float(md["mtime"]) == 1_500_000_000   # rsync -a's times are what the bucket keeps
    md = assert_sse_c_object(s3, bucket, "r/a.txt", raw, files["a.txt"])
    assert stat.S_IMODE(int(md["mode"])) == 0o640


# ---------------------------------------------------------------------------- tar
def test_tar_into_and_out_of_the_mount(mnt, s3, tmp_path):
    need("tar")
    m, bucket, raw = mnt
    src = tmp_path / "src"
    files = make_tree(src)
    archive = os.path.join(m.path, "tree.tar")
    run("tar", "-cf", archive, "-C", src, ".")

    # tar x from the mount into a local dir
    out = tmp_path / "out"
    out.mkdir()
    run("tar", "-xf", archive, "-C", out)
    assert tree_digest(out) == tree_digest(src)

    # tar c piped into tar x on the mount
    into = os.path.join(m.path, "x")
    os.mkdir(into)
    tar_c = subprocess.Popen(["tar", "-cf", "-", "-C", str(src), "."], stdout=subprocess.PIPE)
    r = subprocess.run(["tar", "-xf", "-", "-C", into], stdin=tar_c.stdout, capture_output=True)
    tar_c.stdout.close()
    assert tar_c.wait() == 0 and r.returncode == 0, r.stderr
    assert tree_digest(into) == tree_digest(src)

    with open(archive, "rb") as f:
        tar_bytes = f.read()
    assert_sse_c_object(s3, bucket, "tree.tar", raw, tar_bytes, archive)
    wait_all_durable(s3, bucket, raw, "x/", files)
    assert_sse_c_object(s3, bucket, "x/sub/deeper/c.bin", raw, files["sub/deeper/c.bin"],
                        os.path.join(into, "sub/deeper/c.bin"))
    # tar x restores the archived (whole-second) mtimes; GNU tar sets them with
    # futimens(fd, {UTIME_OMIT, mtime}).
    for rel in files:
        assert os.stat(os.path.join(into, rel)).st_mtime == \
            int(os.stat(src / rel).st_mtime), rel


def test_touch_m_sets_only_mtime(mnt, s3):
    """`touch -m -d` (utimensat with atime UTIME_OMIT) must set the mtime, on a closed file
    and through an open descriptor."""
    m, bucket, raw = mnt
    path = os.path.join(m.path, "f.txt")
    with open(path, "wb") as f:
        f.write(b"data\n")
    run("touch", "-m", "-d", "@1500000000", path)
    assert os.stat(path).st_mtime == 1_500_000_000
    with open(path, "ab") as f:
        f.write(b"more\n")
        f.flush()
        utimens(f.fileno(), None, 1_400_000_000)
    assert os.stat(path).st_mtime == 1_400_000_000
    md = assert_sse_c_object(s3, bucket, "f.txt", raw, b"data\nmore\n", path)
    assert float(md["mtime"]) == 1_400_000_000


# ---------------------------------------------------------------------------- mkdir -p
def test_mkdir_p(mnt, s3):
    m, bucket, raw = mnt
    run("mkdir", "-p", os.path.join(m.path, "a/b/c"))
    for d in ("a", "a/b", "a/b/c"):
        assert stat.S_ISDIR(os.stat(os.path.join(m.path, d)).st_mode), d
    assert os.listdir(os.path.join(m.path, "a")) == ["b"]
    assert os.listdir(os.path.join(m.path, "a/b/c")) == []
    run("mkdir", "-p", os.path.join(m.path, "a/b/c"))           # idempotent
    with open(os.path.join(m.path, "a/b/c/f.txt"), "wb") as f:
        f.write(b"in c\n")
    resp = s3.list_objects_v2(Bucket=bucket, Prefix="a/", Delimiter="/")
    assert [p["Prefix"] for p in resp.get("CommonPrefixes", [])] == ["a/b/"]
    assert_sse_c_object(s3, bucket, "a/b/c/f.txt", raw, b"in c\n",
                        os.path.join(m.path, "a/b/c/f.txt"))


def test_directory_mode_and_mtime_are_kept(mnt, s3):
    """mkdir's mode and chmod/utime of a directory (rsync -a, tar x, cp -a do them) stick for
    the life of the mount. Across a remount they are kept where the server keeps marker
    metadata; SeaweedFS drops it, and docs/SEMANTICS.md documents the fallback (0755, the
    mounting user): nothing else may come back."""
    m, bucket, raw = mnt
    d = os.path.join(m.path, "d")
    os.mkdir(d, 0o700)
    with open(os.path.join(d, "f"), "wb") as f:
        f.write(b"x")
    assert_sse_c_object(s3, bucket, "d/f", raw, b"x", os.path.join(d, "f"))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    os.chmod(d, 0o750)
    os.utime(d, (1_400_000_000, 1_400_000_000))
    st = os.stat(d)
    assert (stat.S_IMODE(st.st_mode), st.st_mtime) == (0o750, 1_400_000_000)
    run("chmod", "0711", d)
    run("touch", "-d", "@1300000000", d)
    st = os.stat(d)
    assert (stat.S_IMODE(st.st_mode), st.st_mtime) == (0o711, 1_300_000_000)
    assert os.listdir(d) == ["f"]

    m.umount()
    m.mount()
    st = os.stat(d)
    assert stat.S_ISDIR(st.st_mode) and os.listdir(d) == ["f"]
    assert stat.S_IMODE(st.st_mode) in (0o711, 0o755), oct(st.st_mode)
    if stat.S_IMODE(st.st_mode) == 0o711:
        assert st.st_mtime == 1_300_000_000


# ---------------------------------------------------------------------------- echo >>
def test_echo_append(mnt, s3):
    m, bucket, raw = mnt
    path = os.path.join(m.path, "log.txt")
    expected = b""
    for i in range(6):
        run("sh", "-c", f'echo "line {i}" >> "$1"', "sh", path)
        expected += f"line {i}\n".encode()
        with open(path, "rb") as f:
            assert f.read() == expected
    assert os.path.getsize(path) == len(expected)
    assert_sse_c_object(s3, bucket, "log.txt", raw, expected, path)
    # Append again after the upload: the new object is the old one plus the line.
    run("sh", "-c", 'echo "after upload" >> "$1"', "sh", path)
    expected += b"after upload\n"
    assert_sse_c_object(s3, bucket, "log.txt", raw, expected, path)


# ---------------------------------------------------------------------------- truncate -s
def test_truncate_down_and_up(mnt, s3):
    m, bucket, raw = mnt
    path = os.path.join(m.path, "t.bin")
    data = os.urandom(400_000)
    with open(path, "wb") as f:
        f.write(data)
    durable(s3, bucket, "t.bin", raw, data)       # so the shrink works on a remote object too

    run("truncate", "-s", "150000", path)
    assert os.path.getsize(path) == 150_000
    with open(path, "rb") as f:
        assert f.read() == data[:150_000]

    run("truncate", "-s", "1000000", path)
    expected = data[:150_000] + bytes(1_000_000 - 150_000)
    assert os.path.getsize(path) == 1_000_000
    with open(path, "rb") as f:
        assert f.read() == expected
        f.seek(500_000)
        assert f.read(1000) == bytes(1000)          # the hole reads zeros

    run("truncate", "-s", "0", path)
    assert os.path.getsize(path) == 0
    run("truncate", "-s", "70000", path)
    with open(path, "rb") as f:
        assert f.read() == bytes(70_000)
    with open(path, "r+b") as f:
        f.write(b"head")
    expected = b"head" + bytes(70_000 - 4)
    assert_sse_c_object(s3, bucket, "t.bin", raw, expected, path)


# ---------------------------------------------------------------------------- mv
def test_mv_file_and_directory_tree(mnt, s3, tmp_path):
    m, bucket, raw = mnt
    src = tmp_path / "src"
    # enough files that the old keys go in several DeleteObjects requests at once
    many = {f"sub/deeper/n{i:02d}": os.urandom(100) for i in range(40)}
    many.update({f"t{i:02d}": b"%d\n" % i for i in range(20)})
    files = make_tree(src, big=200_000, extra=many)
    run("cp", "-r", src, os.path.join(m.path, "d1"))
    solo = os.urandom(5000)
    with open(os.path.join(m.path, "solo.bin"), "wb") as f:
        f.write(solo)
    wait_all_durable(s3, bucket, raw, "d1/", files)
    durable(s3, bucket, "solo.bin", raw, solo)

    # a file
    run("mv", os.path.join(m.path, "solo.bin"), os.path.join(m.path, "moved.bin"))
    assert not os.path.exists(os.path.join(m.path, "solo.bin"))
    with open(os.path.join(m.path, "moved.bin"), "rb") as f:
        assert f.read() == solo
    assert_sse_c_object(s3, bucket, "moved.bin", raw, solo, os.path.join(m.path, "moved.bin"))
    fsync_dir(m.path)             # the deletes under it are done (SEMANTICS, "Deletes")
    assert "solo.bin" not in bucket_keys(s3, bucket)

    # a directory tree, into another directory
    os.mkdir(os.path.join(m.path, "dest"))
    run("mv", os.path.join(m.path, "d1"), os.path.join(m.path, "dest/d2"))
    assert tree_digest(os.path.join(m.path, "dest/d2")) == tree_digest(src)
    assert file_keys(s3, bucket, "dest/d2/") == {"dest/d2/" + rel for rel in files}
    assert_sse_c_object(s3, bucket, "dest/d2/sub/deeper/c.bin", raw, files["sub/deeper/c.bin"],
                        os.path.join(m.path, "dest/d2/sub/deeper/c.bin"))
    # the old tree is gone: from the mount and from the bucket (no key, no listed prefix)
    fsync_dir(m.path)
    assert file_keys(s3, bucket, "d1/") == set()
    assert bucket_keys(s3, bucket, "d1/") == set()
    resp = s3.list_objects_v2(Bucket=bucket, Prefix="d1/", Delimiter="/")
    assert not resp.get("Contents") and not resp.get("CommonPrefixes"), resp
    assert sorted(os.listdir(m.path)) == ["dest", "moved.bin"]
    assert not os.path.exists(os.path.join(m.path, "d1"))


def test_mv_and_rm_r_of_a_tree_without_directory_markers(mnt, s3):
    """A tree uploaded by another tool (aws s3 cp: no `dir/` marker objects) moves and goes
    away like any other: no ghost directory is left listed."""
    m, bucket, raw = mnt
    files = {"a/b/c.txt": b"c\n", "a/d.bin": os.urandom(150_000), "a/b/e/f.txt": b"f\n"}
    for rel, data in files.items():
        s3.put_object(Bucket=bucket, Key="imp/" + rel, Body=data, **sse(raw))
    assert sorted(os.listdir(os.path.join(m.path, "imp/a"))) == ["b", "d.bin"]

    run("mv", os.path.join(m.path, "imp"), os.path.join(m.path, "moved"))
    for rel, data in files.items():
        with open(os.path.join(m.path, "moved", rel), "rb") as f:
            assert f.read() == data, rel
    fsync_dir(m.path)
    assert file_keys(s3, bucket) == {"moved/" + rel for rel in files}
    # (the source objects carried no s3fs metadata, so none is required of the copies)
    assert_sse_c_object(s3, bucket, "moved/a/d.bin", raw, files["a/d.bin"], meta=False)
    resp = s3.list_objects_v2(Bucket=bucket, Prefix="imp/", Delimiter="/")
    assert not resp.get("Contents") and not resp.get("CommonPrefixes"), resp
    assert os.listdir(m.path) == ["moved"]

    run("rm", "-r", os.path.join(m.path, "moved"))
    assert os.listdir(m.path) == []
    fsync_dir(m.path)
    assert bucket_keys(s3, bucket) == set()
    resp = s3.list_objects_v2(Bucket=bucket, Delimiter="/")
    assert not resp.get("Contents") and not resp.get("CommonPrefixes"), resp


def test_mv_of_a_file_not_yet_uploaded(mnt, s3):
    m, bucket, raw = mnt
    data = os.urandom(70_000)
    with open(os.path.join(m.path, "fresh"), "wb") as f:
        f.write(data)
    run("mv", os.path.join(m.path, "fresh"), os.path.join(m.path, "renamed"))
    with open(os.path.join(m.path, "renamed"), "rb") as f:
        assert f.read() == data
    assert_sse_c_object(s3, bucket, "renamed", raw, data, os.path.join(m.path, "renamed"))
    assert "fresh" not in bucket_keys(s3, bucket)


# ---------------------------------------------------------------------------- rm -r
def test_rm_r_tree(mnt, s3, tmp_path):
    m, bucket, raw = mnt
    src = tmp_path / "src"
    files = make_tree(src, big=100_000)
    run("cp", "-r", src, os.path.join(m.path, "gone"))
    keep = b"keep me\n"
    with open(os.path.join(m.path, "keep.txt"), "wb") as f:
        f.write(keep)
    wait_all_durable(s3, bucket, raw, "gone/", files)
    assert file_keys(s3, bucket, "gone/")

    run("rm", "-r", os.path.join(m.path, "gone"))
    assert not os.path.exists(os.path.join(m.path, "gone"))
    assert os.listdir(m.path) == ["keep.txt"]
    fsync_dir(m.path)
    assert bucket_keys(s3, bucket, "gone/") == set()
    resp = s3.list_objects_v2(Bucket=bucket, Prefix="gone/", Delimiter="/")
    assert not resp.get("Contents") and not resp.get("CommonPrefixes"), resp
    assert_sse_c_object(s3, bucket, "keep.txt", raw, keep, os.path.join(m.path, "keep.txt"))


# ---------------------------------------------------------------------------- sqlite
def test_sqlite_database(mnt, s3):
    m, bucket, raw = mnt
    db = os.path.join(m.path, "data.db")
    con = sqlite3.connect(db)
    con.execute("create table t (id integer primary key, name text, blob blob)")
    rows = [(i, f"name-{i}", os.urandom(300)) for i in range(500)]
    with con:
        con.executemany("insert into t values (?, ?, ?)", rows)
    with con:
        con.execute("update t set name = 'changed' where id % 7 = 0")
        con.execute("delete from t where id >= 450")
    assert con.execute("select count(*) from t").fetchone() == (450,)
    con.close()

    con = sqlite3.connect(db)
    assert con.execute("pragma integrity_check").fetchone() == ("ok",)
    got = con.execute("select id, name, blob from t order by id").fetchall()
    con.close()
    want = [(i, "changed" if i % 7 == 0 else n, b) for i, n, b in rows if i < 450]
    assert got == want
    # no rollback journal left behind
    assert sorted(os.listdir(m.path)) == ["data.db"]

    # the sqlite3 CLI reads the same database
    if shutil.which("sqlite3"):
        r = run("sqlite3", db, "select count(*), sum(id) from t where name = 'changed';")
        assert r.stdout.decode().strip() == f"{len([i for i in range(450) if i % 7 == 0])}|" \
            f"{sum(i for i in range(450) if i % 7 == 0)}"
    with open(db, "rb") as f:
        content = f.read()
    assert content.startswith(b"SQLite format 3\0")
    assert_sse_c_object(s3, bucket, "data.db", raw, content, db)
    fsync_dir(m.path)
    assert "data.db-journal" not in bucket_keys(s3, bucket)


# ---------------------------------------------------------------------------- git
def test_git_init_add_commit_log(mnt, s3, tmp_path):
    need("git")
    m, bucket, raw = mnt
    repo = os.path.join(m.path, "repo")
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path),
           "GIT_AUTHOR_DATE": "2024-01-02T03:04:05Z", "GIT_COMMITTER_DATE": "2024-01-02T03:04:05Z"}
    git = ["git", "-c", "user.name=Test User", "-c", "user.email=test@example.com",
           "-c", "init.defaultBranch=main", "-c", "safe.directory=*"]
    run(*git, "init", "-q", repo, env=env)
    with open(os.path.join(repo, "README.md"), "w") as f:
        f.write("# hello\n")
    os.makedirs(os.path.join(repo, "src"))
    code = os.urandom(50_000)
    with open(os.path.join(repo, "src/data.bin"), "wb") as f:
        f.write(code)
    run(*git, "add", ".", cwd=repo, env=env)
    run(*git, "commit", "-q", "-m", "first commit", cwd=repo, env=env)
    with open(os.path.join(repo, "README.md"), "a") as f:
        f.write("more\n")
    run(*git, "commit", "-q", "-am", "second commit", cwd=repo, env=env)

    log = run(*git, "log", "--format=%s|%an", cwd=repo, env=env).stdout.decode().splitlines()
    assert log == ["second commit|Test User", "first commit|Test User"]
    assert run(*git, "status", "--porcelain", cwd=repo, env=env).stdout == b""
    run(*git, "fsck", "--full", "--strict", cwd=repo, env=env)
    show = run(*git, "show", "HEAD~1:src/data.bin", cwd=repo, env=env).stdout
    assert show == code

    # a clone out of the mount has the same history
    clone = tmp_path / "clone"
    run(*git, "clone", "-q", repo, clone, env=env)
    assert (clone / "README.md").read_text() == "# hello\nmore\n"
    head = run(*git, "rev-parse", "HEAD", cwd=repo, env=env).stdout
    assert run(*git, "rev-parse", "HEAD", cwd=clone, env=env).stdout == head

    assert_sse_c_object(s3, bucket, "repo/README.md", raw, b"# hello\nmore\n",
                        os.path.join(repo, "README.md"))
    assert_sse_c_object(s3, bucket, "repo/src/data.bin", raw, code)
    fsync_dir(m.path)
    assert not [k for k in bucket_keys(s3, bucket, "repo/.git/") if k.endswith(".lock")]


# ---------------------------------------------------------------------------- editor save
def test_editor_save_by_rename(mnt, s3):
    m, bucket, raw = mnt
    path = os.path.join(m.path, "notes.txt")
    with open(path, "wb") as f:
        f.write(b"version 1\n")
    durable(s3, bucket, "notes.txt", raw, b"version 1\n")
    os.chmod(path, 0o600)

    for n in (2, 3):
        content = f"version {n}\n".encode() * (n * 1000)
        tmp = os.path.join(m.path, ".notes.txt.swp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, content)
            os.fsync(fd)          # durable before the rename
        finally:
            os.close(fd)
        os.rename(tmp, path)
        assert os.listdir(m.path) == ["notes.txt"]
        with open(path, "rb") as f:
            assert f.read() == content
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert_sse_c_object(s3, bucket, "notes.txt", raw, content, path)
    fsync_dir(m.path)
    assert ".notes.txt.swp" not in bucket_keys(s3, bucket)


# ---------------------------------------------------------------------------- names
NAMES = ["with space.txt", "café é.txt", "日本語.txt", "emoji 😀🎉.txt", "100%.txt",
         "a+b=c.txt", "what?.txt", "hash#tag.txt", "semi;colon&amp.txt", "quote'\".txt",
         "tilde~ (1) [2] {3}.txt"]


def test_special_names_round_trip(mnt, s3):
    m, bucket, raw = mnt
    d = "dir é 日本 %+?#"
    os.mkdir(os.path.join(m.path, d))
    contents = {}
    for name in NAMES:
        data = name.encode() + os.urandom(100)
        contents[name] = data
        with open(os.path.join(m.path, name), "wb") as f:
            f.write(data)
        with open(os.path.join(m.path, d, name), "wb") as f:
            f.write(data[::-1])
    assert sorted(os.listdir(m.path)) == sorted(NAMES + [d])
    assert sorted(os.listdir(os.path.join(m.path, d))) == sorted(NAMES)
    for name, data in contents.items():
        with open(os.path.join(m.path, name), "rb") as f:
            assert f.read() == data, name
        with open(os.path.join(m.path, d, name), "rb") as f:
            assert f.read() == data[::-1], name

    for name, data in contents.items():
        durable(s3, bucket, name, raw, data)
        durable(s3, bucket, f"{d}/{name}", raw, data[::-1])
    keys = file_keys(s3, bucket)
    assert keys == set(NAMES) | {f"{d}/{n}" for n in NAMES}
    # exactly the UTF-8 name, byte for byte (no escaping, no normalisation)
    raw_keys = {k.encode() for k in keys}
    assert "日本語.txt".encode() in raw_keys and "café é.txt".encode("utf-8") in raw_keys
    for name in ("emoji 😀🎉.txt", "100%.txt", "what?.txt", "hash#tag.txt"):
        assert_sse_c_object(s3, bucket, name, raw, contents[name], os.path.join(m.path, name))

    # and they survive a rename
    os.rename(os.path.join(m.path, "日本語.txt"), os.path.join(m.path, d, "名前 #2.txt"))
    with open(os.path.join(m.path, d, "名前 #2.txt"), "rb") as f:
        assert f.read() == contents["日本語.txt"]
    assert_sse_c_object(s3, bucket, f"{d}/名前 #2.txt", raw, contents["日本語.txt"])
    fsync_dir(m.path)
    assert "日本語.txt" not in bucket_keys(s3, bucket)


# ---------------------------------------------------------------------------- 100 MiB
def test_100mib_file_cp_remount_and_bucket(mounter, bucket, key, s3, tmp_path):
    keyfile, raw = key
    m = mounter(bucket, keyfile)
    src = tmp_path / "big.bin"
    h = hashlib.sha256()
    with open(src, "wb") as f:
        for _ in range(100):
            block = os.urandom(MiB)
            h.update(block)
            f.write(block)
    want = h.hexdigest()

    dst = os.path.join(m.path, "big.bin")
    run("cp", src, dst, timeout=300)
    assert os.path.getsize(dst) == 100 * MiB
    assert sha256_file(dst) == want

    m.umount()                   # waits for the upload
    m.mount()
    assert os.path.getsize(dst) == 100 * MiB
    assert sha256_file(dst) == want

    # from the bucket, with boto3 and the key
    resp = s3.get_object(Bucket=bucket, Key="big.bin", **sse(raw))
    assert resp["ContentLength"] == 100 * MiB
    h = hashlib.sha256()
    for block in resp["Body"].iter_chunks(4 * MiB):
        h.update(block)
    assert h.hexdigest() == want
    assert status_of(lambda: s3.get_object(Bucket=bucket, Key="big.bin", Range="bytes=0-99")) == 400
    assert status_of(lambda: s3.get_object(Bucket=bucket, Key="big.bin", Range="bytes=0-99",
                                           **sse(os.urandom(32)))) == 403
    head = s3.head_object(Bucket=bucket, Key="big.bin", **sse(raw))
    md = head["Metadata"]
    assert {"mode", "uid", "gid"} <= set(md), md
    # a file this big was uploaded while being written (SEMANTICS, "Durability"): no mtime in
    # its metadata, its modification time is the object's Last-Modified
    assert "mtime" not in md, md
    assert os.stat(dst).st_mtime == head["LastModified"].timestamp()
    assert int(md["mode"]) == os.stat(dst).st_mode
