"""Key files, the key ring, SSE-C parameters and the derived cache key (ssecfs.crypto.keys).

Every error path also checks that the key never leaks: not in the message, not in repr/str,
not in the chained exceptions or the formatted traceback, in raw, base64 or hex form.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import traceback

import pytest

from ssecfs.commands import cli
from ssecfs.errors import EXIT_KEYFILE, UserError
from ssecfs.crypto.keys import (CACHE_KDF_INFO, Key, KeyRing, load_keyring,
                         parse_keyfile_bytes, resolve_keyfile_path, write_keyfile)


def high_bytes(n: int) -> bytes:
    """Random bytes that are certainly not ASCII text (so they are parsed as a raw key)."""
    return bytes(b | 0x80 for b in os.urandom(n))


def forms(raw: bytes) -> list[bytes]:
    """Every form under which key material could leak."""
    out = [raw, base64.b64encode(raw), raw.hex().encode(), raw.hex().upper().encode(),
           base64.urlsafe_b64encode(raw)]
    return [f for f in out if f]


def assert_no_leak(exc: BaseException, *secrets: bytes) -> None:
    texts = []
    e = exc
    while e is not None:
        texts += [str(e), repr(e), *[repr(a) for a in e.args]]
        e = e.__cause__ or e.__context__
    texts.append("".join(traceback.format_exception(exc)))
    blob = "\n".join(texts).encode("utf-8", "surrogateescape")
    latin = "\n".join(texts).encode("latin-1", "replace")
    for s in secrets:
        for f in forms(s):
            assert f not in blob and f not in latin, "key material leaked into an error"
        # a textual line of a key file (what the user pasted) must not be echoed either
        for needle in (s.decode("latin-1"),):
            assert needle not in "\n".join(texts)


def write(path, data: bytes, mode: int = 0o600) -> str:
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(str(path), mode)
    return str(path)


def b64line(raw: bytes) -> bytes:
    return base64.b64encode(raw)


# ------------------------------------------------------------------------- valid key files
def test_raw_32_byte_file(tmp_path):
    raw = os.urandom(32)
    ring = load_keyring(write(tmp_path / "k", raw))
    assert len(ring) == 1
    assert ring.current.sse_params()["SSECustomerKey"] == base64.b64encode(raw).decode()


def test_base64_ring_with_comments_and_blank_lines(tmp_path):
    k1, k2, k3 = os.urandom(32), os.urandom(32), os.urandom(32)
    text = (b"# ssecfs keys: first is current\n\n"
            + b64line(k1) + b"\n"
            + b"   \n# older keys, read only\n"
            + b"  " + b64line(k2) + b"  \r\n"
            + b"\n" + b64line(k3))                       # no trailing newline
    ring = load_keyring(write(tmp_path / "k", text))
    assert len(ring) == 3
    fp = lambda raw: base64.b64encode(hashlib.md5(raw).digest()).decode()  # noqa: E731
    assert [k.fingerprint for k in ring.keys] == [fp(k1), fp(k2), fp(k3)]
    assert ring.current.fingerprint == fp(k1)
    assert ring.by_fingerprint(fp(k2)) is ring.keys[1]
    assert ring.by_fingerprint("nope") is None and ring.by_fingerprint(None) is None
    # the hinted key is tried first, then the others in ring order, each once
    assert ring.candidates(fp(k3)) == [ring.keys[2], ring.keys[0], ring.keys[1]]
    assert ring.candidates(None) == ring.keys
    assert_no_leak(Exception(repr(ring) + str(ring) + repr(ring.keys)), k1, k2, k3)


def test_comment_only_32_byte_file_is_text_not_a_key(tmp_path):
    data = b"# " + b"x" * 29 + b"\n"
    assert len(data) == 32
    with pytest.raises(UserError) as e:
        load_keyring(write(tmp_path / "k", data))
    assert "no key" in str(e.value)
    assert e.value.exit_code == EXIT_KEYFILE


def test_non_ascii_comment_is_ignored(tmp_path):
    """The format says lines starting with # are ignored: a UTF-8 comment must not make the
    whole file unreadable."""
    raw = os.urandom(32)
    text = "# clé de chiffrement — sauvegarde\n".encode() + b64line(raw) + b"\n"
    ring = load_keyring(write(tmp_path / "k", text))
    assert ring.current.sse_params()["SSECustomerKey"] == base64.b64encode(raw).decode()


# ------------------------------------------------------------------------- errors, no leaks
def expect_user_error(fn, *secrets: bytes, contains: tuple = ()) -> UserError:
    with pytest.raises(UserError) as ei:
        fn()
    e = ei.value
    assert e.exit_code == EXIT_KEYFILE
    assert "\n" not in str(e), "user errors are one line"
    for c in contains:
        assert c in str(e), f"{c!r} not in {str(e)!r}"
    assert_no_leak(e, *secrets)
    return e


def test_empty_file(tmp_path):
    p = write(tmp_path / "k", b"")
    expect_user_error(lambda: load_keyring(p), contains=("empty", p))


@pytest.mark.parametrize("n", [16, 31, 33, 64])
def test_raw_wrong_length(tmp_path, n):
    raw = high_bytes(n)
    p = write(tmp_path / "k", raw)
    expect_user_error(lambda: load_keyring(p), raw, contains=(p, str(n)))


@pytest.mark.parametrize("prefix", [b"#", b" #", b"\n\n#", b"\t"])
def test_raw_wrong_length_that_starts_like_a_comment(tmp_path, prefix):
    # CI once drew 31 random bytes starting with '#': the file read as one comment line
    # and the error said "no key" instead of naming the length.
    raw = prefix + high_bytes(31 - len(prefix))
    p = write(tmp_path / "k", raw)
    e = expect_user_error(lambda: load_keyring(p), raw, contains=(p, "31 bytes", "32"))
    assert "binary" in str(e)


def test_random_wrong_length_files_always_name_the_length(tmp_path):
    p = str(tmp_path / "k")
    for i in range(3000):
        n = (31, 33)[i % 2]
        raw = (b"#" if i % 3 == 0 else b"") + os.urandom(n)
        raw = raw[:n]
        with open(p, "wb") as f:
            f.write(raw)
        os.chmod(p, 0o600)
        with pytest.raises(UserError) as e:
            load_keyring(p)
        assert f"{n} bytes" in str(e.value) and "32" in str(e.value), str(e.value)


def test_raw_key_with_trailing_newline_is_refused_without_leak(tmp_path):
    raw = high_bytes(32)
    p = write(tmp_path / "k", raw + b"\n")
    expect_user_error(lambda: load_keyring(p), raw)


@pytest.mark.parametrize("n", [16, 31, 33, 48])
def test_base64_line_wrong_length_names_line(tmp_path, n):
    good, bad = os.urandom(32), os.urandom(n)
    text = b"# comment\n\n" + b64line(good) + b"\n" + b64line(bad) + b"\n"
    p = write(tmp_path / "k", text)
    expect_user_error(lambda: load_keyring(p), good, bad, b64line(bad),
                      contains=("line 4", f"{n} bytes"))


def test_bad_base64_names_line(tmp_path):
    good = os.urandom(32)
    bad_line = b64line(os.urandom(32))[:-4] + b"!@#$"   # right length, invalid characters
    text = b64line(good) + b"\n\n" + bad_line + b"\n"
    p = write(tmp_path / "k", text)
    expect_user_error(lambda: load_keyring(p), good, bad_line, bad_line[:20],
                      contains=("line 3", "base64"))


def test_bad_padding_names_line(tmp_path):
    good = os.urandom(32)
    bad_line = b64line(good).rstrip(b"=")               # the key without its padding
    p = write(tmp_path / "k", bad_line + b"\n")
    expect_user_error(lambda: load_keyring(p), good, bad_line[:20], contains=("line 1",))


def test_duplicate_key_refused(tmp_path):
    raw = os.urandom(32)
    p = write(tmp_path / "k", b64line(raw) + b"\n# again\n" + b64line(raw) + b"\n")
    expect_user_error(lambda: load_keyring(p), raw, contains=("twice",))


def test_only_comments_refused(tmp_path):
    p = write(tmp_path / "k", b"# nothing here\n\n# at all\n")
    expect_user_error(lambda: load_keyring(p), contains=("no key",))


def test_directory_refused(tmp_path):
    d = tmp_path / "keys.d"
    d.mkdir(mode=0o700)
    expect_user_error(lambda: load_keyring(str(d)), contains=("directory",))


def test_missing_file(tmp_path):
    p = str(tmp_path / "absent.key")
    e = expect_user_error(lambda: load_keyring(p), contains=(p, "not found"))
    assert "keygen" in str(e)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o606])
def test_group_or_other_accessible_refused(tmp_path, mode):
    raw = os.urandom(32)
    p = write(tmp_path / "k", raw, mode)
    expect_user_error(lambda: load_keyring(p), raw, contains=("chmod 600", p, f"{mode:04o}"))
    # The same file loads once fixed; and check_permissions=False skips the check.
    assert len(load_keyring(p, check_permissions=False)) == 1
    os.chmod(p, 0o600)
    assert len(load_keyring(p)) == 1


def test_owner_read_only_mode_accepted(tmp_path):
    p = write(tmp_path / "k", os.urandom(32), 0o400)
    assert len(load_keyring(p)) == 1


def test_stdin_keyfile_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "-", os.urandom(32))      # even if a file named "-" exists
    expect_user_error(lambda: resolve_keyfile_path("-"), contains=("stdin",))
    expect_user_error(lambda: load_keyring("-"), contains=("stdin",))


def test_parse_bytes_errors_do_not_leak():
    raw = high_bytes(40)
    expect_user_error(lambda: parse_keyfile_bytes(raw, "<test>"), raw)
    good = os.urandom(32)
    expect_user_error(lambda: parse_keyfile_bytes(b64line(good) + b"\n" + b64line(good),
                                                  "<test>"), good)


def test_key_constructor_wrong_length_does_not_leak():
    raw = os.urandom(31)
    with pytest.raises(ValueError) as e:
        Key(raw)
    assert_no_leak(e.value, raw)


# ------------------------------------------------------------------------- CREDENTIALS_DIRECTORY
def test_credentials_directory_resolution(tmp_path, monkeypatch):
    cred = tmp_path / "creds"
    cred.mkdir()
    raw = os.urandom(32)
    write(cred / "ssecfs.key", raw)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(cred))
    assert resolve_keyfile_path("ssecfs.key") == str(cred / "ssecfs.key")
    ring = load_keyring("ssecfs.key")
    assert ring.current.sse_params()["SSECustomerKey"] == base64.b64encode(raw).decode()
    # a path with a slash is never redirected; an unknown bare name stays as given
    assert resolve_keyfile_path("./ssecfs.key") == "./ssecfs.key"
    assert resolve_keyfile_path(str(tmp_path / "x.key")) == str(tmp_path / "x.key")
    assert resolve_keyfile_path("other.key") == "other.key"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert resolve_keyfile_path("ssecfs.key") == "ssecfs.key"


# ------------------------------------------------------------------------- keygen
def test_keygen_writes_0600_and_refuses_overwrite(tmp_path):
    p = str(tmp_path / "new.key")
    key = write_keyfile(p)
    st = os.stat(p)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 32
    with open(p, "rb") as f:
        raw = f.read()
    assert load_keyring(p).current.fingerprint == key.fingerprint
    assert key.fingerprint == base64.b64encode(hashlib.md5(raw).digest()).decode()
    e = expect_user_error(lambda: write_keyfile(p), raw, contains=("exists",))
    assert "overwrite" in str(e)
    with open(p, "rb") as f:
        assert f.read() == raw, "an existing key file must not be modified"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600


def test_keygen_0600_even_with_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        p = str(tmp_path / "new.key")
        write_keyfile(p)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600


def test_keygen_two_keys_differ(tmp_path):
    a = write_keyfile(str(tmp_path / "a"))
    b = write_keyfile(str(tmp_path / "b"))
    assert a.fingerprint != b.fingerprint


def test_cli_keygen(tmp_path, capsys):
    p = str(tmp_path / "cli.key")
    assert cli.main(["keygen", p]) == 0
    with open(p, "rb") as f:
        raw = f.read()
    assert len(raw) == 32 and stat.S_IMODE(os.stat(p).st_mode) == 0o600
    out = capsys.readouterr()
    assert_no_leak(Exception(out.out + out.err), raw)
    assert cli.main(["keygen", p]) == EXIT_KEYFILE
    out = capsys.readouterr()
    assert "exists" in out.err and out.err.count("\n") == 1
    assert_no_leak(Exception(out.out + out.err), raw)
    with open(p, "rb") as f:
        assert f.read() == raw


# ------------------------------------------------------------------------- Key / KeyRing
def test_sse_params_shape():
    raw = os.urandom(32)
    k = Key(raw)
    md5 = base64.b64encode(hashlib.md5(raw).digest()).decode()
    assert k.sse_params() == {"SSECustomerAlgorithm": "AES256",
                              "SSECustomerKey": base64.b64encode(raw).decode(),
                              "SSECustomerKeyMD5": md5}
    assert k.copy_source_params() == {
        "CopySourceSSECustomerAlgorithm": "AES256",
        "CopySourceSSECustomerKey": base64.b64encode(raw).decode(),
        "CopySourceSSECustomerKeyMD5": md5}
    assert k.fingerprint == md5
    assert k.short_id.startswith("md5:") and k.short_id[4:] == md5[:8]


def test_key_repr_and_str_hide_material():
    raw = os.urandom(32)
    k = Key(raw)
    ring = KeyRing([k, Key(os.urandom(32))])
    for text in (repr(k), str(k), f"{k}", repr(ring), str(ring), repr([k]), repr({"k": k})):
        for f in forms(raw):
            assert f.decode("latin-1") not in text
    assert k.fingerprint[:8] in repr(k)


def test_cache_key_derived_and_deterministic():
    raw = os.urandom(32)
    a, b = Key(raw), Key(raw)
    ck = a.cache_key()
    assert len(ck) == 32
    assert ck == b.cache_key() == a.cache_key()
    assert ck not in forms(raw)
    assert ck != hashlib.sha256(raw).digest()
    assert Key(os.urandom(32)).cache_key() != ck
    # independent check of the derivation (HKDF-SHA256, no salt, documented info string)
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    assert ck == HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                      info=CACHE_KDF_INFO).derive(raw)


def test_keyring_refuses_empty_and_duplicates():
    with pytest.raises(UserError):
        KeyRing([])
    raw = os.urandom(32)
    with pytest.raises(UserError) as e:
        KeyRing([Key(raw), Key(os.urandom(32)), Key(raw)])
    assert_no_leak(e.value, raw)


def test_secret_forms_lists_what_leaks():
    raw = os.urandom(32)
    assert set(Key(raw).secret_forms()) >= {raw, base64.b64encode(raw), raw.hex().encode()}


OTHER_UID = 65534      # nobody: a uid that is neither root nor us


def test_key_file_of_another_user_refused(tmp_path):
    """Whoever owns the key file can replace it with a key they know."""
    raw = os.urandom(32)
    p = write(tmp_path / "k", raw)
    os.chown(p, OTHER_UID, -1)
    expect_user_error(lambda: load_keyring(p), raw, contains=(p, f"uid {OTHER_UID}", "chown"))
    os.chown(p, os.geteuid(), -1)
    assert len(load_keyring(p)) == 1


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_key_file_in_directory_writable_by_others_refused(tmp_path, mode):
    """A directory others can write lets them swap the key file for one of theirs."""
    d = tmp_path / "keys"
    d.mkdir()
    raw = os.urandom(32)
    p = write(d / "k", raw)
    os.chmod(d, mode)
    expect_user_error(lambda: load_keyring(p), raw, contains=(str(d), f"{mode:04o}", "go-w"))
    os.chmod(d, mode | stat.S_ISVTX)    # sticky (like /tmp): nobody else can replace our file
    assert len(load_keyring(p)) == 1
    os.chmod(d, 0o755)
    assert len(load_keyring(p)) == 1


def test_key_file_in_directory_of_another_user_refused(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o755)
    raw = os.urandom(32)
    p = write(d / "k", raw)
    os.chown(d, OTHER_UID, -1)
    expect_user_error(lambda: load_keyring(p), raw, contains=(str(d), f"uid {OTHER_UID}"))


def test_key_file_through_a_link_checks_the_real_directory(tmp_path):
    """The directories checked are those of the file itself, not of a link to it."""
    d = tmp_path / "open"
    d.mkdir()
    raw = os.urandom(32)
    real = write(d / "k", raw)
    os.chmod(d, 0o777)
    link = tmp_path / "k.link"
    os.symlink(real, link)
    expect_user_error(lambda: load_keyring(str(link)), raw, contains=(str(d),))
