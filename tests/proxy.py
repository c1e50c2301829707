"""A small threaded HTTP reverse proxy in front of an S3 endpoint, for fault injection.

    proxy = S3Proxy("http://127.0.0.1:8333").start()
    mount through proxy.url ...
    h = proxy.hold(method="PUT", key="a.bin")        # requests block until released
    h.wait_held(1); ...; h.release()
    r = proxy.fail(503, times=3, op="PutObject")     # next 3 matching answer 503 SlowDown
    proxy.drop(times=1, op="GetObject")              # close the connection, no answer
    proxy.delay(0.5, method="PUT")                   # add latency
    proxy.down(); proxy.up()                         # refuse connections, then serve again
    proxy.count(op="PutObject", key="a.bin", status=200)
    proxy.clear()                                    # remove every fault, release holds

Everything is passed through unchanged: method, raw path and query (so SigV4 signatures stay
valid: the Host header is forwarded as the client sent it), every header except the hop-by-hop
ones, request bodies (Content-Length or chunked, streamed in 1 MiB pieces), and the response
status, headers and body (streamed; re-chunked when the upstream sends no length). Client
connections are kept alive (HTTP/1.1); each client connection has its own upstream connection.

Every request is recorded (a `Req`) when it arrives, so held requests are counted too; its
`status` is filled in when answered (`None` while pending or when dropped), `outcome` says what
the proxy did: "forwarded", "injected", "dropped", "client-gone", "upstream-error".

Matching (every keyword optional, all must hold): method, op (S3 operation name, see `s3_op`),
bucket, key, key_prefix, kind (the S3 sub-resources of the query, e.g. "partNumber+uploadId",
"uploads", "list-type", "" for none), where (a callable taking the Req). method/op/kind accept
a single value or a collection.

Order of faults for one request: holds (wait for release), then delays, then the first matching
fail/drop rule with attempts left, else forward. A request released from a hold whose client has
gone meanwhile (killed daemon, timeout) is not forwarded (outcome "client-gone"), as a real
proxy aborts it.
"""

from __future__ import annotations

import http.client
import itertools
import select
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PIECE = 1 << 20
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "trailers",
              "transfer-encoding", "upgrade", "expect", "proxy-authorization",
              "proxy-authenticate"}
# Query parameters that select an S3 sub-resource/operation (the "kind" of a request).
SUBRESOURCES = {"uploads", "uploadId", "partNumber", "list-type", "delete", "versions",
                "versioning", "acl", "tagging", "location", "lifecycle", "policy", "cors",
                "encryption", "restore", "select", "attributes", "versionId", "object-lock",
                "retention", "legal-hold", "notification", "website", "logging"}
ERROR_CODES = {500: "InternalError", 502: "BadGateway", 503: "SlowDown", 504: "GatewayTimeout",
               400: "BadRequest", 403: "AccessDenied", 404: "NoSuchKey"}


# ------------------------------------------------------------------------------ records
@dataclass
class Req:
    seq: int
    method: str
    path: str                      # raw path (percent-encoded), without the query
    query: dict                    # name -> list of values
    headers: dict                  # lower-case name -> value (last one wins)
    bucket: str
    key: str                       # unquoted object key ("" for bucket/service requests)
    kind: str
    op: str
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    status: int | None = None
    outcome: str = "pending"
    body_bytes: int = 0

    def __repr__(self) -> str:
        return (f"<{self.seq} {self.method} {self.op} {self.bucket}/{self.key} "
                f"kind={self.kind!r} -> {self.status} {self.outcome}>")


def s3_op(method: str, bucket: str, key: str, query: dict, headers: dict) -> str:
    """The S3 operation name of a path-style request (best effort)."""
    q = set(query)
    copy = "x-amz-copy-source" in headers
    if not bucket:
        return "ListBuckets" if method == "GET" else method
    if not key:
        if method == "GET":
            return "ListObjectsV2" if query.get("list-type") == ["2"] else \
                ("ListMultipartUploads" if "uploads" in q else "ListObjects")
        return {"HEAD": "HeadBucket", "PUT": "CreateBucket", "DELETE": "DeleteBucket",
                "POST": "DeleteObjects" if "delete" in q else "PostBucket"}.get(method, method)
    if method == "PUT":
        if "partNumber" in q and "uploadId" in q:
            return "UploadPartCopy" if copy else "UploadPart"
        return "CopyObject" if copy else "PutObject"
    if method == "POST":
        if "uploads" in q:
            return "CreateMultipartUpload"
        if "uploadId" in q:
            return "CompleteMultipartUpload"
        return "PostObject"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in q else "DeleteObject"
    if method == "GET":
        return "ListParts" if "uploadId" in q else "GetObject"
    if method == "HEAD":
        return "HeadObject"
    return method


def _as_set(v):
    if v is None:
        return None
    if isinstance(v, str):
        return {v}
    return set(v)


class Match:
    def __init__(self, method=None, op=None, bucket=None, key=None, key_prefix=None, kind=None,
                 where=None):
        self.method = {m.upper() for m in _as_set(method)} if method else None
        self.op = _as_set(op)
        self.bucket = bucket
        self.key = key
        self.key_prefix = key_prefix
        self.kind = _as_set(kind)
        self.where = where

    def __call__(self, r: Req) -> bool:
        return ((self.method is None or r.method in self.method)
                and (self.op is None or r.op in self.op)
                and (self.bucket is None or r.bucket == self.bucket)
                and (self.key is None or r.key == self.key)
                and (self.key_prefix is None or r.key.startswith(self.key_prefix))
                and (self.kind is None or r.kind in self.kind)
                and (self.where is None or bool(self.where(r))))


# ------------------------------------------------------------------------------ faults
class Rule:
    """A fault for matching requests. times=None: every match; else the next `times` ones."""

    def __init__(self, proxy: "S3Proxy", match: Match, times: int | None):
        self.proxy = proxy
        self.match = match
        self.times = times
        self.hits = 0            # requests this rule acted on

    def _take(self, r: Req) -> bool:
        """Caller holds the proxy lock."""
        if not self.match(r) or (self.times is not None and self.hits >= self.times):
            return False
        self.hits += 1
        return True

    def remove(self) -> None:
        self.proxy._remove(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class Fail(Rule):
    def __init__(self, proxy, match, times, status: int, code: str | None, message: str):
        super().__init__(proxy, match, times)
        self.status = status
        self.code = code or ERROR_CODES.get(status, "InternalError")
        self.message = message


class Drop(Rule):
    pass


class Delay(Rule):
    def __init__(self, proxy, match, times, seconds: float):
        super().__init__(proxy, match, times)
        self.seconds = seconds


class Hold(Rule):
    """Matching requests block (before their body is read) until release()."""

    def __init__(self, proxy, match, times):
        super().__init__(proxy, match, times)
        self.released = threading.Event()
        self.held = 0            # requests blocked right now

    def release(self) -> None:
        self.released.set()
        self.proxy._remove(self)
        with self.proxy._cond:
            self.proxy._cond.notify_all()

    remove = release

    def wait_held(self, n: int = 1, timeout: float = 30.0) -> None:
        """Wait until at least n requests are blocked by this hold at the same time."""
        with self.proxy._cond:
            ok = self.proxy._cond.wait_for(lambda: self.held >= n, timeout=timeout)
        if not ok:
            raise AssertionError(f"timed out after {timeout}s waiting for {n} held request(s) "
                                 f"(held now: {self.held}; recent: {self.proxy.requests()[-8:]})")


# ------------------------------------------------------------------------------ server
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256
    block_on_close = False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ssecfs-test-proxy"
    timeout = None
    proxy: "S3Proxy"             # set on the subclass made per proxy

    def setup(self):
        super().setup()
        self._up: http.client.HTTPConnection | None = None
        self._up_used = 0.0
        self._expect = False
        self.proxy._conn_opened(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            self.proxy._conn_closed(self.connection)
            self._close_upstream()

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def handle_expect_100(self):
        # Answer "100 Continue" only when the body is really wanted (after holds and delays).
        self._expect = True
        return True

    def do_ANY(self):
        self._expect = self._expect and self.headers.get("Expect", "").lower() == "100-continue"
        try:
            self._serve()
        finally:
            self._expect = False

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = do_ANY

    # -- one request ------------------------------------------------------------------------
    def _serve(self) -> None:
        r = self.proxy._record(self.command, self.path, self.headers)
        action = self.proxy._faults_for(r, self)
        if action is None:
            return
        if action == "client-gone":
            r.outcome = "client-gone"
            self._abort()
        elif isinstance(action, Drop):
            r.outcome = "dropped"
            self._abort()
        elif isinstance(action, Fail):
            self._inject(r, action)
        else:
            self._forward(r)
        r.ended = time.monotonic()
        with self.proxy._cond:
            self.proxy._cond.notify_all()

    def _abort(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def client_gone(self) -> bool:
        try:
            p = select.poll()
            p.register(self.connection, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
                       for _, ev in p.poll(0))
        except (OSError, ValueError):
            return True

    def _continue(self) -> None:
        if self._expect:
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._expect = False

    def _body_pieces(self):
        """Yield the request body as it arrives: (framing, data) for chunked bodies the raw
        chunk framing is passed through; raises ConnectionError on a short body."""
        te = self.headers.get("Transfer-Encoding", "").lower()
        if "chunked" in te:
            while True:
                line = self.rfile.readline(65537)
                if not line.endswith(b"\n"):
                    raise ConnectionError("client closed in the middle of a chunk header")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    out = [line]
                    while True:
                        t = self.rfile.readline(65537)
                        if not t.endswith(b"\n"):
                            raise ConnectionError("client closed in the trailer")
                        out.append(t)
                        if t in (b"\r\n", b"\n"):
                            break
                    yield b"".join(out)
                    return
                yield line
                yield from self._read_exactly(size + 2,          # data + CRLF
                                              "client closed in the middle of a chunk")
            return
        yield from self._read_exactly(int(self.headers.get("Content-Length") or 0),
                                      "client closed before the end of the body")

    def _read_exactly(self, left: int, short: str):
        """Yield the next `left` bytes of the request in pieces; ConnectionError(short) if
        the client closes first."""
        while left:
            b = self.rfile.read(min(left, PIECE))
            if not b:
                raise ConnectionError(short)
            left -= len(b)
            yield b

    def _drain(self, r: Req) -> bool:
        try:
            for b in self._body_pieces():
                r.body_bytes += len(b)
            return True
        except (ConnectionError, OSError, ValueError):
            return False

    def _inject(self, r: Req, rule: Fail) -> None:
        self._continue()
        if not self._drain(r):
            r.outcome = "client-gone"
            self._abort()
            return
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{rule.code}</Code>'
                f"<Message>{rule.message}</Message><Resource>{r.path}</Resource>"
                f"<RequestId>proxy-{r.seq}</RequestId></Error>").encode()
        if r.method == "HEAD":
            body = b""
        try:
            self.send_response_only(rule.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("x-amz-request-id", f"proxy-{r.seq}")
            if rule.status == 503:
                self.send_header("Retry-After", "1")
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            self.close_connection = True
        r.status, r.outcome = rule.status, "injected"

    # -- forwarding ---------------------------------------------------------------------------
    def _upstream(self) -> http.client.HTTPConnection:
        # An upstream connection idle for long may have been closed by the server: a request
        # whose body is streamed cannot be replayed, so do not risk it.
        if self._up is not None and time.monotonic() - self._up_used > 2.0:
            self._close_upstream()
        if self._up is None:
            u = self.proxy.upstream
            self._up = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        return self._up

    def _close_upstream(self) -> None:
        if self._up is not None:
            try:
                self._up.close()
            except OSError:
                pass
            self._up = None

    def _send_head(self, chunked: bool) -> http.client.HTTPConnection:
        conn = self._upstream()
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in HOP_BY_HOP:
                conn.putheader(name, value)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        return conn

    def _forward(self, r: Req) -> None:
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        reused = self._up is not None
        try:
            conn = self._send_head(chunked)
        except OSError:
            self._close_upstream()
            self._bad_gateway(r)
            return
        self._continue()
        pieces = self._body_pieces()
        while True:
            try:
                b = next(pieces)
            except StopIteration:
                break
            except (OSError, ValueError):          # the client went away mid-body
                r.outcome = "client-gone"
                self._close_upstream()
                self._abort()
                return
            r.body_bytes += len(b)
            try:
                conn.send(b)
            except OSError:                        # the upstream went away mid-body
                self._close_upstream()
                self._bad_gateway(r)
                return
        try:
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException):
            self._close_upstream()
            if not (reused and r.body_bytes == 0 and not chunked):
                self._bad_gateway(r)
                return
            try:                                   # a stale keep-alive connection: replay once
                resp = self._send_head(False).getresponse()
            except (OSError, http.client.HTTPException):
                self._close_upstream()
                self._bad_gateway(r)
                return
        self._relay(r, resp)
        self._up_used = time.monotonic()
        if resp.will_close:
            self._close_upstream()

    def _bad_gateway(self, r: Req) -> None:
        r.outcome = "upstream-error"
        # the body may not be read: do not keep the connection in an unknown state
        self.close_connection = True
        try:
            body = b"<Error><Code>BadGateway</Code><Message>proxy: upstream failed</Message></Error>"
            self.send_response_only(502)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if r.method != "HEAD":
                self.wfile.write(body)
        except OSError:
            pass
        r.status = 502

    def _relay(self, r: Req, resp: http.client.HTTPResponse) -> None:
        r.status = resp.status
        no_body = r.method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        length = resp.getheader("Content-Length")
        rechunk = not no_body and length is None
        try:
            self.send_response_only(resp.status, resp.reason)
            for name, value in resp.getheaders():
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            if rechunk:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if not no_body:
                while True:
                    b = resp.read(PIECE) if length is not None else resp.read1(PIECE)
                    if not b:
                        break
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(b), b) if rechunk else b)
                if rechunk:
                    self.wfile.write(b"0\r\n\r\n")
            else:
                resp.read()
            r.outcome = "forwarded"
        except (OSError, http.client.HTTPException):
            r.outcome = "client-gone"
            self._close_upstream()
            self._abort()


# ------------------------------------------------------------------------------ the proxy
class S3Proxy:
    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0):
        self.upstream = urllib.parse.urlsplit(upstream)
        if self.upstream.scheme != "http":
            raise ValueError("only http:// upstreams are supported")
        self.host = host
        self.port = port
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._reqs: list[Req] = []
        self._rules: list[Rule] = []
        self._seq = itertools.count(1)
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._handler = type("Handler", (_Handler,), {"proxy": self})

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "S3Proxy":
        self._server = _Server((self.host, self.port), self._handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"s3proxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def down(self, abort_connections: bool = True) -> None:
        """Stop listening (new connections are refused) and, by default, cut open ones."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if abort_connections:
            with self._lock:
                conns = list(self._conns)
            for c in conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def up(self) -> None:
        """Listen again on the same port after down()."""
        if self._server is None:
            self.start()

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def stop(self) -> None:
        self._stopped.set()
        self.clear()
        self.down()

    # -- faults -------------------------------------------------------------------------------
    def _add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def _remove(self, rule: Rule) -> None:
        with self._lock:
            if rule in self._rules:
                self._rules.remove(rule)

    def hold(self, times: int | None = None, **match) -> Hold:
        return self._add(Hold(self, Match(**match), times))

    def fail(self, status: int = 503, code: str | None = None, times: int | None = None,
             message: str = "injected by the test proxy", **match) -> Fail:
        return self._add(Fail(self, Match(**match), times, status, code, message))

    def drop(self, times: int | None = None, **match) -> Drop:
        return self._add(Drop(self, Match(**match), times))

    def delay(self, seconds: float, times: int | None = None, **match) -> Delay:
        return self._add(Delay(self, Match(**match), times, seconds))

    def clear(self) -> None:
        """Remove every fault (releasing held requests) and listen again if down."""
        with self._lock:
            rules, self._rules = self._rules, []
        for r in rules:
            if isinstance(r, Hold):
                r.released.set()
        with self._cond:
            self._cond.notify_all()
        if not self._stopped.is_set():
            self.up()

    def _faults_for(self, r: Req, h: _Handler):
        """Apply holds and delays; return the Fail/Drop rule to apply, "forward",
        "client-gone", or None if the proxy is stopping."""
        with self._lock:
            holds = [x for x in self._rules if isinstance(x, Hold) and x._take(r)]
            for x in holds:
                x.held += 1
            self._cond.notify_all()
        for x in holds:
            try:
                x.released.wait()
            finally:
                with self._cond:
                    x.held -= 1
                    self._cond.notify_all()
        if holds and h.client_gone():
            return "client-gone"
        with self._lock:
            delays = [x for x in self._rules if isinstance(x, Delay) and x._take(r)]
        for x in delays:
            self._stopped.wait(x.seconds)
        with self._lock:
            for x in self._rules:
                if isinstance(x, (Fail, Drop)) and x._take(r):
                    return x
        return "forward"

    # -- records ------------------------------------------------------------------------------
    def _record(self, method: str, raw_path: str, headers) -> Req:
        parts = urllib.parse.urlsplit(raw_path)
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        path = parts.path
        seg = path.lstrip("/").split("/", 1)
        bucket = urllib.parse.unquote(seg[0]) if seg and seg[0] else ""
        key = urllib.parse.unquote(seg[1]) if len(seg) > 1 else ""
        hdrs = {k.lower(): v for k, v in headers.items()}
        kind = "+".join(sorted(q for q in query if q in SUBRESOURCES))
        r = Req(next(self._seq), method, path, query, hdrs, bucket, key, kind,
                s3_op(method, bucket, key, query, hdrs))
        with self._cond:
            self._reqs.append(r)
            self._cond.notify_all()
        return r

    def requests(self, status: int | None = None, outcome: str | None = None, since: int = 0,
                 **match) -> list[Req]:
        """Recorded requests (in arrival order) matching; status=2 means any 2xx.
        since: only requests with seq > since (see mark())."""
        m = Match(**match)
        with self._lock:
            reqs = list(self._reqs)
        out = []
        for r in reqs:
            if r.seq <= since or not m(r):
                continue
            if status is not None:
                if status == 2:
                    if r.status is None or not 200 <= r.status < 300:
                        continue
                elif r.status != status:
                    continue
            if outcome is not None and r.outcome != outcome:
                continue
            out.append(r)
        return out

    def count(self, **kw) -> int:
        return len(self.requests(**kw))

    def mark(self) -> int:
        """The sequence number of the last recorded request (for requests(since=...))."""
        with self._lock:
            return self._reqs[-1].seq if self._reqs else 0

    def reset_counts(self) -> None:
        with self._lock:
            self._reqs.clear()

    def wait_for(self, n: int = 1, timeout: float = 30.0, **kw) -> list[Req]:
        """Wait until at least n recorded requests match (answered ones if status= is given)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = self.requests(**kw)
                if len(got) >= n:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {n} request(s) "
                                         f"matching {kw} (got {got[-5:]})")
                self._cond.wait(min(left, 0.5))

    # -- connection bookkeeping ---------------------------------------------------------------
    def _conn_opened(self, c: socket.socket) -> None:
        with self._lock:
            self._conns.add(c)

    def _conn_closed(self, c: socket.socket) -> None:
        with self._lock:
            self._conns.discard(c)


if __name__ == "__main__":   # manual use: python tests/proxy.py http://127.0.0.1:8333
    import sys
    p = S3Proxy(sys.argv[1]).start()
    print(f"proxy for {sys.argv[1]} at {p.url}", flush=True)
    threading.Event().wait()
