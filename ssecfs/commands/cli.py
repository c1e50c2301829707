"""Command line: mount, umount, status, keygen (and the mount.fuse calling convention
``ssecfs SOURCE MOUNTPOINT -o opt,opt``). Builds the config; knows nothing of boto3 or FUSE.

Exit codes: 0 ok, 1 failure at run time, 2 bad usage, 3 key file, 4 bucket/endpoint/credentials,
5 security refusal (plain http, SSE-C not enforced), 6 cache dir, 7 mountpoint, 8 wrong key.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import select
import shutil
import subprocess
import sys
import time

from .. import __version__
from ..config import (FsConfig, MountConfig, StoreConfig, parse_id, parse_mode, parse_size,
                     parse_source)
from ..errors import UserError

log = logging.getLogger("ssecfs")

# -o spellings of CLI options (fstab / mount.fuse); value-less ones are flags.
O_VALUE = {"keyfile", "endpoint_url", "region", "profile", "ca_bundle", "cache_dir",
           "cache_size", "log_level", "log_file", "writeback_delay", "upload_workers",
           "attr_timeout", "fsync_timeout", "flush_timeout", "uid", "gid", "file_mode",
           "dir_mode"}
O_FLAG = {"ro": "read_only", "read_only": "read_only", "allow_other": "allow_other",
          "foreground": "foreground", "force": "force", "no_dir_index": "no_dir_index",
          "cache_every_read": "cache_every_read"}
# Options mount(8)/mount.fuse add or that only matter to mount(8): accepted and ignored.
O_IGNORED = {"rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "auto", "noauto",
             "_netdev", "nofail", "user", "nouser", "users", "defaults", "atime", "noatime",
             "relatime", "strictatime", "nodiratime", "diratime", "async", "sync",
             "default_permissions"}   # always on
# FUSE options passed through to libfuse.
O_FUSE = {"nonempty", "allow_root", "auto_unmount", "kernel_cache", "direct_io", "max_read",
          "fsname", "subtype", "umask", "debug"}


# glibc: serve the daemon's multi-MiB buffers (range GETs, upload parts) from the heap and
# keep it, instead of an mmap + page faults + munmap per buffer (~10% of a cold read's CPU).
# Applied to the daemon `ssecfs mount` starts (the environment wins); the systemd unit sets
# the same.
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20),
                 "MALLOC_ARENA_MAX": "4"}

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssecfs", description="Mount an S3 bucket with SSE-C "
                                "encryption and an encrypted write-back cache.")
    p.add_argument("--version", action="version", version=f"ssecfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

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
    m.add_argument("--uid", help="owner of the root, of directories without a marker and of "
                   "objects without trusted ssecfs metadata (written by other tools, or opened "
                   "by no key of the ring); default: the mounting user")
    m.add_argument("--gid", help="their group (default: the mounting user's)")
    m.add_argument("--file-mode", help="permission bits of such files, octal (default 0644; "
                   "0600 with --allow-other)")
    m.add_argument("--dir-mode", help="permission bits of such directories, octal (default "
                   "0755; 0700 with --allow-other)")
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
    m.add_argument("--writeback-delay", type=float, default=None,
                   help="seconds to wait after close before uploading (default 2)")
    m.add_argument("--upload-workers", type=int, default=None, help="parallel uploads (default 8)")
    m.add_argument("--attr-timeout", type=float, default=None,
                   help="seconds attributes are cached (default 1)")
    m.add_argument("--fsync-timeout", type=float, default=None,
                   help="fsync fails with EIO after this many seconds (default 0: waits)")
    m.add_argument("--flush-timeout", type=float, default=None,
                   help="at unmount, stop waiting for uploads after this many seconds "
                   "(default 0: wait; data left stays in the cache for the next mount)")
    m.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)

    u = sub.add_parser("umount", help="upload pending data, then unmount")
    u.add_argument("mountpoint")
    u.add_argument("--timeout", type=float, default=0,
                   help="give up waiting for uploads after this many seconds (default: wait)")
    u.add_argument("--lazy", action="store_true", help="detach even if files are in use")

    s = sub.add_parser("status", help="pending uploads, cache use, last error of a mount")
    s.add_argument("mountpoint")
    s.add_argument("--json", action="store_true")

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
    return p


def add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keyfile", help="key file: raw 32 bytes, or base64 keys one per line")
    p.add_argument("--endpoint-url", help="S3 endpoint (https://...; http:// only to loopback)")
    p.add_argument("--region")
    p.add_argument("--profile", help="AWS profile for credentials")
    p.add_argument("--ca-bundle", help="CA bundle to verify the endpoint's TLS certificate")


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
                raise UserError(f"unknown mount option {name!r} (see ssecfs mount --help)", 2)
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
        raise UserError("--keyfile is required (make one with: ssecfs keygen FILE)", 2)
    bucket, prefix = parse_source(args.source)
    store = StoreConfig(bucket=bucket, endpoint_url=args.endpoint_url, region=args.region,
                        profile=args.profile, ca_bundle=args.ca_bundle)
    from ..store.transport import resolve_transport   # refuses here, before the daemon starts
    transport = resolve_transport(store.endpoint_url, profile=store.profile, region=store.region,
                                  ca_bundle=store.ca_bundle)
    if args.ca_bundle and not os.path.isfile(args.ca_bundle):
        raise UserError(f"--ca-bundle {args.ca_bundle}: no such file", 2)

    def num(v, default, conv=float):
        if v in (None, ""):
            return default
        try:
            return conv(v)
        except ValueError:
            raise UserError(f"invalid number {v!r}", 2) from None
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
                       flush_timeout=num(args.flush_timeout, 0.0), source=args.source)


# ---------------------------------------------------------------------------- commands
def cmd_mount(args: argparse.Namespace) -> int:
    from ..mount import daemon
    try:
        cfg = build_mount_config(args)
    except UserError as e:
        if args.ready_fd is not None:       # the daemon `ssecfs mount` started: tell it why
            os.write(args.ready_fd, f"ERROR {e.exit_code} {e}\n".encode())
        raise
    if cfg.foreground:
        daemon.setup_logging(cfg.log_level, args.log_file)
        return daemon.run(cfg, ready_fd=args.ready_fd)
    return spawn_daemon(cfg, args)


def spawn_daemon(cfg: MountConfig, args: argparse.Namespace) -> int:
    """Start ourselves again with --foreground in a new session and wait for its first line:
    READY (exit 0) or ERROR CODE MESSAGE (print MESSAGE, exit CODE)."""
    from ..mount.daemon import default_log_file, open_log_file
    os.makedirs(cfg.cache_dir, mode=0o700, exist_ok=True)
    log_file = os.path.abspath(args.log_file or default_log_file(cfg.cache_dir))
    os.close(open_log_file(log_file))       # its problems are said here, in one line
    argv = [sys.executable, "-m", "ssecfs", "mount", cfg.source, cfg.mountpoint,
            "--keyfile", cfg.keyfile, "--cache-dir", cfg.cache_dir,
            "--cache-size", str(cfg.cache_size), "--foreground", "--log-file", log_file,
            "--log-level", cfg.log_level,
            "--writeback-delay", str(cfg.fs.writeback_delay),
            "--upload-workers", str(cfg.fs.upload_workers),
            "--attr-timeout", str(cfg.fs.attr_timeout),
            "--fsync-timeout", str(cfg.fs.fsync_timeout),
            "--flush-timeout", str(cfg.flush_timeout),
            "--uid", str(cfg.fs.uid), "--gid", str(cfg.fs.gid),
            "--file-mode", f"{cfg.fs.file_mode:04o}", "--dir-mode", f"{cfg.fs.dir_mode:04o}"]
    for flag, val in (("--endpoint-url", cfg.store.endpoint_url), ("--region", cfg.store.region),
                      ("--profile", cfg.store.profile), ("--ca-bundle", cfg.store.ca_bundle)):
        if val:
            argv += [flag, val]
    for flag, on in (("--read-only", cfg.fs.read_only), ("--allow-other", cfg.allow_other),
                     ("--force", cfg.force), ("--no-dir-index", not cfg.fs.dir_index),
                     ("--cache-every-read", cfg.fs.cache_every_read)):
        if on:
            argv.append(flag)
    if cfg.fuse_options:
        argv += ["-o", ",".join(cfg.fuse_options)]
    r, w = os.pipe()
    argv += ["--ready-fd", str(w)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, pass_fds=(w,), start_new_session=True,
                            close_fds=True, env={**MALLOC_TUNING, **os.environ})
    os.close(w)
    deadline = time.monotonic() + 300
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([r], [], [], 1.0)
        if ready:
            part = os.read(r, 4096)
            if not part:
                break
            buf += part
            if b"\n" in buf:
                break
        elif proc.poll() is not None:
            break
    os.close(r)
    line = buf.decode(errors="replace").strip()
    if line == "READY":
        return 0
    if line.startswith("ERROR "):
        _, code, msg = line.split(" ", 2)
        print(f"ssecfs: {msg}", file=sys.stderr)
        return int(code)
    if proc.poll() is None:
        proc.terminate()
        print(f"ssecfs: mount did not become ready in time (see {log_file})", file=sys.stderr)
    else:
        print(f"ssecfs: daemon exited with status {proc.returncode} (see {log_file})",
              file=sys.stderr)
    return 1


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
    from ..mount import daemon
    mp = os.path.abspath(args.mountpoint)
    reg = daemon.read_registry(mp)
    if not os.path.ismount(mp) and not reg:
        raise UserError(f"{mp} is not mounted", 2)
    if os.path.ismount(mp):
        tool = shutil.which("fusermount") or shutil.which("fusermount3")
        cmd = [tool, "-u"] + (["-z"] if args.lazy else []) + [mp] if tool else \
            ["umount"] + (["-l"] if args.lazy else []) + [mp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            msg = (res.stderr or res.stdout).strip().splitlines()
            raise UserError(f"cannot unmount {mp}: {msg[-1] if msg else 'failed'} "
                            "(files in use? close them, or use --lazy)", 1)
    if not reg:
        return 0
    pid = reg.get("pid", 0)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    last = 0.0
    while pid_alive(pid):
        if deadline and time.monotonic() > deadline:
            print(f"ssecfs: uploads still pending after {args.timeout:.0f}s; the daemon "
                  f"(pid {pid}) keeps trying in the background", file=sys.stderr)
            return 1
        if time.monotonic() - last > 2:
            last = time.monotonic()
            try:
                s = daemon.query_control(reg["control"], timeout=2)
                if s.get("dirty_files"):
                    print(f"ssecfs: waiting for {s['dirty_files']} file(s), "
                          f"{s['bytes_pending']} bytes to upload", file=sys.stderr)
            except (OSError, ValueError):
                pass
        time.sleep(0.05)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json
    from ..mount import daemon
    reg = daemon.read_registry(args.mountpoint)
    if not reg:
        raise UserError(f"{args.mountpoint}: no ssecfs daemon is serving this mount point", 1)
    try:
        s = daemon.query_control(reg["control"])
    except (OSError, ValueError) as e:
        raise UserError(f"{args.mountpoint}: daemon not answering ({e})", 1) from None
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
        raise UserError("--keyfile is required", 2)
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
    return 0 if rep.ok else 1


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
    return 1 if failed else 0


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
