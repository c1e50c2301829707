"""--ca-bundle against a TLS endpoint whose certificate comes from a private CA made here
(SeaweedFS serving S3 over https), and refusal of plain http to anything but loopback."""

import datetime
import ipaddress
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import Mount
from helpers import run_ssecfs, sse, wait_until
from seaweed import SeaweedFS

pytestmark = pytest.mark.mount


def make_ca_and_cert(d, dns=("localhost",), ips=("127.0.0.1",)):
    """A private CA (ca.pem) and a server certificate it signed (cert.pem, key.pem) for
    these names and addresses."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ssecfs test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in dns] +
                [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {n: os.path.join(d, n) for n in ("ca.pem", "cert.pem", "key.pem")}
    with open(paths["ca.pem"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert.pem"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["key.pem"], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def tls_seaweed(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tls"))
    pki = make_ca_and_cert(d)
    sw = SeaweedFS(os.path.join(d, "data"), https=(pki["cert.pem"], pki["key.pem"])).start()
    os.environ.update(sw.env())
    yield sw, pki["ca.pem"]
    sw.stop()


def test_ca_bundle_mount_over_tls(tls_seaweed, tmp_path, key):
    sw, ca = tls_seaweed
    sw.create_bucket("tls-bucket")
    keyfile, raw = key
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = Mount(mp, tmp_path / "cache", "tls-bucket", keyfile, sw.https_endpoint,
              ["--writeback-delay", "0.2", "--ca-bundle", ca])
    try:
        # without the CA the certificate is refused, with one clear line
        bad = run_ssecfs("mount", "tls-bucket", str(mp), "--keyfile", keyfile,
                         "--endpoint-url", sw.https_endpoint, "--cache-dir", str(tmp_path / "c0"))
        assert bad.returncode == 4 and "TLS" in bad.stderr and len(bad.stderr.splitlines()) == 1
        m.mount()
        with open(os.path.join(m.path, "over-tls.txt"), "wb") as f:
            f.write(b"sent over https\n")
        s3 = sw.client(endpoint=sw.https_endpoint, verify=ca)
        wait_until(lambda: s3.get_object(Bucket="tls-bucket", Key="over-tls.txt",
                                         **sse(raw))["Body"].read() == b"sent over https\n",
                   30, what="object uploaded over TLS")
        m.umount()
    finally:
        m.cleanup()
    chk = run_ssecfs("check", "tls-bucket", "--keyfile", keyfile, "--endpoint-url",
                     sw.https_endpoint, "--ca-bundle", ca)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    assert "transport: https" in chk.stdout


def test_plain_http_to_remote_host_refused(tmp_path, key):
    keyfile, _ = key
    mp = tmp_path / "m"
    mp.mkdir()
    r = run_ssecfs("mount", "some-bucket", str(mp), "--keyfile", keyfile,
                   "--endpoint-url", "http://192.0.2.10:9000", timeout=30)
    assert r.returncode == 5 and "https" in r.stderr
    r = run_ssecfs("check", "some-bucket", "--keyfile", keyfile,
                   "--endpoint-url", "http://192.0.2.10:9000", timeout=30)
    assert r.returncode != 0
