"""Where a running mount is found and asked for its status: the private runtime directory,
the registry entry of each mount (JSON, mode 0600) and the control socket that answers
`ssecfs status`. What another user could have planted there is never believed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import stat
import threading

from ..errors import SecurityRefusal

log = logging.getLogger("ssecfs")


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
    link, not writable by anyone else; else SecurityRefusal."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    why = _private_problem(path)
    if why:
        raise SecurityRefusal(f"directory {path} {why}: refusing to use it (another user could "
                        "plant files there)")
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
