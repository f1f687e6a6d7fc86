"""Active health checking, the trio shell: one checker per cluster in the epoch's main process.

Theory of operation
-------------------
1. ``HealthCheckManager`` (one per epoch, in the main process, never in workers: a host is
   checked once per epoch, not once per worker) holds a ``ClusterHealthChecker`` for each
   cluster with ``health_checks``. Each host gets a task: wait ``next_delay``, run one check
   inside the ``timeout`` cancel scope (connect included), feed the result to the host's
   ``HealthCheckSession`` (``proxy.upstream.health_checker``), repeat.
2. ``run`` reports ``started()`` once every host has had its first check (passed, failed or
   timed out): Envoy's cluster warming, which the epoch awaits before starting its workers,
   so they start with the hosts' real health.
3. A host whose health changes is reported through ``on_change(cluster, address, port,
   healthy)``; the epoch sends it to every worker (control op ``host_health``), and a worker
   that starts later gets ``snapshot()``.
4. Checks: HTTP/1.1 (h11 client codec) or HTTP/2 (the h2 client codec), TCP (send, then
   read until every ``receive`` segment is seen in order; connect-only without ``receive``),
   gRPC (``grpc.health.v1.Health/Check`` over HTTP/2). Connections are kept between checks
   with ``reuse_connection`` (Envoy's default) unless the peer closes them; a timeout, an
   error or ``Connection: close`` drops the connection. TLS clusters are checked over TLS
   (``tls_options.alpn_protocols`` overrides the ALPN list).
5. A worker that proxies a response carrying ``x-envoy-immediate-health-check-fail`` tells
   the main process (a control event); ``HealthCheckManager.set_unhealthy`` fails the host's
   session at once as a PASSIVE failure (``health_check.passive_failure``), without moving its
   timer, and the change goes out like any other.
6. A passing check of a host that is healthy calls ``on_success(cluster, address, port)``
   for clusters with outlier detection and ``successful_active_health_check_uneject_host``
   (Envoy's default): the epoch tells the workers, whose detectors un-eject the host.
7. "Traffic seen" (for ``no_traffic_interval``) is a latch per cluster set by ``note_traffic``
   from the summed stats the epoch reads every stats interval (``upstream_cx_total``,
   ``upstream_cx_tx_bytes_total`` or ``upstream_cx_rx_bytes_total`` above zero), Envoy's
   ``used()`` test; until then the no-traffic intervals apply.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

import trio

from proxy.http.codec.events import (
    ConnectionClosed,
    Data,
    EndOfStream,
    GoAway,
    ResponseHeaders,
    StreamReset,
    Trailers,
)
from proxy.http.headers import HeaderMap
from proxy.stats import Store
from proxy.upstream.cluster_config import ClusterConfig
from proxy.upstream.connect import UpstreamConnectError, connect_upstream
from proxy.upstream.health_checker import (
    CheckResult,
    FailureType,
    GrpcCheck,
    HealthCheckConfig,
    HealthCheckerPolicy,
    HealthCheckerStats,
    HealthCheckSession,
    HttpCheck,
    TcpCheck,
    Transition,
    encode_grpc_health_request,
    evaluate_grpc_response,
    evaluate_http_response,
    payload_matches,
)
from proxy.upstream.host import Host

__all__ = ["ClusterHealthChecker", "HealthCheckManager", "Probe"]

log = logging.getLogger("trioxy.health_check")

MAX_BODY = 1024 * 1024  # what an HTTP check keeps of a body it does not match
READ_SIZE = 65536
TRAFFIC_STATS = ("upstream_cx_total", "upstream_cx_tx_bytes_total", "upstream_cx_rx_bytes_total")

OnChange = Callable[[str, str, int, bool], None]
OnSuccess = Callable[[str, str, int], None]


class _NetworkError(Exception):
    """The connection failed, reset or closed under a check (a NETWORK failure)."""


class Probe:
    """One host's checking connection; subclasses run one check each."""

    def __init__(self, checker: ClusterHealthChecker, host: Host) -> None:
        self.checker = checker
        self.host = host
        self.stream: Any = None

    async def check(self) -> CheckResult:
        try:
            return await self._check()
        except _NetworkError as exc:
            await self.aclose()
            return CheckResult.failed(FailureType.NETWORK, str(exc))
        except UpstreamConnectError as exc:
            await self.aclose()
            return CheckResult.failed(FailureType.NETWORK, str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            await self.aclose()
            return CheckResult.failed(FailureType.NETWORK, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a peer we cannot parse must not end the epoch's checks
            log.exception("cluster %s: health check of %s raised", self.checker.name,
                          self.host.address_string)
            await self.aclose()
            return CheckResult.failed(FailureType.NETWORK, f"{type(exc).__name__}: {exc}")

    async def _check(self) -> CheckResult:
        raise NotImplementedError

    async def _connect(self, alpn: list[str] | None = None) -> Any:
        c = self.checker
        protocols = c.config.alpn_protocols or alpn
        self.stream = await connect_upstream(
            self.host, c.cluster.connect_timeout, cluster=c.cluster_view,
            alpn_protocols=list(protocols) if protocols else None)
        return self.stream

    async def _receive(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(READ_SIZE))
        except (trio.BrokenResourceError, OSError) as exc:
            raise _NetworkError(f"connection error: {exc}") from None

    async def aclose(self) -> None:
        """Drop the connection (shielded and bounded: it runs after a timeout too)."""
        stream, self.stream = self.stream, None
        if stream is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


class _TcpProbe(Probe):
    """Envoy's ``TcpActiveHealthCheckSession``."""

    async def _check(self) -> CheckResult:
        check: TcpCheck = self.checker.config.check  # type: ignore[assignment]
        if self.stream is None:
            await self._connect()
            if not check.receive:
                # Connect-only: connecting was the check; the connection is not kept.
                await self.aclose()
                return CheckResult.ok()
        if check.send:
            await self.stream.send_all(check.send)
        buf = b""
        while not payload_matches(check.receive, buf):
            chunk = await self._receive()
            if not chunk:
                raise _NetworkError("connection closed before the expected payload")
            buf += chunk
        if not self.checker.config.reuse_connection:
            await self.aclose()
        return CheckResult.ok()


class _H2Session:
    """One HTTP/2 request at a time on one connection (checks do not overlap)."""

    def __init__(self, probe: Probe) -> None:
        from proxy.http.codec.h2 import Http2ClientCodec

        self.probe = probe
        self.codec = Http2ClientCodec()
        self.usable = True

    async def flush(self) -> None:
        self.codec.pump()
        out = self.codec.data_to_send()
        if out:
            await self.probe.stream.send_all(out)

    async def request(self, headers: HeaderMap,
                      body: bytes) -> tuple[HeaderMap, bytes, HeaderMap | None]:
        from proxy.http.codec.events import CodecError

        codec = self.codec
        sid = codec.start_request(headers, end_stream=not body)
        if body:
            codec.send_data(sid, body, end_stream=True)
        await self.flush()
        response: HeaderMap | None = None
        trailers: HeaderMap | None = None
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                ev = codec.next_event()
            except CodecError as exc:
                raise _NetworkError(f"HTTP/2 protocol error: {exc}") from None
            if ev is None:
                data = await self.probe._receive()
                codec.receive_data(data)
                if not data:
                    raise _NetworkError("connection closed before the response ended")
                await self.flush()
                continue
            t = type(ev)
            if t is GoAway:
                self.usable = False  # finish this stream if the peer lets it, then reconnect
                if ev.last_stream_id < sid:  # type: ignore[union-attr]
                    raise _NetworkError("GOAWAY before the response")
                continue
            if getattr(ev, "stream_id", sid) != sid:
                continue
            if t is ResponseHeaders:
                response = ev.headers  # type: ignore[union-attr]
                if ev.end_stream:  # type: ignore[union-attr]
                    break
            elif t is Data:
                n = len(ev.data)  # type: ignore[union-attr]
                codec.acknowledge(sid, n)
                if size < MAX_BODY:
                    chunks.append(ev.data)  # type: ignore[union-attr]
                    size += n
            elif t is Trailers:
                trailers = ev.trailers  # type: ignore[union-attr]
                break
            elif t is EndOfStream:
                break
            elif t is StreamReset:
                raise _NetworkError("stream reset")
            elif t is ConnectionClosed:
                raise _NetworkError("connection closed before the response ended")
        await self.flush()
        if response is None:
            raise _NetworkError("no response headers")
        return response, b"".join(chunks), trailers


class _HttpProbe(Probe):
    """Envoy's ``HttpActiveHealthCheckSession`` (HTTP/1.1 or HTTP/2)."""

    def __init__(self, checker: ClusterHealthChecker, host: Host) -> None:
        super().__init__(checker, host)
        self.h1: Any = None
        self.h2: _H2Session | None = None

    async def aclose(self) -> None:
        self.h1 = self.h2 = None
        await super().aclose()

    async def _check(self) -> CheckResult:
        c = self.checker
        check: HttpCheck = c.config.check  # type: ignore[assignment]
        headers = check.request_headers(c.name, c.tls)
        if check.http2:
            if self.stream is None:
                await self._connect(["h2"])
                self.h2 = _H2Session(self)
            assert self.h2 is not None
            response, body, _ = await self.h2.request(headers, check.send)
            reusable = self.h2.usable and response.get("connection", "") != "close"
        else:
            response, body, reusable = await self._h1_exchange(headers, check.send)
        status = int(response.get(":status") or 0)
        result = evaluate_http_response(check, status, response, body, c.policy.verify_cluster,
                                        c.stats)
        if not reusable or not c.config.reuse_connection:
            await self.aclose()
        return result

    async def _h1_exchange(self, headers: HeaderMap,
                           body: bytes) -> tuple[HeaderMap, bytes, bool]:
        from proxy.http.codec.events import CodecError
        from proxy.http.codec.h1 import Http1ClientCodec

        if self.stream is None:
            await self._connect()
            self.h1 = Http1ClientCodec()
        codec = self.h1
        out = codec.send_request_headers(headers, end_stream=not body)
        if body:
            out += codec.send_data(body, end_stream=True)
        await self.stream.send_all(out)
        response: HeaderMap | None = None
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                ev = codec.next_event()
            except CodecError as exc:
                raise _NetworkError(f"bad response: {exc}") from None
            if ev is None:
                codec.receive_data(await self._receive())
                continue
            t = type(ev)
            if t is ResponseHeaders:
                response = ev.headers
                if ev.end_stream:
                    break
            elif t is Data:
                if size < MAX_BODY:
                    chunks.append(ev.data)
                    size += len(ev.data)
            elif t is EndOfStream or t is Trailers:
                break
            elif t is ConnectionClosed:
                raise _NetworkError("connection closed before the response ended")
        assert response is not None
        reusable = codec.reusable
        if reusable:
            codec.start_next_cycle()
        return response, b"".join(chunks), reusable


class _GrpcProbe(Probe):
    """Envoy's ``GrpcActiveHealthCheckSession``: ``grpc.health.v1.Health/Check`` over h2."""

    def __init__(self, checker: ClusterHealthChecker, host: Host) -> None:
        super().__init__(checker, host)
        self.h2: _H2Session | None = None

    async def aclose(self) -> None:
        self.h2 = None
        await super().aclose()

    async def _check(self) -> CheckResult:
        c = self.checker
        check: GrpcCheck = c.config.check  # type: ignore[assignment]
        if self.stream is None:
            await self._connect(["h2"])
            self.h2 = _H2Session(self)
        assert self.h2 is not None
        headers = check.request_headers(c.name, c.tls, c.config.timeout)
        response, body, trailers = await self.h2.request(
            headers, encode_grpc_health_request(check.service_name))
        http_status = int(response.get(":status") or 0)
        source = trailers if trailers is not None else response  # trailers-only answers
        raw = source.get("grpc-status")
        grpc_status = int(raw) if raw is not None and raw.isdigit() else None
        result = evaluate_grpc_response(http_status, grpc_status, body)
        if not self.h2.usable or not c.config.reuse_connection:
            await self.aclose()
        return result


_PROBES: dict[type, type[Probe]] = {HttpCheck: _HttpProbe, TcpCheck: _TcpProbe,
                                    GrpcCheck: _GrpcProbe}


class _Member:
    __slots__ = ("host", "session", "scope")

    def __init__(self, host: Host, session: HealthCheckSession) -> None:
        self.host = host
        self.session = session
        self.scope = trio.CancelScope()


class ClusterHealthChecker:
    """One cluster's active checker: a session and a task per host."""

    def __init__(self, cluster: ClusterConfig, store: Store, on_change: OnChange,
                 rng: random.Random | None = None,
                 traffic_seen: Callable[[], bool] = lambda: True,
                 probe_factory: Callable[[ClusterHealthChecker, Host], Probe] | None = None,
                 on_success: OnSuccess | None = None) -> None:
        self.cluster = cluster
        self.name = cluster.name
        self.config: HealthCheckConfig = cluster.health_checks[0]
        scope = store.scope(f"cluster.{cluster.name}.")
        # What connect_upstream reads of a cluster: its TLS context and ssl.* stats.
        self.cluster_view = SimpleNamespace(config=cluster, stats=scope)
        self.tls = cluster.transport_socket is not None
        self.stats = HealthCheckerStats(scope)
        self.policy = HealthCheckerPolicy(self.config, self.stats, rng, traffic_seen)
        self.on_change = on_change
        # Un-ejecting hosts on a passing check: only where outlier detection would care.
        od = cluster.outlier_detection
        self.on_success = (on_success if od is not None
                           and od.successful_active_health_check_uneject_host else None)
        self._probe_factory = probe_factory or _PROBES[type(self.config.check)]
        self.members: dict[tuple[str, int], _Member] = {}
        for spec in cluster.endpoints:
            key = (spec.address, spec.port)
            if key not in self.members:
                host = Host(spec.address, spec.port, spec.hostname, spec.weight, spec.priority)
                self.members[key] = _Member(host, HealthCheckSession(self.policy))

    def health(self) -> list[list[Any]]:
        """``[[address, port, healthy], ...]`` for the worker snapshot."""
        return [[a, p, m.session.healthy] for (a, p), m in self.members.items()]

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Check every host forever; ``started()`` after each host's first check."""
        remaining = len(self.members)
        warmed = trio.Event()
        if not remaining:
            warmed.set()

        def first_done() -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                warmed.set()

        async with trio.open_nursery() as nursery:
            for member in self.members.values():
                nursery.start_soon(self._host_loop, member, first_done)
            await warmed.wait()
            task_status.started()

    async def _host_loop(self, member: _Member, first_done: Callable[[], None]) -> None:
        probe = self._probe_factory(self, member.host)
        session = member.session
        first = True
        try:
            with member.scope:
                await trio.sleep(session.next_delay)
                while True:
                    result = await self.check_once(probe, session)
                    self._apply(member, result)
                    if first:
                        first = False
                        first_done()
                    await trio.sleep(session.next_delay)
        finally:
            if first:
                first_done()
            await probe.aclose()

    async def check_once(self, probe: Probe, session: HealthCheckSession) -> CheckResult:
        """One check under ``HealthCheck.timeout`` (connect included)."""
        session.on_attempt()
        result: CheckResult | None = None
        with trio.move_on_after(self.config.timeout):  # HealthCheck.timeout
            result = await probe.check()
        if result is None:
            await probe.aclose()
            result = CheckResult.failed(FailureType.NETWORK_TIMEOUT,
                                        f"no answer within {self.config.timeout:g} s")
        return result

    def _apply(self, member: _Member, result: CheckResult) -> None:
        session = member.session
        was = session.healthy
        transition = session.record(result)
        host = member.host
        if not result.success:
            log.debug("cluster %s: health check of %s failed (%s): %s", self.name,
                      host.address_string, result.failure.value, result.detail)
        if transition is Transition.CHANGED and session.healthy != was:
            log.info("cluster %s: host %s is now %s%s", self.name, host.address_string,
                     "healthy" if session.healthy else "unhealthy",
                     "" if result.success else f" ({result.detail})")
            self.on_change(self.name, host.address, host.port, session.healthy)
        if result.success and session.healthy and self.on_success is not None:
            self.on_success(self.name, host.address, host.port)

    def set_unhealthy(self, address: str, port: int) -> bool:
        """A passive failure (``x-envoy-immediate-health-check-fail`` seen by a worker):
        the host fails at once, its timer left as it is. False for an unknown host."""
        member = self.members.get((address, port))
        if member is None:
            return False
        session = member.session
        was = session.healthy
        session.set_unhealthy(FailureType.PASSIVE)
        if was and not session.healthy:
            log.info("cluster %s: host %s is now unhealthy (immediate health check fail)",
                     self.name, member.host.address_string)
            self.on_change(self.name, address, port, False)
        return True


class HealthCheckManager:
    """The epoch's active health checkers, by cluster name."""

    def __init__(self, clusters: Mapping[str, ClusterConfig], store: Store, on_change: OnChange,
                 rng: random.Random | None = None, on_success: OnSuccess | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()
        self.traffic: dict[str, bool] = {}
        self.checkers: dict[str, ClusterHealthChecker] = {}
        for name, cfg in clusters.items():
            if cfg.health_checks:
                self.traffic[name] = False
                self.checkers[name] = ClusterHealthChecker(
                    cfg, store, on_change, self._rng,
                    traffic_seen=lambda n=name: self.traffic[n],  # type: ignore[misc]
                    on_success=on_success)

    def __bool__(self) -> bool:
        return bool(self.checkers)

    def set_unhealthy(self, cluster: str, address: str, port: int) -> bool:
        """A worker saw ``x-envoy-immediate-health-check-fail`` from this host."""
        checker = self.checkers.get(cluster)
        return checker is not None and checker.set_unhealthy(address, port)

    def snapshot(self) -> dict[str, list[list[Any]]]:
        """Every checked host's health, by cluster (the ``host_health_snapshot`` op)."""
        return {name: c.health() for name, c in self.checkers.items()}

    def note_traffic(self, counters: Mapping[str, int]) -> None:
        """Latch "traffic seen" for clusters whose summed upstream counters moved."""
        for name, seen in self.traffic.items():
            if not seen and any(counters.get(f"cluster.{name}.{s}", 0) > 0
                                for s in TRAFFIC_STATS):
                self.traffic[name] = True

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run every checker; ``started()`` once all have finished their first round."""
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as starting:  # warm every cluster at once
                for checker in self.checkers.values():
                    starting.start_soon(nursery.start, checker.run)
            task_status.started()
