"""The "raw boto3" column: the workloads of raw_workloads done with boto3's S3 client
(upload_fileobj / download_fileobj with a TransferConfig of 8 MiB parts on 10 threads)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from .common import MiB, copy_source_sse
from .raw_workloads import RawWorkloads

TRANSFER = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB,
                          max_concurrency=10, use_threads=True)
CONCURRENCY = 10        # CopyObjects in flight in mv_dir


class Boto3Raw(RawWorkloads):
    column = "raw boto3"

    def __init__(self, bench):
        super().__init__(bench)
        self.s3 = bench.sw.client(
            Config(retries={"mode": "standard", "max_attempts": 5}, max_pool_connections=32),
            endpoint=bench.endpoint, verify=bench.cert if bench.args.tls else None)
        self.sse = bench.sse
        self.copy_sse = copy_source_sse(bench.raw_key)

    def upload(self, key, fileobj, size):
        self.s3.upload_fileobj(fileobj, self.bucket, key, ExtraArgs=dict(self.sse),
                               Config=TRANSFER)

    def download(self, key, sink):
        self.s3.download_fileobj(self.bucket, key, sink, ExtraArgs=dict(self.sse),
                                 Config=TRANSFER)

    def put(self, key, data):
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, **self.sse)

    def get(self, key):
        return self.s3.get_object(Bucket=self.bucket, Key=key, **self.sse)["Body"].read()

    def keys(self, prefix):
        out = []
        kw = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            r = self.s3.list_objects_v2(**kw)
            out += [o["Key"] for o in r.get("Contents", [])]
            if not r.get("IsTruncated"):
                return out
            kw["ContinuationToken"] = r["NextContinuationToken"]

    def delete_keys(self, keys):
        for i in range(0, len(keys), 1000):
            self.s3.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})

    def copy_all(self, pairs):
        def cp(pair):
            self.s3.copy_object(Bucket=self.bucket, Key=pair[1],
                                CopySource={"Bucket": self.bucket, "Key": pair[0]},
                                MetadataDirective="COPY", **self.sse, **self.copy_sse)
        if len(pairs) == 1:
            cp(pairs[0])
            return
        with ThreadPoolExecutor(CONCURRENCY) as ex:
            list(ex.map(cp, pairs))

    def delete(self, key):
        self.s3.delete_object(Bucket=self.bucket, Key=key)

    def cleanup(self):
        self.s3.close()
