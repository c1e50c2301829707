"""The lean HTTP/1.1 client (ssecfs.http1) against a scripted socket server: keep-alive
reuse, the framings an S3 server may use, a server that closes idle connections, and answers
it must refuse rather than misread. Its use against SeaweedFS is covered by test_s3store."""

from __future__ import annotations

import mmap
import os
import socket
import threading
import time

import pytest

from ssecfs import http1
from ssecfs.http1 import SEG, BufferPool, HTTP1Pool, Segments


class Scripted:
    """A TCP server; each accepted connection runs `handler(conn, index)`."""

    def __init__(self, handler):
        self.handler = handler
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.requests: list[bytes] = []
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            i = self.accepted
            self.accepted += 1
            threading.Thread(target=self._run, args=(conn, i), daemon=True).start()

    def _run(self, conn, i):
        with conn:
            try:
                self.handler(self, conn, i)
            except OSError:
                pass

    def read_request(self, conn, buf=b""):
        """One request (head + Content-Length body); returns (request bytes, leftover)."""
        while b"\r\n\r\n" not in buf:
            d = conn.recv(65536)
            if not d:
                return None, b""
            buf += d
        head, _, rest = buf.partition(b"\r\n\r\n")
        n = 0
        for ln in head.split(b"\r\n")[1:]:
            k, _, v = ln.partition(b":")
            if k.strip().lower() == b"content-length":
                n = int(v)
        while len(rest) < n:
            rest += conn.recv(65536)
        self.requests.append(head + b"\r\n\r\n" + rest[:n])
        return head, rest[n:]

    def pool(self, **kw):
        return HTTP1Pool("http", "127.0.0.1", self.port, ca_certs=None,
                         connect_timeout=5, read_timeout=kw.pop("read_timeout", 5), **kw)

    def close(self):
        self.sock.close()


@pytest.fixture
def server():
    made = []

    def make(handler):
        s = Scripted(handler)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def answer_each(answer):
    """A handler that answers every request on a kept-alive connection with
    answer(request head, connection index) (the raw answer bytes)."""
    def handler(srv, conn, i):
        buf = b""
        while True:
            head, buf = srv.read_request(conn, buf)
            if head is None:
                return
            conn.sendall(answer(head, i))
    return handler


def _echo(head, i):
    """Its own method and path as the body."""
    body = head.split(b"\r\n")[0] + b" conn=%d" % i
    return (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nETag: \"e\"\r\n"
            b"X-Amz-Meta-Mode: 33188\r\nX-Amz-Meta-Mode: again\r\n\r\n" % len(body) + body)


keepalive_echo = answer_each(_echo)


def test_keep_alive_reuses_one_connection_and_reads_headers(server):
    srv = server(keepalive_echo)
    p = srv.pool()
    for n in range(50):
        a = p.request("GET", f"/b/k{n}", {"host": "x"})
        assert a.status == 200
        assert a.body == f"GET /b/k{n} HTTP/1.1 conn=0".encode()
        assert a.headers["etag"] == '"e"'
        assert a.headers["x-amz-meta-mode"] == "33188, again"    # repeated: joined
    assert srv.accepted == 1
    p.close()


def test_body_is_sent_with_its_length_small_and_large(server):
    srv = server(keepalive_echo)
    p = srv.pool()
    for size in (0, 10, 64 * 1024 + 1, 3 * 1024 * 1024):
        data = os.urandom(size)
        assert p.request("PUT", "/b/k", {"host": "x"}, data).status == 200
        assert srv.requests[-1].endswith(b"\r\n\r\n" + data)
        assert b"content-length: %d\r\n" % size in srv.requests[-1]
    assert srv.accepted == 1


def test_large_body_chunked_and_to_eof(server):
    big = os.urandom(5 * 1024 * 1024 + 7)

    def handler(srv, conn, i):
        buf = b""
        head, buf = srv.read_request(conn, buf)
        # Content-Length, sent in pieces
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big))
        for j in range(0, len(big), 1_000_003):
            conn.sendall(big[j:j + 1_000_003])
        head, buf = srv.read_request(conn, buf)
        # chunked, with an extension and a trailer; a 100 Continue first
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
        head, buf = srv.read_request(conn, buf)
        # no length: to EOF, and the connection is not reused
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n" + big[:12345])
        conn.shutdown(socket.SHUT_WR)

    srv = server(handler)
    p = srv.pool()
    assert p.request("GET", "/b/big", {}).body == big
    assert p.request("GET", "/b/chunked", {}).body == b"hello world"
    assert p.request("GET", "/b/eof", {}).body == big[:12345]
    assert p._idle == []


def test_head_and_204_have_no_body_even_with_a_length(server):
    def handler(srv, conn, i):
        buf = b""
        head, buf = srv.read_request(conn, buf)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n")
        head, buf = srv.read_request(conn, buf)
        conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        head, buf = srv.read_request(conn, buf)
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nnah")

    srv = server(handler)
    p = srv.pool()
    a = p.request("HEAD", "/b/k", {})
    assert (a.status, a.body, a.headers["content-length"]) == (200, b"", "4096")
    assert (p.request("DELETE", "/b/k", {}).status) == 204
    a = p.request("GET", "/b/k", {})
    assert (a.status, a.body) == (404, b"nah")
    assert srv.accepted == 1


def test_connection_close_is_honoured(server):
    def handler(srv, conn, i):
        head, _ = srv.read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")

    srv = server(handler)
    p = srv.pool()
    assert [p.request("GET", "/", {}).body for _ in range(3)] == [b"ok"] * 3
    assert srv.accepted == 3


def test_idle_connection_closed_by_the_server_is_replaced(server):
    """The server answers once, then closes (as an idle timeout would): the next request
    must go out on a new connection, not fail."""
    def handler(srv, conn, i):
        head, _ = srv.read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % i)

    srv = server(handler)
    p = srv.pool()
    got = [p.request("GET", "/", {}).body for _ in range(5)]
    assert got == [b"0", b"1", b"2", b"3", b"4"]
    assert srv.accepted == 5


def test_close_after_request_is_read_is_sent_again_once(server):
    """A reused connection the server drops after reading the request, before answering
    (a race with its idle timeout): sent again on a new connection."""
    def handler(srv, conn, i):
        buf = b""
        if i == 0:
            head, buf = srv.read_request(conn, buf)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
            srv.read_request(conn, buf)          # second request: read, then drop it
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return
        while True:
            head, buf = srv.read_request(conn, buf)
            if head is None:
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")

    srv = server(handler)
    p = srv.pool()
    assert p.request("GET", "/", {}).body == b"a"
    p._take = lambda c=p._idle[0]: (p._idle.clear(), c)[1]   # skip the liveness check
    assert p.request("GET", "/", {}).body == b"b"
    assert srv.accepted == 2


def test_a_new_connection_closed_without_answer_raises(server):
    def handler(srv, conn, i):
        srv.read_request(conn)

    srv = server(handler)
    with pytest.raises(ConnectionResetError):
        srv.pool().request("GET", "/", {})
    assert srv.accepted == 1                     # not sent again: it was not a reused one


@pytest.mark.parametrize("answer", [
    b"SPDY/3 200 OK\r\n\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nX: " + b"y" * (70 * 1024),
])
def test_malformed_answers_raise_and_drop_the_connection(server, answer):
    def handler(srv, conn, i):
        srv.read_request(conn)
        conn.sendall(answer)
        conn.shutdown(socket.SHUT_WR)

    srv = server(handler)
    p = srv.pool()
    with pytest.raises(OSError):
        p.request("GET", "/", {})
    assert p._idle == []


def test_read_timeout_raises(server):
    stop = threading.Event()

    def handler(srv, conn, i):
        srv.read_request(conn)
        stop.wait(10)

    srv = server(handler)
    with pytest.raises(TimeoutError):
        srv.pool(read_timeout=0.3).request("GET", "/", {})
    stop.set()


def test_connection_refused_raises():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = HTTP1Pool("http", "127.0.0.1", port, ca_certs=None, connect_timeout=2, read_timeout=2)
    with pytest.raises(ConnectionRefusedError):
        p.request("GET", "/", {})


def test_threads_share_the_pool_within_its_bound(server):
    srv = server(keepalive_echo)
    p = srv.pool(maxsize=4)
    errors = []

    def work(t):
        try:
            for n in range(40):
                a = p.request("GET", f"/t{t}/{n}", {})
                assert a.body.startswith(f"GET /t{t}/{n} ".encode())
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    ts = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []
    assert len(p._idle) <= 4
    # 8 threads, 4 idle slots: a connection is closed only when 4 wait idle, and a new one
    # made only when none does, so at worst every other request makes one (+ the 12 that
    # can be alive at once); one per request would be 320
    assert srv.accepted <= 8 * 40 // 2 + 12


def test_tls_connection_is_verified_and_kept_alive(server, tmp_path):
    """https: the certificate is checked against the given CA, and the connection is reused
    (TLS 1.3 session tickets arriving after the handshake must not look like a dead
    connection)."""
    import ssl

    from test_tls import make_ca_and_cert
    pki = make_ca_and_cert(str(tmp_path))
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(pki["cert.pem"], pki["key.pem"])

    def handler(srv, conn, i):
        try:
            tls = sctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with tls:
            keepalive_echo(srv, tls, i)

    srv = server(handler)
    p = HTTP1Pool("https", "localhost", srv.port, ca_certs=pki["ca.pem"], connect_timeout=5,
                  read_timeout=5)
    for n in range(20):
        assert p.request("GET", f"/k{n}", {}).body == f"GET /k{n} HTTP/1.1 conn=0".encode()
    assert srv.accepted == 1
    p.close()
    (tmp_path / "other").mkdir()
    other = make_ca_and_cert(str(tmp_path / "other"))             # a CA that did not sign it
    q = HTTP1Pool("https", "localhost", srv.port, ca_certs=other["ca.pem"], connect_timeout=5,
                  read_timeout=5)
    with pytest.raises(ssl.SSLCertVerificationError):
        q.request("GET", "/", {})


# ------------------------------------------------------------------ pooled range-GET buffers
def test_pool_hands_a_buffer_out_again_only_when_nothing_refers_to_it():
    pool = BufferPool(keep=4, idle_s=60)
    a = pool.get(1000)
    assert isinstance(a, mmap.mmap) and len(a) == 1000
    first = id(a)
    a[:5] = b"hello"
    view = memoryview(a)[100:200]        # a chunk of a read unit, still in someone's hands
    sub = view[10:20]                    # (a view of a view refers to the buffer too)
    del a, view
    b = pool.get(1000)
    assert id(b) != first, "a buffer still seen through a view was handed out again"
    assert pool.get(999) is not b        # other sizes never match
    del sub
    c = pool.get(1000)
    assert id(c) == first, "a buffer nobody refers to any more was not reused"
    assert c[:5] == b"hello"             # (reused as is: the caller overwrites what it reads)
    d = pool.get(1000)
    assert d is not c and d is not b     # both still held here


def test_pool_remembers_at_most_keep_and_forgets_idle_ones():
    pool = BufferPool(keep=2, idle_s=10)
    held = [pool.get(64) for _ in range(3)]      # all in use: three distinct buffers
    assert len({id(b) for b in held}) == 3
    assert len(pool._bufs) == 2                  # the oldest was forgotten (it lives on: held)
    oldest = id(held[0])
    held.clear()
    assert id(pool.get(64)) != oldest            # forgotten buffers are not reused
    now = time.monotonic()
    assert pool.trim(now) == 2                   # all recent
    assert pool.trim(now + 11) == 0              # idle past idle_s: dropped


def test_a_big_partial_content_body_comes_in_a_pooled_buffer(server):
    big = os.urandom(3 * 1024 * 1024 + 5)

    def answer(head, i):
        status = b"206 Partial Content" if b"range" in head.lower() else b"200 OK"
        return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n" % (status, len(big)) + big

    srv = server(answer_each(answer))
    p = srv.pool()
    ranged = p.request("GET", "/b/k", {"host": "x", "range": "bytes=0-"}).body
    assert isinstance(ranged, Segments) and len(ranged) == len(big) and bytes(ranged) == big
    assert [len(s) for s in ranged.parts] == [SEG, SEG, SEG, 5]
    assert all(isinstance(s, mmap.mmap) for s in ranged.parts)
    step = 128 * 1024
    views = list(ranged.views(step))
    assert len(views) == 3 * SEG // step + 1
    assert b"".join(views) == big and all(len(v) == step for v in views[:-1])
    whole = p.request("GET", "/b/k", {"host": "x"}).body
    assert isinstance(whole, bytearray) and whole == big    # not a range answer: not pooled
    assert srv.accepted == 1


def test_a_chunk_kept_holds_only_its_own_segment(server, monkeypatch):
    """A reader or sealer that still holds one chunk of a read unit keeps that chunk's 1 MiB
    segment from being received into, and nothing more: the unit's other segments are
    reused at once (with one buffer per unit, a few chunks held pinned 8 MiB each)."""
    monkeypatch.setattr(http1, "POOL", BufferPool(keep=64, idle_s=60))
    big = os.urandom(4 * SEG)
    srv = server(answer_each(lambda head, i: b"HTTP/1.1 206 Partial Content\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(big) + big))
    p = srv.pool()
    first = p.request("GET", "/b/k", {"host": "x", "range": "bytes=0-"}).body
    kept = list(first.views(128 * 1024))[9]            # a chunk of the second segment
    ids = [id(s) for s in first.parts]
    del first
    again = p.request("GET", "/b/k", {"host": "x", "range": "bytes=0-"}).body
    reused = {id(s) for s in again.parts}
    assert ids[1] not in reused, "received into a segment a kept chunk still shows"
    assert {ids[0], ids[2], ids[3]} <= reused, "segments nobody refers to were not reused"
    assert bytes(kept) == big[9 * 128 * 1024:10 * 128 * 1024] and bytes(again) == big
