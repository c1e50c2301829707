"""Test-only network guard: any attempt to reach a non-loopback address fails at once and is
written down, so that a regression in the endpoint or proxy policy fails a test instead of
sending traffic (and SSE-C keys) anywhere.

Patched: socket.getaddrinfo (names resolve only when they are loopback names or literal
loopback addresses), socket.socket.connect / connect_ex / sendto (AF_INET/AF_INET6 only to
loopback; AF_UNIX is left alone). socket.create_connection and urllib3 go through these. Each
refusal appends one line to the file named by SSECFS_NETGUARD_LOG; every process that loads
the guard appends its pid to the same path + ".loaded", so a test can prove the guard was
active in the processes it cares about (e.g. the daemon `ssecfs mount` spawns).

Loaded in subprocesses by the sitecustomize.py beside this file (put this directory on
PYTHONPATH); in-process tests call install()/uninstall().

It sees Python's sockets only: the store's own requests go through awscrt, whose sockets and
name lookups are native. Tests of where those go watch loopback stand-ins instead (see
tests/test_endpoint_policy.py).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket

ENV = "SSECFS_NETGUARD_LOG"
_saved: dict = {}


def is_loopback_host(host) -> bool:
    if host is None:                        # passive lookups (bind to any)
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip("[]").split("%")[0]
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _record(log_path: str | None, what: str, host, port) -> None:
    if log_path:
        with open(log_path, "a") as f:
            f.write(f"pid {os.getpid()}: {what} {host!r} port {port!r}\n")


def _inet_dest(sock, address):
    """(host, port) of an AF_INET/AF_INET6 destination, else None (AF_UNIX and the like)."""
    if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6) \
            and isinstance(address, tuple) and address:
        return address[0], address[1] if len(address) > 1 else None
    return None


def install(log_path: str | None) -> None:
    if _saved:
        return
    orig_gai = socket.getaddrinfo
    orig_connect = socket.socket.connect
    orig_connect_ex = socket.socket.connect_ex
    orig_sendto = socket.socket.sendto
    _saved.update(getaddrinfo=orig_gai, connect=orig_connect, connect_ex=orig_connect_ex,
                  sendto=orig_sendto)

    def getaddrinfo(host, port, *args, **kw):
        if not is_loopback_host(host):
            _record(log_path, "getaddrinfo", host, port)
            raise socket.gaierror(socket.EAI_NONAME, f"netguard: {host!r} is not loopback")
        return orig_gai(host, port, *args, **kw)

    def check(sock, address, what):
        dest = _inet_dest(sock, address)
        if dest is not None and not is_loopback_host(dest[0]):
            _record(log_path, what, *dest)
            raise OSError(errno.ENETUNREACH, f"netguard: {dest[0]!r} is not loopback")

    def connect(self, address):
        check(self, address, "connect")
        return orig_connect(self, address)

    def connect_ex(self, address):
        check(self, address, "connect_ex")
        return orig_connect_ex(self, address)

    def sendto(self, data, *rest):
        check(self, rest[-1] if rest else None, "sendto")
        return orig_sendto(self, data, *rest)

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.socket.sendto = sendto


def uninstall() -> None:
    if not _saved:
        return
    socket.getaddrinfo = _saved.pop("getaddrinfo")
    socket.socket.connect = _saved.pop("connect")
    socket.socket.connect_ex = _saved.pop("connect_ex")
    socket.socket.sendto = _saved.pop("sendto")


def install_from_env() -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    install(path)
    with open(path + ".loaded", "a") as f:
        f.write(f"{os.getpid()}\n")
