"""The encrypted on-disk chunk cache (ssecfs.cache): confidentiality, integrity, locking,
crash recovery, and the eviction bound."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.exceptions import UnsupportedAlgorithm

from helpers import cache_files, marker_blob, scan_dir_for, wait_until
from ssecfs.cache import Cache, oscalls
from ssecfs.cache import datafile as datafile_mod, entry as entry_mod, layout as layout_mod
from ssecfs.crypto import aead as crypto_mod
from ssecfs.cache.cachedir import SEAL_BATCH
from ssecfs.errors import EXIT_CACHE
from ssecfs.cache.layout import (BASE, CHUNK, HEADER, NEVER, RHEADER, RSLOT, SLOT, SLOT_MAGIC,
                                 SUBS_AT, VERSION_TEXT, _cost, read_records)
from ssecfs.cache import spares as spares_mod
from ssecfs.cache.pending import Slots
from ssecfs.cache.spares import Spares
from ssecfs.crypto.aead import (OVERHEAD, SPLIT_GCM, SPLIT_OCB, SUB, SUB_SEALED, WHOLE_GCM,
                           WHOLE_OCB, Sealer, open_subs, sub_aad)
from ssecfs.errors import EXIT_CACHE, IntegrityError, NameTooLong, NoSpace, UserError
from ssecfs.crypto.keys import Key

COST = _cost(CHUNK)           # accounted bytes of one full chunk (whole 4 KiB blocks)
# slot forms: AES-OCB3, and AES-GCM where OpenSSL lacks OCB3; whole, and in sub-blocks
MAGIC_WHOLE, MAGIC_SPLIT = SLOT_MAGIC[WHOLE_OCB], SLOT_MAGIC[SPLIT_OCB]
MAGIC_WHOLE_GCM, MAGIC_SPLIT_GCM = SLOT_MAGIC[WHOLE_GCM], SLOT_MAGIC[SPLIT_GCM]


class Keys:
    def __init__(self, n: int = 2):
        self.keys = [Key(os.urandom(32)) for _ in range(n)]

    def sealers(self, *idx: int) -> dict:
        return {self.keys[i].fingerprint: Sealer(self.keys[i].cache_key()) for i in idx}

    def fp(self, i: int) -> str:
        return self.keys[i].fingerprint


@pytest.fixture
def keys():
    return Keys(2)


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


def make_cache(directory, keys: Keys, ring=(0,), current=0, max_bytes=64 * COST) -> Cache:
    c = Cache(directory, keys.sealers(*ring), max_bytes, keys.fp(current))
    c.open()
    return c


@contextlib.contextmanager
def open_cache(directory, keys: Keys, **kw):
    """make_cache(...), closed when the block ends."""
    c = make_cache(directory, keys, **kw)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def cache(cache_dir, keys):
    c = make_cache(cache_dir, keys)
    yield c
    c.close()


@pytest.fixture
def bounded_cache(cache_dir, keys):
    """bounded_cache(n): a cache that holds n full chunks, closed after the test."""
    made = []

    def make(chunks: int) -> Cache:
        made.append(make_cache(cache_dir, keys, max_bytes=chunks * COST))
        return made[-1]
    yield make
    for c in made:
        c.close()


def fill_clean(e, n: int) -> None:
    """Chunks 0..n-1 of e: random full chunks, clean (fetched from the bucket)."""
    for i in range(n):
        e.write_chunk(i, os.urandom(CHUNK), dirty=False)


def slot_offset(index: int, pos: int = 0) -> int:
    """Where slot `pos` (0 or 1) of chunk `index` lives in an entry's data file."""
    return BASE + (2 * index + pos) * SLOT


def rescan(e, trusted: bool = True) -> None:
    """What a restart knows of an entry: only what its slot headers say. trusted: the
    record recovered confirms every version found (else each is verified at first use)."""
    with e.io_lock:
        for m in (e.present, e.slots, e.stale, e.unverified):
            m.clear()
    e.ledger.trusted = NEVER if trusted else -1
    e.scan_slots()


def write_header(e, index: int, magic: bytes, length: int, gen: int | None = None,
                 pos: int = 0) -> None:
    with open(e.data_path, "r+b") as f:
        f.seek(slot_offset(index, pos))
        f.write(HEADER.pack(magic, length, e.slots[index].gen if gen is None else gen))


# ------------------------------------------------------------------------- chunks
@pytest.mark.parametrize("length", [1, 1000, CHUNK - 1, CHUNK])
def test_chunk_round_trip(cache, length):
    e = cache.new_entry()
    data = os.urandom(length)
    e.write_chunk(0, data)
    e.write_chunk(5, data[::-1])
    assert e.read_chunk(0) == data
    assert e.read_chunk(5) == data[::-1]
    assert e.read_chunk(1) is None and e.read_chunk(4) is None
    assert e.has(0) and e.has(5) and not e.has(2)
    # overwrite with a shorter chunk
    e.write_chunk(0, b"short")
    assert e.read_chunk(0) == b"short"


def test_chunk_too_big_or_empty_refused(cache):
    e = cache.new_entry()
    with pytest.raises((AssertionError, ValueError)):
        e.write_chunk(0, b"x" * (CHUNK + 1))
    with pytest.raises((AssertionError, ValueError)):
        e.write_chunk(0, b"")


def test_no_plaintext_in_cache_dir(cache, cache_dir, keys):
    marker, data = marker_blob()
    assert len(data) < CHUNK
    e = cache.new_entry()
    e.write_chunk(0, data)
    e.write_chunk(1, data, dirty=False)
    big = os.urandom(CHUNK - len(data)) + data        # marker at the end of a full chunk
    big = big[:CHUNK]
    e.write_chunk(2, big)
    name_marker = b"SECRET-NAME-" + os.urandom(6).hex().encode()
    e.save_state({"dirty": True, "path": "/" + name_marker.decode(),
                  "key": name_marker.decode(), "note": data.hex()})
    e.sync()
    cache.set_dirty(e, True)
    e.close_fd()
    for needle in (marker, name_marker, data.hex().encode()[:64]):
        assert scan_dir_for(cache_dir, needle) == [], needle
    # no form of the SSE-C key, nor the derived cache key, is stored either
    for secret in keys.keys[0].secret_forms() + [keys.keys[0].cache_key()]:
        assert scan_dir_for(cache_dir, secret) == []
    assert e.read_chunk(2) == big and e.load_state()["path"] == "/" + name_marker.decode()


def test_flipped_byte_in_slot_fails(cache):
    e = cache.new_entry()
    data = os.urandom(5000)
    e.write_chunk(3, data)
    e.sync()
    with open(e.data_path, "r+b") as f:
        pos = slot_offset(3) + HEADER.size + 100
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(IntegrityError):
        e.read_chunk(3)


@pytest.mark.parametrize("split", [False, True])
def test_tampered_slot_header_fails(cache, split):
    e = cache.new_entry()
    data = os.urandom(5000)
    e.write_chunk(0, data)
    e.sync()
    if split:
        write_split(e, 0, data)
    magic, others = ((MAGIC_SPLIT, (MAGIC_WHOLE, MAGIC_SPLIT_GCM, MAGIC_WHOLE_GCM)) if split
                     else (MAGIC_WHOLE, (MAGIC_SPLIT, MAGIC_WHOLE_GCM, MAGIC_SPLIT_GCM)))
    gen = e.slots[0].gen
    # what the header claims is believed after a restart (rescan): the tags refuse it
    for claim in [(magic, 4999, gen),                # one byte less
                  (magic, 5000, gen + 1), (magic, 5000, gen - 1)]:     # another generation
        write_header(e, 0, *claim)
        with pytest.raises(IntegrityError):
            e.read_chunk(0)                          # (not what this process wrote)
        rescan(e)
        assert (e.slots[0].gen, e.slots[0].length) == (claim[2], claim[1])
        with pytest.raises(IntegrityError):
            e.read_chunk(0)
        with pytest.raises(IntegrityError):
            e.read_range(0, 0, 100)
    for other in others:       # claims another form: the other shape, or the same with GCM
        write_header(e, 0, other, 5000, gen)
        rescan(e)
        with pytest.raises(IntegrityError):
            e.read_chunk(0)
    write_header(e, 0, b"XXXX", 5000, gen)           # bad magic: an absent chunk
    rescan(e)
    assert not e.has(0)
    write_header(e, 0, magic, 5000, gen)
    rescan(e)
    assert e.read_chunk(0) == data


# ------------------------------------------------------------------------- sub-blocks
WINDOWS = [(0, 4096), (4096, 8192), (SUB - 1, SUB + 1), (SUB, 2 * SUB), (100, 3 * SUB + 7),
           (0, CHUNK), (CHUNK - 4096, CHUNK), (5000, 5001), (SUB * 3 + 5, CHUNK)]


def slot_magic(e, index: int) -> bytes:
    """The magic of the slot that holds chunk `index`'s newest version."""
    with open(e.data_path, "rb") as f:
        f.seek(slot_offset(index, e.slots[index].pos))
        return f.read(4)


def write_split(e, index: int, data: bytes) -> None:
    """Store a chunk and have it sealed in sub-blocks: written chunks are sealed whole; a
    random read of one of a clean entry has it sealed again in sub-blocks."""
    e.write_chunk(index, data, dirty=False)
    e.sync()
    assert slot_magic(e, index) == MAGIC_WHOLE
    assert e.read_range(index, 0, 1, random=True) == data[:1]
    e.drain()
    assert slot_magic(e, index) == MAGIC_SPLIT and e.slots[index].form == SPLIT_OCB


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("length", [1, 5000, SUB, SUB + 1, 3 * SUB + 100, CHUNK])
def test_read_range_equals_slice_of_chunk(cache, length, split):
    e = cache.new_entry()
    data = os.urandom(length)
    e.write_chunk(2, data)
    from_memory = [e.read_range(2, lo, hi) for lo, hi in WINDOWS]   # still pending, maybe
    e.sync()
    if split:
        write_split(e, 2, data)
    assert not e.pending
    for (lo, hi), mem in zip(WINDOWS, from_memory):
        assert e.read_range(2, lo, hi) == data[lo:hi] == mem, (lo, hi)
    assert e.read_chunk(2) == data
    assert e.read_range(3, 0, 4096) is None


def test_written_chunks_are_sealed_whole_and_resealed_in_sub_blocks_when_read_at_random(
        cache):
    e = cache.new_entry()
    data = [os.urandom(CHUNK) for _ in range(4)]
    for i, d in enumerate(data):
        e.write_chunk(i, d, dirty=False)
    e.sync()
    assert [slot_magic(e, i) for i in range(4)] == [MAGIC_WHOLE] * 4
    assert e.read_range(0, 100, 200) == data[0][100:200]          # part of a sequential read
    assert e.read_range(1, 100, 200, random=True) == data[1][100:200]
    e.drain()
    assert [slot_magic(e, i) for i in range(2)] == [MAGIC_WHOLE, MAGIC_SPLIT]
    assert e.read_chunk(1) == data[1] and e.read_range(1, SUB, 3 * SUB) == data[1][SUB:3 * SUB]
    # written again: sealed whole again
    e.write_chunk(1, data[2], dirty=False)
    e.sync()
    assert slot_magic(e, 1) == MAGIC_WHOLE and e.slots[1].form == WHOLE_OCB
    assert [s.pos for s in e.slots.values()] == [0] * 4          # no dirty record: in place
    assert e.read_range(1, 5, 50, random=True) == data[2][5:50]
    e.drain()
    assert slot_magic(e, 1) == MAGIC_SPLIT and e.read_chunk(1) == data[2]


def test_a_random_4k_read_decrypts_one_4k_sub_block(cache, monkeypatch):
    e = cache.new_entry()
    data = os.urandom(CHUNK)
    write_split(e, 0, data)
    opened = []
    real = e.sealer.open
    monkeypatch.setattr(e.sealer, "open", lambda blob, aad, form: opened.append(len(blob)) or
                        real(blob, aad, form))
    assert e.read_range(0, 5 * 4096, 6 * 4096, random=True) == data[5 * 4096:6 * 4096]
    assert opened == [4096 + OVERHEAD]


def test_sub_block_aad_names_its_form_and_generation():
    bid, wid = os.urandom(16), os.urandom(8)
    sealer = Sealer(os.urandom(32)).entry(bid)
    blob = b"".join(sealer.seal_parts(b"x" * 100, sub_aad(bid, 0, 7, 100, 0, wid, SPLIT_GCM),
                                      form=SPLIT_GCM))
    assert open_subs(sealer, blob, bid, 0, 7, 100, wid, 0, 1, SPLIT_GCM) == b"x" * 100
    for gen, form in ((7, SPLIT_OCB), (6, SPLIT_GCM), (8, SPLIT_GCM)):
        with pytest.raises(IntegrityError):
            open_subs(sealer, blob, bid, 0, gen, 100, wid, 0, 1, form)


def test_no_reseal_of_a_dirty_entry_or_after_a_write(cache, monkeypatch):
    """Re-sealing rewrites a slot: never for dirty data (a crash in the middle would cost
    data that exists nowhere else), never with bytes a write has replaced meanwhile."""
    e = cache.new_entry()
    d0, d1 = os.urandom(CHUNK), os.urandom(CHUNK)
    e.write_chunk(0, d0)
    e.write_chunk(1, d1)
    e.sync()
    cache.set_dirty(e, True)
    assert e.read_range(0, 0, 10, random=True) == d0[:10]
    e.drain()
    assert slot_magic(e, 0) == MAGIC_WHOLE and {s.form for s in e.slots.values()} == {WHOLE_OCB}
    cache.set_dirty(e, False)
    # a write between the read and the re-seal: the read's bytes are not written back
    e._resplit(1, d1, e.writes - 1)
    e.drain()
    assert slot_magic(e, 1) == MAGIC_WHOLE and e.read_chunk(1) == d1
    # the entry turns dirty while the chunk is being sealed (outside the entry's lock): the
    # sealed slot is not written
    real = layout_mod.seal_chunk

    def seal_while_turning_dirty(*args):
        cache.set_dirty(e, True)
        return real(*args)
    monkeypatch.setattr(layout_mod, "seal_chunk", seal_while_turning_dirty)
    e._resplit(1, d1, e.writes)
    assert e.dirty
    assert slot_magic(e, 1) == MAGIC_WHOLE and not e.pending and e.read_chunk(1) == d1


def test_slot_is_sealed_in_sub_blocks(cache, keys):
    """The slot's bytes: header with a generation and a write id, then one
    nonce|ciphertext|tag per 4 KiB of plaintext, each bound to its entry (key and id),
    chunk, generation, length, number and write."""
    e = cache.new_entry()
    length = 3 * SUB + 100
    data = os.urandom(length)
    write_split(e, 0, data)
    with open(e.data_path, "rb") as f:
        f.seek(slot_offset(0))
        raw = f.read()
    assert len(raw) == SUBS_AT + 3 * SUB_SEALED + 100 + 28
    gen = e.slots[0].gen
    assert HEADER.unpack_from(raw) == (MAGIC_SPLIT, length, gen)
    wid = raw[HEADER.size:SUBS_AT]
    sealer = keys.sealers(0)[keys.fp(0)].entry(e.bid)
    sub1 = raw[SUBS_AT + SUB_SEALED:SUBS_AT + 2 * SUB_SEALED]
    f = SPLIT_OCB
    b = e.bid
    assert sealer.open(sub1, sub_aad(b, 0, gen, length, 1, wid, f), f) == data[SUB:2 * SUB]
    for aad in (sub_aad(b, 0, gen, length, 2, wid, f), sub_aad(b, 1, gen, length, 1, wid, f),
                sub_aad(b, 0, gen, length + 1, 1, wid, f), sub_aad(b, 0, gen + 1, length, 1, wid, f),
                sub_aad(b, 0, gen, length, 1, bytes(8), f),
                sub_aad(b, 0, gen, length, 1, wid, SPLIT_GCM)):
        with pytest.raises(IntegrityError):
            sealer.open(sub1, aad, f)
    with pytest.raises(IntegrityError):          # the same associated data, GCM's key
        sealer.open(sub1, sub_aad(b, 0, gen, length, 1, wid, f), SPLIT_GCM)
    other = keys.sealers(0)[keys.fp(0)].entry(os.urandom(16))     # another entry's keys
    with pytest.raises(IntegrityError):
        other.open(sub1, sub_aad(b, 0, gen, length, 1, wid, f), f)


def corrupt(path: str, pos: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x01]))


def test_corrupt_sub_block_fails_only_the_reads_that_need_it(cache):
    e = cache.new_entry()
    data = os.urandom(CHUNK)
    write_split(e, 1, data)
    corrupt(e.data_path, slot_offset(1) + SUBS_AT + 2 * SUB_SEALED + 500)   # sub-block 2
    assert e.read_range(1, 0, 4096) == data[:4096]              # sub-block 0: intact
    assert e.read_range(1, 3 * SUB, CHUNK) == data[3 * SUB:]    # sub-block 3: intact
    for lo, hi in [(2 * SUB, 2 * SUB + 4096), (SUB, 3 * SUB), (0, CHUNK)]:
        with pytest.raises(IntegrityError):
            e.read_range(1, lo, hi)
    with pytest.raises(IntegrityError):
        e.read_chunk(1)


def test_swapped_sub_blocks_fail(cache):
    e = cache.new_entry()
    write_split(e, 0, os.urandom(CHUNK))
    with open(e.data_path, "r+b") as f:
        f.seek(slot_offset(0) + SUBS_AT)
        a = f.read(SUB_SEALED)
        b = f.read(SUB_SEALED)
        f.seek(slot_offset(0) + SUBS_AT)
        f.write(b + a)
    with pytest.raises(IntegrityError):
        e.read_range(0, 0, 100)
    with pytest.raises(IntegrityError):
        e.read_range(0, SUB, SUB + 100)
    with pytest.raises(IntegrityError):
        e.read_chunk(0)


def test_slot_torn_between_two_writes_fails(cache):
    """A crash in the middle of rewriting a chunk can leave sub-blocks of the old write next
    to the new header and sub-blocks: each is authentic alone, the mix must not be."""
    e = cache.new_entry()
    old_data, new_data = os.urandom(CHUNK), os.urandom(CHUNK)
    write_split(e, 0, old_data)
    with open(e.data_path, "rb") as f:
        f.seek(slot_offset(0))
        old_slot = f.read(SLOT)
    write_split(e, 0, new_data)
    assert e.read_chunk(0) == new_data
    with open(e.data_path, "r+b") as f:
        f.seek(slot_offset(0) + SUBS_AT + 2 * SUB_SEALED)
        f.write(old_slot[SUBS_AT + 2 * SUB_SEALED:])     # the old write's last two sub-blocks
    assert e.read_range(0, 0, 2 * SUB) == new_data[:2 * SUB]
    with pytest.raises(IntegrityError):
        e.read_range(0, 2 * SUB, 2 * SUB + 4096)
    with pytest.raises(IntegrityError):
        e.read_chunk(0)
    # the same after a restart, when the write id comes from the slot's header
    rescan(e)
    assert e.read_range(0, 0, 2 * SUB) == new_data[:2 * SUB]
    with pytest.raises(IntegrityError):
        e.read_range(0, 2 * SUB, 2 * SUB + 4096)
    with open(e.data_path, "r+b") as f:
        f.seek(slot_offset(0))
        f.write(old_slot[:SUBS_AT])                      # and now the old header: its first
    rescan(e)                                            # two sub-blocks are the new write's
    with pytest.raises(IntegrityError):
        e.read_range(0, 0, 4096)
    with pytest.raises(IntegrityError):
        e.read_chunk(0)
    assert e.read_range(0, 3 * SUB, CHUNK) == old_data[3 * SUB:]   # wholly old: authentic


def test_slot_cut_short_fails(cache):
    e = cache.new_entry()
    write_split(e, 0, os.urandom(CHUNK))
    os.truncate(e.data_path, slot_offset(0) + SUBS_AT + 3 * SUB_SEALED + 1000)
    assert len(e.read_range(0, 0, SUB)) == SUB
    with pytest.raises(IntegrityError):
        e.read_range(0, CHUNK - 10, CHUNK)
    with pytest.raises(IntegrityError):
        e.read_chunk(0)


@pytest.mark.parametrize("subs_left", [0, 1, 2, 3])
def test_slot_cut_at_a_sub_block_boundary_fails(cache, subs_left):
    """Cut exactly after a sub-block, the slot holds fewer sub-blocks than its length says:
    never read as a shorter chunk (which a read would pad with zeros)."""
    e = cache.new_entry()
    data = os.urandom(CHUNK)
    write_split(e, 0, data)
    os.truncate(e.data_path, slot_offset(0) + SUBS_AT + subs_left * SUB_SEALED)
    for lo, hi in [(subs_left * SUB, subs_left * SUB + 1), (0, CHUNK),
                   (max(0, subs_left - 1) * SUB, CHUNK)]:
        with pytest.raises(IntegrityError):
            e.read_range(0, lo, hi)
    with pytest.raises(IntegrityError):
        e.read_chunk(0)
    if subs_left:
        assert e.read_range(0, 0, subs_left * SUB) == data[:subs_left * SUB]


def without_ocb(key):
    raise UnsupportedAlgorithm("no AES-OCB3 in this OpenSSL")


def test_where_openssl_lacks_ocb_chunks_are_sealed_with_gcm(cache_dir, keys, monkeypatch):
    """Where OpenSSL lacks OCB3 (a FIPS build), chunks are sealed with AES-GCM, whole and in
    sub-blocks: two forms of the same format. Such a cache, opened where OCB3 is there,
    reads them as they are and seals new chunks with OCB3; a slot sealed with OCB3 is
    refused, never misread nor taken for a torn one, where OCB3 is missing."""
    data = {0: os.urandom(CHUNK), 1: os.urandom(5000)}
    with monkeypatch.context() as mp:
        mp.setattr(crypto_mod, "AESOCB3", without_ocb)
        c = make_cache(cache_dir, keys)
        e = c.new_entry()
        for i, d in data.items():
            e.write_chunk(i, d, dirty=False)
        e.sync()
        assert e.read_range(1, 0, 1, random=True) == data[1][:1]      # re-sealed in sub-blocks
        e.drain()
        assert [slot_magic(e, i) for i in (0, 1)] == [MAGIC_WHOLE_GCM, MAGIC_SPLIT_GCM]
        c.set_dirty(e, True)
        e.save_state({"dirty": True, "path": "/f", "size": CHUNK + 5000})
        e.close_fd()
        c.close()
    with open_cache(cache_dir, keys) as c:
        (e, state), = c.recover()[0]
        assert state["dirty"] and e.present == {0: CHUNK, 1: 5000}
        for i, d in data.items():
            assert e.read_chunk(i) == d
            for lo, hi in WINDOWS:
                assert e.read_range(i, lo, hi) == d[lo:hi], (i, lo, hi)
        assert e.slots[1].form == SPLIT_GCM
        e.write_chunk(2, b"new")
        e.save_state({"dirty": True, "path": "/f", "size": 2 * CHUNK + 3})
        e.save_state({"dirty": True, "path": "/f", "size": 2 * CHUNK + 3})   # confirms it
        assert slot_magic(e, 2) == MAGIC_WHOLE and e.read_chunk(2) == b"new"
        e.close_fd()
    for trusted in (True, False):
        with monkeypatch.context() as mp:
            mp.setattr(crypto_mod, "AESOCB3", without_ocb)
            with open_cache(cache_dir, keys) as c:
                (e, _), = c.recover()[0]
                if not trusted:
                    rescan(e, trusted=False)       # verified at first use: not taken as torn
                assert e.read_chunk(0) == data[0]
                with pytest.raises(IntegrityError, match="OCB3"):
                    e.read_chunk(2)
                assert e.has(2)


def test_a_cache_of_another_format_is_refused_with_how_to_drain_it(cache_dir, keys):
    """Only this format is read: a directory another ssecfs version wrote is refused, in one
    line that says how to get its pending uploads out, and nothing in it is touched."""
    make_cache(cache_dir, keys).close()
    assert VERSION_TEXT == "ssecfs-cache 6\n"
    for text in ("ssecfs-cache 5\n", "ssecfs-cache 1\n", "ssecfs-cache 7\n"):
        with open(os.path.join(cache_dir, "VERSION"), "w") as f:
            f.write(text)
        with pytest.raises(UserError) as err:
            make_cache(cache_dir, keys)
        msg = str(err.value)
        assert err.value.exit_code == EXIT_CACHE == 6 and "\n" not in msg
        assert repr(text.strip()) in msg and "(6)" in msg
        assert "mount it once with the ssecfs version that wrote it" in msg
        assert "remove the directory" in msg and cache_dir in msg
        with open(os.path.join(cache_dir, "VERSION")) as f:
            assert f.read() == text


def test_slot_moved_to_another_index_or_entry_fails(cache):
    a, b = cache.new_entry(), cache.new_entry()
    a.write_chunk(0, b"A" * 100)
    a.write_chunk(1, b"B" * 100)
    b.write_chunk(0, b"C" * 100)
    for e in (a, b):
        e.sync()
    with open(a.data_path, "r+b") as f:
        f.seek(slot_offset(0))
        slot0 = f.read(SLOT)
        f.seek(slot_offset(1))
        f.write(slot0)                                # chunk 0's slot at index 1
    with pytest.raises(IntegrityError):
        a.read_chunk(1)
    rescan(a)                                         # its header believed: the tag refuses
    with pytest.raises(IntegrityError):
        a.read_chunk(1)
    with open(b.data_path, "r+b") as f:
        f.seek(slot_offset(0))
        f.write(slot0)                                # a's chunk 0 into b's chunk 0
    rescan(b)
    with pytest.raises(IntegrityError):
        b.read_chunk(0)


def test_a_record_too_big_for_its_slot_is_refused_as_a_name_too_long(cache):
    e = cache.new_entry()
    e.save_state({"dirty": True, "path": "/f", "size": 1})
    with pytest.raises(NameTooLong):
        e.save_state({"dirty": True, "path": "/" + "n" * RSLOT, "size": 2})
    assert e.load_state()["size"] == 1            # the record before it stands


def test_tampered_journal_record_fails(cache):
    e = cache.new_entry()
    e.save_state({"dirty": True, "size": 1})
    corrupt(e.data_path, RHEADER.size + 5)
    with pytest.raises(IntegrityError):
        e.load_state()


def test_records_alternate_and_a_torn_newest_falls_back_to_the_previous(cache_dir, keys):
    """Records go to the two record slots in turn (record n to slot n % 2), so a crash in
    the middle of writing one leaves the previous one whole; recovery takes the newest that
    authenticates, and the next record goes over the torn one, never over the one
    recovered."""
    c = make_cache(cache_dir, keys)
    e = c.new_entry()
    e.write_chunk(0, b"data")
    for gen in range(1, 4):
        e.save_state({"dirty": True, "generation": gen})
    (seq, _, _), (older, _, _) = read_records(e.data_path)
    assert seq > older and seq % 2 != older % 2
    assert e.load_state()["generation"] == 3
    e.close_fd()
    c.close()
    newest = (seq % 2) * RSLOT
    corrupt(e.data_path, newest + RHEADER.size + 3)          # generation 3's record torn
    with open_cache(cache_dir, keys) as c:
        (r, state), = c.recover()[0]
        assert state["generation"] == 2 and r.read_chunk(0) == b"data"
        r.save_state({"dirty": True, "generation": 4}, sync=False)
        assert r.load_state()["generation"] == 4
        assert read_records(r.data_path)[0][0] % 2 == seq % 2   # over the torn one
        corrupt(r.data_path, newest + RHEADER.size + 3)
        assert r.load_state()["generation"] == 2             # the one kept whole
        r.close_fd()


def test_a_record_never_goes_over_the_newest_flushed_one(cache_dir, keys, monkeypatch):
    """After an upload, the clean record is written without a flush. If the power fails
    before it reaches the disk while the next close writes its record, a record written
    over the newest flushed one (alternating blindly) could leave the disk with a torn
    record and, in the other slot, a dirty record older than the one last acknowledged:
    recovery would upload that older state over the newer object. The next record goes
    over the unflushed one instead."""
    c = make_cache(cache_dir, keys)
    e = c.new_entry()
    e.write_chunk(0, b"data")
    e.save_state({"dirty": True, "v": 1})
    e.save_state({"dirty": True, "v": 2})              # acknowledged; then uploaded
    flushed = {slot: slot_record(e, slot) for slot in (0, 1)}
    e.drop_state()                                     # the clean record, not flushed
    for slot, raw in flushed.items():                  # ... and it never reached the disk
        with open(e.data_path, "r+b") as f:
            f.seek(slot * RSLOT)
            f.write(raw)
    real = os.pwrite

    def torn_record(fd, data, off):
        real(fd, bytes(data)[:RHEADER.size + 5], off)
        return len(data)

    class PowerCut(Exception):
        pass

    def fdatasync(fd):
        raise PowerCut()
    monkeypatch.setattr(datafile_mod.os, "pwrite", torn_record)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with pytest.raises(PowerCut):
        e.save_state({"dirty": True, "v": 3})          # the next close, cut
    monkeypatch.undo()
    e.close_fd()
    c.close()
    with open_cache(cache_dir, keys) as c:
        (r, state), = c.recover()[0]
        assert state["v"] == 2


def slot_record(e, slot: int) -> bytes:
    with open(e.data_path, "rb") as f:
        f.seek(slot * RSLOT)
        return f.read(RSLOT)


# ------------------------------------------------------------------------- directory, lock
def test_cache_dir_created_0700(cache_dir, keys):
    with open_cache(cache_dir, keys) as c:
        for d in (cache_dir, os.path.join(cache_dir, "entries")):
            assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        e = c.new_entry()
        e.write_chunk(0, b"x" * 10)
        e.save_state({"dirty": True})
        # one file per entry; the others are spares, empty until an entry takes one
        others = set(os.listdir(c.entries_dir)) - {e.id + ".data"}
        assert all(os.path.getsize(os.path.join(c.entries_dir, n)) == 0 for n in others)
        assert all(n.endswith(".data") and len(n) == 37 for n in others)
        assert stat.S_IMODE(os.stat(e.data_path).st_mode) & 0o077 == 0


def test_existing_permissive_dir_tightened(tmp_path, keys):
    d = tmp_path / "loose"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    with open_cache(str(d), keys):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_second_open_refused_until_closed(cache_dir, keys):
    with open_cache(cache_dir, keys):
        with pytest.raises(UserError) as e:
            make_cache(cache_dir, keys)
        assert "in use" in str(e.value)
    again = make_cache(cache_dir, keys)          # the lock is released by close()
    again.close()


def test_unknown_format_refused(cache_dir, keys):
    make_cache(cache_dir, keys).close()
    with open(os.path.join(cache_dir, "VERSION"), "w") as f:
        f.write("ssecfs-cache 99\n")
    with pytest.raises(UserError):
        make_cache(cache_dir, keys)


# ------------------------------------------------------------------------- recovery
def test_recover(cache_dir, keys):
    # an entry sealed with key 1 (the current key of an earlier mount), which the next ring
    # will not hold
    c = make_cache(cache_dir, keys, ring=(1,), current=1)
    other = c.new_entry()
    other.write_chunk(0, b"other key data")
    other.save_state({"v": 1, "dirty": True, "path": "/c"})
    other.sync()
    c.close()

    c = make_cache(cache_dir, keys, ring=(0, 1), current=0)
    dirty = c.new_entry()
    chunks = {0: os.urandom(CHUNK), 2: os.urandom(777)}
    for i, d in chunks.items():
        dirty.write_chunk(i, d)
    c.set_dirty(dirty, True)
    dirty_state = {"v": 1, "dirty": True, "path": "/a", "size": 2 * CHUNK + 777, "meta": {"mode": 33188}}
    dirty.save_state(dirty_state)
    clean = c.new_entry()
    clean.write_chunk(0, b"clean data", dirty=False)
    clean.save_state({"v": 1, "dirty": False, "path": "/b"})
    half = c.new_entry()
    half.write_chunk(0, b"never journaled")          # no record: a half-created entry
    for e in (dirty, clean, half):
        e.sync()
    c.close()                                        # (a crash would also drop the lock)

    c2 = Cache(cache_dir, keys.sealers(0), 64 * COST, keys.fp(0))
    c2.open()
    try:
        entries, bad = c2.recover()
        assert [(e.id, s) for e, s in entries] == [(dirty.id, dirty_state)]
        e = entries[0][0]
        assert e.dirty
        assert sorted(e.present) == [0, 2]
        for i, d in chunks.items():
            assert e.read_chunk(i) == d
        assert e.read_chunk(1) is None
        st = c2.stats()
        used = _cost(CHUNK) + _cost(777)
        assert st["cache_used_bytes"] == used and st["cache_dirty_bytes"] == used
        # clean and half-created entries are removed
        for p in (clean.data_path, half.data_path):
            assert not os.path.exists(p), p
        # the entry under a key not in the ring is kept and reported
        assert bad == [other.id]
        assert os.path.exists(other.data_path)
    finally:
        c2.close()

    # with the key back in the ring (as an old key), that entry is recovered too
    c3 = Cache(cache_dir, keys.sealers(0, 1), 64 * COST, keys.fp(0))
    c3.open()
    try:
        entries, bad = c3.recover()
        got = {e.id: (e, s) for e, s in entries}
        assert bad == [] and set(got) == {dirty.id, other.id}
        oe, ostate = got[other.id]
        assert ostate["path"] == "/c" and oe.read_chunk(0) == b"other key data"
    finally:
        c3.close()


def test_recover_torn_record_kept_and_reported(cache_dir, keys):
    c = make_cache(cache_dir, keys)
    e = c.new_entry()
    e.write_chunk(0, b"data")
    e.save_state({"dirty": True, "path": "/t"})
    e.sync()
    c.close()
    assert len(read_records(e.data_path)) == 2     # the record, its confirmation
    with open(e.data_path, "r+b") as f:             # both torn
        for slot in (0, 1):
            f.seek(slot * RSLOT + RHEADER.size)
            f.write(bytes(10))
    with open_cache(cache_dir, keys) as c2:
        entries, bad = c2.recover()
        assert entries == [] and bad == [e.id]
        assert os.path.exists(e.data_path)


def test_recover_evicted_hole_is_absent(cache_dir, keys):
    """A punched (evicted) slot reads back as absent after a restart, not as garbage."""
    c = make_cache(cache_dir, keys, max_bytes=2 * COST)
    e = c.new_entry()
    fill_clean(e, 4)
    assert not e.has(0) and e.has(3)
    e.save_state({"dirty": True})
    e.sync()
    c.close()
    with open_cache(cache_dir, keys) as c2:
        (r, _), = c2.recover()[0]
        assert 0 not in r.present and 1 not in r.present
        assert sorted(r.present) == [2, 3]
        assert r.read_chunk(0) is None


# ------------------------------------------------------------------------- eviction
def test_eviction_bounds_clean_chunks(bounded_cache):
    c = bounded_cache(4)
    e = c.new_entry()
    for i in range(10):
        e.write_chunk(i, os.urandom(CHUNK), dirty=False)
        assert c.stats()["cache_used_bytes"] <= 4 * COST
    present = [i for i in range(10) if e.read_chunk(i) is not None]
    assert present == [6, 7, 8, 9]                # least recently used went first


def test_eviction_is_lru_by_reads(bounded_cache):
    e = bounded_cache(3).new_entry()
    fill_clean(e, 3)
    assert e.read_chunk(0) is not None             # 0 becomes most recently used
    e.write_chunk(3, os.urandom(CHUNK), dirty=False)
    assert e.has(0) and not e.has(1) and e.has(2) and e.has(3)


@pytest.mark.parametrize("how", ["read_chunk", "read_range"])
def test_a_read_before_sealing_also_counts_for_lru(bounded_cache, how):
    # the chunks are still waiting for a sealer when chunk 0 is read (what a loaded machine
    # does at random): that read must make it recently used all the same
    c = bounded_cache(3)
    held = []
    submit = c._sealers.submit
    c._sealers.submit = held.append
    try:
        e = c.new_entry()
        fill_clean(e, 3)
        assert sorted(e.pending) == [0, 1, 2]
        got = e.read_chunk(0) if how == "read_chunk" else e.read_range(0, 0, 10)
        assert got is not None
        e.write_chunk(3, os.urandom(CHUNK), dirty=False)
        assert e.has(0) and not e.has(1) and e.has(2) and e.has(3)
    finally:
        c._sealers.submit = submit
        for job in held:
            job()


def test_write_chunks_seals_a_batch_in_one_job(cache):
    """A fetched read unit is handed to the sealers once, not once per chunk; a chunk a
    write got to first is not overwritten by the fetched bytes."""
    e = cache.new_entry()
    mine = os.urandom(CHUNK)
    e.write_chunk(2, mine, dirty=False)
    e.sync()
    fetched = {i: os.urandom(CHUNK) for i in range(5)}
    jobs = []
    submit = cache._sealers.submit
    cache._sealers.submit = lambda job: jobs.append(job) or submit(job)
    try:
        stored = e.write_chunks(fetched, dirty=False, only_if=lambda: True)
    finally:
        cache._sealers.submit = submit
    assert stored == [0, 1, 3, 4] and len(jobs) == 1
    e.sync()
    assert not e.pending and all(slot_magic(e, i) == MAGIC_WHOLE for i in range(5))
    assert [e.read_chunk(i) for i in range(5)] == [fetched[0], fetched[1], mine, fetched[3],
                                                     fetched[4]]
    assert e.write_chunks({7: os.urandom(100)}, dirty=False, only_if=lambda: False) == []
    assert not e.has(7)


def test_many_fetchers_never_wait_for_each_other_on_the_memory_bound(cache, monkeypatch):
    """Eight fetchers storing read units bigger than the bound on plaintext waiting for the
    sealers allows at once: each hands over what it holds before it waits for more (a
    version that took all its slots first, then handed the unit over, deadlocked)."""
    import threading
    monkeypatch.setattr(cache, "_pending_slots", Slots(6))
    entries = [cache.new_entry() for _ in range(8)]
    units = [{i: os.urandom(1000) for i in range(10)} for _ in entries]
    done = []

    def fetch(e, unit):
        e.write_chunks(unit, dirty=False, only_if=lambda: True)
        done.append(e)
    threads = [threading.Thread(target=fetch, args=(e, u), daemon=True)
               for e, u in zip(entries, units)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert len(done) == 8, "fetchers deadlocked on the pending-plaintext bound"
    for e, unit in zip(entries, units):
        e.sync()
        assert all(e.read_chunk(i) == d for i, d in unit.items())


def test_slots_are_taken_at_least_so_many_at_once_and_never_held_while_waiting():
    import threading
    slots = Slots(10)
    assert slots.take(4, least=4) == 4 and slots.take(100, least=1) == 6 and slots.free == 0
    got = []
    t = threading.Thread(target=lambda: got.append(slots.take(8, least=3)), daemon=True)
    t.start()
    wait_until(lambda: slots._waits == [3], 10, what="the taker to wait")
    slots.give(2)
    assert not got and slots.free == 2          # two are not enough: none taken meanwhile
    slots.give(1)
    t.join(10)
    assert got == [3] and slots.free == 0 and slots._waits == []
    slots.give(10)
    with pytest.raises(AssertionError):
        slots.give(1)                           # more given back than taken


def test_a_fetcher_short_of_room_hands_over_batches_not_single_chunks(cache, monkeypatch):
    """Read units bigger than the room left for plaintext (the steady state of a long cold
    read: fetching outruns sealing) go to the sealers in batches of SEAL_BATCH chunks at
    least, not one job per chunk as room frees up one chunk at a time."""
    monkeypatch.setattr(cache, "_pending_slots", Slots(SEAL_BATCH + 5))
    sizes = []
    submit_job = cache._submit_job
    monkeypatch.setattr(cache, "_submit_job", lambda e, b: sizes.append(len(b)) or
                        submit_job(e, b))
    e = cache.new_entry()
    unit = {i: os.urandom(1000) for i in range(4 * SEAL_BATCH + 3)}
    assert e.write_chunks(unit, dirty=False, only_if=lambda: True) == sorted(unit)
    e.sync()
    assert sum(sizes) == len(unit) and sizes[0] == SEAL_BATCH + 5
    assert all(n >= SEAL_BATCH for n in sizes[:-1]), sizes
    assert all(e.read_chunk(i) == d for i, d in unit.items())


def test_dirty_chunks_never_evicted(bounded_cache):
    c = bounded_cache(3)
    d = c.new_entry()
    c.set_dirty(d, True)
    data = {i: os.urandom(CHUNK) for i in range(8)}
    for i, x in data.items():
        d.write_chunk(i, x)
    clean = c.new_entry()
    fill_clean(clean, 5)
    assert all(d.read_chunk(i) == x for i, x in data.items())
    assert not any(clean.has(i) for i in range(5)), "clean chunks go when over the bound"
    s = c.stats()
    assert s["cache_dirty_bytes"] == 8 * COST and s["cache_used_bytes"] == 8 * COST
    # once uploaded (clean), the entry becomes evictable and the bound holds again
    c.set_dirty(d, False)
    s = c.stats()
    assert s["cache_dirty_bytes"] == 0 and s["cache_used_bytes"] <= 3 * COST


def test_set_dirty_protects_previously_clean_chunks(bounded_cache):
    c = bounded_cache(2)
    e = c.new_entry()
    e.write_chunk(0, b"a" * CHUNK, dirty=False)
    e.write_chunk(1, b"b" * CHUNK, dirty=False)
    c.set_dirty(e, True)                           # a write began on this file
    fill_clean(c.new_entry(), 4)
    assert e.read_chunk(0) == b"a" * CHUNK and e.read_chunk(1) == b"b" * CHUNK


def test_drop_chunks_from_frees_accounting(cache_dir, keys):
    with open_cache(cache_dir, keys) as c:
        e = c.new_entry()
        c.set_dirty(e, True)
        for i in range(4):
            e.write_chunk(i, os.urandom(1000))
        assert c.stats()["cache_used_bytes"] == 4 * _cost(1000)
        e.drop_chunks_from(2)
        s = c.stats()
        assert s["cache_used_bytes"] == 2 * _cost(1000)
        assert s["cache_dirty_bytes"] == 2 * _cost(1000)
        assert e.read_chunk(2) is None and e.read_chunk(3) is None
        assert e.read_chunk(1) is not None
        e.drain()           # the sealer threads may not have written (made) the file yet
        assert os.path.getsize(e.data_path) <= slot_offset(2)
        e.drop_chunks_from(0)
        assert c.stats()["cache_used_bytes"] == 0 and c.stats()["cache_dirty_bytes"] == 0
        # a clean entry: dropped chunks leave the LRU too (no double free on eviction)
        f = c.new_entry()
        fill_clean(f, 3)
        f.drop_chunks_from(1)
        assert c.stats()["cache_used_bytes"] == COST
        c.max_bytes = 0
        g = c.new_entry()
        g.write_chunk(0, b"x", dirty=False)            # triggers eviction of everything
        assert c.stats()["cache_used_bytes"] >= 0
        assert c.stats()["cache_used_bytes"] == 0


def test_discard_removes_files_and_accounting(cache):
    e = cache.new_entry()
    cache.set_dirty(e, True)
    e.write_chunk(0, os.urandom(100))
    e.save_state({"dirty": True})
    cache.discard(e)
    wait_until(lambda: cache_files(cache.entries_dir) == [], 10,   # (removed in the background)
               what="the discarded entry's file to be removed")
    s = cache.stats()
    assert s["cache_used_bytes"] == 0 and s["cache_dirty_bytes"] == 0 and s["cache_entries"] == 0


def test_index_clean_lookup(cache):
    e = cache.new_entry()
    cache.index_clean(e, "k", "etag1")
    assert cache.lookup_clean("k", "etag1") is e
    assert cache.lookup_clean("k", "etag2") is None
    f = cache.new_entry()
    f.write_chunk(0, b"x")
    cache.index_clean(f, "k", "etag1")                # replaces (and discards) the old one
    assert cache.lookup_clean("k", "etag1") is f
    cache.unindex(f)
    assert cache.lookup_clean("k", "etag1") is None


def test_an_empty_entry_leaves_no_file_once_clean(cache_dir, keys):
    """An empty file's entry holds only its record: once uploaded, its data file goes (no
    inode kept per empty file); written again, it comes back and recovers as usual."""
    c = make_cache(cache_dir, keys)
    e = c.new_entry()
    e.drop_state()                                   # never journaled: nothing to do
    assert not os.path.exists(e.data_path)
    e.save_state({"dirty": True, "size": 0})
    assert os.path.exists(e.data_path)
    e.drop_state()
    assert not os.path.exists(e.data_path) and cache_files(c.entries_dir) == []
    e.write_chunk(0, b"later")
    e.save_state({"dirty": True, "size": 5})
    e.close_fd()
    c.close()
    with open_cache(cache_dir, keys) as c:
        (r, state), = c.recover()[0]
        assert state["size"] == 5 and r.read_chunk(0) == b"later"
        r.close_fd()


def test_discard_key_removes_every_clean_version_of_a_deleted_object(cache):
    versions = []
    for etag in ("e1", "e2"):
        e = cache.new_entry()
        e.write_chunk(0, os.urandom(1000), dirty=False)
        e.drain()
        cache.index_clean(e, "gone", etag)
        versions.append(e)
    other = cache.new_entry()
    other.write_chunk(0, b"kept", dirty=False)
    cache.index_clean(other, "kept", "e1")
    cache.discard_key("gone")
    cache.discard_key("never cached")
    assert cache.lookup_clean("gone", "e1") is None and cache.lookup_clean("gone", "e2") is None
    # (their files go in the background)
    assert wait_until(lambda: not any(os.path.exists(e.data_path) for e in versions), 10)
    assert cache.lookup_clean("kept", "e1") is other and other.read_chunk(0) == b"kept"
    assert cache.stats()["cache_used_bytes"] == _cost(4) and cache._by_key == {"kept": {"e1"}}


def test_eviction_racing_a_write_keeps_the_dirty_chunk(cache_dir, keys):
    """Interleaving: the evictor has picked a clean chunk (and seen its entry clean), then a
    writer makes the entry dirty and rewrites that chunk before the hole is punched. The
    freshly written dirty data must survive (dirty data is never evicted)."""
    with open_cache(cache_dir, keys, max_bytes=2 * COST) as c:
        e = c.new_entry()
        e.write_chunk(0, b"o" * CHUNK, dirty=False)
        e.write_chunk(1, b"o" * CHUNK, dirty=False)
        real_punch = e._punch
        new = b"n" * CHUNK

        def punch_after_writer(index):
            if index == 0 and not e.dirty:
                c.set_dirty(e, True)                  # the writer thread runs here
                e.write_chunk(0, new)
            return real_punch(index)

        e._punch = punch_after_writer
        other = c.new_entry()
        other.write_chunk(0, os.urandom(CHUNK), dirty=False)   # evicts e's chunk 0 (LRU)
        assert e.read_chunk(0) == new, "dirty data was evicted"
        s = c.stats()
        assert s["cache_dirty_bytes"] == 2 * COST           # e's two chunks, now dirty


# ------------------------------------------------------------------------- disk full
def test_chunk_cut_short_by_a_full_disk_is_an_error(cache, monkeypatch):
    """A pwrite that writes only part of a slot (the disk filled up mid-slot) must surface as
    NoSpace from drain() -- never a torn slot counted as written -- and the data stays readable
    from memory."""
    real = os.pwrite
    monkeypatch.setattr(datafile_mod.os, "pwritev",
                        lambda fd, bufs, off: real(fd, b"".join(bytes(b) for b in bufs)[:100], off))
    e = cache.new_entry()
    data = os.urandom(CHUNK)
    e.write_chunk(0, data)
    with pytest.raises(NoSpace):
        e.drain()
    assert e.read_chunk(0) == data           # still served from memory, not from the torn slot


def test_state_record_cut_short_by_a_full_disk_is_an_error(cache, monkeypatch):
    """save_state: a write that makes no progress is NoSpace, and the previous record stays."""
    e = cache.new_entry()
    e.save_state({"v": 1})
    real = os.pwrite
    monkeypatch.setattr(datafile_mod.os, "pwrite", lambda fd, b, off: real(fd, bytes(b)[:10], off))
    with pytest.raises(NoSpace):
        e.save_state({"v": 2, "pad": "x" * 1000})
    monkeypatch.setattr(datafile_mod.os, "pwrite", real)
    assert e.load_state() == {"v": 1}
    e.save_state({"v": 3})                   # the next record goes to the torn slot again
    assert e.load_state() == {"v": 3}


def test_chunk_written_while_the_cache_closes_is_sealed_not_left_pending(cache_dir, keys):
    """A late writer (a read-ahead or upload thread still running at shutdown) stores a chunk
    after the sealer threads stopped: it is sealed in the writer's thread, so close() does not
    wait forever for a chunk no sealer will ever take."""
    c = make_cache(cache_dir, keys)
    e = c.new_entry()
    c._sealers.shutdown(wait=True)          # what close() does first
    data = os.urandom(CHUNK)
    e.write_chunk(3, data)
    assert not e.pending                    # sealed and written already
    assert e.read_chunk(3) == data
    c.close()                               # returns (a chunk left pending: hangs)


def test_dirty_entry_starts_disk_writes_early_clean_one_does_not(cache_dir, keys, monkeypatch):
    """A big dirty file's slots go to disk while it is written (sync_file_range every
    WRITEOUT_EVERY bytes), so the fdatasync of close() has little left to do; chunks fetched
    from the bucket (clean) are not pushed."""
    calls = []
    real = oscalls.start_writeout
    monkeypatch.setattr(oscalls, "start_writeout", lambda fd: (calls.append(fd), real(fd)))
    with open_cache(cache_dir, keys, max_bytes=1024 * COST) as c:
        per = -(-entry_mod.WRITEOUT_EVERY // SLOT)        # slots per early write-out
        clean = c.new_entry()
        fill_clean(clean, 3 * per)
        clean.sync()
        assert calls == []
        dirty = c.new_entry()
        c.set_dirty(dirty, True)
        for i in range(3 * per + per // 2):
            dirty.write_chunk(i, os.urandom(CHUNK))
        dirty.sync()
        assert len(calls) == 3
        assert dirty.read_chunk(3 * per) is not None


def test_sync_does_not_block_readers_of_the_entry(cache, monkeypatch):
    """close() of a big file waits for fdatasync; the upload of the same file reads its
    chunks meanwhile (io_lock is not held across the fdatasync)."""
    import threading
    e = cache.new_entry()
    e.write_chunk(0, b"a" * CHUNK)
    e.drain()
    started, release = threading.Event(), threading.Event()
    real = os.fdatasync

    def slow_fdatasync(fd):
        started.set()
        assert release.wait(10)
        real(fd)
    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    t = threading.Thread(target=e.sync)
    t.start()
    try:
        assert started.wait(10)
        got = []
        reader = threading.Thread(target=lambda: got.append(e.read_chunk(0)))
        reader.start()
        reader.join(5)
        assert got == [b"a" * CHUNK], "a reader waited for the fdatasync"
    finally:
        release.set()
        t.join(10)
    assert not t.is_alive()


def flush_events(cache, monkeypatch) -> list:
    """The fsync / fdatasync calls this thread makes from now on, in order (those of the
    cache's background thread, which makes spare files, are not counted)."""
    events = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync
    entries_ino = os.stat(cache.entries_dir).st_ino
    me = threading.get_ident()

    def fsync(fd):
        st = os.fstat(fd)
        if threading.get_ident() == me:
            events.append("fsync dir" if stat.S_ISDIR(st.st_mode) and st.st_ino == entries_ino
                          else "fsync file")
        real_fsync(fd)

    def fdatasync(fd):
        if threading.get_ident() == me:
            events.append("fdatasync")
        real_fdatasync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return events


def test_an_entry_made_from_a_spare_needs_no_fsync_of_the_directory(cache_dir, keys,
                                                                     monkeypatch):
    """Data files are made ahead of need (ssecfs/cache/spares.py), a batch at a time, their
    names made durable by one fsync of entries/ before any is handed out: an entry made from
    one flushes only its data file at its first close(). The spares not taken are removed
    at close(), and by the recovery after a crash (they hold no record)."""
    c = make_cache(cache_dir, keys)
    c.new_entry()                                    # makes its own file; starts a batch
    wait_until(lambda: c.stats()["cache_spares"] > 0, 10, what="spare files")
    spares = set(os.listdir(c.entries_dir)) - set(cache_files(c.entries_dir))
    assert len(spares) >= c.stats()["cache_spares"]
    assert all(stat.S_IMODE(os.stat(os.path.join(c.entries_dir, n)).st_mode) == 0o600
               for n in spares)
    events = flush_events(c, monkeypatch)
    e = c.new_entry()
    assert e.id + ".data" in spares
    e.write_chunk(0, b"x" * 100)
    e.save_state({"dirty": True, "size": 100})
    assert events == ["fdatasync"]
    e.close_fd()
    c.close()
    assert sorted(os.listdir(c.entries_dir)) == [e.id + ".data"]     # spares removed
    with open_cache(cache_dir, keys) as c2:
        (r, state), = c2.recover()[0]
        assert state["size"] == 100 and r.read_chunk(0) == b"x" * 100
        r.close_fd()


def test_spares_are_handed_out_only_once_their_names_are_durable(tmp_path):
    """A batch's fsync of the directory comes after its files exist and before any of them
    is handed out; a batch whose fsync fails is removed, and entries make their own files."""
    d = str(tmp_path)
    seen, fail = [], []
    pool = ThreadPoolExecutor(1)

    def sync_dir():
        seen.append((spares.count(), len(os.listdir(d))))
        if fail:
            raise OSError(errno.EIO, "injected")
    spares = Spares(d, sync_dir, pool)
    fail.append(1)
    assert spares.take() is None                     # none yet: starts a batch
    wait_until(lambda: seen and not spares_mod_busy(spares), 10, what="the failed batch")
    assert seen == [(0, spares_mod.BATCH)] and os.listdir(d) == [] and spares.count() == 0
    fail.clear()
    assert spares.take() is None
    wait_until(lambda: spares.count() == spares_mod.BATCH, 10, what="a batch")
    assert seen[1] == (0, spares_mod.BATCH)
    eid = spares.take()
    assert os.path.getsize(os.path.join(d, eid + ".data")) == 0
    pool.shutdown(wait=True)
    spares.close()
    assert os.listdir(d) == [eid + ".data"]          # the one taken stays: its entry's


def spares_mod_busy(spares) -> bool:
    return spares._filling


def test_state_record_is_made_durable_with_the_data(cache, monkeypatch):
    """close() makes a file durable with one fdatasync of its data file (chunks and record
    together), and for a new entry one fsync of the entries directory (its name must survive
    a power cut too: an entry without a record is taken for clean and removed). A record
    written after an upload (sync=False) costs no flush at all."""
    events = flush_events(cache, monkeypatch)
    e = cache.new_entry()                            # no spare yet: it makes its own file
    e.write_chunk(0, b"x" * 100)
    e.save_state({"size": 100})
    assert events == ["fdatasync", "fsync dir"] and not e.pending
    events.clear()
    e.write_chunk(1, b"y" * 100)
    e.save_state({"size": CHUNK + 100})
    assert events == ["fdatasync"]
    events.clear()
    e.save_state({"size": CHUNK + 100}, sync=False)
    e.drop_state()
    assert events == [] and e.load_state() == {"dirty": False}


# ------------------------------------------------------------------ copy-on-write of chunks
def acknowledged_entry(cache_dir, keys, chunks: dict[int, bytes]):
    """A cache holding a dirty file whose chunks and journal record are flushed: what a
    close() or fsync() that returned leaves."""
    c = make_cache(cache_dir, keys)
    e = c.new_entry()
    for i, d in chunks.items():
        e.write_chunk(i, d)
    size = max(chunks) * CHUNK + len(chunks[max(chunks)])
    e.save_state({"dirty": True, "path": "/f", "size": size})      # sync=True: flushed
    return c, e


def tearing_pwritev(monkeypatch, tear):
    """os.pwritev as the sealers call it, but the slot reaches the disk torn by `tear(new,
    old)` (old: the bytes at that place before): a power cut in the middle of the write, as
    a disk that writes 4 KiB blocks leaves it. The caller is told every byte was written."""
    torn = []
    real = os.pwritev

    def pwritev(fd, bufs, off):
        new = b"".join(bytes(b) for b in bufs)
        old = os.pread(fd, len(new), off).ljust(len(new), b"\0")
        data = tear(new, old)
        os.pwrite(fd, data, off)
        torn.append(off)
        return len(new)
    monkeypatch.setattr(datafile_mod.os, "pwritev", pwritev)
    return torn, real


def half(new: bytes) -> int:
    return len(new) // 2 // 4096 * 4096


TEARS = {
    "new head, old tail": lambda new, old: new[:half(new)] + old[half(new):],
    "old head, new tail": lambda new, old: old[:half(new)] + new[half(new):],
    "cut after the first 4 KiB block": lambda new, old: new[:4096],
    "cut after 16 blocks": lambda new, old: new[:16 * 4096],
    "all but the last block": lambda new, old: new[:(len(new) - 1) // 4096 * 4096],
}


@pytest.mark.parametrize("tear", TEARS)
def test_a_rewrite_torn_by_a_crash_leaves_the_acknowledged_chunk_readable(cache_dir, keys,
                                                                         monkeypatch, tear):
    """A write() changes a few bytes of a chunk whose content was acknowledged (close()
    returned); the power fails while its slot is written. The acknowledged content of that
    chunk reads back intact after the restart, and is what the upload reads."""
    chunks = {i: os.urandom(CHUNK) for i in range(3)}
    c, e = acknowledged_entry(cache_dir, keys, chunks)
    changed = bytearray(chunks[1])
    changed[5000:5010] = b"0123456789"
    torn, real = tearing_pwritev(monkeypatch, TEARS[tear])
    e.write_chunk(1, bytes(changed))
    e.drain()
    monkeypatch.setattr(datafile_mod.os, "pwritev", real)
    assert len(torn) == 1
    e.close_fd()
    c.close()                                      # (a crash also drops the lock)
    with open_cache(cache_dir, keys) as c:
        (r, state), = c.recover()[0]
        assert state["dirty"]
        for i, d in chunks.items():
            assert r.read_chunk(i) == d, i
            for lo, hi in WINDOWS:
                assert r.read_range(i, lo, hi) == d[lo:hi], (i, lo, hi)
        # the torn copy is gone (punched), and no longer counted
        assert r.stale == {} and c.stats()["cache_used_bytes"] == 3 * COST
        # the chunk is written again after the restart: that version is the one kept
        r.write_chunk(1, bytes(changed))
        r.save_state({"dirty": True, "path": "/f", "size": 3 * CHUNK})
        assert r.read_chunk(1) == bytes(changed)
        r.close_fd()
    with open_cache(cache_dir, keys) as c:
        (r, _), = c.recover()[0]
        assert r.read_chunk(1) == bytes(changed) and r.read_chunk(0) == chunks[0]


def test_a_complete_rewrite_wins_over_the_acknowledged_version_after_a_crash(cache_dir, keys):
    """A rewrite whose slot was written whole, then a crash before close(): the newer
    version is read after the restart (as a local file system may keep a write that
    close() never confirmed), and a second rewrite after that is kept as well."""
    chunks = {0: os.urandom(CHUNK), 1: os.urandom(5000)}
    c, e = acknowledged_entry(cache_dir, keys, chunks)
    new = os.urandom(CHUNK)
    e.write_chunk(0, new)
    e.write_chunk(1, b"shorter")
    e.drain()
    e.close_fd()
    c.close()
    with open_cache(cache_dir, keys) as c:
        (r, _), = c.recover()[0]
        assert r.read_chunk(0) == new and r.read_chunk(1) == b"shorter"
        assert r.present == {0: CHUNK, 1: 7}
        newer = os.urandom(CHUNK)
        r.write_chunk(0, newer)
        r.drain()
        r.close_fd()
    with open_cache(cache_dir, keys) as c:
        (r, _), = c.recover()[0]
        assert r.read_chunk(0) == newer and r.read_chunk(1) == b"shorter"


def test_a_first_write_torn_by_a_crash_reads_as_before_it(cache_dir, keys, monkeypatch):
    """A chunk the acknowledged version did not hold (past its end, or still in the remote
    object) is written for the first time, and the power fails during that write: the
    chunk is absent after the restart, as it was when close() returned (the file reads
    the remote object's bytes, or zeros, there), instead of failing every read and the
    upload of the whole file."""
    chunks = {0: os.urandom(CHUNK), 1: os.urandom(CHUNK)}
    c, e = acknowledged_entry(cache_dir, keys, chunks)
    torn, real = tearing_pwritev(monkeypatch, TEARS["new head, old tail"])
    e.write_chunk(3, os.urandom(CHUNK))
    e.drain()
    monkeypatch.setattr(datafile_mod.os, "pwritev", real)
    assert len(torn) == 1
    e.close_fd()
    c.close()
    with open_cache(cache_dir, keys) as c:
        (r, _), = c.recover()[0]
        assert r.read_chunk(3) is None and r.read_range(3, 0, 100) is None
        assert not r.has(3)
        assert r.read_chunk(0) == chunks[0] and r.read_chunk(1) == chunks[1]
        assert c.stats()["cache_used_bytes"] == 2 * COST


def test_close_cut_by_a_power_cut_after_its_record_reached_the_disk(cache_dir, keys,
                                                                    monkeypatch):
    """One fdatasync orders nothing between a chunk and the record it flushes with: the
    power may fail once the new record is on disk and the rewritten chunk's slot is not
    (or only partly). That close() never returned: the chunk reads as acknowledged by the
    close() before."""
    chunks = {0: os.urandom(CHUNK), 1: os.urandom(CHUNK)}
    c, e = acknowledged_entry(cache_dir, keys, chunks)
    torn, real = tearing_pwritev(monkeypatch, TEARS["cut after 16 blocks"])
    e.write_chunk(0, os.urandom(CHUNK))

    class PowerCut(Exception):
        pass

    def fdatasync(fd):
        raise PowerCut()                        # the power fails in there: nothing after it
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with pytest.raises(PowerCut):
        e.save_state({"dirty": True, "path": "/f", "size": 2 * CHUNK, "close": 2})
    monkeypatch.undo()
    assert len(torn) == 1
    e.close_fd()
    c.close()
    with open_cache(cache_dir, keys) as c:
        (r, state), = c.recover()[0]
        assert state["close"] == 2
        assert r.read_chunk(0) == chunks[0] and r.read_chunk(1) == chunks[1]


@pytest.mark.parametrize("closed", [False, True])
def test_an_uploaded_file_is_evicted_only_once_its_clean_record_is_flushed(cache_dir, keys,
                                                                            monkeypatch, closed):
    """Once uploaded, a file's entry turns clean and its chunks evictable, but the record on
    disk says dirty until the clean record written after the upload is flushed: a chunk
    punched before that would, after a power cut, leave the upload that recovery runs
    reading zeros (or the older object's bytes) in its place, over the uploaded object.
    Eviction waits for the clean record, and flushes it before the first hole."""
    with open_cache(cache_dir, keys, max_bytes=2 * COST) as c:
        e = c.new_entry()
        c.set_dirty(e, True)
        data = {i: os.urandom(CHUNK) for i in range(3)}
        for i, d in data.items():
            e.write_chunk(i, d)
        e.save_state({"dirty": True, "path": "/f", "size": 3 * CHUNK})
        events = []
        real_fdatasync, real_punch = os.fdatasync, oscalls.punch_hole
        monkeypatch.setattr(os, "fdatasync", lambda fd: events.append("flush") or
                            real_fdatasync(fd))
        monkeypatch.setattr(oscalls, "punch_hole", lambda fd, off, n: events.append("hole")
                            or real_punch(fd, off, n))
        if closed:                            # the file was closed, its entry's fd too
            c.max_bytes = 8 * COST
        c.set_dirty(e, False)                 # the upload is durable (what fs does first)
        assert "hole" not in events and sorted(e.present) == [0, 1, 2]
        e.drop_state()                        # then the record that says so
        if closed:
            e.close_fd()
            assert "hole" not in events
            c.max_bytes = 2 * COST
            c._evict_if_needed()
        assert "hole" in events and "flush" in events[:events.index("hole")], events
        assert c.stats()["cache_used_bytes"] <= 2 * COST
        assert [e.read_chunk(i) for i in range(3)][-2:] == [data[1], data[2]]


def test_a_slot_of_one_entry_copied_into_another_fails(cache):
    """Two entries hold the same plaintext as the same chunk: their slots differ (each entry
    has its own keys), and one copied over the other fails there, even with its header
    made to claim the other's generation."""
    x, y = cache.new_entry(), cache.new_entry()
    data = os.urandom(CHUNK)
    for e in (x, y):
        e.write_chunk(0, data)
        e.sync()
    assert x.slots[0][::2] == y.slots[0][::2]       # same position, form, write id (none)
    raw = {}
    for e in (x, y):
        with open(e.data_path, "rb") as f:
            f.seek(slot_offset(0))
            raw[e] = f.read(SLOT)
    assert raw[x][HEADER.size:] != raw[y][HEADER.size:]
    with open(y.data_path, "r+b") as f:
        f.seek(slot_offset(0))
        f.write(raw[x])
    write_header(y, 0, MAGIC_WHOLE, CHUNK)          # y's own generation
    rescan(y)
    with pytest.raises(IntegrityError):
        y.read_chunk(0)
    with pytest.raises(IntegrityError):
        y.read_range(0, 0, 4096)
    assert x.read_chunk(0) == data


def slot_bytes(e, index: int, pos: int, n: int = HEADER.size) -> bytes:
    with open(e.data_path, "rb") as f:
        f.seek(slot_offset(index, pos))
        return f.read(n).ljust(n, b"\0")


def test_a_rewrite_of_an_acknowledged_chunk_goes_to_its_other_slot(cache_dir, keys):
    """Copy-on-write: the acknowledged version stays where it is until the new one is
    flushed; rewrites before that flush reuse the new slot; the older copy is counted by
    the bound, then punched by the flush."""
    chunks = {0: os.urandom(CHUNK), 1: os.urandom(CHUNK)}
    c, e = acknowledged_entry(cache_dir, keys, chunks)
    try:
        c.set_dirty(e, True)
        assert {i: s.pos for i, s in e.slots.items()} == {0: 0, 1: 0}
        acked = slot_bytes(e, 1, 0, SLOT)
        v2, v3 = os.urandom(CHUNK), os.urandom(1000)
        e.write_chunk(1, v2)
        e.drain()
        assert e.slots[1].pos == 1 and e.stale == {1: COST}
        assert slot_bytes(e, 1, 0, SLOT) == acked                  # untouched
        assert c.stats()["cache_used_bytes"] == c.stats()["cache_dirty_bytes"] == 3 * COST
        e.write_chunk(1, v3)                # not flushed yet: over the unacknowledged one
        e.drain()
        assert e.slots[1].pos == 1 and slot_bytes(e, 1, 0, SLOT) == acked
        assert c.stats()["cache_used_bytes"] == 2 * COST + _cost(1000)
        e.save_state({"dirty": True, "path": "/f", "size": CHUNK + 1000})
        assert e.stale == {} and slot_bytes(e, 1, 0) == bytes(HEADER.size)   # punched
        assert c.stats()["cache_used_bytes"] == COST + _cost(1000)
        assert e.read_chunk(1) == v3 and e.read_chunk(0) == chunks[0]
        e.write_chunk(1, v2)                # v3 is the acknowledged one now: slot 0 again
        e.drain()
        assert e.slots[1].pos == 0 and e.stale == {1: _cost(1000)} and e.read_chunk(1) == v2
    finally:
        c.close()


def test_truncate_and_eviction_free_both_slots_of_a_chunk(cache_dir, keys):
    chunks = {i: os.urandom(CHUNK) for i in range(4)}
    c, e = acknowledged_entry(cache_dir, keys, chunks)
    try:
        c.set_dirty(e, True)
        for i in range(4):
            e.write_chunk(i, os.urandom(CHUNK))
        e.drain()
        assert sorted(e.stale) == [0, 1, 2, 3] and c.stats()["cache_used_bytes"] == 8 * COST
        e.drop_chunks_from(2)                               # truncate: both slots go
        assert sorted(e.slots) == [0, 1] and sorted(e.stale) == [0, 1]
        assert os.path.getsize(e.data_path) <= slot_offset(2)
        assert c.stats()["cache_used_bytes"] == c.stats()["cache_dirty_bytes"] == 4 * COST
        e.drop_chunks_from(1)
        assert c.stats()["cache_used_bytes"] == 2 * COST and e.stale == {0: COST}
        # uploaded, clean: evicted, both slots at once, and the file with the last chunk
        c.set_dirty(e, False)
        e.drop_state()
        c.max_bytes = 0
        c._evict_if_needed()
        assert e.present == {} and e.stale == {} and not os.path.exists(e.data_path)
        assert c.stats()["cache_used_bytes"] == 0 == c.stats()["cache_dirty_bytes"]
    finally:
        c.close()


def test_writing_new_chunks_costs_one_slot_write_each_and_no_hole(cache_dir, keys,
                                                                  monkeypatch):
    """A first write of a chunk has no version to protect: one pwritev at its first slot,
    nothing punched, also in an entry whose record is on disk."""
    c, e = acknowledged_entry(cache_dir, keys, {0: os.urandom(CHUNK)})
    try:
        writes, holes = [], []
        real_pwritev, real_punch = os.pwritev, oscalls.punch_hole
        monkeypatch.setattr(os, "pwritev", lambda fd, b, off: writes.append(off) or
                            real_pwritev(fd, b, off))
        monkeypatch.setattr(oscalls, "punch_hole", lambda *a: holes.append(a) or
                            real_punch(*a))
        for i in range(1, 9):
            e.write_chunk(i, os.urandom(CHUNK))
        e.save_state({"dirty": True, "path": "/f", "size": 9 * CHUNK})
        assert sorted(writes) == [slot_offset(i, 0) for i in range(1, 9)] and holes == []
        assert c.stats()["cache_used_bytes"] == 9 * COST
    finally:
        c.close()


def test_a_confirmed_version_that_fails_is_an_error_never_an_older_one(cache_dir, keys):
    """A version that the recovered record confirms (flushed before that record was
    written) cannot have been torn by the crash: if it fails authentication the chunk reads
    EIO, even where an older version of it is still on disk."""
    old, new = os.urandom(CHUNK), os.urandom(CHUNK)
    c, e = acknowledged_entry(cache_dir, keys, {0: old})
    old_slot = slot_bytes(e, 0, 0, SLOT)
    e.write_chunk(0, new)
    e.save_state({"dirty": True, "path": "/f", "size": CHUNK})
    e.save_state({"dirty": True, "path": "/f", "size": CHUNK})    # confirms `new`
    assert e.slots[0].pos == 1
    with open(e.data_path, "r+b") as f:            # the older copy's hole lost in the crash
        f.seek(slot_offset(0, 0))
        f.write(old_slot)
    e.close_fd()
    c.close()
    corrupt(e.data_path, slot_offset(0, 1) + HEADER.size + 5000)
    with open_cache(cache_dir, keys) as c:
        (r, _), = c.recover()[0]
        with pytest.raises(IntegrityError):
            r.read_chunk(0)
        with pytest.raises(IntegrityError):
            r.read_range(0, 4096, 8192)
        assert r.has(0)


def test_an_uploaded_chunk_read_at_random_is_resealed_once_its_clean_record_is_flushed(
        cache_dir, keys, monkeypatch):
    """Re-sealing in sub-blocks rewrites a slot in place: only once a crash can cost
    nothing, i.e. no dirty record of the entry may be the newest on disk."""
    data = os.urandom(CHUNK)
    c, e = acknowledged_entry(cache_dir, keys, {0: data})
    try:
        c.set_dirty(e, True)
        c.set_dirty(e, False)                # uploaded; the clean record is not written yet
        assert e.read_range(0, 0, 10, random=True) == data[:10]
        e.drain()
        assert slot_magic(e, 0) == MAGIC_WHOLE
        e.drop_state()                       # the clean record, not flushed
        events = []
        real_fdatasync, real_pwritev = os.fdatasync, os.pwritev
        monkeypatch.setattr(os, "fdatasync", lambda fd: events.append("flush") or
                            real_fdatasync(fd))
        monkeypatch.setattr(os, "pwritev", lambda fd, b, off: events.append(off) or
                            real_pwritev(fd, b, off))
        assert e.read_range(0, 0, 10, random=True) == data[:10]
        e.drain()
        assert events == ["flush", slot_offset(0, 0)]             # flushed first, in place
        assert slot_magic(e, 0) == MAGIC_SPLIT and e.read_chunk(0) == data
        assert e.read_range(0, 9, 10, random=True) == data[9:10] and events[2:] == []
    finally:
        c.close()


def test_the_last_chunk_of_an_uploaded_file_goes_with_its_file_without_a_flush(
        cache_dir, keys, monkeypatch):
    """Evicting an entry's last chunk removes its data file, dirty record included: a crash
    leaves the file whole or no file, so no flush is needed first (small files)."""
    with open_cache(cache_dir, keys, max_bytes=8 * COST) as c:
        e = c.new_entry()
        c.set_dirty(e, True)
        e.write_chunk(0, os.urandom(1000))
        e.save_state({"dirty": True, "path": "/f", "size": 1000})
        c.set_dirty(e, False)
        e.drop_state()
        flushes = []
        real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", lambda fd: flushes.append(fd) or real(fd))
        c.max_bytes = 0
        c._evict_if_needed()
        assert flushes == [] and not os.path.exists(e.data_path) and not e.present
        assert c.stats()["cache_used_bytes"] == 0
        e.drop_state()                                  # nothing left to supersede
        assert not os.path.exists(e.data_path)


def test_a_torn_rewrite_right_after_recovery_still_leaves_the_acknowledged_version(
        cache_dir, keys, monkeypatch):
    """After a crash that tore a rewrite, the chunk is written again before anything read
    it (the versions on disk are not sorted out yet), and that write is torn by a second
    crash: the acknowledged version is still the one read."""
    chunks = {0: os.urandom(CHUNK), 1: os.urandom(CHUNK)}
    c, e = acknowledged_entry(cache_dir, keys, chunks)
    torn, real = tearing_pwritev(monkeypatch, TEARS["new head, old tail"])
    e.write_chunk(1, os.urandom(CHUNK))
    e.drain()
    e.close_fd()
    c.close()
    for _ in range(2):
        c = make_cache(cache_dir, keys)
        (r, _), = c.recover()[0]
        assert 1 in r.unverified
        r.write_chunk(1, os.urandom(CHUNK))       # torn as well (pwritev still tears)
        r.drain()
        r.close_fd()
        c.close()
    monkeypatch.setattr(datafile_mod.os, "pwritev", real)
    assert len(torn) == 3
    with open_cache(cache_dir, keys) as c:
        (r, _), = c.recover()[0]
        assert r.read_chunk(1) == chunks[1] and r.read_chunk(0) == chunks[0]
        assert sorted(r.present) == [0, 1] and r.stale == {}


def background_done(c) -> None:
    """Wait until what the cache's background thread was given so far is done."""
    done = threading.Event()
    c.later(done.set)
    assert done.wait(10)


def test_chunks_of_a_file_closed_once_are_confirmed_after_the_flush(cache_dir, keys):
    """A close() writes a second record once its flush completed (not flushed itself),
    which confirms the chunks that flush wrote: a damaged one of them is then an error after
    a crash, not taken for a torn write (whose previous version, here zeros, would be
    uploaded in its place)."""
    c, e = acknowledged_entry(cache_dir, keys, {0: os.urandom(CHUNK), 1: os.urandom(CHUNK)})
    background_done(c)                  # (the confirmation is written there, after close())
    e.close_fd()
    c.close()
    corrupt(e.data_path, slot_offset(1) + HEADER.size + 100)
    with open_cache(cache_dir, keys) as c:
        (r, _), = c.recover()[0]
        assert r.unverified.chunks == {}
        with pytest.raises(IntegrityError):
            r.read_chunk(1)
        assert r.has(1) and r.read_chunk(0) is not None


def test_a_discarded_dirty_entry_is_gone_from_disk_when_discard_returns(cache):
    """A dirty entry left on disk would be uploaded by the recovery after a crash: a file
    unlinked before its upload must not come back."""
    e = cache.new_entry()
    cache.set_dirty(e, True)
    e.write_chunk(0, b"unsent", dirty=True)
    e.save_state({"v": 1, "path": "/x", "dirty": True})
    assert os.path.exists(e.data_path)
    cache.discard(e)
    assert not os.path.exists(e.data_path)


def test_recovery_removes_discarded_files_and_never_reads_them(cache_dir, keys):
    """A crash between a discard and the removal of its file: the next start removes it and
    does not take it for an entry (a dirty record in it would be uploaded again)."""
    c = make_cache(cache_dir, keys)
    e = c.new_entry()
    c.set_dirty(e, True)
    e.write_chunk(0, b"unsent", dirty=True)
    e.save_state({"v": 1, "path": "/x", "dirty": True})
    os.link(e.data_path, e.data_path + ".gone")       # as discard() leaves it, before reaping
    os.unlink(e.data_path)
    c.close()
    c2 = make_cache(cache_dir, keys)
    dirty, bad = c2.recover()
    assert dirty == [] and bad == []
    assert not [n for n in os.listdir(c2.entries_dir) if n.endswith(".gone")]
    c2.close()
