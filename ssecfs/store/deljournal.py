"""The delete journal of deferred deletes (store.deferred): one file in the cache directory,
`deletes`, of sealed records. docs/CACHE.md describes the file."""

from __future__ import annotations

import json
import logging
import os
import struct

from ..crypto.aead import Sealer, record_aad
from ..errors import IntegrityError

log = logging.getLogger("ssecfs.deletes")

JMAGIC = b"SCDJ"
JHEADER = struct.Struct(">4s16s")          # magic, journal id
JRECORD = struct.Struct(">24sQI")          # key fingerprint, sequence, sealed length
JOURNAL_MAX = 1 << 20                      # bytes; rewritten with the pending records beyond


class DeleteJournal:
    """Append-only file of sealed records: {"add": [seq, key, etag, time]} and
    {"done": [seq, ...]}. The journal id (random, new for each file) and a record's sequence
    are in its associated data: records cannot be moved between journals or reordered."""

    def __init__(self, path: str, sealers: dict[str, Sealer], key_fp: str):
        self.path = path
        self.sealers = sealers
        self.key_fp = key_fp
        self._fd: int | None = None
        self._jid = b""
        self._rseq = 0
        self._sealer = None

    def _aad(self, rseq: int) -> bytes:
        return record_aad(b"deletes", self._jid) + struct.pack(">Q", rseq)

    def load(self) -> list[list]:
        """The records added and not done, in order ([seq, key, etag, time] each)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return []
        if len(raw) < JHEADER.size or raw[:4] != JMAGIC:
            log.error("delete journal %s: not a journal; ignored", self.path)
            return []
        self._jid = raw[4:JHEADER.size]
        added: dict[int, list] = {}
        done: set[int] = set()
        pos, rseq = JHEADER.size, 0
        while pos + JRECORD.size <= len(raw):
            fp, seq, n = JRECORD.unpack_from(raw, pos)
            fp = fp.rstrip(b"\0").decode("ascii", "replace")
            blob = raw[pos + JRECORD.size:pos + JRECORD.size + n]
            sealer = self.sealers.get(fp)
            if seq != rseq + 1 or len(blob) != n or sealer is None:
                break
            try:
                rec = json.loads(sealer.entry(self._jid).open(blob, self._aad(seq)))
            except (IntegrityError, ValueError):
                break
            if "add" in rec:
                added[rec["add"][0]] = rec["add"]
            done.update(rec.get("done", ()))
            pos, rseq = pos + JRECORD.size + n, seq
        if pos < len(raw):
            log.warning("delete journal %s: %d bytes at its end unreadable (cut by a crash, or "
                        "sealed by a key not in the ring): ignored", self.path, len(raw) - pos)
        return [a for s, a in sorted(added.items()) if s not in done]

    def start(self, pending: list[list]) -> None:
        """A new journal file holding `pending` (flushed, then put in place)."""
        self.close()
        self._jid, self._rseq = os.urandom(16), 0
        self._sealer = self.sealers[self.key_fp].entry(self._jid)
        tmp = self.path + ".new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, JHEADER.pack(JMAGIC, self._jid) + b"".join(
                self._record({"add": a}) for a in pending))
            os.fsync(fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        dfd = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def reset(self) -> None:
        """Nothing pending: the file starts over in place under a new id (the records
        before cannot authenticate under it), without a flush: a power cut can only bring
        back deletes already done, which are checked before they are sent again."""
        self._jid, self._rseq = os.urandom(16), 0
        self._sealer = self.sealers[self.key_fp].entry(self._jid)
        os.pwrite(self._fd, JHEADER.pack(JMAGIC, self._jid), 0)
        os.ftruncate(self._fd, JHEADER.size)
        os.lseek(self._fd, JHEADER.size, os.SEEK_SET)

    def _record(self, rec: dict) -> bytes:
        self._rseq += 1
        blob = self._sealer.seal(json.dumps(rec).encode(), self._aad(self._rseq))
        return JRECORD.pack(self.key_fp.encode(), self._rseq, len(blob)) + blob

    def append(self, recs: list[dict]) -> None:
        if self._fd is None:
            raise OSError("delete journal not open")
        data = b"".join(self._record(r) for r in recs)
        if os.write(self._fd, data) != len(data):
            raise OSError("short write to the delete journal")

    def size(self) -> int:
        return os.fstat(self._fd).st_size if self._fd is not None else 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
