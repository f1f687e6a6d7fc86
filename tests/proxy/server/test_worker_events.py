"""Worker -> main process events and the health check ops that follow them."""

from __future__ import annotations

import os
from typing import Any

import trio

from proxy.server.worker import _control_handlers
from proxy.server.worker_context import WorkerContext
from proxy.server.worker_control import LineSender, WorkerChannel, send_events, serve_commands
from proxy.stats import Store
from proxy.upstream.cluster_config import ClusterConfig, EndpointSpec
from proxy.upstream.cluster_manager import ClusterManager
from proxy.upstream.health_checker import HealthCheckConfig, TcpCheck
from proxy.upstream.outlier_detection import OutlierDetectionConfig


async def test_event_lines_reach_on_event_between_answers() -> None:
    to_worker_r, to_worker_w = os.pipe()
    to_main_r, to_main_w = os.pipe()
    main_send = trio.lowlevel.FdStream(to_worker_w)
    main_recv = trio.lowlevel.FdStream(to_main_r)
    worker_recv = trio.lowlevel.FdStream(to_worker_r)
    worker_send = trio.lowlevel.FdStream(to_main_w)
    seen: list[dict[str, Any]] = []

    def on_event(msg: dict[str, Any]) -> None:
        if msg["event"] == "boom":
            raise RuntimeError("a bad event must not end the channel")
        seen.append(msg)

    ch = WorkerChannel(main_send, main_recv, on_event=on_event)
    events_in, events_out = trio.open_memory_channel[dict[str, Any]](10)
    async with trio.open_nursery() as n:
        n.start_soon(ch.read_loop)
        sender = LineSender(worker_send)
        n.start_soon(serve_commands, worker_recv, sender, {"echo": lambda m: m["v"]})
        n.start_soon(send_events, events_out, sender)
        await sender.send_all(b"READY\n")
        await ch.ready.wait()
        events_in.send_nowait({"event": "boom"})
        events_in.send_nowait({"event": "host_unhealthy", "cluster": "c", "address": "a",
                               "port": 1})
        assert await ch.call("echo", v=7) == 7
        for _ in range(200):
            if seen:
                break
            await trio.sleep(0.01)
        assert seen == [{"event": "host_unhealthy", "cluster": "c", "address": "a", "port": 1}]
        assert await ch.call("echo", v=8) == 8
        n.cancel_scope.cancel()
    for s in (main_send, main_recv, worker_recv, worker_send):
        await s.aclose()


def _cluster(**kw: Any) -> ClusterConfig:
    return ClusterConfig(name="c", endpoints=(EndpointSpec("10.0.0.1", 80),
                                              EndpointSpec("10.0.0.2", 80)), **kw)


HC = (HealthCheckConfig(check=TcpCheck(), timeout=1.0, interval=10.0, unhealthy_threshold=2,
                        healthy_threshold=2),)


async def test_immediate_health_check_fail_marks_the_host_and_tells_the_main() -> None:
    cm = ClusterManager({"c": _cluster(health_checks=HC), "plain": ClusterConfig(
        name="plain", endpoints=(EndpointSpec("10.0.0.3", 80),))}, Store())
    worker = WorkerContext(cluster_manager=cm)
    cluster, plain = cm.get("c"), cm.get("plain")
    assert cluster is not None and plain is not None
    cluster.apply_health([("10.0.0.1", 80, True), ("10.0.0.2", 80, True)])
    events: list[dict[str, Any]] = []
    worker.post_event = events.append
    host = cluster.hosts[0]
    worker.immediate_health_check_fail(cluster, host)
    assert not host.healthy and cluster.hosts[1].healthy
    assert cluster.cluster_stats.membership_healthy.value == 1
    assert events == [{"event": "host_unhealthy", "cluster": "c", "address": "10.0.0.1",
                       "port": 80}]
    # Without active health checking the header means nothing.
    worker.immediate_health_check_fail(plain, plain.hosts[0])
    assert plain.hosts[0].healthy and len(events) == 1


async def test_host_check_success_unejects_an_ejected_host() -> None:
    cm = ClusterManager({"c": _cluster(health_checks=HC,
                                       outlier_detection=OutlierDetectionConfig(max_ejection_percent=100))}, Store())
    worker = WorkerContext(cluster_manager=cm)
    handlers = _control_handlers(worker, worker.stats, None, [], lambda: None)
    cluster = cm.get("c")
    assert cluster is not None
    cluster.apply_health([("10.0.0.1", 80, True), ("10.0.0.2", 80, True)])
    host = cluster.hosts[0]
    assert host.outlier is not None
    for _ in range(5):  # consecutive_5xx
        host.outlier.put_http_response_code(500)
    assert host.ejected
    assert cluster.cluster_stats.membership_healthy.value == 1
    args = {"cluster": "c", "address": "10.0.0.1", "port": 80}
    assert handlers["host_check_success"](args) is True
    assert not host.ejected
    assert cluster.cluster_stats.membership_healthy.value == 2
    assert handlers["host_check_success"](args) is False  # not ejected: nothing to do
    assert handlers["host_check_success"]({**args, "cluster": "nope"}) is False
