"""Shared by the HTTP/2 tests: an in-process proxy, real upstreams and an h2 test client."""

from __future__ import annotations

import contextlib
import socket
import textwrap
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio
import yaml

from proxy.config.bootstrap import parse_bootstrap_dict
from proxy.config.snapshot import build_snapshot
from proxy.listener.active_tcp_listener import ActiveTcpListener
from proxy.server.worker_context import WorkerContext
from proxy.stats import Store
from proxy.upstream.cluster_manager import ClusterManager


def config(*, routes: str, clusters: str = "", hcm_extra: str = "", filters: str = "") -> str:
    return f"""
static_resources:
  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http{textwrap.indent(textwrap.dedent(hcm_extra), " " * 10)}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{textwrap.indent(textwrap.dedent(routes), " " * 14)}
          http_filters:{textwrap.indent(textwrap.dedent(filters), " " * 10)}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
{textwrap.indent(textwrap.dedent(clusters), " " * 2)}
"""


def cluster(name: str, *ports: int, extra: str = "") -> str:
    eps = "".join(
        f"\n      - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}"
        for p in ports
    )
    return f"""
- name: {name}
  type: STATIC
  connect_timeout: 1s{textwrap.indent(textwrap.dedent(extra), "  ")}
  load_assignment:
    cluster_name: {name}
    endpoints:
    - lb_endpoints:{eps}
"""


H2_CLUSTER = """
typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    explicit_http_config:
      http2_protocol_options: {}
"""


@dataclass
class Proxy:
    port: int
    worker: WorkerContext

    def counter(self, name: str) -> int:
        c = self.worker.stats.counters.get(name)
        return c.value if c is not None else 0

    def gauge(self, name: str) -> int:
        g = self.worker.stats.gauges.get(name)
        return g.value if g is not None else 0


@contextlib.asynccontextmanager
async def run_proxy(yaml_text: str) -> AsyncIterator[Proxy]:
    bootstrap = parse_bootstrap_dict(yaml.safe_load(yaml_text))
    snapshot = build_snapshot(bootstrap)
    stats = Store()
    worker = WorkerContext(
        cluster_manager=ClusterManager(snapshot.clusters, stats), snapshot=snapshot, stats=stats
    )
    lc = snapshot.listeners[0]
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.timers.run)
        await nursery.start(worker.cluster_manager.run)
        listener = ActiveTcpListener(lc, sock, worker)
        nursery.start_soon(listener.accept_loop, nursery)
        yield Proxy(port, worker)
        nursery.cancel_scope.cancel()
    sock.close()


# -- an HTTP/2 test client (h2 over a trio stream) --------------------------------------
@dataclass
class H2Response:
    stream_id: int
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    reset: int | None = None
    ended: bool = False

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class H2Client:
    """A prior-knowledge h2c client; ``auto_ack=False`` lets a test read slowly."""

    def __init__(self, stream: trio.SocketStream, window: int = 65535) -> None:
        self.stream = stream
        from proxy.http.codec.h2 import _H2Connection

        cfg = h2.config.H2Configuration(client_side=True, header_encoding="latin-1")
        # h2 with a graceful GOAWAY: streams below the last stream id still complete.
        self.conn = _H2Connection(cfg)
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.conn.initiate_connection()
        self.responses: dict[int, H2Response] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.auto_ack = True
        self.unacked: dict[int, int] = {}
        self.changed = trio.Event()

    @classmethod
    async def connect(cls, port: int, window: int = 65535) -> H2Client:
        c = cls(await trio.open_tcp_stream("127.0.0.1", port), window)
        await c.flush()
        return c

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.send_all(data)

    def start(self, path: str = "/", method: str = "GET", headers: list[tuple[str, str]] = (),
              end_stream: bool = True, authority: str = "example.com") -> int:
        sid = self.conn.get_next_available_stream_id()
        hs = [(":method", method), (":path", path), (":authority", authority),
              (":scheme", "http"), *headers]
        self.conn.send_headers(sid, hs, end_stream=end_stream)
        self.responses[sid] = H2Response(sid)
        return sid

    async def send_body(self, sid: int, data: bytes, end_stream: bool = True) -> None:
        """Send ``data`` as the windows allow (reading meanwhile)."""
        view = memoryview(data)
        while view:
            window = self.conn.local_flow_control_window(sid)
            n = min(window, self.conn.max_outbound_frame_size, len(view))
            if n <= 0:
                await self.flush()
                await self.receive_once()
                if self.responses[sid].reset is not None:
                    return
                continue
            self.conn.send_data(sid, bytes(view[:n]))
            view = view[n:]
        if end_stream:
            self.conn.end_stream(sid)
        await self.flush()

    async def receive_once(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            self.closed = True
            self._changed()
            return
        for ev in self.conn.receive_data(data):
            self._on_event(ev)
        await self.flush()
        self._changed()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _on_event(self, ev: object) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            r = self.responses[ev.stream_id]
            r.headers = list(ev.headers)
            r.status = int(dict(ev.headers)[":status"])
        elif isinstance(ev, h2.events.DataReceived):
            r = self.responses[ev.stream_id]
            r.body += ev.data
            if self.auto_ack:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            else:
                self.unacked[ev.stream_id] = (
                    self.unacked.get(ev.stream_id, 0) + ev.flow_controlled_length)
        elif isinstance(ev, h2.events.TrailersReceived):
            self.responses[ev.stream_id].trailers = list(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            self.responses[ev.stream_id].ended = True
        elif isinstance(ev, h2.events.StreamReset):
            if ev.stream_id in self.responses:
                self.responses[ev.stream_id].reset = int(ev.error_code)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = ev

    def ack(self, sid: int, n: int | None = None) -> None:
        have = self.unacked.get(sid, 0)
        n = have if n is None else min(n, have)
        if n:
            self.unacked[sid] = have - n
            self.conn.acknowledge_received_data(n, sid)

    async def wait(self, sid: int) -> H2Response:
        """Until stream ``sid`` ended or was reset (or the connection closed)."""
        r = self.responses[sid]
        while not (r.ended or r.reset is not None or self.closed):
            await self.receive_once()
        return r

    async def get(self, path: str = "/", **kw: object) -> H2Response:
        sid = self.start(path, **kw)  # type: ignore[arg-type]
        await self.flush()
        return await self.wait(sid)

    async def aclose(self) -> None:
        await self.stream.aclose()


# -- a threaded HTTP/2 upstream (h2, blocking sockets) ----------------------------------
class H2Upstream:
    """h2c upstream. Paths: /echo (echoes the body; request trailers come back as
    response trailers), /trailers (body + trailers x-t: 1), /reset (RST_STREAM before
    answering), /refuse (REFUSED_STREAM), /goaway (GOAWAY last_stream_id=0 then close),
    /goaway-graceful (GOAWAY naming this stream, then the answer), /big?n=N (N bytes),
    /slow?ms=N, anything else: 200 "ok". ``headers`` has every request's headers."""

    def __init__(self, max_concurrent_streams: int = 100) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.accepts = 0
        self.requests: list[dict[str, str]] = []
        self.resets: list[int] = []  # stream ids the client reset
        self.max_concurrent_streams = max_concurrent_streams
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepts += 1
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c: socket.socket) -> None:
        import time

        from proxy.http.codec.h2 import _H2Connection

        cfg = h2.config.H2Configuration(client_side=False, header_encoding="latin-1")
        conn = _H2Connection(cfg)  # graceful GOAWAY: /goaway-graceful finishes its stream
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_concurrent_streams})
        conn.initiate_connection()
        lock = threading.Lock()
        c.sendall(conn.data_to_send())
        bodies: dict[int, bytearray] = {}
        heads: dict[int, dict[str, str]] = {}
        trailers: dict[int, list[tuple[str, str]]] = {}

        def send(data_fn) -> None:  # type: ignore[no-untyped-def]
            with lock:  # bytes leave in the order h2 produced them (HPACK state)
                data_fn()
                out = conn.data_to_send()
                if out:
                    c.sendall(out)

        def respond(sid: int) -> None:
            h = heads[sid]
            path = h[":path"]
            body = bytes(bodies.get(sid, b""))
            if path.startswith("/slow"):
                time.sleep(int(path.split("ms=")[1]) / 1000)
            try:
                if path.startswith("/reset"):
                    send(lambda: conn.reset_stream(sid, 2))
                    return
                if path.startswith("/refuse"):
                    send(lambda: conn.reset_stream(sid, 7))
                    return
                if path.startswith("/goaway-graceful"):
                    send(lambda: conn.send_goaway(sid))
                elif path.startswith("/goaway"):
                    send(lambda: conn.send_goaway(0))
                    c.shutdown(socket.SHUT_RDWR)
                    return
                out = b"ok"
                extra: list[tuple[str, str]] = []
                if path.startswith("/echo"):
                    out = body
                elif path.startswith("/big"):
                    out = b"b" * int(path.split("n=")[1])
                t = trailers.get(sid) if path.startswith("/echo") else None
                if path.startswith("/trailers"):
                    t = [("x-t", "1")]
                send(lambda: conn.send_headers(
                    sid, [(":status", "200"), ("content-type", "text/plain"), *extra]))
                view = memoryview(out)
                while view:
                    with lock:
                        w = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    if w <= 0:
                        time.sleep(0.001)
                        continue
                    chunk = bytes(view[:w])
                    view = view[w:]
                    send(lambda chunk=chunk: conn.send_data(sid, chunk))
                if t:
                    send(lambda: conn.send_headers(sid, t, end_stream=True))
                else:
                    send(lambda: conn.end_stream(sid))
            except Exception:
                pass

        try:
            while True:
                data = c.recv(65536)
                if not data:
                    return
                with lock:
                    events = conn.receive_data(data)
                for ev in events:
                    if isinstance(ev, h2.events.RequestReceived):
                        heads[ev.stream_id] = dict(ev.headers)
                        self.requests.append(dict(ev.headers))
                        if ev.stream_ended is not None:
                            threading.Thread(target=respond, args=(ev.stream_id,),
                                             daemon=True).start()
                    elif isinstance(ev, h2.events.DataReceived):
                        bodies.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                        with lock:
                            conn.acknowledge_received_data(ev.flow_controlled_length,
                                                           ev.stream_id)
                    elif isinstance(ev, h2.events.TrailersReceived):
                        trailers[ev.stream_id] = list(ev.headers)
                    elif isinstance(ev, h2.events.StreamEnded):
                        if ev.stream_id in heads and ev.stream_id in bodies or (
                            ev.stream_id in trailers):
                            threading.Thread(target=respond, args=(ev.stream_id,),
                                             daemon=True).start()
                    elif isinstance(ev, h2.events.StreamReset):
                        self.resets.append(ev.stream_id)
                with lock:
                    out = conn.data_to_send()
                    if out:
                        c.sendall(out)
        except OSError:
            pass
        finally:
            c.close()

    def close(self) -> None:
        self.sock.close()


class H1Upstream:
    """HTTP/1.1 upstream (h11, a thread per connection). /echo echoes the body, /slow?ms=N,
    /big?n=N, /headers lists the request headers; ``closed`` counts connections the
    proxy closed while a request was in flight."""

    def __init__(self) -> None:
        import h11  # noqa: F401

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.accepts = 0
        self.aborted = 0
        self.requests: list[tuple[str, list[tuple[str, str]], bytes]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepts += 1
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c: socket.socket) -> None:
        import h11

        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req = None
                body = bytearray()
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        data = c.recv(65536)
                        conn.receive_data(data)
                        if not data:
                            if req is not None:
                                self.aborted += 1
                            return
                        continue
                    if isinstance(ev, h11.Request):
                        req = ev
                    elif isinstance(ev, h11.Data):
                        body += ev.data
                    elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                        break
                assert req is not None
                path = req.target.decode()
                hs = [(k.decode(), v.decode()) for k, v in req.headers]
                self.requests.append((path, hs, bytes(body)))
                out = b"ok"
                if path.startswith("/slow"):
                    c.settimeout(int(path.split("ms=")[1]) / 1000)
                    try:
                        if c.recv(1, socket.MSG_PEEK) == b"":
                            self.aborted += 1  # the proxy gave up on the request
                            return
                    except TimeoutError:
                        pass
                    c.settimeout(None)
                elif path.startswith("/echo"):
                    out = bytes(body)
                elif path.startswith("/big"):
                    out = b"b" * int(path.split("n=")[1])
                elif path.startswith("/headers"):
                    out = "".join(f"{k}: {v}\n" for k, v in hs).encode()
                data = conn.send(h11.Response(status_code=200, headers=[
                    ("content-type", "text/plain"), ("content-length", str(len(out)))]))
                data += conn.send(h11.Data(data=out)) + conn.send(h11.EndOfMessage())
                c.sendall(data)
                conn.start_next_cycle()
        except (OSError, h11.ProtocolError):
            pass
        finally:
            c.close()

    def close(self) -> None:
        self.sock.close()
