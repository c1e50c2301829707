"""AEAD sealing of cache chunks and journal records. Pure: bytes in, bytes out.

Format of a sealed blob:  nonce (12 bytes) || AES-256-GCM ciphertext || tag (16).
The associated data binds the blob to what it is (format, kind, file id, index, length), so a
blob moved to another file or position, or truncated, fails authentication.

A cache chunk (up to 128 KiB) is sealed as one blob, or (a chunk read at random, see
cache.py) as consecutive sub-blocks of SUB (4 KiB) bytes, each its own blob, so that a 4 KiB
read decrypts 4 KiB, not 128 (older caches' 32 KiB sub-blocks are still read). A sub-block's
associated data names the sub-block size's format, the chunk's length and the sub-block's
number: sub-blocks cannot be swapped, moved or dropped; it also names a random id of the
write that sealed the chunk (kept in the slot's header), so sub-blocks of two writes of the
chunk (a slot torn by a crash in the middle of a rewrite) cannot be mixed either.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import IntegrityError

FORMAT_VERSION = 1
NONCE_LEN = 12
TAG_LEN = 16
OVERHEAD = NONCE_LEN + TAG_LEN
SUB = 4 * 1024                      # plaintext bytes per sealed sub-block of a chunk
SUB_SEALED = SUB + OVERHEAD         # its size sealed (the last one of a chunk may be shorter)
SUB_V2 = 32 * 1024                  # the sub-blocks of an older slot ("SSC2"), still read
SUB_FORMAT = {SUB: 3, SUB_V2: 2}    # sub-block size -> the format number its AAD names


class Sealer:
    def __init__(self, key: bytes):
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "Sealer(<key hidden>)"

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        return b"".join(self.seal_parts(plaintext, aad))

    def seal_parts(self, plaintext, aad: bytes, nonce: bytes | None = None
                   ) -> tuple[bytes, bytes]:
        """(nonce, ciphertext+tag): written side by side (pwritev) without joining them.
        `nonce`: NONCE_LEN random bytes never used before (a caller sealing many chunks draws
        them from one os.urandom call: each call hands the GIL over and back)."""
        if nonce is None:
            nonce = os.urandom(NONCE_LEN)
        return nonce, self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob, aad: bytes) -> bytes:
        if len(blob) < OVERHEAD:
            raise IntegrityError("sealed record too short")
        view = memoryview(blob)
        try:
            return self._aead.decrypt(view[:NONCE_LEN], view[NONCE_LEN:], aad)
        except InvalidTag:
            raise IntegrityError("authentication failed") from None


def chunk_aad(file_id: bytes, index: int, length: int) -> bytes:
    """A whole chunk sealed as one blob (a slot "SSC1")."""
    return b"ssecfs-chunk" + struct.pack(">B16sQI", FORMAT_VERSION, file_id, index, length)


WRITE_ID_LEN = 8


def sub_aad(file_id: bytes, index: int, length: int, sub: int, write_id: bytes,
            size: int = SUB) -> bytes:
    """Sub-block `sub` of chunk `index` (sub-blocks of `size` bytes), which holds `length`
    plaintext bytes, as sealed by the write `write_id`."""
    return b"ssecfs-chunk" + struct.pack(">B16sQIH8s", SUB_FORMAT[size], file_id, index, length,
                                         sub, write_id)


def sealed_len(length: int, size: int = SUB) -> int:
    """Bytes that `length` plaintext bytes of a chunk occupy sealed in sub-blocks of `size`."""
    return length + -(-length // size) * OVERHEAD


_SUB_NUMBERS = [struct.pack(">H", n) for n in range(64)]


def seal_chunk(sealer: "Sealer", plaintext, file_id: bytes, index: int,
               write_id: bytes) -> list[bytes]:
    """A chunk sealed in sub-blocks: [nonce, ciphertext+tag, nonce, ...] (for pwritev). The
    same bytes as sealing each sub-block with sub_aad; the loop is kept lean, since a chunk
    is 32 of them."""
    view = memoryview(plaintext)
    length = len(view)
    count = -(-length // SUB)
    head = sub_aad(file_id, index, length, 0, write_id)[:-10]    # up to the sub-block number
    nonces = os.urandom(NONCE_LEN * count)                      # one system call for all
    encrypt = sealer._aead.encrypt
    parts: list[bytes] = []
    append = parts.append
    for sub in range(count):
        nonce = nonces[sub * NONCE_LEN:(sub + 1) * NONCE_LEN]
        append(nonce)
        append(encrypt(nonce, view[sub * SUB:(sub + 1) * SUB],
                       head + _SUB_NUMBERS[sub] + write_id))
    return parts


def open_subs(sealer: "Sealer", blob, file_id: bytes, index: int, length: int,
              write_id: bytes, first: int, count: int, size: int = SUB) -> bytes:
    """Plaintext of the `count` consecutive sub-blocks (of `size` bytes) in `blob`, the first
    being number `first`, of a chunk of `length` bytes. IntegrityError if any fails
    authentication, or if `blob` is not exactly their size (a slot cut short must not read as
    a shorter chunk)."""
    view = memoryview(blob)
    end = min(length, (first + count) * size)
    if count < 1 or first * size >= end or \
            len(view) != sealed_len(end, size) - first * (size + OVERHEAD):
        raise IntegrityError("sealed sub-blocks cut short")
    if count == 1:                  # a random 4 KiB read: one sub-block
        return sealer.open(view, sub_aad(file_id, index, length, first, write_id, size))
    out = []
    pos = 0
    for sub in range(first, first + count):
        n = min(size, length - sub * size) + OVERHEAD
        out.append(sealer.open(view[pos:pos + n],
                               sub_aad(file_id, index, length, sub, write_id, size)))
        pos += n
    return b"".join(out)


def record_aad(kind: bytes, file_id: bytes) -> bytes:
    return b"ssecfs-record" + struct.pack(">B", FORMAT_VERSION) + kind + b"\0" + file_id
