"""The drill's clients against small loopback servers: what a draining proxy does to them."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import h2.config
import h2.connection
import h2.events
import pytest

from drill.load import (
    GoAwayRetry,
    H1Client,
    H2Client,
    Http1KeepAlive,
    LoadGenerator,
    Pacer,
    PeerClosed,
    Recorder,
)
from drill.model import OK, REFUSED, RequestRecord
from drill.upstream import BuiltinUpstream, free_port


def serve_once(handler: Callable[[socket.socket], None]) -> Iterator[int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def run() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            try:
                handler(c)
            finally:
                c.close()

    threading.Thread(target=run, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


def h2_server(goaway_before_response: bool, last_stream_id: int) -> Callable[[socket.socket], None]:
    """Answers the first stream, sending GOAWAY(last_stream_id) first when asked: a drain."""

    def handle(c: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        c.sendall(conn.data_to_send())
        while True:
            data = c.recv(65536)
            if not data:
                return
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    c.sendall(conn.data_to_send())
                    response = b""
                    if ev.stream_id <= last_stream_id:
                        conn.send_headers(ev.stream_id, [(":status", "200")])
                        conn.send_data(ev.stream_id, b"ok\n", end_stream=True)
                        response = conn.data_to_send()
                    if not goaway_before_response:
                        c.sendall(response)
                        continue
                    # On the wire: GOAWAY first, then the stream it lets finish (h2 itself
                    # would not send after its own GOAWAY, hence the reordering).
                    conn.close_connection(last_stream_id=last_stream_id)
                    c.sendall(conn.data_to_send() + response)
                    time.sleep(0.05)
                    return
            c.sendall(conn.data_to_send())

    return handle


@pytest.fixture
def goaway_then_response() -> Iterator[int]:
    yield from serve_once(h2_server(True, 1))


@pytest.fixture
def goaway_refusing() -> Iterator[int]:
    yield from serve_once(h2_server(True, 0))


def test_h2_client_finishes_a_stream_the_goaway_lets_complete(goaway_then_response: int) -> None:
    client = H2Client("127.0.0.1", goaway_then_response, 5)
    assert client.request("/") == (200, b"ok\n")
    assert client.goaway_last == 1
    first = client.local_port
    assert client.request("/") == (200, b"ok\n")  # a new connection after the GOAWAY
    assert client.local_port != first
    client.close()


def test_h2_client_says_retry_for_a_stream_the_goaway_refused(goaway_refusing: int) -> None:
    client = H2Client("127.0.0.1", goaway_refusing, 5)
    with pytest.raises(GoAwayRetry):
        client.request("/")
    client.close()


def test_h1_client_keeps_alive_and_reconnects_after_connection_close() -> None:
    up = BuiltinUpstream()
    try:
        c = H1Client("127.0.0.1", up.port, 5)
        assert c.request("/")[0] == 200
        port = c.local_port
        assert c.request("/")[0] == 200 and c.local_port == port  # reused
        assert c.request("/", close=True)[0] == 200 and c.sock is None  # closed after
        assert c.request("/")[0] == 200 and c.local_port != port
        c.close()
    finally:
        up.close()


def test_h1_client_reports_a_close_without_response() -> None:
    def close_at_once(c: socket.socket) -> None:
        c.recv(65536)

    for port in serve_once(close_at_once):
        with pytest.raises(PeerClosed):
            H1Client("127.0.0.1", port, 5).request("/")


def test_pacer_paces_and_does_not_burst_after_a_stall() -> None:
    stop = threading.Event()
    p = Pacer(100.0)
    t = time.perf_counter()
    for _ in range(20):
        assert p.wait(stop)
    assert 0.15 < time.perf_counter() - t < 0.6
    p.next -= 5.0  # as if stalled 5 s
    t = time.perf_counter()
    for _ in range(5):
        p.wait(stop)
    assert time.perf_counter() - t > 0.03  # paced again, not 500 requests at once
    stop.set()
    assert not p.wait(stop)


def test_load_generator_records_refusals_and_stops_by_itself() -> None:
    port = free_port()  # nothing listens
    gen = LoadGenerator([Http1KeepAlive("127.0.0.1", port)], rate=200, max_seconds=0.5,
                        timeout=1)
    gen.start()
    time.sleep(1.0)
    assert gen.stop_event.is_set()  # the bound of last resort fired
    gen.stop()
    recs = gen.recorder.records
    assert recs and all(r.cause == REFUSED and r.port == 0 for r in recs)
    assert gen.recorder.refused == len(recs)


def test_recorder_is_bounded_and_keeps_the_first_error_per_cause() -> None:
    r = Recorder(max_records=2)
    for i in range(3):
        r.add(RequestRecord(float(i), 0.0, "m", OK))
    r.add(RequestRecord(3.0, 0.0, "m", "reset"), "ConnectionResetError(104)")
    r.add(RequestRecord(4.0, 0.0, "m", "reset"), "another")
    assert len(r.records) == 2 and r.dropped == 3 and r.ok == 3 and r.failed == 2
    assert r.examples == {"reset": "m: ConnectionResetError(104)"}
