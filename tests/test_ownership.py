"""Who owns what, and whose word is taken for it, without a kernel: the filesystem over the
SSE-C-enforcing in-memory store (tests/memstore.py), and the mount options that set the
defaults. The same rules on a real mount, run as other users: tests/test_ownership_mount.py.

Metadata is believed only of objects a key of the ring opens. Objects without ssecfs
metadata, objects nothing vouches for (plaintext, another key), the root and directories
without a marker get the mount's defaults: --uid, --gid, --file-mode, --dir-mode."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys

import pytest

from helpers import wait_until
from memstore import MemStore
from ssecfs.commands import cli
from ssecfs import errors
from ssecfs.fs import setattrs
from ssecfs.fs.dirindex import INDEX_NAME, MIN_FILES, decode
from ssecfs.errors import UserError
from ssecfs.crypto.keys import Key
from test_fs_unit import fs, make_fs, ring, settle, store, write_file  # noqa: F401 - fixtures

REG, DIR, LNK = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK
DEFAULTS = dict(uid=1234, gid=2345, file_mode=0o640, dir_mode=0o750)
# what someone with write access to the bucket but no key would like us to believe
CLAIMS = {"uid": "4242", "gid": "4242", "mtime": "1000", "ctime": "1000"}


def ids(a) -> tuple:
    return a.mode, a.uid, a.gid


def plant(store: MemStore, how: str, key: str, data: bytes, md: dict) -> None:
    if how == "plaintext":
        store.put_plain(key, data, md)
    else:
        store.put_foreign(key, data, Key(os.urandom(32)), md)


# ------------------------------------------------------------------------ the defaults
def test_what_carries_no_attributes_gets_the_mount_defaults(make_fs, store):
    fs = make_fs(**DEFAULTS)
    store.put("aws-cli.txt", b"put with the key, no metadata", {})
    store.put("imp/x", b"x", {})                       # a prefix without a marker
    store.put("bare/", b"", {})                        # a marker without metadata
    store.put("half", b"h", {"mode": str(REG | 0o604)})   # a mode and nothing else
    for path, want in (("/", (DIR | 0o750, 1234, 2345)),
                       ("/aws-cli.txt", (REG | 0o640, 1234, 2345)),
                       ("/imp", (DIR | 0o750, 1234, 2345)),
                       ("/bare", (DIR | 0o750, 1234, 2345)),
                       ("/half", (REG | 0o604, 1234, 2345))):
        assert ids(fs.getattr(path)) == want, path
    assert fs.getattr("/aws-cli.txt").mtime == store._objects["aws-cli.txt"].mtime


@pytest.mark.parametrize("how", ["plaintext", "another key"])
def test_metadata_of_objects_no_key_opens_is_never_believed(make_fs, store, how):
    fs = make_fs(**DEFAULTS)
    plant(store, how, "suid", b"#!/bin/sh\n", {**CLAIMS, "mode": str(REG | 0o4755)})
    plant(store, how, "lnk", b"/etc/shadow", {**CLAIMS, "mode": str(LNK | 0o777)})
    plant(store, how, "d/", b"", {**CLAIMS, "mode": str(DIR | 0o777)})
    plant(store, how, "file-posing-as-dir", b"", {**CLAIMS, "mode": str(DIR | 0o777)})
    for path, key, want in (("/suid", "suid", REG | 0o640), ("/lnk", "lnk", REG | 0o640),
                            ("/d", "d/", DIR | 0o750),
                            ("/file-posing-as-dir", "file-posing-as-dir", REG | 0o640)):
        a = fs.getattr(path)
        assert ids(a) == (want, 1234, 2345), path
        # times: the Last-Modified the server set, not what the object claims
        assert a.mtime == a.ctime == store._objects[key].mtime, path
    assert fs.attrs.is_dir("/d") and "suid" in fs.readdir("/")


def test_plaintext_metadata_is_not_believed_with_the_default_options(fs, store):
    store.put_plain("suid", b"#!/bin/sh\n", {"uid": "0", "gid": "0", "mode": str(REG | 0o4755)})
    store.put_plain("d/", b"", {**CLAIMS, "mode": str(DIR | 0o777)})
    assert ids(fs.getattr("/suid")) == (REG | 0o644, os.getuid(), os.getgid())
    assert ids(fs.getattr("/d")) == (DIR | 0o755, os.getuid(), os.getgid())


def test_chmod_of_an_untrusted_marker_carries_none_of_its_claims(fs, store, ring):
    """A chmod of a directory writes its marker anew, under our key: what it writes must be
    what the mount showed, never the claims of the plaintext marker it replaces."""
    store.put_plain("d/", b"", {**CLAIMS, "mode": str(DIR | 0o777)})
    fs.chmod("/d", 0o750)
    md = store.meta("d/")
    assert store.key_fp_of("d/") == ring.current.fingerprint
    assert (int(md["mode"]), int(md["uid"]), int(md["gid"])) == \
        (DIR | 0o750, os.getuid(), os.getgid())


def test_the_root_takes_its_attributes_from_the_options_only(make_fs, store):
    fs = make_fs(**DEFAULTS)
    for change in (lambda: fs.chmod("/", 0o777), lambda: fs.chown("/", 0, 0),
                   lambda: fs.utimens("/", 0, 0)):
        with pytest.raises(errors.NotPermitted):
            change()
    assert store.keys() == [] and ids(fs.getattr("/")) == (DIR | 0o750, 1234, 2345)


def test_a_moved_tree_does_not_adopt_the_claims_of_untrusted_markers(fs, store, ring):
    fs.mkdir("/t", 0o755)
    store.put_plain("t/sub/", b"", {**CLAIMS, "mode": str(DIR | 0o777)})
    write_file(fs, "/t/sub/f", b"data")
    settle(fs)
    fs.rename("/t", "/u")
    assert store.key_fp_of("u/sub/") == ring.current.fingerprint
    assert ids(fs.getattr("/u/sub")) == (DIR | 0o755, os.getuid(), os.getgid())
    assert "4242" not in store.meta("u/sub/").values()


def test_a_moved_implicit_directory_keeps_the_default_mode(make_fs, store):
    fs = make_fs(dir_mode=0o700)
    store.put("imp/x", b"x", {})
    assert ids(fs.getattr("/imp"))[0] == DIR | 0o700
    fs.rename("/imp", "/moved")
    assert ids(fs.getattr("/moved"))[0] == DIR | 0o700


def test_an_index_leaves_the_defaults_to_each_mount_that_reads_it(make_fs, store):
    """Mount A (0644, its own uid) indexes files the aws cli put; mount B (other defaults)
    lists them from that index, without a HEAD each, and shows ITS defaults."""
    n = MIN_FILES + 4
    for i in range(n):
        store.put(f"o/f{i:02d}", b"x" * i, {"mode": str(REG | 0o604)} if i == 0 else {})
    for o in store._objects.values():
        o.mtime -= 10                        # old enough for answers about them to be indexed
    a = make_fs(attr_timeout=60)
    names = [x for x in a.readdir("/o") if x not in (".", "..")]
    assert {ids(a.getattr(f"/o/{x}"))[0] for x in names[1:]} == {REG | 0o644}
    wait_until(lambda: not a.attrs.prefetch.heads, 10, what="prefetches to finish")
    assert a.dirindex.flush(10)
    entries = decode(store.data("o/" + INDEX_NAME))
    assert len(entries) == n

    b = make_fs(attr_timeout=60, **DEFAULTS)
    mark = len(store.log)
    got = {x: b.getattr(f"/o/{x}") for x in b.readdir("/o") if x not in (".", "..")}
    assert [k for op, k in store.log[mark:] if op == "head" and k.startswith("o/f")] == []
    assert ids(got["f00"]) == (REG | 0o604, 1234, 2345)
    assert {ids(v) for k, v in got.items() if k != "f00"} == {(REG | 0o640, 1234, 2345)}


# ------------------------------------------------------------------------ new entries
def test_new_entries_belong_to_the_caller(fs, store):
    fs.mkdir("/d", 0o755, 1001, 1002)
    fs.release(fs.create("/d/f", 0o640, 1001, 1002))
    fs.symlink("/d/l", "f", 1001, 1002)
    settle(fs)
    for path, key in (("/d", "d/"), ("/d/f", "d/f"), ("/d/l", "d/l")):
        assert ids(fs.getattr(path))[1:] == (1001, 1002), path
        md = store.meta(key)
        assert (int(md["uid"]), int(md["gid"])) == (1001, 1002), key


def test_a_set_group_id_directory_passes_its_group_on(fs, store):
    fs.mkdir("/g", 0o775, 0, 500)
    fs.chmod("/g", 0o2775)
    fs.release(fs.create("/g/f", 0o644, 1001, 1002))
    fs.mkdir("/g/s", 0o755, 1001, 1002)
    fs.symlink("/g/l", "f", 1001, 1002)
    fs.mkdir("/plain", 0o755, 0, 500)
    fs.mkdir("/plain/s", 0o755, 1001, 1002)
    settle(fs)
    assert ids(fs.getattr("/g/f")) == (REG | 0o644, 1001, 500)
    assert ids(fs.getattr("/g/s")) == (DIR | 0o2755, 1001, 500)      # inherits the bit too
    assert ids(fs.getattr("/g/l"))[1:] == (1001, 500)
    assert ids(fs.getattr("/plain/s")) == (DIR | 0o755, 1001, 1002)
    assert int(store.meta("g/s/")["gid"]) == 500


# ------------------------------------------------------------------------ chown, chmod
OWNER = dict(uid=1001, gid=1001, groups=frozenset({1001, 3000}))
OTHER = dict(uid=1002, gid=1002, groups=frozenset({1002}))


def test_chown_follows_the_posix_rules(fs, store):
    owner, other = setattrs.Caller(**OWNER), setattrs.Caller(**OTHER)
    fs.release(fs.create("/f", 0o644, 1001, 1001))
    settle(fs)
    refused = [(1002, -1, other), (1002, -1, owner),        # only root gives a file away
               (-1, 1002, other), (-1, 1001, other),        # only the owner changes the group
               (-1, 4000, owner)]                            # ... to a group it is in
    for uid, gid, who in refused:
        with pytest.raises(errors.NotPermitted):
            fs.chown("/f", uid, gid, who)
    assert ids(fs.getattr("/f"))[1:] == (1001, 1001)
    fs.chown("/f", 1001, 3000, owner)                          # its own uid: no change
    assert ids(fs.getattr("/f"))[1:] == (1001, 3000)
    fs.chown("/f", 0xFFFFFFFF, 1001, owner)                   # (uid_t) -1: leave it
    fs.chown("/f", 1002, 1002, setattrs.Caller(0, 0))         # root
    settle(fs)
    assert ids(fs.getattr("/f"))[1:] == (1002, 1002)
    md = store.meta("f")
    assert (int(md["uid"]), int(md["gid"])) == (1002, 1002)


def test_chown_clears_the_set_id_bits_of_files(fs, store):
    owner = setattrs.Caller(**OWNER)
    fs.release(fs.create("/f", 0o644, 1001, 1001))
    fs.mkdir("/d", 0o755, 1001, 1001)
    fs.chmod("/f", 0o6755)
    fs.chmod("/d", 0o2755)
    fs.chown("/f", -1, 3000, owner)
    fs.chown("/d", -1, 3000, owner)
    settle(fs)
    assert ids(fs.getattr("/f")) == (REG | 0o755, 1001, 3000)
    assert int(store.meta("f")["mode"]) == REG | 0o755
    assert ids(fs.getattr("/d")) == (DIR | 0o2755, 1001, 3000)      # directories keep them
    fs.chmod("/f", 0o4755)
    fs.chown("/f", 1002, -1, None)                                  # root's chown too
    assert ids(fs.getattr("/f")) == (REG | 0o755, 1002, 3000)


def test_chmod_only_by_the_owner_and_set_group_id_only_to_a_group_of_its_own(fs, store):
    owner, other = setattrs.Caller(**OWNER), setattrs.Caller(**OTHER)
    fs.release(fs.create("/f", 0o644, 1001, 1001))
    with pytest.raises(errors.NotPermitted):
        fs.chmod("/f", 0o777, other)
    fs.chmod("/f", 0o2750, owner)
    assert ids(fs.getattr("/f"))[0] == REG | 0o2750
    fs.chown("/f", -1, 1002, None)                   # a group the owner is not in
    fs.chmod("/f", 0o2750, owner)
    assert ids(fs.getattr("/f"))[0] == REG | 0o750
    # another user writes to a set-id file: the kernel clears the bits on the writer's behalf
    fs.chmod("/f", 0o6770, None)
    fs.chmod("/f", 0o770, other)
    assert ids(fs.getattr("/f"))[0] == REG | 0o770
    with pytest.raises(errors.NotPermitted):
        fs.chmod("/f", 0o770, other)                 # nothing to clear: a chmod of its own


# ------------------------------------------------------------------------ mount options
def parse(argv):
    return cli._parser().parse_args(cli.normalize_argv(argv))


def build(*extra):
    return cli.build_mount_config(parse(["b-u-c", "/mnt/x", "--keyfile", "/k",
                                         "--cache-size", "1G", *extra])).fs


def owner_modes(fs_cfg) -> tuple:
    return fs_cfg.uid, fs_cfg.gid, fs_cfg.file_mode, fs_cfg.dir_mode


def test_owner_and_mode_options_and_their_defaults():
    assert owner_modes(build()) == (os.getuid(), os.getgid(), 0o644, 0o755)
    assert owner_modes(build("--allow-other")) == (os.getuid(), os.getgid(), 0o600, 0o700)
    given = build("--uid", "1234", "--gid", "2345", "--file-mode", "0640", "--dir-mode", "750")
    assert owner_modes(given) == (1234, 2345, 0o640, 0o750)
    assert build("-o", "uid=1234,gid=2345,file_mode=0640,dir_mode=750") == given
    assert owner_modes(build("--allow-other", "--file-mode", "644", "--dir-mode", "0755")) \
        == (os.getuid(), os.getgid(), 0o644, 0o755)


@pytest.mark.parametrize("option, value", [
    ("--file-mode", "999"), ("--file-mode", "04755"), ("--dir-mode", "rwx"),
    ("--dir-mode", "1777"), ("--uid", "-1"), ("--uid", "alice"), ("--gid", "4294967295"),
    ("-o", "file_mode=0o640"), ("-o", "uid=1e3")])
def test_bad_owner_or_mode_is_one_line_and_exit_2(option, value, capsys):
    rc = cli.main(["mount", "b-u-c", "/mnt/x", "--keyfile", "/k", option, value])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("ssecfs: invalid --"), err
    name = option if option != "-o" else "--" + value.split("=")[0].replace("_", "-")
    assert name in err, err
    with pytest.raises(UserError):
        build(option, value)


def test_the_daemon_started_gets_the_same_owner_and_modes(monkeypatch, tmp_path):
    from ssecfs.commands.spawn import spawn_daemon
    from ssecfs.config import MountConfig
    started = []

    class NoDaemon:
        returncode = 1

        def __init__(self, argv, **_kw):
            # the config pipe's read end, kept open past the parent's close of it
            started.append((argv, os.dup(int(argv[argv.index("--config-fd") + 1]))))

        def poll(self):
            return 1

    monkeypatch.setattr(subprocess, "Popen", NoDaemon)
    for extra in ([], ["--allow-other"],
                  ["--allow-other", "-o", "uid=1234,gid=2345,file_mode=0640,dir_mode=0750"]):
        args = parse(["b-u-c", "/mnt/x", "--keyfile", "/k", "--cache-size", "1G",
                      "--cache-dir", str(tmp_path / "c"), *extra])
        cfg = cli.build_mount_config(args)
        assert spawn_daemon(cfg) == 1          # (no daemon: it "exited")
        argv, config_fd = started[-1]
        assert argv[:3] == [sys.executable, "-m", "ssecfs.mount"]
        with os.fdopen(config_fd, "rb") as f:
            child = MountConfig.from_json(f.read())
        assert child.fs == cfg.fs and child.allow_other == cfg.allow_other, extra
        # the whole validated config, and the log file the daemon is to write
        assert child == dataclasses.replace(cfg, log_file=child.log_file), extra
        assert child.log_file and os.path.isabs(child.log_file)
