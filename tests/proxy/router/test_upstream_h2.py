"""HTTP/2 upstreams: the router on the multiplexed pool, against a real h2 server thread."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import h11
import pytest
import trio

sys.path.insert(0, str(Path(__file__).parents[1] / "http"))
from h2_helpers import H2_CLUSTER, H2Client, H2Upstream, cluster, config, run_proxy  # noqa: E402

ROUTES = """
- match: {prefix: "/"}
  route: {cluster: backend}
"""


@pytest.fixture
def upstream() -> Iterator[H2Upstream]:
    u = H2Upstream()
    yield u
    u.close()


def cfg(port: int, extra: str = H2_CLUSTER, hcm_extra: str = "") -> str:
    return config(routes=ROUTES, clusters=cluster("backend", port, extra=extra),
                  hcm_extra=hcm_extra)


async def eventually(check) -> None:  # type: ignore[no-untyped-def]
    for _ in range(300):
        if check():
            return
        await trio.sleep(0.01)
    raise AssertionError("condition not reached in 3 s")


async def test_h2_to_h2_trailers_both_ways(upstream: H2Upstream) -> None:
    async with run_proxy(cfg(upstream.port)) as p:
        c = await H2Client.connect(p.port)
        sid = c.start("/echo", "POST", end_stream=False,
                      headers=[("content-type", "application/grpc"), ("te", "trailers")])
        with trio.fail_after(5):
            await c.send_body(sid, b"hello", end_stream=False)
            c.conn.send_headers(sid, [("x-req", "t")], end_stream=True)
            await c.flush()
            r = await c.wait(sid)
        assert r.status == 200 and r.body == b"hello"
        assert ("x-req", "t") in r.trailers
        assert upstream.requests[-1]["te"] == "trailers"
        assert upstream.requests[-1][":authority"] == "example.com"
        await eventually(lambda: p.counter("cluster.backend.upstream_rq_completed") == 1)
        assert p.counter("cluster.backend.upstream_cx_http2_total") == 1
        assert p.counter("cluster.backend.upstream_rq_200") == 1


async def test_http1_client_to_h2_upstream(upstream: H2Upstream) -> None:
    async with run_proxy(cfg(upstream.port)) as p:
        s = await trio.open_tcp_stream("127.0.0.1", p.port)
        h = h11.Connection(h11.CLIENT)
        await s.send_all(h.send(h11.Request(method="GET", target="/trailers", headers=[
            ("host", "h1.example"), ("te", "trailers"), ("connection", "keep-alive")]))
            + h.send(h11.EndOfMessage()))
        got = []
        with trio.fail_after(5):
            while True:
                ev = h.next_event()
                if ev is h11.NEED_DATA:
                    h.receive_data(await s.receive_some(65536))
                    continue
                got.append(ev)
                if isinstance(ev, h11.EndOfMessage):
                    break
        resp = got[0]
        assert resp.status_code == 200
        assert (b"transfer-encoding", b"chunked") in resp.headers  # h2 DATA -> chunked
        assert got[-1].headers == [(b"x-t", b"1")]  # trailers in the last chunk
        # Host became :authority, connection headers did not cross
        assert upstream.requests[-1][":authority"] == "h1.example"
        assert "connection" not in upstream.requests[-1]
        await s.aclose()


async def test_streams_share_one_connection(upstream: H2Upstream) -> None:
    async with run_proxy(cfg(upstream.port)) as p:
        c = await H2Client.connect(p.port)
        sids = [c.start("/slow?ms=200") for _ in range(10)]
        await c.flush()
        with trio.fail_after(5):
            for sid in sids:
                assert (await c.wait(sid)).status == 200
        assert upstream.accepts == 1
        assert p.counter("cluster.backend.upstream_cx_total") == 1


async def test_max_concurrent_streams_opens_more_connections(upstream: H2Upstream) -> None:
    extra = """
typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    explicit_http_config:
      http2_protocol_options: {max_concurrent_streams: 2}
"""
    async with run_proxy(cfg(upstream.port, extra=extra)) as p:
        c = await H2Client.connect(p.port)
        sids = [c.start("/slow?ms=300") for _ in range(6)]
        await c.flush()
        with trio.fail_after(5):
            for sid in sids:
                assert (await c.wait(sid)).status == 200
        assert upstream.accepts == 3  # 6 streams, 2 per connection
        assert p.counter("cluster.backend.upstream_cx_http2_total") == 3


async def test_server_settings_limit_is_honoured() -> None:
    u = H2Upstream(max_concurrent_streams=1)
    try:
        async with run_proxy(cfg(u.port)) as p:
            c = await H2Client.connect(p.port)
            with trio.fail_after(5):
                assert (await c.get("/")).status == 200  # learns the server's SETTINGS
                sids = [c.start("/slow?ms=200") for _ in range(3)]
                await c.flush()
                for sid in sids:
                    assert (await c.wait(sid)).status == 200
            assert u.accepts >= 3
            assert p.counter("cluster.backend.upstream_rq_total") == 4
    finally:
        u.close()


@pytest.mark.parametrize(("path", "flag", "body"), [
    ("/reset", "UR", b"reset reason: remote reset"),
    ("/refuse", "UR", b"reset reason: remote refused stream reset"),
])
async def test_rst_stream_maps_to_response_flags(upstream: H2Upstream, path: str, flag: str,
                                                 body: bytes) -> None:
    async with run_proxy(cfg(upstream.port)) as p:
        c = await H2Client.connect(p.port)
        with trio.fail_after(5):
            r = await c.get(path)
        assert r.status == 503 and bytes(r.body).endswith(body)
        await eventually(lambda: p.counter(f"http.ingress_http.response_flag.{flag}") == 1)


async def test_connect_failure_is_uf() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    async with run_proxy(cfg(dead)) as p:
        c = await H2Client.connect(p.port)
        with trio.fail_after(5):
            r = await c.get("/")
        assert r.status == 503
        await eventually(lambda: p.counter("http.ingress_http.response_flag.UF") == 1)
        assert p.counter("cluster.backend.upstream_cx_connect_fail") == 1


async def test_goaway_moves_new_streams_to_a_new_connection(upstream: H2Upstream) -> None:
    async with run_proxy(cfg(upstream.port)) as p:
        c = await H2Client.connect(p.port)
        with trio.fail_after(5):
            r = await c.get("/goaway-graceful")
            assert r.status == 200 and r.body == b"ok"  # the stream it named completes
            assert (await c.get("/")).status == 200
        assert upstream.accepts == 2
        await eventually(lambda: p.counter("cluster.backend.upstream_cx_destroy") >= 1)


async def test_goaway_refused_stream_is_replayed_once(upstream: H2Upstream) -> None:
    async with run_proxy(cfg(upstream.port)) as p:
        c = await H2Client.connect(p.port)
        with trio.fail_after(5):
            r = await c.get("/goaway")  # GOAWAY(last_stream_id=0): never processed
        # replayed on a fresh connection, which refuses it the same way: 503 UR
        assert r.status == 503
        assert upstream.accepts == 2
        await eventually(lambda: p.counter("http.ingress_http.response_flag.UR") == 1)


async def test_client_reset_resets_the_upstream_stream(upstream: H2Upstream) -> None:
    async with run_proxy(cfg(upstream.port)) as p:
        c = await H2Client.connect(p.port)
        sid = c.start("/slow?ms=2000")
        await c.flush()
        await eventually(lambda: len(upstream.requests) == 1)
        c.conn.reset_stream(sid, 8)
        await c.flush()
        await eventually(lambda: len(upstream.resets) == 1)
        await eventually(lambda: p.counter("http.ingress_http.downstream_rq_rx_reset") == 1)
        with trio.fail_after(5):
            assert (await c.get("/")).status == 200  # the upstream connection is still used
        assert upstream.accepts == 1


async def test_upstream_idle_timeout_closes_the_connection(upstream: H2Upstream) -> None:
    extra = """
typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    common_http_protocol_options: {idle_timeout: 0.2s}
    explicit_http_config:
      http2_protocol_options: {}
"""
    async with run_proxy(cfg(upstream.port, extra=extra)) as p:
        c = await H2Client.connect(p.port)
        with trio.fail_after(5):
            assert (await c.get("/")).status == 200
        await eventually(lambda: p.counter("cluster.backend.upstream_cx_destroy_local") == 1)
        assert p.gauge("cluster.backend.upstream_cx_active") == 0


async def test_large_download_from_h2_upstream_to_slow_client(upstream: H2Upstream) -> None:
    async with run_proxy(cfg(upstream.port)) as p:
        c = await H2Client.connect(p.port)
        c.auto_ack = False
        sid = c.start("/big?n=4000000")
        await c.flush()
        with trio.fail_after(5):
            while len(c.responses[sid].body) < 65535:
                await c.receive_once()
        await trio.sleep(0.3)
        # the upstream stream is held to about one window beyond what the client took
        sent = p.counter("cluster.backend.upstream_cx_rx_bytes_total")
        assert sent < 65535 + 2 * (1 << 20)
        c.auto_ack = True
        c.ack(sid)
        await c.flush()
        with trio.fail_after(10):
            r = await c.wait(sid)
        assert len(r.body) == 4000000


async def test_grpc_timeout_header_is_the_route_timeout(upstream: H2Upstream) -> None:
    """max_stream_duration.grpc_timeout_header_max: the client's grpc-timeout (capped) is
    the route timeout, sent upstream as what is left; expiry is Envoy's 504 UT, which a
    gRPC client sees as a trailers-only grpc-status 14."""
    routes = """
- match: {prefix: "/"}
  route:
    cluster: backend
    max_stream_duration: {grpc_timeout_header_max: 0.3s}
"""
    yaml_text = config(routes=routes, clusters=cluster("backend", upstream.port, extra=H2_CLUSTER))
    async with run_proxy(yaml_text) as p:
        c = await H2Client.connect(p.port)
        grpc = [("content-type", "application/grpc"), ("te", "trailers"), ("grpc-timeout", "10S")]
        start = trio.current_time()
        with trio.fail_after(5):
            r = await c.get("/slow?ms=2000", method="POST", headers=grpc)
        assert trio.current_time() - start < 1.5
        assert r.status == 200 and r.header("grpc-status") == "14"
        assert r.header("grpc-message") == "upstream request timeout"
        # Capped at 300 ms, and what is left said upstream (a loaded machine may have spent
        # a few milliseconds before the request left).
        sent = upstream.requests[-1]["grpc-timeout"]
        assert sent.endswith("m") and 200 <= int(sent[:-1]) <= 300, sent
        await eventually(lambda: p.counter("http.ingress_http.response_flag.UT") == 1)
        await eventually(lambda: len(upstream.resets) == 1)  # the upstream stream was reset
