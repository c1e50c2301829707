"""`ssecfs rekey`: re-encrypt every object not yet under the ring's current key, server side.

Each object is copied onto itself (CopyObject, or UploadPartCopy / streamed re-upload above
5 GiB): source = the old key that opens it, destination = the current key. The copy is
conditional on the ETag seen at HEAD time (CopySourceIfMatch), so an object rewritten by a
mount meanwhile is not overwritten with its older content (it fails and is retried on the
next run; a mount with the same ring already writes under the current key).

Idempotent and resumable: objects already under the current key are skipped. Never deletes.
Objects that no key of the ring opens, and plaintext objects, are reported and left alone.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from tqdm import tqdm

from ..errors import SsecfsError
from ..store.contract import LOCKED, PLAINTEXT

log = logging.getLogger("ssecfs.rekey")


@dataclass
class RekeyReport:
    total: int = 0
    bytes_total: int = 0
    already_current: int = 0
    rekeyed: int = 0
    bytes_rekeyed: int = 0
    would_rekey: int = 0
    unopenable: list[str] = field(default_factory=list)
    plaintext: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.unopenable


def rekey(store, prefix: str, workers: int = 8, dry_run: bool = False,
          progress: bool = True) -> RekeyReport:
    ring = store.ring
    current = ring.current.fingerprint
    rep = RekeyReport()
    objects = []
    for page in store.list_page_iter(prefix, delimiter=None):
        for o in page.objects:
            if o.key.endswith("/") and o.size == 0:
                continue              # directory markers hold no data
            objects.append((o.key, o.size))
    rep.total = len(objects)
    rep.bytes_total = sum(s for _, s in objects)
    lock = threading.Lock()
    bar = tqdm(total=rep.bytes_total, unit="B", unit_scale=True, unit_divisor=1024,
               desc="rekey", disable=not progress, dynamic_ncols=True,
               postfix={"objects": f"0/{rep.total}"})
    done = [0]

    def one(key: str, size: int) -> None:
        info = store.head(key)
        if info.access == LOCKED:
            with lock:
                rep.unopenable.append(key)
            log.warning("%s: no key of the ring opens it; left alone", key)
            return
        if info.access == PLAINTEXT:
            with lock:
                rep.plaintext.append(key)
            log.warning("%s: stored without SSE-C (plaintext); left alone", key)
            return
        if info.key_fp == current:
            with lock:
                rep.already_current += 1
            return
        if dry_run:
            with lock:
                rep.would_rekey += 1
            return
        store.copy(key, key, info.size, info.metadata, info.key_fp, src_etag=info.etag)
        with lock:
            rep.rekeyed += 1
            rep.bytes_rekeyed += info.size

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futs = {pool.submit(one, k, s): (k, s) for k, s in objects}
        for f in as_completed(futs):
            key, size = futs[f]
            try:
                f.result()
            except SsecfsError as e:
                rep.failed.append((key, str(e)))
                log.error("%s: rekey failed: %s", key, e)
            done[0] += 1
            bar.update(size)
            bar.set_postfix(objects=f"{done[0]}/{rep.total}", refresh=False)
    bar.close()
    return rep


def summary(rep: RekeyReport, dry_run: bool) -> list[str]:
    lines = [f"objects: {rep.total} ({rep.bytes_total} bytes)",
             f"already under the current key: {rep.already_current}"]
    if dry_run:
        lines.append(f"would re-encrypt: {rep.would_rekey}")
    else:
        lines.append(f"re-encrypted: {rep.rekeyed} ({rep.bytes_rekeyed} bytes)")
    if rep.plaintext:
        lines.append(f"plaintext (not SSE-C, left alone): {len(rep.plaintext)}, e.g. {rep.plaintext[0]!r}")
    if rep.unopenable:
        lines.append(f"NOT OPENED by any key of the ring (left alone): {len(rep.unopenable)}, "
                     f"e.g. {rep.unopenable[0]!r}")
    if rep.failed:
        lines.append(f"FAILED: {len(rep.failed)}, e.g. {rep.failed[0][0]!r}: {rep.failed[0][1]}")
    if rep.ok and not dry_run:
        lines.append("done: every SSE-C object opens with the current key; "
                     "older keys can be removed from the ring")
    return lines
