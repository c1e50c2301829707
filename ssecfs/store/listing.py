"""Listings: pages of ListObjectsV2 as the contract's ListPage. A listing needs no key: it is
how an object no key of the ring opens is still seen."""

from __future__ import annotations

from typing import Iterator

from . import s3xml
from ..errors import StoreError
from .contract import LIST_PAGE_MAX, ListedObject, ListPage
from .s3requests import Requests


class Listing:
    def __init__(self, requests: Requests):
        self.requests = requests

    def pages(self, prefix: str, delimiter: str | None = "/", max_keys: int = LIST_PAGE_MAX,
              start_after: str | None = None) -> Iterator[ListPage]:
        """Pages of ListObjectsV2 (keys after start_after only, if given); max_keys under
        LIST_PAGE_MAX: that one page only."""
        q = {"list-type": "2", "prefix": prefix, "max-keys": str(max_keys),
             "encoding-type": "url"}
        if delimiter:
            q["delimiter"] = delimiter
        if start_after:
            q["start-after"] = start_after
        while True:
            a = self.requests.send("ListObjectsV2", "GET", None, query=q)
            try:
                resp = s3xml.parse_list_v2(a.body)
            except ValueError:
                raise StoreError(f"ListObjectsV2 {prefix!r}: the answer is not a listing") from None
            objs = [ListedObject(key=o["Key"], size=o["Size"], etag=o["ETag"].strip('"'),
                                 mtime=o["LastModified"].timestamp() if o["LastModified"] else 0.0)
                    for o in resp["Contents"]]
            yield ListPage(objs, [p["Prefix"] for p in resp["CommonPrefixes"]])
            token = resp["NextContinuationToken"]
            if max_keys < LIST_PAGE_MAX or not resp["IsTruncated"] or not token:
                return
            q["continuation-token"] = token

    def one(self, key: str) -> ListedObject | None:
        """The listing of exactly this key, if it exists."""
        for page in self.pages(key, delimiter=None, max_keys=1):
            for o in page.objects:
                if o.key == key:
                    return o
            return None
        return None
