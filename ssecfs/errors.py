"""Domain errors. Imported by every layer; imports nothing of ssecfs.

The FUSE adapter maps these to errno values in one table (fuse_adapter.ERRNO_TABLE);
the CLI maps UserError to a one-line message and an exit code. Messages must never
contain key material: callers pass fingerprints, never keys.
"""


class SsecfsError(Exception):
    """Base class of every error this package raises on purpose."""


class NotFound(SsecfsError):
    pass


class Exists(SsecfsError):
    pass


class NotEmpty(SsecfsError):
    pass


class IsADirectory(SsecfsError):
    pass


class NotADirectory(SsecfsError):
    pass


class NotSupported(SsecfsError):
    pass


class NameTooLong(SsecfsError):
    pass


class InvalidName(SsecfsError):
    pass


class ReadOnly(SsecfsError):
    pass


class PermissionDenied(SsecfsError):
    pass


class NotPermitted(PermissionDenied):
    """An operation only the owner (or root) may do: EPERM, where PermissionDenied is EACCES."""


class KeyMismatch(SsecfsError):
    """No key of the ring opens this object (wrong key, or a plaintext object we refuse)."""


class EncryptionNotApplied(SsecfsError):
    """The service did not confirm SSE-C with our key on a write: never accept silently."""


class StoreUnavailable(SsecfsError):
    """Transient failure talking to the object store (network, 5xx, throttling)."""


class StoreError(SsecfsError):
    """Permanent failure from the object store that has no better mapping."""


class IntegrityError(SsecfsError):
    """A cache chunk or journal record failed authentication: never served as data."""


class NoSpace(SsecfsError):
    pass


class Stale(SsecfsError):
    """The object changed under us (ETag mismatch) while we read it."""


class TimedOut(SsecfsError):
    pass


class UserError(SsecfsError):
    """A mistake of the user's (bad argument, bad key file...): one line, an exit code."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
