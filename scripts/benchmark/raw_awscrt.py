"""The "raw awscrt" column: the workloads of raw_workloads done with the AWS Common
Runtime's S3 client (awscrt.s3.S3Client) directly, the fastest client there is: signing,
connections, retries and the splitting of big transfers in native code.

As raw boto3: 8 MiB parts, 10 connections, the SeaweedFS credentials (seaweed.crt_client),
the SSE-C headers on every request about an object's content (PUT, GET, both sides of a
CopyObject; S3 takes none on listings and deletes). Bodies go through a body stream and
on_body, never recv_filepath/send_filepath (those would read or write plaintext files).
  upload     PUT_OBJECT, a body stream on the source file (multipart in 8 MiB parts)
  download   GET_OBJECT, parallel ranged GETs of 8 MiB, each chunk checked in on_body
  put / get  PUT_OBJECT of 4 KiB (one request) / DEFAULT "GetObject" (one request)
  keys       DEFAULT "ListObjectsV2", the XML answer parsed here
  delete_keys  DEFAULT "DeleteObjects" (an XML body with its Content-MD5)
  copy_all   DEFAULT "CopyObject", 10 in flight (asynchronous requests, no threads)
  delete     DEFAULT "DeleteObject"
"""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import urllib.parse
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

from awscrt.exceptions import AwsCrtError
from awscrt.http import HttpHeaders, HttpRequest
from awscrt.s3 import S3RequestType, S3ResponseError
from seaweed import crt_client

from .common import MiB, BenchError, echoed
from .raw_workloads import RawWorkloads

PART = 8 * MiB
CONNECTIONS = 10
NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
SSE = "x-amz-server-side-encryption-customer-"
COPY_SSE = "x-amz-copy-source-server-side-encryption-customer-"


def quote(s: str, safe: str = "") -> str:
    return urllib.parse.quote(s, safe=safe + "-_.~")


class Call:
    """One request in flight; result() waits for it: (status, headers, body) or BenchError."""

    def __init__(self, what: str, on_finish=None, sink=None):
        self.what = what
        self.on_finish = on_finish
        self.sink = sink                 # fn(chunk, offset), else the body is kept here
        self.chunks: list[bytes] = []
        self.status = 0
        self.headers: dict[str, str] = {}
        self.error = None
        self.done = threading.Event()
        self.req = None                  # the S3Request: alive until the answer is in

    def on_headers(self, status_code, headers, **_):
        self.status = status_code
        self.headers = {k.lower(): v for k, v in headers}

    def on_body(self, chunk, offset, **_):
        if self.sink is not None:
            self.sink(chunk, offset)
        else:
            self.chunks.append(bytes(chunk))

    def on_done(self, error=None, **_):
        self.error = error
        self.done.set()
        if self.on_finish is not None:
            self.on_finish()

    def result(self) -> tuple[int, dict, bytes]:
        self.done.wait()
        e = self.error
        if isinstance(e, S3ResponseError):
            body = (e.body or b"")[:300].decode(errors="replace")
            raise BenchError(f"awscrt {self.what}: HTTP {e.status_code} {body}")
        if isinstance(e, AwsCrtError):
            raise BenchError(f"awscrt {self.what}: {e.name} {e.message}")
        if e is not None:
            raise BenchError(f"awscrt {self.what}: {type(e).__name__}: {e}")
        return self.status, self.headers, b"".join(self.chunks)


class CrtRaw(RawWorkloads):
    column = "raw awscrt"

    def __init__(self, bench):
        super().__init__(bench)
        self.host = urllib.parse.urlsplit(bench.endpoint).netloc
        self.s3 = crt_client(bench.endpoint, ca_file=bench.cert if bench.args.tls else None,
                             part_size=PART, multipart_upload_threshold=PART,
                             max_active_connections_override=CONNECTIONS)
        sse = bench.sse
        self.md5 = sse["SSECustomerKeyMD5"]
        values = [("algorithm", sse["SSECustomerAlgorithm"]), ("key", sse["SSECustomerKey"]),
                  ("key-MD5", self.md5)]
        self.sse = [(SSE + k, v) for k, v in values]
        self.copy_sse = [(COPY_SSE + k, v) for k, v in values]

    def start(self, op: str, method: str, path: str, headers=(), body: bytes | None = None,
              kind=S3RequestType.DEFAULT, stream=None, size: int | None = None,
              sink=None, on_finish=None) -> Call:
        """Send a request for bucket-relative `path` ("/key?query", or "?query")."""
        full = f"/{self.bucket}{path}"
        if body is not None:
            stream, size = io.BytesIO(body), len(body)
        h = [("host", self.host), ("content-length", str(size or 0)), *headers]
        call = Call(f"{op} {full}", on_finish, sink)
        call.req = self.s3.make_request(
            type=kind, operation_name=op if kind == S3RequestType.DEFAULT else None,
            request=HttpRequest(method, full, HttpHeaders(h), stream),
            on_headers=call.on_headers, on_body=call.on_body, on_done=call.on_done)
        return call

    def check_echo(self, headers: dict, what: str) -> None:
        if echoed(headers.get(SSE + "key-md5")) != {self.md5}:
            raise BenchError(f"awscrt {what}: the answer does not echo our SSE-C key MD5")

    def upload(self, key, fileobj, size):
        self.start("PutObject", "PUT", "/" + quote(key, "/"), self.sse,
                   kind=S3RequestType.PUT_OBJECT, stream=fileobj, size=size).result()

    def download(self, key, sink):
        call = self.start("GetObject", "GET", "/" + quote(key, "/"), self.sse,
                          kind=S3RequestType.GET_OBJECT, sink=sink.at)
        _, headers, _ = call.result()
        self.check_echo(headers, call.what)

    def put(self, key, data):
        self.start("PutObject", "PUT", "/" + quote(key, "/"), self.sse, body=data,
                   kind=S3RequestType.PUT_OBJECT).result()

    def get(self, key):
        call = self.start("GetObject", "GET", "/" + quote(key, "/"), self.sse)
        _, headers, body = call.result()
        self.check_echo(headers, call.what)
        return body

    def keys(self, prefix):
        out, token = [], None
        while True:
            q = f"?list-type=2&prefix={quote(prefix)}"
            if token:
                q += f"&continuation-token={quote(token)}"
            _, _, body = self.start("ListObjectsV2", "GET", q).result()
            root = ET.fromstring(body)
            out += [k.text for k in root.iter(NS + "Key")]
            if root.findtext(NS + "IsTruncated") != "true":
                return out
            token = root.findtext(NS + "NextContinuationToken")

    def delete_keys(self, keys):
        for i in range(0, len(keys), 1000):
            body = ("<Delete><Quiet>true</Quiet>" + "".join(
                f"<Object><Key>{escape(k)}</Key></Object>" for k in keys[i:i + 1000])
                + "</Delete>").encode()
            md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
            _, _, answer = self.start("DeleteObjects", "POST", "?delete",
                                      [("content-md5", md5)], body=body).result()
            if b"<Error>" in answer:
                raise BenchError(f"awscrt DeleteObjects: {answer[:300]!r}")

    def copy_all(self, pairs):
        slots = threading.Semaphore(CONNECTIONS)
        calls = []
        for src, dst in pairs:
            slots.acquire()
            headers = [("x-amz-copy-source", quote(f"/{self.bucket}/{src}", "/")),
                       ("x-amz-metadata-directive", "COPY"), *self.sse, *self.copy_sse]
            calls.append(self.start("CopyObject", "PUT", "/" + quote(dst, "/"), headers,
                                    on_finish=slots.release))
        for c in calls:
            c.result()

    def delete(self, key):
        self.start("DeleteObject", "DELETE", "/" + quote(key, "/")).result()

    def cleanup(self):
        self.s3 = None
