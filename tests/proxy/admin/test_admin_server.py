"""The admin server's dispatch rules and HTTP handling, over real loopback sockets."""

from __future__ import annotations

import socket

import h11
import pytest
import trio

from proxy.admin.admin import Admin, AdminRequest, AdminResponse, BadRequest, Handler, parse_query
from proxy.http.headers import HeaderMap


def req(path: str, method: str = "GET", query: dict[str, str] | None = None) -> AdminRequest:
    return AdminRequest(method, path, query or {}, HeaderMap())


def make_admin() -> Admin:
    a = Admin()

    async def echo(r: AdminRequest) -> AdminResponse:
        fmt = r.choice("format", ("text", "json"), "text")
        return AdminResponse(200, f"{fmt} {sorted(r.query)}")

    async def boom(r: AdminRequest) -> AdminResponse:
        raise RuntimeError("bug")

    async def bad(r: AdminRequest) -> AdminResponse:
        raise BadRequest("no good")

    a.add(Handler("/echo", "echo", echo, params=("format=text|json", "flag")))
    a.add(Handler("/post", "changes things", echo, mutates=True))
    a.add(Handler("/boom", "fails", boom))
    a.add(Handler("/bad", "refuses", bad))
    return a


@pytest.mark.parametrize("raw, expected", [
    ("", {}),
    ("a=1&flag", {"a": "1", "flag": ""}),
    ("filter=a%2Bb&x=1+2", {"filter": "a+b", "x": "1 2"}),
    ("a=1&a=2", {"a": "1"}),
    ("&&a=&", {"a": ""}),
])
def test_parse_query(raw: str, expected: dict[str, str]) -> None:
    assert parse_query(raw) == expected


async def test_dispatch_rules() -> None:
    a = make_admin()
    r = await a.dispatch(req("/echo", query={"format": "json", "flag": ""}))
    assert (r.status, r.body) == (200, "json ['flag', 'format']")
    r = await a.dispatch(req("/echo", query={"format": "xml"}))
    assert r.status == 400 and "format='xml'" in r.body
    r = await a.dispatch(req("/echo", query={"fromat": "json"}))
    assert r.status == 400 and "fromat" in r.body
    r = await a.dispatch(req("/nope"))
    assert r.status == 404 and "/echo: echo" in r.body
    r = await a.dispatch(req("/post"))
    assert r.status == 405 and ("allow", "POST") in r.headers
    assert (await a.dispatch(req("/post", "POST"))).status == 200
    assert (await a.dispatch(req("/echo", "DELETE"))).status == 405
    assert (await a.dispatch(req("/boom"))).status == 500
    r = await a.dispatch(req("/bad"))
    assert (r.status, r.body) == (400, "no good\n")
    help_text = (await a.dispatch(req("/help"))).body
    assert "/post (POST): changes things" in help_text
    assert "      format=text|json" in help_text
    with pytest.raises(ValueError):
        a.add(Handler("/echo", "twice", a._help))


async def serve(a: Admin, nursery: trio.Nursery) -> int:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    await nursery.start(a.serve, sock)
    return sock.getsockname()[1]


async def roundtrip(port: int, data: bytes, *, read_all: bool = True) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        out = b""
        with trio.move_on_after(5):
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                out += chunk
                if not read_all:
                    break
        return out


async def test_keep_alive_head_and_errors_over_a_socket() -> None:
    a = make_admin()
    async with trio.open_nursery() as nursery:
        port = await serve(a, nursery)
        # Two requests on one connection (keep-alive), then HEAD without a body.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        got = []
        for method, target in ((b"GET", b"/echo?flag"), (b"HEAD", b"/echo")):
            await stream.send_all(conn.send(h11.Request(
                method=method, target=target, headers=[("host", "x")])) +
                conn.send(h11.EndOfMessage()))
            body = b""
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                    continue
                if isinstance(ev, h11.Response):
                    got.append(ev.status_code)
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
            conn.start_next_cycle()
            got.append(body)
        assert got == [200, b"text ['flag']", 200, b""]
        await stream.aclose()
        # Garbage -> 400, and the connection is closed.
        out = await roundtrip(port, b"NOT HTTP AT ALL\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400") and b"connection: close" in out
        # Oversized header block -> 431.
        out = await roundtrip(port, b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 431")
        # A body over the limit -> 413 before it is sent.
        out = await roundtrip(port, b"POST /post HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Length: 99999999\r\n\r\n", read_all=False)
        assert out.startswith(b"HTTP/1.1 413")
        assert a.requests_served == 2
        nursery.cancel_scope.cancel()


async def test_stop_accepting_lets_the_request_in_flight_finish() -> None:
    a = Admin()
    release = trio.Event()

    async def slow(r: AdminRequest) -> AdminResponse:
        await release.wait()
        return AdminResponse(200, "done")

    a.add(Handler("/slow", "waits", slow))
    async with trio.open_nursery() as nursery:
        port = await serve(a, nursery)
        result: list[bytes] = []

        async def client() -> None:
            result.append(await roundtrip(port, b"GET /slow HTTP/1.1\r\nHost: x\r\n"
                                                b"Connection: close\r\n\r\n"))

        nursery.start_soon(client)
        await trio.sleep(0.2)
        a.stop_accepting()
        await trio.sleep(0.1)
        # New connections now wait in the kernel queue (the next epoch takes them).
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /help HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(10)
        s.close()
        release.set()
        await trio.sleep(0.2)
        assert result and result[0].startswith(b"HTTP/1.1 200") and result[0].endswith(b"done")
        nursery.cancel_scope.cancel()
