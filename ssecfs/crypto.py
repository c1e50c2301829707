"""AEAD sealing of cache chunks and journal records. Pure: bytes in, bytes out.

Format of a sealed blob:  nonce (12 bytes) || ciphertext || tag (16), with AES-256-OCB3
(RFC 7253) for the chunks written now, AES-256-GCM for journal records and for the chunks of
older caches. The associated data binds the blob to what it is (format, kind, file id, index,
length), so a blob moved to another file or position, or truncated, fails authentication.

Why OCB3 for chunks: every byte written through the mount is sealed once and opened once more
for its upload, every byte fetched is sealed once; on the benchmark machine (AMD EPYC, AES-NI
and VAES but no AVX-512) OpenSSL seals 128 KiB with OCB3 in 0.26 s per GiB against 0.57 for
GCM, and opens in 0.27 against 0.44. Its key is derived from the cache key (HKDF, its own
label), so no AES key serves two modes. Where OpenSSL lacks OCB (a FIPS build), chunks are
sealed with GCM as before (forms 1 and 3), and slots sealed with OCB cannot be read there.

A cache chunk (up to 128 KiB) is sealed as one blob, or (a chunk read at random, see
cache.py) as consecutive sub-blocks of SUB (4 KiB) bytes, each its own blob, so that a 4 KiB
read decrypts 4 KiB, not 128 (older caches' 32 KiB sub-blocks are still read). A sub-block's
associated data names its form (cipher and sub-block size), the chunk's length and the
sub-block's number: sub-blocks cannot be swapped, moved or dropped; it also names a random id of the
write that sealed the chunk (kept in the slot's header), so sub-blocks of two writes of the
chunk (a slot torn by a crash in the middle of a rewrite) cannot be mixed either.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESOCB3
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import IntegrityError

FORMAT_VERSION = 1                  # records; also the number of form 1 below
NONCE_LEN = 12
TAG_LEN = 16
OVERHEAD = NONCE_LEN + TAG_LEN
SUB = 4 * 1024                      # plaintext bytes per sealed sub-block of a chunk
SUB_SEALED = SUB + OVERHEAD         # its size sealed (the last one of a chunk may be shorter)
SUB_V2 = 32 * 1024                  # the sub-blocks of an older slot ("SSC2"), still read
# The forms of a sealed chunk: number -> (sub-block size, 0 if sealed as one blob; sealed
# with OCB3). The number is the digit of the slot's magic ("SSC1".."SSC5") and the format its
# associated data names, so a slot's header cannot claim another form.
FORMS = {1: (0, False), 2: (SUB_V2, False), 3: (SUB, False), 4: (0, True), 5: (SUB, True)}
WHOLE_OCB, SPLIT_OCB = 4, 5         # the forms written where OpenSSL has OCB3
WHOLE_GCM, SPLIT_GCM = 1, 3         # the forms written where it has not
OCB_KDF_INFO = b"ssecfs cache chunks, AES-256-OCB3"


def _ocb3(key: bytes) -> AESOCB3 | None:
    sub = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=OCB_KDF_INFO).derive(key)
    try:
        return AESOCB3(sub)
    except UnsupportedAlgorithm:
        return None


class Sealer:
    def __init__(self, key: bytes):
        self._aead = AESGCM(key)           # records, and the chunk forms 1-3
        self._ocb = _ocb3(key)             # the chunk forms 4 and 5
        ocb = self._ocb is not None
        self.whole_form = WHOLE_OCB if ocb else WHOLE_GCM     # the forms new slots get
        self.split_form = SPLIT_OCB if ocb else SPLIT_GCM

    def __repr__(self) -> str:
        return "Sealer(<key hidden>)"

    def aead(self, form: int = WHOLE_GCM):
        """The cipher of a chunk form (WHOLE_GCM, the default, is also the records' one)."""
        if not FORMS[form][1]:
            return self._aead
        if self._ocb is None:
            raise IntegrityError("sealed with AES-OCB3, which this OpenSSL does not offer")
        return self._ocb

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        return b"".join(self.seal_parts(plaintext, aad))

    def seal_parts(self, plaintext, aad: bytes, nonce: bytes | None = None,
                   form: int = WHOLE_GCM) -> tuple[bytes, bytes]:
        """(nonce, ciphertext+tag): written side by side (pwritev) without joining them.
        `nonce`: NONCE_LEN random bytes never used before (a caller sealing many chunks draws
        them from one os.urandom call: each call hands the GIL over and back)."""
        if nonce is None:
            nonce = os.urandom(NONCE_LEN)
        return nonce, self.aead(form).encrypt(nonce, plaintext, aad)

    def open(self, blob, aad: bytes, form: int = WHOLE_GCM) -> bytes:
        if len(blob) < OVERHEAD:
            raise IntegrityError("sealed record too short")
        view = memoryview(blob)
        try:
            return self.aead(form).decrypt(view[:NONCE_LEN], view[NONCE_LEN:], aad)
        except InvalidTag:
            raise IntegrityError("authentication failed") from None


def chunk_aad(file_id: bytes, index: int, length: int, form: int = WHOLE_GCM) -> bytes:
    """A whole chunk sealed as one blob (a slot "SSC1" or "SSC4")."""
    return b"ssecfs-chunk" + struct.pack(">B16sQI", form, file_id, index, length)


WRITE_ID_LEN = 8


def sub_aad(file_id: bytes, index: int, length: int, sub: int, write_id: bytes,
            form: int = SPLIT_GCM) -> bytes:
    """Sub-block `sub` of chunk `index` (sealed in the split form `form`), which holds
    `length` plaintext bytes, as sealed by the write `write_id`."""
    return b"ssecfs-chunk" + struct.pack(">B16sQIH8s", form, file_id, index, length,
                                         sub, write_id)


def sealed_len(length: int, size: int = SUB) -> int:
    """Bytes that `length` plaintext bytes of a chunk occupy sealed in sub-blocks of `size`."""
    return length + -(-length // size) * OVERHEAD


_SUB_NUMBERS = [struct.pack(">H", n) for n in range(64)]


def seal_chunk(sealer: "Sealer", plaintext, file_id: bytes, index: int,
               write_id: bytes) -> list[bytes]:
    """A chunk sealed in 4 KiB sub-blocks, in the sealer's split form: [nonce, ciphertext+tag,
    nonce, ...] (for pwritev). The same bytes as sealing each sub-block with sub_aad; the loop
    is kept lean, since a chunk is 32 of them."""
    form = sealer.split_form
    view = memoryview(plaintext)
    length = len(view)
    count = -(-length // SUB)
    head = sub_aad(file_id, index, length, 0, write_id, form)[:-10]   # up to the sub-block no.
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


def open_subs(sealer: "Sealer", blob, file_id: bytes, index: int, length: int,
              write_id: bytes, first: int, count: int, form: int = SPLIT_GCM) -> bytes:
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
        return sealer.open(view, sub_aad(file_id, index, length, first, write_id, form), form)
    out = []
    pos = 0
    for sub in range(first, first + count):
        n = min(size, length - sub * size) + OVERHEAD
        out.append(sealer.open(view[pos:pos + n],
                               sub_aad(file_id, index, length, sub, write_id, form), form))
        pos += n
    return b"".join(out)


def record_aad(kind: bytes, file_id: bytes) -> bytes:
    return b"ssecfs-record" + struct.pack(">B", FORMAT_VERSION) + kind + b"\0" + file_id
