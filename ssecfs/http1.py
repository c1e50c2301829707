"""A minimal HTTP/1.1 client with keep-alive connections, for the store's lean request path.

Why not urllib3: on a small machine it costs about 0.85 ms of CPU per request (http.client
parses every answer's headers with the email package, and urllib3 wraps each call in several
layers); a HEAD answered from loopback costs 0.2 ms here. `ls -l` of 1,000 files is 1,000
HEADs, so that difference is most of the daemon's CPU for it.

Scope, on purpose small: one origin (http or https), requests whose body is given whole,
answers read whole (Content-Length, chunked, or until close). Anything it does not understand
raises (HTTPProtocolError or an OSError): the caller (s3raw via s3store) then sends the request
through botocore, which retries and reports errors properly.
"""

from __future__ import annotations

import mmap
import select
import socket
import ssl
import sys
import threading
import time

MAX_HEAD = 64 * 1024            # bytes of status line + headers we accept
RECV = 256 * 1024
BIG_BODY = 1024 * 1024         # bodies larger than this are not copied into bytes (a bytearray,
                               # or for a range answer Segments of pooled buffers)
SEG = 1024 * 1024              # bytes of a range answer per pooled buffer


class Segments:
    """A big range-GET body, received into pooled buffers of SEG bytes each (the last may be
    shorter). The read path keeps 128 KiB chunks of it as views, and a view holds only its
    own buffer: chunks still waiting for a reader or a sealer keep 1 MiB each in memory, not
    the whole 8 MiB read unit they came in. (With one buffer per unit, a cold read of 10 GiB
    had 28 units' buffers alive at once and peaked at 416 MiB RSS.)"""

    __slots__ = ("parts", "size")

    def __init__(self, parts: list):
        self.parts = parts
        self.size = sum(len(p) for p in parts)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def views(self, step: int):
        """Memoryviews of step bytes each (the last may be shorter), in order; step must
        divide SEG."""
        if SEG % step:
            raise ValueError(f"{step} does not divide the segment size")
        for p in self.parts:
            v = memoryview(p)
            for off in range(0, len(v), step):
                yield v[off:off + step]


class BufferPool:
    """The receive buffers of big range-GET bodies (Segments), reused. A fresh bytearray is
    zero-filled while the GIL is held, and glibc often maps it anew, so every 4 KiB page
    faults in as well: in a cold sequential read that was a tenth of the time the daemon held
    the GIL. A fresh buffer here is an anonymous mmap, whose pages the kernel faults in during
    recv_into (GIL released), and a buffer is handed out again once nothing refers to it.

    A buffer is in use while anything refers to it: the chunks of a fetched read unit are
    memoryviews of it (in the cache's sealing queue, in a file's hot chunks, in a reader's
    hands), and every view holds a reference. So the reference count says when it is free,
    and a buffer someone can still see is never written into. At most `keep` buffers are
    remembered (128 MiB of 1 MiB segments: more than a cold read keeps in use at once, so
    they are reused rather than mapped anew); one idle for `idle_s` seconds is dropped (by a
    short-lived reaper thread), so an idle mount holds none."""

    _FREE_REFS = 3          # the pool's list, the loop variable, getrefcount's argument

    def __init__(self, keep: int = 128, idle_s: float = 10.0):
        self.keep = keep
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._bufs: list = []                 # buffers, least recently handed out first
        self._last: dict[int, float] = {}     # id(buffer) -> when last handed out
        self._reaper: threading.Thread | None = None

    def get(self, n: int):
        """A writable buffer of exactly n bytes that nothing else refers to."""
        with self._lock:
            for b in self._bufs:
                if len(b) == n and sys.getrefcount(b) == self._FREE_REFS:
                    self._bufs.remove(b)          # (to the end: the most recently used)
                    break
            else:
                b = mmap.mmap(-1, n)
                if len(self._bufs) >= self.keep:
                    self._last.pop(id(self._bufs.pop(0)), None)   # (lives on while in use)
            self._bufs.append(b)
            self._last[id(b)] = time.monotonic()
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="bufpool", daemon=True)
                self._reaper.start()
            return b

    def trim(self, now: float) -> int:
        """Forget the buffers last handed out over idle_s before now; returns how many are
        left."""
        with self._lock:
            keep = [b for b in self._bufs if now - self._last[id(b)] < self.idle_s]
            self._last = {id(b): self._last[id(b)] for b in keep}
            self._bufs = keep
            return len(keep)

    def _reap(self) -> None:
        while True:
            time.sleep(self.idle_s / 2)
            with self._lock:
                if not self._bufs:
                    self._reaper = None
                    return
            self.trim(time.monotonic())


POOL = BufferPool()


class HTTPProtocolError(OSError):
    """An answer this client does not understand (malformed, too large a head)."""


class _Conn:
    __slots__ = ("sock", "buf")

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()           # bytes received past the previous answer (none, normally)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Answer:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict, body: bytes):
        self.status = status
        self.headers = headers           # lower-case names; repeated headers joined with ", "
        self.body = body


class HTTP1Pool:
    """Keep-alive connections to one origin, shared by threads (at most `maxsize` idle)."""

    def __init__(self, scheme: str, host: str, port: int | None, *, ca_certs: str | None,
                 connect_timeout: float, read_timeout: float, maxsize: int = 32):
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {scheme!r}")
        self.host = host
        self.port = port or (443 if scheme == "https" else 80)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.maxsize = maxsize
        self._ssl = None
        if scheme == "https":
            self._ssl = ssl.create_default_context(cafile=ca_certs)
            self._ssl.check_hostname = True
            self._ssl.verify_mode = ssl.CERT_REQUIRED
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._closed = False

    # -- connections ------------------------------------------------------------------------
    def _connect(self) -> _Conn:
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(self.read_timeout)
        except BaseException:
            sock.close()
            raise
        return _Conn(sock)

    def _take(self) -> _Conn | None:
        """An idle connection that the server has not closed, or None."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                c = self._idle.pop()
            if c.buf:
                c.close()
                continue
            try:
                readable = select.select([c.sock], [], [], 0)[0]
            except (OSError, ValueError):
                readable = [c.sock]
            if readable:             # EOF (server closed it) or bytes nobody asked for
                c.close()
                continue
            return c

    def _give(self, c: _Conn) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.maxsize:
                self._idle.append(c)
                return
        c.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    # -- one request ------------------------------------------------------------------------
    def request(self, method: str, target: str, headers: dict, body: bytes | None = None
                ) -> Answer:
        """Send one request (headers as given, plus Content-Length when there is a body) and
        read its whole answer. A request on a reused connection that the server closed before
        answering is sent once more on a new connection (every request of the store is
        idempotent); anything else raises."""
        head = [f"{method} {target} HTTP/1.1\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in headers.items()]
        if body is not None and "content-length" not in {k.lower() for k in headers}:
            head.append(f"content-length: {len(body)}\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1")
        c = self._take()
        if c is not None:
            try:
                return self._exchange(c, method, data, body)
            except _NoAnswer:
                pass                 # the server closed the idle connection: once more, anew
        c = self._connect()
        try:
            return self._exchange(c, method, data, body)
        except _NoAnswer:
            raise ConnectionResetError("connection closed before an answer") from None

    def _exchange(self, c: _Conn, method: str, data: bytes, body) -> Answer:
        try:
            if body is not None and len(body) <= 64 * 1024:
                c.sock.sendall(data + bytes(body))
            else:
                c.sock.sendall(data)
                if body is not None:
                    c.sock.sendall(body)
            status, headers, keep = self._read_head(c)
            payload = self._read_body(c, method, status, headers)
            keep = keep and headers.get("connection") != "close"   # read to EOF: not reusable
        except _NoAnswer:
            c.close()
            raise
        except (BrokenPipeError, ConnectionResetError) as e:
            c.close()
            if getattr(e, "ssecfs_got_bytes", False):
                raise
            raise _NoAnswer() from None
        except BaseException:
            c.close()
            raise
        if keep and not self._closed:
            self._give(c)
        else:
            c.close()
        return Answer(status, headers, payload)

    def _recv(self, c: _Conn) -> bytes:
        return c.sock.recv(RECV)

    def _read_head(self, c: _Conn) -> tuple[int, dict, bool]:
        got = False
        while True:                              # 1xx interim answers are skipped
            buf = c.buf
            while True:
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    break
                if len(buf) > MAX_HEAD:
                    raise HTTPProtocolError("answer head too large")
                try:
                    d = self._recv(c)
                except (BrokenPipeError, ConnectionResetError) as e:
                    e.ssecfs_got_bytes = got
                    raise
                if not d:
                    if got:
                        raise HTTPProtocolError("connection closed inside an answer head")
                    raise _NoAnswer()
                got = True
                buf += d
            head = bytes(buf[:end]).decode("latin-1")
            del buf[:end + 4]
            lines = head.split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise HTTPProtocolError("malformed status line")
            status = int(parts[1])
            headers: dict[str, str] = {}
            for ln in lines[1:]:
                name, sep, value = ln.partition(":")
                if not sep or not name or name != name.strip():
                    raise HTTPProtocolError("malformed header line")
                name = name.lower()
                value = value.strip()
                headers[name] = headers[name] + ", " + value if name in headers else value
            if 100 <= status < 200:
                continue
            keep = parts[0] == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
            return status, headers, keep

    def _read_body(self, c: _Conn, method: str, status: int, headers: dict) -> bytes:
        if method == "HEAD" or status in (204, 304):
            return b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return self._read_chunked(c)
        length = headers.get("content-length")
        if length is None:
            headers["connection"] = "close"      # read to EOF: the connection is done
            out = bytearray(c.buf)
            c.buf.clear()
            while True:
                d = self._recv(c)
                if not d:
                    return bytes(out)
                out += d
        if not length.isdigit():
            raise HTTPProtocolError("bad Content-Length")
        return self._read_exact(c, int(length), pooled=status == 206)

    def _read_exact(self, c: _Conn, n: int, pooled: bool = False):
        buf = c.buf
        if len(buf) >= n:
            out = bytes(buf[:n])
            del buf[:n]
            return out
        if pooled and n > BIG_BODY:
            # a big range-GET body (a read unit) goes into pooled buffers and is handed over
            # as it is: a copy of each byte read from the store less
            segs = Segments([POOL.get(min(SEG, n - off)) for off in range(0, n, SEG)])
            self._fill(c, segs.parts)
            return segs
        out = bytearray(n)
        self._fill(c, [out])
        return out if n > BIG_BODY else bytes(out)

    @staticmethod
    def _fill(c: _Conn, bufs: list) -> None:
        """Fill bufs in order with the next bytes of the answer (those received already
        first)."""
        left = c.buf
        for b in bufs:
            view = memoryview(b)
            n = len(view)
            have = min(len(left), n)
            if have:
                view[:have] = left[:have]
                del left[:have]
            while have < n:
                k = c.sock.recv_into(view[have:], n - have)
                if not k:
                    raise HTTPProtocolError("connection closed inside an answer body")
                have += k
            view.release()

    def _read_line(self, c: _Conn) -> bytes:
        buf = c.buf
        while True:
            i = buf.find(b"\r\n")
            if i >= 0:
                line = bytes(buf[:i])
                del buf[:i + 2]
                return line
            if len(buf) > MAX_HEAD:
                raise HTTPProtocolError("chunk line too long")
            d = self._recv(c)
            if not d:
                raise HTTPProtocolError("connection closed inside a chunked body")
            buf += d

    def _read_chunked(self, c: _Conn) -> bytes:
        parts = []
        while True:
            size_s = self._read_line(c).split(b";", 1)[0].strip()
            try:
                size = int(size_s, 16)
            except ValueError:
                raise HTTPProtocolError("bad chunk size") from None
            if size == 0:
                while self._read_line(c):        # trailers, up to the empty line
                    pass
                return b"".join(parts)
            parts.append(self._read_exact(c, size))
            if self._read_line(c):
                raise HTTPProtocolError("chunk not followed by CRLF")


class _NoAnswer(Exception):
    """The connection was closed before any byte of the answer arrived."""
