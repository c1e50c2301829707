"""AEAD sealing of cache chunks and journal records. Pure: bytes in, bytes out.

Keys. A ring key's cache key (keys.Key.cache_key) seals nothing itself: `Sealer` holds it
and derives, for each cache entry (one file version, named by 16 random bytes), that entry's
own keys: HKDF-SHA256(cache key, salt = entry id, info = ENTRY_KDF_INFO), 64 bytes, the
first 32 an AES-256-GCM key (the entry's journal records; its chunks where OpenSSL lacks
OCB3), the last 32 an AES-256-OCB3 key (its chunks). No AES key serves two modes, and no
two entries share a key: a random nonce that repeats across entries, mounts or machines
never meets the same key, and a blob of one entry copied into another's file fails
authentication there.

A sealed blob is  nonce (12 bytes) || ciphertext || tag (16). Its associated data binds it
to what it is: the format version, the kind (chunk or record), the form (cipher and shape),
the entry id, the chunk index, the chunk's generation (a number the cache gives each write
of a chunk in an entry, higher for each later write) and its length; a blob moved to
another entry, index or generation, or cut short, fails authentication.

Why OCB3 for chunks: every byte written through the mount is sealed once and opened once
more for its upload, every byte fetched is sealed once; on the benchmark machine (AMD EPYC,
AES-NI and VAES but no AVX-512) OpenSSL seals 128 KiB with OCB3 in 0.26 s per GiB against
0.57 for GCM, and opens in 0.27 against 0.44. Where OpenSSL lacks OCB3 (a FIPS build), chunks
are sealed with GCM: the forms WHOLE_GCM and SPLIT_GCM of the same format; slots sealed with
OCB3 cannot be read there.

A cache chunk (up to 128 KiB) is sealed as one blob (a "whole" form), or (a chunk read at
random, see ssecfs.cache) as consecutive sub-blocks of SUB (4 KiB) bytes, each its own blob (a
"split" form), so that a 4 KiB read decrypts 4 KiB, not 128. A sub-block's associated data
also names its number and a random id of the write that sealed the chunk (kept in the slot's
header): sub-blocks cannot be swapped, moved or dropped, nor sub-blocks of two writes of the
chunk (a slot torn by a crash in the middle of a write) mixed.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESOCB3
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import IntegrityError

FORMAT_VERSION = 6                  # the cache format (cache.VERSION_TEXT), in every AAD
NONCE_LEN = 12
TAG_LEN = 16
OVERHEAD = NONCE_LEN + TAG_LEN
SUB = 4 * 1024                      # plaintext bytes per sealed sub-block of a chunk
SUB_SEALED = SUB + OVERHEAD         # its size sealed (the last one of a chunk may be shorter)
WRITE_ID_LEN = 8
# The forms of a sealed chunk: number -> (sub-block size, 0 if sealed as one blob; sealed
# with OCB3). The number is in the associated data, and the slot's magic names it, so a
# slot's header cannot claim another form.
WHOLE_OCB, SPLIT_OCB, WHOLE_GCM, SPLIT_GCM = 1, 2, 3, 4
FORMS = {WHOLE_OCB: (0, True), SPLIT_OCB: (SUB, True),
         WHOLE_GCM: (0, False), SPLIT_GCM: (SUB, False)}
RECORD_FORM = WHOLE_GCM             # records are sealed with the entry's GCM key
ENTRY_KDF_INFO = b"ssecfs cache entry keys v6: AES-256-GCM | AES-256-OCB3"


def _has_ocb3() -> bool:
    try:
        AESOCB3(bytes(32))
    except UnsupportedAlgorithm:
        return False
    return True


class Sealer:
    """The cache key of one ring key: hands out each entry's `EntrySealer`."""

    def __init__(self, cache_key: bytes):
        self._key = cache_key
        self.ocb = _has_ocb3()
        self.whole_form = WHOLE_OCB if self.ocb else WHOLE_GCM     # the forms new slots get
        self.split_form = SPLIT_OCB if self.ocb else SPLIT_GCM

    def __repr__(self) -> str:
        return "Sealer(<key hidden>)"

    def entry(self, entry_id: bytes) -> "EntrySealer":
        """The sealer of the entry `entry_id` (16 bytes): its own keys (see above)."""
        assert len(entry_id) == 16
        okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=entry_id,
                   info=ENTRY_KDF_INFO).derive(self._key)
        return EntrySealer(okm[:32], okm[32:] if self.ocb else None)


class EntrySealer:
    """Seals and opens the blobs of one cache entry."""

    def __init__(self, gcm_key: bytes, ocb_key: bytes | None):
        self._gcm = AESGCM(gcm_key)
        self._ocb = AESOCB3(ocb_key) if ocb_key is not None else None
        ocb = self._ocb is not None
        self.whole_form = WHOLE_OCB if ocb else WHOLE_GCM
        self.split_form = SPLIT_OCB if ocb else SPLIT_GCM

    def __repr__(self) -> str:
        return "EntrySealer(<keys hidden>)"

    def can_open(self, form: int) -> bool:
        """Whether this OpenSSL offers the cipher of `form`."""
        return self._ocb is not None or not FORMS[form][1]

    def aead(self, form: int):
        """The cipher of a chunk form (RECORD_FORM: the records' one)."""
        if not FORMS[form][1]:
            return self._gcm
        if self._ocb is None:
            raise IntegrityError("sealed with AES-OCB3, which this OpenSSL does not offer")
        return self._ocb

    def seal(self, plaintext: bytes, aad: bytes, form: int = RECORD_FORM) -> bytes:
        return b"".join(self.seal_parts(plaintext, aad, form=form))

    def seal_parts(self, plaintext, aad: bytes, nonce: bytes | None = None,
                   form: int = RECORD_FORM) -> tuple[bytes, bytes]:
        """(nonce, ciphertext+tag): written side by side (pwritev) without joining them.
        `nonce`: NONCE_LEN random bytes never used before (a caller sealing many chunks draws
        them from one os.urandom call: each call hands the GIL over and back)."""
        if nonce is None:
            nonce = os.urandom(NONCE_LEN)
        return nonce, self.aead(form).encrypt(nonce, plaintext, aad)

    def open(self, blob, aad: bytes, form: int = RECORD_FORM) -> bytes:
        if len(blob) < OVERHEAD:
            raise IntegrityError("sealed blob too short")
        view = memoryview(blob)
        try:
            return self.aead(form).decrypt(view[:NONCE_LEN], view[NONCE_LEN:], aad)
        except InvalidTag:
            raise IntegrityError("authentication failed") from None


_CHUNK_HEAD = struct.Struct(">12sBB16sQQI")     # label, version, form, entry, index, gen, len


def chunk_aad(file_id: bytes, index: int, gen: int, length: int, form: int) -> bytes:
    """A whole chunk sealed as one blob: chunk `index`, written as generation `gen`, holding
    `length` plaintext bytes."""
    return _CHUNK_HEAD.pack(b"ssecfs-chunk", FORMAT_VERSION, form, file_id, index, gen, length)


def sub_aad(file_id: bytes, index: int, gen: int, length: int, sub: int, write_id: bytes,
            form: int) -> bytes:
    """Sub-block `sub` of that chunk sealed in the split form `form` by the write
    `write_id`."""
    return chunk_aad(file_id, index, gen, length, form) + struct.pack(">H8s", sub, write_id)


def sealed_len(length: int, size: int = SUB) -> int:
    """Bytes that `length` plaintext bytes of a chunk occupy sealed in sub-blocks of `size`."""
    return length + -(-length // size) * OVERHEAD


_SUB_NUMBERS = [struct.pack(">H", n) for n in range(64)]


def seal_chunk(sealer: EntrySealer, plaintext, file_id: bytes, index: int, gen: int,
               write_id: bytes) -> list[bytes]:
    """A chunk sealed in 4 KiB sub-blocks, in the sealer's split form: [nonce, ciphertext+tag,
    nonce, ...] (for pwritev). The same bytes as sealing each sub-block with sub_aad; the loop
    is kept lean, since a chunk is 32 of them."""
    form = sealer.split_form
    view = memoryview(plaintext)
    length = len(view)
    count = -(-length // SUB)
    head = chunk_aad(file_id, index, gen, length, form)         # up to the sub-block number
    nonces = os.urandom(NONCE_LEN * count)                      # one system call for all
    encrypt = sealer.aead(form).encrypt
    parts: list[bytes] = []
    append = parts.append
    for sub in range(count):
        nonce = nonces[sub * NONCE_LEN:(sub + 1) * NONCE_LEN]
        append(nonce)
        append(encrypt(nonce, view[sub * SUB:(sub + 1) * SUB],
                       head + _SUB_NUMBERS[sub] + write_id))
    return parts


def open_subs(sealer: EntrySealer, blob, file_id: bytes, index: int, gen: int, length: int,
              write_id: bytes, first: int, count: int, form: int) -> bytes:
    """Plaintext of the `count` consecutive sub-blocks (of the split form `form`) in `blob`,
    the first being number `first`, of a chunk of `length` bytes. IntegrityError if any fails
    authentication, or if `blob` is not exactly their size (a slot cut short must not read as
    a shorter chunk)."""
    size = FORMS[form][0]
    view = memoryview(blob)
    end = min(length, (first + count) * size)
    if count < 1 or first * size >= end or \
            len(view) != sealed_len(end, size) - first * (size + OVERHEAD):
        raise IntegrityError("sealed sub-blocks cut short")
    if count == 1:                  # a random 4 KiB read: one sub-block
        return sealer.open(view, sub_aad(file_id, index, gen, length, first, write_id, form),
                           form)
    out = []
    pos = 0
    for sub in range(first, first + count):
        n = min(size, length - sub * size) + OVERHEAD
        out.append(sealer.open(view[pos:pos + n],
                               sub_aad(file_id, index, gen, length, sub, write_id, form), form))
        pos += n
    return b"".join(out)


def record_aad(kind: bytes, file_id: bytes) -> bytes:
    return b"ssecfs-record" + struct.pack(">B", FORMAT_VERSION) + kind + b"\0" + file_id
