"""The HTTP connection manager (``envoy.filters.network.http_connection_manager``), HTTP/1.1.

One ``HttpConnection`` per downstream connection reads requests with the codec, runs each
as an ``ActiveStream`` through the HTTP filters (router last) and writes the responses.

Theory of operation:
1. Between requests the connection is idle: the wait for the next request's first byte
   is bounded by the idle timeout (Envoy's 1 h default) and cancelled by a drain. From the
   first byte, ``request_headers_timeout`` bounds the head (408).
2. The request is mutated as Envoy's ConnectionManagerUtility does (x-request-id,
   x-forwarded-for/-proto, the downstream remote address from XFF), routed once, and handed
   to the filters. A bodiless request is served without spawning a task; a request with a
   body runs in a per-stream nursery so its body can go up while the response comes down.
3. Responses are encoded into a buffer and written by ``flush()``, so a response that fits
   one upstream read leaves in one downstream write. Every response gets Envoy's ``date``
   and ``server`` headers; ``Connection: close`` is added when draining, when
   max_requests_per_connection is reached, or when the request was not read in full.
4. Malformed requests get the codec's status (400, 413, 431, 501...) with flag DPE and the
   connection closes after the reply; neighbours on other connections see nothing.
5. Every stream, however it ends, is access-logged once and counted once.
"""

from __future__ import annotations

import logging
import random
import time
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

import trio

from proxy.http.codec.events import (
    CodecError,
    ConnectionClosed,
    Data,
    EndOfStream,
    RequestHeaders,
    Trailers,
)
from proxy.http.codec.h1_fast import Http1ServerCodec
from proxy.http.codec.h2 import H2_PREFACE
from proxy.http.conn_manager_config import CODEC_AUTO, SERVER_APPEND_IF_ABSENT, SERVER_OVERWRITE
from proxy.http.filter_manager import FilterManager
from proxy.http.grpc import http_to_grpc_status, is_grpc_request, percent_encode
from proxy.http.headers import HeaderMap
from proxy.stream_info import LOCAL_REPLIES, Outcome, ResponseFlag, StreamInfo

if TYPE_CHECKING:
    from proxy.http.conn_manager_config import HcmStats, HttpConnectionManagerConfig
    from proxy.network.connection import Connection
    from proxy.server.worker_context import WorkerContext

log = logging.getLogger("trioxy.http")

_RECV = 65536
# While draining, a keep-alive connection with no request in flight is closed once it has
# been idle this long: long enough that a client busy on it sends its next request first
# (and gets Connection: close on the response), short enough to empty the epoch quickly.
DRAIN_IDLE_GRACE_S = 1.0
_date_cache: list[Any] = [0, ""]


def http_date() -> str:
    """The ``date`` header, formatted once per second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True)
    return _date_cache[1]


_rid_rng = random.Random()
_UUID4_BITS = (0x4 << 76) | (0x8 << 60)  # version 4, RFC 4122 variant
_UUID4_MASK = ~((0xF << 76) | (0xC << 60)) & ((1 << 128) - 1)


def request_id() -> str:
    """A random UUID4 string (what Envoy's UUID request IDs look like), at a fifth of
    ``str(uuid.uuid4())``'s cost: ids need to be unique, not unpredictable."""
    h = "%032x" % ((_rid_rng.getrandbits(128) & _UUID4_MASK) | _UUID4_BITS)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class StreamReset(Exception):
    """The downstream went away (or the stream was reset): unwind the stream."""


class HttpConnection:
    __slots__ = (
        "config", "conn", "worker", "codec", "stats", "out", "close_after", "abort",
        "requests", "peer_eof", "idle_close", "idle_since", "idle_timer", "h2_preface",
    )

    def __init__(self, config: HttpConnectionManagerConfig, conn: Connection, worker: WorkerContext):
        self.config = config
        self.conn = conn
        self.worker = worker
        self.codec = Http1ServerCodec(
            max_request_headers_kb=config.max_request_headers_kb,
            max_headers_count=config.max_headers_count,
            scheme="https" if conn.tls else "http",
        )
        self.stats: HcmStats = config.stats(worker.stats)
        self.out = bytearray()
        self.close_after = False  # close once the current response is out
        self.abort = False  # close with RST (a reset stream)
        self.requests = 0
        self.peer_eof = False
        self.idle_close: str | None = None  # why the idle wait was ended from outside
        self.idle_since = 0.0
        self.idle_timer: Any = None
        self.h2_preface: bytes | None = None  # AUTO codec: the client spoke HTTP/2

    # -- connection loop ------------------------------------------------------------------
    async def run(self) -> None:
        stats = self.stats
        stats.cx_total.inc()
        if self.config.codec_type != CODEC_AUTO:
            stats.cx_http1_total.inc()  # AUTO counts once the first bytes decided
        stats.cx_active.inc()
        started = time.monotonic()
        try:
            deadline = self.config.max_connection_duration
            with trio.CancelScope(
                deadline=trio.current_time() + deadline if deadline else float("inf")
            ):
                await self._serve()
                if self.h2_preface is not None:
                    from proxy.http.conn_manager_h2 import Http2Connection

                    await Http2Connection(self.config, self.conn, self.worker).serve(
                        self.h2_preface)
        except StreamReset:
            pass
        finally:
            stats.cx_active.dec()
            stats.cx_destroy.inc()
            stats.cx_length_ms.record((time.monotonic() - started) * 1000)
            with trio.CancelScope(shield=True):
                await self._close()

    async def _serve(self) -> None:
        codec = self.codec
        config = self.config
        while True:
            try:
                ev = codec.next_event()
                if ev is None:
                    ev = await self._wait_request()
                    if ev is None:
                        return
                if type(ev) is not RequestHeaders:
                    return  # EOF between requests (ConnectionClosed)
            except CodecError as exc:
                await self._protocol_error(exc)
                return
            self.requests += 1
            stream = ActiveStream(self, ev)  # type: ignore[arg-type]
            await stream.run()
            if self.abort or self.close_after:
                return
            if (
                config.max_requests_per_connection is not None
                and self.requests >= config.max_requests_per_connection
            ):
                return
            try:
                if not codec.start_next_cycle():
                    return
            except CodecError as exc:
                await self._protocol_error(exc)
                return

    async def _wait_request(self) -> Any:
        """Read until the next request's headers; None when the connection should close."""
        codec = self.codec
        config = self.config
        worker = self.worker
        conn = self.conn
        # Idle: nothing of a next request yet. The idle timeout (a worker timer, see
        # timer_wheel) and a drain end the wait through close_idle().
        idle_timeout = config.idle_timeout
        if worker.drain.draining:
            # The last response did not say Connection: close (a gradual drain said "not
            # yet"): the client may be sending its next request right now. Closing at once
            # would race it; a short grace does not.
            idle_timeout = min(idle_timeout or DRAIN_IDLE_GRACE_S, DRAIN_IDLE_GRACE_S)
        self.idle_since = trio.current_time()
        self.idle_timer = None
        if idle_timeout is not None:
            self.idle_timer = worker.timers.call_later(idle_timeout, self._on_idle_timeout)
        worker.idle_connections.add(self)
        try:
            # After a response the client has yet to see it: nothing to read yet.
            data = await conn.receive_some(_RECV, wait_first=self.requests > 0)
        except trio.ClosedResourceError:
            if self.idle_close is None:
                raise
            if self.idle_close == "drain":
                self.stats.cx_drain_close.inc()
            else:
                self.stats.cx_idle_timeout.inc()
            return None
        finally:
            worker.idle_connections.discard(self)
            if self.idle_timer is not None:
                self.idle_timer.cancel()
                self.idle_timer = None
        if self.requests == 0:
            data = await self._sniff(data)
            if data is None:
                return None
        codec.receive_data(data)
        if not data:
            return None
        ev = codec.next_event()
        if ev is not None:
            return ev
        timeout = config.request_headers_timeout
        with trio.move_on_after(timeout if timeout is not None else float("inf")) as scope:
            while ev is None:
                data = await conn.receive_some(_RECV)
                codec.receive_data(data)
                ev = codec.next_event()
        if scope.cancelled_caught:
            self.stats.rq_header_timeout.inc()
            info = self._connection_stream_info()
            info.apply_local_reply(LOCAL_REPLIES[Outcome.REQUEST_HEADERS_TIMEOUT])
            reply = LOCAL_REPLIES[Outcome.REQUEST_HEADERS_TIMEOUT]
            await self._raw_reply(reply.status, reply.body.encode(), info)
            return None
        return ev

    async def _sniff(self, data: bytes) -> bytes | None:
        """The connection's first bytes: HTTP/1.x, or (codec AUTO) the HTTP/2 connection
        preface of a prior-knowledge h2c client, which hands the connection to
        ``Http2Connection`` (None is returned and ``h2_preface`` holds the bytes)."""
        if self.config.codec_type == CODEC_AUTO:
            if data[:1] == b"P":
                with trio.move_on_after(self.config.request_headers_timeout or 10.0):
                    while data and len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):
                        more = await self.conn.receive_some(_RECV)
                        if not more:
                            break
                        data += more
                if data.startswith(H2_PREFACE):
                    self.h2_preface = data
                    return None
            if data:
                self.stats.cx_http1_total.inc()
        return data

    def _on_idle_timeout(self) -> None:
        self.close_idle("drain" if self.worker.drain.draining else "idle_timeout")

    def on_drain(self) -> None:
        """Draining began while we wait idle: close once idle for the drain grace."""
        remaining = DRAIN_IDLE_GRACE_S - (trio.current_time() - self.idle_since)
        if remaining <= 0:
            self.close_idle("drain")
            return
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.idle_timer = self.worker.timers.call_later(remaining, self._on_idle_timeout)

    def close_idle(self, reason: str) -> None:
        """Wake the idle wait so the connection closes (idle timeout or drain)."""
        if self.idle_close is None:
            self.idle_close = reason
            trio.lowlevel.notify_closing(self.conn.raw)

    async def _protocol_error(self, exc: CodecError) -> None:
        """A request we cannot parse: the codec's status, flag DPE, then close."""
        self.stats.cx_protocol_error.inc()
        info = self._connection_stream_info()
        info.set_response_flag(ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR)
        info.response_code_details = exc.details
        body = LOCAL_REPLIES[Outcome.DOWNSTREAM_PROTOCOL_ERROR].body.encode()
        if exc.status == 431:
            body = LOCAL_REPLIES[Outcome.REQUEST_HEADERS_TOO_LARGE].body.encode()
        await self._raw_reply(exc.status, body, info)

    async def _raw_reply(self, status: int, body: bytes, info: StreamInfo) -> None:
        """A reply outside any stream (the request never parsed): always closes."""
        self.close_after = True
        info.response_code = status
        info.bytes_sent = len(body)
        info.protocol = "HTTP/1.1"
        if not self.codec.response_started:
            data = Http1ServerCodec.error_response(status, body)
            try:
                await self.conn.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                info.set_response_flag(ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION)
        self.stats.on_response_code(status)
        info.on_complete()
        if info.response_flags:
            self.stats.on_response_flags(info.response_flags)
        for access_log in self.config.access_logs:
            access_log.log(info)

    def _connection_stream_info(self) -> StreamInfo:
        c = self.conn.stream_info
        return StreamInfo(
            downstream_local_address=c.downstream_local_address,
            downstream_remote_address=c.downstream_remote_address,
            downstream_direct_remote_address=c.downstream_direct_remote_address,
            requested_server_name=c.requested_server_name,
            downstream_ssl=c.downstream_ssl,
            connection_id=c.connection_id,
        )

    async def flush(self) -> None:
        if self.out:
            data = bytes(self.out)
            self.out.clear()
            try:
                await self.conn.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise StreamReset("downstream write failed") from None

    async def _close(self) -> None:
        conn = self.conn
        if conn.closed:
            return
        if self.abort:
            conn.abort()
            return
        if self.idle_close is not None:
            await conn.aclose()  # nothing in flight, nothing to flush
            return
        try:
            if self.out:
                with trio.move_on_after(1.0):
                    await conn.send_all(bytes(self.out))
            # Envoy's delayed close: half-close, then let the client read the response and
            # close first, so unread request bytes do not turn our FIN into an RST.
            await conn.send_eof()
            delay = self.config.delayed_close_timeout
            if delay and not self.peer_eof:
                with trio.move_on_after(delay):
                    while await conn.receive_some(_RECV):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        await conn.aclose()


class ActiveStream:
    """One request/response exchange; the callbacks every HTTP filter talks to."""

    __slots__ = (
        "hc", "config", "worker", "codec", "request_headers", "end_stream", "stream_info",
        "route", "filters", "fm", "nursery", "response_started", "response_complete",
        "request_complete", "hcm_stats", "source_ip", "expect_continue", "_read_scope",
    )

    # H2ActiveStream (conn_manager_h2.py) says True: it reuses run() and sink_headers(),
    # which test this class attribute where the protocols part (HTTP/1 pays no extra call).
    multiplexed = False

    def __init__(self, hc: HttpConnection, ev: RequestHeaders) -> None:
        self.hc = hc
        self.config = hc.config
        self.worker = hc.worker
        self.codec = hc.codec
        self.hcm_stats = hc.stats
        self.request_headers = ev.headers
        self.end_stream = ev.end_stream
        self.expect_continue = ev.expect_continue
        c = hc.conn.stream_info
        self.stream_info = StreamInfo(
            protocol="HTTP/1.0" if ev.http_version == "1.0" else "HTTP/1.1",
            downstream_local_address=c.downstream_local_address,
            downstream_remote_address=c.downstream_remote_address,
            downstream_direct_remote_address=c.downstream_direct_remote_address,
            requested_server_name=c.requested_server_name,
            downstream_ssl=c.downstream_ssl,
            connection_id=c.connection_id,
            request_headers=ev.headers,
        )
        self.source_ip = hc.conn.remote_address[0]
        self.route: Any = None
        self.nursery: trio.Nursery | None = None
        self.response_started = False
        self.response_complete = False
        self.request_complete = ev.end_stream
        self._read_scope: trio.CancelScope | None = None

    # -- the stream -----------------------------------------------------------------------
    async def run(self) -> None:
        stats = self.hcm_stats
        stats.rq_total.inc()
        if self.multiplexed:
            stats.rq_http2_total.inc()
        else:
            stats.rq_http1_total.inc()
        stats.rq_active.inc()
        info = self.stream_info
        headers = self.request_headers
        self._mutate_request_headers(headers)
        self.route = self.config.route_table.route(headers)
        if self.route is not None:
            info.route_name = self.route.name or None
        decoders: list[Any] = []
        encoders: list[Any] = []
        for factory in self.config.filter_factories:
            f = factory.create_filter(self)
            if hasattr(f, "decode_headers"):
                decoders.append(f)
            if hasattr(f, "encode_headers"):
                encoders.append(f)
        encoders.reverse()
        self.fm = fm = FilterManager(decoders, encoders, self)
        try:
            await self._run_filters(headers)
        except* StreamReset:
            self._on_stream_reset()
        except* CodecError as group:
            # A malformed body: the head was fine, so this is a stream error.
            await self._body_protocol_error(group.exceptions[0])  # type: ignore[arg-type]
        finally:
            fm.on_destroy()
            if not self.request_complete:
                self.hc.close_after = True
            stats.rq_active.dec()
            info.on_complete()
            if not info.health_check:
                # Envoy's chargeStats: health checks would drown the real traffic's numbers.
                stats.rq_completed.inc()
                if info.response_code:
                    stats.on_response_code(info.response_code)
            stats.rq_time_ms.record((info.end_monotonic - info.start_monotonic) * 1000)  # type: ignore[operator]
            if info.response_flags:
                stats.on_response_flags(info.response_flags)
            for access_log in self.config.access_logs:
                access_log.log(info)

    def _on_stream_reset(self) -> None:
        """The downstream went away mid-stream (``StreamReset``)."""
        self.hc.abort = True
        self.stream_info.set_response_flag(ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION)
        self.hcm_stats.rq_rx_reset.inc()

    async def _run_filters(self, headers: HeaderMap) -> None:
        fm = self.fm
        if self.end_stream:
            await fm.decode_headers(headers, True)
        else:
            if self.expect_continue:
                # Envoy answers 100-continue itself (proxy_100_continue off).
                self.hc.out += self.codec.send_continue()
                await self.flush()
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                await fm.decode_headers(headers, False)
                await self._decode_body()
        if not self.response_complete and not self.hc.abort:
            # The filters ended without a full response: nothing more can come.
            await self.send_outcome(Outcome.UPSTREAM_RESET_BEFORE_RESPONSE)

    async def _body_protocol_error(self, exc: CodecError) -> None:
        info = self.stream_info
        info.set_response_flag(ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR)
        info.response_code_details = exc.details
        self.hc.close_after = True
        if self.response_started:
            self.hc.abort = True
            return
        reply = LOCAL_REPLIES[Outcome.DOWNSTREAM_PROTOCOL_ERROR]
        try:
            await self.send_local_reply(exc.status, reply.body.encode(), exc.details)
        except StreamReset:
            self.hc.abort = True

    async def _decode_body(self) -> None:
        hc = self.hc
        codec = self.codec
        conn = hc.conn
        info = self.stream_info
        fm = self.fm
        idle = self.config.stream_idle_timeout
        overall = self.config.request_timeout
        with trio.CancelScope() as scope:
            self._read_scope = scope
            if overall is not None:
                scope.deadline = trio.current_time() + overall
            while True:
                ev = codec.next_event()
                while ev is None:
                    with trio.move_on_after(idle if idle is not None else float("inf")) as w:
                        data = await conn.receive_some(_RECV)
                    if w.cancelled_caught:
                        await self._request_timeout(Outcome.STREAM_IDLE_TIMEOUT)
                        return
                    codec.receive_data(data)
                    ev = codec.next_event()
                t = type(ev)
                if t is Data:
                    info.bytes_received += len(ev.data)  # type: ignore[union-attr]
                    await fm.decode_data(ev.data, False)  # type: ignore[union-attr]
                elif t is EndOfStream:
                    self.request_complete = True
                    info.last_downstream_rx_byte = time.monotonic()
                    await fm.decode_data(b"", True)
                    return
                elif t is Trailers:
                    self.request_complete = True
                    info.last_downstream_rx_byte = time.monotonic()
                    await fm.decode_trailers(ev.trailers)  # type: ignore[union-attr]
                    return
                elif t is ConnectionClosed:
                    hc.peer_eof = True
                    raise StreamReset("downstream closed mid-request")
                else:
                    return
        if scope.cancelled_caught and not self.response_complete:
            await self._request_timeout(Outcome.REQUEST_OVERALL_TIMEOUT)

    async def _request_timeout(self, outcome: Outcome) -> None:
        stats = self.hcm_stats
        if outcome is Outcome.STREAM_IDLE_TIMEOUT:
            stats.rq_idle_timeout.inc()
        else:
            stats.rq_timeout.inc()
        self.hc.close_after = True
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()  # the upstream side stops too
        if self.response_started:
            self.stream_info.set_response_flag(LOCAL_REPLIES[outcome].flag)
            self.hc.abort = True
        else:
            await self.send_outcome(outcome)

    def _mutate_request_headers(self, headers: HeaderMap) -> None:
        """Envoy's ConnectionManagerUtility::mutateRequestHeaders, for what we support."""
        config = self.config
        info = self.stream_info
        peer = self.source_ip
        xff = headers.get("x-forwarded-for")
        if config.use_remote_address:
            if not config.skip_xff_append:
                headers.append_value("x-forwarded-for", peer)
            headers.set("x-forwarded-proto", "https" if self.hc.conn.tls else "http")
        else:
            if xff is not None:
                # The client is the entry xff_num_trusted_hops from the right.
                entries = [e.strip() for e in xff.split(",")]
                idx = len(entries) - 1 - config.xff_num_trusted_hops
                if idx >= 0 and entries[idx]:
                    info.downstream_remote_address = entries[idx]
                    self.source_ip = entries[idx]
            if "x-forwarded-proto" not in headers:
                headers.add("x-forwarded-proto", "https" if self.hc.conn.tls else "http")
        if config.generate_request_id:
            rid = headers.get("x-request-id")
            if rid is None or (config.use_remote_address and not config.preserve_external_request_id):
                headers.set("x-request-id", request_id())
        if config.via:
            headers.append_value("via", config.via, ", ")

    # -- callbacks for filters ------------------------------------------------------------
    def start_task(self, fn: Any, *args: Any) -> None:
        assert self.nursery is not None, "start_task needs a request with a body"
        self.nursery.start_soon(fn, *args)

    async def send_outcome(self, outcome: Outcome,
                           headers: tuple[tuple[str, str], ...] = ()) -> None:
        reply = LOCAL_REPLIES[outcome]
        self.stream_info.apply_local_reply(reply)
        await self.send_local_reply(reply.status, reply.body.encode(), reply.details,
                                    headers=headers)

    async def send_local_reply(
        self, status: int, body: bytes, details: str, *, location: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """``headers`` are added to the reply (Envoy's modify_headers callback, e.g. the
        router's ``x-envoy-overloaded``)."""
        info = self.stream_info
        if self.response_started:
            # Too late for a reply: the client already has part of another response.
            self.reset_stream(details)
            return
        info.response_code_details = details
        if is_grpc_request(self.request_headers):
            # Envoy's Utility::sendLocalReply for gRPC: a trailers-only response, the
            # status mapped to grpc-status and the body text as grpc-message.
            grpc_headers = HeaderMap([
                (":status", "200"), ("content-type", "application/grpc"),
                ("grpc-status", str(http_to_grpc_status(status))),
            ])
            if body:
                grpc_headers.add("grpc-message", percent_encode(body.decode("utf-8", "replace")))
            for name, value in headers:
                grpc_headers.add(name, value)
            await self.fm.encode_headers(grpc_headers, True)
            await self.flush()
            return
        reply_headers = HeaderMap([(":status", str(status))])
        if location is not None:
            reply_headers.add("location", location)
        if body:
            reply_headers.add("content-length", str(len(body)))
            reply_headers.add("content-type", "text/plain")
        for name, value in headers:
            reply_headers.add(name, value)
        await self.fm.encode_headers(reply_headers, not body)
        if body:
            await self.fm.encode_data(body, True)
        await self.flush()

    def reset_stream(self, details: str) -> None:
        """Abandon the stream: the downstream connection closes with RST."""
        if self.stream_info.connection_termination_details is None:
            self.stream_info.connection_termination_details = details
        self.hc.abort = True
        self.response_complete = True
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()
        self.hcm_stats.rq_tx_reset.inc()

    async def encode_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        await self.fm.encode_headers(headers, end_stream)

    async def encode_data(self, data: bytes, end_stream: bool) -> None:
        await self.fm.encode_data(data, end_stream)

    async def encode_trailers(self, trailers: HeaderMap) -> None:
        await self.fm.encode_trailers(trailers)

    async def flush(self) -> None:
        await self.hc.flush()
        if self.response_complete and self.stream_info.last_downstream_tx_byte is None:
            self.stream_info.last_downstream_tx_byte = time.monotonic()
        if self.response_complete and not self.request_complete and self._read_scope is not None:
            # The response is out before the request was read in full: stop reading it
            # (Envoy closes such HTTP/1.1 connections rather than draining the body).
            self._read_scope.cancel()

    # -- the encoder chain's sink ---------------------------------------------------------
    def sink_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        config = self.config
        info = self.stream_info
        hc = self.hc
        self.response_started = True
        try:
            info.response_code = int(headers.get(":status") or 0)
        except ValueError:
            info.response_code = 0
        info.response_headers = headers
        route = self.route
        if route is not None:
            route.finalize_response_headers(headers, info)
        headers.set("date", http_date())
        transform = config.server_header_transformation
        if transform == SERVER_OVERWRITE:
            headers.set("server", config.server_name)
        elif transform == SERVER_APPEND_IF_ABSENT:
            headers.set_default("server", config.server_name)
        if config.via:
            headers.append_value("via", config.via, ", ")
        if config.always_set_request_id_in_response:
            rid = self.request_headers.get("x-request-id")
            if rid is not None:
                headers.set("x-request-id", rid)
        if self.multiplexed:
            self._send_response_headers(headers, end_stream)
            return
        close = hc.close_after or not self.request_complete and not self.codec.request_complete
        if not close and self.worker.drain.drain_close():
            close = True
            self.hcm_stats.cx_drain_close.inc()
        mrq = config.max_requests_per_connection
        if not close and mrq is not None and hc.requests >= mrq:
            close = True
        if close:
            hc.close_after = True
        hc.out += self.codec.send_headers(headers, end_stream, close=close)
        if end_stream:
            self.response_complete = True

    def sink_data(self, data: bytes, end_stream: bool) -> None:
        self.stream_info.bytes_sent += len(data)
        self.hc.out += self.codec.send_data(data, end_stream)
        if end_stream:
            self.response_complete = True

    def sink_trailers(self, trailers: HeaderMap) -> None:
        self.stream_info.response_trailers = trailers
        self.hc.out += self.codec.send_trailers(trailers)
        self.response_complete = True
