"""What a store really sends and receives: a recording reverse proxy (tests/proxy.py) in front
of the S3 endpoint, with answers that can be rewritten (to play a server that does not echo
SSE-C, or serves what it should not). It sees every request on the wire, including the ones
awscrt makes on its own (part GETs, retries), which no in-process hook would."""

from __future__ import annotations

import http.client
import threading

from proxy import HOP_BY_HOP, Match, S3Proxy, _Handler


class Rewrite:
    def __init__(self, fn, match: Match, times: int | None):
        self.fn = fn                 # fn(req, status, headers: list[(name, value)], body) -> same
        self.match = match
        self.left = times

    def take(self, r) -> bool:
        if not self.match(r) or self.left == 0:
            return False
        if self.left is not None:
            self.left -= 1
        return True


class _TamperHandler(_Handler):
    def _relay(self, r, resp: http.client.HTTPResponse) -> None:
        rule = self.proxy._rewrite_for(r)
        if rule is None:
            return super()._relay(r, resp)
        body = resp.read()
        status, headers, body = rule.fn(r, resp.status, resp.getheaders(), body)
        r.status = status
        try:
            self.send_response_only(status)
            for name, value in headers:
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if r.method != "HEAD":
                self.wfile.write(body)
            r.outcome = "rewritten"
        except OSError:
            r.outcome = "client-gone"
            self._close_upstream()
            self._abort()


class TamperProxy(S3Proxy):
    def __init__(self, upstream: str, **kw):
        super().__init__(upstream, **kw)
        self._rewrites: list[Rewrite] = []
        self._rw_lock = threading.Lock()
        self._handler = type("Handler", (_TamperHandler,), {"proxy": self})

    def rewrite(self, fn, times: int | None = None, **match) -> Rewrite:
        rule = Rewrite(fn, Match(**match), times)
        with self._rw_lock:
            self._rewrites.append(rule)
        return rule

    def strip(self, header: str, times: int | None = None, **match) -> Rewrite:
        """Answers matching lose every header of that name."""
        return self.rewrite(lambda r, st, hs, body: (
            st, [(n, v) for n, v in hs if n.lower() != header.lower()], body), times, **match)

    def _rewrite_for(self, r) -> Rewrite | None:
        with self._rw_lock:
            return next((x for x in self._rewrites if x.take(r)), None)


class Wire:
    """The requests a proxy saw: (S3 operation, lower-case request headers), in order."""

    def __init__(self, proxy: TamperProxy):
        self.proxy = proxy

    @property
    def reqs(self) -> list[tuple[str, dict]]:
        return [(r.op, r.headers) for r in self.proxy.requests()]

    def ops(self) -> list[str]:
        return [op for op, _ in self.reqs]

    def of(self, op: str) -> list[dict]:
        return [h for o, h in self.reqs if o == op]

    def clear(self) -> None:
        self.proxy.reset_counts()
