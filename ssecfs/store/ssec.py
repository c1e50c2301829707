"""SSE-C on every request: which key of the ring a request carries, its headers, and the proof
in each answer that the server applied it.

Key choice: an object is asked with the key that opened it last (a hint per object key),
else the ring's current key; writes always use the current key, and its fingerprint goes in
the object's metadata (KEY_FP_META). A write must echo AES256 and our key MD5; answers that
carry no echo (CopyObject and CompleteMultipartUpload on some servers) are verified with a
HEAD under the written key (verify_by_head): only an echo of our key MD5 proves the
encryption.

Lock order: _hint_lock is a leaf lock (guards _key_hint only).
"""

from __future__ import annotations

import logging
import threading

from cachetools import LRUCache

from ..crypto.keys import Key, KeyRing
from ..errors import EncryptionNotApplied, NotSupported
from .client import Answer
from .contract import OPEN, ObjectInfo
from .s3requests import Requests, info_of

log = logging.getLogger("ssecfs.store")

KEY_FP_META = "ssecfs-key"
ECHO_MD5 = "x-amz-server-side-encryption-customer-key-md5"
ECHO_ALG = "x-amz-server-side-encryption-customer-algorithm"


def echo_fps(value: str | None) -> set[str]:
    # Some servers send the header twice (SeaweedFS: "md5, md5" once joined).
    return {v.strip() for v in value.split(",") if v.strip()} if value else set()


def header_safe(text: str) -> bool:
    """Sendable as an HTTP header as it is: printable ASCII, no surrounding blanks."""
    return text.isascii() and text.isprintable() and text == text.strip()


def meta_headers(meta: dict, op: str, key: str) -> dict:
    """x-amz-meta-* headers of meta; NotSupported for a name or value no header can carry."""
    for name, value in meta.items():
        if not header_safe(name) or not header_safe(value):
            raise NotSupported(f"{op} {key!r}: metadata {name!r} is not printable ASCII")
    return {f"x-amz-meta-{a}": b for a, b in meta.items()}


class SseC:
    """The key of the ring each request carries, and the checks of what the server did."""

    def __init__(self, ring: KeyRing, requests: Requests, endpoint: str | None):
        self.ring = ring
        self.requests = requests
        self.at = endpoint or "AWS"          # for the log
        self._key_hint: LRUCache = LRUCache(maxsize=100_000)
        # Key -> (fingerprint, SSE-C headers), each an MD5 and base64 to make: made once per key
        self._memo: dict = {}
        self._hint_lock = threading.Lock()

    # -- headers --------------------------------------------------------------------------------
    def _memo_of(self, k: Key) -> tuple[str, dict]:
        m = self._memo.get(k)
        if m is None:
            m = self._memo[k] = (k.fingerprint, k.sse_headers())
        return m

    def fp(self, k: Key) -> str:
        return self._memo_of(k)[0]

    def headers(self, k: Key) -> dict:
        """k's SSE-C headers (a fresh dict the caller may add to)."""
        return dict(self._memo_of(k)[1])

    def copy_source_headers(self, k: Key) -> dict:
        return {"x-amz-copy-source-" + n[len("x-amz-"):]: v for n, v in self._memo_of(k)[1].items()}

    def meta(self, metadata: dict, k: Key) -> dict:
        """The metadata an object written under k carries: the caller's, and k's fingerprint."""
        return {**{str(a): str(b) for a, b in metadata.items()}, KEY_FP_META: self.fp(k)}

    # -- key choice -----------------------------------------------------------------------------
    def by_fp(self, fp: str | None) -> Key:
        """The ring's key of that fingerprint, else the current one."""
        return self.ring.by_fingerprint(fp) or self.ring.current

    def hinted(self, key: str) -> Key:
        """The key that opened this object last, else the current one."""
        return self.by_fp(self.hint(key))

    def hint(self, key: str) -> str | None:
        with self._hint_lock:
            return self._key_hint.get(key)

    def remember(self, key: str, fp: str | None) -> None:
        with self._hint_lock:
            if fp:
                self._key_hint[key] = fp
            else:
                self._key_hint.pop(key, None)

    # -- echo checks ----------------------------------------------------------------------------
    def opened_by(self, a: Answer, k: Key) -> bool:
        """Whether the answer echoes k's MD5, and only it."""
        return echo_fps(a.headers.get(ECHO_MD5)) == {self.fp(k)}

    @staticmethod
    def echoed(a: Answer) -> bool:
        """Whether the answer says anything of SSE-C at all."""
        return bool(echo_fps(a.headers.get(ECHO_MD5)))

    def check_write_echo(self, a: Answer, key: str, op: str, want: Key) -> None:
        alg = echo_fps(a.headers.get(ECHO_ALG))
        if not self.opened_by(a, want) or alg != {"AES256"}:
            log.error("endpoint %s did not confirm SSE-C with our key on %s of %r; "
                      "treating the write as failed", self.at, op, key)
            raise EncryptionNotApplied(f"{op} {key!r}: server did not apply SSE-C")

    def verify_by_head(self, key: str, want: Key, op: str) -> ObjectInfo:
        """For answers that carry no echo (CopyObject, CompleteMultipartUpload on some
        servers): HEAD with the key; only an echo of our key MD5 proves the encryption."""
        a = self.requests.send("HeadObject", "HEAD", key, headers=self.headers(want))
        return self.verified(a, key, want, op)

    def verified(self, a: Answer, key: str, want: Key, op: str) -> ObjectInfo:
        """key's object, after op, from the answer `a` of a HEAD of it with want: only an
        echo of want's MD5 proves the encryption."""
        if not self.opened_by(a, want):
            log.error("endpoint %s stored %r without SSE-C after %s", self.at, key, op)
            raise EncryptionNotApplied(f"{op} {key!r}: server did not apply SSE-C")
        self.remember(key, self.fp(want))
        return info_of(key, a, OPEN, self.fp(want))
