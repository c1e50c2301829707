"""Basic end-to-end: a file written through the mount is an SSE-C object in the bucket."""

import os

import pytest

from helpers import assert_sse_c_only, marker_blob, scan_dir_for, sse, wait_until

pytestmark = pytest.mark.mount


def durable(s3, bucket, key, raw, data):
    def check():
        return s3.get_object(Bucket=bucket, Key=key, **sse(raw))["Body"].read() == data
    wait_until(check, 30, what=f"{key} durable in the bucket")


def test_write_is_sse_c_object(mnt, s3, seaweed):
    m, bucket, raw = mnt
    marker, data = marker_blob()
    with open(os.path.join(m.path, "secret.bin"), "wb") as f:
        f.write(data)
    durable(s3, bucket, "secret.bin", raw, data)
    assert_sse_c_only(s3, bucket, "secret.bin")
    assert scan_dir_for(seaweed.data_dir, marker) == []
    assert scan_dir_for(m.cache_dir, marker) == []
    with open(os.path.join(m.path, "secret.bin"), "rb") as f:
        assert f.read() == data
