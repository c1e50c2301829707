"""The boto3 implementation of the store: the only module that talks to boto3.

Every data/metadata request carries SSE-C parameters of a ring key. What the service did is
verified: a write must echo AES256 and our key MD5 (CopyObject and CompleteMultipartUpload
responses that carry no echo are verified with a HEAD under the destination key). Errors are
translated to domain errors here; transient ones are retried by botocore ("standard" mode) and
surface as StoreUnavailable.

Lock order: _hint_lock is a leaf lock (guards _key_hint only).
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import os
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import boto3
import botocore.configprovider
import botocore.exceptions
import botocore.httpsession
import botocore.session
import botocore.utils
from botocore.config import Config
from cachetools import LRUCache

from .errors import (EncryptionNotApplied, KeyMismatch, NotFound, NotSupported,
                     PermissionDenied, Stale, StoreError, StoreUnavailable, UserError)
from .http1 import Segments
from .keys import Key, KeyRing
from .s3raw import RawS3, parse_copy_result, parse_list_v2, plain_key
from .store import LOCKED, OPEN, PLAINTEXT, ListedObject, ListPage, ObjectInfo, Reader

log = logging.getLogger("ssecfs.store")

MiB = 1024 * 1024
SINGLE_PUT_MAX = 16 * MiB
RAW_GET_MAX = 8 * MiB          # range GETs up to this size take the raw path (s3raw)
RAW_PUT_MAX = 16 * MiB         # and PUTs up to this size
MIN_PART = 8 * MiB
MAX_PARTS = 10000
COPY_MAX = 5 * 1024 * MiB
KEY_FP_META = "ssecfs-key"
EXIT_STORE = 4
EXIT_SECURITY = 5
PROBE_DATA = b"ssecfs probe\n"   # probe_sse writes it with the key, must not read it without
SSEC_BLOCKED_HINT = ("the bucket blocks SSE-C writes: the bucket owner must allow SSE-C in the "
                     "bucket's default encryption settings (remove SSE-C from its blocked "
                     "encryption types)")


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
                        "http(s)://host[:port]", 2)
    if parts.scheme == "http" and not is_loopback(host):
        raise UserError(
            f"refusing plain http:// to {host} (from {source}): SSE-C keys would cross the "
            "network unencrypted; use https://", EXIT_SECURITY)
    return parts


AWS_DEFAULT = "the AWS default endpoint"


@dataclass(frozen=True)
class Transport:
    """Where every request of the store goes, resolved once (resolve_transport) from the chain
    botocore itself reads, and handed whole to whatever sends the requests."""
    url: str                  # as the S3 client is given it (path-style requests below it)
    scheme: str               # "https", or "http" (loopback only)
    host: str
    port: int
    source: str               # "--endpoint-url", "AWS_ENDPOINT_URL_S3", a profile..., AWS_DEFAULT
    custom: bool              # an endpoint other than AWS's own: path-style requests
    region: str
    proxy: str | None = None  # the proxy requests go through (https only: a CONNECT tunnel)
    ca_bundle: str | None = None

    @property
    def where(self) -> str:
        return f"from {self.source}" if self.custom else self.source

    def botocore_proxies(self) -> dict:
        # Both schemes named: botocore reads the environment's proxies only when the client's
        # `proxies` is None, and an entry set to None sends that scheme directly.
        return {"http": None, "https": self.proxy if self.scheme == "https" else None}

    def proxy_shown(self) -> str | None:
        """The proxy URL without its user name and password (for messages and logs)."""
        return botocore.httpsession.mask_proxy_url(self.proxy) if self.proxy else None


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
        raise UserError(f"AWS profile {e.kwargs.get('profile')!r} not found", EXIT_STORE) from None
    except (botocore.exceptions.InvalidConfigError, botocore.exceptions.ConfigParseError) as e:
        raise UserError(f"AWS configuration: {e}", EXIT_STORE) from None
    except botocore.exceptions.InvalidRegionError as e:
        raise UserError(str(e), 2) from None


def _endpoint_sources(bs: botocore.session.Session):
    """(name, URL) of each place botocore takes an S3 endpoint from, in its order
    (botocore.configprovider.ConfiguredEndpointProvider); used to name the source only."""
    yield "AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL_S3")
    yield "AWS_ENDPOINT_URL", os.environ.get("AWS_ENDPOINT_URL")
    scoped = bs.get_scoped_config()
    profile = bs.get_config_variable("profile") or "default"
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
    """AWS's own endpoint for the region, as an S3 client made by the store would use it.
    Making a client connects nowhere; the placeholder credentials keep botocore from looking
    for real ones (which may ask the instance metadata service)."""
    # The region goes in the Config, as S3Store gives it: botocore picks the legacy global
    # endpoint for us-east-1 when it comes as create_client's argument instead.
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


def resolve_transport(endpoint_url: str | None = None, *, profile: str | None = None,
                      region: str | None = None, ca_bundle: str | None = None,
                      session: botocore.session.Session | None = None) -> Transport:
    """Where the store's requests will go, from --endpoint-url or else the configuration
    botocore reads (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, the profile's `services` section,
    the profile's endpoint_url; AWS_IGNORE_CONFIGURED_ENDPOINT_URLS turns those off). Refuses
    plain http to anything but loopback (UserError, EXIT_SECURITY) before any connection."""
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
                     proxy=_proxy_for(url, parts.scheme),
                     ca_bundle=ca_bundle or bs.get_config_variable("ca_bundle"))


def _http_date(value: str | None) -> float | None:
    """An HTTP date header as epoch seconds (None if absent or unreadable)."""
    try:
        return email.utils.parsedate_to_datetime(value).timestamp() if value else None
    except (TypeError, ValueError):
        return None


def _header_safe(text: str) -> bool:
    """Sent as an HTTP header by hand: printable ASCII only (botocore handles the rest)."""
    return text.isascii() and text.isprintable() and text == text.strip()


def _echo_fps(value: str | None) -> set[str]:
    # Some servers send the header twice; botocore joins them with ", ".
    return {v.strip() for v in value.split(",")} if value else set()


def _code(e: botocore.exceptions.ClientError) -> tuple[str, int]:
    err = e.response.get("Error", {})
    return str(err.get("Code", "")), int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _mentions_ssec_block(e: botocore.exceptions.ClientError) -> bool:
    msg = str(e.response.get("Error", {}).get("Message", "")).lower()
    return "encryption" in msg and ("sse-c" in msg or "customer" in msg or "blocked" in msg)


class S3Store:
    def __init__(self, bucket: str, ring: KeyRing, endpoint_url: str | None = None,
                 region: str | None = None, profile: str | None = None,
                 ca_bundle: str | None = None, workers: int = 8,
                 max_attempts: int = 5, connect_timeout: float = 5, read_timeout: float = 60):
        bs = _session(profile)
        # Resolved once; the client below is given exactly this endpoint and these proxies.
        self.transport = t = resolve_transport(endpoint_url, region=region, ca_bundle=ca_bundle,
                                               session=bs)
        self.bucket = bucket
        self.ring = ring
        self.endpoint_url = t.url if t.custom else None
        cfg = Config(
            region_name=t.region,
            # payload_signing_enabled=False: no SHA-256 of every uploaded byte for SigV4
            # (UNSIGNED-PAYLOAD). botocore already does this over https when a checksum is
            # sent; integrity in transit comes from TLS, and plain http is only allowed to
            # loopback (check_endpoint).
            s3={"addressing_style": "path" if t.custom else "auto",
                "payload_signing_enabled": False},
            signature_version="s3v4",
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": "standard", "max_attempts": max_attempts},
            max_pool_connections=max(16, workers * 2 + 4),
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            tcp_keepalive=True,
            # the endpoint is t.url or AWS's own, never one botocore finds on its own
            ignore_configured_endpoint_urls=True,
            proxies=t.botocore_proxies(),
            # an https proxy must tunnel (CONNECT), never receive the requests themselves
            proxies_config={"proxy_use_forwarding_for_https": False},
        )
        session = boto3.session.Session(botocore_session=bs)
        self.client = session.client("s3", endpoint_url=self.endpoint_url, config=cfg,
                                     verify=t.ca_bundle or None)
        if self.client.meta.endpoint_url != t.url:
            raise UserError(f"the S3 client resolved {self.client.meta.endpoint_url}, not "
                            f"{t.url} ({t.where}): refusing to guess", EXIT_SECURITY)
        log.info("endpoint %s (%s)%s", t.url, t.where,
                 f" through proxy {t.proxy_shown()}" if t.proxy else "")
        self.raw = self._make_raw(bs, cfg, connect_timeout, read_timeout)
        self._key_hint: LRUCache = LRUCache(maxsize=100_000)
        self._hint_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3part")
        self._upc_unsupported = False

    def _make_raw(self, session, cfg, connect_timeout, read_timeout) -> RawS3 | None:
        """The lean path for HEAD and small GETs (s3raw), where it applies: a path-style
        endpoint reached directly (it cannot tunnel through a proxy: botocore carries every
        request when one applies), and credentials."""
        t = self.transport
        if not t.custom or t.proxy or os.environ.get("SSECFS_NO_RAW"):
            return None
        creds = session.get_credentials()
        if creds is None:
            return None
        ca = t.ca_bundle or botocore.httpsession.get_cert_path(True)
        return RawS3(t.url, self.bucket, t.region, creds, ca,
                     connect_timeout, read_timeout, maxsize=max(cfg.max_pool_connections, 48))

    def _raw(self, op: str, method: str, key: str, headers: dict, body: bytes | None = None,
             query: dict | None = None):
        """A raw request, or None when the caller should use botocore instead (raw path off,
        an odd key, connection trouble, or an answer botocore's retries should handle)."""
        if self.raw is None or not plain_key(key):
            return None
        try:
            r = self.raw.request(op, method, key, headers, body, query=query)
        except Exception as e:  # noqa: BLE001 - botocore retries and reports it
            log.debug("raw %s %r: %s; using botocore", op, key, type(e).__name__)
            return None
        if r.status in (200, 206, 400, 403, 404, 412):
            return r
        return None

    @staticmethod
    def _raw_error(r, op: str) -> botocore.exceptions.ClientError:
        return botocore.exceptions.ClientError(
            {"Error": {"Code": str(r.status), "Message": ""},
             "ResponseMetadata": {"HTTPStatusCode": r.status}}, op)

    def _head_object(self, key: str, k: Key) -> dict:
        """HeadObject under key k (boto3's answer shape; ClientError on 4xx like boto3)."""
        r = self._raw("HeadObject", "HEAD", key, k.sse_headers())
        if r is None:
            return self.client.head_object(Bucket=self.bucket, Key=key, **k.sse_params())
        if r.status != 200:
            raise self._raw_error(r, "HeadObject")
        return r.boto_shape()

    def __repr__(self) -> str:
        return f"S3Store({self.bucket!r}, {self.endpoint_url!r})"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.raw is not None:
            self.raw.close()

    # -- error translation ------------------------------------------------------------------
    def _translate(self, e: Exception, op: str, key: str) -> Exception:
        where = f"{op} {key!r}"
        if isinstance(e, botocore.exceptions.ClientError):
            code, status = _code(e)
            if status == 404 or code in ("NoSuchKey", "NotFound", "404"):
                if code == "NoSuchBucket":
                    return StoreError(f"{where}: bucket {self.bucket!r} does not exist")
                return NotFound(where)
            if status == 412 or code == "PreconditionFailed":
                return Stale(f"{where}: object changed while reading")
            if status == 403 and _mentions_ssec_block(e):
                return PermissionDenied(f"{where}: {SSEC_BLOCKED_HINT}")
            if status == 403:
                return PermissionDenied(f"{where}: access denied ({code})")
            if status == 501 or code == "NotImplemented":
                return NotSupported(f"{where}: not implemented by the server")
            if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
                return StoreUnavailable(f"{where}: {code or status}")
            return StoreError(f"{where}: {code or status}")
        if isinstance(e, (botocore.exceptions.EndpointConnectionError,
                          botocore.exceptions.ConnectionError,
                          botocore.exceptions.ReadTimeoutError,
                          botocore.exceptions.ConnectTimeoutError,
                          botocore.exceptions.ResponseStreamingError)):
            return StoreUnavailable(f"{where}: {type(e).__name__}")
        if isinstance(e, botocore.exceptions.NoCredentialsError):
            return StoreError(f"{where}: no AWS credentials found")
        if isinstance(e, botocore.exceptions.BotoCoreError):
            return StoreError(f"{where}: {type(e).__name__}")
        return e

    def _call(self, op: str, key: str, fn, **kw):
        try:
            return fn(Bucket=self.bucket, **kw)
        except Exception as e:  # noqa: BLE001 - translated here, at the boundary
            raise self._translate(e, op, key) from None

    # -- key choice -----------------------------------------------------------------------------
    def _hint(self, key: str) -> str | None:
        with self._hint_lock:
            return self._key_hint.get(key)

    def _remember(self, key: str, fp: str | None) -> None:
        with self._hint_lock:
            if fp:
                self._key_hint[key] = fp
            else:
                self._key_hint.pop(key, None)

    def _check_write_echo(self, resp: dict, key: str, op: str, want: Key) -> None:
        echoed = _echo_fps(resp.get("SSECustomerKeyMD5"))
        alg = {a.strip() for a in str(resp.get("SSECustomerAlgorithm") or "").split(",") if a.strip()}
        if echoed != {want.fingerprint} or alg != {"AES256"}:
            log.error("endpoint %s did not confirm SSE-C with our key on %s of %r; "
                      "treating the write as failed", self.endpoint_url or "AWS", op, key)
            raise EncryptionNotApplied(f"{op} {key!r}: server did not apply SSE-C")

    def _verify_by_head(self, key: str, want: Key, op: str) -> ObjectInfo:
        """For responses that carry no echo (CopyObject, CompleteMultipartUpload on some
        servers): HEAD with the key; only an echo of our key MD5 proves the encryption."""
        try:
            resp = self._head_object(key, want)
        except Exception as e:  # noqa: BLE001 - translated here, at the boundary
            raise self._translate(e, "HeadObject", key) from None
        if _echo_fps(resp.get("SSECustomerKeyMD5")) != {want.fingerprint}:
            log.error("endpoint %s stored %r without SSE-C after %s", self.endpoint_url or "AWS",
                      key, op)
            raise EncryptionNotApplied(f"{op} {key!r}: server did not apply SSE-C")
        self._remember(key, want.fingerprint)
        return self._info(key, resp, OPEN, want.fingerprint)

    @staticmethod
    def _info(key: str, resp: dict, access: str, fp: str | None) -> ObjectInfo:
        lm = resp.get("LastModified")
        return ObjectInfo(key=key, size=int(resp.get("ContentLength", 0)),
                          etag=str(resp.get("ETag", "")).strip('"'),
                          mtime=lm.timestamp() if lm else 0.0,
                          metadata=dict(resp.get("Metadata") or {}), access=access, key_fp=fp,
                          observed=_http_date(resp.get("ResponseMetadata", {})
                                              .get("HTTPHeaders", {}).get("date")))

    # -- reads --------------------------------------------------------------------------------
    def head(self, key: str, denied: Key | None = None) -> ObjectInfo:
        """denied: a key the caller already saw refused for this object (not asked again)."""
        last_denied = PermissionDenied(f"HeadObject {key!r}: access denied") if denied else None
        for k in self.ring.candidates(self._hint(key)):
            if k is denied:
                continue
            try:
                resp = self._head_object(key, k)
            except Exception as e:  # noqa: BLE001
                if isinstance(e, botocore.exceptions.ClientError) and _code(e)[1] == 400:
                    return self._head_plain(key)      # AWS: SSE-C headers on a plaintext object
                err = self._translate(e, "HeadObject", key)
                if isinstance(err, PermissionDenied):
                    last_denied = err
                    continue
                raise err from None
            if not _echo_fps(resp.get("SSECustomerKeyMD5")):
                return self._info(key, resp, PLAINTEXT, None)
            self._remember(key, k.fingerprint)
            return self._info(key, resp, OPEN, k.fingerprint)
        # No key opens it: still report it (listing works without a key) so it lists.
        listed = self._list_one(key)
        if listed is None:
            raise last_denied or NotFound(key)
        self._remember(key, None)
        return ObjectInfo(key=key, size=listed.size, etag=listed.etag, mtime=listed.mtime,
                          access=LOCKED)

    def head_with_start(self, key: str, nbytes: int) -> ObjectInfo:
        """head(), plus the object's first nbytes in info.start when one ranged GET can tell
        both (lean path): a small file looked up and then read costs one round trip, not
        two. Anything unusual (another key, a plaintext or empty object, an odd answer) is
        left to head()."""
        k = self.ring.by_fingerprint(self._hint(key)) or self.ring.current
        r = self._raw("GetObject", "GET", key, {"range": f"bytes=0-{nbytes - 1}",
                                                 **k.sse_headers()})
        if r is not None and r.status == 404:
            raise NotFound(f"GetObject {key!r}")
        if r is not None and r.status == 403:        # not this key: the others, or LOCKED
            return self.head(key, denied=k)
        if r is None or r.status not in (200, 206) or _echo_fps(
                r.headers.get("x-amz-server-side-encryption-customer-key-md5")) != {k.fingerprint}:
            return self.head(key)
        size = len(r.body)
        if r.status == 206:
            total = str(r.headers.get("content-range", "")).rpartition("/")[2]
            if not total.isdigit():
                return self.head(key)
            size = int(total)
        if size < len(r.body):
            return self.head(key)
        self._remember(key, k.fingerprint)
        return replace(self._info(key, r.boto_shape(), OPEN, k.fingerprint), size=size,
                       start=r.body)

    def _head_plain(self, key: str) -> ObjectInfo:
        resp = self._call("HeadObject", key, self.client.head_object, Key=key)
        return self._info(key, resp, PLAINTEXT, None)

    def _list_one(self, key: str) -> ListedObject | None:
        for page in self.list_page_iter(key, delimiter=None, max_keys=1):
            for o in page.objects:
                if o.key == key:
                    return o
            return None
        return None

    def get_range(self, key: str, start: int, length: int, key_fp: str | None,
                  etag: str | None = None, shared: bool = False) -> bytes:
        """Plaintext bytes [start, start + length) of the object. shared=True: a big body may
        come back as the lean path's pooled receive buffers (http1.Segments, not copied
        again): the caller reads it through memoryviews (store.pieces) and drops them when
        done (see http1.BufferPool). Otherwise the answer is bytes or a bytearray."""
        if length <= 0:
            return b""
        k = self.ring.by_fingerprint(key_fp) or self.ring.current
        kw = {"Range": f"bytes={start}-{start + length - 1}", **k.sse_params()}
        if etag:
            kw["IfMatch"] = f'"{etag}"'
        r = None
        if length <= RAW_GET_MAX:
            h = {"range": kw["Range"], **k.sse_headers()}
            if etag:
                h["if-match"] = kw["IfMatch"]
            r = self._raw("GetObject", "GET", key, h)
        if r is not None:
            if r.status not in (200, 206):
                raise self._translate(self._raw_error(r, "GetObject"), "GetObject", key)
            echo, body = r.headers.get("x-amz-server-side-encryption-customer-key-md5"), r.body
        else:
            resp = self._call("GetObject", key, self.client.get_object, Key=key, **kw)
            echo, body = resp.get("SSECustomerKeyMD5"), resp["Body"]
        if _echo_fps(echo) != {k.fingerprint}:
            if not isinstance(body, (bytes, bytearray, Segments)):
                body.close()
            log.warning("%r was served without SSE-C (a plaintext object): refused", key)
            raise KeyMismatch(f"{key!r} is not encrypted with SSE-C: refused")
        if isinstance(body, Segments):
            return body if shared else bytes(body)
        if isinstance(body, (bytes, bytearray)):
            return body
        try:
            return body.read()
        except Exception as e:  # noqa: BLE001
            raise self._translate(e, "GetObject", key) from None

    # -- writes -------------------------------------------------------------------------------
    def _meta(self, metadata: dict, k: Key) -> dict:
        return {**{str(a): str(b) for a, b in metadata.items()}, KEY_FP_META: k.fingerprint}

    def _raw_put(self, key: str, data: bytes, meta: dict, k: Key) -> dict | None:
        """PutObject on the lean path; None: use botocore (odd metadata, or any answer but
        200 -- a PUT is idempotent, botocore sends it again and reports errors properly)."""
        if any(not _header_safe(a) or not _header_safe(b) for a, b in meta.items()):
            return None
        h = {**{f"x-amz-meta-{a}": b for a, b in meta.items()}, **k.sse_headers()}
        r = self._raw("PutObject", "PUT", key, h, bytes(data))
        if r is None or r.status != 200:
            return None
        g = r.headers.get
        return {"ETag": g("etag", ""),
                "SSECustomerKeyMD5": g("x-amz-server-side-encryption-customer-key-md5"),
                "SSECustomerAlgorithm": g("x-amz-server-side-encryption-customer-algorithm")}

    def _raw_copy(self, src: str, dst: str, sk: Key, dk: Key, meta: dict | None = None,
                  if_match: str | None = None) -> dict | None:
        """CopyObject on the lean path (meta given: REPLACE the metadata, else COPY it).
        None: use botocore (odd names or metadata; any answer but a 200 carrying a
        CopyObjectResult -- a copy is idempotent, botocore sends it again and reports errors
        with their codes)."""
        if self.raw is None or not plain_key(src) or any(
                not _header_safe(a) or not _header_safe(b) for a, b in (meta or {}).items()):
            return None
        h = {"x-amz-copy-source": self.raw.copy_source(src),
             "x-amz-metadata-directive": "COPY" if meta is None else "REPLACE",
             **{"x-amz-copy-source-" + n[len("x-amz-"):]: v for n, v in sk.sse_headers().items()},
             **dk.sse_headers()}
        h.update({f"x-amz-meta-{a}": b for a, b in (meta or {}).items()})
        if if_match:
            h["x-amz-copy-source-if-match"] = f'"{if_match}"'
        r = self._raw("CopyObject", "PUT", dst, h)
        result = parse_copy_result(r.body) if r is not None and r.status == 200 else None
        if result is None:
            return None
        g = r.headers.get
        return {"CopyObjectResult": result,
                "SSECustomerKeyMD5": g("x-amz-server-side-encryption-customer-key-md5"),
                "SSECustomerAlgorithm": g("x-amz-server-side-encryption-customer-algorithm")}

    def put(self, key: str, data: bytes, metadata: dict) -> ObjectInfo:
        k = self.ring.current
        meta = self._meta(metadata, k)
        resp = self._raw_put(key, data, meta, k) if len(data) <= RAW_PUT_MAX else None
        if resp is None:
            resp = self._call("PutObject", key, self.client.put_object, Key=key, Body=data,
                              Metadata=meta, **k.sse_params())
        if not (key.endswith("/") and not data and not resp.get("SSECustomerKeyMD5")):
            # A zero-byte directory marker holds no data; SeaweedFS stores it as a filer
            # directory and does not echo SSE-C for it. Everything else must be confirmed.
            self._check_write_echo(resp, key, "PutObject", k)
        self._remember(key, k.fingerprint)
        return ObjectInfo(key=key, size=len(data), etag=str(resp.get("ETag", "")).strip('"'),
                          mtime=0.0, metadata=dict(metadata), access=OPEN, key_fp=k.fingerprint)

    @staticmethod
    def part_size_for(size: int) -> int:
        ps = MIN_PART
        while size > ps * MAX_PARTS:
            ps *= 2
        return ps

    def upload(self, key: str, size: int, reader: Reader, metadata: dict) -> ObjectInfo:
        if size <= SINGLE_PUT_MAX:
            return self.put(key, reader(0, size), metadata)
        ps = self.part_size_for(size)
        n = (size + ps - 1) // ps

        def part(i: int, up_id: str, k: Key):
            off = i * ps
            body = reader(off, min(ps, size - off))
            return self._upload_part(key, up_id, i + 1, body, k)

        return self._multipart(key, metadata, n, part)

    def _upload_part(self, key: str, up_id: str, num: int, body: bytes, k: Key) -> dict:
        resp = None
        if len(body) <= RAW_PUT_MAX:
            # lean path; any answer but 200 goes to botocore (an UploadPart is idempotent:
            # it sends it again, retries and reports errors properly)
            r = self._raw("UploadPart", "PUT", key, k.sse_headers(), body,
                          query={"partNumber": str(num), "uploadId": up_id})
            if r is not None and r.status == 200 and r.headers.get("etag"):
                g = r.headers.get
                resp = {"ETag": g("etag"),
                        "SSECustomerKeyMD5": g("x-amz-server-side-encryption-customer-key-md5"),
                        "SSECustomerAlgorithm":
                            g("x-amz-server-side-encryption-customer-algorithm")}
        if resp is None:
            resp = self._call("UploadPart", key, self.client.upload_part, Key=key,
                              UploadId=up_id, PartNumber=num, Body=body, **k.sse_params())
        self._check_write_echo(resp, key, "UploadPart", k)
        return {"PartNumber": num, "ETag": resp["ETag"]}

    def _multipart(self, key: str, metadata: dict, nparts: int, part_fn) -> ObjectInfo:
        up_id, fp = self.mpu_begin(key, metadata)
        k = self.ring.by_fingerprint(fp)
        try:
            # Bounded window: at most 2x workers parts in flight (memory stays bounded).
            parts, futs, window = [], [], 2 * self._pool._max_workers
            for i in range(nparts):
                futs.append(self._pool.submit(part_fn, i, up_id, k))
                if len(futs) >= window:
                    parts.append(futs.pop(0).result())
            parts.extend(f.result() for f in futs)
            return self.mpu_complete(key, up_id, [(p["PartNumber"], p["ETag"]) for p in parts], fp)
        except BaseException:
            for f in futs:
                f.cancel()
            self.mpu_abort(key, up_id)
            raise

    # -- multipart uploads driven by the caller (a file uploaded while it is being written) ----
    def mpu_begin(self, key: str, metadata: dict) -> tuple[str, str]:
        """CreateMultipartUpload under the current key: (upload id, key fingerprint)."""
        k = self.ring.current
        resp = self._call("CreateMultipartUpload", key, self.client.create_multipart_upload,
                          Key=key, Metadata=self._meta(metadata, k), **k.sse_params())
        return resp["UploadId"], k.fingerprint

    def mpu_part(self, key: str, upload_id: str, number: int, body: bytes, key_fp: str) -> str:
        """UploadPart (the echo is checked); returns the part's ETag."""
        k = self.ring.by_fingerprint(key_fp) or self.ring.current
        return self._upload_part(key, upload_id, number, body, k)["ETag"]

    def mpu_complete(self, key: str, upload_id: str, parts: list[tuple[int, str]],
                     key_fp: str) -> ObjectInfo:
        k = self.ring.by_fingerprint(key_fp) or self.ring.current
        resp = self._call("CompleteMultipartUpload", key, self.client.complete_multipart_upload,
                          Key=key, UploadId=upload_id,
                          MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in parts]},
                          **k.sse_params())
        if resp.get("SSECustomerKeyMD5"):
            self._check_write_echo(resp, key, "CompleteMultipartUpload", k)
            self._remember(key, k.fingerprint)
            return self.head(key)
        return self._verify_by_head(key, k, "CompleteMultipartUpload")

    def mpu_abort(self, key: str, upload_id: str) -> None:
        """Best effort: the original error matters more than a failed abort."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception:  # noqa: BLE001
            log.warning("could not abort multipart upload of %r", key)

    def copy(self, src: str, dst: str, size: int, metadata: dict,
             src_key_fp: str | None, src_etag: str | None = None) -> ObjectInfo:
        """Server-side copy, decrypting with the source's key and encrypting with the current
        key (this is where old-key objects are re-encrypted). Objects over 5 GiB use
        UploadPartCopy, falling back to a streamed re-upload where the server refuses it."""
        sk = self.ring.by_fingerprint(src_key_fp) or self.ring.current
        dk = self.ring.current
        if size > COPY_MAX:
            return self._copy_multipart(src, dst, size, metadata, sk)
        cond = {"CopySourceIfMatch": f'"{src_etag}"'} if src_etag else {}
        meta = self._meta(metadata, dk)
        resp = self._raw_copy(src, dst, sk, dk, meta, src_etag)
        if resp is None:
            resp = self._call("CopyObject", dst, self.client.copy_object, Key=dst,
                              CopySource={"Bucket": self.bucket, "Key": src},
                              MetadataDirective="REPLACE", Metadata=meta,
                              **cond, **sk.copy_source_params(), **dk.sse_params())
        if resp.get("SSECustomerKeyMD5"):
            self._check_write_echo(resp, dst, "CopyObject", dk)
            self._remember(dst, dk.fingerprint)
            etag = str(resp.get("CopyObjectResult", {}).get("ETag", "")).strip('"')
            return ObjectInfo(key=dst, size=size, etag=etag, mtime=0.0, metadata=dict(metadata),
                              access=OPEN, key_fp=dk.fingerprint)
        return self._verify_by_head(dst, dk, "CopyObject")

    def copy_as_is(self, src: str, dst: str, size: int) -> ObjectInfo:
        """Copy keeping the metadata, assuming the source is under the current key (one
        request, no HEAD first). PermissionDenied if it is not; NotSupported above 5 GiB."""
        if size > COPY_MAX:
            raise NotSupported("copy_as_is: object over 5 GiB")
        k = self.ring.current
        hint = self._hint(src)
        if (hint and hint != k.fingerprint) or (len(self.ring) > 1 and hint is None):
            # with several keys, guessing wrong costs more than a HEAD (SeaweedFS answers a
            # copy with the wrong source key with 500, which is retried)
            raise PermissionDenied(f"{src!r}: key not known")
        try:
            resp = self._raw_copy(src, dst, k, k) or self.client.copy_object(
                Bucket=self.bucket, Key=dst, CopySource={"Bucket": self.bucket, "Key": src},
                MetadataDirective="COPY", **k.copy_source_params(), **k.sse_params())
        except botocore.exceptions.ClientError as e:
            if _code(e)[1] in (400, 403):
                raise PermissionDenied(f"CopyObject {src!r}: not under the current key") from None
            raise self._translate(e, "CopyObject", dst) from None
        except Exception as e:  # noqa: BLE001
            raise self._translate(e, "CopyObject", dst) from None
        if resp.get("SSECustomerKeyMD5"):
            self._check_write_echo(resp, dst, "CopyObject", k)
            self._remember(dst, k.fingerprint)
            etag = str(resp.get("CopyObjectResult", {}).get("ETag", "")).strip('"')
            return ObjectInfo(key=dst, size=size, etag=etag, mtime=0.0, access=OPEN,
                              key_fp=k.fingerprint)
        return self._verify_by_head(dst, k, "CopyObject")

    def _copy_multipart(self, src: str, dst: str, size: int, metadata: dict, sk: Key) -> ObjectInfo:
        ps = max(self.part_size_for(size), 512 * MiB)
        n = (size + ps - 1) // ps
        if not self._upc_unsupported:
            def part(i, up_id, k):
                lo, hi = i * ps, min(size, (i + 1) * ps) - 1
                resp = self._call("UploadPartCopy", dst, self.client.upload_part_copy, Key=dst,
                                  UploadId=up_id, PartNumber=i + 1,
                                  CopySource={"Bucket": self.bucket, "Key": src},
                                  CopySourceRange=f"bytes={lo}-{hi}",
                                  **sk.copy_source_params(), **k.sse_params())
                return {"PartNumber": i + 1, "ETag": resp["CopyPartResult"]["ETag"]}
            try:
                return self._multipart(dst, metadata, n, part)
            except NotSupported:
                self._upc_unsupported = True
                log.warning("server refuses UploadPartCopy with SSE-C; copying %r by streaming "
                            "it through this host (logged once)", src)
        src_fp = sk.fingerprint
        return self.upload(dst, size, lambda off, ln: self.get_range(src, off, ln, src_fp), metadata)

    def delete(self, key: str) -> None:
        # lean path: S3 answers 204 whether or not the key existed; anything else goes to
        # botocore (a DELETE is idempotent: it sends it again and reports errors properly)
        r = None
        if self.raw is not None and plain_key(key):
            try:
                r = self.raw.request("DeleteObject", "DELETE", key, {})
            except Exception as e:  # noqa: BLE001
                log.debug("raw DeleteObject %r: %s; using botocore", key, type(e).__name__)
        if r is None or r.status not in (200, 204):
            self._call("DeleteObject", key, self.client.delete_object, Key=key)
        self._remember(key, None)

    def delete_many(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            resp = self._call("DeleteObjects", batch[0], self.client.delete_objects,
                              Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            errs = resp.get("Errors") or []
            if errs:
                raise StoreError(f"DeleteObjects: {len(errs)} keys not deleted "
                                 f"(first {errs[0].get('Key')!r}: {errs[0].get('Code')})")
            for k in batch:
                self._remember(k, None)

    # -- listing ------------------------------------------------------------------------------
    def _raw_list(self, prefix: str, delimiter: str | None, max_keys: int,
                  token: str | None, start_after: str | None = None) -> dict | None:
        """ListObjectsV2 on the lean path (botocore's XML and date parsing cost ~0.1 ms per
        entry); None: use botocore (any answer but a 200 that parses)."""
        if self.raw is None:
            return None
        q = {"list-type": "2", "prefix": prefix, "max-keys": str(max_keys),
             "encoding-type": "url"}
        if delimiter:
            q["delimiter"] = delimiter
        if token:
            q["continuation-token"] = token
        if start_after:
            q["start-after"] = start_after
        try:
            r = self.raw.request("ListObjectsV2", "GET", "", {}, query=q)
            return parse_list_v2(r.body) if r.status == 200 else None
        except Exception as e:  # noqa: BLE001 - botocore retries and reports it
            log.debug("raw ListObjectsV2 %r: %s; using botocore", prefix, type(e).__name__)
            return None

    def list_page_iter(self, prefix: str, delimiter: str | None = "/", max_keys: int = 1000,
                       start_after: str | None = None):
        """Pages of ListObjectsV2 (keys after start_after only, if given)."""
        kw = {"Prefix": prefix, "MaxKeys": max_keys}
        if delimiter:
            kw["Delimiter"] = delimiter
        if start_after:
            kw["StartAfter"] = start_after
        token = None
        while True:
            if token:
                kw["ContinuationToken"] = token
            resp = self._raw_list(prefix, delimiter, max_keys, token, start_after)
            if resp is None:
                resp = self._call("ListObjectsV2", prefix, self.client.list_objects_v2, **kw)
            objs = [ListedObject(key=o["Key"], size=int(o.get("Size", 0)),
                                 etag=str(o.get("ETag", "")).strip('"'),
                                 mtime=o["LastModified"].timestamp() if o.get("LastModified") else 0.0)
                    for o in resp.get("Contents") or []]
            prefixes = [p["Prefix"] for p in resp.get("CommonPrefixes") or []]
            yield ListPage(objs, prefixes)
            if max_keys < 1000 or not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")
            if not token:
                return

    # -- mount-time checks --------------------------------------------------------------------
    def check_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as e:
            code, status = _code(e)
            if status == 404:
                raise UserError(f"bucket {self.bucket!r} does not exist at "
                                f"{self.endpoint_url or 'AWS'}", EXIT_STORE) from None
            if status == 403:
                raise UserError(f"credentials refused for bucket {self.bucket!r} ({code or status})",
                                EXIT_STORE) from None
            raise UserError(f"bucket {self.bucket!r}: {code or status}", EXIT_STORE) from None
        except botocore.exceptions.NoCredentialsError:
            raise UserError("no AWS credentials found (environment, profile or config files)",
                            EXIT_STORE) from None
        except (botocore.exceptions.EndpointConnectionError,
                botocore.exceptions.ConnectTimeoutError) as e:
            raise UserError(f"endpoint {self.endpoint_url or 'AWS'} unreachable "
                            f"({type(e).__name__})", EXIT_STORE) from None
        except botocore.exceptions.SSLError:
            raise UserError(f"TLS verification failed for {self.endpoint_url or 'AWS'} "
                            "(use --ca-bundle for a private CA)", EXIT_STORE) from None
        except botocore.exceptions.BotoCoreError as e:
            raise UserError(f"endpoint {self.endpoint_url or 'AWS'}: {type(e).__name__}",
                            EXIT_STORE) from None

    def probe_sse(self, probe_key: str) -> None:
        """Prove the endpoint enforces SSE-C: write a probe with the key, then a GET without
        the key must be refused. Removes the probe afterwards."""
        k = self.ring.current
        try:
            self.put(probe_key, PROBE_DATA, {})
        except EncryptionNotApplied:
            raise UserError(f"endpoint {self.endpoint_url or 'AWS'} does not apply SSE-C "
                            "(no key echo on PUT): refusing to mount", EXIT_SECURITY) from None
        except PermissionDenied as e:
            if self.ssec_blocked():
                raise UserError(f"bucket {self.bucket!r}: {SSEC_BLOCKED_HINT}", EXIT_STORE) from None
            raise UserError(f"cannot write to bucket {self.bucket!r}: {e}", EXIT_STORE) from None
        except (StoreError, StoreUnavailable) as e:
            raise UserError(f"cannot write to bucket {self.bucket!r}: {e}", EXIT_STORE) from None
        try:
            try:
                served = self.client.get_object(Bucket=self.bucket, Key=probe_key)["Body"].read()
            except botocore.exceptions.ClientError:
                served = None
            if served == PROBE_DATA:
                raise UserError(f"endpoint {self.endpoint_url or 'AWS'} serves SSE-C objects "
                                "without the key: refusing to mount", EXIT_SECURITY)
            if served is not None:
                # Served, but not the plaintext (the stored, encrypted bytes): no secret is
                # revealed, so mount, and say so. SeaweedFS once answered this GET, sent right
                # after the PUT, with 200 (what it sent was not recorded).
                log.warning("endpoint %s answered a GET without the key with %d stored bytes "
                            "of an SSE-C object (not its plaintext)",
                            self.endpoint_url or "AWS", len(served))
            got = self.get_range(probe_key, 0, len(PROBE_DATA), k.fingerprint)
            if got != PROBE_DATA:
                raise UserError("SSE-C probe read back wrong data: refusing to mount", EXIT_SECURITY)
        finally:
            try:
                self.delete(probe_key)
            except Exception:  # noqa: BLE001
                log.warning("could not delete probe object %r", probe_key)

    # -- diagnostics (ssecfs check, rekey) ------------------------------------------------------
    def ssec_blocked(self) -> bool:
        """True if the bucket's default encryption blocks SSE-C writes (AWS, since April 2026
        the default for new buckets: such writes get 403 AccessDenied)."""
        try:
            resp = self.client.get_bucket_encryption(Bucket=self.bucket)
        except Exception:  # noqa: BLE001 - not allowed to read it, or not supported
            return False
        for rule in resp.get("ServerSideEncryptionConfiguration", {}).get("Rules", []):
            blocked = (rule.get("BlockedEncryptionTypes") or {}).get("EncryptionType") or []
            if "SSE-C" in blocked:
                return True
        return False

    def head_with(self, key: str, k: Key | None) -> tuple[str, ObjectInfo | None]:
        """HEAD with one given key (None: no SSE-C headers). Returns (verdict, info):
        verdict is 'open', 'denied' (403), 'bad-request' (400) or 'plaintext'."""
        kw = k.sse_params() if k else {}
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=key, **kw)
        except botocore.exceptions.ClientError as e:
            code, status = _code(e)
            if status == 403:
                return "denied", None
            if status == 400:
                return "bad-request", None
            raise self._translate(e, "HeadObject", key) from None
        except Exception as e:  # noqa: BLE001
            raise self._translate(e, "HeadObject", key) from None
        echo = _echo_fps(resp.get("SSECustomerKeyMD5"))
        if k and echo == {k.fingerprint}:
            return "open", self._info(key, resp, OPEN, k.fingerprint)
        return "plaintext", self._info(key, resp, PLAINTEXT, None)

    def get_status(self, key: str, k: Key | None) -> int:
        """HTTP status of a GET of `key` with key k (None: without SSE-C headers)."""
        kw = k.sse_params() if k else {}
        try:
            self.client.get_object(Bucket=self.bucket, Key=key, **kw)["Body"].read()
            return 200
        except botocore.exceptions.ClientError as e:
            return _code(e)[1]

    def server_time_skew(self) -> float | None:
        """Seconds the server's clock is ahead of ours (from the Date header), or None."""
        import time as _time
        try:
            t0 = _time.time()
            resp = self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
            t1 = _time.time()
        except Exception:  # noqa: BLE001
            return None
        server = _http_date(resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date"))
        return None if server is None else server - (t0 + t1) / 2
