"""Domain errors and the exit codes they carry. Imported by every layer; imports nothing of
ssecfs.

The FUSE adapter maps the filesystem's errors to errno values in one table
(mount.adapter.ERRNO_TABLE); a UserError carries its exit code in its class, which the CLI
prints as one line and exits with. Messages must never contain key material: callers pass
fingerprints, never keys.
"""

# Exit codes of `ssecfs` (documented in systemd/ssecfs@.service, RestartPreventExitStatus=).
EXIT_FAILURE = 1        # failure at run time
EXIT_USAGE = 2          # bad argument, option or configuration value
EXIT_KEYFILE = 3        # the key file is missing, unsafe or malformed
EXIT_STORE = 4          # bucket, endpoint or credentials (retried by systemd: may be transient)
EXIT_SECURITY = 5       # a security refusal: plain http, SSE-C not enforced, unsafe directory
EXIT_CACHE = 6          # the cache directory
EXIT_MOUNTPOINT = 7     # the mount point
EXIT_WRONG_KEY = 8      # no key of the ring opens the bucket's objects


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


class Unimplemented(SsecfsError):
    """An operation this filesystem does not have at all (ENOSYS: the kernel stops asking)."""


class UserError(SsecfsError):
    """A mistake of the user's (bad argument, bad option...): one line, and the exit code of
    its class. A subclass names the part of the setup that is wrong and must say its code:
    class KeyFileError(UserError, exit_code=EXIT_KEYFILE)."""

    exit_code = EXIT_USAGE

    def __init_subclass__(cls, *, exit_code: int, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.exit_code = exit_code


class CommandFailed(UserError, exit_code=EXIT_FAILURE):
    """A command could not do its job at run time (unmount refused, no daemon answering)."""


class KeyFileError(UserError, exit_code=EXIT_KEYFILE):
    """The key file is missing, unsafe (mode, owner, directory) or not a key file."""


class StoreSetupError(UserError, exit_code=EXIT_STORE):
    """The bucket, endpoint or credentials do not work (yet: systemd retries this one)."""


class SecurityRefusal(UserError, exit_code=EXIT_SECURITY):
    """A setup that would weaken the encryption or expose data: refused, never worked
    around (plain http, SSE-C not enforced, a directory others can write)."""


class CacheDirError(UserError, exit_code=EXIT_CACHE):
    """The cache directory cannot be used (permissions, format, another daemon's)."""


class MountpointError(UserError, exit_code=EXIT_MOUNTPOINT):
    """The mount point is missing, not a directory, not empty or mounted already."""


class WrongKeyError(UserError, exit_code=EXIT_WRONG_KEY):
    """No key of the ring opens any sampled object of the bucket."""
