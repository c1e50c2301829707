"""Which error an operation fails with, when more than one could apply: the same as Linux.

Each (operation, situation) runs twice, in a fresh directory of a local filesystem (ext4 or
tmpfs: whatever holds pytest's temporary directories) and in one of an ssecfs mount, and
both answers (an errno, or success) must be the same. The exceptions are S3's own limit,
1,024 bytes per object key (LIMITS): Linux takes such paths, ssecfs refuses them with
ENAMETOOLONG, as if the component that passes the limit were a name over 255 bytes.

SEMANTICS ("Errors"). One mount (with --allow-other) serves the whole module; every case
gets a directory of its own on both sides.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import uuid

import pytest

from conftest import Mount, fuse_available, make_keyfile
from helpers import as_user

pytestmark = pytest.mark.mount

L = "L" * 256                                      # one byte over NAME_MAX
# Each case's directory is "c00042/" (7 bytes). Four components of 250 bytes below it: a
# directory ssecfs can hold (key "c00042/aaa.../ddd.../", 1,011 bytes); one more component
# of 250 bytes makes an object key over 1,024 bytes, every component <= 255.
A, B, C, D, E = (c * 250 for c in "abcde")
DEEP = f"{A}/{B}/{C}/{D}"
OVER = f"{DEEP}/{E}"
AT_LIMIT = f"{DEEP}/" + "f" * 13                   # a file whose key is 1,024 bytes


# ------------------------------------------------------------------------- the two sides
@pytest.fixture(scope="module")
def sides(seaweed, tmp_path_factory):
    """(local root, mount root): directories under which each case makes its own."""
    if not fuse_available():
        pytest.skip("FUSE needs /dev/fuse, fusermount and root")
    base = tmp_path_factory.mktemp("errno")
    bucket = "t-" + uuid.uuid4().hex[:12]
    seaweed.create_bucket(bucket)
    keyfile = base / "sse.key"
    make_keyfile(keyfile)
    (base / "mnt").mkdir()
    (base / "local").mkdir()
    m = Mount(base / "mnt", base / "cache", bucket, str(keyfile), seaweed.endpoint,
              ["--writeback-delay", "0.2", "--allow-other"], log_file=base / "ssecfs.log")
    try:
        m.mount()
        yield str(base / "local"), m.path
    finally:
        m.cleanup()
        seaweed.delete_bucket(bucket)


_count = iter(range(1_000_000))


def fresh(sides, setup) -> tuple[str, str]:
    """A new directory on each side, holding what setup names."""
    n = next(_count)
    dirs = tuple(os.path.join(root, f"c{n:05d}") for root in sides)
    for d in dirs:
        os.mkdir(d)
        build(d, setup)
    return dirs


def build(base: str, setup) -> None:
    """setup: names to make, in order: "d/" a directory (and those above it), "l->t" a
    symlink to t, anything else a file."""
    for e in setup:
        if "->" in e:
            name, target = e.split("->")
            os.symlink(target, os.path.join(base, name))
        elif e.endswith("/"):
            os.makedirs(os.path.join(base, e))
        else:
            os.makedirs(os.path.dirname(os.path.join(base, e)), exist_ok=True)
            with open(os.path.join(base, e), "wb") as f:
                f.write(b"data\n")


def tree(d: str) -> list:
    """What is under d: (relative path, file type) of each entry."""
    out = []
    for top, dirs, files in os.walk(d):
        for n in dirs + files:
            p = os.path.join(top, n)
            out.append((os.path.relpath(p, d), stat.S_IFMT(os.lstat(p).st_mode)))
    return sorted(out)


def outcome(fn, *args) -> str:
    try:
        fn(*args)
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok"


# ------------------------------------------------------------------------- operations
def _open(flags):
    def op(p):
        os.close(os.open(p, flags, 0o644))
    return op


OPS = {
    "create": _open(os.O_WRONLY | os.O_CREAT),
    "excl": _open(os.O_WRONLY | os.O_CREAT | os.O_EXCL),
    "open_w": _open(os.O_WRONLY),
    "mkdir": os.mkdir,
    "rmdir": os.rmdir,
    "unlink": os.unlink,
    "truncate": lambda p: os.truncate(p, 0),
    "symlink": lambda p: os.symlink("target", p),
    "mknod": lambda p: os.mknod(p, stat.S_IFREG | 0o644),
    "stat": os.stat,
    "lstat": os.lstat,
}
CREATING = ("create", "excl", "mkdir", "symlink", "mknod")

# situation -> (what is there, the path operated on)
SITUATIONS = {
    "long-last": (["d/"], "d/" + L),
    "long-middle": (["d/"], "d/" + L + "/n"),
    "long-first": ([], L + "/nope/n"),
    "long-last-missing-parent": ([], "nope/" + L),
    "long-middle-missing-parent": ([], "nope/" + L + "/n"),
    "long-last-parent-file": (["f"], "f/" + L),
    "missing-parent": ([], "nope/n"),
    "missing": ([], "nope"),
    "parent-file": (["f"], "f/n"),
    "symlink-to-file-as-parent": (["f", "l->f"], "l/n"),
    "dangling-symlink-as-parent": (["dl->nope"], "dl/n"),
    "file": (["f"], "f"),
    "dir": (["d/"], "d"),
    "nonempty-dir": (["d/x"], "d"),
    "symlink": (["f", "l->f"], "l"),
    "dangling-symlink": (["dl->nope"], "dl"),
    "file-slash": (["f"], "f/"),
    "missing-slash": ([], "nope/"),
    "dir-slash": (["d/"], "d/"),
    "dir-dot": (["d/"], "d/."),
    "dir-dotdot": (["d/"], "d/.."),
    "key-over-1024": ([DEEP + "/"], OVER),
    "key-over-1024-middle": ([DEEP + "/"], OVER + "/n"),
    "key-over-1024-missing-parent": ([f"{A}/{B}/{C}/"], OVER),
    "key-at-1024": ([DEEP + "/"], AT_LIMIT),
    "key-at-1024-file": ([AT_LIMIT], AT_LIMIT),
}

# S3 cannot hold an object key over 1,024 bytes: where Linux takes the path, ssecfs
# answers ENAMETOOLONG (and where Linux answers ENOENT for a name that cannot be there).
KEY_LIMIT = {("key-over-1024", op): "ENAMETOOLONG" for op in OPS} | \
    {("key-over-1024-middle", op): "ENAMETOOLONG" for op in OPS} | \
    {("key-at-1024", "mkdir"): "ENAMETOOLONG"}        # its marker "path/" would be 1,025


@pytest.mark.parametrize("situation", SITUATIONS)
@pytest.mark.parametrize("op", OPS)
def test_errno_as_linux(sides, op, situation):
    setup, rel = SITUATIONS[situation]
    local, mounted = fresh(sides, setup)
    before = tree(mounted)
    want = outcome(OPS[op], os.path.join(local, rel))
    got = outcome(OPS[op], os.path.join(mounted, rel))
    if (situation, op) in KEY_LIMIT:
        assert want in ("ok", "ENOENT"), "Linux takes long keys"
        want = KEY_LIMIT[situation, op]
    assert got == want, f"{op} {situation}: Linux {want}, ssecfs {got}"
    assert tree(mounted) == (before if (situation, op) in KEY_LIMIT else tree(local))


RENAMES = {
    # name: (what is there, source, target)
    "missing-source": (["f"], "nope", "n"),
    "missing-source-long-target": (["d/"], "nope", "d/" + L),
    "missing-source-missing-parent": ([], "nope", "nope2/n"),
    "long-source": (["d/"], "d/" + L, "n"),
    "long-target": (["f", "d/"], "f", "d/" + L),
    "long-target-middle": (["f", "d/"], "f", "d/" + L + "/n"),
    "target-missing-parent": (["f"], "f", "nope/n"),
    "target-parent-file": (["f", "g"], "f", "g/n"),
    "target-slash": (["f"], "f", "n/"),
    "source-slash": (["f"], "f/", "n"),
    "file-onto-file": (["f", "g"], "f", "g"),
    "file-onto-itself": (["f"], "f", "f"),
    "file-onto-dir": (["f", "d/"], "f", "d"),
    "file-onto-symlink": (["f", "g", "l->g"], "f", "l"),
    "dir-onto-file": (["d/", "f"], "d", "f"),
    "dir-onto-empty-dir": (["d/x", "e/"], "d", "e"),
    "dir-onto-nonempty-dir": (["d/", "e/x"], "d", "e"),
    "file-onto-dir-slash": (["f", "d/"], "f", "d/"),
    "dir-long-target": (["d/", "e/"], "d", "e/" + L),
    "dir-into-itself": (["d/x/"], "d", "d/x/n"),
    "dir-onto-its-parent": (["d/x/"], "d/x", "d"),
    "dir-onto-its-child": (["d/x/"], "d", "d/x"),
    "dir-dot": (["d/"], "d/.", "n"),
    "dir-onto-dot": (["d/", "e/"], "d", "e/."),
    "key-over-1024": ([DEEP + "/", "f"], "f", OVER),
    "key-over-1024-missing-parent": ([f"{A}/{B}/{C}/", "f"], "f", OVER),
    "key-at-1024": ([DEEP + "/", "f"], "f", AT_LIMIT),
    # a directory whose files' keys would pass 1,024 bytes where it goes
    "dir-whose-files-would-pass-the-key-limit": ([DEEP + "/", AT_LIMIT], A, A + "a"),
    "dir-whose-files-would-pass-the-key-limit-onto-empty-dir": (
        [DEEP + "/", AT_LIMIT, A + "a/"], A, A + "a"),
}
RENAME_KEY_LIMIT = {"key-over-1024": "ENAMETOOLONG",
                    "dir-whose-files-would-pass-the-key-limit": "ENAMETOOLONG",
                    "dir-whose-files-would-pass-the-key-limit-onto-empty-dir": "ENAMETOOLONG"}


@pytest.mark.parametrize("case", RENAMES)
def test_rename_errno_as_linux(sides, case):
    setup, src, dst = RENAMES[case]
    local, mounted = fresh(sides, setup)
    before = tree(mounted)
    want = outcome(os.rename, os.path.join(local, src), os.path.join(local, dst))
    got = outcome(os.rename, os.path.join(mounted, src), os.path.join(mounted, dst))
    if case in RENAME_KEY_LIMIT:
        assert want == "ok", "Linux takes long keys"
        want = RENAME_KEY_LIMIT[case]
    assert got == want, f"rename {case}: Linux {want}, ssecfs {got}"
    assert tree(mounted) == (before if case in RENAME_KEY_LIMIT else tree(local))


# ------------------------------------------------------------------------- another user
# What user b may do among root's and user a's entries (permissions are the kernel's to
# check, default_permissions: these show that the attributes it checks are the right ones
# and that ssecfs answers the rest as Linux does). Run as b by one script on each side, in
# this order; each line: name, call, arguments (relative to the case's directory).
AS_OTHER = """
import errno, json, os, stat
def run(fn, *a):
    try:
        fn(*a)
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok"
def opener(flags):
    return lambda p: os.close(os.open(p, flags, 0o644))
create, excl = opener(os.O_WRONLY | os.O_CREAT), opener(os.O_WRONLY | os.O_CREAT | os.O_EXCL)
me = os.getuid()
cases = [
    ("create-in-ro", create, "ro/n"),
    ("create-existing-ro-file", create, "ro/f"),
    ("excl-existing-in-ro", excl, "ro/f"),
    ("open_w-ro-file", opener(os.O_WRONLY), "ro/f"),
    ("truncate-ro-file", os.truncate, "ro/f", 0),
    ("mkdir-in-ro", os.mkdir, "ro/n"),
    ("mkdir-existing-in-ro", os.mkdir, "ro/sub"),
    ("mkdir-long-in-ro", os.mkdir, "ro/" + "L" * 256),
    ("symlink-in-ro", os.symlink, "f", "ro/n"),
    ("mknod-in-ro", os.mknod, "ro/n", stat.S_IFREG | 0o644),
    ("unlink-in-ro", os.unlink, "ro/f"),
    ("unlink-missing-in-ro", os.unlink, "ro/nope"),
    ("rmdir-in-ro", os.rmdir, "ro/sub"),
    ("rename-in-ro", os.rename, "ro/f", "ro/g"),
    ("rename-out-of-ro", os.rename, "ro/f", "open/g"),
    ("rename-into-ro", os.rename, "open/bf", "ro/g"),
    ("stat-in-priv", os.stat, "priv/f"),
    ("stat-missing-in-priv", os.stat, "priv/nope"),
    ("create-in-priv", create, "priv/n"),
    ("unlink-sticky-other", os.unlink, "sticky/af"),
    ("rmdir-sticky-other", os.rmdir, "sticky/ad"),
    ("rename-sticky-other", os.rename, "sticky/af", "sticky/n"),
    ("rename-onto-sticky-other", os.rename, "sticky/bf", "sticky/af"),
    ("chmod-other", os.chmod, "sticky/af", 0o666),
    ("chmod-roots", os.chmod, "ro/f", 0o666),
    ("chown-other", os.chown, "sticky/af", me, -1),
    ("utime-set-other", os.utime, "sticky/af", (1, 1)),
    ("utime-now-other", os.utime, "sticky/af"),
    ("chmod-own", os.chmod, "sticky/bf", 0o600),
    ("unlink-in-open-dir", os.unlink, "open/af"),
    ("unlink-sticky-own", os.unlink, "sticky/bf"),
]
print(json.dumps({name: run(fn, *args) for name, fn, *args in cases}))
"""


def other_users_world(d: str, a, b) -> None:
    """Root's read-only and private directories, a sticky one and an open one with entries
    of user a's and b's."""
    build(d, ["ro/f", "ro/sub/", "priv/f", "sticky/af", "sticky/ad/", "sticky/bf",
              "open/af", "open/bf"])
    for p, mode in (("ro", 0o755), ("ro/f", 0o644), ("priv", 0o700), ("sticky", 0o1777),
                    ("open", 0o777)):
        os.chmod(os.path.join(d, p), mode)
    for p, user, mode in (("sticky/af", a, 0o644), ("sticky/ad", a, 0o755),
                          ("sticky/bf", b, 0o644), ("open/af", a, 0o644),
                          ("open/bf", b, 0o644)):
        os.chown(os.path.join(d, p), user.pw_uid, user.pw_gid)
        os.chmod(os.path.join(d, p), mode)


def test_eacces_and_eperm_as_linux_for_another_user(sides, users):
    a, b = users
    answers = []
    for d in fresh(sides, []):
        other_users_world(d, a, b)
        r = as_user(b, f"python3 - <<'EOF'\n{AS_OTHER}\nEOF", d)
        assert r.returncode == 0, r.stderr
        answers.append(json.loads(r.stdout))
    linux, ssecfs = answers
    assert linux["create-in-ro"] == "EACCES" and linux["unlink-sticky-other"] == "EPERM"
    assert {k: v for k, v in ssecfs.items() if linux[k] != v} == {}, linux
