"""AEAD sealing of cache chunks and journal records (ssecfs.crypto.aead)."""

from __future__ import annotations

import os

import pytest
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESOCB3

from ssecfs.crypto import aead as crypto_mod
from ssecfs.crypto.aead import (FORMS, NONCE_LEN, OVERHEAD, SPLIT_GCM, SPLIT_OCB, TAG_LEN, WHOLE_GCM,
                           WHOLE_OCB, Sealer, chunk_aad, open_subs, record_aad, seal_chunk,
                           sub_aad)
from ssecfs.errors import IntegrityError

FID = bytes.fromhex("00112233445566778899aabbccddeeff")
OTHER_FID = bytes.fromhex("ffeeddccbbaa99887766554433221100")


@pytest.fixture
def sealer():
    """The sealer of the entry FID under a random cache key."""
    return Sealer(os.urandom(32)).entry(FID)


def aad(index: int = 0, length: int = 1000, gen: int = 1, form: int = WHOLE_OCB,
        fid: bytes = FID) -> bytes:
    return chunk_aad(fid, index, gen, length, form)


@pytest.mark.parametrize("size", [0, 1, 4096, 128 * 1024])
def test_round_trip(sealer, size):
    data = os.urandom(size)
    a = aad(3, size, form=WHOLE_GCM)
    blob = sealer.seal(data, a)
    assert len(blob) == size + OVERHEAD == size + NONCE_LEN + TAG_LEN
    assert sealer.open(blob, a) == data
    if size >= 16:
        assert data not in blob


def test_nonce_is_fresh_per_seal(sealer):
    data, a = os.urandom(100), record_aad(b"meta", FID)
    x, y = sealer.seal(data, a), sealer.seal(data, a)
    assert x[:NONCE_LEN] != y[:NONCE_LEN] and x != y
    assert sealer.open(x, a) == sealer.open(y, a) == data


@pytest.mark.parametrize("where", ["nonce", "body", "tag"])
def test_tampered_blob_fails(sealer, where):
    data = os.urandom(1000)
    a = record_aad(b"meta", FID)
    blob = bytearray(sealer.seal(data, a))
    pos = {"nonce": 0, "body": NONCE_LEN + 500, "tag": len(blob) - 1}[where]
    blob[pos] ^= 0x01
    with pytest.raises(IntegrityError):
        sealer.open(bytes(blob), a)


@pytest.mark.parametrize("aad_other", [
    aad(7, 1000, fid=OTHER_FID),        # another file
    aad(8, 1000),                       # another chunk index
    aad(7, 999),                        # another length
    aad(7, 1000, gen=2),                # another generation (another write of the chunk)
    aad(7, 1000, form=WHOLE_GCM),       # another form
    record_aad(b"meta", FID),           # another kind of blob
    b"",
])
def test_wrong_associated_data_fails(sealer, aad_other):
    data = os.urandom(1000)
    blob = b"".join(sealer.seal_parts(data, aad(7, 1000), form=WHOLE_OCB))
    assert sealer.open(blob, aad(7, 1000), WHOLE_OCB) == data
    with pytest.raises(IntegrityError):
        sealer.open(blob, aad_other, WHOLE_OCB)


def test_record_aad_binds_kind_and_file(sealer):
    blob = sealer.seal(b'{"dirty": true}', record_aad(b"meta", FID))
    assert sealer.open(blob, record_aad(b"meta", FID)) == b'{"dirty": true}'
    for a in (record_aad(b"meta", OTHER_FID), record_aad(b"data", FID)):
        with pytest.raises(IntegrityError):
            sealer.open(blob, a)


@pytest.mark.parametrize("cut", [1, TAG_LEN, 500])
def test_truncated_blob_fails(sealer, cut):
    data = os.urandom(1000)
    a = aad()
    blob = b"".join(sealer.seal_parts(data, a, form=WHOLE_OCB))
    with pytest.raises(IntegrityError):
        sealer.open(blob[:-cut], a, WHOLE_OCB)


@pytest.mark.parametrize("n", [0, 1, NONCE_LEN, OVERHEAD - 1])
def test_blob_shorter_than_overhead_fails(sealer, n):
    with pytest.raises(IntegrityError):
        sealer.open(b"\0" * n, aad(length=0))


def test_wrong_key_fails():
    data = os.urandom(1000)
    a = record_aad(b"meta", FID)
    blob = Sealer(os.urandom(32)).entry(FID).seal(data, a)
    with pytest.raises(IntegrityError):
        Sealer(os.urandom(32)).entry(FID).open(blob, a)


@pytest.mark.parametrize("form", [WHOLE_OCB, WHOLE_GCM])
def test_each_entry_has_its_own_keys(form):
    """The same plaintext sealed for two entries (same cache key, same associated data,
    even the same nonce) opens only under its own entry's keys: a nonce repeated across
    entries never meets the same key."""
    root = Sealer(os.urandom(32))
    x, y = root.entry(FID), root.entry(OTHER_FID)
    data, a, nonce = os.urandom(1000), aad(form=form), os.urandom(NONCE_LEN)
    bx = b"".join(x.seal_parts(data, a, nonce, form))
    by = b"".join(y.seal_parts(data, a, nonce, form))
    assert bx != by and bx[:NONCE_LEN] == by[:NONCE_LEN]
    assert x.open(bx, a, form) == y.open(by, a, form) == data
    for blob, other in ((bx, y), (by, x)):
        with pytest.raises(IntegrityError):
            other.open(blob, a, form)
    assert Sealer(root._key).entry(FID).open(bx, a, form) == data      # derived, not random


def test_entry_keys_are_derived_with_hkdf_from_the_cache_key_and_entry_id():
    """Key = HKDF-SHA256(cache key, salt = entry id, info = ENTRY_KDF_INFO): GCM key first,
    OCB3 key second; the cache key itself seals nothing."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    key, data = os.urandom(32), os.urandom(100)
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=FID,
               info=crypto_mod.ENTRY_KDF_INFO).derive(key)
    assert crypto_mod.ENTRY_KDF_INFO not in (b"ssecfs local cache v1",
                                             b"ssecfs cache chunks, AES-256-OCB3")
    e = Sealer(key).entry(FID)
    g = b"".join(e.seal_parts(data, aad(form=WHOLE_GCM), form=WHOLE_GCM))
    o = b"".join(e.seal_parts(data, aad(), form=WHOLE_OCB))
    assert AESGCM(okm[:32]).decrypt(g[:NONCE_LEN], g[NONCE_LEN:], aad(form=WHOLE_GCM)) == data
    assert AESOCB3(okm[32:]).decrypt(o[:NONCE_LEN], o[NONCE_LEN:], aad()) == data
    for k in (key, okm[32:]):
        with pytest.raises(Exception):
            AESGCM(k).decrypt(g[:NONCE_LEN], g[NONCE_LEN:], aad(form=WHOLE_GCM))
    for k in (key, okm[:32]):
        with pytest.raises(Exception):
            AESOCB3(k).decrypt(o[:NONCE_LEN], o[NONCE_LEN:], aad())


def test_aad_encodings_are_distinct():
    seen = {aad(i, n, g) for i in range(3) for n in (0, 1, 131072) for g in (0, 1, 2)}
    assert len(seen) == 27
    assert aad(0, 0) != aad(0, 0, fid=OTHER_FID)
    assert record_aad(b"meta", FID) != record_aad(b"meta", OTHER_FID)
    assert aad()[:13] == b"ssecfs-chunk\x06"          # the format version is bound too


def test_repr_hides_key():
    key = os.urandom(32)
    s = Sealer(key)
    assert key.hex() not in repr(s) and "hidden" in repr(s)
    assert "hidden" in repr(s.entry(FID)) and key.hex() not in repr(s.entry(FID))


# ------------------------------------------------------------------ the forms of a chunk
@pytest.mark.parametrize("form", [WHOLE_GCM, WHOLE_OCB])
@pytest.mark.parametrize("size", [0, 1, 4096, 128 * 1024])
def test_whole_chunk_forms_round_trip_and_refuse_tampering(sealer, form, size):
    data = os.urandom(size)
    a = aad(3, size, form=form)
    blob = b"".join(sealer.seal_parts(data, a, form=form))
    assert len(blob) == size + OVERHEAD
    assert sealer.open(blob, a, form) == data
    if size >= 16:
        assert data not in blob
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 1
    for b, x in ((bytes(bad), a), (blob, aad(4, size, form=form))):
        with pytest.raises(IntegrityError):
            sealer.open(b, x, form)


def test_forms_do_not_open_each_other(sealer):
    """A slot's header names its form; claiming another (the other cipher, or the same
    cipher with the other form's associated data) fails authentication."""
    data = os.urandom(1000)
    for form, other in ((WHOLE_OCB, WHOLE_GCM), (WHOLE_GCM, WHOLE_OCB)):
        blob = b"".join(sealer.seal_parts(data, aad(form=form), form=form))
        for aad_form, cipher_form in ((other, other), (form, other), (other, form)):
            with pytest.raises(IntegrityError):
                sealer.open(blob, aad(form=aad_form), cipher_form)
    assert len({aad(form=f) for f in FORMS}) == len(FORMS)
    assert len({sub_aad(FID, 0, 1, 1000, 0, b"w" * 8, f) for f in FORMS}) == len(FORMS)


@pytest.mark.parametrize("length", [1, 4096, 5000, 128 * 1024])
def test_split_form_round_trip(sealer, length):
    data, wid = os.urandom(length), os.urandom(8)
    blob = b"".join(seal_chunk(sealer, data, FID, 2, 9, wid))
    n = -(-length // 4096)
    assert sealer.split_form == SPLIT_OCB
    assert open_subs(sealer, blob, FID, 2, 9, length, wid, 0, n, SPLIT_OCB) == data
    for args in ((FID, 2, 9, length, wid, 0, n, SPLIT_GCM),    # another form
                 (FID, 2, 8, length, wid, 0, n, SPLIT_OCB),    # another generation
                 (FID, 2, 9, length, bytes(8), 0, n, SPLIT_OCB)):    # another write
        with pytest.raises(IntegrityError):
            open_subs(sealer, blob, *args)


def test_without_ocb_in_openssl_chunks_are_sealed_with_gcm(monkeypatch):
    def unsupported(key):
        raise UnsupportedAlgorithm("no AES-OCB3 in this OpenSSL")
    monkeypatch.setattr(crypto_mod, "AESOCB3", unsupported)
    root = Sealer(os.urandom(32))
    sealer = root.entry(FID)
    assert (root.whole_form, root.split_form) == (WHOLE_GCM, SPLIT_GCM)
    assert (sealer.whole_form, sealer.split_form) == (WHOLE_GCM, SPLIT_GCM)
    assert not sealer.can_open(WHOLE_OCB) and sealer.can_open(WHOLE_GCM)
    data, wid = os.urandom(5000), os.urandom(8)
    blob = b"".join(seal_chunk(sealer, data, FID, 0, 1, wid))
    assert open_subs(sealer, blob, FID, 0, 1, 5000, wid, 0, 2, SPLIT_GCM) == data
    with pytest.raises(IntegrityError, match="OCB3"):
        sealer.open(b"\0" * 100, aad(length=72), WHOLE_OCB)
