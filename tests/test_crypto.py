"""AEAD sealing of cache chunks and journal records (ssecfs.crypto)."""

from __future__ import annotations

import os

import pytest
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESOCB3

from ssecfs import crypto as crypto_mod
from ssecfs.crypto import (FORMS, NONCE_LEN, OVERHEAD, SPLIT_GCM, SPLIT_OCB, TAG_LEN, WHOLE_GCM,
                           WHOLE_OCB, Sealer, chunk_aad, open_subs, record_aad, seal_chunk,
                           sub_aad)
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


# ------------------------------------------------------------------ the forms of a chunk
@pytest.mark.parametrize("form", [WHOLE_GCM, WHOLE_OCB])
@pytest.mark.parametrize("size", [0, 1, 4096, 128 * 1024])
def test_whole_chunk_forms_round_trip_and_refuse_tampering(sealer, form, size):
    data = os.urandom(size)
    aad = chunk_aad(FID, 3, size, form)
    blob = b"".join(sealer.seal_parts(data, aad, form=form))
    assert len(blob) == size + OVERHEAD
    assert sealer.open(blob, aad, form) == data
    if size >= 16:
        assert data not in blob
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 1
    for b, a in ((bytes(bad), aad), (blob, chunk_aad(FID, 4, size, form))):
        with pytest.raises(IntegrityError):
            sealer.open(b, a, form)


def test_forms_do_not_open_each_other(sealer):
    """A slot's header names its form; claiming another (the other cipher, or the same
    cipher with the other form's associated data) fails authentication."""
    data = os.urandom(1000)
    for form, other in ((WHOLE_OCB, WHOLE_GCM), (WHOLE_GCM, WHOLE_OCB)):
        blob = b"".join(sealer.seal_parts(data, chunk_aad(FID, 0, 1000, form), form=form))
        for aad_form, cipher_form in ((other, other), (form, other), (other, form)):
            with pytest.raises(IntegrityError):
                sealer.open(blob, chunk_aad(FID, 0, 1000, aad_form), cipher_form)
    assert len({chunk_aad(FID, 0, 1000, f) for f in FORMS}) == len(FORMS)
    assert len({sub_aad(FID, 0, 1000, 0, b"w" * 8, f) for f in FORMS}) == len(FORMS)


@pytest.mark.parametrize("length", [1, 4096, 5000, 128 * 1024])
def test_split_form_round_trip(sealer, length):
    data, wid = os.urandom(length), os.urandom(8)
    blob = b"".join(seal_chunk(sealer, data, FID, 2, wid))
    assert sealer.split_form == SPLIT_OCB
    assert open_subs(sealer, blob, FID, 2, length, wid, 0, -(-length // 4096), SPLIT_OCB) == data
    with pytest.raises(IntegrityError):
        open_subs(sealer, blob, FID, 2, length, wid, 0, -(-length // 4096), SPLIT_GCM)


def test_ocb_key_is_derived_from_the_cache_key():
    """OCB3 and GCM never use the same AES key (both encrypt the zero block with it)."""
    key, data = os.urandom(32), os.urandom(100)
    aad = chunk_aad(FID, 0, 100, WHOLE_OCB)
    blob = b"".join(Sealer(key).seal_parts(data, aad, form=WHOLE_OCB))
    with pytest.raises(Exception):
        AESOCB3(key).decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], aad)
    with pytest.raises(Exception):
        AESGCM(key).decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], aad)
    assert Sealer(key).open(blob, aad, WHOLE_OCB) == data


def test_without_ocb_in_openssl_chunks_are_sealed_with_gcm(monkeypatch):
    def unsupported(key):
        raise UnsupportedAlgorithm("no AES-OCB3 in this OpenSSL")
    monkeypatch.setattr(crypto_mod, "AESOCB3", unsupported)
    sealer = Sealer(os.urandom(32))
    assert (sealer.whole_form, sealer.split_form) == (WHOLE_GCM, SPLIT_GCM)
    data, wid = os.urandom(5000), os.urandom(8)
    blob = b"".join(seal_chunk(sealer, data, FID, 0, wid))
    assert open_subs(sealer, blob, FID, 0, 5000, wid, 0, 2, SPLIT_GCM) == data
    with pytest.raises(IntegrityError, match="OCB3"):
        sealer.open(b"\0" * 100, chunk_aad(FID, 0, 72, WHOLE_OCB), WHOLE_OCB)
