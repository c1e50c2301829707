"""The XML bodies of the S3 operations the store uses: what it sends (CompleteMultipartUpload,
DeleteObjects) and what it reads (errors, listings, copy results, upload ids, bucket
encryption). Answers in the shape of boto3's (the fields the store reads)."""

from __future__ import annotations

import datetime
import urllib.parse
from xml.etree import ElementTree
from xml.sax.saxutils import escape

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def _root(body: bytes):
    """(root element, namespace prefix), or (None, "") when the body is no XML."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None, ""
    return root, _NS if root.tag.startswith(_NS) else ""


def _text(el, name: str, default: str = "") -> str:
    v = el.find(name)
    return v.text if v is not None and v.text is not None else default


def error_code(body: bytes | None) -> tuple[str, str]:
    """(Code, Message) of an S3 <Error> body; ("", "") for anything else."""
    if not body:
        return "", ""
    root, ns = _root(body)
    if root is None or root.tag != ns + "Error":
        return "", ""
    return _text(root, ns + "Code"), _text(root, ns + "Message")


def parse_list_v2(body: bytes) -> dict:
    """A ListObjectsV2 answer. Keys are URL-decoded when the server says it encoded them
    (encoding-type=url), like botocore."""
    root, ns = _root(body)
    if root is None:
        raise ValueError("ListObjectsV2: the answer is not XML")
    decode = urllib.parse.unquote_plus if _text(root, ns + "EncodingType") == "url" else (lambda v: v)
    contents = []
    for c in root.iter(ns + "Contents"):
        lm = _text(c, ns + "LastModified")
        contents.append({"Key": decode(_text(c, ns + "Key")), "Size": int(_text(c, ns + "Size", "0")),
                         "ETag": _text(c, ns + "ETag"),
                         "LastModified": datetime.datetime.fromisoformat(lm) if lm else None})
    prefixes = [{"Prefix": decode(_text(p, ns + "Prefix"))} for p in root.iter(ns + "CommonPrefixes")]
    return {"Contents": contents, "CommonPrefixes": prefixes,
            "IsTruncated": _text(root, ns + "IsTruncated").lower() == "true",
            "NextContinuationToken": _text(root, ns + "NextContinuationToken") or None}


def parse_copy_result(body: bytes, tag: str = "CopyObjectResult") -> dict | None:
    """A CopyObject (or, tag CopyPartResult, UploadPartCopy) answer's {"ETag", ...}, or None
    when the body is anything else."""
    root, ns = _root(body)
    if root is None or root.tag != ns + tag:
        return None
    etag = _text(root, ns + "ETag")
    return {"ETag": etag} if etag else None


def upload_id(body: bytes) -> str | None:
    """The UploadId of a CreateMultipartUpload answer."""
    root, ns = _root(body)
    return (_text(root, ns + "UploadId") or None) if root is not None else None


def complete_body(parts: list[tuple[int, str]]) -> bytes:
    items = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{escape(e)}</ETag></Part>"
                    for n, e in parts)
    return f'<CompleteMultipartUpload xmlns="{_NS[1:-1]}">{items}</CompleteMultipartUpload>'.encode()


def delete_body(keys: list[str]) -> bytes:
    items = "".join(f"<Object><Key>{escape(k)}</Key></Object>" for k in keys)
    return f'<Delete xmlns="{_NS[1:-1]}"><Quiet>true</Quiet>{items}</Delete>'.encode()


def delete_errors(body: bytes) -> list[dict]:
    """The <Error> entries of a DeleteObjects answer ({"Key", "Code"})."""
    root, ns = _root(body)
    if root is None:
        return []
    return [{"Key": _text(e, ns + "Key"), "Code": _text(e, ns + "Code")}
            for e in root.iter(ns + "Error")]


def blocks_ssec(body: bytes) -> bool:
    """Whether a GetBucketEncryption answer lists SSE-C among the blocked encryption types."""
    root, ns = _root(body)
    if root is None:
        return False
    return any((t.text or "").strip() == "SSE-C"
               for b in root.iter(ns + "BlockedEncryptionTypes")
               for t in b.iter(ns + "EncryptionType"))
