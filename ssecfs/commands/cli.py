"""Command line: mount, umount, status, keygen (and the mount.fuse calling convention
``ssecfs SOURCE MOUNTPOINT -o opt,opt``). Builds the config; knows nothing of boto3 or FUSE.

Exit codes: 0 ok, else the exit code of the UserError class raised (ssecfs/errors.py: 1 failure
at run time, 2 bad usage, 3 key file, 4 bucket/endpoint/credentials, 5 security refusal, 6 cache
dir, 7 mountpoint, 8 wrong key).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time

from .. import __version__
from ..config import (FsConfig, MountConfig, StoreConfig, parse_id, parse_mode, parse_size,
                     parse_source)
from ..errors import EXIT_FAILURE, CommandFailed, UserError

log = logging.getLogger("ssecfs")

# Options mount(8)/mount.fuse add or that only matter to mount(8): accepted and ignored.
O_IGNORED = {"rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "auto", "noauto",
             "_netdev", "nofail", "user", "nouser", "users", "defaults", "atime", "noatime",
             "relatime", "strictatime", "nodiratime", "diratime", "async", "sync",
             "default_permissions"}   # always on
# FUSE options passed through to libfuse.
O_FUSE = {"nonempty", "allow_root", "auto_unmount", "kernel_cache", "direct_io", "max_read",
          "fsname", "subtype", "umask", "debug"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssecfs", description="Mount an S3 bucket with SSE-C "
                                "encryption and an encrypted write-back cache.")
    p.add_argument("--version", action="version", version=f"ssecfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_mount_parser(sub)
    _add_daemon_parsers(sub)
    _add_bucket_parsers(sub)
    return p


def _add_mount_parser(sub) -> None:
    m = sub.add_parser("mount", help="mount BUCKET[:PREFIX] on MOUNTPOINT")
    m.add_argument("source", metavar="BUCKET[:PREFIX]")
    m.add_argument("mountpoint")
    add_store_args(m)
    m.add_argument("--cache-dir", help="encrypted cache directory (default: per bucket under "
                   "/var/cache/ssecfs or ~/.cache/ssecfs)")
    m.add_argument("--cache-size", help="bound of the cache, e.g. 2G (default: 10%% of the "
                   "free space, 256M..10G)")
    m.add_argument("--foreground", "-f", action="store_true", help="stay attached (systemd)")
    m.add_argument("--read-only", "--ro", action="store_true", dest="read_only")
    m.add_argument("--allow-other", action="store_true", help="let other users access the mount")
    _add_ownership_args(m)
    m.add_argument("--force", action="store_true",
                   help="mount even if no key of the ring opens any sampled object")
    m.add_argument("--no-dir-index", action="store_true",
                   help="neither read nor write the per-directory attribute indexes "
                   "(DIR/.ssecfs-index objects that spare `ls -l` a HEAD per file)")
    m.add_argument("--cache-every-read", action="store_true",
                   help="cache what is read the first time it is read, big files read "
                   "sequentially included (default: those from their second read)")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                   help="options in mount(8) style (keyfile=..., endpoint_url=..., ro, ...)")
    m.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR",
                                                          "debug", "info", "warning", "error"])
    m.add_argument("--log-file", help="log here instead of stderr (default when daemonized: "
                   "/var/log/ssecfs/CACHE-ID.log, or ~/.local/state/ssecfs/ for other users)")
    _add_timing_args(m)


def _add_ownership_args(m: argparse.ArgumentParser) -> None:
    m.add_argument("--uid", help="owner of the root, of directories without a marker and of "
                   "objects without trusted ssecfs metadata (written by other tools, or opened "
                   "by no key of the ring); default: the mounting user")
    m.add_argument("--gid", help="their group (default: the mounting user's)")
    m.add_argument("--file-mode", help="permission bits of such files, octal (default 0644; "
                   "0600 with --allow-other)")
    m.add_argument("--dir-mode", help="permission bits of such directories, octal (default "
                   "0755; 0700 with --allow-other)")


def _add_timing_args(m: argparse.ArgumentParser) -> None:
    m.add_argument("--writeback-delay", type=float, default=None,
                   help="seconds to wait after close before uploading (default 2)")
    m.add_argument("--upload-workers", type=int, default=None,
                   help="upload workers (default 8; each sends up to 8 files of 256 KiB or "
                        "less at once; of files over 1 MiB at most 8 upload at once)")
    m.add_argument("--attr-timeout", type=float, default=None,
                   help="seconds attributes are cached (default 1)")
    m.add_argument("--fsync-timeout", type=float, default=None,
                   help="fsync fails with EIO after this many seconds (default 0: waits)")
    m.add_argument("--flush-timeout", type=float, default=None,
                   help="at unmount, stop waiting for uploads after this many seconds "
                   "(default 0: wait; data left stays in the cache for the next mount)")


def _add_daemon_parsers(sub) -> None:
    u = sub.add_parser("umount", help="upload pending data, then unmount")
    u.add_argument("mountpoint")
    u.add_argument("--timeout", type=float, default=0,
                   help="give up waiting for uploads after this many seconds (default: wait)")
    u.add_argument("--lazy", action="store_true", help="detach even if files are in use")

    s = sub.add_parser("status", help="pending uploads, cache use, last error of a mount")
    s.add_argument("mountpoint")
    s.add_argument("--json", action="store_true")


def _add_bucket_parsers(sub) -> None:
    k = sub.add_parser("keygen", help="write a new random 32-byte key file (mode 0600)")
    k.add_argument("path")

    r = sub.add_parser("rekey", help="re-encrypt every object not yet under the ring's first key")
    r.add_argument("source", metavar="BUCKET[:PREFIX]")
    add_store_args(r)
    r.add_argument("--dry-run", action="store_true", help="only count what would be re-encrypted")
    r.add_argument("--workers", type=int, default=8)
    r.add_argument("--no-progress", action="store_true")

    c = sub.add_parser("check", help="is this setup safe? (TLS, credentials, SSE-C enforced, keys)")
    c.add_argument("source", metavar="BUCKET[:PREFIX]")
    add_store_args(c)
    c.add_argument("--sample", type=int, default=20, help="objects to test the keys on")


def _o_spellings() -> tuple[set, dict]:
    """The -o spellings (fstab / mount.fuse) of the mount command's options, taken from its
    parser so that an option is declared once: --cache-dir X is -o cache_dir=X, --ro is -o ro.
    Returns (names that take a value, flag name -> the attribute it sets)."""
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    values, flags = set(), {}
    for action in sub.choices["mount"]._actions:
        for opt in action.option_strings:
            if not opt.startswith("--") or action.dest == "help":
                continue
            name = opt[2:].replace("-", "_")
            if action.nargs == 0:
                flags[name] = action.dest
            else:
                values.add(name)
    return values, flags


def add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keyfile", help="key file: raw 32 bytes, or base64 keys one per line")
    p.add_argument("--endpoint-url", help="S3 endpoint (https://...; http:// only to loopback)")
    p.add_argument("--region")
    p.add_argument("--profile", help="AWS profile for credentials")
    p.add_argument("--ca-bundle", help="CA bundle to verify the endpoint's TLS certificate")


O_VALUE, O_FLAG = _o_spellings()


def apply_o_options(args: argparse.Namespace) -> None:
    """Fold -o a=b,c options into args (CLI flags given explicitly take precedence)."""
    fuse_opts = []
    for group in args.options:
        for opt in filter(None, (o.strip() for o in group.split(","))):
            name, eq, val = opt.partition("=")
            key = name.replace("-", "_")
            if key in O_VALUE and eq:
                if getattr(args, key, None) in (None, ""):
                    setattr(args, key, val)
            elif key in O_FLAG and not eq:
                setattr(args, O_FLAG[key], True)
            elif key in O_IGNORED or name.startswith("x-") or name == "comment":
                continue
            elif key in O_FUSE:
                fuse_opts.append(opt)
            else:
                raise UserError(f"unknown mount option {name!r} (see ssecfs mount --help)")
    args.fuse_options = tuple(fuse_opts)


def default_cache_dir(store: StoreConfig, endpoint: str, prefix: str) -> str:
    """One cache per endpoint (as resolved: from the flag or the AWS configuration), bucket
    and prefix."""
    ident = hashlib.sha256(f"{endpoint}|{store.bucket}|{prefix}".encode()).hexdigest()[:12]
    base = "/var/cache/ssecfs" if os.getuid() == 0 else os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ssecfs")
    if os.environ.get("CACHE_DIRECTORY"):          # systemd CacheDirectory=
        base = os.environ["CACHE_DIRECTORY"].split(":")[0]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", store.bucket)
    return os.path.join(base, f"{safe}-{ident}")


def build_mount_config(args: argparse.Namespace) -> MountConfig:
    from ..cache import default_cache_size
    apply_o_options(args)
    if not args.keyfile:
        raise UserError("--keyfile is required (make one with: ssecfs keygen FILE)")
    bucket, prefix = parse_source(args.source)
    store = StoreConfig(bucket=bucket, endpoint_url=args.endpoint_url, region=args.region,
                        profile=args.profile, ca_bundle=args.ca_bundle)
    from ..store.transport import resolve_transport   # refuses here, before the daemon starts
    transport = resolve_transport(store.endpoint_url, profile=store.profile, region=store.region,
                                  ca_bundle=store.ca_bundle)
    if args.ca_bundle and not os.path.isfile(args.ca_bundle):
        raise UserError(f"--ca-bundle {args.ca_bundle}: no such file")

    def num(v, default, conv=float):
        if v in (None, ""):
            return default
        try:
            return conv(v)
        except ValueError:
            raise UserError(f"invalid number {v!r}") from None
    fs = FsConfig(prefix=prefix, read_only=bool(args.read_only),
                  attr_timeout=num(args.attr_timeout, 1.0),
                  writeback_delay=num(args.writeback_delay, 2.0),
                  upload_workers=num(args.upload_workers, 8, int),
                  fsync_timeout=num(args.fsync_timeout, 0.0),
                  dir_index=not getattr(args, "no_dir_index", False),
                  cache_every_read=bool(getattr(args, "cache_every_read", False)),
                  uid=parse_id(args.uid, "--uid") if args.uid else os.getuid(),
                  gid=parse_id(args.gid, "--gid") if args.gid else os.getgid(),
                  # under --allow-other, what nobody vouched for is the mounting user's only
                  file_mode=parse_mode(args.file_mode, "--file-mode") if args.file_mode
                  else 0o600 if args.allow_other else 0o644,
                  dir_mode=parse_mode(args.dir_mode, "--dir-mode") if args.dir_mode
                  else 0o700 if args.allow_other else 0o755)
    cache_dir = os.path.abspath(args.cache_dir or default_cache_dir(store, transport.url, prefix))
    cache_size = parse_size(args.cache_size) if args.cache_size else default_cache_size(cache_dir)
    return MountConfig(store=store, fs=fs, mountpoint=os.path.abspath(args.mountpoint),
                       keyfile=os.path.abspath(args.keyfile) if os.sep in args.keyfile
                       else args.keyfile,
                       cache_dir=cache_dir, cache_size=cache_size,
                       foreground=bool(args.foreground), allow_other=bool(args.allow_other),
                       fuse_options=args.fuse_options,
                       log_level=(args.log_level or "INFO").upper(), force=bool(args.force),
                       flush_timeout=num(args.flush_timeout, 0.0), source=args.source,
                       log_file=args.log_file)


# ---------------------------------------------------------------------------- commands
def cmd_mount(args: argparse.Namespace) -> int:
    from ..mount import daemon
    cfg = build_mount_config(args)
    if cfg.foreground:
        daemon.setup_logging(cfg.log_level, cfg.log_file)
        return daemon.run(cfg)
    from .spawn import spawn_daemon
    return spawn_daemon(cfg)


def pid_alive(pid: int | None) -> bool:
    """A zombie is not alive: the daemon has exited and only waits for its reaper (the
    daemon is reparented when `ssecfs mount` returns; some inits reap every few seconds)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return not os.path.isdir("/proc/self")      # no /proc: trust kill(0)


def cmd_umount(args: argparse.Namespace) -> int:
    from ..mount import registry
    mp = os.path.abspath(args.mountpoint)
    reg = registry.read_registry(mp)
    if not os.path.ismount(mp) and not reg:
        raise UserError(f"{mp} is not mounted")
    if os.path.ismount(mp):
        tool = shutil.which("fusermount") or shutil.which("fusermount3")
        cmd = [tool, "-u"] + (["-z"] if args.lazy else []) + [mp] if tool else \
            ["umount"] + (["-l"] if args.lazy else []) + [mp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            msg = (res.stderr or res.stdout).strip().splitlines()
            raise CommandFailed(f"cannot unmount {mp}: {msg[-1] if msg else 'failed'} "
                            "(files in use? close them, or use --lazy)")
    if not reg:
        return 0
    pid = reg.get("pid", 0)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    last = 0.0
    while pid_alive(pid):
        if deadline and time.monotonic() > deadline:
            print(f"ssecfs: uploads still pending after {args.timeout:.0f}s; the daemon "
                  f"(pid {pid}) keeps trying in the background", file=sys.stderr)
            return EXIT_FAILURE
        if time.monotonic() - last > 2:
            last = time.monotonic()
            try:
                s = registry.query_control(reg["control"], timeout=2)
                if s.get("dirty_files"):
                    print(f"ssecfs: waiting for {s['dirty_files']} file(s), "
                          f"{s['bytes_pending']} bytes to upload", file=sys.stderr)
            except (OSError, ValueError):
                pass
        time.sleep(0.05)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json
    from ..mount import registry
    reg = registry.read_registry(args.mountpoint)
    if not reg:
        raise CommandFailed(f"{args.mountpoint}: no ssecfs daemon is serving this mount point")
    try:
        s = registry.query_control(reg["control"])
    except (OSError, ValueError) as e:
        raise CommandFailed(f"{args.mountpoint}: daemon not answering ({e})") from None
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    mb = lambda n: f"{n / 1048576:.1f} MiB"  # noqa: E731
    print(f"mount:            {s['mountpoint']} ({s['source']}, pid {s['pid']})")
    print(f"dirty files:      {s['dirty_files']} ({mb(s['bytes_pending'])} pending)")
    print(f"uploads:          {s['uploads_in_flight']} in flight, {s['uploads_done']} done, "
          f"{s['upload_errors']} failed attempts")
    print(f"last error:       {s['last_error'] or '-'}")
    if "deletes_pending" in s:
        print(f"deletes:          {s['deletes_pending']} pending, {s['deletes_done']} done"
              + (f" (last error: {s['delete_error']})" if s.get("delete_error") else ""))
    print(f"cache:            {mb(s['cache_used_bytes'])} used of {mb(s['cache_max_bytes'])} "
          f"({mb(s['cache_dirty_bytes'])} dirty)")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from ..crypto.keys import write_keyfile
    key = write_keyfile(args.path)
    print(f"wrote a new 32-byte key to {args.path} (mode 0600, {key.short_id}); "
          "keep a copy somewhere safe: without it the data cannot be read", file=sys.stderr)
    return 0


def _store_for(args: argparse.Namespace):
    from ..crypto.keys import load_keyring
    from ..store.s3 import S3Store
    if not args.keyfile:
        raise UserError("--keyfile is required")
    bucket, prefix = parse_source(args.source)
    sc = StoreConfig(bucket=bucket, endpoint_url=args.endpoint_url, region=args.region,
                     profile=args.profile, ca_bundle=args.ca_bundle)
    ring = load_keyring(args.keyfile)
    store = S3Store(sc.bucket, ring, endpoint_url=sc.endpoint_url, region=sc.region,
                    profile=sc.profile, ca_bundle=sc.ca_bundle,
                    workers=max(8, getattr(args, "workers", 8)))
    return store, prefix


def cmd_rekey(args: argparse.Namespace) -> int:
    from ..mount.daemon import harden_process
    from .rekey import rekey, summary
    harden_process()
    logging.basicConfig(level=logging.WARNING, format="ssecfs: %(message)s")
    store, prefix = _store_for(args)
    store.check_bucket()
    rep = rekey(store, prefix, workers=args.workers, dry_run=args.dry_run,
                progress=not args.no_progress and sys.stderr.isatty())
    for line in summary(rep, args.dry_run):
        print(line)
    return 0 if rep.ok else EXIT_FAILURE


def cmd_check(args: argparse.Namespace) -> int:
    from .check import FAIL, run_checks
    from ..mount.daemon import harden_process
    harden_process()
    store, prefix = _store_for(args)
    failed = False
    for status, msg in run_checks(store, prefix, args.sample):
        print(f"{status:4} {msg}")
        failed |= status == FAIL
    print("verdict: " + ("NOT SAFE" if failed else "safe"))
    return EXIT_FAILURE if failed else 0


COMMANDS = {"mount": cmd_mount, "umount": cmd_umount, "status": cmd_status, "keygen": cmd_keygen,
            "rekey": cmd_rekey, "check": cmd_check}


def normalize_argv(argv: list[str]) -> list[str]:
    """mount.fuse calls `ssecfs SOURCE MOUNTPOINT -o OPTS`: treat it as `ssecfs mount ...`."""
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-") and len(argv) >= 2:
        return ["mount"] + argv
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"ssecfs: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader of our output went away (`ssecfs status | head -1`): not an error to
        # report with a traceback; exit as a tool killed by SIGPIPE would (128 + 13)
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 141


if __name__ == "__main__":
    sys.exit(main())
