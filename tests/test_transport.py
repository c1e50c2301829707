"""The transport (ssecfs.store.transport, on awscrt) against real SeaweedFS servers: every request
type with SSE-C over http and https (--ca-bundle), path-style and virtual-hosted, signatures an
authenticating server accepts, credentials that rotate while in use, credential errors that
are not "wrong key", retries of throttling and 5xx, a CONNECT proxy for https, and bad
configuration refused in one line. Plus the receive buffers of big GETs."""

from __future__ import annotations

import base64
import datetime
import json
import mmap
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace

import boto3
import botocore.credentials
import pytest
from hypothesis import given, settings
from hypothesis import strategies
from botocore.config import Config

from helpers import REPO, run_ssecfs, sse
from seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS
from ssecfs import buffers
from ssecfs.store import client, copies, ssec
from ssecfs.errors import (EXIT_SECURITY, NotFound, PermissionDenied, StoreError, StoreUnavailable,
                           UserError)
from ssecfs.crypto.keys import Key, KeyRing
from ssecfs.store.s3 import S3Store
from ssecfs.store.contract import LOCKED, OPEN
from ssecfs.buffers import BufferPool
from ssecfs.store.client import Answer
from ssecfs.store.transport import resolve_transport
from test_tls import make_ca_and_cert
from wire import TamperProxy

MiB = 1024 * 1024
DOMAIN = "s3.test.internal"          # virtual-hosted buckets: BUCKET.s3.test.internal
ONE = ("AKIDONE", "secret-one")
TWO = ("AKIDTWO", "secret-two")
TESTS = os.path.dirname(os.path.abspath(__file__))


def raw_of(k: Key) -> bytes:
    return base64.b64decode(k.sse_params()["SSECustomerKey"])


def _client(endpoint, verify=None, creds=(ACCESS_KEY, SECRET_KEY)):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=creds[0],
                        aws_secret_access_key=creds[1], region_name="us-east-1", verify=verify,
                        config=Config(s3={"addressing_style": "path"},
                                      request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required"))


def _static(creds) -> botocore.credentials.Credentials:
    return botocore.credentials.Credentials(*creds)


# ---------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def auth_seaweed(tmp_path_factory):
    """A SeaweedFS that checks signatures, with identities: the tests' usual one (so the
    helpers work), ONE and TWO."""
    d = tmp_path_factory.mktemp("auth")
    ids = [{"name": n, "credentials": [{"accessKey": a, "secretKey": s}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
           for n, (a, s) in (("tests", (ACCESS_KEY, SECRET_KEY)), ("one", ONE), ("two", TWO))]
    (d / "s3.json").write_text(json.dumps({"identities": ids}))
    sw = SeaweedFS(str(d / "data"), extra_args=[f"-s3.config={d / 's3.json'}"]).start()
    yield sw
    sw.stop()


@pytest.fixture(scope="module")
def tls_seaweed(tmp_path_factory):
    """SeaweedFS over https with a private CA's certificate for localhost, 127.0.0.1 and
    *.s3.test.internal (virtual-hosted buckets; not s3.test.internal itself: a path-style
    request to that name fails verification)."""
    d = str(tmp_path_factory.mktemp("tls"))
    pki = make_ca_and_cert(d, dns=("localhost", "*." + DOMAIN))
    sw = SeaweedFS(os.path.join(d, "data"), https=(pki["cert.pem"], pki["key.pem"]),
                   extra_args=[f"-s3.domainName={DOMAIN}"]).start()
    os.environ.update(sw.env())          # (as the session's SeaweedFS does: its credentials)
    yield sw, pki["ca.pem"]
    sw.stop()


def _bucket(sw, prefix="t") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    sw.create_bucket(name)
    return name


@pytest.fixture
def made():
    stores = []
    yield stores
    for st in stores:
        st.close()


# ---------------------------------------------------------------------------- every request
def exercise(st: S3Store, other: S3Store) -> list[str]:
    """Every request type the store sends, each checked: small and multipart writes,
    caller-driven multipart, HEADs (open, locked), small and bulk reads, copies (replace,
    as-is, streamed fallback of UploadPartCopy), listings, deletes, the mount-time checks."""
    k = st.ring.current
    fp = k.fingerprint
    d = os.urandom(100_000)
    assert st.put("x/a", d, {"mode": "33188"}).access == OPEN
    h = st.head("x/a")
    assert (h.access, h.key_fp, h.size, h.metadata["mode"]) == (OPEN, fp, len(d), "33188")
    assert st.head_with_start("x/a", 16384).start == d[:16384]
    assert st.get_range("x/a", 10, 100, fp, etag=h.etag) == d[10:110]
    big = os.urandom(20 * MiB + 5)
    st.upload("x/big", len(big), lambda o, n: big[o:o + n], {"mode": "33188"})
    assert bytes(st.get_range("x/big", 3, 9 * MiB, fp, shared=True)) == big[3:3 + 9 * MiB]
    up, ufp = st.mpu_begin("x/mpu", {})
    etags = [st.mpu_part("x/mpu", up, 1, big[:5 * MiB], ufp),
             st.mpu_part("x/mpu", up, 2, big[5 * MiB:6 * MiB], ufp)]
    assert st.mpu_complete("x/mpu", up, [(1, etags[0]), (2, etags[1])], ufp).size == 6 * MiB
    up2, _ = st.mpu_begin("x/aborted", {})
    st.mpu_abort("x/aborted", up2)
    assert st.copy("x/a", "x/b", len(d), {"mode": "1"}, fp, h.etag).key_fp == fp
    assert st.copy_as_is("x/b", "x/c", len(d)).key_fp == fp
    saved, copies.COPY_MAX = copies.COPY_MAX, MiB
    try:
        st.copy("x/big", "x/bigcopy", len(big), {}, fp)      # UploadPartCopy, then streamed
    finally:
        copies.COPY_MAX = saved
    assert bytes(st.get_range("x/bigcopy", 0, len(big), fp)) == big
    assert other.head("x/a").access == LOCKED
    with pytest.raises(PermissionDenied):
        other.get_range("x/a", 0, 10, None)
    listed = [o.key for p in st.list_page_iter("x/", None) for o in p.objects]
    assert listed == ["x/a", "x/b", "x/big", "x/bigcopy", "x/c", "x/mpu"]
    st.delete("x/c")
    st.delete_many(["x/a", "x/b", "x/big", "x/bigcopy", "x/mpu"])
    with pytest.raises(NotFound):
        st.head("x/a")
    assert [o.key for p in st.list_page_iter("x/", None) for o in p.objects] == []
    st.check_bucket()
    st.probe_sse("x/.probe")
    assert st.ssec_blocked() is False
    skew = st.server_time_skew()
    assert skew is not None and abs(skew) < 300
    st.put("x/status", b"s", {})
    assert (st.get_status("x/status", None), st.get_status("x/status", k)) == (400, 200)
    st.delete("x/status")
    return listed


@pytest.mark.seaweed
def test_every_request_type_over_http(seaweed, bucket, made):
    k = Key(os.urandom(32))
    made += [S3Store(bucket, KeyRing([k]), endpoint_url=seaweed.endpoint),
             S3Store(bucket, KeyRing([Key(os.urandom(32))]), endpoint_url=seaweed.endpoint)]
    exercise(*made)


@pytest.mark.seaweed
def test_every_request_type_over_https_with_the_ca_bundle(tls_seaweed, made):
    sw, ca = tls_seaweed
    bucket = _bucket(sw)
    k = Key(os.urandom(32))
    made += [S3Store(bucket, KeyRing([k]), endpoint_url=sw.https_endpoint, ca_bundle=ca),
             S3Store(bucket, KeyRing([Key(os.urandom(32))]), endpoint_url=sw.https_endpoint,
                     ca_bundle=ca)]
    assert made[0].transport.ca_bundle == ca and made[0].transport.scheme == "https"
    exercise(*made)
    # what is stored is SSE-C under the key (read with boto3 over https, path-style)
    made[0].put("kept", b"at rest", {})
    s3 = sw.client(endpoint=sw.https_endpoint, verify=ca)
    assert s3.get_object(Bucket=bucket, Key="kept", **sse(raw_of(k)))["Body"].read() == b"at rest"


@pytest.mark.seaweed
def test_tls_verification_failure_is_one_clear_error(tls_seaweed, made, tmp_path):
    """Without the CA the certificate is refused, never accepted silently: the mount-time
    check says so in one line (exit 4), a request fails as unavailable."""
    sw, _ = tls_seaweed
    st = S3Store("any-bucket", KeyRing([Key(os.urandom(32))]), endpoint_url=sw.https_endpoint)
    made.append(st)
    with pytest.raises(UserError) as e:                          # the system's CAs
        st.check_bucket()
    assert e.value.exit_code == 4 and "\n" not in str(e.value)
    assert "TLS verification failed" in str(e.value) and "--ca-bundle" in str(e.value)
    other_ca = make_ca_and_cert(str(tmp_path))["ca.pem"]       # a CA that did not sign it
    st = S3Store("any-bucket", KeyRing([Key(os.urandom(32))]), endpoint_url=sw.https_endpoint,
                 ca_bundle=other_ca, max_attempts=1)
    made.append(st)
    with pytest.raises(StoreUnavailable, match="TLS"):
        st.get_range("k", 0, 10, None)


# ---------------------------------------------------------------------------- virtual-hosted
CHILD = """
import json, os, sys
sys.path[:0] = [{repo!r}, {tests!r}, {scripts!r}]
from ssecfs.crypto.keys import Key, KeyRing
from ssecfs.store.s3 import S3Store
from ssecfs.errors import UserError
from dataclasses import replace
import test_transport
k = Key(bytes.fromhex({key!r}))
st = S3Store({bucket!r}, KeyRing([k]), endpoint_url={endpoint!r}, ca_bundle={ca!r})
other = S3Store({bucket!r}, KeyRing([Key(os.urandom(32))]), endpoint_url={endpoint!r}, ca_bundle={ca!r})
seen = set()
st.wire.observers.append(lambda op, method, path, h: seen.add(h["host"]))
listed = test_transport.exercise(st, other)
st.put("kept", b"virtually hosted", {{}})
path_style = S3Store({bucket!r}, KeyRing([k]), transport=replace(st.transport, addressing="path"),
                     max_attempts=1)
try:
    path_style.check_bucket()
    refused = None
except UserError as e:
    refused = str(e)
print(json.dumps({{"addressing": st.transport.addressing, "hosts": sorted(seen), "listed": listed,
                  "path_style": refused}}))
"""


@pytest.mark.seaweed
def test_every_request_type_virtual_hosted(tls_seaweed, tmp_path):
    """Virtual-hosted addressing (the profile's s3 addressing_style), every request to
    BUCKET.s3.test.internal over https. The name resolves to loopback only inside a private
    mount namespace whose /etc/hosts says so (awscrt resolves names natively, so this is
    the way to steer it without touching the machine's files); the certificate covers only
    *.s3.test.internal, so path-style requests to s3.test.internal fail verification."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for a private mount namespace")
    sw, ca = tls_seaweed
    bucket = _bucket(sw, "vh")
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {DOMAIN} {bucket}.{DOMAIN}\n")
    config = tmp_path / "aws-config"
    config.write_text("[default]\ns3 =\n    addressing_style = virtual\n")
    k = Key(os.urandom(32))
    child = tmp_path / "child.py"
    child.write_text(CHILD.format(repo=REPO, tests=TESTS, scripts=os.path.join(REPO, "scripts"),
                                  key=raw_of(k).hex(), bucket=bucket,
                                  endpoint=f"https://{DOMAIN}:{sw.https_port}", ca=ca))
    env = {**os.environ, **sw.env(), "AWS_CONFIG_FILE": str(config)}
    env.pop("AWS_PROFILE", None)
    r = subprocess.run(["unshare", "--mount", "sh", "-c",
                        f'mount --bind "{hosts}" /etc/hosts && exec "{sys.executable}" "{child}"'],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["addressing"] == "virtual"
    assert out["hosts"] == [f"{bucket}.{DOMAIN}:{sw.https_port}"]
    assert out["path_style"] and "TLS verification failed" in out["path_style"]
    s3 = sw.client(endpoint=sw.https_endpoint, verify=ca)
    assert s3.get_object(Bucket=bucket, Key="kept",
                         **sse(raw_of(k)))["Body"].read() == b"virtually hosted"
    assert not os.path.exists("/etc/hosts") or DOMAIN not in open("/etc/hosts").read()


def test_virtual_addressing_over_plain_http_is_refused(tmp_path, monkeypatch):
    """BUCKET.localhost is not a name the loopback rule can vouch for."""
    cfg = tmp_path / "aws-config"
    cfg.write_text("[default]\ns3 =\n    addressing_style = virtual\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(cfg))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with pytest.raises(UserError) as e:
        resolve_transport("http://localhost:9000")
    assert e.value.exit_code == EXIT_SECURITY and "virtual-hosted" in str(e.value)
    t = resolve_transport("https://s3.example.invalid")
    assert t.addressing == "virtual" and t.virtual_for("my-bucket")
    assert not t.virtual_for("dotted.bucket.name") and not t.virtual_for("Upper")
    cfg.write_text("[default]\ns3 =\n    addressing_style = path\n")
    assert resolve_transport(None).addressing == "path"         # AWS, told path-style
    cfg.write_text("")
    assert resolve_transport(None).addressing == "virtual"
    assert resolve_transport("http://127.0.0.1:9").addressing == "path"


# ---------------------------------------------------------------------------- credentials
KEYS = ["plain", "dir/sub/file.txt", "with space", "plus+and%percent", "q?hash#amp&eq=",
        "ünïcödé/名前", "tilde~_-.dot", "a'b(c)*!"]


@pytest.mark.seaweed
@pytest.mark.parametrize("key", KEYS)
def test_signed_requests_are_accepted_for_any_key(auth_seaweed, made, key):
    """awscrt signs; a server that checks every signature accepts every request type for
    any object name (the path, the copy source and the listing prefix are encoded as signed)."""
    bucket = _bucket(auth_seaweed)
    k = Key(os.urandom(32))
    t = replace(resolve_transport(auth_seaweed.endpoint), credentials=_static(ONE))
    st = S3Store(bucket, KeyRing([k]), transport=t, max_attempts=1)
    made.append(st)
    st.put(key, b"x" * 10, {"mode": "1"})
    assert st.head(key).key_fp == k.fingerprint
    assert st.get_range(key, 0, 10, k.fingerprint) == b"x" * 10
    assert [o.key for p in st.list_page_iter(key, None) for o in p.objects] == [key]
    st.copy(key, key + ".c", 10, {}, k.fingerprint)
    st.delete_many([key + ".c"])
    st.delete(key)
    assert [o.key for p in st.list_page_iter(key, None) for o in p.objects] == []


@pytest.mark.seaweed
def test_refused_credentials_are_not_a_wrong_key(auth_seaweed, made):
    """A 403 for a bad signature or an unknown access key says so (its S3 error code): it is
    not PermissionDenied (no key of the ring is tried next, nothing is reported LOCKED)."""
    bucket = _bucket(auth_seaweed)
    k = Key(os.urandom(32))
    good = S3Store(bucket, KeyRing([k]), transport=replace(
        resolve_transport(auth_seaweed.endpoint), credentials=_static(ONE)))
    made.append(good)
    good.put("obj", b"data", {})
    for creds, code in (((ONE[0], "not-the-secret"), "SignatureDoesNotMatch"),
                        (("AKIDNOBODY", "x"), "InvalidAccessKeyId")):
        st = S3Store(bucket, KeyRing([k]), transport=replace(
            resolve_transport(auth_seaweed.endpoint), credentials=_static(creds)),
            max_attempts=1)
        made.append(st)
        for call in (lambda: st.get_range("obj", 0, 4, k.fingerprint), lambda: st.head("obj"),
                     lambda: st.put("new", b"x", {}), lambda: list(st.list_page_iter(""))):
            with pytest.raises(StoreError, match=f"credentials refused \\({code}\\)"):
                call()
        with pytest.raises(UserError) as e:
            st.check_bucket()
        assert e.value.exit_code == 4 and code in str(e.value)


class Rotating:
    """Temporary credentials as botocore refreshes them (assume-role, SSO, IMDS...): each
    refresh returns what `now` says, valid for a few minutes (so botocore refreshes again
    at once: they are always within its refresh window)."""

    def __init__(self, creds):
        self.now = creds
        self.refreshes = 0
        self.lock = threading.Lock()

    def refresh(self) -> dict:
        with self.lock:
            self.refreshes += 1
            ak, sk = self.now
        expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)
        return {"access_key": ak, "secret_key": sk, "token": None,
                "expiry_time": expiry.isoformat()}

    def credentials(self):
        return botocore.credentials.RefreshableCredentials.create_from_metadata(
            self.refresh(), self.refresh, "test-rotation")


def _signed_with(req) -> str:
    return req.headers["authorization"].split("Credential=")[1].split("/")[0]


@pytest.mark.seaweed
def test_rotating_credentials_are_used_as_they_change(auth_seaweed, made):
    """Refreshable credentials go to awscrt through a delegate asked for every request:
    after a rotation the next request is signed with the new key; a rotation to credentials
    the server does not know fails the requests, and the next good rotation heals them."""
    bucket = _bucket(auth_seaweed)
    k = Key(os.urandom(32))
    rot = Rotating(ONE)
    proxy = TamperProxy(auth_seaweed.endpoint).start()
    try:
        t = replace(resolve_transport(proxy.url), credentials=rot.credentials())
        st = S3Store(bucket, KeyRing([k]), transport=t, max_attempts=1)
        made.append(st)
        data = os.urandom(20 * MiB + 1)                  # multipart: many signed requests
        st.upload("a", len(data), lambda o, n: data[o:o + n], {})
        before = rot.refreshes
        assert {_signed_with(r) for r in proxy.requests()} == {ONE[0]}
        mark = proxy.mark()
        rot.now = TWO
        st.upload("b", len(data), lambda o, n: data[o:o + n], {})
        assert rot.refreshes > before
        assert {_signed_with(r) for r in proxy.requests(since=mark)} == {TWO[0]}
        assert bytes(st.get_range("b", 0, len(data), k.fingerprint)) == data
        rot.now = ("AKIDREVOKED", "gone")
        with pytest.raises(StoreError, match="InvalidAccessKeyId"):
            st.head_with_start("a", 100)
        rot.now = ONE
        assert st.head("a").size == len(data)
    finally:
        proxy.stop()
    s3 = _client(auth_seaweed.endpoint)
    for name in ("a", "b"):
        assert s3.get_object(Bucket=bucket, Key=name, **sse(raw_of(k)))["Body"].read() == data


@pytest.mark.seaweed
def test_a_failed_refresh_fails_the_request_in_one_line(seaweed, bucket, made, capfd, caplog):
    """When refreshing the credentials fails (the STS or SSO endpoint down...), the request
    fails as "credentials unavailable", the log says why in one line, nothing prints a
    traceback, and the next refresh that works heals it."""
    env = seaweed.env()      # the server's own credentials: valid whatever other tests set up
    rot = Rotating((env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]))
    creds = rot.credentials()
    real = rot.refresh

    def broken():
        raise RuntimeError("the token service is down")
    creds._refresh_using = broken
    k = Key(os.urandom(32))
    st = S3Store(bucket, KeyRing([k]), max_attempts=1,
                 transport=replace(resolve_transport(seaweed.endpoint), credentials=creds))
    made.append(st)
    with caplog.at_level("ERROR", logger="ssecfs.transport"):
        for _ in range(3):
            with pytest.raises(StoreError, match="AWS credentials unavailable"):
                st.put("o", b"x", {})
        with pytest.raises(UserError, match="could not be obtained") as e:
            st.check_bucket()
        assert e.value.exit_code == 4
    said = [r.getMessage() for r in caplog.records if "could not be refreshed" in r.getMessage()]
    assert len(said) == 1 and "the token service is down" in said[0]
    assert "Traceback" not in capfd.readouterr().err
    creds._refresh_using = real
    st.put("o", b"x", {})
    assert st.get_range("o", 0, 1, k.fingerprint) == b"x"


CRED_SCRIPT = """#!/bin/sh
# credential_process: prints what the test put in the file, and notes the key id it gave
cat "{creds}"
sed -n 's/.*"AccessKeyId": "\\([^"]*\\)".*/\\1/p' "{creds}" >> "{log}"
"""


@pytest.mark.mount
def test_credentials_rotating_during_a_mount(auth_seaweed, mounter, key, tmp_path, monkeypatch):
    """A profile's credential_process gives temporary credentials (an expiry botocore keeps
    refreshing); rotated while mounted, writes go on under the new ones: every request the
    daemon sends after the rotation is signed with the new access key."""
    bucket = _bucket(auth_seaweed)
    creds, log_file = tmp_path / "creds.json", tmp_path / "creds.log"

    def give(ak_sk):
        expiry = (datetime.datetime.now(datetime.timezone.utc)
                  + datetime.timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
        tmp = tmp_path / "creds.tmp"
        tmp.write_text(json.dumps({"Version": 1, "AccessKeyId": ak_sk[0],
                                   "SecretAccessKey": ak_sk[1], "Expiration": expiry}) + "\n")
        os.replace(tmp, creds)

    give(ONE)
    script = tmp_path / "creds.sh"
    script.write_text(CRED_SCRIPT.format(creds=creds, log=log_file))
    script.chmod(0o700)
    config = tmp_path / "aws-config"
    config.write_text(f"[profile rotating]\ncredential_process = {script}\n"
                      "region = us-east-1\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_PROFILE", "rotating")
    proxy = TamperProxy(auth_seaweed.endpoint).start()
    try:
        m = mounter(bucket, key[0], endpoint=proxy.url)
        first = os.urandom(300_000)
        with open(os.path.join(m.path, "first.bin"), "wb") as f:
            f.write(first)
            f.flush()
            os.fsync(f.fileno())
        assert {_signed_with(r) for r in proxy.requests()} == {ONE[0]}
        give(TWO)
        mark = proxy.mark()
        second = os.urandom(300_000)
        with open(os.path.join(m.path, "second.bin"), "wb") as f:
            f.write(second)
            f.flush()
            os.fsync(f.fileno())
        after = proxy.requests(since=mark)
        assert after and {_signed_with(r) for r in after} == {TWO[0]}
        assert not [r for r in after if r.status in (None, 400, 403)], after   # (404: lookups)
        m.umount()
    finally:
        proxy.stop()
    assert TWO[0] in log_file.read_text().split()
    monkeypatch.delenv("AWS_PROFILE")
    s3 = _client(auth_seaweed.endpoint)
    for name, data in (("first.bin", first), ("second.bin", second)):
        assert s3.get_object(Bucket=bucket, Key=name, **sse(key[1]))["Body"].read() == data


# ---------------------------------------------------------------------------- retries
@pytest.mark.seaweed
def test_throttling_and_5xx_are_retried_then_unavailable(seaweed, bucket, made):
    """awscrt retries throttling, 5xx and a dropped connection; what still fails after the
    attempts is StoreUnavailable."""
    proxy = TamperProxy(seaweed.endpoint).start()
    try:
        k = Key(os.urandom(32))
        st = S3Store(bucket, KeyRing([k]), endpoint_url=proxy.url, max_attempts=3)
        made.append(st)
        proxy.fail(503, code="SlowDown", times=2, op="PutObject")
        st.put("r", b"retried", {})
        assert [r.status for r in proxy.requests(op="PutObject")] == [503, 503, 200]
        proxy.fail(500, code="InternalError", times=1, op="GetObject")
        proxy.drop(times=1, op="HeadObject")
        assert st.get_range("r", 0, 7, k.fingerprint) == b"retried"
        assert st.head("r").size == 7
        mark = proxy.mark()
        proxy.fail(503, code="SlowDown", op="GetObject")
        with pytest.raises(StoreUnavailable, match="SlowDown"):
            st.get_range("r", 0, 7, k.fingerprint)
        assert len(proxy.requests(op="GetObject", since=mark)) == 3
        proxy.clear()
        proxy.fail(404, code="NoSuchKey", op="GetObject")        # not retried
        mark = proxy.mark()
        with pytest.raises(NotFound):
            st.get_range("r", 0, 7, k.fingerprint)
        assert len(proxy.requests(op="GetObject", since=mark)) == 1
    finally:
        proxy.stop()


# ---------------------------------------------------------------------------- a proxy for https
class ConnectProxy:
    """A loopback HTTPS proxy: it answers CONNECT host:port by tunnelling to 127.0.0.1:port,
    and records each CONNECT line (it sees nothing else: TLS runs through it)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.connects: list[str] = []
        self.other: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(c,), daemon=True).start()

    def _tunnel(self, c):
        head = b""
        while b"\r\n\r\n" not in head:
            b = c.recv(4096)
            if not b:
                c.close()
                return
            head += b
        line = head.split(b"\r\n")[0].decode("latin-1")
        if not line.startswith("CONNECT "):
            self.other.append(head)
            c.close()
            return
        self.connects.append(line)
        port = int(line.split()[1].rsplit(":", 1)[1])
        up = socket.create_connection(("127.0.0.1", port))
        c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        def pipe(a, b):
            try:
                while True:
                    data = a.recv(65536)
                    if not data:
                        break
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        threading.Thread(target=pipe, args=(up, c), daemon=True).start()
        pipe(c, up)

    def close(self):
        self.sock.close()


@pytest.mark.seaweed
def test_https_goes_through_the_configured_proxy_as_a_tunnel(tls_seaweed, made, monkeypatch):
    """awscrt's S3 client has no proxy setting of its own in this version: it reads
    HTTPS_PROXY from the environment. The store gets the proxy resolve_transport chose, and
    every request goes through it as a CONNECT tunnel."""
    sw, ca = tls_seaweed
    bucket = _bucket(sw)
    px = ConnectProxy()
    try:
        for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "HTTP_PROXY",
                     "http_proxy"):
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)
        monkeypatch.setenv("HTTPS_PROXY", px.url)
        k = Key(os.urandom(32))
        st = S3Store(bucket, KeyRing([k]), endpoint_url=sw.https_endpoint, ca_bundle=ca)
        made.append(st)
        assert st.transport.proxy == px.url
        st.put("via-proxy", b"tunnelled", {})
        assert st.get_range("via-proxy", 0, 9, k.fingerprint) == b"tunnelled"
        assert px.connects and all(c.startswith(f"CONNECT localhost:{sw.https_port} ")
                                   for c in px.connects), px.connects
        assert px.other == []
    finally:
        px.close()


# ---------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("case", ["empty env", "empty profile", "not pem", "missing"])
def test_a_bad_ca_bundle_is_refused_in_one_line(tmp_path, monkeypatch, case):
    cfg = tmp_path / "aws-config"
    cfg.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(cfg))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("this is not a certificate\n")
    if case == "empty env":
        monkeypatch.setenv("AWS_CA_BUNDLE", "")
        want = "AWS_CA_BUNDLE is set but empty"
    elif case == "empty profile":
        cfg.write_text("[default]\nca_bundle =\n")
        want = "ca_bundle of profile 'default' is set but empty"
    elif case == "not pem":
        monkeypatch.setenv("AWS_CA_BUNDLE", str(not_pem))
        want = "no PEM certificate"
    else:
        monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "nowhere.pem"))
        want = "No such file"
    with pytest.raises(UserError) as e:
        resolve_transport("https://s3.example.invalid")
    assert e.value.exit_code == 4 and want in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("command", ["mount", "mount-foreground", "check"])
def test_an_empty_aws_ca_bundle_is_one_line_from_the_cli(tmp_path, key, command):
    """As a new user would try it: AWS_CA_BUNDLE set but empty gives one line naming it and
    exit 4, in the foreground and when daemonized, before anything is mounted."""
    env = {**os.environ, "AWS_CA_BUNDLE": "", "AWS_ACCESS_KEY_ID": "AKIDX",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_EC2_METADATA_DISABLED": "true"}
    mp = tmp_path / "mnt"
    mp.mkdir()
    args = ["check", "some-bucket", "--keyfile", key[0]] if command == "check" else \
        ["mount", "some-bucket", str(mp), "--keyfile", key[0], "--cache-dir", str(tmp_path / "c")]
    if command == "mount-foreground":
        args.append("--foreground")
    args += ["--endpoint-url", "https://s3.example.invalid"]
    r = run_ssecfs(*args, env=env, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 4, r.stdout + r.stderr
    assert len(lines) == 1 and "AWS_CA_BUNDLE is set but empty" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not os.path.ismount(mp)


# ---------------------------------------------------------------------------- answers, buffers
def test_repeated_headers_are_joined_as_one():
    """SeaweedFS sends the key MD5 echo twice, under two spellings: one value, seen once."""
    a = Answer(200, [("X-Amz-Server-Side-Encryption-Customer-Key-MD5", "abc=="),
                     ("X-Amz-Server-Side-Encryption-Customer-Key-Md5", "abc=="),
                     ("ETag", '"e"')], b"")
    assert a.headers["x-amz-server-side-encryption-customer-key-md5"] == "abc==, abc=="
    assert ssec.echo_fps(a.headers["x-amz-server-side-encryption-customer-key-md5"]) == {"abc=="}
    assert a.ok and not Answer(200, [], b"<Error/>", failed=True).ok and not Answer(404, [], b"").ok


def test_pool_hands_a_buffer_out_again_only_when_nothing_refers_to_it():
    pool = BufferPool(keep=4, idle_s=60)
    a = pool.get(1000)
    assert isinstance(a, mmap.mmap) and len(a) == 1000
    first = id(a)
    a[:5] = b"hello"
    view = memoryview(a)[100:200]        # a chunk of a read unit, still in someone's hands
    sub = view[10:20]                    # (a view of a view refers to the buffer too)
    del a, view
    b = pool.get(1000)
    assert id(b) != first, "a buffer still seen through a view was handed out again"
    assert pool.get(999) is not b        # other sizes never match
    del sub
    c = pool.get(1000)
    assert id(c) == first, "a buffer nobody refers to any more was not reused"
    assert c[:5] == b"hello"             # (reused as is: the caller overwrites what it reads)
    d = pool.get(1000)
    assert d is not c and d is not b     # both still held here


def test_pool_remembers_at_most_keep_and_forgets_idle_ones():
    pool = BufferPool(keep=2, idle_s=10)
    held = [pool.get(64) for _ in range(3)]      # all in use: three distinct buffers
    assert len({id(b) for b in held}) == 3
    assert len(pool._bufs) == 2                  # the oldest was forgotten (it lives on: held)
    oldest = id(held[0])
    held.clear()
    assert id(pool.get(64)) != oldest            # forgotten buffers are not reused
    now = time.monotonic()
    assert pool.trim(now) == 2                   # all recent
    assert pool.trim(now + 11) == 0              # idle past idle_s: dropped


@pytest.mark.seaweed
def test_a_chunk_kept_holds_only_its_own_segment(seaweed, bucket, made, monkeypatch):
    """A reader or sealer that still holds one chunk of a read unit keeps that chunk's 1 MiB
    segment from being received into, and nothing more: the unit's other segments are
    reused at once (with one buffer per unit, a few chunks held pinned 8 MiB each)."""
    monkeypatch.setattr(buffers, "POOL", BufferPool(keep=64, idle_s=60))
    k = Key(os.urandom(32))
    st = S3Store(bucket, KeyRing([k]), endpoint_url=seaweed.endpoint)
    made.append(st)
    big = os.urandom(4 * MiB)
    st.put("unit", big, {})
    first = st.get_range("unit", 0, len(big), k.fingerprint, shared=True)
    assert [len(s) for s in first.parts] == [MiB] * 4
    kept = list(first.views(128 * 1024))[9]            # a chunk of the second segment
    ids = [id(s) for s in first.parts]
    del first
    again = st.get_range("unit", 0, len(big), k.fingerprint, shared=True)
    reused = {id(s) for s in again.parts}
    assert ids[1] not in reused, "received into a segment a kept chunk still shows"
    assert {ids[0], ids[2], ids[3]} <= reused, "segments nobody refers to were not reused"
    assert bytes(kept) == big[9 * 128 * 1024:10 * 128 * 1024] and bytes(again) == big


@settings(max_examples=200, deadline=None)
@given(strategies.lists(strategies.binary(max_size=40), max_size=8),
       strategies.lists(strategies.integers(1, 50), min_size=1))
def test_a_segmented_body_reads_back_in_order_and_drops_each_piece_once_read(pieces, sizes):
    stream = client._body_stream(buffers.Segments(list(pieces)))
    out, i = b"", 0
    while True:
        buf = bytearray(sizes[i % len(sizes)])
        n = stream.readinto(buf)
        i += 1
        if n == 0:
            break
        out += bytes(buf[:n])
    assert out == b"".join(pieces)
    assert not [p for p in stream._parts if len(p)]
