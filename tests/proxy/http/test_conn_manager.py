"""The HTTP/1.1 path in one trio loop: listener → HCM → router → pool → real upstream sockets.

The proxy runs in-process (a worker's listener, cluster manager and connections in a
nursery) so each case costs milliseconds; clients and upstreams are real sockets on
127.0.0.1. The process-level behaviour (workers, signals) is in tests/integration.
"""

from __future__ import annotations

import contextlib
import re
import socket
import textwrap
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h11
import pytest
import trio
import yaml
from google.protobuf import json_format

from proxy.config.bootstrap import parse_bootstrap_dict
from proxy.config.snapshot import build_snapshot
from proxy.listener.active_tcp_listener import ActiveTcpListener
from proxy.server.worker_context import WorkerContext
from proxy.stats import Store
from proxy.upstream.cluster_manager import ClusterManager

del json_format


# -- a real upstream: h11 in a thread per connection ------------------------------------
class Upstream:
    """HTTP/1.1 upstream. Paths: /echo (echoes method, headers and body), /status/N,
    /slow?ms=N, /close (closes without answering), /garbage, /reset-mid, /big (1 MiB),
    /headers (lists request headers as `name: value` lines)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.accepts = 0
        self.requests: list[h11.Request] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepts += 1
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c: socket.socket) -> None:
        import time

        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req = None
                body = b""
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        data = c.recv(65536)
                        conn.receive_data(data)
                        if not data and conn.their_state is h11.IDLE:
                            return
                        continue
                    if isinstance(ev, h11.Request):
                        req = ev
                        self.requests.append(ev)
                    elif isinstance(ev, h11.Data):
                        body += ev.data
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    elif isinstance(ev, h11.ConnectionClosed):
                        return
                assert req is not None
                path = req.target.decode()
                status, headers, out = 200, [("content-type", "text/plain")], b"ok\n"
                if path.startswith("/echo"):
                    out = req.method + b" " + body
                elif path.startswith("/headers"):
                    out = b"".join(n + b": " + v + b"\n" for n, v in req.headers)
                elif path.startswith("/status/"):
                    status = int(path.rsplit("/", 1)[1])
                elif path.startswith("/slow"):
                    time.sleep(int(path.split("ms=")[1]) / 1000)
                elif path.startswith("/close"):
                    return
                elif path.startswith("/garbage"):
                    c.sendall(b"not http\r\n\r\n")
                    return
                elif path.startswith("/reset-mid"):
                    c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 1000)
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    return
                elif path.startswith("/big"):
                    out = b"b" * (1 << 20)
                if req.method == b"HEAD":
                    headers.append(("content-length", str(len(out))))
                    c.sendall(conn.send(h11.Response(status_code=status, headers=headers)))
                else:
                    headers.append(("content-length", str(len(out))))
                    data = conn.send(h11.Response(status_code=status, headers=headers))
                    data += conn.send(h11.Data(data=out)) + conn.send(h11.EndOfMessage())
                    c.sendall(data)
                if req.method == b"HEAD":
                    c.sendall(conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (OSError, h11.ProtocolError):
            pass
        finally:
            c.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    u = Upstream()
    yield u
    u.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the proxy, in-process --------------------------------------------------------------
def config(*, routes: str, clusters: str = "", access_log: Path | None = None,
           hcm_extra: str = "") -> str:
    log = ""
    if access_log is not None:
        log = f"""
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {access_log}
              log_format:
                text_format_source:
                  inline_string: "%RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_HOST% %REQ(:PATH)%\\n"
"""
    return f"""
static_resources:
  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http{textwrap.indent(textwrap.dedent(hcm_extra), " " * 10)}{log}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{textwrap.indent(textwrap.dedent(routes), " " * 14)}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
{textwrap.indent(textwrap.dedent(clusters), " " * 2)}
"""


def cluster(name: str, *ports: int, extra: str = "") -> str:
    eps = "".join(
        f"\n      - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}"
        for p in ports
    )
    return f"""
- name: {name}
  type: STATIC
  connect_timeout: 1s{textwrap.indent(textwrap.dedent(extra), "  ")}
  load_assignment:
    cluster_name: {name}
    endpoints:
    - lb_endpoints:{eps}
"""


@dataclass
class Proxy:
    port: int
    worker: WorkerContext


@contextlib.asynccontextmanager
async def run_proxy(yaml_text: str) -> AsyncIterator[Proxy]:
    bootstrap = parse_bootstrap_dict(yaml.safe_load(yaml_text))
    snapshot = build_snapshot(bootstrap)
    stats = Store()
    worker = WorkerContext(
        cluster_manager=ClusterManager(snapshot.clusters, stats), snapshot=snapshot, stats=stats
    )
    lc = snapshot.listeners[0]
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.timers.run)
        await nursery.start(worker.cluster_manager.run)
        listener = ActiveTcpListener(lc, sock, worker)
        nursery.start_soon(listener.accept_loop, nursery)
        yield Proxy(port, worker)
        nursery.cancel_scope.cancel()
    sock.close()


# -- a raw client -----------------------------------------------------------------------
@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class Client:
    """One client connection that speaks raw bytes and parses responses with h11."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.head_requests = 0

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, raw: bytes) -> None:
        await self.stream.send_all(raw)

    async def request(self, method: str = "GET", path: str = "/", body: bytes | None = None,
                      headers: list[tuple[str, str]] | None = None) -> Response:
        hs = [("host", "example.com"), *(headers or [])]
        if body is not None:
            hs.append(("content-length", str(len(body))))
        data = self.h11.send(h11.Request(method=method, target=path, headers=hs))
        if body:
            data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        return await self.response()

    async def response(self) -> Response:
        with trio.fail_after(10):
            resp = None
            body = b""
            while True:
                ev = self.h11.next_event()
                if ev is h11.NEED_DATA:
                    self.h11.receive_data(await self.stream.receive_some(65536))
                    continue
                if isinstance(ev, h11.Response):
                    resp = ev
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
                elif isinstance(ev, h11.ConnectionClosed):
                    raise ConnectionError("closed")
            assert resp is not None
            if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                self.h11.start_next_cycle()
            return Response(
                resp.status_code, {k.decode(): v.decode() for k, v in resp.headers}, body
            )

    async def read_all(self) -> bytes:
        out = b""
        with trio.fail_after(10):
            while data := await self.stream.receive_some(65536):
                out += data
        return out

    async def aclose(self) -> None:
        await self.stream.aclose()


async def eventually(check: Callable[[], bool]) -> None:
    """Stats are counted as the stream ends, just after the client has its response."""
    for _ in range(200):
        if check():
            return
        await trio.sleep(0.01)
    raise AssertionError("condition not reached in 2 s")


ROUTE_TO_BACKEND = """
- match: {prefix: "/"}
  route: {cluster: backend}
"""


# -- the cases ---------------------------------------------------------------------------
async def test_proxies_and_reuses_one_upstream_connection(upstream: Upstream) -> None:
    async with run_proxy(config(routes=ROUTE_TO_BACKEND, clusters=cluster("backend", upstream.port))) as p:
        c = await Client.connect(p.port)
        for _ in range(3):
            r = await c.request("GET", "/echo")
            assert r.status == 200 and r.body == b"GET "
            assert int(r.headers["x-envoy-upstream-service-time"]) >= 0
            assert r.headers["server"] == "envoy"
            assert "date" in r.headers
        c2 = await Client.connect(p.port)
        assert (await c2.request("GET", "/echo")).status == 200
        assert upstream.accepts == 1  # every request, both clients, one keep-alive connection
        stats = p.worker.stats
        await eventually(lambda: stats.counters["http.ingress_http.downstream_rq_2xx"].value == 4)
        assert stats.counters["cluster.backend.upstream_cx_total"].value == 1
        await c.aclose()
        await c2.aclose()


async def test_request_headers_are_mutated_like_envoy(upstream: Upstream) -> None:
    async with run_proxy(config(routes=ROUTE_TO_BACKEND, clusters=cluster("backend", upstream.port))) as p:
        c = await Client.connect(p.port)
        r = await c.request("GET", "/headers", headers=[("connection", "keep-alive, x-foo"),
                                                       ("x-foo", "1")])
        lines = dict(line.split(": ", 1) for line in r.body.decode().splitlines())
        assert lines["host"] == "example.com"
        assert lines["x-forwarded-proto"] == "http"
        assert len(lines["x-request-id"]) == 36
        assert lines["x-envoy-expected-rq-timeout-ms"] == "15000"
        assert "connection" not in lines or lines["connection"] != "keep-alive, x-foo"
        await c.aclose()


async def test_post_body_content_length_and_chunked(upstream: Upstream) -> None:
    async with run_proxy(config(routes=ROUTE_TO_BACKEND, clusters=cluster("backend", upstream.port))) as p:
        c = await Client.connect(p.port)
        body = bytes(range(256)) * 1000
        r = await c.request("POST", "/echo", body=body)
        assert r.status == 200 and r.body == b"POST " + body
        await c.send(b"PUT /echo HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        r = await c.response()
        assert r.body == b"PUT hello world"
        await c.aclose()


async def test_expect_100_continue_is_answered_by_the_proxy(upstream: Upstream) -> None:
    async with run_proxy(config(routes=ROUTE_TO_BACKEND, clusters=cluster("backend", upstream.port))) as p:
        c = await Client.connect(p.port)
        await c.send(b"POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n"
                     b"expect: 100-continue\r\n\r\n")
        with trio.fail_after(5):
            first = await c.stream.receive_some(100)
        assert first.startswith(b"HTTP/1.1 100 Continue\r\n")
        await c.send(b"abc")
        c.h11 = h11.Connection(h11.CLIENT)
        c.h11.send(h11.Request(method="POST", target="/", headers=[("host", "a"),
                                                                  ("content-length", "3")]))
        c.h11.send(h11.Data(data=b"abc"))
        c.h11.send(h11.EndOfMessage())
        r = await c.response()
        assert r.body == b"POST abc"
        await c.aclose()


async def test_pipelined_requests_are_answered_in_order(upstream: Upstream) -> None:
    async with run_proxy(config(routes=ROUTE_TO_BACKEND, clusters=cluster("backend", upstream.port))) as p:
        c = await Client.connect(p.port)
        await c.send(b"GET /status/201 HTTP/1.1\r\nhost: a\r\n\r\n"
                     b"GET /status/202 HTTP/1.1\r\nhost: a\r\n\r\n"
                     b"HEAD /big HTTP/1.1\r\nhost: a\r\n\r\n"
                     b"GET /status/203 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        raw = await c.read_all()
        assert re.findall(rb"HTTP/1.1 (\d+) ", raw) == [b"201", b"202", b"200", b"203"]
        assert b"content-length: 1048576" in raw.lower()
        assert b"bbbb" not in raw  # HEAD has no body
        await c.aclose()


async def test_big_response_streams_through(upstream: Upstream) -> None:
    async with run_proxy(config(routes=ROUTE_TO_BACKEND, clusters=cluster("backend", upstream.port))) as p:
        c = await Client.connect(p.port)
        r = await c.request("GET", "/big")
        assert r.body == b"b" * (1 << 20)
        await c.aclose()


async def test_local_replies_carry_envoy_status_flags_and_details(
    upstream: Upstream, tmp_path: Path
) -> None:
    routes = """
    - match: {prefix: "/refused"}
      route: {cluster: refused}
    - match: {prefix: "/empty"}
      route: {cluster: empty}
    - match: {prefix: "/timeout"}
      route: {cluster: backend, timeout: 0.3s, prefix_rewrite: "/slow?ms=2000"}
    - match: {prefix: "/direct"}
      direct_response: {status: 418, body: {inline_string: "teapot"}}
    - match: {prefix: "/moved"}
      redirect: {path_redirect: "/new", response_code: FOUND}
    - match: {prefix: "/"}
      route: {cluster: backend}
    """
    clusters = (cluster("backend", upstream.port) + cluster("refused", closed_port())
                + cluster("empty"))
    log = tmp_path / "access.log"
    vhost_domains = config(routes=routes, clusters=clusters, access_log=log)
    async with run_proxy(vhost_domains) as p:
        c = await Client.connect(p.port)
        cases = [
            ("/refused", 503, "UF", b"upstream connect error or disconnect/reset before headers."),
            ("/empty", 503, "UH", b"no healthy upstream"),
            ("/timeout", 504, "UT", b"upstream request timeout"),
            ("/close", 503, "UC", b"reset reason: connection termination"),
            ("/garbage", 502, "UPE", b"reset reason: protocol error"),
            ("/direct", 418, "-", b"teapot"),
            ("/moved", 302, "-", b""),
        ]
        for path, status, _flag, body in cases:
            r = await c.request("GET", path)
            assert r.status == status, path
            assert body in r.body, (path, r.body)
            if path == "/moved":
                assert r.headers["location"] == "http://example.com/new"
        await c.aclose()
        # no route: a virtual host that matches nothing
    async with run_proxy(config(routes="- match: {path: /only}\n  route: {cluster: backend}",
                                clusters=cluster("backend", upstream.port),
                                access_log=log)) as p:
        c = await Client.connect(p.port)
        r = await c.request("GET", "/elsewhere")
        assert r.status == 404
        await c.aclose()
    await trio.sleep(0.2)
    from proxy.access_log import file_sink

    file_sink.flush_all(2.0)
    lines = log.read_text().splitlines()
    flags = [line.split(" ")[1] for line in lines]
    assert flags == ["UF", "UH", "UT", "UC", "UPE", "-", "-", "NR"], lines


async def test_reset_mid_response_closes_the_client_connection(upstream: Upstream) -> None:
    async with run_proxy(config(routes=ROUTE_TO_BACKEND, clusters=cluster("backend", upstream.port))) as p:
        c = await Client.connect(p.port)
        await c.send(b"GET /reset-mid HTTP/1.1\r\nhost: a\r\n\r\n")
        with pytest.raises((trio.BrokenResourceError, ConnectionError)):
            raw = await c.read_all()
            # A clean EOF before the promised 100000 bytes is also a visible failure.
            assert len(raw) < 100000
            raise ConnectionError("short")
        await c.aclose()


async def test_malformed_request_gets_400_and_neighbour_is_unaffected(upstream: Upstream) -> None:
    async with run_proxy(config(routes=ROUTE_TO_BACKEND, clusters=cluster("backend", upstream.port))) as p:
        neighbour = await Client.connect(p.port)
        assert (await neighbour.request("GET", "/echo")).status == 200
        bad = await Client.connect(p.port)
        await bad.send(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n")
        raw = await bad.read_all()
        assert raw.startswith(b"HTTP/1.1 400 ")
        assert b"connection: close" in raw
        big = await Client.connect(p.port)
        await big.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
        assert (await big.read_all()).startswith(b"HTTP/1.1 431 ")
        te = await Client.connect(p.port)
        await te.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n")
        assert (await te.read_all()).startswith(b"HTTP/1.1 501 ")
        assert (await neighbour.request("GET", "/echo")).status == 200
        counters = p.worker.stats.counters
        await eventually(lambda: counters["http.ingress_http.downstream_cx_protocol_error"].value == 3)
        for c in (neighbour, bad, big, te):
            await c.aclose()


async def test_round_robin_spreads_over_endpoints() -> None:
    ups = [Upstream() for _ in range(3)]
    try:
        async with run_proxy(config(routes=ROUTE_TO_BACKEND,
                                    clusters=cluster("backend", *(u.port for u in ups)))) as p:
            c = await Client.connect(p.port)
            for _ in range(9):
                assert (await c.request("GET", "/echo")).status == 200
            assert [len(u.requests) for u in ups] == [3, 3, 3]
            await c.aclose()
    finally:
        for u in ups:
            u.close()


async def test_drain_closes_idle_connections_and_marks_responses(upstream: Upstream) -> None:
    async with run_proxy(config(routes=ROUTE_TO_BACKEND, clusters=cluster("backend", upstream.port))) as p:
        idle = await Client.connect(p.port)
        assert (await idle.request("GET", "/echo")).status == 200
        busy = await Client.connect(p.port)
        await busy.send(b"GET /slow?ms=300 HTTP/1.1\r\nhost: a\r\n\r\n")
        await trio.sleep(0.1)
        p.worker.drain.start_drain_sequence(0)
        assert await idle.read_all() == b""  # closed without a word: it had nothing in flight
        r = await busy.response()
        assert r.status == 200 and r.headers["connection"] == "close"
        await idle.aclose()
        await busy.aclose()


async def test_client_disconnect_mid_body_is_logged_dc(upstream: Upstream, tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    async with run_proxy(config(routes=ROUTE_TO_BACKEND, clusters=cluster("backend", upstream.port),
                                access_log=log)) as p:
        c = await Client.connect(p.port)
        await c.send(b"POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\nabc")
        await trio.sleep(0.1)
        await c.aclose()
        await trio.sleep(0.2)
        ok = await Client.connect(p.port)
        assert (await ok.request("GET", "/echo")).status == 200
        await ok.aclose()
    from proxy.access_log import file_sink

    file_sink.flush_all(2.0)
    first = log.read_text().splitlines()[0]
    assert "DC" in first.split(" ")[1]


async def test_idle_timeout_closes_a_quiet_keep_alive_connection(upstream: Upstream) -> None:
    hcm = """
    common_http_protocol_options: {idle_timeout: 0.3s}
    """
    async with run_proxy(config(routes=ROUTE_TO_BACKEND, clusters=cluster("backend", upstream.port),
                                hcm_extra=hcm)) as p:
        c = await Client.connect(p.port)
        assert (await c.request("GET", "/echo")).status == 200
        start = trio.current_time()
        assert await c.read_all() == b""  # the proxy closed it
        assert 0.25 <= trio.current_time() - start < 2.0
        await eventually(
            lambda: p.worker.stats.counters["http.ingress_http.downstream_cx_idle_timeout"].value == 1)
        await c.aclose()


async def test_route_timeout_after_a_streamed_body_and_connection_stays_usable(
    upstream: Upstream,
) -> None:
    routes = """
    - match: {prefix: "/"}
      route: {cluster: backend, timeout: 0.3s}
    """
    async with run_proxy(config(routes=routes, clusters=cluster("backend", upstream.port))) as p:
        c = await Client.connect(p.port)
        start = trio.current_time()
        r = await c.request("POST", "/slow?ms=1500", body=b"x" * 100_000)
        assert r.status == 504 and r.body == b"upstream request timeout"
        assert trio.current_time() - start < 1.2
        assert (await c.request("GET", "/echo")).status == 200  # same client connection
        counters = p.worker.stats.counters
        assert counters["cluster.backend.upstream_rq_timeout"].value == 1
        await c.aclose()


async def test_request_the_proxy_cannot_write_upstream_is_a_local_reset(
    upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No client bytes can make a header HTTP/1.1 may not carry (the parser refuses them
    # first), so the codec's refusal is simulated: this is the one stand-in here.
    from proxy.http.codec import h1_fast
    from proxy.http.codec.events import LocalProtocolError

    def refuse(self: object, headers: object, end_stream: bool) -> bytes:
        raise LocalProtocolError("illegal character in an outgoing header")

    monkeypatch.setattr(h1_fast.Http1ClientCodec, "send_request_headers", refuse)
    log = tmp_path / "a.log"
    async with run_proxy(config(routes=ROUTE_TO_BACKEND, clusters=cluster("backend", upstream.port),
                                access_log=log)) as p:
        c = await Client.connect(p.port)
        r = await c.request("GET", "/echo")
        assert r.status == 503 and b"reset reason: local reset" in r.body
        await c.aclose()
    from proxy.access_log import file_sink

    file_sink.flush_all(2.0)
    assert log.read_text().split(" ")[1] == "LR"


async def test_stream_idle_timeout_bounds_an_upstream_that_goes_quiet(upstream: Upstream) -> None:
    routes = """
    - match: {prefix: "/"}
      route: {cluster: backend, timeout: 0s}
    """
    async with run_proxy(config(routes=routes, clusters=cluster("backend", upstream.port),
                                hcm_extra="\nstream_idle_timeout: 0.3s")) as p:
        c = await Client.connect(p.port)
        start = trio.current_time()
        r = await c.request("GET", "/slow?ms=2000")
        assert r.status == 408 and r.body == b"stream timeout"
        assert trio.current_time() - start < 1.5
        await c.aclose()
        assert p.worker.stats.counters["http.ingress_http.downstream_rq_idle_timeout"].value == 1
