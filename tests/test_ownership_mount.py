"""Other local users on an `--allow-other` mount (the service setup, docs/SERVICE.md): a real
FUSE mount by root over SeaweedFS, used by throw-away unprivileged users (setpriv).

What they must see: their own files and directories belong to them; objects nobody vouched
for (put without ssecfs metadata, stored in plaintext or under another key) belong to the
mounting user with the --file-mode / --dir-mode defaults (0600 / 0700 here), whatever
metadata they carry; chown follows the POSIX rules. The rules themselves are unit-tested in
tests/test_ownership.py."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from helpers import as_user, sse, wait_until

pytestmark = pytest.mark.mount

DENIED = "Permission denied"
NOT_PERMITTED = "Operation not permitted"


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    return r.stdout


def refused(r: subprocess.CompletedProcess, why: str) -> None:
    assert r.returncode != 0 and why in r.stderr, f"exit {r.returncode}: {r.stderr!r}"


def st(path) -> tuple:
    s = os.stat(path, follow_symlinks=False)
    return s.st_mode, s.st_uid, s.st_gid


def shared_dir(m) -> str:
    """A directory every user may write to, like /tmp (made by root through the mount)."""
    d = os.path.join(m.path, "shared")
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o1777)
    return d


def plant_foreign(s3, bucket: str, raw: bytes, users_) -> None:
    """Objects under shared/ that nothing we trust vouches for, claiming to belong to user a."""
    a = users_[0]
    claims = {"uid": str(a.pw_uid), "gid": str(a.pw_gid), "mtime": "1000", "ctime": "1000"}
    s3.put_object(Bucket=bucket, Key="shared/aws.txt", Body=b"secret\n", **sse(raw))  # aws cli
    s3.put_object(Bucket=bucket, Key="shared/imp/x", Body=b"x", **sse(raw))
    s3.put_object(Bucket=bucket, Key="shared/suid", Body=b"#!/bin/sh\n",        # plaintext
                  Metadata={"uid": "0", "gid": "0", "mode": str(stat.S_IFREG | 0o4755)})
    s3.put_object(Bucket=bucket, Key="shared/p/", Body=b"",                      # plaintext
                  Metadata={**claims, "mode": str(stat.S_IFDIR | 0o777)})
    s3.put_object(Bucket=bucket, Key="shared/q", Body=b"",                       # plaintext
                  Metadata={**claims, "mode": str(stat.S_IFDIR | 0o777)})
    s3.put_object(Bucket=bucket, Key="shared/locked", Body=b"other key",         # other key
                  Metadata={**claims, "mode": str(stat.S_IFREG | 0o666)}, **sse(os.urandom(32)))


# --------------------------------------------------------------------------------- tests
def test_what_a_user_makes_is_its_own(mounter, bucket, key, users):
    a, b = users
    m = mounter(bucket, key[0], "--allow-other")
    shared = shared_dir(m)
    ok(as_user(a, "mkdir d && echo hi > d/f && ln -s f d/l && "
                  "python3 -c 'import os, stat; os.mknod(\"d/n\", stat.S_IFREG | 0o600)'",
               shared))
    for name in ("d", "d/f", "d/l", "d/n"):
        assert st(os.path.join(shared, name))[1:] == (a.pw_uid, a.pw_gid), name
    assert ok(as_user(a, "cat d/f", shared)) == "hi\n"
    refused(as_user(b, "echo no > d/g", shared), DENIED)            # d is a's, 0755 after umask

    # a set-group-ID directory: new entries take its group, a new directory the bit too
    team = os.path.join(shared, "team")
    os.mkdir(team)
    os.chown(team, 0, b.pw_gid)
    os.chmod(team, 0o2777)
    ok(as_user(a, "mkdir team/sub && echo x > team/f", shared))
    assert st(os.path.join(team, "f"))[1:] == (a.pw_uid, b.pw_gid)
    mode, uid, gid = st(os.path.join(team, "sub"))
    assert (uid, gid) == (a.pw_uid, b.pw_gid) and mode & stat.S_ISGID


def test_objects_nobody_vouched_for_are_the_mounting_users_only(mounter, s3, bucket, key,
                                                                  users):
    a, b = users
    plant_foreign(s3, bucket, key[1], users)
    m = mounter(bucket, key[0], "--allow-other")
    shared = shared_dir(m)
    for name, mode in (("aws.txt", stat.S_IFREG | 0o600), ("suid", stat.S_IFREG | 0o600),
                       ("locked", stat.S_IFREG | 0o600), ("q", stat.S_IFREG | 0o600),
                       ("imp", stat.S_IFDIR | 0o700), ("p", stat.S_IFDIR | 0o700)):
        assert st(os.path.join(shared, name)) == (mode, 0, 0), name
    assert os.stat(os.path.join(shared, "q")).st_mtime != 1000          # nor its times
    with open(os.path.join(shared, "aws.txt"), "rb") as f:           # the mounting user reads
        assert f.read() == b"secret\n"
    for user in (a, b):
        refused(as_user(user, "cat aws.txt", shared), DENIED)
        refused(as_user(user, "ls imp", shared), DENIED)
    # what the plaintext objects claim gives user a nothing
    refused(as_user(a, "touch p/x", shared), DENIED)
    refused(as_user(a, "touch q/x", shared), "Not a directory")
    refused(as_user(a, "chmod 777 p", shared), NOT_PERMITTED)


def test_chown_and_chgrp_follow_the_posix_rules(mounter, s3, bucket, key, users):
    a, b = users
    m = mounter(bucket, key[0], "--allow-other")
    shared = shared_dir(m)
    f = os.path.join(shared, "f")
    ok(as_user(a, "echo data > f", shared))
    refused(as_user(b, f"chown {b.pw_uid} f", shared), NOT_PERMITTED)     # not root
    refused(as_user(a, f"chown {b.pw_uid} f", shared), NOT_PERMITTED)     # nor to give away
    refused(as_user(b, f"chgrp {b.pw_gid} f", shared), NOT_PERMITTED)     # not the owner
    refused(as_user(a, f"chgrp {b.pw_gid} f", shared), NOT_PERMITTED)     # not in that group
    assert st(f)[1:] == (a.pw_uid, a.pw_gid)
    ok(as_user(a, f"chgrp {b.pw_gid} f", shared, groups=(a.pw_gid, b.pw_gid)))
    assert st(f)[1:] == (a.pw_uid, b.pw_gid)

    # a change of group, by the owner, clears the set-id bits (group-execute is set)
    ok(as_user(a, f"chmod 6775 f && chgrp {a.pw_gid} f", shared, groups=(a.pw_gid, b.pw_gid)))
    assert st(f) == (stat.S_IFREG | 0o775, a.pw_uid, a.pw_gid)
    # root's chown too; and what the bucket keeps is the mode without them
    os.chmod(f, 0o4755)
    os.chown(f, b.pw_uid, -1)
    assert st(f) == (stat.S_IFREG | 0o755, b.pw_uid, a.pw_gid)

    def stored():
        md = s3.head_object(Bucket=bucket, Key="shared/f", **sse(key[1]))["Metadata"]
        return (int(md["mode"]), int(md["uid"]), int(md["gid"]))
    wait_until(lambda: stored() == (stat.S_IFREG | 0o755, b.pw_uid, a.pw_gid), 30,
               what="the new owner and mode in the object's metadata")

    # another user writes to a set-user-ID file of a's: the write works, the bit goes
    g = os.path.join(shared, "g")
    ok(as_user(a, f"echo data > g && chgrp {b.pw_gid} g && chmod 4770 g", shared,
               groups=(a.pw_gid, b.pw_gid)))
    assert st(g) == (stat.S_IFREG | 0o4770, a.pw_uid, b.pw_gid)
    ok(as_user(b, "echo more >> g", shared))
    assert st(g) == (stat.S_IFREG | 0o770, a.pw_uid, b.pw_gid)


def test_owner_and_mode_options_are_what_foreign_objects_show(mounter, s3, bucket, key, users):
    plant_foreign(s3, bucket, key[1], users)
    m = mounter(bucket, key[0], "--uid", "1234", "--gid", "2345",
                "-o", "file_mode=0640,dir_mode=0750")
    assert st(m.path) == (stat.S_IFDIR | 0o750, 1234, 2345)
    r = subprocess.run(["chmod", "0777", m.path], capture_output=True, text=True)
    refused(r, NOT_PERMITTED)                      # the options say, not a chmod
    shared = os.path.join(m.path, "shared")
    assert st(shared) == (stat.S_IFDIR | 0o750, 1234, 2345)         # a prefix, no marker
    for name, mode in (("aws.txt", stat.S_IFREG | 0o640), ("suid", stat.S_IFREG | 0o640),
                       ("locked", stat.S_IFREG | 0o640), ("imp", stat.S_IFDIR | 0o750),
                       ("p", stat.S_IFDIR | 0o750)):
        assert st(os.path.join(shared, name)) == (mode, 1234, 2345), name
