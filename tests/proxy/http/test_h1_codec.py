"""The HTTP/1.1 codecs, sans-IO: bytes fed whole, one byte at a time, and with trailing data."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.http.codec import h1, h1_fast
from proxy.http.codec.events import (
    CodecError,
    ConnectionClosed,
    Data,
    EndOfStream,
    RequestHeaders,
    ResponseHeaders,
    Trailers,
)
from proxy.http.codec.h1 import Http1ClientCodec, Http1ServerCodec
from proxy.http.headers import HeaderMap

# Every test runs against the reference codec (h11) and the request path's (llhttp).
_IMPLS = {"h11": h1, "llhttp": h1_fast}


@pytest.fixture(autouse=True, params=sorted(_IMPLS))
def codec_impl(request: pytest.FixtureRequest) -> str:
    global Http1ServerCodec, Http1ClientCodec
    mod = _IMPLS[request.param]
    Http1ServerCodec, Http1ClientCodec = mod.Http1ServerCodec, mod.Http1ClientCodec  # type: ignore[misc]
    return request.param


def feed(codec: Http1ServerCodec | Http1ClientCodec, data: bytes, *, bytewise: bool = False) -> list:
    """Feed ``data`` and collect events until the codec needs more."""
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    events: list = []
    for chunk in chunks:
        if chunk:  # b"" would be EOF; feeding nothing just drains what is buffered
            codec.receive_data(chunk)
        while (ev := codec.next_event()) is not None:
            events.append(ev)
            if isinstance(ev, ConnectionClosed):
                return events
    return events


def merge_data(events: list) -> list:
    """Join consecutive Data events (byte-by-byte feeding splits bodies)."""
    out: list = []
    for ev in events:
        if isinstance(ev, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(stream_id=1, data=out[-1].data + ev.data)
        else:
            out.append(ev)
    return out


GET = b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\n\r\n"
POST_CL = b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
POST_CHUNKED = (
    b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Checksum: 9\r\n\r\n"
)


@pytest.mark.parametrize("bytewise", [False, True])
def test_get_has_pseudo_headers_and_ends_at_headers(bytewise: bool) -> None:
    events = feed(Http1ServerCodec(), GET, bytewise=bytewise)
    assert len(events) == 1
    req = events[0]
    assert isinstance(req, RequestHeaders)
    assert req.end_stream
    assert req.headers.items()[:4] == [
        (":method", "GET"),
        (":path", "/a?b=1"),
        (":authority", "example.com"),
        (":scheme", "http"),
    ]
    assert "host" not in req.headers
    assert req.headers.get("user-agent") == "t"


@pytest.mark.parametrize("bytewise", [False, True])
def test_post_content_length_body(bytewise: bool) -> None:
    events = merge_data(feed(Http1ServerCodec(), POST_CL, bytewise=bytewise))
    assert [type(e) for e in events] == [RequestHeaders, Data, EndOfStream]
    assert not events[0].end_stream
    assert events[1].data == b"hello"
    assert events[0].headers.get("content-length") == "5"


@pytest.mark.parametrize("bytewise", [False, True])
def test_chunked_body_with_trailers_and_hop_by_hop_stripped(bytewise: bool) -> None:
    events = merge_data(feed(Http1ServerCodec(), POST_CHUNKED, bytewise=bytewise))
    assert [type(e) for e in events] == [RequestHeaders, Data, Trailers]
    assert "transfer-encoding" not in events[0].headers
    assert events[1].data == b"abcde"
    assert events[2].trailers.get("x-checksum") == "9"


def test_pipelined_requests_come_one_cycle_at_a_time() -> None:
    codec = Http1ServerCodec()
    events = feed(codec, GET + POST_CL)
    assert [type(e) for e in events] == [RequestHeaders]  # paused until the response is sent
    codec.send_headers(HeaderMap([(":status", "200")]), end_stream=True)
    assert codec.start_next_cycle()
    events = merge_data(feed(codec, b""))
    assert [type(e) for e in events] == [RequestHeaders, Data, EndOfStream]
    assert events[0].headers.path == "/up"


def test_hop_by_hop_headers_removed_te_trailers_kept() -> None:
    raw = (
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, x-foo\r\nKeep-Alive: 5\r\n"
        b"Proxy-Connection: x\r\nUpgrade: websocket\r\nTE: trailers, deflate\r\nX-Keep: 1\r\n\r\n"
    )
    (req,) = feed(Http1ServerCodec(), raw)
    names = [k for k, _ in req.headers.regular()]
    assert names == ["x-keep", "te"]
    assert req.headers.get("te") == "trailers"
    (req,) = feed(Http1ServerCodec(), raw.replace(b"trailers, ", b""))
    assert "te" not in req.headers


SMUGGLING = [
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n\tb\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3x\r\nabc\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: b\r\n\r\n",
]


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize("raw", SMUGGLING)
def test_smuggling_shapes_are_refused(raw: bytes, bytewise: bool) -> None:
    with pytest.raises(CodecError) as info:
        feed(Http1ServerCodec(), raw, bytewise=bytewise)
    assert info.value.status in (400, 501)


def test_obs_fold_in_pipelined_request_is_refused() -> None:
    codec = Http1ServerCodec()
    feed(codec, GET + b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n")
    codec.send_headers(HeaderMap([(":status", "200")]), end_stream=True)
    with pytest.raises(CodecError):
        codec.start_next_cycle()
        feed(codec, b"")


@pytest.mark.parametrize("bytewise", [False, True])
def test_oversized_headers_are_431(bytewise: bool) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 2048 + b"\r\n\r\n"
    with pytest.raises(CodecError) as info:
        feed(Http1ServerCodec(max_request_headers_kb=1), raw, bytewise=bytewise)
    assert info.value.status == 431


def test_too_many_headers_is_431() -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(5)) + b"\r\n"
    with pytest.raises(CodecError) as info:
        feed(Http1ServerCodec(max_headers_count=4), raw)
    assert (info.value.status, info.value.details) == (431, "http1.too_many_headers")


def test_eof_mid_body_is_connection_closed() -> None:
    codec = Http1ServerCodec()
    events = feed(codec, POST_CL[:-2])
    codec.receive_data(b"")
    assert isinstance(codec.next_event(), ConnectionClosed)
    assert [type(e) for e in events] == [RequestHeaders, Data]


def test_http10_can_be_refused_with_426() -> None:
    with pytest.raises(CodecError) as info:
        feed(Http1ServerCodec(accept_http_10=False), b"GET / HTTP/1.0\r\n\r\n")
    assert info.value.status == 426
    (req,) = feed(Http1ServerCodec(), b"GET / HTTP/1.0\r\n\r\n")
    assert req.http_version == "1.0"


def test_expect_100_continue_is_reported_and_stripped() -> None:
    raw = b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    codec = Http1ServerCodec()
    (req,) = feed(codec, raw)
    assert req.expect_continue and "expect" not in req.headers
    assert codec.send_continue().startswith(b"HTTP/1.1 100 ")


def test_response_serialization_framing() -> None:
    codec = Http1ServerCodec()
    feed(codec, GET)
    head = codec.send_headers(HeaderMap([(":status", "200"), ("x-a", "1")]), end_stream=False)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert codec.send_data(b"abc") == b"3\r\nabc\r\n"
    assert codec.send_data(b"", end_stream=True) == b"0\r\n\r\n"
    assert codec.keep_alive


def test_headers_only_response_gets_content_length_zero_and_close() -> None:
    codec = Http1ServerCodec()
    feed(codec, GET)
    head = codec.send_headers(HeaderMap([(":status", "404")]), end_stream=True, close=True)
    assert b"content-length: 0\r\n" in head and b"connection: close\r\n" in head
    assert not codec.start_next_cycle()


def test_head_response_drops_body() -> None:
    codec = Http1ServerCodec()
    feed(codec, b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    head = codec.send_headers(
        HeaderMap([(":status", "200"), ("content-length", "10")]), end_stream=False
    )
    assert b"content-length: 10" in head
    assert codec.send_data(b"0123456789", end_stream=True) == b""


# -- client codec ------------------------------------------------------------------------
def req_map(method: str = "GET", **extra: str) -> HeaderMap:
    return HeaderMap(
        [(":method", method), (":path", "/p"), (":authority", "up"), (":scheme", "http")]
        + list(extra.items())
    )


def test_client_request_framing() -> None:
    c = Http1ClientCodec()
    out = c.send_request_headers(req_map(), end_stream=True)
    assert out.startswith(b"GET /p HTTP/1.1\r\nhost: up\r\n")
    assert b"content-length" not in out and b"transfer-encoding" not in out
    c = Http1ClientCodec()
    out = c.send_request_headers(req_map("POST"), end_stream=False)
    assert b"transfer-encoding: chunked" in out
    assert c.send_data(b"ab") == b"2\r\nab\r\n"
    c = Http1ClientCodec()
    assert b"content-length: 0" in c.send_request_headers(req_map("POST"), end_stream=True)


@pytest.mark.parametrize("bytewise", [False, True])
def test_client_parses_response_and_is_reusable(bytewise: bool) -> None:
    c = Http1ClientCodec()
    c.send_request_headers(req_map(), end_stream=True)
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nabc"
    events = merge_data(feed(c, resp, bytewise=bytewise))
    assert [type(e) for e in events] == [ResponseHeaders, Data, EndOfStream]
    assert events[0].headers.items() == [(":status", "200"), ("content-length", "3")]
    assert c.reusable


def test_client_head_and_204_end_at_headers() -> None:
    c = Http1ClientCodec()
    c.send_request_headers(req_map("HEAD"), end_stream=True)
    (ev,) = feed(c, b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
    assert ev.end_stream and c.reusable


def test_client_eof_before_response_is_connection_closed() -> None:
    c = Http1ClientCodec()
    c.send_request_headers(req_map(), end_stream=True)
    c.receive_data(b"")
    assert isinstance(c.next_event(), ConnectionClosed)


def test_client_garbage_is_protocol_error_502() -> None:
    c = Http1ClientCodec()
    c.send_request_headers(req_map(), end_stream=True)
    with pytest.raises(CodecError) as info:
        feed(c, b"garbage\r\n\r\n")
    assert info.value.status == 502


def test_close_delimited_response_ends_at_eof() -> None:
    c = Http1ClientCodec()
    c.send_request_headers(req_map(), end_stream=True)
    events = feed(c, b"HTTP/1.0 200 OK\r\n\r\nbody")
    c.receive_data(b"")
    events.append(c.next_event())
    assert [type(e) for e in events] == [ResponseHeaders, Data, EndOfStream]
    assert not c.reusable


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=8))
def test_any_split_of_a_chunked_request_gives_the_same_events(cuts: list[int]) -> None:
    data = POST_CHUNKED + GET
    codec = Http1ServerCodec()
    events: list = []
    pos = 0
    for n in cuts + [len(data)]:
        codec.receive_data(data[pos : pos + n])
        pos += n
        while (ev := codec.next_event()) is not None:
            events.append(ev)
        if pos >= len(data):
            break
    events = merge_data(events)
    assert [type(e) for e in events] == [RequestHeaders, Data, Trailers]
    assert events[1].data == b"abcde"
