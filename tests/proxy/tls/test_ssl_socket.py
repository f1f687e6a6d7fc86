"""TLS over real loopback sockets: Connection.start_tls (server) against connect_upstream (client).

Both ends are trioxy's own TLS socket here; interoperability with curl, openssl and nginx is
tests/integration/test_tls.py's business.
"""

from __future__ import annotations

import os
import socket
import ssl
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from envoy.extensions.transport_sockets.tls.v3.tls_pb2 import (
    DownstreamTlsContext,
    UpstreamTlsContext,
)
from google.protobuf import json_format
from tls_certs import SPIFFE_CLIENT, Pki

from proxy.network.connection import Connection, TlsConnection
from proxy.stats import Store
from proxy.tls.context import TlsContext, client_context_from_proto, server_context_from_proto
from proxy.tls.ssl_socket import ListenerTlsStats, SslStats, TlsHandshakeError, accept_tls
from proxy.upstream.connect import (
    UpstreamConnectError,
    connect_upstream,
    io_socket,
    negotiated_protocol,
)
from proxy.upstream.host import Host


def server_ctx(pki: Pki, **extra: Any) -> TlsContext:
    common = {"tls_certificates": [{"certificate_chain": {"filename": str(pki.server.cert)},
                                    "private_key": {"filename": str(pki.server.key)}}]}
    common.update(extra.pop("common", {}))
    msg = json_format.ParseDict({"common_tls_context": common, **extra}, DownstreamTlsContext())
    return server_context_from_proto(msg, "ds")


def client_ctx(pki: Pki, *, cert: Any = None, ca: Any = None, **extra: Any) -> TlsContext:
    common: dict[str, Any] = dict(extra.pop("common", {}))
    if cert is not None:
        common["tls_certificates"] = [{"certificate_chain": {"filename": str(cert.cert)},
                                       "private_key": {"filename": str(cert.key)}}]
    if ca is not None:
        common.setdefault("validation_context", {})["trusted_ca"] = {"filename": str(ca.cert)}
    msg = json_format.ParseDict({"common_tls_context": common, **extra}, UpstreamTlsContext())
    return client_context_from_proto(msg, "us")


def fake_cluster(ctx: TlsContext, store: Store | None = None) -> Any:
    store = store or Store()
    return SimpleNamespace(config=SimpleNamespace(transport_socket=ctx),
                           stats=store.scope("cluster.backend."), store=store)


class Server:
    """Accept one connection at a time and hand it to ``handler`` as a Connection."""

    def __init__(self) -> None:
        self.sock = trio.socket.socket()
        self.port = 0

    async def start(self, nursery: trio.Nursery, handler: Any) -> None:
        await self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

        async def loop() -> None:
            while True:
                raw, _ = await self.sock.accept()
                conn = Connection(trio.SocketStream(raw))
                nursery.start_soon(handler, conn)

        nursery.start_soon(loop)


async def start_tls_server(nursery: trio.Nursery, ctx: TlsContext, handler: Any,
                           store: Store | None = None) -> tuple[int, list[Any]]:
    """A server that runs start_tls, then ``handler(conn)``; failures land in the list."""
    stats = SslStats((store or Store()).scope("listener.l."))
    failures: list[Any] = []

    async def serve(conn: Connection) -> None:
        try:
            await conn.start_tls(ctx, stats)
        except TlsHandshakeError as exc:
            failures.append(exc)
            await conn.aclose()
            return
        try:
            await handler(conn)
        finally:
            await conn.aclose()

    server = Server()
    await server.start(nursery, serve)
    return server.port, failures


async def test_handshake_facts_sni_alpn_and_echo(pki: Pki) -> None:
    store = Store()
    seen: list[Connection] = []

    async def echo(conn: Connection) -> None:
        seen.append(conn)
        while data := await conn.receive_some(65536):
            await conn.send_all(data)

    ctx = server_ctx(pki, common={"alpn_protocols": ["h2", "http/1.1"]})
    up = client_ctx(pki, ca=pki.ca, sni="api.example.com",
                    common={"alpn_protocols": ["http/1.1"]})
    async with trio.open_nursery() as nursery:
        port, failures = await start_tls_server(nursery, ctx, echo, store)
        cluster = fake_cluster(up)
        stream = await connect_upstream(Host("127.0.0.1", port), 5.0, cluster=cluster)
        assert negotiated_protocol(stream) == "http/1.1"
        await stream.send_all(b"hello")
        assert await stream.receive_some(100) == b"hello"
        conn = seen[0]
        assert isinstance(conn, TlsConnection) and conn.tls
        assert conn.negotiated_protocol == "http/1.1"
        assert conn.requested_server_name == "api.example.com"
        info = conn.stream_info.downstream_ssl
        assert info.tls_version == "TLSv1.2"  # the client's Envoy default maximum
        assert info.sni == "api.example.com" and info.peer_der is None
        assert info.local.dns == ("localhost", "*.example.com")
        up_info = stream.info
        assert up_info.peer_sans.dns == ("localhost", "*.example.com")
        assert up_info.peer_sans.ip == ("127.0.0.1",)
        # The ALPN override: the caller asks for h2 first, the server prefers its own order.
        s2 = await connect_upstream(Host("127.0.0.1", port), 5.0, cluster=cluster,
                                    alpn_protocols=["h2", "http/1.1"])
        assert negotiated_protocol(s2) == "h2"
        s3 = await connect_upstream(Host("127.0.0.1", port), 5.0, cluster=cluster,
                                    alpn_protocols=["spdy/1"])
        assert negotiated_protocol(s3) is None  # no overlap: no ALPN, the handshake completes
        for s in (stream, s2, s3):
            await s.aclose()
        nursery.cancel_scope.cancel()
    assert not failures
    c = store.counters
    assert c["listener.l.ssl.handshake"].value == 3
    assert c["listener.l.ssl.no_certificate"].value == 3
    assert c["listener.l.ssl.versions.TLSv1.2"].value == 3
    assert cluster.store.counters["cluster.backend.ssl.handshake"].value == 3
    # Plaintext connections stay plain.
    assert Connection.tls is False


async def test_large_transfers_exercise_the_backlog(pki: Pki) -> None:
    """8 MiB each way at once: sends outrun the kernel, so TLS records wait in the backlog."""
    payload = os.urandom(8 * 1024 * 1024)

    async def echo(conn: Connection) -> None:
        while data := await conn.receive_some(256 * 1024):
            await conn.send_all(data)
        await conn.send_eof()

    async with trio.open_nursery() as nursery:
        port, _ = await start_tls_server(nursery, server_ctx(pki), echo)
        stream = await connect_upstream(Host("127.0.0.1", port), 5.0,
                                        cluster=fake_cluster(client_ctx(pki)))
        got = bytearray()

        async def reader() -> None:
            while data := await stream.receive_some(65536):
                got.extend(data)

        async with trio.open_nursery() as inner:
            inner.start_soon(reader)
            view = memoryview(payload)
            for i in range(0, len(payload), 1 << 20):
                await stream.send_all(view[i:i + (1 << 20)])
            await stream.send_eof()  # close_notify + SHUT_WR; the echo keeps coming back
        assert bytes(got) == payload
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_half_close_both_ways(pki: Pki) -> None:
    async def answer_after_eof(conn: Connection) -> None:
        got = b""
        while data := await conn.receive_some(1024):
            got += data
        await conn.send_all(b"pong:" + got)
        await conn.send_eof()

    async with trio.open_nursery() as nursery:
        port, _ = await start_tls_server(nursery, server_ctx(pki), answer_after_eof)
        stream = await connect_upstream(Host("127.0.0.1", port), 5.0,
                                        cluster=fake_cluster(client_ctx(pki)))
        await stream.send_all(b"ping")
        await stream.send_eof()
        got = b""
        with trio.fail_after(5):
            while data := await stream.receive_some(1024):
                got += data
        assert got == b"pong:ping"
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_buffered_records_are_read_without_waiting(pki: Pki) -> None:
    """Two records in one segment: the second is read though the socket is not readable."""
    reads: list[bytes] = []
    both = trio.Event()

    async def read_small(conn: Connection) -> None:
        for _ in range(2):
            reads.append(await conn.receive_some(5, wait_first=True))
        both.set()

    async with trio.open_nursery() as nursery:
        port, _ = await start_tls_server(nursery, server_ctx(pki), read_small)
        stream = await connect_upstream(Host("127.0.0.1", port), 5.0,
                                        cluster=fake_cluster(client_ctx(pki)))
        await stream.send_all(b"helloworld")
        with trio.fail_after(5):
            await both.wait()
        assert reads == [b"hello", b"world"]
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_peek_tells_open_data_and_eof(pki: Pki) -> None:
    """conn_pool.still_open's MSG_PEEK on the TLS socket."""
    flags = socket.MSG_PEEK | socket.MSG_DONTWAIT
    go = trio.Event()
    done = trio.Event()

    async def talk_then_close(conn: Connection) -> None:
        await go.wait()
        await conn.send_all(b"unasked")
        await done.wait()

    async with trio.open_nursery() as nursery:
        port, _ = await start_tls_server(nursery, server_ctx(pki), talk_then_close)
        stream = await connect_upstream(Host("127.0.0.1", port), 5.0,
                                        cluster=fake_cluster(client_ctx(pki)))
        sock = io_socket(stream)
        with pytest.raises(BlockingIOError):
            sock.recv(1, flags)
        go.set()
        with trio.fail_after(5):
            while True:
                try:
                    assert sock.recv(1, flags) == b"u"
                    break
                except BlockingIOError:
                    await trio.sleep(0.01)
        assert await stream.receive_some(100) == b"unasked"  # the peeked bytes are not lost
        done.set()
        with trio.fail_after(5):
            while True:
                try:
                    assert sock.recv(1, flags) == b""
                    break
                except BlockingIOError:
                    await trio.sleep(0.01)
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_mtls_refusals_are_counted(pki: Pki) -> None:
    """No client cert, a cert from another CA, a cert with the wrong SPIFFE id."""
    store = Store()
    served: list[Any] = []

    async def ok(conn: Connection) -> None:
        served.append(conn.stream_info.downstream_ssl.peer_sans.uri)
        await conn.send_all(b"hi")

    ctx = server_ctx(pki, require_client_certificate=True, common={"validation_context": {
        "trusted_ca": {"filename": str(pki.ca.cert)},
        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": SPIFFE_CLIENT}}],
    }})
    async with trio.open_nursery() as nursery:
        port, failures = await start_tls_server(nursery, ctx, ok, store)

        async def attempt(cert: Any) -> bytes | None:
            try:
                stream = await connect_upstream(
                    Host("127.0.0.1", port), 5.0,
                    cluster=fake_cluster(client_ctx(pki, cert=cert, common={"tls_params": {
                        "tls_maximum_protocol_version": "TLSv1_3"}})))
            except UpstreamConnectError as exc:
                return exc.details.encode()
            try:
                with trio.fail_after(5):
                    return await stream.receive_some(10)
            except trio.BrokenResourceError:
                return None
            finally:
                await stream.aclose()

        assert await attempt(pki.client) == b"hi"
        assert served == [(SPIFFE_CLIENT,)]
        for cert in (None, pki.rogue_client, pki.other_client):
            # TLS 1.3: the client's handshake completes before the server checks its
            # certificate; it learns on its first read (an alert, or the close).
            assert await attempt(cert) in (None, b"")
        nursery.cancel_scope.cancel()
    stats = [f.stat for f in failures]
    assert stats == ["fail_verify_no_cert", "fail_verify_error", "fail_verify_san"]
    c = store.counters
    assert c["listener.l.ssl.fail_verify_no_cert"].value == 1
    assert c["listener.l.ssl.fail_verify_error"].value == 1
    assert c["listener.l.ssl.fail_verify_san"].value == 1
    assert c["listener.l.ssl.handshake"].value == 1
    assert "CERTIFICATE_VERIFY_FAILED" in failures[1].reason


async def test_upstream_verification_failures(pki: Pki) -> None:
    async def idle(conn: Connection) -> None:
        await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        port, _ = await start_tls_server(nursery, server_ctx(pki), idle)
        host = Host("127.0.0.1", port)
        # Wrong CA: the chain does not verify.
        cluster = fake_cluster(client_ctx(pki, ca=pki.other_ca))
        with pytest.raises(UpstreamConnectError) as e:
            await connect_upstream(host, 5.0, cluster=cluster)
        assert e.value.tls and e.value.reason == "connection_failure"
        assert str(e.value).startswith("TLS_error:|SSL routines:CERTIFICATE_VERIFY_FAILED:")
        assert "unable to get local issuer certificate" in str(e.value)
        assert str(e.value).endswith(":TLS_error_end")
        assert cluster.store.counters["cluster.backend.ssl.fail_verify_error"].value == 1
        # Right CA, wrong SAN.
        cluster = fake_cluster(client_ctx(pki, ca=pki.ca, common={"validation_context": {
            "match_typed_subject_alt_names": [{"san_type": "DNS",
                                               "matcher": {"exact": "db.internal"}}]}}))
        with pytest.raises(UpstreamConnectError) as e:
            await connect_upstream(host, 5.0, cluster=cluster)
        assert "verify cert failed: SAN matcher" in str(e.value)
        assert "DNS:localhost" in str(e.value)
        assert cluster.store.counters["cluster.backend.ssl.fail_verify_san"].value == 1
        # A wildcard SAN satisfies a DNS exact matcher; an IP SAN an IP matcher.
        for matcher in ({"san_type": "DNS", "matcher": {"exact": "api.example.com"}},
                        {"san_type": "IP_ADDRESS", "matcher": {"exact": "127.0.0.1"}}):
            cluster = fake_cluster(client_ctx(pki, ca=pki.ca, common={"validation_context": {
                "match_typed_subject_alt_names": [matcher]}}))
            stream = await connect_upstream(host, 5.0, cluster=cluster)
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_upstream_that_is_not_tls(pki: Pki) -> None:
    async def plain(conn: Connection) -> None:
        await conn.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    async with trio.open_nursery() as nursery:
        server = Server()
        await server.start(nursery, plain)
        cluster = fake_cluster(client_ctx(pki))
        with pytest.raises(UpstreamConnectError) as e:
            await connect_upstream(Host("127.0.0.1", server.port), 5.0, cluster=cluster)
        assert "WRONG_VERSION_NUMBER" in str(e.value)
        assert cluster.store.counters["cluster.backend.ssl.connection_error"].value == 1
        nursery.cancel_scope.cancel()


async def test_handshake_timeout_is_bounded_and_counted(pki: Pki) -> None:
    store = Store()
    stats = ListenerTlsStats(store.scope("listener.l."))
    chain = SimpleNamespace(transport_socket=server_ctx(pki), transport_socket_connect_timeout=0.2)
    results: list[bool] = []
    send, receive = trio.open_memory_channel[bool](10)

    async def serve(conn: Connection) -> None:
        await send.send(await accept_tls(conn, chain, stats))
        await conn.aclose()

    async with trio.open_nursery() as nursery:
        server = Server()
        await server.start(nursery, serve)
        silent = socket.create_connection(("127.0.0.1", server.port))
        with trio.fail_after(5):
            results.append(await receive.receive())
        silent.close()
        # A plaintext client on a TLS chain: a connection error, not a crash.
        plain = socket.create_connection(("127.0.0.1", server.port))
        plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            results.append(await receive.receive())
        plain.close()
        nursery.cancel_scope.cancel()
    assert results == [False, False]
    c = store.counters
    assert c["listener.l.downstream_cx_transport_socket_connect_timeout"].value == 1
    assert c["listener.l.ssl.connection_error"].value == 1


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
async def test_upstream_session_resumption(pki: Pki, version: str) -> None:
    """Envoy keeps one session per upstream context (max_session_keys 1): the next
    connection resumes. TLS 1.3 tickets arrive after the handshake, so the session is
    kept when the connection closes."""
    store = Store()

    async def hello(conn: Connection) -> None:
        await conn.send_all(b"x")

    async with trio.open_nursery() as nursery:
        port, _ = await start_tls_server(nursery, server_ctx(pki), hello, store)
        cluster = fake_cluster(client_ctx(pki, common={"tls_params": {
            "tls_maximum_protocol_version": version}}))
        for _ in range(2):
            stream = await connect_upstream(Host("127.0.0.1", port), 5.0, cluster=cluster)
            assert await stream.receive_some(10) == b"x"
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert store.counters["listener.l.ssl.session_reused"].value == 1
    assert cluster.store.counters["cluster.backend.ssl.session_reused"].value == 1


def test_stdlib_client_interop(pki: Pki) -> None:
    """A blocking stdlib ssl client (what most software links) against the trioxy server."""
    ctx = server_ctx(pki, common={"alpn_protocols": ["http/1.1"]})

    async def main() -> None:
        async def echo(conn: Connection) -> None:
            while data := await conn.receive_some(65536):
                await conn.send_all(data)

        async with trio.open_nursery() as nursery:
            port, _ = await start_tls_server(nursery, ctx, echo)

            def client() -> tuple[str | None, bytes]:
                cctx = ssl.create_default_context(cafile=str(pki.ca.cert))
                cctx.set_alpn_protocols(["http/1.1"])
                with socket.create_connection(("127.0.0.1", port)) as raw, \
                        cctx.wrap_socket(raw, server_hostname="localhost") as s:
                    s.sendall(b"x" * 100_000)
                    got = b""
                    while len(got) < 100_000:
                        got += s.recv(65536)
                    return s.selected_alpn_protocol(), got

            alpn, got = await trio.to_thread.run_sync(client)
            assert alpn == "http/1.1" and got == b"x" * 100_000
            nursery.cancel_scope.cancel()

    trio.run(main)
