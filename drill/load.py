"""The drill's own load: pluggable modes, each paced to its share of ``--rate``.

Threads, not trio: every client here is a blocking socket loop, and a stalled handover must
show up as a slow request, not as a starved event loop. Each mode runs a few threads until
the stop event or the deadline, whichever comes first; every request becomes one
``RequestRecord`` with the client's local port, so a failure can later be traced to the
process that held its connection.

Modes (``MODES``): ``http1-keepalive`` (reused connections), ``http1-new`` (a connection per
request), ``http1-slow`` (requests the upstream answers after a delay, so some are always in
flight across a drain), ``tcp`` (short tcp_proxy streams of a few HTTP/1.1 requests), ``h2``
(h2c prior knowledge; probed first and skipped with the reason if the listener does not
speak it). A mode is a class with ``probe()`` and ``run_thread()``: add one there.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import h11

if TYPE_CHECKING:
    import h2.connection

from drill.model import (
    CLOSED,
    OK,
    PROTOCOL,
    REFUSED,
    RESET,
    TIMEOUT,
    RequestRecord,
    status_cause,
)

RECV = 65536


class PeerClosed(Exception):
    """The server closed the connection before the whole response."""


class GoAwayRetry(Exception):
    """An h2 stream the server's GOAWAY says it never processed: safe to send again."""


def classify_error(exc: BaseException) -> str:
    """What the client saw, as a cause. Order matters: the OSError subclasses first."""
    if isinstance(exc, ConnectionRefusedError):
        return REFUSED
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return RESET
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError since 3.10
        return TIMEOUT
    if isinstance(exc, PeerClosed):
        return CLOSED
    if isinstance(exc, h11.ProtocolError):
        return PROTOCOL
    if isinstance(exc, OSError) and exc.errno is not None:
        import errno

        return f"error_{errno.errorcode.get(exc.errno, exc.errno)}"
    return f"error_{type(exc).__name__}"


class Recorder:
    """Every request's record, plus live totals for the progress line. Bounded in count."""

    def __init__(self, max_records: int = 2_000_000) -> None:
        self._lock = threading.Lock()
        self.records: list[RequestRecord] = []
        self.max_records = max_records
        self.ok = 0
        self.failed = 0
        self.dropped = 0  # past max_records: counted, not kept
        self.refused = 0
        self.h2_goaway_retries = 0
        self.examples: dict[str, str] = {}  # the first failure of each cause, with its error

    def add(self, rec: RequestRecord, detail: str = "") -> None:
        with self._lock:
            if rec.cause == OK:
                self.ok += 1
            else:
                self.failed += 1
                if rec.cause not in self.examples:
                    self.examples[rec.cause] = f"{rec.mode}: {detail}" if detail else rec.mode
                if rec.cause == REFUSED:
                    self.refused += 1
            if len(self.records) < self.max_records:
                self.records.append(rec)
            else:
                self.dropped += 1

    def note_goaway_retry(self) -> None:
        with self._lock:
            self.h2_goaway_retries += 1

    def count(self) -> int:
        with self._lock:
            return self.ok + self.failed


class Pacer:
    """Paces one thread to ``rate`` requests/s; a thread that fell behind does not burst."""

    def __init__(self, rate: float) -> None:
        self.period = 1.0 / rate if rate > 0 else 0.0
        self.next = time.perf_counter()

    def wait(self, stop: threading.Event) -> bool:
        now = time.perf_counter()
        if self.next > now:
            if stop.wait(self.next - now):
                return False
        elif now - self.next > 1.0:
            self.next = now  # a stall (a handover, a kill) must not turn into a burst after
        self.next += self.period
        return not stop.is_set()


class H1Client:
    """A blocking HTTP/1.1 client on one connection at a time (h11), reconnecting as needed."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.sock: socket.socket | None = None
        self.conn: h11.Connection | None = None
        self.local_port = 0
        self.conn_t = 0.0

    def connect(self) -> None:
        self.close()
        self.local_port = 0
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.local_port = self.sock.getsockname()[1]
        self.conn_t = time.time()
        self.conn = h11.Connection(h11.CLIENT)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = self.conn = None

    def request(self, path: str, close: bool = False,
                headers: list[tuple[str, str]] | None = None) -> tuple[int, dict[str, str], bytes]:
        if self.sock is None or self.conn is None:
            self.connect()
        assert self.sock is not None and self.conn is not None
        hdrs = [("host", "drill"), *(headers or [])]
        if close:
            hdrs.append(("connection", "close"))
        self.sock.sendall(self.conn.send(h11.Request(method="GET", target=path, headers=hdrs))
                          + self.conn.send(h11.EndOfMessage()))
        status, resp_headers, body = 0, {}, bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = self.sock.recv(RECV)
                if not data:
                    raise PeerClosed("connection closed before the whole response")
                self.conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
                resp_headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise PeerClosed("connection closed before the response")
        if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is h11.MUST_CLOSE:
            self.close()  # Connection: close (a draining proxy says so): reconnect next time
        else:
            self.conn.start_next_cycle()
        return status, resp_headers, bytes(body)


class H2Client:
    """h2c with prior knowledge, one stream at a time; honours GOAWAY as a client must."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.sock: socket.socket | None = None
        self.conn: object | None = None
        self.local_port = 0
        self.conn_t = 0.0
        self.goaway_last: int | None = None

    def connect(self) -> None:
        import h2.config
        import h2.connection

        self.close()
        self.local_port = 0
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.local_port = self.sock.getsockname()[1]
        self.conn_t = time.time()
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.state_machine = _goaway_tolerant_state_machine()
        conn.initiate_connection()
        self.sock.sendall(conn.data_to_send())
        self.conn = conn
        self.goaway_last = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = self.conn = None

    def request(self, path: str) -> tuple[int, bytes]:
        import h2.connection
        import h2.events

        if (self.sock is None or self.goaway_last is not None
                or not isinstance(self.conn, h2.connection.H2Connection)
                or self.conn.state_machine.state is h2.connection.ConnectionState.CLOSED):
            self.connect()  # after a GOAWAY, new streams go on a new connection
        assert self.sock is not None and isinstance(self.conn, h2.connection.H2Connection)
        conn = self.conn
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "GET"), (":path", path), (":scheme", "http"),
                                (":authority", "drill")], end_stream=True)
        self.sock.sendall(conn.data_to_send())
        status, body, ended = 0, bytearray(), False
        while not ended:
            data = self.sock.recv(RECV)
            if not data:
                if self.goaway_last is not None and sid > self.goaway_last:
                    self.close()
                    raise GoAwayRetry()
                raise PeerClosed("h2 connection closed before the stream ended")
            # Every event of the batch is seen, even after our stream ended: a GOAWAY behind
            # it must stop the next request from going out on this connection.
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    raise ConnectionResetError(f"h2 stream {sid} reset ({ev.error_code!r})")
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    self.goaway_last = ev.last_stream_id
                    if not ended and ev.last_stream_id is not None and sid > ev.last_stream_id:
                        self.close()
                        raise GoAwayRetry()
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    ended = True
            out = conn.data_to_send()
            if out:
                self.sock.sendall(out)
        return status, bytes(body)


def _goaway_tolerant_state_machine() -> h2.connection.H2ConnectionStateMachine:
    """h2's connection state machine, except that a received GOAWAY leaves it open.

    h2 closes the connection's state on a GOAWAY and then refuses the frames of the streams
    that GOAWAY lets finish (RFC 9113 6.8: streams up to last_stream_id complete; known in
    h2's users, e.g. encode/httpcore#46). A draining proxy does exactly that, so the drill's
    client would fail requests the proxy served. It sends no new stream after a GOAWAY.
    """
    from h2.connection import ConnectionInputs, ConnectionState, H2ConnectionStateMachine

    class GoAwayTolerant(H2ConnectionStateMachine):
        _transitions = {
            **H2ConnectionStateMachine._transitions,
            (ConnectionState.CLIENT_OPEN, ConnectionInputs.RECV_GOAWAY):
                (None, ConnectionState.CLIENT_OPEN),
        }

    return GoAwayTolerant()


@dataclass
class ThreadCtx:
    recorder: Recorder
    stop: threading.Event
    rate: float
    timeout: float


class LoadMode:
    """One kind of client. ``threads`` of them share ``share`` of the drill's rate."""

    name = ""
    threads = 2
    share = 1.0  # relative share of --rate
    fixed_rate: float | None = None  # requests/s regardless of --rate (the slow mode)
    through_http_listener = True  # counted by the HTTP listener's downstream_rq_total

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def probe(self, timeout: float) -> str | None:
        """None when the mode can run; else why it is skipped."""
        return None

    def run_thread(self, ctx: ThreadCtx) -> None:
        raise NotImplementedError

    def _record(self, ctx: ThreadCtx, client: H1Client | H2Client, t: float, started: float,
                cause: str, error: BaseException | None = None) -> None:
        ctx.recorder.add(RequestRecord(t, time.perf_counter() - started, self.name, cause,
                                       client.local_port, client.conn_t),
                         repr(error) if error is not None else "")


def _response_cause(status: int, body: bytes) -> str:
    if status != 200:
        return status_cause(status)
    return OK if body else "empty_body"


class Http1KeepAlive(LoadMode):
    name = "http1-keepalive"
    threads = 4
    share = 0.4
    path = "/"

    def run_thread(self, ctx: ThreadCtx) -> None:
        client = H1Client(self.host, self.port, ctx.timeout)
        pacer = Pacer(ctx.rate)
        try:
            while pacer.wait(ctx.stop):
                t, started = time.time(), time.perf_counter()
                err: BaseException | None = None
                try:
                    status, _, body = client.request(self.path)
                    cause = _response_cause(status, body)
                except (OSError, PeerClosed, h11.ProtocolError) as exc:
                    cause, err = classify_error(exc), exc
                self._record(ctx, client, t, started, cause, err)
                if cause != OK:
                    client.close()  # a failed connection is not reused
        finally:
            client.close()


class Http1New(LoadMode):
    name = "http1-new"
    threads = 2
    share = 0.25
    path = "/"

    def run_thread(self, ctx: ThreadCtx) -> None:
        client = H1Client(self.host, self.port, ctx.timeout)
        pacer = Pacer(ctx.rate)
        while pacer.wait(ctx.stop):
            t, started = time.time(), time.perf_counter()
            err: BaseException | None = None
            try:
                client.connect()
                status, _, body = client.request(self.path, close=True)
                cause = _response_cause(status, body)
            except (OSError, PeerClosed, h11.ProtocolError) as exc:
                cause, err = classify_error(exc), exc
            self._record(ctx, client, t, started, cause, err)
            client.close()


class Http1Slow(Http1New):
    """Requests answered after ``DELAY_MS``: some are always in flight when a drain begins.

    The delay is below the drill's default --drain-time-s, so each must complete.
    """

    name = "http1-slow"
    threads = 2
    fixed_rate = 2.0
    DELAY_MS = 600
    path = f"/delay?ms={DELAY_MS}"


class TcpStreams(LoadMode):
    """Short tcp_proxy streams: connect, ``PER_STREAM`` HTTP/1.1 requests, close."""

    name = "tcp"
    threads = 2
    share = 0.2
    through_http_listener = False
    PER_STREAM = 4

    def run_thread(self, ctx: ThreadCtx) -> None:
        client = H1Client(self.host, self.port, ctx.timeout)
        pacer = Pacer(ctx.rate)
        n = 0
        try:
            while pacer.wait(ctx.stop):
                n += 1
                last = n % self.PER_STREAM == 0
                t, started = time.time(), time.perf_counter()
                err: BaseException | None = None
                try:
                    status, _, body = client.request("/", close=last)
                    cause = _response_cause(status, body)
                except (OSError, PeerClosed, h11.ProtocolError) as exc:
                    cause, err = classify_error(exc), exc
                self._record(ctx, client, t, started, cause, err)
                if last or cause != OK:
                    client.close()
        finally:
            client.close()


class H2c(LoadMode):
    name = "h2"
    threads = 2
    share = 0.15

    def probe(self, timeout: float) -> str | None:
        """Send the h2 preface and SETTINGS; a SETTINGS frame back means h2c is spoken."""
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as s:
                s.sendall(preface)
                head = b""
                while len(head) < 9:
                    chunk = s.recv(9 - len(head))
                    if not chunk:
                        break
                    head += chunk
        except OSError as exc:
            return f"h2c probe failed: {exc!r}"
        if len(head) == 9 and head[3] == 0x04:
            return None
        shown = head[:40].decode("latin-1", "replace") or "nothing"
        return f"the proxy does not speak h2c (prior knowledge) on port {self.port} yet: " \
               f"it answered {shown!r}"

    def run_thread(self, ctx: ThreadCtx) -> None:
        client = H2Client(self.host, self.port, ctx.timeout)
        pacer = Pacer(ctx.rate)
        try:
            while pacer.wait(ctx.stop):
                t, started = time.time(), time.perf_counter()
                err: BaseException | None = None
                cause = ""
                for _ in range(3):  # GOAWAY'd streams were not processed: send them again
                    try:
                        status, body = client.request("/")
                        cause = _response_cause(status, body)
                    except GoAwayRetry:
                        ctx.recorder.note_goaway_retry()
                        continue
                    except (OSError, PeerClosed, h11.ProtocolError) as exc:
                        cause, err = classify_error(exc), exc
                    except Exception as exc:  # h2's own protocol errors
                        cause, err = f"{PROTOCOL}:{type(exc).__name__}", exc
                    break
                self._record(ctx, client, t, started, cause or "goaway_retries_exhausted", err)
                if cause != OK:
                    client.close()
        finally:
            client.close()


MODES: dict[str, type[LoadMode]] = {
    m.name: m for m in (Http1KeepAlive, Http1New, Http1Slow, TcpStreams, H2c)
}
DEFAULT_MODES = ("http1-keepalive", "http1-new", "http1-slow", "tcp", "h2")


@dataclass
class LoadGenerator:
    """Starts the modes' threads; ``stop()`` ends them. Bounded by ``max_seconds`` too."""

    modes: list[LoadMode]
    rate: float
    max_seconds: float
    timeout: float = 10.0
    recorder: Recorder = field(default_factory=Recorder)
    skipped: dict[str, str] = field(default_factory=dict)
    stop_event: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    t_start: float = 0.0
    t_stop: float = 0.0

    def probe(self, log: Callable[[str], None]) -> None:
        for m in list(self.modes):
            why = m.probe(min(self.timeout, 3.0))
            if why is not None:
                self.skipped[m.name] = why
                self.modes.remove(m)
                log(f"load mode {m.name} skipped: {why}")

    def start(self) -> None:
        shares = sum(m.share for m in self.modes if m.fixed_rate is None) or 1.0
        self.t_start = time.time()
        for m in self.modes:
            mode_rate = m.fixed_rate if m.fixed_rate is not None else self.rate * m.share / shares
            ctx = ThreadCtx(self.recorder, self.stop_event, mode_rate / m.threads, self.timeout)
            for i in range(m.threads):
                t = threading.Thread(target=m.run_thread, args=(ctx,), daemon=True,
                                     name=f"drill-{m.name}-{i}")
                t.start()
                self._threads.append(t)
        # The bound of last resort: whatever the scenario does, the load ends by itself.
        timer = threading.Timer(self.max_seconds, self.stop_event.set)
        timer.daemon = True
        timer.start()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        self.t_stop = time.time()
