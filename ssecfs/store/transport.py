"""The transport: where the store's requests go, and the one client that carries them.

Configuration is resolved once (resolve_transport -> Transport) from the chain botocore itself
reads: endpoint and where it came from, region, addressing style, credentials (refreshable
ones too), CA bundle, proxy. The plain-http rule is checked on that object: keys never cross
the network in clear, so http:// is allowed to loopback only, never through a proxy.

Every request then goes through Client, on the AWS Common Runtime (awscrt.s3.S3Client): it
signs (SigV4), verifies TLS, pools connections, retries throttling, 5xx and connection
failures, and splits big ranged GETs into parallel part GETs, all in native code outside the
GIL. Nothing here parses HTTP or signs by hand; boto3/botocore only resolve configuration and
credentials. Bodies stay in memory (never awscrt's recv_filepath/send_filepath: those read or
write plaintext files).

awscrt's S3 client takes its proxy only from the process environment (HTTPS_PROXY,
HTTP_PROXY, NO_PROXY, read at each new connection, lower-case names first): Client pins those
variables to the transport's decision (_route_proxy), so the runtime proxies exactly when
resolve_transport says so, and a plain-http request never goes through a proxy.
"""

from __future__ import annotations

import collections
import io
import ipaddress
import logging
import os
import re
import sys
import time
import urllib.parse
from concurrent import futures
from dataclasses import dataclass, field

import botocore.configprovider
import botocore.credentials
import botocore.exceptions
import botocore.httpsession
import botocore.session
import botocore.utils
from awscrt.auth import AwsCredentials, AwsCredentialsProvider
from awscrt.exceptions import AwsCrtError
from awscrt.http import HttpHeaders, HttpRequest
from awscrt.io import ClientTlsContext, TlsContextOptions
from awscrt.s3 import (S3Client, S3RequestTlsMode, S3RequestType, S3ResponseError, S3RetryConfig,
                       S3RetryMode, create_default_s3_signing_config)
from botocore.config import Config

from .. import buffers
from ..buffers import SEG, Segments
from ..errors import SecurityRefusal, StoreSetupError, UserError

log = logging.getLogger("ssecfs.transport")

MiB = 1024 * 1024
PART = 8 * MiB               # awscrt's part size: the cache's read unit
MEMORY_LIMIT = 1024 * MiB    # awscrt's buffer pool cap (its minimum): GET parts only
BULK_MIN = MiB + 1           # ranged GETs from this size use awscrt's parallel GET_OBJECT
BULK_CONNECTIONS = 8         # connections one ranged GET_OBJECT may use at once
AWS_DEFAULT = "the AWS default endpoint"
UNRESERVED = "-_.~"          # RFC 3986; '/' is kept in object paths (S3 does not double-encode)


# ---------------------------------------------------------------------------- the endpoint rule
def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_endpoint(url: str | None,
                   source: str = "--endpoint-url") -> urllib.parse.SplitResult | None:
    """The plain-http rule: keys never cross the network in clear, so http:// is allowed to
    loopback only. `source` names where the URL came from, for the one-line refusal."""
    if not url:
        return None
    parts = urllib.parse.urlsplit(url)
    try:
        host = parts.hostname
        parts.port                               # noqa: B018 - raises on a bad port
    except ValueError:
        host = None
    if parts.scheme not in ("http", "https") or not host:
        raise UserError(f"bad endpoint URL {url!r} (from {source}): expected "
                        "http(s)://host[:port]")
    if parts.scheme == "http" and not is_loopback(host):
        raise SecurityRefusal(
            f"refusing plain http:// to {host} (from {source}): SSE-C keys would cross the "
            "network unencrypted; use https://")
    return parts


@dataclass(frozen=True)
class Transport:
    """Where every request of the store goes and how, resolved once (resolve_transport) from
    the chain botocore itself reads, and handed whole to Client."""
    url: str                  # the endpoint (path-style requests below it)
    scheme: str               # "https", or "http" (loopback only)
    host: str
    port: int
    source: str               # "--endpoint-url", "AWS_ENDPOINT_URL_S3", a profile..., AWS_DEFAULT
    custom: bool              # an endpoint other than AWS's own
    region: str
    proxy: str | None = None  # the proxy requests go through (https only: a CONNECT tunnel)
    ca_bundle: str | None = None
    addressing: str = "path"  # "path", or "virtual" (bucket.host)
    path: str = ""            # the endpoint URL's own path, if any
    credentials: object = field(default=None, compare=False, repr=False)  # botocore's

    @property
    def where(self) -> str:
        return f"from {self.source}" if self.custom else self.source

    def proxy_shown(self) -> str | None:
        """The proxy URL without its user name and password (for messages and logs)."""
        return botocore.httpsession.mask_proxy_url(self.proxy) if self.proxy else None

    def virtual_for(self, bucket: str) -> bool:
        """Whether requests for this bucket name it in the host (bucket.host): with virtual
        addressing, for names that are one DNS label (a dotted name would not match the
        certificate of *.host)."""
        return self.addressing == "virtual" and re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]",
                                                             bucket) is not None


# ---------------------------------------------------------------------------- resolution
def _session(profile: str | None) -> botocore.session.Session:
    bs = botocore.session.Session()
    if profile:
        bs.set_config_variable("profile", profile)
    return bs


def _config_errors(fn, *args, **kw):
    """Call fn, turning a broken AWS configuration into one line and an exit code."""
    try:
        return fn(*args, **kw)
    except botocore.exceptions.ProfileNotFound as e:
        raise StoreSetupError(f"AWS profile {e.kwargs.get('profile')!r} not found") from None
    except (botocore.exceptions.InvalidConfigError, botocore.exceptions.ConfigParseError,
            botocore.exceptions.CredentialRetrievalError,
            botocore.exceptions.PartialCredentialsError) as e:
        raise StoreSetupError(f"AWS configuration: {e}") from None
    except botocore.exceptions.InvalidRegionError as e:
        raise UserError(str(e)) from None


def _profile_name(bs) -> str:
    return bs.get_config_variable("profile") or "default"


def _endpoint_sources(bs: botocore.session.Session):
    """(name, URL) of each place botocore takes an S3 endpoint from, in its order
    (botocore.configprovider.ConfiguredEndpointProvider); used to name the source only."""
    yield "AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL_S3")
    yield "AWS_ENDPOINT_URL", os.environ.get("AWS_ENDPOINT_URL")
    scoped = bs.get_scoped_config()
    profile = _profile_name(bs)
    in_file = os.path.expanduser(str(bs.get_config_variable("config_file")))
    section = scoped.get("services")
    if section:
        s3 = bs.full_config.get("services", {}).get(section, {}).get("s3")
        yield (f"[services {section}] of profile {profile!r} in {in_file}",
               s3.get("endpoint_url") if isinstance(s3, dict) else None)
    yield f"endpoint_url of profile {profile!r} in {in_file}", scoped.get("endpoint_url")


def _configured_endpoint(bs: botocore.session.Session) -> tuple[str | None, str]:
    """The endpoint botocore's own chain gives an S3 client made without endpoint_url, and
    where it came from."""
    if bs.get_config_variable("ignore_configured_endpoint_urls"):
        return None, AWS_DEFAULT
    url = botocore.configprovider.ConfiguredEndpointProvider(
        full_config=bs.full_config, scoped_config=bs.get_scoped_config(),
        client_name="s3").provide()
    if not url:
        return None, AWS_DEFAULT
    # A source botocore reads but this list does not know still gets the rule, under a
    # general name.
    name = next((n for n, v in _endpoint_sources(bs) if v == url), "the AWS configuration")
    return url, name


def _aws_endpoint(bs: botocore.session.Session, region: str) -> str:
    """AWS's own regional endpoint, as botocore resolves it. Making a client connects
    nowhere; the placeholder credentials keep botocore from looking for real ones."""
    # The region goes in the Config: botocore picks the legacy global endpoint for us-east-1
    # when it comes as create_client's argument instead.
    client = bs.create_client(
        "s3", aws_access_key_id="resolve", aws_secret_access_key="resolve",
        config=Config(region_name=region, ignore_configured_endpoint_urls=True,
                      signature_version="s3v4", s3={"addressing_style": "auto"}))
    try:
        return client.meta.endpoint_url
    finally:
        client.close()


def _proxy_for(url: str, scheme: str) -> str | None:
    """The proxy botocore would take from the environment (HTTPS_PROXY, NO_PROXY...) for an
    https endpoint. Plain http (loopback only) never goes through a proxy: the proxy would
    read the keys."""
    if scheme != "https":
        return None
    proxies = botocore.utils.get_environ_proxies(url)
    return botocore.httpsession.ProxyConfiguration(proxies=proxies).proxy_url_for(url) or None


def _addressing(bs, custom: bool, scheme: str, host: str, source: str) -> str:
    """virtual-hosted for AWS, path-style for other endpoints, unless the profile's
    `s3 = addressing_style = ...` says otherwise."""
    s3 = bs.get_scoped_config().get("s3")
    style = (s3.get("addressing_style") if isinstance(s3, dict) else None) or "auto"
    if style not in ("auto", "path", "virtual"):
        raise StoreSetupError(f"AWS configuration: s3 addressing_style {style!r} of profile "
                        f"{_profile_name(bs)!r}: expected auto, path or virtual")
    if style == "auto":
        style = "path" if custom else "virtual"
    if style == "virtual" and scheme == "http":
        # bucket.localhost is a name the rule cannot vouch for: it resolves as the hosts
        # file says, not necessarily to loopback.
        raise SecurityRefusal(f"refusing virtual-hosted addressing over plain http:// to {host} "
                        f"(from {source}): requests would go to BUCKET.{host}, not a loopback "
                        "address; use https:// or addressing_style = path")
    return style


def _ca_bundle(bs, flag: str | None) -> str | None:
    """The CA bundle (--ca-bundle, else AWS_CA_BUNDLE, else the profile's ca_bundle), checked
    to be a readable PEM file: a set but unusable value is refused, never ignored."""
    if flag is not None:
        value, source = flag, "--ca-bundle"
    else:
        value = bs.get_config_variable("ca_bundle")
        source = ("AWS_CA_BUNDLE" if os.environ.get("AWS_CA_BUNDLE") is not None
                  else f"ca_bundle of profile {_profile_name(bs)!r}")
    if value is None:
        return None
    if not str(value).strip():
        raise StoreSetupError(f"{source} is set but empty: name a PEM file of trusted CA "
                        "certificates, or unset it")
    path = os.path.expanduser(str(value))
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise StoreSetupError(f"CA bundle {path} (from {source}): {e.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise StoreSetupError(f"CA bundle {path} (from {source}): no PEM certificate in it")
    return path


def resolve_transport(endpoint_url: str | None = None, *, profile: str | None = None,
                      region: str | None = None, ca_bundle: str | None = None,
                      session: botocore.session.Session | None = None) -> Transport:
    """Where the store's requests will go, from --endpoint-url or else the configuration
    botocore reads (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, the profile's `services` section,
    the profile's endpoint_url; AWS_IGNORE_CONFIGURED_ENDPOINT_URLS turns those off), and how
    (region, addressing style, credentials, CA bundle, proxy). Refuses plain http to anything
    but loopback (SecurityRefusal) before anything else is looked up."""
    bs = session or _session(profile)
    return _config_errors(_resolve, bs, endpoint_url, region, ca_bundle)


def _resolve(bs, endpoint_url, region, ca_bundle) -> Transport:
    if endpoint_url:
        url, source = endpoint_url, "--endpoint-url"
    else:
        url, source = _configured_endpoint(bs)
    parts = check_endpoint(url, source)          # first: nothing else is looked up for it
    region = region or bs.get_config_variable("region") or "us-east-1"
    custom = parts is not None
    if not custom:
        url = _aws_endpoint(bs, region)
        parts = check_endpoint(url, source)
    return Transport(url=url, scheme=parts.scheme, host=parts.hostname,
                     port=parts.port or (443 if parts.scheme == "https" else 80),
                     source=source, custom=custom, region=region,
                     proxy=_proxy_for(url, parts.scheme), ca_bundle=_ca_bundle(bs, ca_bundle),
                     addressing=_addressing(bs, custom, parts.scheme, parts.hostname, source),
                     path=parts.path.rstrip("/"), credentials=bs.get_credentials())


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
               headers: dict | None = None) -> futures.Future:
        """send() of a request without a body, without waiting: a Future of its Answer (or of
        its TransportFailure). Many of them in flight cost no thread each (the HEADs of a
        listing): about a third of the CPU per request of one thread waiting for each."""
        sink = _Body()
        req, got, seen = self._start(op, method, key, None, headers, None, sink, bulk=False)
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
