"""Interoperability with the aws-cli SSE-C flow users already rely on (see the seed script in
/work/shared/seed-sse-c.txt): the same raw 32-byte key file (``openssl rand -out sse.key 32``)
works for `aws s3api put-object/get-object --sse-customer-*` and for the mount, both ways.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import sse, wait_until

pytestmark = pytest.mark.mount

MiB = 1024 * 1024

# The seed's commands, verbatim but for the variables (bash, base64, openssl, aws).
_SEED_KEY = r'''
set -euo pipefail
SSE_KEY=$(base64 < "$KEYFILE" | tr -d '\n')
SSE_KEY_MD5=$(openssl md5 -binary "$KEYFILE" | base64 | tr -d '\n')
'''
_SEED_SSE = r'''  --sse-customer-algorithm AES256 \
  --sse-customer-key "$SSE_KEY" \
  --sse-customer-key-md5 "$SSE_KEY_MD5"
'''

SEED_PUT = _SEED_KEY + r'''"$AWS" --region "$REGION" --endpoint-url "$ENDPOINT" s3api put-object \
  --bucket "$BUCKET" \
  --key "$OBJECT" \
  --body "$BODY" \
''' + _SEED_SSE

SEED_GET = _SEED_KEY + r'''"$AWS" --region "$REGION" --endpoint-url "$ENDPOINT" s3api get-object \
  --bucket "$BUCKET" \
  --key "$OBJECT" \
  "$OUT" \
''' + _SEED_SSE


def aws_binary() -> str:
    found = shutil.which("aws", path=os.path.dirname(sys.executable)) or shutil.which("aws")
    if not found:
        pytest.skip("aws cli not installed")
    return found


@pytest.fixture
def seed_key(tmp_path):
    """A key file made the way the seed makes it: `openssl rand -out sse.key 32`, then 0600
    (openssl creates it with the umask's mode; ssecfs rightly wants 0600)."""
    path = tmp_path / "seed" / "sse.key"
    path.parent.mkdir()
    if shutil.which("openssl"):
        subprocess.run(["openssl", "rand", "-out", str(path), "32"], check=True)
    else:
        path.write_bytes(os.urandom(32))
    os.chmod(path, 0o600)
    raw = path.read_bytes()
    assert len(raw) == 32
    return str(path), raw


def seed_env(seaweed, bucket, keyfile, **extra) -> dict:
    if not shutil.which("openssl"):
        pytest.skip("openssl needed to run the seed's commands")
    return {**os.environ, **seaweed.env(), "AWS": aws_binary(), "REGION": "us-east-1",
            "ENDPOINT": seaweed.endpoint, "BUCKET": bucket, "KEYFILE": keyfile,
            **{k: str(v) for k, v in extra.items()}}


def bash(script: str, env: dict, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                       timeout=120)
    if check:
        assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def aws(env: dict, *args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([env["AWS"], "--region", "us-east-1", "--endpoint-url", env["ENDPOINT"],
                        *[str(a) for a in args]], env=env, capture_output=True, text=True,
                       timeout=300)
    if check:
        assert r.returncode == 0, f"aws {args}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * MiB), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- aws -> mount
def test_awscli_put_object_is_readable_through_the_mount(mounter, bucket, seaweed, s3,
                                                         seed_key, tmp_path):
    keyfile, raw = seed_key
    hello = tmp_path / "hello.txt"
    hello.write_bytes(b"Hello SSE-C 2024-01-02T03:04:05Z\n")
    env = seed_env(seaweed, bucket, keyfile, OBJECT="sse-c-demo.txt", BODY=hello)
    bash(SEED_PUT, env)                                       # before the mount

    m = mounter(bucket, keyfile)                              # the same key file
    binary = tmp_path / "bin.dat"
    binary.write_bytes(os.urandom(300_000) + b"\0\xff" * 1000)
    bash(SEED_PUT, {**env, "OBJECT": "docs/nested/bin.dat", "BODY": str(binary)})  # while mounted

    assert sorted(os.listdir(m.path)) == ["docs", "sse-c-demo.txt"]
    with open(os.path.join(m.path, "sse-c-demo.txt"), "rb") as f:
        assert f.read() == hello.read_bytes()
    assert os.path.getsize(os.path.join(m.path, "docs/nested/bin.dat")) == binary.stat().st_size
    with open(os.path.join(m.path, "docs/nested/bin.dat"), "rb") as f:
        assert f.read() == binary.read_bytes()
    # aws-cli objects carry no s3fs metadata: they show as regular files
    st = os.stat(os.path.join(m.path, "sse-c-demo.txt"))
    assert st.st_mode & 0o170000 == 0o100000

    # and the seed's download still gives the same bytes (the mount changed nothing)
    out = tmp_path / "downloaded.txt"
    bash(SEED_GET, {**env, "OUT": str(out)})
    assert out.read_bytes() == hello.read_bytes()


# ---------------------------------------------------------------------------- mount -> aws
def test_file_written_through_mount_is_readable_with_awscli(mounter, bucket, seaweed, s3,
                                                            seed_key, tmp_path):
    keyfile, raw = seed_key
    m = mounter(bucket, keyfile)
    data = b"written through ssecfs\n" + os.urandom(200_000)
    os.makedirs(os.path.join(m.path, "out dir"))
    with open(os.path.join(m.path, "out dir/report 1.bin"), "wb") as f:
        f.write(data)

    def uploaded():
        return s3.get_object(Bucket=bucket, Key="out dir/report 1.bin",
                             **sse(raw))["Body"].read() == data
    wait_until(uploaded, 60, interval=0.1, what="upload of the file written through the mount")

    env = seed_env(seaweed, bucket, keyfile, OBJECT="out dir/report 1.bin")
    got = tmp_path / "got.bin"
    bash(SEED_GET, {**env, "OUT": str(got)})
    assert got.read_bytes() == data

    # without the key the aws cli gets nothing
    r = aws(env, "s3api", "get-object", "--bucket", bucket, "--key", "out dir/report 1.bin",
            tmp_path / "nokey.bin", check=False)
    assert r.returncode != 0
    assert not (tmp_path / "nokey.bin").exists() or \
        (tmp_path / "nokey.bin").read_bytes() != data

    # head-object with the key shows the s3fs-style metadata the mount wrote
    sse_key = base64.b64encode(raw).decode()
    r = aws(env, "s3api", "head-object", "--bucket", bucket, "--key", "out dir/report 1.bin",
            "--sse-customer-algorithm", "AES256", "--sse-customer-key", sse_key,
            "--sse-customer-key-md5", sse(raw)["SSECustomerKeyMD5"])
    head = json.loads(r.stdout)
    assert head["SSECustomerAlgorithm"] == "AES256"
    assert {"mode", "uid", "gid", "mtime"} <= set(head["Metadata"]), head["Metadata"]


# ---------------------------------------------------------------------------- multipart, both ways
def test_awscli_s3_cp_multipart_both_ways(mounter, bucket, seaweed, seed_key, tmp_path):
    """`aws s3 cp --sse-c AES256 --sse-c-key fileb://sse.key` (multipart above 8 MiB) and the
    mount (multipart above 16 MiB) read each other's large objects."""
    keyfile, raw = seed_key
    env = seed_env(seaweed, bucket, keyfile)
    big = tmp_path / "big-in.bin"
    big.write_bytes(os.urandom(20 * MiB + 12345))
    aws(env, "s3", "cp", big, f"s3://{bucket}/from-aws.bin", "--sse-c", "AES256",
        "--sse-c-key", f"fileb://{keyfile}")

    m = mounter(bucket, keyfile)
    assert sha256_file(os.path.join(m.path, "from-aws.bin")) == sha256_file(big)

    data = os.urandom(24 * MiB + 777)
    with open(os.path.join(m.path, "from-mount.bin"), "wb") as f:
        f.write(data)
    m.umount()                       # waits until the upload is done
    got = tmp_path / "from-mount.bin"
    aws(env, "s3", "cp", f"s3://{bucket}/from-mount.bin", got, "--sse-c", "AES256",
        "--sse-c-key", f"fileb://{keyfile}")
    assert got.read_bytes() == data
