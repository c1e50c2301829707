"""The on-disk format of the cache (format 6, see docs/CACHE.md): where each slot of an
entry's data file lies, what its headers say, and the encoding of chunk versions and journal
records into sealed bytes and back.

    CACHE_DIR/                      mode 0700, flock'ed by the daemon that uses it (LOCK)
        VERSION                     "ssecfs-cache 6"; any other format is refused
        entries/ID.data             two record slots (at 0 and RSLOT), then chunk slots:
                                    chunk i has two, at BASE + (2i + p) * SLOT, p = 0, 1
A record slot holds the entry's journal record (JSON, sealed):
  "SSR6" | key fingerprint (24 ASCII bytes) | u64 sequence | u32 length | sealed record
A chunk slot holds one version of its chunk, in one of two forms (crypto.FORMS):
  magic | u32 plaintext length | u64 generation | nonce | AEAD(chunk) | tag     (whole)
  magic | u32 plaintext length | u64 generation | write id (8) | sub-block 0 | ...  (split)
where sub-block j = nonce | AEAD(plaintext[j*SUB:(j+1)*SUB]) | tag (SUB = 4 KiB). Every
write of a chunk takes the entry's next generation, bound into the associated data. An
all-zero slot header means "absent" (never written, or a hole punched).

Chunks are sealed whole (one AEAD call: written and sequentially fetched data); a chunk
read at random may be sealed again in sub-blocks (see entry.CacheEntry.read_range), so
that the next small reads of it decrypt 4 KiB, not 128.
"""

from __future__ import annotations

import json
import os
import struct
from typing import NamedTuple

from ..crypto.aead import (FORMS, OVERHEAD, SPLIT_GCM, SPLIT_OCB, WHOLE_GCM, WHOLE_OCB,
                           WRITE_ID_LEN, chunk_aad, open_subs, record_aad, seal_chunk, sealed_len)
from ..errors import IntegrityError, NameTooLong

CHUNK = 128 * 1024
HEADER = struct.Struct(">4sIQ")       # magic, plaintext length, generation
SLOT_MAGIC = {WHOLE_OCB: b"SCWO", SPLIT_OCB: b"SCSO", WHOLE_GCM: b"SCWG", SPLIT_GCM: b"SCSG"}
SLOT_FORM = {magic: form for form, magic in SLOT_MAGIC.items()}
SUBS_AT = HEADER.size + WRITE_ID_LEN                  # where a split slot's sub-blocks start
SLOT = (SUBS_AT + sealed_len(CHUNK) + 4095) // 4096 * 4096   # block aligned, so that a
assert SLOT == 135168                                        # punched slot frees its blocks
FORMAT = 6
VERSION_TEXT = f"ssecfs-cache {FORMAT}\n"
GONE = ".gone"                  # suffix of a discarded entry's data file until it is removed
RSLOT = 64 * 1024               # one record slot (a record is a few hundred bytes: sparse)
BASE = 2 * RSLOT                # where the chunk slots start
RHEADER = struct.Struct(">4s24sQI")   # magic, key fingerprint, sequence, sealed length
RMAGIC = b"SSR6"
NEVER = 1 << 62                 # a generation no write reaches


def _cost(length: int) -> int:
    """Disk blocks a slot holding `length` plaintext bytes occupies (what the bound counts)."""
    return (SUBS_AT + sealed_len(length) + 4095) // 4096 * 4096


def slot_offset(index: int, pos: int = 0) -> int:
    """Where slot `pos` (0 or 1) of chunk `index` starts in a data file."""
    return BASE + (2 * index + pos) * SLOT


class Slot(NamedTuple):
    """One version of a chunk on disk."""
    pos: int                  # 0 or 1: which of the chunk's two slots
    gen: int                  # its generation (higher: written later)
    form: int                 # crypto.FORMS
    length: int               # plaintext bytes
    wid: bytes | None         # write id of a split form
    epoch: int = 0            # Ledger.epoch when it was written (0: found on disk)

    def size(self) -> int:
        """Bytes of the slot that hold it."""
        if FORMS[self.form][0]:
            return SUBS_AT + sealed_len(self.length, FORMS[self.form][0])
        return HEADER.size + self.length + OVERHEAD


def parse_header(raw: bytes, pos: int) -> Slot | None:
    """The version a slot header announces (not authenticated), or None (absent)."""
    if len(raw) < HEADER.size:
        return None
    magic, length, gen = HEADER.unpack_from(raw)
    form = SLOT_FORM.get(magic)
    if form is None or not 0 < length <= CHUNK:
        return None
    if FORMS[form][0]:
        if len(raw) < SUBS_AT:
            return None
        return Slot(pos, gen, form, length, bytes(raw[HEADER.size:SUBS_AT]))
    return Slot(pos, gen, form, length, None)


def encode_version(sealer, bid: bytes, index: int, gen: int, data, split: bool,
                   nonce: bytes | None) -> tuple[Slot, list]:
    """Seal `data` as generation `gen` of chunk `index` of entry `bid`: the version (at
    position 0: where it goes is the writer's choice) and its slot's bytes, as parts for
    pwritev."""
    length = len(data)
    if split:
        wid, form = os.urandom(WRITE_ID_LEN), sealer.split_form
        return Slot(0, gen, form, length, wid), [
            HEADER.pack(SLOT_MAGIC[form], length, gen), wid,
            *seal_chunk(sealer, data, bid, index, gen, wid)]
    form = sealer.whole_form
    return Slot(0, gen, form, length, None), [
        HEADER.pack(SLOT_MAGIC[form], length, gen),
        *sealer.seal_parts(data, chunk_aad(bid, index, gen, length, form), nonce, form)]


def decode_version(sealer, bid: bytes, index: int, slot: Slot, raw) -> bytes:
    """The plaintext of the version `slot` of chunk `index`, from its slot's bytes."""
    if len(raw) < HEADER.size or HEADER.unpack_from(raw) != (
            SLOT_MAGIC[slot.form], slot.length, slot.gen):
        raise IntegrityError("bad slot header (corrupt or torn)")
    body = memoryview(raw)[HEADER.size:]
    size = FORMS[slot.form][0]
    if not size:
        return sealer.open(body, chunk_aad(bid, index, slot.gen, slot.length, slot.form),
                           slot.form)
    if bytes(body[:WRITE_ID_LEN]) != slot.wid:
        raise IntegrityError("bad slot header (corrupt or torn)")
    return open_subs(sealer, body[WRITE_ID_LEN:], bid, index, slot.gen, slot.length, slot.wid,
                     0, -(-slot.length // size), slot.form)


def sub_span(slot: Slot, lo: int, hi: int) -> tuple[int, int, int, int]:
    """Of a version sealed in sub-blocks, what holds plaintext bytes [lo, hi) (hi within
    its length, lo < hi): (first sub-block, how many, where the first starts in the slot,
    bytes to read)."""
    sub = FORMS[slot.form][0]
    first, last = lo // sub, (hi - 1) // sub
    at = first * (sub + OVERHEAD)
    return first, last - first + 1, SUBS_AT + at, sealed_len(min(slot.length, (last + 1) * sub),
                                                              sub) - at


def encode_record(sealer, bid: bytes, key_fp: str, seq: int, state: dict,
                  trusted: int) -> bytes:
    """Record `seq` of entry `bid` (sealed under the ring key `key_fp`), saying `state` and
    that every chunk version up to generation `trusted` was flushed before it."""
    blob = sealer.seal(json.dumps({"state": state, "flushed_gen": trusted}).encode(),
                       _record_aad(bid, seq))
    record = RHEADER.pack(RMAGIC, key_fp.encode(), seq, len(blob)) + blob
    if len(record) > RSLOT:
        raise NameTooLong("journal record too long (path or key)")
    return record


def decode_record(sealer, bid: bytes, seq: int, blob: bytes) -> tuple[dict, int]:
    """(state, flushed_gen) of a sealed record; IntegrityError if it does not authenticate,
    ValueError, KeyError or TypeError if it does not parse."""
    record = json.loads(sealer.open(blob, _record_aad(bid, seq)))
    return record["state"], int(record["flushed_gen"])


def _record_aad(bid: bytes, seq: int) -> bytes:
    return record_aad(b"meta" + struct.pack(">Q", seq), bid)


def read_records(data_path: str) -> list[tuple[int, str, bytes]]:
    """The record slots of a data file that carry a record header, newest first:
    (sequence, key fingerprint, sealed record). Not authenticated yet."""
    found = []
    with open(data_path, "rb") as f:
        for slot in range(2):
            f.seek(slot * RSLOT)
            raw = f.read(RSLOT)
            if len(raw) < RHEADER.size:
                continue
            magic, fp, seq, n = RHEADER.unpack_from(raw)
            if magic == RMAGIC and n <= RSLOT - RHEADER.size and seq % 2 == slot:
                found.append((seq, fp.decode("ascii", "replace"),
                              raw[RHEADER.size:RHEADER.size + n]))
    return sorted(found, reverse=True)
