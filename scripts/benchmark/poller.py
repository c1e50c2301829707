"""The independent observer of the bucket that decides when something is durable, and the
checking sink raw downloads are read into.

The poller has its own boto3 client and talks to SeaweedFS directly, never through the delay
proxy of --rtt: it stands for "the bucket", and what it sees is what is stored there."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import botocore.exceptions
from botocore.config import Config

from .common import BenchError, echoed, sse_params

POLL = 0.05             # seconds between HEADs of the durability poller, at most
LIST_POLL = 0.1         # seconds between listings of the durability poller, at most
POLL_SHARE = 0.03       # ... and at most this share of the time waited so far (a fixed
                        # interval would add up to itself to a row of 0.2 s)
POLL_MIN = 0.005


def pause(start: float, cap: float) -> None:
    time.sleep(min(cap, max(POLL_MIN, (time.monotonic() - start) * POLL_SHARE)))
SETTLE = 1.0            # the ETag(s) must stay the same this long


def status_of(e: Exception) -> int:
    if isinstance(e, botocore.exceptions.ClientError):
        return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    return 0


class Stable:
    """The first moment a condition held with the same snapshot for SETTLE seconds."""

    def __init__(self):
        self.cand = None

    def seen(self, now: float, ok: bool, snapshot) -> float | None:
        if not ok:
            self.cand = None
        elif self.cand is None or self.cand[1] != snapshot:
            self.cand = (now, snapshot)
        elif now - self.cand[0] >= SETTLE:
            return self.cand[0]
        return None


class Poller:
    """HEADs with the SSE-C key and listings, on a client of its own."""

    def __init__(self, sw, raw_key: bytes):
        self.s3 = sw.client(Config(retries={"mode": "standard", "max_attempts": 3},
                                   max_pool_connections=32, connect_timeout=5, read_timeout=30))
        self.sse = sse_params(raw_key)
        self.md5 = self.sse["SSECustomerKeyMD5"]

    def head(self, bucket: str, key: str):
        """None if absent; ('unreadable', status) if present but not with our key;
        else (size, etag, sse_c_confirmed)."""
        try:
            r = self.s3.head_object(Bucket=bucket, Key=key, **self.sse)
        except botocore.exceptions.ClientError as e:
            st = status_of(e)
            if st == 404:
                return None
            if st in (400, 403):
                return ("unreadable", st)
            raise
        return (int(r["ContentLength"]), r.get("ETag", ""),
                echoed(r.get("SSECustomerKeyMD5")) == {self.md5})

    def wait_object(self, bucket: str, key: str, size: int, timeout: float,
                    gone: str | None = None) -> float:
        """Monotonic time at which the complete object was first seen (then stable SETTLE s);
        with `gone`, that key must be absent too."""
        start = time.monotonic()
        deadline = start + timeout
        stable = Stable()
        while True:
            h = self.head(bucket, key)
            gone_ok = gone is None or self.head(bucket, gone) is None
            now = time.monotonic()
            complete = isinstance(h, tuple) and h[0] == size and gone_ok
            if complete and not h[2]:
                raise BenchError(f"s3://{bucket}/{key} is stored without SSE-C (HEAD with the "
                                 "key: no key MD5 echo)")
            t = stable.seen(now, complete, h[1] if complete else None)
            if t is not None:
                return t
            if now > deadline:
                last = (h, "old key still there" if not gone_ok else "")
                raise BenchError(f"s3://{bucket}/{key} not durable after {timeout:.0f}s "
                                 f"(last HEAD: {last})")
            pause(start, POLL)

    def listing(self, bucket: str, prefix: str, max_keys: int | None = None) -> dict:
        """key -> (size, etag) under a prefix (the first page only with max_keys)."""
        out = {}
        kw = {"Bucket": bucket, "Prefix": prefix}
        if max_keys:
            kw["MaxKeys"] = max_keys
        while True:
            r = self.s3.list_objects_v2(**kw)
            for o in r.get("Contents", []):
                out[o["Key"]] = (int(o["Size"]), o.get("ETag", ""))
            if max_keys or not r.get("IsTruncated"):
                return out
            kw["ContinuationToken"] = r["NextContinuationToken"]

    def wait_listing(self, bucket: str, prefix: str, expect: dict, timeout: float,
                     gone_prefix: str | None = None) -> float:
        """Monotonic time at which every expected key had its size (ETags then stable SETTLE
        s); with `gone_prefix`, no key may be left under that prefix."""
        start = time.monotonic()
        deadline = start + timeout
        stable = Stable()
        while True:
            cur = self.listing(bucket, prefix)
            gone_ok = gone_prefix is None or not self.listing(bucket, gone_prefix, max_keys=1)
            now = time.monotonic()
            missing = [k for k, sz in expect.items() if cur.get(k, (None,))[0] != sz]
            ok = not missing and gone_ok
            t = stable.seen(now, ok, tuple(cur[k][1] for k in sorted(expect)) if ok else None)
            if t is not None:
                return t
            if now > deadline:
                raise BenchError(f"s3://{bucket}/{prefix}: {len(missing)} of {len(expect)} "
                                 f"objects not durable after {timeout:.0f}s"
                                 + ("" if gone_ok else f"; keys still under {gone_prefix}"))
            pause(start, LIST_POLL)

    def verify_sse(self, bucket: str, keys) -> None:
        keys = list(keys)
        with ThreadPoolExecutor(16) as ex:
            res = list(ex.map(lambda k: self.head(bucket, k), keys))
        bad = [k for k, h in zip(keys, res) if not (isinstance(h, tuple) and h[2] is True)]
        if bad:
            raise BenchError(f"{len(bad)} object(s) not readable with the SSE-C key / not "
                             f"SSE-C, e.g. s3://{bucket}/{bad[0]}: {res[keys.index(bad[0])]}")


class VerifySink:
    """A /dev/null-like seekable sink that checks what it is given against the source.
    write() for boto3's download_fileobj; at() for a body that arrives with offsets."""

    def __init__(self, expect_mm):
        self.mm = expect_mm
        self.pos = 0
        self.total = 0
        self.bad: str | None = None

    def at(self, data, offset: int) -> None:
        if self.mm is not None and self.mm[offset:offset + len(data)] != data:
            self.bad = self.bad or f"wrong data at {offset}"
        self.total += len(data)

    def write(self, data) -> int:
        self.at(bytes(data), self.pos)
        self.pos += len(data)
        return len(data)

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def flush(self) -> None:
        pass
