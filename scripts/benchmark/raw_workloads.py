"""The workloads done by a raw S3 client, without a filesystem (the columns "raw boto3" and
"raw awscrt"). They are written once here; a client (raw_boto3.Boto3Raw,
raw_awscrt.CrtRaw) supplies the requests:

    upload(key, fileobj, size)    the big file, multipart in 8 MiB parts, SSE-C
    download(key, sink)           the big file, parallel ranged GETs of 8 MiB, SSE-C
    put(key, data) / get(key)     one small object, SSE-C
    keys(prefix)                  ListObjectsV2, every page
    delete_keys(keys)             DeleteObjects, 1,000 keys a request
    copy_all(pairs)               CopyObject (SSE-C source and destination), 10 at a time
    delete(key)                   DeleteObject
"""

from __future__ import annotations

import io
import time

from .common import DIR_FILES, MB, BenchError
from .poller import VerifySink

BUCKET_OF = {"raw boto3": "bench-boto3", "raw awscrt": "bench-awscrt"}


class RawWorkloads:
    """One method per step, each returning ({row: value}, details). `b` is the run."""

    column = "?"

    def __init__(self, bench):
        self.b = bench
        self.bucket = BUCKET_OF[self.column]
        self.have: set[str] = set()

    def run(self, step: str, run_no: int):
        return getattr(self, step)(run_no)

    # -- preparation (untimed) ----------------------------------------------------------------
    def ensure_big(self, run_no: int) -> str:
        key = f"big-{run_no}.bin"
        if key not in self.have:
            with open(self.b.src_big, "rb") as f:
                self.upload(key, f, self.b.size)
            self.have.add(key)
        return key

    def ensure_small(self, run_no: int) -> str:
        d = f"small-{run_no}"
        if d not in self.have:
            self.put_files(d, self.b.small_data(run_no))
            self.have.add(d)
        return d

    def put_files(self, d: str, data: list[bytes]) -> None:
        for i, blob in enumerate(data):
            self.put(f"{d}/f{i:05d}", blob)

    # -- big file -----------------------------------------------------------------------------
    def write(self, run_no: int):
        b, key = self.b, f"big-{run_no}.bin"

        def upload():
            with open(b.src_big, "rb") as f:
                self.upload(key, f, b.size)
        out = b.timed_write(self.bucket, key, upload)
        self.have.add(key)
        return out

    def read_cold(self, run_no: int):
        b = self.b
        key = self.ensure_big(run_no)
        b.drop_caches()
        b.warm(b.src_big)
        sink = VerifySink(b.big_mm)
        t0 = time.monotonic()
        self.download(key, sink)
        dt = time.monotonic() - t0
        if sink.bad or sink.total != b.size:
            raise BenchError(f"download: {sink.bad or f'{sink.total} bytes'}")
        return {"read_cold": b.size / MB / dt}, {"seconds": dt}

    # -- small files --------------------------------------------------------------------------
    def small_create(self, run_no: int):
        b, d = self.b, f"small-{run_no}"
        t0 = time.monotonic()
        self.put_files(d, b.small_data(run_no))
        t1 = time.monotonic()
        t_dur = b.poller.wait_listing(self.bucket, d + "/", b.small_expect(d), b.timeout_small)
        self.have.add(d)
        return {"small_create": b.n / (t_dur - t0)}, {"returned_s": t1 - t0}

    def ls_cold(self, run_no: int):
        b = self.b
        d = self.ensure_small(run_no)
        b.drop_caches()
        t0 = time.monotonic()
        n = len(self.keys(d + "/"))
        dt = time.monotonic() - t0
        if n != b.n:
            raise BenchError(f"listing returned {n} objects, expected {b.n}")
        return {"ls_cold": dt}, {"seconds": dt}

    def small_read(self, run_no: int):
        b = self.b
        d = self.ensure_small(run_no)
        b.drop_caches()
        t0 = time.monotonic()
        for i, blob in enumerate(b.small_data(run_no)):
            if self.get(f"{d}/f{i:05d}") != blob:
                raise BenchError(f"{d}/f{i:05d}: wrong data")
        dt = time.monotonic() - t0
        return {"small_read": b.n / dt}, {"seconds": dt}

    def small_delete(self, run_no: int):
        b = self.b
        d = self.ensure_small(run_no)
        t0 = time.monotonic()
        self.delete_keys(self.keys(d + "/"))
        t1 = time.monotonic()
        self.have.discard(d)
        t_gone = b.poller.wait_listing(self.bucket, d + "/", {}, b.timeout_small,
                                       gone_prefix=d + "/")
        return {"small_delete": b.n / (t_gone - t0)}, {"returned_s": t1 - t0}

    # -- renames: copy, then delete -----------------------------------------------------------
    def mv_file(self, run_no: int):
        b = self.b
        src, dst = f"mv-{run_no}.bin", f"mv-{run_no}-moved.bin"
        self.upload(src, io.BytesIO(b.big_mm[:b.mv_size]), b.mv_size)
        t0 = time.monotonic()
        self.copy_all([(src, dst)])
        self.delete(src)
        t1 = time.monotonic()
        t_dur = b.poller.wait_object(self.bucket, dst, b.mv_size, b.timeout_big, gone=src)
        return {"mv_file": t_dur - t0}, {"returned_s": t1 - t0}

    def mv_dir(self, run_no: int):
        b = self.b
        d, nd = f"dir-{run_no}", f"dir-{run_no}-moved"
        self.put_files(d, b.dir_data(run_no))
        t0 = time.monotonic()
        keys = self.keys(d + "/")
        self.copy_all([(k, nd + k[len(d):]) for k in keys])
        self.delete_keys(keys)
        t1 = time.monotonic()
        t_dur = b.poller.wait_listing(self.bucket, nd + "/", b.small_expect(nd, DIR_FILES),
                                      b.timeout_small, gone_prefix=d + "/")
        return {"mv_dir": t_dur - t0}, {"returned_s": t1 - t0}

    # -- the requests (a client supplies them) ------------------------------------------------
    def upload(self, key: str, fileobj, size: int) -> None: ...
    def download(self, key: str, sink: VerifySink) -> None: ...
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def keys(self, prefix: str) -> list[str]: ...
    def delete_keys(self, keys: list[str]) -> None: ...
    def copy_all(self, pairs: list[tuple[str, str]]) -> None: ...
    def delete(self, key: str) -> None: ...
    def cleanup(self) -> None: ...
