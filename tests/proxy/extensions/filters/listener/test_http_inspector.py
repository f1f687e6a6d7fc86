"""http_inspector: the HTTP preface parser (sans-IO) and the filter's decisions and stats."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.extensions.filters.listener.http_inspector.http_inspector import (
    MAX_INSPECT_SIZE,
    HttpInspectorConfig,
)
from proxy.extensions.filters.listener.http_inspector.preface import (
    H2_PREFACE,
    NEED_MORE,
    NotHttp,
    parse_http_preface,
)
from proxy.listener.listener_filter import AcceptedSocket, Action, ListenerFilterChain
from proxy.stats import Store


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


def parse_in_chunks(data: bytes, cuts: list[int]) -> object:
    seen = b""
    result: object = NEED_MORE
    for chunk in chunked(data, cuts):
        seen += chunk
        result = parse_http_preface(seen)
        if result is not NEED_MORE:
            return result
    return result


@pytest.mark.parametrize(("data", "expected"), [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "http/1.1"),
    (b"POST /x?y=1 HTTP/1.0\r\n", "http/1.0"),
    (b"GET / HTTP/1.1\n", "http/1.1"),  # a bare LF ends the line too
    (b"CUSTOM-METHOD * HTTP/1.1\r\n", "http/1.1"),
    (b"GET / HTTP/2.0\r\n", "http/1.0"),  # "other HTTP protocols" are HTTP/1.0
    (b"GET / HTTP/0.9\r\n", "http/1.0"),
    (b"GET /\r\n", "http/1.0"),  # HTTP/0.9
    (H2_PREFACE, "h2c"),
    (H2_PREFACE + b"\x00\x00\x12\x04\x00", "h2c"),
    (b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", "http/1.0"),  # not the preface: a request line
])
def test_http_found(data: bytes, expected: str) -> None:
    assert parse_http_preface(data) == expected
    assert parse_in_chunks(data, list(range(len(data)))) == expected


@pytest.mark.parametrize("data", [
    b"\r\nGET / HTTP/1.1\r\n", b"\nGET", b"\x16\x03\x01\x02\x00", b"GET  / HTTP/1.1\r\n",
    b"GET / HTTP/1.1 \r\n", b"GET / HTTP/1.x\r\n", b"GET / HTTP/11\r\n", b"GET / http/1.1\r\n",
    b"GET\t/ HTTP/1.1\r\n", b"G(T / HTTP/1.1\r\n", b"GET / HTTP/1.1\rX", b"GET /\rX",
    b"SSH-2.0-OpenSSH_9.2\r\n",
])
def test_not_http(data: bytes) -> None:
    assert isinstance(parse_http_preface(data), NotHttp)


@pytest.mark.parametrize("data", [b"G", b"GET", b"GET /", b"GET / HTTP/1.", b"GET / HTTP/1.1",
                                  b"GET / HTTP/1.1\r", b"PRI * HTTP/2.0\r\n\r\nSM\r\n"])
def test_need_more(data: bytes) -> None:
    assert parse_http_preface(data) is NEED_MORE


@settings(max_examples=400)
@given(st.sampled_from([b"GET /a HTTP/1.1\r\nx: y\r\n\r\n", H2_PREFACE + b"\x00\x00\x00",
                        b"DELETE /b HTTP/1.0\r\n", b"BAD REQUEST LINE\r\n", b"\x16\x03\x01"]),
       st.lists(st.integers(min_value=0, max_value=64), max_size=8))
def test_random_splits_give_the_same_answer(data: bytes, cuts: list[int]) -> None:
    assert parse_in_chunks(data, cuts) == parse_http_preface(data)


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    result = parse_http_preface(data)
    assert result is NEED_MORE or isinstance(result, NotHttp) or result in (
        "h2c", "http/1.1", "http/1.0")


@settings(max_examples=300)
@given(st.binary(max_size=60), st.lists(st.integers(0, 60), max_size=6))
def test_arbitrary_bytes_in_chunks_agree(data: bytes, cuts: list[int]) -> None:
    whole = parse_http_preface(data)
    if whole is not NEED_MORE:
        assert parse_in_chunks(data, cuts) == whole


# ----------------------------------------------------------------------------- the filter
class _Buffer:
    def __init__(self) -> None:
        self.data = b""

    def drain(self, n: int) -> bool:
        self.data = self.data[n:]
        return True


def run_filter(data: bytes, cuts: list[int] | None = None, transport: str = ""
               ) -> tuple[Action, AcceptedSocket, dict[str, int]]:
    store = Store()
    sock = AcceptedSocket(("127.0.0.1", 80), ("127.0.0.1", 5000))
    sock.detected_transport_protocol = transport
    chain = ListenerFilterChain([HttpInspectorConfig().bind(store).new_filter()], sock)
    action = chain.start()
    queued, pending, buf = b"", chunked(data, cuts or []), _Buffer()
    while action is Action.NEED_DATA:
        buf.data = queued[:chain.max_read_bytes]
        while not chain.has_unseen(buf) and pending:
            queued += pending.pop(0)
            buf.data = queued[:chain.max_read_bytes]
        if not chain.has_unseen(buf):
            break
        action = chain.on_data(buf)
    stats = {k.removeprefix("http_inspector."): c.value for k, c in store.counters.items()
             if c.value}
    return action, sock, stats


@pytest.mark.parametrize(("data", "protocol", "stat"), [
    (b"GET / HTTP/1.1\r\n", "http/1.1", "http11_found"),
    (b"GET / HTTP/1.0\r\n", "http/1.0", "http10_found"),
    (H2_PREFACE, "h2c", "http2_found"),
])
def test_filter_sets_the_application_protocol(data: bytes, protocol: str, stat: str) -> None:
    action, sock, stats = run_filter(data, [3, 9])
    assert action is Action.DONE
    assert sock.requested_application_protocols == (protocol,)
    assert stats == {stat: 1}


def test_not_http_continues_without_a_protocol() -> None:
    action, sock, stats = run_filter(b"SSH-2.0-x\r\n")
    assert action is Action.DONE and sock.requested_application_protocols == ()
    assert stats == {"http_not_found": 1}


def test_skipped_after_tls() -> None:
    action, sock, stats = run_filter(b"", transport="tls")
    assert action is Action.DONE and stats == {}


def test_request_line_beyond_64k_is_a_read_error() -> None:
    data = b"GET /" + b"a" * (MAX_INSPECT_SIZE + 10)
    action, sock, stats = run_filter(data, list(range(0, len(data), 7000)))
    assert action is Action.CLOSE and sock.closed
    assert stats == {"read_error": 1}
    # A long but complete request line under the limit is found.
    data = b"GET /" + b"a" * 30000 + b" HTTP/1.1\r\n"
    action, sock, stats = run_filter(data, list(range(0, len(data), 7000)))
    assert action is Action.DONE and stats == {"http11_found": 1}
