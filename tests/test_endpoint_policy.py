"""Where the SSE-C keys go: the endpoint as botocore resolves it from every source it honours
(--endpoint-url, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, a profile's `services` section, a
profile's endpoint_url), the plain-http rule applied to that endpoint before any connection
(mount, check, rekey: exit 5, one line naming the host and the source), and proxies never
carrying a plain-http request.

Every host name that must not be reached is under the reserved `.invalid` domain, and every
subprocess runs with the network guard of tests/netguard (any non-loopback lookup or connect
from Python fails and is written down): a regression fails here instead of sending traffic
anywhere. The store's own requests go through awscrt, whose sockets and name lookups are native
and invisible to that guard: the tests of what the store sends use loopback listeners (a
stand-in endpoint, a stand-in proxy) and watch what reaches them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading

import boto3
import pytest

from conftest import make_keyfile
from helpers import REPO, read_cold, run_ssecfs

from ssecfs.store import transport
from ssecfs.errors import EXIT_SECURITY, StoreUnavailable, UserError
from ssecfs.crypto.keys import Key, KeyRing
from ssecfs.store.s3 import S3Store

GUARD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netguard")
ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
                 "AWS_PROFILE", "AWS_DEFAULT_PROFILE")
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
CREDS = {"AWS_ACCESS_KEY_ID": "AKIDENDPOINTTEST", "AWS_SECRET_ACCESS_KEY": "not-a-real-secret",
         "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def _load_guard():
    spec = importlib.util.spec_from_file_location("ssecfs_test_netguard",
                                                  os.path.join(GUARD_DIR, "netguard.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


netguard = _load_guard()


def resolve_transport(*args, **kw):
    return transport.resolve_transport(*args, **kw)


# ---------------------------------------------------------------------------- environment
class Sandbox:
    """An environment for the CLI with no endpoint or proxy setting but the ones a test adds,
    a private AWS config file, and the network guard loaded into every Python process."""

    def __init__(self, tmp_path, seaweed=None):
        self.dir = tmp_path
        self.config_file = tmp_path / "aws-config"
        self.config_file.write_text("")
        self.guard_log = tmp_path / "netguard.log"
        env = {k: v for k, v in os.environ.items()
               if k.upper() not in ENDPOINT_VARS + PROXY_VARS}
        env.update(seaweed.env() if seaweed is not None else CREDS)
        env["AWS_CONFIG_FILE"] = str(self.config_file)
        env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "no-aws-credentials")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (GUARD_DIR, REPO, env.get("PYTHONPATH"))
                                            if p)
        env[netguard.ENV] = str(self.guard_log)
        self.env = env

    def configure(self, env: dict | None = None, config: str = "") -> "Sandbox":
        self.env.update(env or {})
        self.config_file.write_text(textwrap.dedent(config))
        return self

    def run(self, *args, timeout=120) -> subprocess.CompletedProcess:
        return run_ssecfs(*args, env=self.env, timeout=timeout)

    def violations(self) -> str:
        return self.guard_log.read_text() if self.guard_log.exists() else ""

    def guarded_pids(self) -> set[str]:
        p = str(self.guard_log) + ".loaded"
        return set(open(p).read().split()) if os.path.exists(p) else set()

    def assert_no_escape(self, min_processes: int = 1) -> None:
        assert self.violations() == "", "non-loopback traffic attempted:\n" + self.violations()
        assert len(self.guarded_pids()) >= min_processes, "the network guard was not loaded"


# Each source of an endpoint, as (env, AWS config file, extra CLI args, the words naming it).
# Every source points at its own host, so the refusal proves which one was used.
SOURCES = {
    "AWS_ENDPOINT_URL": (
        {"AWS_ENDPOINT_URL": "http://env-global.invalid:9000"}, "", [],
        "env-global.invalid", r"from AWS_ENDPOINT_URL(?!_)"),
    "AWS_ENDPOINT_URL_S3": (
        # the S3 variable wins over the global one (https there, so only the S3 one refuses)
        {"AWS_ENDPOINT_URL_S3": "http://env-s3.invalid:9000",
         "AWS_ENDPOINT_URL": "https://env-global.invalid"}, "", [],
        "env-s3.invalid", r"from AWS_ENDPOINT_URL_S3"),
    "profile endpoint_url": (
        {}, """
        [profile lan]
        endpoint_url = http://profile.invalid:9000
        """, ["--profile", "lan"], "profile.invalid", r"endpoint_url of profile 'lan'"),
    "default profile endpoint_url": (
        {}, """
        [default]
        endpoint_url = http://default-profile.invalid:9000
        """, [], "default-profile.invalid", r"endpoint_url of profile 'default'"),
    "profile services section": (
        {"AWS_PROFILE": "lan"}, """
        [profile lan]
        services = lan-s3
        endpoint_url = https://not-this-one.invalid
        [services lan-s3]
        s3 =
          endpoint_url = http://services.invalid:9000
        """, [], "services.invalid", r"services lan-s3.*profile 'lan'"),
}


def assert_round_trip(m, name: str, size: int) -> None:
    """A file written through the mount (fsync: sent to the endpoint) reads back cold."""
    data = os.urandom(size)
    with open(os.path.join(m.path, name), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    assert read_cold(os.path.join(m.path, name)) == data


def assert_one_line_refusal(r: subprocess.CompletedProcess, host: str, where: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == EXIT_SECURITY, f"exit {r.returncode}; stderr: {r.stderr!r}"
    assert len(lines) == 1 and lines[0].startswith("ssecfs: "), r.stderr
    assert "Traceback" not in r.stderr
    assert host in lines[0], lines[0]
    assert re.search(where, lines[0]), f"{where!r} not in {lines[0]!r}"
    assert "https" in lines[0]


# ---------------------------------------------------------------------------- CLI refusals
@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("command", ["check", "rekey"])
def test_check_and_rekey_refuse_plain_http_from_any_source(tmp_path, command, source):
    env, config, extra, host, where = SOURCES[source]
    box = Sandbox(tmp_path).configure(env, config)
    keyfile = str(tmp_path / "k")
    make_keyfile(keyfile)
    r = box.run(command, "some-bucket", "--keyfile", keyfile, *extra, timeout=60)
    assert_one_line_refusal(r, host, where)
    box.assert_no_escape()


@pytest.mark.mount
@pytest.mark.parametrize("source", list(SOURCES))
def test_mount_refuses_plain_http_from_any_source(mounter, bucket, key, tmp_path, source):
    env, config, extra, host, where = SOURCES[source]
    box = Sandbox(tmp_path).configure(env, config)
    m = mounter(bucket, key[0], mount=False)
    r = box.run("mount", bucket, m.path, "--keyfile", key[0], "--cache-dir", m.cache_dir,
                *extra, timeout=60)
    assert_one_line_refusal(r, host, where)
    assert not os.path.ismount(m.path)
    box.assert_no_escape()


def test_daemon_refuses_before_connecting(tmp_path):
    """The daemon (what `ssecfs mount` starts, and what systemd runs) refuses on its own and
    reports `ERROR 5 ...` on its ready pipe, which `ssecfs mount` turns into its exit code."""
    box = Sandbox(tmp_path).configure({"AWS_ENDPOINT_URL_S3": "http://daemon.invalid:9000"})
    keyfile = str(tmp_path / "k")
    make_keyfile(keyfile)
    (tmp_path / "mp").mkdir()
    script = textwrap.dedent(f"""
        import os
        from ssecfs.mount import daemon
        from ssecfs.config import FsConfig, MountConfig, StoreConfig
        cfg = MountConfig(store=StoreConfig(bucket="some-bucket"), fs=FsConfig(),
                          mountpoint={str(tmp_path / "mp")!r}, keyfile={keyfile!r},
                          cache_dir={str(tmp_path / "cache")!r}, cache_size=1 << 26)
        r, w = os.pipe()
        rc = daemon.run(cfg, ready_fd=w)
        print(rc)
        print(os.read(r, 4096).decode().strip())
    """)
    p = subprocess.run([sys.executable, "-c", script], env=box.env, capture_output=True,
                       text=True, timeout=60)
    out = p.stdout.strip().splitlines()
    assert p.returncode == 0 and len(out) == 2, p.stdout + p.stderr
    assert out[0] == str(EXIT_SECURITY), p.stdout + p.stderr
    assert out[1].startswith(f"ERROR {EXIT_SECURITY} "), out[1]
    assert "daemon.invalid" in out[1] and "from AWS_ENDPOINT_URL_S3" in out[1], out[1]
    box.assert_no_escape()


# ---------------------------------------------------------------------------- end to end
@pytest.mark.mount
def test_endpoint_from_environment_is_the_one_used_and_reported(seaweed, mounter, bucket, key,
                                                                 tmp_path):
    """AWS_ENDPOINT_URL alone (no --endpoint-url) takes mount, check and rekey to the loopback
    SeaweedFS, and check names it and its source."""
    box = Sandbox(tmp_path, seaweed).configure({"AWS_ENDPOINT_URL": seaweed.endpoint})
    m = mounter(bucket, key[0], mount=False)
    r = box.run("mount", bucket, m.path, "--keyfile", key[0], "--cache-dir", m.cache_dir,
                "--writeback-delay", "0.2")
    assert r.returncode == 0, r.stderr + m.log[-3000:]
    assert_round_trip(m, "f.bin", 70_000)
    m.umount()
    chk = box.run("check", bucket, "--keyfile", key[0])
    assert chk.returncode == 0, chk.stdout + chk.stderr
    line = next(ln for ln in chk.stdout.splitlines() if "transport:" in ln)
    assert "plain http to loopback 127.0.0.1" in line and "from AWS_ENDPOINT_URL" in line, line
    rk = box.run("rekey", bucket, "--keyfile", key[0])
    assert rk.returncode == 0, rk.stdout + rk.stderr
    box.assert_no_escape(min_processes=4)     # mount, its daemon, check, rekey


class ProxyRecorder:
    """A loopback listener standing in for a proxy (or an endpoint): it records every
    connection it gets, with the first line sent on it, and closes it (a request sent
    through it fails, after it was seen)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.connections = 0
        self.lines: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if not self._stop:
                self.connections += 1
                conn.settimeout(5)
                try:
                    self.lines.append(conn.recv(4096).split(b"\r\n")[0].decode("latin-1"))
                except OSError:
                    pass
            conn.close()

    def close(self):
        self._stop = True
        try:
            socket.create_connection(self.sock.getsockname(), timeout=1).close()
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)


@pytest.fixture
def proxy_recorder():
    p = ProxyRecorder()
    yield p
    p.close()


def proxy_env(recorder: ProxyRecorder) -> dict:
    env = {}
    for name, value in (("HTTP_PROXY", recorder.url), ("HTTPS_PROXY", "http://proxy.invalid:3128"),
                        ("ALL_PROXY", "socks5://proxy.invalid:1080")):
        env[name] = env[name.lower()] = value
    return env


@pytest.mark.mount
def test_no_proxy_carries_a_plain_http_request(seaweed, mounter, bucket, key, tmp_path,
                                              proxy_recorder):
    """With every proxy variable set, a mount (and check, rekey) to the loopback http endpoint
    works and no proxy received anything: a plain-http request through a proxy would show it
    the keys."""
    box = Sandbox(tmp_path, seaweed).configure(proxy_env(proxy_recorder))
    m = mounter(bucket, key[0], mount=False)
    r = box.run("mount", bucket, m.path, "--keyfile", key[0], "--cache-dir", m.cache_dir,
                "--endpoint-url", seaweed.endpoint, "--writeback-delay", "0.2")
    assert r.returncode == 0, r.stderr + m.log[-3000:]
    os.listdir(m.path)
    assert_round_trip(m, "p.bin", 100_000)
    m.umount()
    chk = box.run("check", bucket, "--keyfile", key[0], "--endpoint-url", seaweed.endpoint)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    rk = box.run("rekey", bucket, "--keyfile", key[0], "--endpoint-url", seaweed.endpoint)
    assert rk.returncode == 0, rk.stdout + rk.stderr
    assert proxy_recorder.connections == 0, "a proxy received a plain-http request"
    box.assert_no_escape(min_processes=4)


# ---------------------------------------------------------------------------- in process
@pytest.fixture
def guarded(tmp_path, monkeypatch):
    """The process environment of a Sandbox (no endpoint or proxy but the test's), with the
    network guard installed in this process for the test."""
    box = Sandbox(tmp_path)
    for k in list(os.environ):
        if k.upper() in ENDPOINT_VARS + PROXY_VARS:
            monkeypatch.delenv(k)
    for k in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", *CREDS):
        monkeypatch.setenv(k, box.env[k])

    def configure(env: dict | None = None, config: str = ""):
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        box.config_file.write_text(textwrap.dedent(config))
        return box

    # the store pins the proxy variables awscrt reads: every one of them is put back afterwards
    for name in PROXY_VARS:
        for n in (name, name.lower()):
            monkeypatch.setenv(n, "")
            monkeypatch.delenv(n)
    netguard.install(str(box.guard_log))
    yield configure
    netguard.uninstall()
    assert box.violations() == "", box.violations()


def _https(source: str):
    """The same source with https URLs (allowed, so the resolution itself can be compared)."""
    env, config, extra, host, where = SOURCES[source]
    env = {k: v.replace("http://", "https://") for k, v in env.items()}
    return env, config.replace("http://", "https://"), extra, host, where


def _profile(extra: list[str]) -> str | None:
    return extra[1] if extra[:1] == ["--profile"] else None


@pytest.mark.parametrize("source", list(SOURCES))
def test_resolution_agrees_with_botocore(guarded, source):
    env, config, extra, host, where = _https(source)
    guarded(env, config)
    t = resolve_transport(None, profile=_profile(extra))
    # what a plain boto3 client in the same environment would send to
    plain = boto3.session.Session(profile_name=_profile(extra)).client("s3")
    assert t.url == plain.meta.endpoint_url
    assert (t.scheme, t.host, t.port) == ("https", host, 9000)
    assert re.search(where, "from " + t.source), t.source
    assert t.custom and t.proxy is None


class Sent(Exception):
    pass


def _store_sends_to(**kw) -> str:
    """The URL the store's first request goes to (stopped before awscrt gets it)."""
    st = S3Store("some-bucket", KeyRing([Key(os.urandom(32))]), **kw)

    def stop(op, method, path, headers):
        raise Sent(f"{st.transport.scheme}://{headers['host']}{path}")
    st.wire.observers.append(stop)
    try:
        with pytest.raises(Sent) as e:
            st.head("dir/k")
        return str(e.value)
    finally:
        st.close()


def _boto3_sends_to(region: str | None = None) -> str:
    """The URL a plain boto3 client in the same environment sends a HeadObject to, asked for
    AWS's regional endpoints (for us-east-1 it would pick the legacy global one otherwise)."""
    from botocore.config import Config
    client = boto3.session.Session().client(
        "s3", config=Config(region_name=region, s3={"us_east_1_regional_endpoint": "regional"}))

    def stop(request, **_):
        raise Sent(request.url)
    client.meta.events.register_first("before-send.s3.*", stop)
    with pytest.raises(Sent) as e:
        client.head_object(Bucket="some-bucket", Key="dir/k")
    return str(e.value)


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1"])
def test_resolution_without_configured_endpoint_is_aws(guarded, region):
    """AWS's own endpoint for the region, and virtual-hosted requests to it, as boto3
    sends them."""
    guarded()
    t = resolve_transport(None, region=region)
    assert (t.scheme, t.port, t.custom, t.region) == ("https", 443, False, region)
    assert t.host.endswith(".amazonaws.com") and t.source == transport.AWS_DEFAULT
    assert t.addressing == "virtual"
    sent = _store_sends_to(region=region)
    assert sent == _boto3_sends_to(region) == f"https://some-bucket.{t.host}/dir/k"


def test_ignore_configured_endpoint_urls_is_honoured(guarded):
    guarded({"AWS_ENDPOINT_URL": "http://ignored.invalid",
             "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"})
    t = resolve_transport(None)
    assert t.scheme == "https" and not t.custom and t.host.endswith(".amazonaws.com")
    assert _store_sends_to() == _boto3_sends_to() == f"https://some-bucket.{t.host}/dir/k"


def test_endpoint_url_flag_wins_over_configuration(guarded):
    guarded({"AWS_ENDPOINT_URL_S3": "http://env-s3.invalid"})
    t = resolve_transport("http://127.0.0.1:9")
    assert (t.scheme, t.host, t.port, t.url) == ("http", "127.0.0.1", 9, "http://127.0.0.1:9")
    assert "--endpoint-url" in t.source


@pytest.mark.parametrize("source", list(SOURCES))
def test_resolution_refuses_plain_http_from_any_source(guarded, source):
    env, config, extra, host, where = SOURCES[source]
    guarded(env, config)
    with pytest.raises(UserError) as e:
        resolve_transport(None, profile=_profile(extra))
    assert e.value.exit_code == EXIT_SECURITY and host in str(e.value)
    assert re.search(where, str(e.value)), str(e.value)
    with pytest.raises(UserError) as e:
        S3Store("bucket", KeyRing([Key(os.urandom(32))]), profile=_profile(extra))
    assert e.value.exit_code == EXIT_SECURITY


def test_store_sends_to_the_resolved_endpoint(guarded):
    """The endpoint from the environment is where the store's requests go: a loopback
    stand-in receives the HEAD, path-style."""
    endpoint = ProxyRecorder()
    try:
        guarded({"AWS_ENDPOINT_URL_S3": endpoint.url})
        assert _store_sends_to() == f"{endpoint.url}/some-bucket/dir/k"
        st = S3Store("some-bucket", KeyRing([Key(os.urandom(32))]), max_attempts=1)
        try:
            assert st.transport.source == "AWS_ENDPOINT_URL_S3" and st.transport.url == endpoint.url
            with pytest.raises(StoreUnavailable):
                st.head("dir/k")
        finally:
            st.close()
        assert endpoint.lines and endpoint.lines[0] == "HEAD /some-bucket/dir/k HTTP/1.1", \
            endpoint.lines
    finally:
        endpoint.close()


def _attempt(st) -> None:
    """One request of the store, which fails (nothing real answers it)."""
    with pytest.raises(StoreUnavailable):
        st.head("k")


def _attempt_with(endpoint_url: str, proxy: str | None) -> None:
    """One request of a store for endpoint_url, whose transport must have chosen `proxy`."""
    st = S3Store("some-bucket", KeyRing([Key(os.urandom(32))]), endpoint_url=endpoint_url,
                 max_attempts=1)
    try:
        assert st.transport.proxy == proxy
        _attempt(st)
    finally:
        st.close()


def test_loopback_http_bypasses_every_proxy(guarded, proxy_recorder):
    """awscrt takes its proxy from the environment, and would send a plain-http request
    (keys in clear) to an HTTP_PROXY: the store keeps it from doing so."""
    endpoint = ProxyRecorder()
    try:
        guarded({**{k: proxy_recorder.url for k in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY",
                                                    "https_proxy")},
                 "ALL_PROXY": "socks5://proxy.invalid:1080"})
        _attempt_with(endpoint.url, None)
        assert proxy_recorder.connections == 0, proxy_recorder.lines
        assert endpoint.lines == ["HEAD /some-bucket/k HTTP/1.1"]
    finally:
        endpoint.close()


def test_https_endpoint_may_use_a_proxy(guarded, proxy_recorder):
    """Through a proxy, https only as a CONNECT tunnel: the proxy sees the host, not the
    requests."""
    guarded({"HTTPS_PROXY": proxy_recorder.url, "HTTP_PROXY": "http://proxy.invalid:1"})
    _attempt_with("https://s3.example.invalid:9443", proxy_recorder.url)
    assert proxy_recorder.lines and all(
        ln.startswith("CONNECT s3.example.invalid:9443 ") for ln in proxy_recorder.lines), \
        proxy_recorder.lines


def test_no_proxy_is_honoured_for_https(guarded, proxy_recorder):
    endpoint = ProxyRecorder()
    try:
        guarded({"HTTPS_PROXY": proxy_recorder.url, "NO_PROXY": "localhost"})
        _attempt_with(f"https://localhost:{endpoint.port}", None)
        assert proxy_recorder.connections == 0, proxy_recorder.lines
        assert endpoint.connections >= 1           # directly (a TLS hello, then closed)
    finally:
        endpoint.close()


def test_check_reports_the_resolved_transport(guarded):
    from ssecfs.commands.check import FAIL, OK, WARN, check_transport
    guarded({"AWS_ENDPOINT_URL_S3": "https://minio.example.invalid:9000",
             "HTTPS_PROXY": "http://proxyuser:s3cr3tpass@127.0.0.1:3128"})
    status, msg = check_transport(resolve_transport(None))
    assert status == OK and "https to minio.example.invalid" in msg, msg
    assert "from AWS_ENDPOINT_URL_S3" in msg and "127.0.0.1:3128" in msg, msg
    assert "s3cr3tpass" not in msg and "proxyuser" not in msg, msg
    status, msg = check_transport(resolve_transport("http://127.0.0.1:9"))
    assert status == WARN and "loopback 127.0.0.1" in msg and "--endpoint-url" in msg, msg
    assert FAIL != status


def test_the_guard_catches_a_non_loopback_connection(tmp_path):
    """The guard itself works in a subprocess (else every test above would prove nothing)."""
    box = Sandbox(tmp_path)
    code = textwrap.dedent("""
        import socket
        for attempt in (lambda: socket.socket().connect(("192.0.2.1", 9)),
                        lambda: socket.create_connection(("example.invalid", 80), timeout=1)):
            try:
                attempt()
            except OSError as e:
                print(type(e).__name__)
    """)
    p = subprocess.run([sys.executable, "-c", code], env=box.env, capture_output=True,
                       text=True, timeout=30)
    assert p.stdout.split() == ["OSError", "gaierror"], p.stdout + p.stderr
    v = box.violations()
    assert "'192.0.2.1'" in v and "'example.invalid'" in v, v
    assert len(box.guarded_pids()) == 1
