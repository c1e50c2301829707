"""Wiring: builds the key ring, store, cache and filesystem from a MountConfig, runs the
pre-mount checks, mounts with FUSE in the foreground, reports readiness (pipe to the parent
`ssecfs mount`, and sd_notify READY=1), serves `ssecfs status` on a control socket, and on
unmount (umount, fusermount -u, SIGTERM, SIGINT) uploads every pending file before exiting.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import os
import resource
import signal
import socket
import stat
import sys
import threading
import time

from ..cache import Cache
from ..config import MountConfig
from ..crypto.aead import WHOLE_GCM, Sealer
from ..errors import UserError
from ..crypto.keys import KeyRing, load_keyring
from ..store.contract import LOCKED

log = logging.getLogger("ssecfs")

EXIT_SECURITY = 5
EXIT_MOUNTPOINT = 7
EXIT_WRONG_KEY = 8
FUSE_MAX_WRITE = 131072
INDEX_FLUSH_TIMEOUT = 30          # unmount: seconds to wait for directory indexes


# ---------------------------------------------------------------------------- logging
class RedactSecrets(logging.Filter):
    """Defence in depth: no record leaves with a key in it, whatever a caller formatted."""

    def __init__(self, ring: KeyRing):
        super().__init__()
        self._forms = [f.decode("latin-1") for k in ring.keys for f in k.secret_forms()]

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if any(f in msg for f in self._forms):
            for f in self._forms:
                msg = msg.replace(f, "[REDACTED]")
            record.msg, record.args = msg, ()
        if record.exc_info and record.exc_info[1] is not None:
            text = str(record.exc_info[1])
            if any(f in text for f in self._forms):
                record.exc_info = None
                record.msg = f"{msg} (exception text withheld: it contained key material)"
                record.args = ()
        return True


def under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def default_log_file(cache_dir: str) -> str:
    """Where a daemonized mount logs unless told otherwise: not in the cache directory (the
    log names files, and the cache holds nothing in clear), but in /var/log/ssecfs (root) or
    $XDG_STATE_HOME/ssecfs, one file per cache directory."""
    if os.geteuid() == 0:
        base = "/var/log/ssecfs"
    else:
        base = os.path.join(os.environ.get("XDG_STATE_HOME")
                            or os.path.expanduser("~/.local/state"), "ssecfs")
    cache_dir = os.path.abspath(cache_dir)
    h = hashlib.sha256(cache_dir.encode()).hexdigest()[:8]
    return os.path.join(base, f"{os.path.basename(cache_dir)}-{h}.log")


def open_log_file(path: str) -> int:
    """The log file, opened for appending: never through a symbolic link, a regular file of
    ours, mode 0600 (its lines name files). UserError (one line) otherwise."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        private_dir(parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as e:
        why = "is a symbolic link" if e.errno == errno.ELOOP else e.strerror
        raise UserError(f"log file {path}: {why}", 2) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise UserError(f"log file {path}: not a regular file of uid {os.geteuid()}", 2)
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.fchmod(fd, 0o600)
    return fd


def setup_logging(level: str, log_file: str | None = None) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if log_file:
        handler: logging.Handler = logging.StreamHandler(
            os.fdopen(open_log_file(log_file), "a", buffering=1))
    else:
        handler = logging.StreamHandler(sys.stderr)
    fmt = "%(levelname)s %(name)s: %(message)s" if under_systemd() and not log_file else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "fuse"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level)
                                          if level.upper() != "DEBUG" else logging.DEBUG)


def install_redaction(ring: KeyRing) -> None:
    f = RedactSecrets(ring)
    for h in logging.getLogger().handlers:
        h.addFilter(f)


# ---------------------------------------------------------------------------- sd_notify
def sd_notify(message: str) -> bool:
    """The systemd notify protocol: one datagram to $NOTIFY_SOCKET. No libsystemd needed."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify failed: %s", e)
        return False


# ---------------------------------------------------------------------------- hardening
_PR_SET_DUMPABLE = 4


def harden_process() -> None:
    """No core dump, and no ptrace or /proc/PID/mem by other processes of the same user: a
    crash or a curious process must not carry the keys, the cache keys or plaintext buffers
    out of this process. Done before any key is read."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise UserError("cannot make the process non-dumpable (prctl PR_SET_DUMPABLE: "
                        f"{os.strerror(ctypes.get_errno())})", EXIT_SECURITY)


# ---------------------------------------------------------------------------- registry
def runtime_dir() -> str:
    """Where the registry and control sockets live: private to this user, never a shared
    /tmp path another user could have made first."""
    if os.geteuid() == 0:
        return "/run/ssecfs"
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "ssecfs")
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                        "ssecfs", "run")


def _private_problem(path: str) -> str | None:
    """Why `path` is not a directory only this user controls (None if it is)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "does not exist"
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return f"belongs to uid {st.st_uid}, not {os.geteuid()}"
    if stat.S_IMODE(st.st_mode) & 0o022:
        return f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def private_dir(path: str) -> str:
    """Create `path` (mode 0700, parents as needed) or check the one there: ours, not a
    link, not writable by anyone else; else UserError (a security refusal)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    why = _private_problem(path)
    if why:
        raise UserError(f"directory {path} {why}: refusing to use it (another user could "
                        "plant files there)", EXIT_SECURITY)
    if stat.S_IMODE(os.lstat(path).st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def _mount_id(mountpoint: str) -> str:
    return hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]


def registry_path(mountpoint: str) -> str:
    return os.path.join(runtime_dir(), f"mount-{_mount_id(mountpoint)}.json")


def control_path(mountpoint: str) -> str:
    return os.path.join(runtime_dir(), f"control-{_mount_id(mountpoint)}.sock")


def write_registry(mountpoint: str, doc: dict) -> str:
    """Write the registry entry of a mount atomically, through no link, mode 0600."""
    path = registry_path(mountpoint)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)
    return path


def read_registry(mountpoint: str) -> dict | None:
    """The registry entry of a mount; None if there is none, or if the runtime directory is
    not this user's alone (what another user put there is not believed)."""
    if _private_problem(runtime_dir()):
        return None
    try:
        fd = os.open(registry_path(mountpoint), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def query_control(sock_path: str, command: str = "status", timeout: float = 5) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(command.encode() + b"\n")
        data = b""
        while True:
            part = s.recv(65536)
            if not part:
                break
            data += part
    return json.loads(data.decode())


class ControlServer:
    """Answers `status` on a unix socket (mode 0600) with a JSON document."""

    def __init__(self, path: str, status_fn):
        self.path = path
        self.status_fn = status_fn
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(8)
        threading.Thread(target=self._serve, name="control", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(5)
                    conn.recv(1024)
                    conn.sendall(json.dumps(self.status_fn()).encode())
                except Exception as e:  # noqa: BLE001 - a status query never kills the daemon
                    log.debug("control connection: %s", e)

    def close(self) -> None:
        try:
            self.sock.close()
            os.unlink(self.path)
        except OSError:
            pass


# ---------------------------------------------------------------------------- checks
def check_mountpoint(path: str, nonempty_ok: bool = False) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"mountpoint {path} does not exist", EXIT_MOUNTPOINT) from None
    except OSError as e:
        raise UserError(f"mountpoint {path}: {e.strerror} (already mounted and broken? "
                        f"try: fusermount -u {path})", EXIT_MOUNTPOINT) from None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"mountpoint {path} is not a directory", EXIT_MOUNTPOINT)
    if os.path.ismount(path):
        raise UserError(f"mountpoint {path} is already a mount point", EXIT_MOUNTPOINT)
    if not nonempty_ok and os.listdir(path):
        raise UserError(f"mountpoint {path} is not empty", EXIT_MOUNTPOINT)


def check_ring_opens_bucket(store, prefix: str, sample: int = 10) -> None:
    """The classic mistake: mounting with the wrong key file. If the bucket holds objects and
    no key of the ring opens any of a sample of them, refuse (unless --force)."""
    tried = locked = 0
    for page in store.list_page_iter(prefix, delimiter=None, max_keys=100):
        for o in page.objects:
            if o.key.endswith("/") or o.size == 0 or "/.ssecfs-probe-" in "/" + o.key:
                continue
            tried += 1
            info = store.head(o.key)
            if info.access == LOCKED:
                locked += 1
            else:
                return
            if tried >= sample:
                break
        break
    if tried and locked == tried:
        raise UserError(
            f"no key in the key file opens any of {tried} sampled objects in the bucket: "
            "wrong key file? (use --force to mount anyway)", EXIT_WRONG_KEY)


# ---------------------------------------------------------------------------- run
def build(cfg: MountConfig, ring: KeyRing):
    from ..fs.filesystem import Filesystem
    from ..store.s3 import S3Store
    sc = cfg.store
    store = S3Store(sc.bucket, ring, endpoint_url=sc.endpoint_url, region=sc.region,
                    profile=sc.profile, ca_bundle=sc.ca_bundle, workers=sc.workers)
    sealers = {k.fingerprint: Sealer(k.cache_key()) for k in ring.keys}
    if sealers[ring.current.fingerprint].whole_form == WHOLE_GCM:
        log.warning("this OpenSSL has no AES-OCB3: the cache seals file data with AES-GCM "
                    "(slower), and cannot read chunks another ssecfs sealed with OCB3")
    cache = Cache(cfg.cache_dir, sealers, cfg.cache_size, ring.current.fingerprint)
    return store, cache, Filesystem(store, cache, cfg.fs)


def preflight(cfg: MountConfig, store) -> None:
    store.check_bucket()
    probe = cfg.fs.prefix + ".ssecfs-probe-" + os.urandom(6).hex()
    store.probe_sse(probe)
    if not cfg.force:
        check_ring_opens_bucket(store, cfg.fs.prefix)


def run(cfg: MountConfig, ready_fd: int | None = None) -> int:
    """Runs the mount in the foreground until unmounted. Returns the exit code."""

    def report(line: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            try:
                os.write(ready_fd, (line + "\n").encode())
                os.close(ready_fd)
            except OSError:
                pass
            ready_fd = None

    try:
        harden_process()
        ring = load_keyring(cfg.keyfile)
        install_redaction(ring)
        check_mountpoint(cfg.mountpoint, nonempty_ok="nonempty" in cfg.fuse_options)
        private_dir(runtime_dir())
        store, cache, fs = build(cfg, ring)
        preflight(cfg, store)
        cache.open()
    except UserError as e:
        log.error("%s", e)
        report(f"ERROR {e.exit_code} {e}")
        return e.exit_code

    recovered = fs.recover()
    if fs.bad_entries:
        log.error("%d cache entries could not be opened with this key ring; they are kept in %s",
                  len(fs.bad_entries), cfg.cache_dir)
    control = ControlServer(control_path(cfg.mountpoint),
                            lambda: {"mountpoint": cfg.mountpoint, "source": cfg.source,
                                     "pid": os.getpid(), **fs.status()})
    reg = write_registry(cfg.mountpoint, {
        "pid": os.getpid(), "mountpoint": os.path.realpath(cfg.mountpoint),
        "cache_dir": cfg.cache_dir, "control": control.path, "source": cfg.source})

    stop_status = threading.Event()

    def on_init():
        def announce():
            # FUSE answers requests once init returns; confirm the mount is visible first.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not os.path.ismount(cfg.mountpoint):
                time.sleep(0.01)
            log.info("mounted %s on %s (%d key(s) in ring, current %s; %d file(s) recovered)",
                     cfg.source, cfg.mountpoint, len(ring), ring.current.short_id, recovered)
            report("READY")
            sd_notify("READY=1\nSTATUS=mounted")
            while not stop_status.wait(5):
                s = fs.status()
                sd_notify(f"STATUS={s['dirty_files']} file(s) pending upload, "
                          f"{s['uploads_in_flight']} in flight")
        threading.Thread(target=announce, name="ready", daemon=True).start()

    class StopFlushing(Exception):
        pass

    def on_destroy():
        # libfuse has restored the default SIGTERM/SIGINT by now: a second signal (systemd's
        # stop timeout, a .mount unit stopping) would kill us mid-upload without a word.
        # (Installed before STOPPING=1 is announced, so a signal sent on seeing it is caught.)
        def hurry(signum, _frame):
            raise StopFlushing(signal.Signals(signum).name)
        in_main = threading.current_thread() is threading.main_thread()
        old = {s: signal.signal(s, hurry) for s in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
        stop_status.set()
        try:
            sd_notify("STOPPING=1")
            _flush_before_exit()
        except StopFlushing as e:
            log.warning("unmount: %s during the final upload: stopping now; %d file(s) stay in "
                        "the cache (%s) and upload at the next mount", e, len(fs.dirty_files()),
                        cfg.cache_dir)
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    def _flush_before_exit():
        n = len(fs.dirty_files())
        if n:
            log.info("unmounting: uploading %d pending file(s) before exit", n)
        last = [0.0]

        def progress(files, nbytes):
            if files and time.monotonic() - last[0] > 2:
                last[0] = time.monotonic()
                log.info("unmounting: %d file(s), %d bytes still to upload", files, nbytes)
                sd_notify(f"STATUS=flushing: {files} file(s) to upload")
        ok = fs.flush_all(timeout=cfg.flush_timeout or None, progress=progress)
        if not ok:
            log.error("unmount: %d file(s) not uploaded before the timeout; they stay in the "
                      "cache (%s) and upload at the next mount", len(fs.dirty_files()), cfg.cache_dir)
        elif not fs.dirindex.flush(timeout=INDEX_FLUSH_TIMEOUT):
            log.warning("unmount: directory indexes not all written within %ds (only `ls -l` "
                        "speed depends on them)", INDEX_FLUSH_TIMEOUT)

    from .adapter import FuseAdapter, SsecfsFUSE
    opts = dict(foreground=True, nothreads=False, big_writes=True, max_write=FUSE_MAX_WRITE,
                max_read=FUSE_MAX_WRITE, default_permissions=True, hard_remove=True,
                auto_cache=True, fsname=f"ssecfs#{cfg.source}", subtype="ssecfs",
                attr_timeout=cfg.fs.attr_timeout, entry_timeout=cfg.fs.attr_timeout,
                negative_timeout=0, use_ino=False)
    if cfg.allow_other:
        opts["allow_other"] = True
    if cfg.fs.read_only:
        opts["ro"] = True
    for o in cfg.fuse_options:
        name, eq, val = o.partition("=")
        opts[name] = val if eq else True
    try:
        SsecfsFUSE(FuseAdapter(fs, on_init=on_init, on_destroy=on_destroy), cfg.mountpoint,
                   **opts)
        code = 0
    except RuntimeError as e:
        log.error("FUSE mount of %s failed: %s", cfg.mountpoint, e)
        report(f"ERROR 1 FUSE mount of {cfg.mountpoint} failed (see log)")
        code = 1
    finally:
        stop_status.set()
        control.close()
        try:
            os.unlink(reg)
        except OSError:
            pass
        fs.shutdown()
        cache.close()
    log.info("unmounted %s", cfg.mountpoint)
    return code
