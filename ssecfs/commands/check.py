"""`ssecfs check`: tells an operator in a few lines whether this setup is safe.

Each check yields (status, message) with status OK, WARN or FAIL; exit 0 only without FAIL.
"""

from __future__ import annotations

import os

from ..errors import PermissionDenied, SsecfsError, UserError
from ..crypto.keys import Key, KeyRing
from ..store.s3requests import SSEC_BLOCKED_HINT
from ..store.transport import Transport, is_loopback

OK, WARN, FAIL = "OK", "WARN", "FAIL"
MAX_SKEW = 300.0


def check_transport(t: Transport):
    """The endpoint and proxy the store's requests use, as resolved (resolve_transport)."""
    if t.scheme == "https":
        via = (f", through proxy {t.proxy_shown()} (a CONNECT tunnel: the proxy sees only TLS)"
               if t.proxy else "")
        return OK, f"transport: https to {t.host} ({t.where}){via}"
    if is_loopback(t.host):
        return WARN, (f"transport: plain http to loopback {t.host} ({t.where}; keys never "
                      "leave this host, no proxy is used)")
    return FAIL, (f"transport: plain http to {t.host} ({t.where}): keys would cross the "
                  "network in clear")


def run_checks(store, prefix: str, sample: int = 20):
    """Yields (status, message). `store` is an S3Store."""
    yield check_transport(store.transport)
    try:
        store.check_bucket()
    except UserError as e:
        yield FAIL, f"credentials/bucket: {e}"
        return
    yield OK, f"credentials: accepted for bucket {store.bucket!r}"

    ring: KeyRing = store.ring
    probe = prefix + ".ssecfs-check-" + os.urandom(6).hex()
    try:
        store.put(probe, b"ssecfs check probe\n", {})
    except PermissionDenied as e:
        msg = str(e)
        blocked = "blocks SSE-C" in msg or store.ssec_blocked()
        yield FAIL, ("SSE-C: " + SSEC_BLOCKED_HINT) if blocked else f"SSE-C probe write: {msg}"
        return
    except SsecfsError as e:
        yield FAIL, f"SSE-C probe write: {e}"
        return
    try:
        yield OK, "SSE-C: the write echoed AES256 and our key MD5"
        no_key = store.get_status(probe, None)
        wrong = store.get_status(probe, Key(os.urandom(32)))
        right = store.get_status(probe, ring.current)
        if no_key in (400, 403) and wrong in (400, 403) and right == 200:
            yield OK, f"SSE-C enforced: without key -> {no_key}, wrong key -> {wrong}, key -> 200"
        else:
            yield FAIL, (f"SSE-C NOT enforced: without key -> {no_key}, wrong key -> {wrong}, "
                         f"key -> {right}")
    finally:
        try:
            store.delete(probe)
        except SsecfsError:
            pass

    yield from check_sample(store, prefix, sample)

    skew = store.server_time_skew()
    if skew is None:
        yield WARN, "clock: the server sent no Date header"
    elif abs(skew) > MAX_SKEW:
        yield FAIL, f"clock: skew {skew:+.0f}s with the server (requests will be refused)"
    else:
        yield OK, f"clock: skew {skew:+.1f}s"


def check_sample(store, prefix: str, sample: int):
    ring: KeyRing = store.ring
    per_key = {k.fingerprint: 0 for k in ring.keys}
    none, plain, n = [], [], 0
    for page in store.list_page_iter(prefix, delimiter=None, max_keys=200):
        for o in page.objects:
            if o.key.endswith("/") or ".ssecfs-" in o.key.rsplit("/", 1)[-1][:14]:
                continue
            if n >= sample:
                break
            n += 1
            opened = False
            for k in ring.keys:
                verdict, _ = store.head_with(o.key, k)
                if verdict == "open":
                    per_key[k.fingerprint] += 1
                    opened = True
                    break
                if verdict == "plaintext":
                    plain.append(o.key)
                    opened = True
                    break
            if not opened:
                none.append(o.key)
        break
    if n == 0:
        yield OK, "objects: the bucket (prefix) is empty"
        return
    names = ", ".join(f"{'current' if i == 0 else 'old'} {k.short_id}: {per_key[k.fingerprint]}"
                      for i, k in enumerate(ring.keys))
    yield OK, f"keys: of {n} sampled objects, opened by {names}"
    if plain:
        yield WARN, f"objects: {len(plain)} sampled object(s) are plaintext (not SSE-C), e.g. {plain[0]!r}"
    if none:
        yield FAIL, (f"objects: {len(none)} sampled object(s) open with no key of the ring, "
                     f"e.g. {none[0]!r}")
    if len(ring) > 1 and any(per_key[k.fingerprint] for k in ring.keys[1:]):
        yield WARN, "keys: some objects still need an old key: run `ssecfs rekey` before retiring it"
