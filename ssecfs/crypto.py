"""AEAD sealing of one cache chunk or journal record. Pure: bytes in, bytes out.

Format of a sealed blob (version 1):  nonce (12 bytes) || AES-256-GCM ciphertext || tag (16).
The associated data binds the blob to what it is (format version, kind, file id, index, length),
so a chunk moved to another file or position, or truncated, fails authentication.
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


class Sealer:
    def __init__(self, key: bytes):
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "Sealer(<key hidden>)"

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        return b"".join(self.seal_parts(plaintext, aad))

    def seal_parts(self, plaintext, aad: bytes) -> tuple[bytes, bytes]:
        """(nonce, ciphertext+tag): written side by side (pwritev) without joining them."""
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
    return b"ssecfs-chunk" + struct.pack(">B16sQI", FORMAT_VERSION, file_id, index, length)


def record_aad(kind: bytes, file_id: bytes) -> bytes:
    return b"ssecfs-record" + struct.pack(">B", FORMAT_VERSION) + kind + b"\0" + file_id
