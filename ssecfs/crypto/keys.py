"""Key ring: key file parsing and permission checks, SSE-C request parameters, fingerprints,
and the HKDF-derived key of the local cache.

Owner of all key material. A Key never shows its bytes in repr/str, and no error raised here
contains key material (only file names, line numbers and fingerprints).

Key file formats
  * raw: exactly 32 bytes (``openssl rand -out sse.key 32``);
  * text: one base64 key (44 characters, 32 bytes decoded) per line; blank lines and lines
    starting with ``#`` are ignored. The first key is the *current* key (encrypts every new
    write, rename and metadata update); the others only decrypt older objects (rotation).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import KeyFileError

KEY_LEN = 32
CACHE_KDF_INFO = b"ssecfs local cache v1"


@dataclass(frozen=True, eq=False)
class Key:
    """One SSE-C key. ``fingerprint`` is the base64 MD5 the protocol already sends in clear."""

    _raw: bytes = field(repr=False)

    def __post_init__(self):
        if len(self._raw) != KEY_LEN:
            raise ValueError("an SSE-C key is 32 bytes")

    @property
    def fingerprint(self) -> str:
        return base64.b64encode(hashlib.md5(self._raw).digest()).decode()

    @property
    def short_id(self) -> str:
        """A short non-secret name for logs and messages."""
        return "md5:" + self.fingerprint[:8]

    def sse_params(self) -> dict:
        """boto3 parameters for a request on an object encrypted (or to encrypt) with this key."""
        return {
            "SSECustomerAlgorithm": "AES256",
            "SSECustomerKey": base64.b64encode(self._raw).decode(),
            "SSECustomerKeyMD5": self.fingerprint,
        }

    def sse_headers(self) -> dict:
        """The same three SSE-C parameters as HTTP headers (the store's raw request path)."""
        return {
            "x-amz-server-side-encryption-customer-algorithm": "AES256",
            "x-amz-server-side-encryption-customer-key": base64.b64encode(self._raw).decode(),
            "x-amz-server-side-encryption-customer-key-MD5": self.fingerprint,
        }

    def copy_source_params(self) -> dict:
        return {"CopySource" + k: v for k, v in self.sse_params().items()}

    def cache_key(self) -> bytes:
        """The key of the local cache, derived so that the SSE-C key itself never encrypts it."""
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=CACHE_KDF_INFO).derive(self._raw)

    def secret_forms(self) -> list[bytes]:
        """The forms under which this key could leak (for tests and log scrubbing)."""
        return [self._raw, base64.b64encode(self._raw), self._raw.hex().encode()]

    def __repr__(self) -> str:
        return f"Key({self.short_id})"

    __str__ = __repr__


class KeyRing:
    """The current key first, then older keys that only decrypt."""

    def __init__(self, keys: list[Key], source: str = "<memory>"):
        if not keys:
            raise KeyFileError(f"{source}: no key in key file")
        fps = [k.fingerprint for k in keys]
        if len(set(fps)) != len(fps):
            raise KeyFileError(f"{source}: the same key appears twice")
        self.keys = list(keys)
        self.source = source
        self._by_fp = {k.fingerprint: k for k in keys}

    @property
    def current(self) -> Key:
        return self.keys[0]

    def by_fingerprint(self, fp: str | None) -> Key | None:
        return self._by_fp.get(fp) if fp else None

    def candidates(self, hint: str | None = None) -> list[Key]:
        """Keys to try for an object, the hinted (fingerprint) one first."""
        first = self.by_fingerprint(hint)
        return ([first] if first else []) + [k for k in self.keys if k is not first]

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"KeyRing({', '.join(k.short_id for k in self.keys)})"


def generate_key() -> bytes:
    return os.urandom(KEY_LEN)


def write_keyfile(path: str, raw: bytes | None = None) -> Key:
    """Create a new raw 32-byte key file with mode 0600 (refuses to overwrite)."""
    raw = raw or generate_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path}: already exists; refusing to overwrite a key")
    except OSError as e:
        raise KeyFileError(f"{path}: cannot create key file: {e.strerror}")
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    return Key(raw)


def resolve_keyfile_path(path: str) -> str:
    """``-`` is refused (keys on stdin/command line leak); a bare name that exists in
    ``$CREDENTIALS_DIRECTORY`` (systemd LoadCredential=) is taken from there."""
    if path == "-":
        raise KeyFileError("--keyfile -: reading keys from stdin is not supported; "
                        "put the key in a file with mode 0600")
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and os.sep not in path:
        candidate = os.path.join(cred_dir, path)
        if os.path.exists(candidate):
            return candidate
    return path


def _check_permissions(path: str, st: os.stat_result) -> None:
    """As ssh does for its keys: a key file only its owner (this user, or root) can read or
    replace, in directories nobody else can swap it in. Whoever can write the file or its
    directory can make us encrypt under a key they know."""
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path}: not a regular file")
    if st.st_uid not in (0, os.geteuid()):
        raise KeyFileError(f"{path}: key file belongs to uid {st.st_uid}, not to this user "
                        f"({os.geteuid()}) or root; fix with: chown {os.geteuid()} {path}")
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"{path}: key file is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); fix with: chmod 600 {path}")
    d = os.path.dirname(os.path.realpath(path))
    while True:
        dst = os.stat(d)
        if dst.st_uid not in (0, os.geteuid()):
            raise KeyFileError(f"{path}: directory {d} belongs to uid {dst.st_uid}, who could "
                            "replace the key file; keep keys in a directory of yours or root's")
        if dst.st_mode & 0o022 and not dst.st_mode & stat.S_ISVTX:
            raise KeyFileError(f"{path}: directory {d} is writable by others (mode "
                            f"{stat.S_IMODE(dst.st_mode):04o}), who could replace the key file; "
                            f"fix with: chmod go-w {d}")
        parent = os.path.dirname(d)
        if parent == d:
            return
        d = parent


def parse_keyfile_bytes(data: bytes, source: str) -> KeyRing:
    """Parse key file contents. Errors name the line, never its content."""
    if not data:
        raise KeyFileError(f"{source}: key file is empty")
    if len(data) == KEY_LEN and not _looks_like_text_keys(data):
        return KeyRing([Key(bytes(data))], source)
    if not _is_text(data):
        # Binary content of the wrong length (a truncated or padded raw key, or the wrong
        # file): say so, whatever its bytes happen to look like line by line.
        raise KeyFileError(
            f"{source}: {len(data)} bytes of binary data; a raw key file is exactly "
            f"{KEY_LEN} bytes, a text key file has one base64 key per line")
    keys = []
    for lineno, bline in enumerate(data.splitlines(), 1):
        bline = bline.strip()
        if not bline or bline.startswith(b"#"):
            continue
        try:
            line = bline.decode("ascii")
        except UnicodeDecodeError:
            raise KeyFileError(
                f"{source}: line {lineno}: neither base64 text nor a raw 32-byte key file "
                f"({len(data)} bytes)") from None
        try:
            raw = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            raise KeyFileError(f"{source}: line {lineno}: not valid base64")
        if len(raw) != KEY_LEN:
            raise KeyFileError(
                f"{source}: line {lineno}: key is {len(raw)} bytes, an SSE-C key is 32 bytes")
        keys.append(Key(raw))
    return KeyRing(keys, source)


def _is_text(data: bytes) -> bool:
    """Valid UTF-8 with no control characters but tab/CR/LF."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return not any(ord(c) < 32 and c not in "\t\r\n" or ord(c) == 127 for c in text)


def _looks_like_text_keys(data: bytes) -> bool:
    """A 32-byte file is a raw key unless it is clearly text (a comment/blank-only file):
    text (``_is_text``) with only blank or '#' lines. A random key passes that test with
    negligible probability."""
    if not _is_text(data):
        return False
    text = data.decode("utf-8")
    return all(not ln.strip() or ln.strip().startswith("#") for ln in text.splitlines())


def load_keyring(path: str, check_permissions: bool = True) -> KeyRing:
    path = resolve_keyfile_path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file not found (make one with: ssecfs keygen {path})")
    except IsADirectoryError:
        raise KeyFileError(f"{path}: is a directory, not a key file")
    except PermissionError:
        raise KeyFileError(f"{path}: key file not readable (permission denied)")
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise KeyFileError(f"{path}: is a directory, not a key file")
        if check_permissions:
            _check_permissions(path, st)
        if st.st_size > 64 * 1024:
            raise KeyFileError(f"{path}: too large to be a key file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
    finally:
        os.close(fd)
    return parse_keyfile_bytes(data, path)
