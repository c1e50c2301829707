"""Names on a real mount: the limits (255-byte components, 1,024-byte object keys), names that
are not UTF-8, names that URL encoders and Unicode normalisers like to mangle, and buckets
holding objects ssecfs did not write (another tool, another key, no SSE-C, odd keys).

SEMANTICS ("Names and objects"): the object key is the UTF-8 name exactly as given (no
normalisation; spaces, %, +, ?, #, newlines kept); a component over 255 bytes or an object
key over 1,024 bytes -> ENAMETOOLONG; a name that is not UTF-8 -> EINVAL; objects we cannot
open list like any file and `open` fails with EACCES; a read or a listing never deletes or
overwrites anything.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import unicodedata

import pytest

from helpers import sse, wait_until

pytestmark = pytest.mark.mount


# ---------------------------------------------------------------------------- helpers
def errno_of(fn, *args) -> int | None:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


def write(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def bucket_objects(s3, bucket) -> dict[str, tuple[int, str]]:
    """key -> (size, ETag) of every object, as the server lists them."""
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents") or []:
            out[o["Key"]] = (o["Size"], o["ETag"])
    return out


def wait_object(s3, bucket, key, raw, data, timeout=30):
    wait_until(lambda: s3.get_object(Bucket=bucket, Key=key, **sse(raw))["Body"].read() == data,
               timeout, interval=0.05, what=f"object {key!r} uploaded with its content")


def assert_mount_alive(m) -> None:
    assert os.path.ismount(m.path)
    pid = m.pid()
    assert pid and os.path.exists(f"/proc/{pid}"), "the daemon is gone"
    probe = os.path.join(m.path, f"alive-{os.urandom(4).hex()}.txt")
    write(probe, b"still working\n")
    assert read(probe) == b"still working\n"
    os.unlink(probe)


# ---------------------------------------------------------------------------- limits
def test_component_longer_than_255_bytes_is_enametoolong(mnt, s3):
    m, bucket, raw = mnt
    p = lambda name: os.path.join(m.path, name)  # noqa: E731
    ok, too_long = "n" * 255, "n" * 256
    write(p(ok), b"255 bytes is fine\n")
    os.mkdir(p("d" * 255))
    wide_ok = "é" * 127 + "x"                # 255 bytes in UTF-8 (128 characters)
    wide_long = "é" * 128                    # 256 bytes in UTF-8 (128 characters)
    write(p(wide_ok), b"wide\n")

    assert errno_of(os.open, p(too_long), os.O_WRONLY | os.O_CREAT, 0o644) == errno.ENAMETOOLONG
    assert errno_of(os.mkdir, p(too_long)) == errno.ENAMETOOLONG
    assert errno_of(os.mkdir, p(wide_long)) == errno.ENAMETOOLONG
    assert errno_of(os.open, p(wide_long), os.O_WRONLY | os.O_CREAT, 0o644) == errno.ENAMETOOLONG
    assert errno_of(os.open, p("d" * 255 + "/" + too_long), os.O_WRONLY | os.O_CREAT,
                    0o644) == errno.ENAMETOOLONG
    assert errno_of(os.rename, p(ok), p(too_long)) == errno.ENAMETOOLONG
    assert errno_of(os.symlink, ok, p(too_long)) == errno.ENAMETOOLONG

    assert sorted(os.listdir(m.path)) == sorted([ok, "d" * 255, wide_ok])
    assert read(p(ok)) == b"255 bytes is fine\n"
    wait_object(s3, bucket, ok, raw, b"255 bytes is fine\n")
    wait_object(s3, bucket, wide_ok, raw, b"wide\n")
    assert all(len(c.encode()) <= 255 for k in bucket_objects(s3, bucket) for c in k.split("/"))


def test_object_key_longer_than_1024_bytes_is_enametoolong(mnt, s3):
    m, bucket, raw = mnt
    comps = [c * 200 for c in "abcde"]                    # 5 x 200 bytes + 4 slashes = 1004
    deep = os.path.join(m.path, *comps)
    os.makedirs(deep)
    rel = "/".join(comps)
    assert len(rel.encode()) == 1004

    # a file whose key is exactly 1,024 bytes is fine; one more byte is not
    at_limit = "f" * (1024 - 1004 - 1)
    write(os.path.join(deep, at_limit), b"key of 1024 bytes\n")
    assert len(f"{rel}/{at_limit}".encode()) == 1024
    over = "g" * (1024 - 1004)
    assert errno_of(os.open, os.path.join(deep, over), os.O_WRONLY | os.O_CREAT,
                    0o644) == errno.ENAMETOOLONG
    # another 200-byte component: the key would be 1,205 bytes
    assert errno_of(os.mkdir, os.path.join(deep, "z" * 200)) == errno.ENAMETOOLONG
    assert errno_of(os.open, os.path.join(deep, "z" * 200), os.O_WRONLY | os.O_CREAT,
                    0o644) == errno.ENAMETOOLONG
    # a directory is the object "its/path/": a 1,024-byte path needs a 1,025-byte marker key
    assert errno_of(os.mkdir, os.path.join(deep, "h" * 19)) == errno.ENAMETOOLONG, \
        "mkdir of a 1,024-byte path (its marker key would be 1,025 bytes)"
    os.mkdir(os.path.join(deep, "i" * 18))                  # marker key: 1,024 bytes
    assert errno_of(os.rename, os.path.join(deep, at_limit),
                    os.path.join(deep, over)) == errno.ENAMETOOLONG

    assert read(os.path.join(deep, at_limit)) == b"key of 1024 bytes\n"
    wait_object(s3, bucket, f"{rel}/{at_limit}", raw, b"key of 1024 bytes\n")
    assert sorted(os.listdir(deep)) == sorted([at_limit, "i" * 18])
    keys = bucket_objects(s3, bucket)
    assert max(len(k.encode()) for k in keys) <= 1024, [k[-30:] for k in keys
                                                        if len(k.encode()) > 1024]
    assert_mount_alive(m)


def test_names_that_are_not_utf8_fail_with_einval(mnt, s3):
    m, bucket, raw = mnt
    base = m.path.encode()
    write(os.path.join(m.path, "before.txt"), b"before\n")
    bad = [base + b"/\xff\xfe", base + b"/caf\xe9.txt", base + b"/ok\x80ok"]   # latin-1 etc.
    for name in bad:
        assert errno_of(os.open, name, os.O_WRONLY | os.O_CREAT, 0o644) == errno.EINVAL, name
        assert errno_of(os.mkdir, name) == errno.EINVAL, name
        assert errno_of(os.stat, name) == errno.EINVAL, name
        assert errno_of(os.symlink, b"before.txt", name) == errno.EINVAL, name
        assert errno_of(os.rename, os.path.join(base, b"before.txt"), name) == errno.EINVAL, name
    # no crash: the mount still serves, nothing was renamed or created
    assert_mount_alive(m)
    assert read(os.path.join(m.path, "before.txt")) == b"before\n"
    assert os.listdir(m.path) == ["before.txt"]
    wait_object(s3, bucket, "before.txt", raw, b"before\n")
    assert set(bucket_objects(s3, bucket)) == {"before.txt"}


# ---------------------------------------------------------------------------- odd names
NFC = unicodedata.normalize("NFC", "café")          # 'caf\u00e9'
NFD = unicodedata.normalize("NFD", "café")          # 'cafe\u0301'
ODD_NAMES = [" leading space", "trailing space ", "two  spaces", "new\nline", "tab\there",
             "100%", "%41%2F%2e%2e", "plus+sign", "plus sign", "what?", "query?a=b&c=d",
             "hash#frag", "x%41", "xA", NFC, NFD, "back`tick", "star*", "a:colon",
             "~tilde", "-dash", ".hidden", "..dots", "日本語", "emoji 😀"]


def test_odd_names_are_kept_exactly(mnt, s3):
    m, bucket, raw = mnt
    assert NFC != NFD and unicodedata.normalize("NFC", NFD) == NFC
    contents = {n: n.encode() + b"|" + os.urandom(64) for n in ODD_NAMES}
    for n, data in contents.items():
        write(os.path.join(m.path, n), data)
    os.mkdir(os.path.join(m.path, "dir %+?# \n"))
    write(os.path.join(m.path, "dir %+?# \n", NFD), b"nested nfd\n")

    # two distinct files for each pair a URL decoder or a normaliser would merge
    assert sorted(os.listdir(m.path)) == sorted(ODD_NAMES + ["dir %+?# \n"])
    for n, data in contents.items():
        assert read(os.path.join(m.path, n)) == data, repr(n)

    for n, data in contents.items():
        wait_object(s3, bucket, n, raw, data)
    wait_object(s3, bucket, f"dir %+?# \n/{NFD}", raw, b"nested nfd\n")
    keys = set(bucket_objects(s3, bucket))
    # keys are the UTF-8 names byte for byte: no percent-decoding, no '+' -> ' ', no NFC
    assert keys == set(ODD_NAMES) | {"dir %+?# \n/", f"dir %+?# \n/{NFD}"}
    assert NFD.encode() == b"cafe\xcc\x81" and NFD in keys and NFC in keys

    # after a remount (cold: names come from the listing, data from the bucket)
    m.umount()
    m.mount()
    assert sorted(os.listdir(m.path)) == sorted(ODD_NAMES + ["dir %+?# \n"])
    for n, data in contents.items():
        assert read(os.path.join(m.path, n)) == data, repr(n)
    assert read(os.path.join(m.path, "dir %+?# \n", NFD)) == b"nested nfd\n"
    assert errno_of(os.stat, os.path.join(m.path, "dir %+?# \n", NFC)) == errno.ENOENT


# ---------------------------------------------------------------------------- foreign objects
def test_objects_written_by_other_tools(mounter, bucket, key, s3, tmp_path):
    keyfile, raw = key
    other = os.urandom(32)
    own = b"readable with our key\n"
    a_file = os.urandom(3000)
    s3.put_object(Bucket=bucket, Key="0-own.txt", Body=own, **sse(raw))
    # a file `a` and a directory `a/x` at once (possible on S3, not on POSIX)
    s3.put_object(Bucket=bucket, Key="a", Body=a_file, **sse(raw))
    s3.put_object(Bucket=bucket, Key="a/x", Body=b"under the file\n", **sse(raw))
    s3.put_object(Bucket=bucket, Key="plain.txt", Body=b"no SSE-C here\n")
    s3.put_object(Bucket=bucket, Key="foreign.bin", Body=os.urandom(12345), **sse(other))
    s3.put_object(Bucket=bucket, Key="emptydir/", Body=b"")          # "create folder"
    s3.put_object(Bucket=bucket, Key="sub/deep/f.txt", Body=b"no marker above\n", **sse(raw))
    # keys with '//' and a leading '/': SeaweedFS normalises them ('x/y', 'lead'); on AWS
    # they are distinct keys (the unit test below covers those with the in-memory store)
    s3.put_object(Bucket=bucket, Key="x//y", Body=b"double slash\n", **sse(raw))
    s3.put_object(Bucket=bucket, Key="/lead", Body=b"leading slash\n", **sse(raw))
    before = bucket_objects(s3, bucket)

    m = mounter(bucket, keyfile)
    names = os.listdir(m.path)
    assert names.count("a") == 1, f"'a' listed {names.count('a')} times: {names}"
    assert {"0-own.txt", "a", "plain.txt", "foreign.bin", "emptydir", "sub"} <= set(names)
    assert len(names) == len(set(names)), names

    # whole-tree walks by ordinary tools work (exit 0) and see every visible entry
    for cmd in (["ls", "-laR", m.path], ["find", m.path, "-printf", "%y %s %p\n"],
                ["du", "-a", m.path]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{cmd[0]} failed: {r.stderr}\n{m.log[-3000:]}"
    find_out = subprocess.run(["find", m.path], capture_output=True, text=True).stdout
    assert os.path.join(m.path, "sub/deep/f.txt") in find_out.splitlines()

    # `a`: one entry, and what stat says is what open/listdir do
    st_a = os.stat(os.path.join(m.path, "a"))
    if stat.S_ISREG(st_a.st_mode):
        assert st_a.st_size == len(a_file)
        assert read(os.path.join(m.path, "a")) == a_file
        assert errno_of(os.listdir, os.path.join(m.path, "a")) == errno.ENOTDIR
    else:
        assert stat.S_ISDIR(st_a.st_mode)
        assert os.listdir(os.path.join(m.path, "a")) == ["x"]
        assert read(os.path.join(m.path, "a/x")) == b"under the file\n"

    # plaintext: listed with its size, open -> EACCES, the daemon says why
    p = os.path.join(m.path, "plain.txt")
    assert os.stat(p).st_size == len(b"no SSE-C here\n")
    assert errno_of(read, p) == errno.EACCES
    wait_until(lambda: "plain.txt" in m.log and "plaintext" in m.log, 10,
               what="a log line about the plaintext object")
    # another key: listed with its size, open -> EACCES (never garbage, never empty)
    f = os.path.join(m.path, "foreign.bin")
    assert stat.S_ISREG(os.stat(f).st_mode) and os.stat(f).st_size == 12345
    assert errno_of(read, f) == errno.EACCES
    assert errno_of(os.open, f, os.O_RDWR) == errno.EACCES
    # a zero-byte key ending in '/': a directory
    e = os.path.join(m.path, "emptydir")
    assert stat.S_ISDIR(os.stat(e).st_mode) and os.listdir(e) == []
    # a prefix without a marker: a directory too
    assert stat.S_ISDIR(os.stat(os.path.join(m.path, "sub")).st_mode)
    assert read(os.path.join(m.path, "sub/deep/f.txt")) == b"no marker above\n"
    assert read(os.path.join(m.path, "0-own.txt")) == own

    # listing, stat-ing and reading changed nothing in the bucket
    assert bucket_objects(s3, bucket) == before
    assert s3.get_object(Bucket=bucket, Key="plain.txt")["Body"].read() == b"no SSE-C here\n"
    assert s3.get_object(Bucket=bucket, Key="a", **sse(raw))["Body"].read() == a_file
    assert_mount_alive(m)
    m.umount()
    assert bucket_objects(s3, bucket) == before


def test_listing_keys_with_double_and_leading_slashes_unit(tmp_path):
    """SeaweedFS normalises '//' and a leading '/' away, AWS does not: over the in-memory
    store, keys `x//y`, `/lead`, `p//` and `q/r//s` must not crash a listing, must not produce
    empty names or names with '/', and nothing may be deleted by walking the tree."""
    from memstore import MemStore
    from ssecfs.cache import Cache
    from ssecfs.config import FsConfig
    from ssecfs.crypto.aead import Sealer
    from ssecfs.fs.filesystem import Filesystem
    from ssecfs.crypto.keys import Key, KeyRing

    ring = KeyRing([Key(os.urandom(32))])
    store = MemStore(ring)
    for k in ("x//y", "/lead", "p//", "q/r//s", "ok/z", "top"):
        store.put(k, b"data of " + k.encode(), {})
    before = {k: store.data(k) for k in store.keys()}
    cache = Cache(str(tmp_path / "cache"), {k.fingerprint: Sealer(k.cache_key()) for k in ring.keys},
                  1 << 30, ring.current.fingerprint)
    cache.open()
    fs = Filesystem(store, cache, FsConfig(writeback_delay=0, defer_deletes=False))
    try:
        seen = []

        def walk(path):
            for name in fs.readdir(path):
                if name in (".", ".."):
                    continue
                assert name and "/" not in name, f"bad name {name!r} in {path}"
                child = path.rstrip("/") + "/" + name
                seen.append(child)
                a = fs.getattr(child)
                if stat.S_ISDIR(a.mode):
                    walk(child)
        walk("/")
        assert {"/top", "/ok", "/ok/z"} <= set(seen)
        assert len(seen) == len(set(seen)), seen
        assert {k: store.data(k) for k in store.keys()} == before
    finally:
        fs.shutdown()
        cache.close()
