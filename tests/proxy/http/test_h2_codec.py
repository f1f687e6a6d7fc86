"""The HTTP/2 codecs, sans-IO: a client codec and a server codec talking through bytes."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.http.codec.events import (
    Data,
    GoAway,
    RemoteProtocolError,
    RequestHeaders,
    ResponseHeaders,
    StreamReset,
    Trailers,
)
from proxy.http.codec.h2 import (
    H2_PREFACE,
    REFUSED_STREAM,
    Http2ClientCodec,
    Http2Options,
    Http2ServerCodec,
)
from proxy.http.headers import HeaderMap

GET = HeaderMap([(":method", "GET"), (":path", "/a?b"), (":authority", "example.com"),
                 (":scheme", "http"), ("accept", "*/*")])


def post(n: int = 0) -> HeaderMap:
    return HeaderMap([(":method", "POST"), (":path", "/up"), (":authority", "example.com"),
                      (":scheme", "http"), ("content-type", "application/grpc"),
                      ("te", "trailers")])


def events(codec: object) -> list[object]:
    out = []
    while (ev := codec.next_event()) is not None:  # type: ignore[attr-defined]
        out.append(ev)
    return out


def pair(server_opts: Http2Options | None = None,
         client_opts: Http2Options | None = None) -> tuple[Http2ClientCodec, Http2ServerCodec]:
    c = Http2ClientCodec(client_opts)
    s = Http2ServerCodec(server_opts)
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    s.receive_data(c.data_to_send())
    assert events(s) == [] and events(c) == []
    return c, s


def client_bytes() -> bytes:
    """A full client conversation as raw bytes: preface, a GET, a POST with a body and
    trailers, from a plain h2 client (not our codec)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":path", "/"), (":authority", "x"),
                          (":scheme", "http"), ("cookie", "a=1"), ("cookie", "b=2")],
                      end_stream=True)
    conn.send_headers(3, [(":method", "POST"), (":path", "/p"), (":authority", "x"),
                          (":scheme", "http")])
    conn.send_data(3, b"x" * 16000)
    conn.send_data(3, b"x" * 4000)
    conn.send_data(3, b"y" * 100, pad_length=17)
    conn.send_headers(5, [(":method", "GET"), (":path", "/h"), (":scheme", "http"),
                          ("host", "from-host")], end_stream=True)
    conn.send_headers(3, [("grpc-status", "0")], end_stream=True)
    return conn.data_to_send()


def normalize(evs: list[object]) -> list[object]:
    """Merge adjacent Data events of a stream: chunking may split DATA differently."""
    out: list[object] = []
    for ev in evs:
        if (isinstance(ev, Data) and out and isinstance(out[-1], Data)
                and out[-1].stream_id == ev.stream_id):
            out[-1] = Data(stream_id=ev.stream_id, data=out[-1].data + ev.data)
        else:
            out.append(ev)
    return out


def test_request_events_whole() -> None:
    s = Http2ServerCodec()
    s.receive_data(client_bytes())
    evs = normalize(events(s))
    assert evs[0] == RequestHeaders(
        stream_id=1, end_stream=True, http_version="2",
        headers=HeaderMap([(":method", "GET"), (":path", "/"), (":authority", "x"),
                           (":scheme", "http"), ("cookie", "a=1; b=2")]))
    assert evs[1].stream_id == 3 and not evs[1].end_stream
    assert evs[2] == Data(stream_id=3, data=b"x" * 20000 + b"y" * 100)
    # host becomes :authority when :authority is missing
    assert evs[3].headers.get(":authority") == "from-host" and "host" not in evs[3].headers
    assert evs[4] == Trailers(stream_id=3, trailers=HeaderMap([("grpc-status", "0")]))
    assert len(evs) == 5  # END_STREAM on headers / trailers is not repeated


@given(st.lists(st.integers(min_value=1, max_value=500), min_size=1, max_size=60))
@settings(max_examples=60, deadline=None)
def test_random_chunking_gives_the_same_events(cuts: list[int]) -> None:
    raw = client_bytes()
    whole = Http2ServerCodec()
    whole.receive_data(raw)
    expected = normalize(events(whole))
    s = Http2ServerCodec()
    got: list[object] = []
    i = 0
    for n in cuts:
        s.receive_data(raw[i:i + n])
        got += events(s)
        i += n
        if i >= len(raw):
            break
    if i < len(raw):
        s.receive_data(raw[i:])
        got += events(s)
    assert normalize(got) == expected


def test_byte_by_byte() -> None:
    raw = client_bytes()
    whole = Http2ServerCodec()
    whole.receive_data(raw)
    s = Http2ServerCodec()
    got: list[object] = []
    for b in raw:
        s.receive_data(bytes([b]))
        got += events(s)
    assert normalize(got) == normalize(events(whole))


def test_response_with_body_and_trailers_round_trip() -> None:
    c, s = pair()
    sid = c.start_request(post(), end_stream=False)
    c.send_data(sid, b"hello", False)
    c.send_trailers(sid, HeaderMap([("x-req-trailer", "1")]))
    c.pump()
    s.receive_data(c.data_to_send())
    evs = events(s)
    assert [type(e) for e in evs] == [RequestHeaders, Data, Trailers]
    assert evs[0].headers.get("te") == "trailers"
    s.acknowledge(sid, 5)
    s.send_headers(sid, HeaderMap([(":status", "200"), ("content-type", "application/grpc")]),
                   False)
    s.send_data(sid, b"abc", False)
    s.send_trailers(sid, HeaderMap([("grpc-status", "0"), ("grpc-message", "")]))
    s.pump()
    c.receive_data(s.data_to_send())
    evs = events(c)
    assert [type(e) for e in evs] == [ResponseHeaders, Data, Trailers]
    assert evs[0].headers.get(":status") == "200"
    assert evs[2].trailers.get("grpc-status") == "0"


def test_hop_by_hop_headers_are_not_sent() -> None:
    c, s = pair()
    h = HeaderMap([(":method", "GET"), (":path", "/"), (":authority", "a"), (":scheme", "http"),
                   ("connection", "keep-alive"), ("keep-alive", "5"), ("te", "gzip"),
                   ("transfer-encoding", "chunked"), ("upgrade", "x"), ("host", "a"),
                   ("x-ok", "1")])
    c.start_request(h, True)
    s.receive_data(c.data_to_send())
    (ev,) = events(s)  # h2 would refuse the block (connection error) if one were left
    assert [k for k, _ in ev.headers if not k.startswith(":")] == ["x-ok"]


def test_flow_control_only_as_acknowledged() -> None:
    """The peer may send one stream window; more only after acknowledge()."""
    opts = Http2Options(initial_stream_window_size=65535, initial_connection_window_size=65535)
    c, s = pair(server_opts=opts)
    sid = c.start_request(post(), end_stream=False)
    c.send_data(sid, b"z" * 200_000, True)
    c.pump()
    s.receive_data(c.data_to_send())
    got = sum(len(e.data) for e in events(s) if isinstance(e, Data))
    assert got == 65535
    c.receive_data(s.data_to_send())
    assert c.pump() == 0  # no window: nothing more framed
    assert c.pending(sid) == 200_000 - 65535
    s.acknowledge(sid, got)
    c.receive_data(s.data_to_send())
    assert c.pump() > 0


def test_pump_is_round_robin_and_bounded_by_budget() -> None:
    c, s = pair()
    a = c.start_request(post(), end_stream=False)
    b = c.start_request(post(), end_stream=False)
    c.send_data(a, b"a" * 100_000, True)
    c.send_data(b, b"b" * 100_000, True)
    assert c.pump(budget=32768) == 32768
    s.receive_data(c.data_to_send())
    datas = [e for e in events(s) if isinstance(e, Data)]
    assert {d.stream_id for d in datas} == {a, b}  # both streams progressed


def test_remote_reset_and_refused_stream() -> None:
    c, s = pair()
    sid = c.start_request(GET, True)
    s.receive_data(c.data_to_send())
    events(s)
    s.reset_stream(sid, REFUSED_STREAM)
    c.receive_data(s.data_to_send())
    assert events(c) == [StreamReset(stream_id=sid, error_code=REFUSED_STREAM, remote=True)]


def test_graceful_goaway_lets_older_streams_finish() -> None:
    c, s = pair()
    old = c.start_request(GET, True)
    s.receive_data(c.data_to_send())
    events(s)
    s.send_goaway()
    c.receive_data(s.data_to_send())
    assert events(c) == [GoAway(last_stream_id=old, error_code=0)]
    # the client may still open a stream that crossed the GOAWAY: refused
    new = c.start_request(GET, True)
    s.receive_data(c.data_to_send())
    assert events(s) == []
    # ... while the old one completes
    s.send_headers(old, HeaderMap([(":status", "204")]), True)
    c.receive_data(s.data_to_send())
    evs = events(c)
    assert StreamReset(stream_id=new, error_code=REFUSED_STREAM, remote=True) in evs
    assert any(isinstance(e, ResponseHeaders) and e.stream_id == old for e in evs)


def test_protocol_error_raises_and_queues_goaway() -> None:
    s = Http2ServerCodec()
    s.receive_data(H2_PREFACE + b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00")
    with pytest.raises(RemoteProtocolError):
        s.next_event()
    assert b"\x07" in s.data_to_send()  # a GOAWAY frame (type 7)


def test_eof_is_reported() -> None:
    s = Http2ServerCodec()
    s.receive_data(b"")
    assert s.eof


def test_too_many_headers_resets_the_stream() -> None:
    c = Http2ClientCodec()
    s = Http2ServerCodec(max_headers_count=5)
    s.receive_data(c.data_to_send())
    h = HeaderMap([*GET.items(), *[(f"x-{i}", "v") for i in range(10)]])
    sid = c.start_request(h, True)
    s.receive_data(c.data_to_send())
    assert events(s) == [] and s.header_overflow == 1
    c.receive_data(s.data_to_send())
    assert any(isinstance(e, StreamReset) and e.stream_id == sid for e in events(c))


def test_options_from_proto_ranges() -> None:
    from envoy.config.core.v3.protocol_pb2 import Http2ProtocolOptions

    from proxy.config.errors import ConfigError

    msg = Http2ProtocolOptions()
    msg.max_concurrent_streams.value = 7
    msg.initial_stream_window_size.value = 65535
    o = Http2Options.from_proto(msg, "p")
    assert o.max_concurrent_streams == 7 and o.initial_stream_window_size == 65535
    msg.initial_stream_window_size.value = 100
    with pytest.raises(ConfigError, match="p.initial_stream_window_size"):
        Http2Options.from_proto(msg, "p")
