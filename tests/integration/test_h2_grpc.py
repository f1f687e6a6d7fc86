"""gRPC through a real trioxy epoch: a grpcio server behind it, a grpcio client in front.

No generated code: the service is a generic handler over raw bytes (no serializers), so no
protoc runs anywhere. Downstream is h2c (grpcio's insecure channel speaks prior-knowledge
HTTP/2), upstream an HTTP/2 cluster; the grpc_stats filter counts per method.
"""

from __future__ import annotations

import http.client
import os
import re
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from harness import free_port, wait_for_port

SERVICE = "trioxy.test.Echo"
BASE_OFFSET = 41000


def config(port: int, admin_port: int, upstream_port: int) -> str:
    return f"""
static_resources:
  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/{SERVICE}/"}}
                route:
                  cluster: grpc_backend
                  timeout: 0s
                  max_stream_duration: {{grpc_timeout_header_max: 0s}}
          http_filters:
          - name: envoy.filters.http.grpc_stats
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig
              stats_for_all_methods: true
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: grpc_backend
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: grpc_backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream_port}}}}}}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
"""


class Servicer:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def unary(self, req: bytes, ctx: grpc.ServicerContext) -> bytes:
        ctx.set_trailing_metadata((("x-trailer", "t-" + req.decode()),))
        return b"echo:" + req

    def server_stream(self, req: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(req)):
            yield b"item-%d" % i

    def client_stream(self, it: Iterator[bytes], ctx: grpc.ServicerContext) -> bytes:
        return b"|".join(it)

    def bidi(self, it: Iterator[bytes], ctx: grpc.ServicerContext) -> Iterator[bytes]:
        for m in it:
            yield m.upper()

    def fail(self, req: bytes, ctx: grpc.ServicerContext) -> bytes:
        ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad thing: " + req.decode())
        return b""

    def slow(self, req: bytes, ctx: grpc.ServicerContext) -> bytes:
        ctx.add_callback(self.cancelled.set)
        deadline = time.monotonic() + 5
        while ctx.is_active() and time.monotonic() < deadline:
            time.sleep(0.02)
        return b"late"


@pytest.fixture
def grpc_server() -> Iterator[tuple[int, Servicer]]:
    s = Servicer()
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(s.unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(s.server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(s.client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(s.bidi),
        "Fail": grpc.unary_unary_rpc_method_handler(s.fail),
        "Slow": grpc.unary_unary_rpc_method_handler(s.slow),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, s
    server.stop(0)


def stat(admin_port: int, name: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    try:
        conn.request("GET", f"/stats?filter=^{re.escape(name)}$")
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    m = re.search(rf"^{re.escape(name)}: (\d+)$", body, re.M)
    return int(m.group(1)) if m else 0


def eventually_stat(admin_port: int, name: str, want: int) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if stat(admin_port, name) == want:
            return
        time.sleep(0.05)
    assert stat(admin_port, name) == want, name


def test_grpc_through_trioxy(start_trioxy, grpc_server) -> None:  # noqa: ANN001
    upstream_port, servicer = grpc_server
    port, aport = free_port(), free_port()
    base = os.getpid() % 8000 + BASE_OFFSET
    t = start_trioxy(config(port, aport, upstream_port), wait_port=port,
                     extra=["--base-id", str(base)])
    wait_for_port(aport, proc=t.proc)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        # unary, with trailing metadata
        resp, call = ch.unary_unary(f"/{SERVICE}/Unary").with_call(b"hi", timeout=5)
        assert resp == b"echo:hi"
        assert ("x-trailer", "t-hi") in call.trailing_metadata()
        # server streaming
        items = list(ch.unary_stream(f"/{SERVICE}/ServerStream")(b"50", timeout=5))
        assert items == [b"item-%d" % i for i in range(50)]
        # client streaming
        assert ch.stream_unary(f"/{SERVICE}/ClientStream")(
            iter([b"a", b"b", b"c"]), timeout=5) == b"a|b|c"
        # bidi
        out = list(ch.stream_stream(f"/{SERVICE}/Bidi")(
            iter([b"x" * 100_000, b"y", b"z"]), timeout=5))
        assert out == [b"X" * 100_000, b"Y", b"Z"]
        # error statuses come through the trailers
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(f"/{SERVICE}/Fail")(b"oops", timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "bad thing: oops"
        # deadline: the client gives up, the proxy cancels the upstream stream
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(f"/{SERVICE}/Slow")(b"", timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert servicer.cancelled.wait(5)
        # an unknown service: no route, a gRPC local reply (404 -> UNIMPLEMENTED)
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/other.Svc/M")(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

    prefix = f"cluster.grpc_backend.grpc.{SERVICE}"
    eventually_stat(aport, f"{prefix}.Unary.success", 1)
    eventually_stat(aport, f"{prefix}.Unary.total", 1)
    eventually_stat(aport, f"{prefix}.Fail.failure", 1)
    eventually_stat(aport, f"{prefix}.ServerStream.response_message_count", 50)
    eventually_stat(aport, f"{prefix}.ClientStream.request_message_count", 3)
    eventually_stat(aport, f"{prefix}.Bidi.request_message_count", 3)
    eventually_stat(aport, f"{prefix}.Bidi.response_message_count", 3)
    eventually_stat(aport, "http.ingress.downstream_cx_http2_total", 1)
    assert stat(aport, "cluster.grpc_backend.upstream_cx_http2_total") == 1
