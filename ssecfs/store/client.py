"""The awscrt client: every request of the store, signed and carried by the AWS Common Runtime.

Client (on awscrt.s3.S3Client) signs (SigV4), verifies TLS, pools connections, retries
throttling, 5xx and connection failures, and splits big ranged GETs into parallel part GETs,
all in native code outside the GIL; it is given a resolved transport.Transport and nothing
else. It hands back every HTTP answer (Answer) and raises TransportFailure only when there is
none. Nothing here parses HTTP or signs by hand. Bodies stay in memory (never awscrt's
recv_filepath/send_filepath: those read or write plaintext files).

awscrt's S3 client takes its proxy only from the process environment (HTTPS_PROXY,
HTTP_PROXY, NO_PROXY, read at each new connection, lower-case names first): Client pins those
variables to the transport's decision (_route_proxy), so the runtime proxies exactly when
resolve_transport says so, and a plain-http request never goes through a proxy.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import sys
import time
import urllib.parse
from concurrent import futures

import botocore.credentials
from awscrt.auth import AwsCredentials, AwsCredentialsProvider
from awscrt.exceptions import AwsCrtError
from awscrt.http import HttpHeaders, HttpRequest
from awscrt.io import ClientTlsContext, TlsContextOptions
from awscrt.s3 import (S3Client, S3RequestTlsMode, S3RequestType, S3ResponseError, S3RetryConfig,
                       S3RetryMode, create_default_s3_signing_config)

from .. import buffers
from ..buffers import SEG, Segments
from ..errors import StoreSetupError
from .transport import Transport

# the transport's log: what the user reads about connections and credentials
log = logging.getLogger("ssecfs.transport")

MiB = 1024 * 1024
PART = 8 * MiB               # awscrt's part size: the cache's read unit
MEMORY_LIMIT = 1024 * MiB    # awscrt's buffer pool cap (its minimum): GET parts only
BULK_MIN = MiB + 1           # ranged GETs from this size use awscrt's parallel GET_OBJECT
BULK_CONNECTIONS = 8         # connections one ranged GET_OBJECT may use at once
UNRESERVED = "-_.~"          # RFC 3986; '/' is kept in object paths (S3 does not double-encode)


# ---------------------------------------------------------------------------- the runtime's inputs
def _route_proxy(t: Transport, host: str) -> None:
    """Pin the variables awscrt reads its proxy from to the transport's decision: through
    t.proxy (https only), or directly (host added to NO_PROXY: a plain-http request through a
    proxy would show it the keys). Written only when they say otherwise, before any
    connection of ours. A NO_PROXY entry only awscrt understands (a CIDR range) still sends
    an https request directly: that exposes nothing (TLS end to end)."""
    if t.proxy:
        for name in ("https_proxy", "HTTPS_PROXY"):
            if os.environ.get(name) != t.proxy:
                os.environ[name] = t.proxy
        return
    if not any(os.environ.get(n) for n in (f"{t.scheme}_proxy", f"{t.scheme.upper()}_PROXY")):
        return                                   # nothing would send it to a proxy
    for name in ("no_proxy", "NO_PROXY"):
        entries = [e.strip() for e in os.environ.get(name, "").split(",") if e.strip()]
        if host not in entries:
            os.environ[name] = ",".join(entries + [host])


class _NoCredentialsNow(Exception):
    """Raised by the credentials delegate once it has said why in the log: awscrt hands it
    to sys.unraisablehook, which would print a traceback."""


_refresh_failure_said = [-1e9]       # when a failed refresh was last logged (monotonic)


def _quiet(previous):
    def hook(unraisable):
        if not isinstance(unraisable.exc_value, _NoCredentialsNow):
            previous(unraisable)
    hook.ssecfs = True
    return hook


def _credentials_provider(creds):
    """botocore's credentials as awscrt's provider: refreshable ones (assume-role, SSO,
    IMDS, credential_process) through a delegate asked for every request it signs, so a
    refresh is seen at once; fixed ones as static. A failed refresh fails the request it
    was for (AWS_AUTH_... error), with one line in the log (at most one a minute)."""
    if creds is None:
        return None
    if not isinstance(creds, botocore.credentials.RefreshableCredentials):
        f = creds.get_frozen_credentials()
        return AwsCredentialsProvider.new_static(f.access_key, f.secret_key, f.token)
    if not getattr(sys.unraisablehook, "ssecfs", False):
        sys.unraisablehook = _quiet(sys.unraisablehook)

    def current() -> AwsCredentials:
        try:
            f = creds.get_frozen_credentials()
        except Exception as e:  # noqa: BLE001 - any failure of the provider chain
            if time.monotonic() - _refresh_failure_said[0] > 60:
                _refresh_failure_said[0] = time.monotonic()
                log.error("AWS credentials could not be refreshed (%s: %s)", type(e).__name__, e)
            raise _NoCredentialsNow() from None
        return AwsCredentials(f.access_key, f.secret_key, f.token)
    return AwsCredentialsProvider.new_delegate(current)


def _tls_options(t: Transport):
    """TLS for https: the system's trust store, or only the CA bundle's certificates."""
    if t.scheme != "https":
        return None
    opts = TlsContextOptions()
    if t.ca_bundle:
        with open(t.ca_bundle, "rb") as f:
            opts.override_default_trust_store(f.read())
    try:
        return ClientTlsContext(opts).new_connection_options()
    except AwsCrtError as e:
        raise StoreSetupError(f"CA bundle {t.ca_bundle}: not usable ({e.name})"
                        if t.ca_bundle else f"TLS setup failed ({e.name})") from None


# ---------------------------------------------------------------------------- bodies
class _Body:
    """Where a response body goes as awscrt hands it over (in order; `offset` counts from
    the object's start for a ranged GET, from 0 otherwise)."""

    __slots__ = ("base", "chunks", "segs", "size")

    def __init__(self, base: int = 0, segments: int = 0):
        self.base = base
        self.chunks: list = []
        self.size = 0
        self.segs = [buffers.POOL.get(min(SEG, segments - off))
                     for off in range(0, segments, SEG)]

    def add(self, chunk, offset: int) -> None:
        if not self.segs:
            self.chunks.append(chunk)
            self.size += len(chunk)
            return
        p, mv = offset - self.base, memoryview(chunk)
        if p < 0 or p + len(mv) > sum(len(s) for s in self.segs):
            raise ValueError("body past the requested range")
        while mv:
            i, o = divmod(p, SEG)
            n = min(len(mv), len(self.segs[i]) - o)
            self.segs[i][o:o + n] = mv[:n]
            mv, p = mv[n:], p + n
        self.size += len(chunk)

    def result(self):
        segs, chunks = self.segs, self.chunks
        if segs:
            if self.size == sum(len(s) for s in segs):
                return Segments(segs)
            return b"".join(segs)[:self.size]             # a short answer: the caller says so
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)


class _Draining(io.RawIOBase):
    """The request body of a Segments, read by awscrt once (it copies a body whole before
    sending it, and sends that copy again on a retry): each buffer is dropped once read."""

    def __init__(self, parts: list):
        super().__init__()
        self._parts = collections.deque(parts)
        self._at = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        out = memoryview(b).cast("B")
        n = 0
        while n < len(out) and self._parts:
            v = memoryview(self._parts[0]).cast("B")[self._at:]
            k = min(len(v), len(out) - n)
            out[n:n + k] = v[:k]
            n += k
            if k == len(v):
                self._parts.popleft()
                self._at = 0
            else:
                self._at += k
        return n


def _body_stream(body):
    if isinstance(body, Segments):
        parts, body.parts = body.parts, []
        return _Draining(parts)
    return io.BytesIO(body)


# ---------------------------------------------------------------------------- requests
# awscrt's errors for answers it retried until it gave up, and the S3 error codes they stand for
S3_CODES = {"AWS_ERROR_S3_SLOW_DOWN": "SlowDown", "AWS_ERROR_S3_INTERNAL_ERROR": "InternalError",
            "AWS_ERROR_S3_REQUEST_TIMEOUT": "RequestTimeout",
            "AWS_ERROR_S3_REQUEST_TIME_TOO_SKEWED": "RequestTimeTooSkewed"}


class TransportFailure(Exception):
    """No HTTP answer to hand over: connection, DNS, TLS, credentials, timeout, or answers
    awscrt retried until it gave up (awscrt's error name; `code`: the S3 error code of
    those)."""

    def __init__(self, name: str, message: str = ""):
        super().__init__(f"{name}: {message}" if message else name)
        self.name = name
        self.code = S3_CODES.get(name)

    @property
    def tls(self) -> bool:
        return "TLS" in self.name or "X509" in self.name or "PKI" in self.name

    @property
    def no_credentials(self) -> bool:
        return self.name == "NoCredentials"

    @property
    def credentials(self) -> bool:
        """The credentials could not be had (a refresh failed)."""
        return self.name.startswith("AWS_AUTH_") or "CREDENTIALS" in self.name


class Answer:
    """An HTTP answer: status, headers (lower-case names; repeated ones joined with ", "),
    body. failed: awscrt judged it an error (any 4xx/5xx, or a 200 whose body is an S3
    <Error>, as S3 answers some failed copies and completions)."""

    __slots__ = ("status", "headers", "body", "failed")

    def __init__(self, status: int, headers, body, failed: bool = False):
        self.status = status
        self.headers: dict[str, str] = {}
        for name, value in headers or ():
            n = name.lower()
            self.headers[n] = f"{self.headers[n]}, {value}" if n in self.headers else value
        self.body = body if body is not None else b""
        self.failed = failed

    @property
    def ok(self) -> bool:
        return not self.failed and 200 <= self.status < 300


def query_string(query: dict | None) -> str:
    """A query string, every byte but the unreserved ones percent-encoded (awscrt decodes
    and re-encodes it canonically to sign it)."""
    if not query:
        return ""
    q = lambda v: urllib.parse.quote(str(v), safe=UNRESERVED)  # noqa: E731
    return "&".join(f"{q(k)}={q(v)}" if v is not None else q(k) for k, v in sorted(query.items()))


class Client:
    """Signed requests to one bucket through awscrt's S3 client, waited for by the calling
    thread. Safe to use from many threads."""

    def __init__(self, t: Transport, bucket: str, *, max_attempts: int = 5,
                 connect_timeout: float = 5.0, stall_timeout: float = 600.0,
                 connections: int = 48):
        self.t = t
        self.bucket = bucket
        virtual = t.virtual_for(bucket)
        self.host = f"{bucket}.{t.host}" if virtual else t.host
        shown = f"[{self.host}]" if ":" in self.host else self.host
        default_port = 443 if t.scheme == "https" else 80
        self.host_header = shown if t.port == default_port else f"{shown}:{t.port}"
        bucket_path = "" if virtual else "/" + urllib.parse.quote(bucket, safe=UNRESERVED)
        self.bucket_path = t.path + bucket_path or "/"
        self.object_base = t.path + bucket_path + "/"
        # awscrt itself fails (and retries) a connection that moves no byte for 30 s; this
        # only ends a request nothing at all happened to for that long (a TLS failure costs
        # up to 30 s an attempt: s2n delays closing after one, to hide its timing).
        self.stall_timeout = stall_timeout
        self.observers: list = []     # tests: fn(op, method, path, headers) before each request
        _route_proxy(t, self.host)
        provider = _credentials_provider(t.credentials)
        retry = (S3RetryConfig(max_retries=max_attempts - 1) if max_attempts > 1
                 else S3RetryConfig(retry_mode=S3RetryMode.NONE))
        self._s3 = S3Client(
            region=t.region,
            signing_config=create_default_s3_signing_config(
                region=t.region, credential_provider=provider) if provider else None,
            tls_mode=S3RequestTlsMode.ENABLED if t.scheme == "https" else S3RequestTlsMode.DISABLED,
            tls_connection_options=_tls_options(t),
            part_size=PART, memory_limit=MEMORY_LIMIT,
            max_active_connections_override=connections, retry_config=retry,
            connect_timeout_ms=int(connect_timeout * 1000))

    def path_of(self, key: str) -> str:
        return self.object_base + urllib.parse.quote(key, safe="/" + UNRESERVED)

    def copy_source(self, key: str) -> str:
        """x-amz-copy-source for an object of this bucket (encoded as botocore does)."""
        return urllib.parse.quote(f"{self.bucket}/{key}", safe="/" + UNRESERVED)

    def send(self, op: str, method: str, key: str | None = None, *, query: dict | None = None,
             headers: dict | None = None, body: bytes | None = None) -> Answer:
        """One request (key None: a bucket-level one). Returns every HTTP answer, errors
        included (awscrt has retried what it retries); raises TransportFailure when there is
        none."""
        return self._run(op, method, key, query, headers, body, _Body(), bulk=False)

    def get(self, key: str, start: int, length: int, headers: dict,
            shared: bool = False) -> Answer:
        """GetObject of bytes [start, start + length): from BULK_MIN bytes on, awscrt's
        GET_OBJECT (parallel ranged part GETs, each with these headers). shared: a big body
        comes back as Segments of pooled buffers, else bytes."""
        bulk = length >= BULK_MIN
        h = {**headers, "range": f"bytes={start}-{start + length - 1}"}
        sink = _Body(start, length if shared and bulk else 0)
        return self._run("GetObject", "GET", key, None, h, None, sink, bulk=bulk)

    def submit(self, op: str, method: str, key: str | None = None, *,
               headers: dict | None = None, body: bytes | None = None) -> futures.Future:
        """send() without waiting: a Future of its Answer (or of its TransportFailure). Many
        of them in flight cost no thread each (the HEADs of a listing, the PUTs of a burst
        of small files), and far less CPU than a thread waiting for each."""
        sink = _Body()
        req, got, seen = self._start(op, method, key, None, headers, body, sink, bulk=False)
        out: futures.Future = futures.Future()
        out.request = req               # (awscrt's request lives as long as it is referred to)
        out.seen = seen                 # when something last happened to it (stall check)

        def done(f):
            try:
                f.result()
                out.set_result(Answer(got[0], got[1], sink.result()))
            except S3ResponseError as e:
                out.set_result(Answer(e.status_code or 0, e.headers, e.body, failed=True))
            except AwsCrtError as e:
                out.set_exception(TransportFailure(e.name, e.message))
            except BaseException as e:  # noqa: BLE001 - handed to the waiter
                out.set_exception(e)
        req.finished_future.add_done_callback(done)
        return out

    def stalled(self, fut: futures.Future) -> bool:
        """Whether nothing happened to a submit() for stall_timeout (wait() then fails it)."""
        return time.monotonic() - fut.seen[0] > self.stall_timeout

    def wait(self, fut: futures.Future) -> Answer:
        """The Answer of a submit(), cancelling a request nothing happened to for
        stall_timeout (TransportFailure "Timeout")."""
        while True:
            try:
                return fut.result(timeout=1.0)
            except TimeoutError:
                if self.stalled(fut):
                    fut.request.cancel()
                    raise TransportFailure("Timeout",
                                           f"nothing for {self.stall_timeout:.0f}s") from None

    def _run(self, op, method, key, query, headers, body, sink: _Body, bulk: bool) -> Answer:
        req, got, seen = self._start(op, method, key, query, headers, body, sink, bulk)
        try:
            return self._wait(req, got, seen, sink)
        finally:
            sink.segs = sink.chunks = []      # (kept by awscrt with the callbacks a while)

    def _start(self, op, method, key, query, headers, body, sink: _Body, bulk: bool):
        """Make the request; (awscrt's request, [status, headers] once answered, [when
        something last happened to it])."""
        if self.t.credentials is None:
            raise TransportFailure("NoCredentials", "no AWS credentials found")
        path = (self.path_of(key) if key is not None else self.bucket_path)
        if query:
            path += "?" + query_string(query)
        h = {"host": self.host_header, **(headers or {}),
             "content-length": str(len(body) if body is not None else 0)}
        for fn in self.observers:
            fn(op, method, path, h)
        got: list = [0, None]                   # status, headers
        seen = [time.monotonic()]

        def on_headers(status_code, headers, **_):
            got[0], got[1] = status_code, headers
            seen[0] = time.monotonic()

        def on_body(chunk, offset, **_):
            sink.add(chunk, offset)
            seen[0] = time.monotonic()

        def on_progress(progress, **_):
            seen[0] = time.monotonic()

        extra = {"max_active_connections_override": BULK_CONNECTIONS} if bulk else {}
        if body:
            extra["on_progress"] = on_progress
        req = self._s3.make_request(
            type=S3RequestType.GET_OBJECT if bulk else S3RequestType.DEFAULT,
            operation_name=op, request=HttpRequest(
                method, path, HttpHeaders(list(h.items())),
                _body_stream(body) if body is not None else None),
            on_headers=on_headers, on_body=on_body, **extra)
        return req, got, seen

    def _wait(self, req, got: list, seen: list, sink: _Body) -> Answer:
        done = req.finished_future
        while True:
            try:
                done.result(timeout=1.0)
            except TimeoutError:
                if time.monotonic() - seen[0] > self.stall_timeout:
                    req.cancel()
                    futures.wait([done])
                    raise TransportFailure("Timeout", f"nothing for {self.stall_timeout:.0f}s") from None
                continue
            except S3ResponseError as e:
                return Answer(e.status_code or 0, e.headers, e.body, failed=True)
            except AwsCrtError as e:
                raise TransportFailure(e.name, e.message) from None
            return Answer(got[0], got[1], sink.result())   # (a callback's exception: raised)

    def close(self) -> None:
        self._s3 = None
