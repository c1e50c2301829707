"""AEAD sealing of cache chunks and journal records (ssecfs.crypto)."""

from __future__ import annotations

import os

import pytest

from ssecfs.crypto import (NONCE_LEN, OVERHEAD, TAG_LEN, Sealer, chunk_aad, record_aad)
from ssecfs.errors import IntegrityError

FID = bytes.fromhex("00112233445566778899aabbccddeeff")
OTHER_FID = bytes.fromhex("ffeeddccbbaa99887766554433221100")


@pytest.fixture
def sealer():
    return Sealer(os.urandom(32))


@pytest.mark.parametrize("size", [0, 1, 4096, 128 * 1024])
def test_round_trip(sealer, size):
    data = os.urandom(size)
    aad = chunk_aad(FID, 3, size)
    blob = sealer.seal(data, aad)
    assert len(blob) == size + OVERHEAD == size + NONCE_LEN + TAG_LEN
    assert sealer.open(blob, aad) == data
    if size >= 16:
        assert data not in blob


def test_nonce_is_fresh_per_seal(sealer):
    data, aad = os.urandom(100), chunk_aad(FID, 0, 100)
    a, b = sealer.seal(data, aad), sealer.seal(data, aad)
    assert a[:NONCE_LEN] != b[:NONCE_LEN] and a != b
    assert sealer.open(a, aad) == sealer.open(b, aad) == data


@pytest.mark.parametrize("where", ["nonce", "body", "tag"])
def test_tampered_blob_fails(sealer, where):
    data = os.urandom(1000)
    aad = chunk_aad(FID, 0, len(data))
    blob = bytearray(sealer.seal(data, aad))
    pos = {"nonce": 0, "body": NONCE_LEN + 500, "tag": len(blob) - 1}[where]
    blob[pos] ^= 0x01
    with pytest.raises(IntegrityError):
        sealer.open(bytes(blob), aad)


@pytest.mark.parametrize("aad_other", [
    chunk_aad(OTHER_FID, 7, 1000),      # another file
    chunk_aad(FID, 8, 1000),            # another chunk index
    chunk_aad(FID, 7, 999),             # another length
    record_aad(b"meta", FID),           # another kind of blob
    b"",
])
def test_wrong_associated_data_fails(sealer, aad_other):
    data = os.urandom(1000)
    blob = sealer.seal(data, chunk_aad(FID, 7, 1000))
    with pytest.raises(IntegrityError):
        sealer.open(blob, aad_other)


def test_record_aad_binds_kind_and_file(sealer):
    blob = sealer.seal(b'{"dirty": true}', record_aad(b"meta", FID))
    assert sealer.open(blob, record_aad(b"meta", FID)) == b'{"dirty": true}'
    for aad in (record_aad(b"meta", OTHER_FID), record_aad(b"data", FID)):
        with pytest.raises(IntegrityError):
            sealer.open(blob, aad)


@pytest.mark.parametrize("cut", [1, TAG_LEN, 500])
def test_truncated_blob_fails(sealer, cut):
    data = os.urandom(1000)
    aad = chunk_aad(FID, 0, 1000)
    blob = sealer.seal(data, aad)
    with pytest.raises(IntegrityError):
        sealer.open(blob[:-cut], aad)


@pytest.mark.parametrize("n", [0, 1, NONCE_LEN, OVERHEAD - 1])
def test_blob_shorter_than_overhead_fails(sealer, n):
    with pytest.raises(IntegrityError):
        sealer.open(b"\0" * n, chunk_aad(FID, 0, 0))


def test_wrong_key_fails():
    data = os.urandom(1000)
    aad = chunk_aad(FID, 0, 1000)
    blob = Sealer(os.urandom(32)).seal(data, aad)
    with pytest.raises(IntegrityError):
        Sealer(os.urandom(32)).open(blob, aad)


def test_aad_encodings_are_distinct():
    seen = {chunk_aad(FID, i, n) for i in range(3) for n in (0, 1, 131072)}
    assert len(seen) == 9
    assert chunk_aad(FID, 0, 0) != chunk_aad(OTHER_FID, 0, 0)
    assert record_aad(b"meta", FID) != record_aad(b"meta", OTHER_FID)


def test_repr_hides_key():
    key = os.urandom(32)
    s = Sealer(key)
    assert key.hex() not in repr(s) and "hidden" in repr(s)
