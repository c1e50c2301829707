"""Deletes on a real mount (docs/SEMANTICS.md, "Deletes"): `rm -r` returns before the
bucket hears of it, in a few DeleteObjects requests; fsync of the directory and unmount wait
for them; a daemon killed before they went out sends them at the next mount."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from helpers import fsync_dir, run_ssecfs, wait_until
from test_writeback_mount import Background, in_bucket, wait_durable, write_file

pytestmark = pytest.mark.mount


def keys_under(s3, bucket: str, prefix: str) -> set[str]:
    out: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update(o["Key"] for o in page.get("Contents", []))
    return out


def make_tree(root: str, n: int) -> None:
    os.makedirs(os.path.join(root, "sub"))
    for i in range(n):
        write_file(os.path.join(root, "sub" if i % 2 else "", f"f{i:03d}"), b"%d" % i)


def test_rm_r_returns_before_the_deletes_and_fsync_of_the_directory_waits(proxy, mounter,
                                                                          bucket, key, s3):
    m = mounter(bucket, key[0], endpoint=proxy.url)
    tree = os.path.join(m.path, "tree")
    make_tree(tree, 120)
    wait_until(lambda: len(keys_under(s3, bucket, "tree/")) >= 121, 60,
               what="the tree uploaded")
    mark = proxy.mark()
    held = proxy.hold(op="DeleteObjects", bucket=bucket)
    Background(subprocess.run, ["rm", "-r", tree]).result(30, "rm -r while deletes are held")
    assert not os.path.exists(tree)
    assert "tree" not in os.listdir(m.path)
    held.wait_held(1, timeout=30)
    assert len(keys_under(s3, bucket, "tree/")) >= 120     # nothing deleted yet
    shown = re.search(r"deletes:\s+(\d+) pending", run_ssecfs("status", str(m.path)).stdout)
    assert shown and int(shown.group(1)) >= 120
    sync = Background(fsync_dir, m.path)
    assert not sync.done.wait(1.0), "fsync of the directory returned before its deletes"
    held.release()
    sync.result(60, "fsync of the directory after the release")
    assert keys_under(s3, bucket, "tree/") == set()
    sent = proxy.requests(bucket=bucket, since=mark)
    assert not [r for r in sent if r.op == "DeleteObject"]
    # a few requests at once for 120+ keys (of at least MIN_BATCH keys each while that many
    # wait), not one each
    assert 1 <= len([r for r in sent if r.op == "DeleteObjects"]) <= 10


def test_deletes_of_a_killed_daemon_are_sent_by_the_next_mount(proxy, mounter, bucket, key,
                                                               s3):
    m = mounter(bucket, key[0], endpoint=proxy.url)
    for name in ("a", "b", "c"):
        write_file(os.path.join(m.path, f"k-{name}"), name.encode())
    wait_until(lambda: len(keys_under(s3, bucket, "k-")) == 3, 60, what="uploads")
    os.listdir(m.path)
    held = proxy.hold(op="DeleteObjects", bucket=bucket)
    os.unlink(os.path.join(m.path, "k-a"))
    os.unlink(os.path.join(m.path, "k-b"))
    held.wait_held(1, timeout=30)
    m.kill9()
    # What the dead daemon sent goes nowhere: dropped, even where its connection did not
    # look closed yet to the proxy when the hold let go (a released request from a client
    # gone is not forwarded, but that check races with the kernel's close of the socket).
    proxy.drop(op="DeleteObjects", bucket=bucket)
    held.release()
    wait_until(lambda: all(r.outcome in ("dropped", "client-gone") for r in
                           proxy.requests(bucket=bucket) if r.op == "DeleteObjects"),
               10, what="the held deletes dropped")
    proxy.clear()
    assert keys_under(s3, bucket, "k-") == {"k-a", "k-b", "k-c"}
    m.mount()
    assert sorted(n for n in os.listdir(m.path) if n.startswith("k-")) == ["k-c"]
    fsync_dir(m.path)
    assert keys_under(s3, bucket, "k-") == {"k-c"}


def test_a_name_deleted_then_made_again_as_the_other_kind(proxy, mounter, bucket, key, s3):
    """SeaweedFS refuses a directory marker `b/` while a file `b` exists, and a file `c` while
    keys under `c/` exist: a name made again waits for the delete of its old self."""
    m = mounter(bucket, key[0], endpoint=proxy.url)
    b, c = os.path.join(m.path, "b"), os.path.join(m.path, "c")
    write_file(b, b"a file")
    os.mkdir(c)
    write_file(os.path.join(c, "x"), b"under c")
    wait_until(lambda: {"b", "c/", "c/x"} <= keys_under(s3, bucket, ""), 60,
               what="b, c/ and c/x uploaded")
    held = proxy.hold(op="DeleteObjects", bucket=bucket)
    os.unlink(b)
    made = Background(os.mkdir, b)
    held.wait_held(1, timeout=30)
    assert not made.done.wait(0.5), "mkdir did not wait for the delete of the file"
    held.release()
    made.result(60, "mkdir after the delete")

    held = proxy.hold(op="DeleteObjects", bucket=bucket)
    os.unlink(os.path.join(c, "x"))
    os.rmdir(c)
    write_file(c, b"now a file")            # close returns; its upload waits
    held.wait_held(1, timeout=30)
    assert not in_bucket(s3, bucket, "c")
    held.release()
    os.mkdir(os.path.join(b, "sub"))
    wait_durable(s3, bucket, "c", key[1], b"now a file")
    assert {"b/", "b/sub/", "c"} <= keys_under(s3, bucket, "")
    assert not keys_under(s3, bucket, "c/") and not in_bucket(s3, bucket, "b")
    assert "WARNING" not in m.log and "ERROR" not in m.log, m.log


def test_umount_waits_for_the_deletes(mounter, bucket, key, s3):
    m = mounter(bucket, key[0])
    for i in range(30):
        write_file(os.path.join(m.path, f"u{i:02d}"), b"x")
    wait_until(lambda: len(keys_under(s3, bucket, "u")) == 30, 60, what="uploads")
    for i in range(30):
        os.unlink(os.path.join(m.path, f"u{i:02d}"))
    r = run_ssecfs("umount", str(m.path))
    assert r.returncode == 0, r.stderr
    assert keys_under(s3, bucket, "u") == set()
    assert not in_bucket(s3, bucket, "u00")
