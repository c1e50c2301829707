"""The mount-time checks and diagnostics of a bucket (mount, `ssecfs check`, rekey): that it
exists and the credentials may list it (check_bucket), that the endpoint enforces SSE-C
(probe_sse), whether the bucket blocks SSE-C writes, and what one key or none gets.
Failures that stop a mount are UserErrors whose class gives the exit code of the command."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from . import s3xml
from ..crypto.keys import Key
from ..errors import (EncryptionNotApplied, PermissionDenied, SecurityRefusal, StoreError,
                      StoreSetupError, StoreUnavailable)
from .client import Client, TransportFailure
from .contract import OPEN, PLAINTEXT, ObjectInfo
from .s3requests import BUSY_CODES, SSEC_BLOCKED_HINT, http_date, info_of

if TYPE_CHECKING:
    from .s3 import S3Store

log = logging.getLogger("ssecfs.store")

PROBE_DATA = b"ssecfs probe\n"   # probe_sse writes it with the key, must not read it without


class Probe:
    """Checks of the bucket of `store`, through its requests and its contract methods."""

    def __init__(self, store: S3Store):
        self.store = store
        self.at = store.endpoint_url or "AWS"

    def check_bucket(self) -> None:
        """The bucket exists and the credentials may list it (ListObjectsV2, one key: unlike
        HeadBucket its refusal says why in an error code). The first attempt is not retried
        when no answer comes (refused, unresolvable, TLS verification failed: retrying those
        only delays the one line the user needs); a 5xx or throttling answer is."""
        s = self.store
        q = {"list-type": "2", "max-keys": "1"}
        once = Client(s.transport, s.bucket, max_attempts=1, connections=1)
        try:
            a = once.send("ListObjectsV2", "GET", None, query=q)
            if a.status >= 500 or s3xml.error_code(a.body)[0] in BUSY_CODES:
                a = s.wire.send("ListObjectsV2", "GET", None, query=q)
        except TransportFailure as e:
            raise self._unreachable(e) from None
        finally:
            once.close()
        if a.ok:
            return
        code = s3xml.error_code(a.body)[0]
        if a.status == 404 or code == "NoSuchBucket":
            raise StoreSetupError(f"bucket {s.bucket!r} does not exist at {self.at}")
        if a.status == 403:
            raise StoreSetupError(f"credentials refused for bucket {s.bucket!r} ({code or 403})")
        raise StoreSetupError(f"bucket {s.bucket!r}: {code or a.status}")

    def _unreachable(self, e: TransportFailure) -> StoreSetupError:
        if e.no_credentials:
            return StoreSetupError("no AWS credentials found (environment, profile or config files)")
        if e.credentials:
            return StoreSetupError(f"AWS credentials could not be obtained ({e.name}; see the log)")
        if e.tls:
            return StoreSetupError(f"TLS verification failed for {self.store.transport.url} "
                             f"({e.name}); use --ca-bundle for a private CA")
        return StoreSetupError(f"endpoint {self.at} unreachable ({e.name})")

    def probe_sse(self, probe_key: str) -> None:
        """Prove the endpoint enforces SSE-C: write a probe with the key, then a GET without
        the key must be refused. Removes the probe afterwards."""
        s = self.store
        try:
            s.put(probe_key, PROBE_DATA, {})
        except EncryptionNotApplied:
            raise SecurityRefusal(f"endpoint {self.at} does not apply SSE-C "
                            "(no key echo on PUT): refusing to mount") from None
        except PermissionDenied as e:
            if self.ssec_blocked():
                raise StoreSetupError(f"bucket {s.bucket!r}: {SSEC_BLOCKED_HINT}") from None
            raise StoreSetupError(f"cannot write to bucket {s.bucket!r}: {e}") from None
        except (StoreError, StoreUnavailable) as e:
            raise StoreSetupError(f"cannot write to bucket {s.bucket!r}: {e}") from None
        try:
            self._read_back(probe_key)
        finally:
            try:
                s.delete(probe_key)
            except Exception:  # noqa: BLE001
                log.warning("could not delete probe object %r", probe_key)

    def _read_back(self, probe_key: str) -> None:
        """The probe: refused without the key (or served encrypted), its data with it."""
        s = self.store
        a = s.requests.try_("GetObject", "GET", probe_key)
        served = bytes(a.body) if a.ok else None
        if served == PROBE_DATA:
            raise SecurityRefusal(f"endpoint {self.at} serves SSE-C objects "
                            "without the key: refusing to mount")
        if served is not None:
            # Served, but not the plaintext (the stored, encrypted bytes): no secret is
            # revealed, so mount, and say so.
            log.warning("endpoint %s answered a GET without the key with %d stored bytes "
                        "of an SSE-C object (not its plaintext)", self.at, len(served))
        got = s.get_range(probe_key, 0, len(PROBE_DATA), s.sse.fp(s.ring.current))
        if got != PROBE_DATA:
            raise SecurityRefusal("SSE-C probe read back wrong data: refusing to mount")

    # -- diagnostics (ssecfs check, rekey) ------------------------------------------------------
    def ssec_blocked(self) -> bool:
        """True if the bucket's default encryption blocks SSE-C writes (on AWS the default
        for new buckets: such writes get 403 AccessDenied)."""
        try:
            a = self.store.wire.send("GetBucketEncryption", "GET", None,
                                     query={"encryption": None})
        except TransportFailure:
            return False
        return a.ok and s3xml.blocks_ssec(a.body)

    def head_with(self, key: str, k: Key | None) -> tuple[str, ObjectInfo | None]:
        """HEAD with one given key (None: no SSE-C headers). Returns (verdict, info):
        verdict is 'open', 'denied' (403), 'bad-request' (400) or 'plaintext'."""
        s = self.store
        a = s.head_answer(key, k)
        if a.status == 403:
            return "denied", None
        if a.status == 400:
            return "bad-request", None
        if not a.ok:
            raise s.requests.status_error(a, "HeadObject", key)
        if k and s.sse.opened_by(a, k):
            return "open", info_of(key, a, OPEN, s.sse.fp(k))
        return "plaintext", info_of(key, a, PLAINTEXT, None)

    def get_status(self, key: str, k: Key | None) -> int:
        """HTTP status of a GET of `key` with key k (None: without SSE-C headers)."""
        s = self.store
        return s.requests.try_("GetObject", "GET", key,
                               headers=s.sse.headers(k) if k else None).status

    def server_time_skew(self) -> float | None:
        """Seconds the server's clock is ahead of ours (from the Date header), or None."""
        t0 = time.time()
        try:
            a = self.store.wire.send("ListObjectsV2", "GET", None,
                                     query={"list-type": "2", "max-keys": "1"})
        except TransportFailure:
            return None
        t1 = time.time()
        server = http_date(a.headers.get("date"))
        return None if server is None else server - (t0 + t1) / 2
