"""Downstream HTTP/2 (h2c) through the connection manager, in one trio loop with real sockets."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).parent))
from h2_helpers import (  # noqa: E402
    H1Upstream,
    H2Client,
    cluster,
    config,
    run_proxy,
)

from proxy.server.drain_manager import DrainStrategy  # noqa: E402

ROUTES = """
- match: {prefix: "/"}
  route: {cluster: backend}
"""


@pytest.fixture
def upstream() -> Iterator[H1Upstream]:
    u = H1Upstream()
    yield u
    u.close()


def cfg(port: int, hcm_extra: str = "", routes: str = ROUTES) -> str:
    return config(routes=routes, clusters=cluster("backend", port), hcm_extra=hcm_extra)


async def eventually(check) -> None:  # type: ignore[no-untyped-def]
    """Stats are counted as a stream ends, just after the client has its response."""
    for _ in range(300):
        if check():
            return
        await trio.sleep(0.01)
    raise AssertionError("condition not reached in 3 s")


async def test_h2c_prior_knowledge_to_http1_upstream(upstream: H1Upstream) -> None:
    async with run_proxy(cfg(upstream.port)) as p:
        c = await H2Client.connect(p.port)
        with trio.fail_after(5):
            r = await c.get("/headers", headers=[("te", "trailers"), ("cookie", "a=1")])
        assert r.status == 200
        assert r.header("server") == "envoy" and r.header("date")
        assert int(r.header("x-envoy-upstream-service-time") or -1) >= 0
        # HTTP/1 upstream: :authority became Host, hop-by-hop headers gone
        lines = r.body.decode().splitlines()
        assert "host: example.com" in lines
        assert not any(x.startswith(("connection:", "transfer-encoding:")) for x in lines)
        await eventually(lambda: p.counter("http.ingress_http.downstream_rq_2xx") == 1)
        assert p.counter("http.ingress_http.downstream_cx_http2_total") == 1
        assert p.counter("http.ingress_http.downstream_rq_http2_total") == 1
        assert p.counter("http.ingress_http.downstream_cx_http1_total") == 0
        assert p.gauge("http.ingress_http.downstream_cx_http2_active") == 1
        await c.aclose()
        await eventually(lambda: p.gauge("http.ingress_http.downstream_cx_http2_active") == 0)


async def test_streams_run_concurrently(upstream: H1Upstream) -> None:
    async with run_proxy(cfg(upstream.port)) as p:
        c = await H2Client.connect(p.port)
        sids = [c.start("/slow?ms=300") for _ in range(10)]
        await c.flush()
        start = trio.current_time()
        with trio.fail_after(5):
            for sid in sids:
                r = await c.wait(sid)
                assert r.status == 200 and r.body == b"ok"
        assert trio.current_time() - start < 2.0  # not 10 x 300 ms
        await eventually(lambda: p.counter("http.ingress_http.downstream_rq_http2_total") == 10)


async def test_request_body_to_http1_upstream(upstream: H1Upstream) -> None:
    async with run_proxy(cfg(upstream.port)) as p:
        c = await H2Client.connect(p.port)
        body = bytes(range(256)) * 1000
        sid = c.start("/echo", "POST", end_stream=False)
        with trio.fail_after(10):
            await c.send_body(sid, body)
            r = await c.wait(sid)
        assert r.status == 200 and bytes(r.body) == body
        # no content-length from the h2 client: chunked to the HTTP/1 upstream
        assert ("transfer-encoding", "chunked") in upstream.requests[-1][1]


async def test_large_response_respects_client_window(upstream: H1Upstream) -> None:
    async with run_proxy(cfg(upstream.port)) as p:
        c = await H2Client.connect(p.port)
        c.auto_ack = False
        sid = c.start("/big?n=3000000")
        await c.flush()
        with trio.fail_after(5):
            while len(c.responses[sid].body) < 65535:
                await c.receive_once()
        await trio.sleep(0.2)
        with trio.move_on_after(0.2):
            await c.receive_once()
        assert len(c.responses[sid].body) == 65535  # one window, then the proxy waits
        c.auto_ack = True
        c.ack(sid)
        await c.flush()
        with trio.fail_after(10):
            r = await c.wait(sid)
        assert len(r.body) == 3000000


async def test_no_route_404_and_grpc_local_reply(upstream: H1Upstream) -> None:
    routes = """
- match: {prefix: "/known"}
  route: {cluster: backend}
"""
    async with run_proxy(cfg(upstream.port, routes=routes)) as p:
        c = await H2Client.connect(p.port)
        with trio.fail_after(5):
            r = await c.get("/nope")
            assert r.status == 404
            g = await c.get("/pkg.Svc/Method", method="POST",
                            headers=[("content-type", "application/grpc"), ("te", "trailers")])
        # Envoy: a gRPC local reply is trailers-only, HTTP 200, grpc-status mapped
        assert g.status == 200 and g.body == b""
        assert g.header("grpc-status") == "12"  # 404 -> UNIMPLEMENTED
        assert g.header("content-type") == "application/grpc"


async def test_grpc_local_reply_carries_grpc_message() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    async with run_proxy(cfg(dead)) as p:
        c = await H2Client.connect(p.port)
        with trio.fail_after(5):
            g = await c.get("/pkg.Svc/M", method="POST",
                            headers=[("content-type", "application/grpc+proto")])
        assert g.status == 200
        assert g.header("grpc-status") == "14"  # 503 UF -> UNAVAILABLE
        assert g.header("grpc-message") == (
            "upstream connect error or disconnect/reset before headers. reset reason:"
            " connection failure")
        await eventually(lambda: p.counter("http.ingress_http.response_flag.UF") == 1)


async def test_client_reset_cancels_upstream_request(upstream: H1Upstream) -> None:
    async with run_proxy(cfg(upstream.port)) as p:
        c = await H2Client.connect(p.port)
        sid = c.start("/slow?ms=3000")
        await c.flush()
        await eventually(lambda: len(upstream.requests) == 1)
        c.conn.reset_stream(sid, 8)  # CANCEL
        await c.flush()
        await eventually(lambda: upstream.aborted == 1)
        await eventually(lambda: p.counter("http.ingress_http.downstream_rq_rx_reset") == 1)
        assert p.counter("http.ingress_http.response_flag.DR") == 1
        # the connection is still good
        with trio.fail_after(5):
            assert (await c.get("/")).status == 200


async def test_drain_sends_goaway_in_flight_stream_completes(upstream: H1Upstream) -> None:
    async with run_proxy(cfg(upstream.port)) as p:
        c = await H2Client.connect(p.port)
        sid = c.start("/slow?ms=500")
        await c.flush()
        await eventually(lambda: len(upstream.requests) == 1)
        p.worker.drain.start_drain_sequence(5, DrainStrategy.GRADUAL)
        with trio.fail_after(5):
            while c.goaway is None:
                await c.receive_once()
        assert c.goaway.last_stream_id == sid
        # a stream opened after the GOAWAY is refused ...
        late = c.start("/")
        await c.flush()
        with trio.fail_after(5):
            r = await c.wait(sid)
            assert r.status == 200 and r.body == b"ok"  # ... the in-flight one completes
            assert (await c.wait(late)).reset == 7
            while not c.closed:
                await c.receive_once()  # and then the connection closes
        assert p.counter("http.ingress_http.downstream_cx_drain_close") == 1


async def test_codec_http1_refuses_the_preface(upstream: H1Upstream) -> None:
    async with run_proxy(cfg(upstream.port, hcm_extra="\ncodec_type: HTTP1")) as p:
        s = await trio.open_tcp_stream("127.0.0.1", p.port)
        await s.send_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        with trio.fail_after(5):
            data = await s.receive_some(4096)
        assert data.startswith(b"HTTP/1.1 400")


async def test_codec_http2_and_settings_advertised(upstream: H1Upstream) -> None:
    extra = """
codec_type: HTTP2
http2_protocol_options:
  max_concurrent_streams: 7
  initial_stream_window_size: 70000
"""
    async with run_proxy(cfg(upstream.port, hcm_extra=extra)) as p:
        c = await H2Client.connect(p.port)
        with trio.fail_after(5):
            assert (await c.get("/")).status == 200
        assert c.conn.remote_settings.max_concurrent_streams == 7
        assert c.conn.remote_settings.initial_window_size == 70000


async def test_idle_timeout_sends_goaway_and_closes(upstream: H1Upstream) -> None:
    extra = """
common_http_protocol_options: {idle_timeout: 0.2s}
"""
    async with run_proxy(cfg(upstream.port, hcm_extra=extra)) as p:
        c = await H2Client.connect(p.port)
        with trio.fail_after(5):
            assert (await c.get("/")).status == 200
            while not c.closed:
                await c.receive_once()
        assert c.goaway is not None
        assert p.counter("http.ingress_http.downstream_cx_idle_timeout") == 1


async def test_max_requests_per_connection_drains(upstream: H1Upstream) -> None:
    extra = """
common_http_protocol_options: {max_requests_per_connection: 2}
"""
    async with run_proxy(cfg(upstream.port, hcm_extra=extra)) as p:
        c = await H2Client.connect(p.port)
        with trio.fail_after(5):
            assert (await c.get("/")).status == 200
            assert (await c.get("/")).status == 200
            while not c.closed:
                await c.receive_once()
        assert c.goaway is not None and c.goaway.last_stream_id == 3
