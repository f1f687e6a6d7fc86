"""Envoy's admin API served by the epoch's main process (Envoy's ``AdminImpl``).

Theory of operation:
1. The admin listener is bound by the main process from ``admin.address`` (or handed over
   by the previous epoch, like every listener). It is served here, never by a worker: the
   answers come from the main process's view (shared-memory stats summed over every
   process, worker state fetched over the control channel).
2. One trio task per admin connection, HTTP/1.1 with keep-alive (h11, the reference codec:
   admin traffic is small, correctness matters more than speed). Every connection has a
   header deadline and a body limit, and at most ``MAX_CONNECTIONS`` are served at once (the
   rest wait in the kernel's accept queue), so a slow or huge admin request cannot stall the
   main loop or exhaust its memory.
3. Handlers are registered under a path with their help line, their query parameters and
   whether they change state (those require POST: 405 otherwise, as Envoy). An unknown path
   gets 404 with the help list; an unknown query parameter gets 400 naming it.
4. Each admin request is access-logged through ``admin.access_log`` like a proxied request.
"""

from __future__ import annotations

import errno
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import h11
import trio

from proxy.http.headers import HeaderMap
from proxy.stream_info import StreamInfo

log = logging.getLogger("trioxy.admin")

MAX_CONNECTIONS = 64
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 60.0
SEND_TIMEOUT_S = 30.0


class BadRequest(Exception):
    """A handler's 400: the message is the body."""


@dataclass(frozen=True, slots=True)
class AdminRequest:
    method: str
    path: str  # without the query string
    query: dict[str, str]  # Envoy's flag parameters (``?usedonly``) map to ""
    headers: HeaderMap
    body: bytes = b""

    def flag(self, name: str) -> bool:
        return name in self.query

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.query.get(name, default)

    def choice(self, name: str, allowed: Sequence[str], default: str) -> str:
        value = self.query.get(name, default)
        if value not in allowed:
            raise BadRequest(f"{name}={value!r} is not one of {', '.join(allowed)}")
        return value


@dataclass(slots=True)
class AdminResponse:
    status: int = 200
    body: bytes | str = b""
    content_type: str = "text/plain; charset=UTF-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    def body_bytes(self) -> bytes:
        return self.body.encode() if isinstance(self.body, str) else self.body


HandlerFn = Callable[[AdminRequest], Awaitable[AdminResponse]]


@dataclass(frozen=True, slots=True)
class Handler:
    path: str
    help: str
    fn: HandlerFn
    mutates: bool = False  # POST only
    params: tuple[str, ...] = ()


def parse_query(raw: str) -> dict[str, str]:
    """Envoy's query parsing: ``a=1&flag`` -> {"a": "1", "flag": ""}; a repeated key keeps
    its first value; ``+`` and %-escapes decoded."""
    out: dict[str, str] = {}
    for part in raw.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        key = urllib.parse.unquote_plus(key)
        out.setdefault(key, urllib.parse.unquote_plus(value))
    return out


class Admin:
    """The handler table and the server loop."""

    def __init__(self, access_logs: Sequence[Any] = ()) -> None:
        self.handlers: dict[str, Handler] = {}
        self.access_logs = tuple(access_logs)
        self.add(Handler("/", "Admin home page", self._home))
        self.add(Handler("/help", "print out list of admin commands", self._help))
        self.requests_served = 0
        self._accepting = trio.CancelScope()

    def add(self, handler: Handler) -> None:
        if handler.path in self.handlers:
            raise ValueError(f"admin path {handler.path} registered twice")
        self.handlers[handler.path] = handler

    def help_text(self) -> str:
        lines = ["admin commands are:"]
        for path in sorted(self.handlers):
            h = self.handlers[path]
            lines.append(f"  {path}{' (POST)' if h.mutates else ''}: {h.help}")
            lines.extend(f"      {p}" for p in h.params if p != "*")
        return "\n".join(lines) + "\n"

    async def _home(self, req: AdminRequest) -> AdminResponse:
        return AdminResponse(200, self.help_text())

    async def _help(self, req: AdminRequest) -> AdminResponse:
        return AdminResponse(200, self.help_text())

    # -- dispatch (no I/O: tests drive it directly) ----------------------------------------
    async def dispatch(self, req: AdminRequest) -> AdminResponse:
        handler = self.handlers.get(req.path)
        if handler is None:
            return AdminResponse(404, "invalid path. " + self.help_text())
        if handler.mutates and req.method != "POST":
            return AdminResponse(
                405, f"{req.path} changes state: use POST (curl -X POST)\n",
                headers=[("allow", "POST")])
        if req.method not in ("GET", "HEAD", "POST"):
            return AdminResponse(405, f"method {req.method} is not allowed\n",
                                 headers=[("allow", "GET, HEAD, POST")])
        known = {p.split("=", 1)[0].split(":", 1)[0] for p in handler.params}
        unknown = sorted(set(req.query) - known)
        if unknown and "*" not in known:
            return AdminResponse(
                400, f"unknown query parameter {unknown[0]!r} for {req.path}"
                f" (known: {', '.join(sorted(known)) or 'none'})\n")
        try:
            return await handler.fn(req)
        except BadRequest as exc:
            return AdminResponse(400, f"{exc}\n")
        except Exception:
            log.exception("admin handler %s failed", req.path)
            return AdminResponse(500, f"{req.path} failed; see the epoch's log\n")

    # -- the server ------------------------------------------------------------------------
    async def serve(self, listener: trio.socket.SocketType,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and serve until cancelled; at most MAX_CONNECTIONS at once."""
        limit = trio.Semaphore(MAX_CONNECTIONS)
        async with trio.open_nursery() as nursery:
            task_status.started()
            with self._accepting:
                await self._accept_loop(listener, nursery, limit)

    def stop_accepting(self) -> None:
        """Stop taking connections (the next epoch took the admin socket); the requests
        in flight finish."""
        self._accepting.cancel()

    async def _accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery,
                           limit: trio.Semaphore) -> None:
        while True:
            await limit.acquire()
            try:
                sock, _ = await listener.accept()
            except OSError as exc:
                limit.release()
                if exc.errno in (errno.EINVAL, errno.EBADF):  # the socket was shut down
                    log.info("admin listener closed")
                    return
                log.warning("admin accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            except BaseException:
                limit.release()
                raise
            nursery.start_soon(self._serve_connection, sock, limit)

    async def _serve_connection(self, sock: trio.socket.SocketType, limit: trio.Semaphore) -> None:
        stream = trio.SocketStream(sock)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            peer = sock.getpeername()
            local = sock.getsockname()
            while True:
                req = await self._read_request(stream, conn, IDLE_TIMEOUT_S)
                if req is None:
                    return
                info = StreamInfo(
                    protocol="HTTP/1.1",
                    downstream_remote_address=_fmt(peer),
                    downstream_direct_remote_address=_fmt(peer),
                    downstream_local_address=_fmt(local),
                )
                if isinstance(req, AdminResponse):
                    resp = req
                    keep = False
                else:
                    info.request_headers = req.headers
                    info.bytes_received = len(req.body)
                    resp = await self.dispatch(req)
                    keep = conn.our_state is h11.SEND_RESPONSE and conn.their_state is h11.DONE
                    self.requests_served += 1
                await self._send_response(stream, conn, resp, keep,
                                          head=not isinstance(req, AdminResponse)
                                          and req.method == "HEAD")
                info.response_code = resp.status
                info.bytes_sent = len(resp.body_bytes())
                info.end_monotonic = time.monotonic()
                for al in self.access_logs:
                    al.log(info)
                if not keep or conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                h11.LocalProtocolError):
            pass
        finally:
            limit.release()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1):
                    await stream.aclose()

    async def _read_request(self, stream: trio.SocketStream, conn: h11.Connection,
                            idle_s: float) -> AdminRequest | AdminResponse | None:
        """The next request, a ready-made error response, or None (the peer is gone or
        stayed idle). The header deadline runs from the request's first byte: a client
        that trickles bytes cannot hold a connection slot forever."""
        head: h11.Request | None = None
        body = bytearray()
        deadline = trio.current_time() + idle_s
        started = False
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                return AdminResponse(exc.error_status_hint, f"bad request: {exc}\n")
            if event is h11.NEED_DATA:
                data = None
                with trio.move_on_at(deadline):
                    data = await stream.receive_some(65536)
                if data is None:
                    if not started:
                        return None  # an idle keep-alive connection: close quietly
                    return AdminResponse(408, "request timeout\n")
                if not started and data:
                    started = True
                    deadline = trio.current_time() + HEADER_TIMEOUT_S
                conn.receive_data(data)  # b"": the peer closed
                continue
            if isinstance(event, h11.Request):
                head = event
                size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                if size > MAX_HEADER_BYTES:  # (h11 checks only what arrives incomplete)
                    return AdminResponse(431, "request header block too large\n")
                deadline = trio.current_time() + BODY_TIMEOUT_S
                length = dict(event.headers).get(b"content-length")
                if length is not None and int(length) > MAX_BODY_BYTES:
                    return AdminResponse(413, f"admin request bodies are limited to"
                                              f" {MAX_BODY_BYTES} bytes\n")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    return AdminResponse(413, f"admin request bodies are limited to"
                                              f" {MAX_BODY_BYTES} bytes\n")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                target = head.target.decode("latin-1")
                path, _, raw_query = target.partition("?")
                headers = HeaderMap(
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers)
                headers.set(":method", head.method.decode("latin-1"))
                headers.set(":path", target)
                return AdminRequest(head.method.decode("latin-1"), path,
                                    parse_query(raw_query), headers, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _send_response(self, stream: trio.SocketStream, conn: h11.Connection,
                             resp: AdminResponse, keep: bool, head: bool) -> None:
        body = resp.body_bytes()
        headers = [("content-type", resp.content_type), ("content-length", str(len(body))),
                   ("cache-control", "no-cache, max-age=0"),
                   ("x-content-type-options", "nosniff"), *resp.headers]
        if not keep:
            headers.append(("connection", "close"))
        if conn.our_state is not h11.SEND_RESPONSE:
            # A protocol error before the request was complete: h11 will not frame a
            # response, so write a minimal one by hand.
            reason = _REASONS.get(resp.status, b"Error")
            raw = b"HTTP/1.1 %d %s\r\n" % (resp.status, reason) + b"".join(
                f"{k}: {v}\r\n".encode("latin-1") for k, v in headers) + b"\r\n" + body
            with trio.move_on_after(SEND_TIMEOUT_S):
                await stream.send_all(raw)
            return
        data = conn.send(h11.Response(status_code=resp.status, headers=headers))
        if not head:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        with trio.fail_after(SEND_TIMEOUT_S):
            await stream.send_all(data)


_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 413: b"Payload Too Large",
            414: b"URI Too Long", 431: b"Request Header Fields Too Large"}


def _fmt(addr: Any) -> str:
    host, port = addr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
