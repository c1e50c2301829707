"""The mount daemon's life: builds the key ring, store, cache and filesystem from a
MountConfig, runs the pre-mount checks, mounts with FUSE in the foreground, reports readiness
(pipe to the parent `ssecfs mount`, and sd_notify READY=1), and on unmount (umount,
fusermount -u, SIGTERM, SIGINT) uploads every pending file before exiting. Also the process
around it: logging with key redaction, hardening, sd_notify.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
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
from ..crypto.keys import KeyRing, load_keyring
from ..errors import EXIT_FAILURE, MountpointError, SecurityRefusal, UserError, WrongKeyError
from ..store.contract import LOCKED
from .registry import ControlServer, control_path, private_dir, runtime_dir, write_registry

log = logging.getLogger("ssecfs")

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
        raise UserError(f"log file {path}: {why}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise UserError(f"log file {path}: not a regular file of uid {os.geteuid()}")
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
        raise SecurityRefusal("cannot make the process non-dumpable (prctl PR_SET_DUMPABLE: "
                        f"{os.strerror(ctypes.get_errno())})")


# ---------------------------------------------------------------------------- checks
def check_mountpoint(path: str, nonempty_ok: bool = False) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountpointError(f"mountpoint {path} does not exist") from None
    except OSError as e:
        raise MountpointError(f"mountpoint {path}: {e.strerror} (already mounted and broken? "
                        f"try: fusermount -u {path})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountpointError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise MountpointError(f"mountpoint {path} is already a mount point")
    if not nonempty_ok and os.listdir(path):
        raise MountpointError(f"mountpoint {path} is not empty")


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
        raise WrongKeyError(
            f"no key in the key file opens any of {tried} sampled objects in the bucket: "
            "wrong key file? (use --force to mount anyway)")


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


class ParentPipe:
    """The one line `ssecfs mount` waits for on its pipe: READY, or ERROR CODE MESSAGE."""

    def __init__(self, fd: int | None):
        self.fd = fd

    def say(self, line: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (line + "\n").encode())
            os.close(self.fd)
        except OSError:
            pass
        self.fd = None

    def refuse(self, e: UserError) -> int:
        log.error("%s", e)
        self.say(f"ERROR {e.exit_code} {e}")
        return e.exit_code


def fuse_mount_options(cfg: MountConfig) -> dict:
    # No hard_remove: with it, libfuse forgets the path of a file unlinked while open, and
    # answers the kernel's getattr of it (fstat: the kernel sends no file handle) with ENOENT
    # itself, so tmpfile() and Python's TemporaryFile fail. Without it, libfuse renames the
    # file to a `.fuse_hidden…` name, which the adapter turns into the unlink it stands for.
    opts = dict(foreground=True, nothreads=False, big_writes=True, max_write=FUSE_MAX_WRITE,
                max_read=FUSE_MAX_WRITE, default_permissions=True,
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
    return opts


def attached(dev: int, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether a mount of device dev is still attached (a dead FUSE mount, its connection
    aborted, still is; one lazily detached and torn down is not)."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    with open(mountinfo) as f:
        return any(line.split(None, 3)[2] == want for line in f)


class StopFlushing(Exception):
    """A second SIGTERM or SIGINT while the final upload runs: stop waiting for it."""


class Mount:
    """One mount from its start-up checks to the daemon's exit. The steps, in order:
    start (class method: checks, key ring, store, cache), publish (recovery, registry, control
    socket), serve (FUSE until unmount; on_init announces readiness, on_destroy uploads what
    is pending), close."""

    def __init__(self, cfg: MountConfig, ring: KeyRing, cache, fs, ready: ParentPipe):
        self.cfg, self.ring, self.cache, self.fs, self.ready = cfg, ring, cache, fs, ready
        self.recovered = 0
        self.control: ControlServer | None = None
        self.registry: str | None = None
        self._stop_status = threading.Event()
        self._last_progress = 0.0
        self._dev: int | None = None      # st_dev of the mount, once it is visible

    @classmethod
    def start(cls, cfg: MountConfig, ready: ParentPipe) -> Mount:
        """Every check that can refuse the mount (UserError), before anything is mounted."""
        harden_process()
        ring = load_keyring(cfg.keyfile)
        install_redaction(ring)
        check_mountpoint(cfg.mountpoint, nonempty_ok="nonempty" in cfg.fuse_options)
        private_dir(runtime_dir())
        store, cache, fs = build(cfg, ring)
        preflight(cfg, store)
        cache.open()
        return cls(cfg, ring, cache, fs, ready)

    def publish(self) -> None:
        """Re-adopt the journal of a previous run, then make the mount findable."""
        cfg, fs = self.cfg, self.fs
        self.recovered = fs.recover()
        if fs.uploads.bad_entries:
            log.error("%d cache entries could not be opened with this key ring; they are kept "
                      "in %s", len(fs.uploads.bad_entries), cfg.cache_dir)
        self.control = ControlServer(control_path(cfg.mountpoint), self.status)
        self.registry = write_registry(cfg.mountpoint, {
            "pid": os.getpid(), "mountpoint": os.path.realpath(cfg.mountpoint),
            "cache_dir": cfg.cache_dir, "control": self.control.path, "source": cfg.source})

    def status(self) -> dict:
        return {"mountpoint": self.cfg.mountpoint, "source": self.cfg.source,
                "pid": os.getpid(), **self.fs.status()}

    def serve(self) -> int:
        """The FUSE main loop, until unmounted: 0, or EXIT_FAILURE if the FUSE mount failed or
        its connection was cut under a mount still attached."""
        from .adapter import FuseAdapter, SsecfsFUSE
        try:
            SsecfsFUSE(FuseAdapter(self.fs, on_init=self.on_init, on_destroy=self.on_destroy),
                       self.cfg.mountpoint, **fuse_mount_options(self.cfg))
        except RuntimeError as e:
            return self._ended(e)
        return self._ended(None)

    def _ended(self, error: RuntimeError | None) -> int:
        """How the loop ended decides the exit code. By now on_destroy has uploaded (or kept
        in the cache journal) what was pending, whatever the ending."""
        mp = self.cfg.mountpoint
        if self._dev is None and error:
            log.error("FUSE mount of %s failed: %s", mp, error)
            self.ready.say(f"ERROR {EXIT_FAILURE} FUSE mount of {mp} failed (see log)")
            return EXIT_FAILURE
        if self._dev is not None and attached(self._dev):
            # Aborted through fusectl, or the kernel gave up on us: libfuse leaves the mount.
            log.error("the FUSE connection of %s was cut; its dead mount stays until "
                      "`fusermount -u %s`", mp, mp)
            return EXIT_FAILURE
        if error:
            # The kernel ends a lazily detached mount when its last file closes and aborts the
            # requests still queued: a libfuse thread that had just taken one reads
            # ECONNABORTED, not ENODEV, and libfuse reports its loop as failed.
            log.warning("FUSE loop ended with an error (%s) as the kernel closed the detached "
                        "mount %s; nothing was lost", error, mp)
        return 0

    def on_init(self) -> None:
        threading.Thread(target=self._announce, name="ready", daemon=True).start()

    def _announce(self) -> None:
        # FUSE answers requests once init returns; confirm the mount is visible first.
        cfg, ring = self.cfg, self.ring
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not os.path.ismount(cfg.mountpoint):
            time.sleep(0.01)
        try:
            self._dev = os.stat(cfg.mountpoint).st_dev
        except OSError:
            pass
        log.info("mounted %s on %s (%d key(s) in ring, current %s; %d file(s) recovered)",
                 cfg.source, cfg.mountpoint, len(ring), ring.current.short_id, self.recovered)
        self.ready.say("READY")
        sd_notify("READY=1\nSTATUS=mounted")
        while not self._stop_status.wait(5):
            s = self.fs.status()
            sd_notify(f"STATUS={s['dirty_files']} file(s) pending upload, "
                      f"{s['uploads_in_flight']} in flight")

    def on_destroy(self) -> None:
        # libfuse has restored the default SIGTERM/SIGINT by now: a second signal (systemd's
        # stop timeout, a .mount unit stopping) would kill us mid-upload without a word.
        # (Installed before STOPPING=1 is announced, so a signal sent on seeing it is caught.)
        def hurry(signum, _frame):
            raise StopFlushing(signal.Signals(signum).name)
        in_main = threading.current_thread() is threading.main_thread()
        old = {s: signal.signal(s, hurry) for s in (signal.SIGTERM, signal.SIGINT)} \
            if in_main else {}
        self._stop_status.set()
        try:
            sd_notify("STOPPING=1")
            self._flush_before_exit()
        except StopFlushing as e:
            log.warning("unmount: %s during the final upload: stopping now; %d file(s) stay in "
                        "the cache (%s) and upload at the next mount", e,
                        len(self.fs.dirty_files()), self.cfg.cache_dir)
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    def _flush_before_exit(self) -> None:
        fs = self.fs
        n = len(fs.dirty_files())
        if n:
            log.info("unmounting: uploading %d pending file(s) before exit", n)
        ok = fs.flush_all(timeout=self.cfg.flush_timeout or None, progress=self._progress)
        if not ok:
            log.error("unmount: %d file(s) not uploaded before the timeout; they stay in the "
                      "cache (%s) and upload at the next mount", len(fs.dirty_files()),
                      self.cfg.cache_dir)
        elif not fs.dirindex.flush(timeout=INDEX_FLUSH_TIMEOUT):
            log.warning("unmount: directory indexes not all written within %ds (only `ls -l` "
                        "speed depends on them)", INDEX_FLUSH_TIMEOUT)

    def _progress(self, files: int, nbytes: int) -> None:
        if files and time.monotonic() - self._last_progress > 2:
            self._last_progress = time.monotonic()
            log.info("unmounting: %d file(s), %d bytes still to upload", files, nbytes)
            sd_notify(f"STATUS=flushing: {files} file(s) to upload")

    def close(self) -> None:
        self._stop_status.set()
        if self.control:
            self.control.close()
        if self.registry:
            try:
                os.unlink(self.registry)
            except OSError:
                pass
        self.fs.shutdown()
        self.cache.close()


def run(cfg: MountConfig, ready_fd: int | None = None) -> int:
    """Runs the mount in the foreground until unmounted. Returns the exit code."""
    ready = ParentPipe(ready_fd)
    try:
        mount = Mount.start(cfg, ready)
    except UserError as e:
        return ready.refuse(e)
    try:
        mount.publish()
        code = mount.serve()
    finally:
        mount.close()
    if code == 0:
        log.info("unmounted %s", cfg.mountpoint)
    return code
