"""S3 requests and what their answers mean: the store's one way to send a request (Requests,
over client.Client), the translation of failures and error answers to domain errors, and the
ObjectInfo an answer's headers describe.

Errors are translated from the S3 error code in the answer's body where S3 puts one (a HEAD
has no body: by status); throttling, 5xx and connection failures have been retried by the
client and surface as StoreUnavailable.
"""

from __future__ import annotations

import calendar
import email.utils

from . import s3xml
from ..errors import NotFound, NotSupported, PermissionDenied, Stale, StoreError, StoreUnavailable
from .client import Answer, Client, TransportFailure
from .contract import ObjectInfo

SSEC_BLOCKED_HINT = ("the bucket blocks SSE-C writes: the bucket owner must allow SSE-C in the "
                     "bucket's default encryption settings (remove SSE-C from its blocked "
                     "encryption types)")
# 403s that are about the request's credentials or signature, not about the object's key
AUTH_CODES = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "ExpiredToken", "InvalidToken",
              "TokenRefreshRequired", "AuthorizationHeaderMalformed", "RequestTimeTooSkewed",
              "InvalidSecurity", "MissingSecurityHeader"}
BUSY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
              "RequestLimitExceeded", "ServiceUnavailable", "InternalError"}

_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}


def http_date(value: str | None) -> float | None:
    """An HTTP date header as epoch seconds (None if absent or unreadable). Two of them in
    every answer: the usual form ("Sun, 06 Nov 1994 08:49:37 GMT") is read directly (the
    email package is much slower), anything else by the email package."""
    if not value:
        return None
    p = value.split()
    if len(p) == 6 and p[5] == "GMT" and p[2] in _MONTHS:
        try:
            hh, mm, ss = p[4].split(":")
            return float(calendar.timegm((int(p[3]), _MONTHS[p[2]], int(p[1]),
                                          int(hh), int(mm), int(ss))))
        except ValueError:
            pass
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def info_of(key: str, a: Answer, access: str, fp: str | None) -> ObjectInfo:
    """The ObjectInfo a HEAD (or GET) answer's headers describe."""
    h = a.headers
    return ObjectInfo(key=key, size=int(h.get("content-length", 0) or 0),
                      etag=h.get("etag", "").strip('"'),
                      mtime=http_date(h.get("last-modified")) or 0.0,
                      metadata={n[len("x-amz-meta-"):]: v for n, v in h.items()
                                if n.startswith("x-amz-meta-")},
                      access=access, key_fp=fp, observed=http_date(h.get("date")))


def mentions_ssec_block(message: str) -> bool:
    msg = message.lower()
    return "encryption" in msg and ("sse-c" in msg or "customer" in msg or "blocked" in msg)


class Requests:
    """Requests to one bucket through `wire`, their failures as domain errors."""

    def __init__(self, wire: Client, bucket: str):
        self.wire = wire
        self.bucket = bucket

    @staticmethod
    def failure(e: TransportFailure, op: str, key: str) -> Exception:
        where = f"{op} {key!r}"
        if e.no_credentials:
            return StoreError(f"{where}: no AWS credentials found")
        if e.credentials:
            return StoreError(f"{where}: AWS credentials unavailable ({e.name})")
        if e.tls:
            return StoreUnavailable(f"{where}: TLS failed ({e.name})")
        if e.code == "RequestTimeTooSkewed":
            return StoreError(f"{where}: RequestTimeTooSkewed (this host's clock is off)")
        if e.code:
            return StoreUnavailable(f"{where}: {e.code} (retried)")
        return StoreUnavailable(f"{where}: {e.name}")

    def status_error(self, a: Answer, op: str, key: str) -> Exception:
        where = f"{op} {key!r}"
        code, message = s3xml.error_code(a.body)
        st = a.status
        if code in AUTH_CODES:
            return StoreError(f"{where}: credentials refused ({code})")
        if code == "NoSuchBucket":
            return StoreError(f"{where}: bucket {self.bucket!r} does not exist")
        if st == 404 or code in ("NoSuchKey", "NotFound"):
            return NotFound(where)
        if st == 412 or code == "PreconditionFailed":
            return Stale(f"{where}: object changed while reading")
        if st == 403 and mentions_ssec_block(message):
            return PermissionDenied(f"{where}: {SSEC_BLOCKED_HINT}")
        if st == 403:
            return PermissionDenied(f"{where}: access denied ({code or st})")
        if st == 501 or code == "NotImplemented":
            return NotSupported(f"{where}: not implemented by the server")
        if st >= 500 or code in BUSY_CODES:
            return StoreUnavailable(f"{where}: {code or st}")
        return StoreError(f"{where}: {code or st}")

    def try_(self, op: str, method: str, key: str | None, **kw) -> Answer:
        """A request whose every HTTP answer the caller looks at itself."""
        try:
            return self.wire.send(op, method, key, **kw)
        except TransportFailure as e:
            raise self.failure(e, op, key or "") from None

    def send(self, op: str, method: str, key: str | None, **kw) -> Answer:
        """A request that must succeed (2xx), else its translated error."""
        a = self.try_(op, method, key, **kw)
        if not a.ok:
            raise self.status_error(a, op, key or "")
        return a
