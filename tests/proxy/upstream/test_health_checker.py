"""Active health checking, the pure part: config, results, the per-host state machine.

Time is the caller's: a session only says how long until its next check (``next_delay``),
so thresholds, edge intervals and jitter are checked by feeding results, no clock needed.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from google.protobuf import json_format

from proxy.config.context import FactoryContext
from proxy.config.errors import ConfigError
from proxy.config.runtime import Runtime
from proxy.http.headers import HeaderMap
from proxy.stats import Store
from proxy.upstream.cluster_config import ClusterConfig
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
    decode_grpc_health_response,
    encode_grpc_health_request,
    evaluate_grpc_response,
    evaluate_http_response,
    payload_matches,
)

PATH = "static_resources.clusters[0]"
HC = f"{PATH}.health_checks[0]"


def cluster(hc: dict[str, Any] | list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": "backend",
        "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": 8080}}}}]}]},
        "health_checks": hc if isinstance(hc, list) else [hc],
    }
    d.update(fields)
    return d


def hc(**fields: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"timeout": "1s", "interval": "10s", "unhealthy_threshold": 3,
                         "healthy_threshold": 2}
    if not any(k.endswith("_health_check") for k in fields):
        d["http_health_check"] = {"path": "/healthz"}
    d.update(fields)
    return d


def compile_hc(d: dict[str, Any], runtime: Runtime | None = None) -> HealthCheckConfig:
    cfg = ClusterConfig.from_proto(json_format.ParseDict(cluster(d), Cluster()),
                                   FactoryContext(runtime=runtime), PATH)
    assert len(cfg.health_checks) == 1
    return cfg.health_checks[0]  # type: ignore[no-any-return]


def refused(d: dict[str, Any] | list[dict[str, Any]], **fields: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        ClusterConfig.from_proto(json_format.ParseDict(cluster(d, **fields), Cluster()),
                                 FactoryContext(), PATH)
    return info.value


# ----------------------------------------------------------------------------- config
def test_defaults_follow_envoy() -> None:
    c = compile_hc(hc())
    assert (c.timeout, c.interval, c.unhealthy_threshold, c.healthy_threshold) == (1, 10, 3, 2)
    assert c.unhealthy_interval == c.unhealthy_edge_interval == c.healthy_edge_interval == 10
    assert c.no_traffic_interval == c.no_traffic_healthy_interval == 60
    assert c.reuse_connection is True and c.kind == "http"
    assert isinstance(c.check, HttpCheck)
    assert c.check.expected_statuses == ((200, 201),) and c.check.method == "GET"


def test_edge_intervals_default_to_their_base() -> None:
    c = compile_hc(hc(unhealthy_interval="3s", no_traffic_interval="7s"))
    assert c.unhealthy_edge_interval == 3 and c.healthy_edge_interval == 10
    assert c.no_traffic_healthy_interval == 7


@pytest.mark.parametrize("missing", ["timeout", "interval", "unhealthy_threshold",
                                     "healthy_threshold"])
def test_required_fields(missing: str) -> None:
    d = hc()
    del d[missing]
    assert refused(d).path == f"{HC}.{missing}"


def test_a_checker_is_required() -> None:
    d = hc()
    del d["http_health_check"]
    assert refused(d).path == HC


@pytest.mark.parametrize(("fields", "path"), [
    ({"event_log_path": "/tmp/hc"}, f"{HC}.event_log_path"),
    ({"always_log_health_check_failures": True}, f"{HC}.always_log_health_check_failures"),
    ({"alt_port": 9}, f"{HC}.alt_port"),
    ({"custom_health_check": {"name": "x"}}, f"{HC}.custom_health_check"),
    ({"tcp_health_check": {"proxy_protocol_config": {}}},
     f"{HC}.tcp_health_check.proxy_protocol_config"),
    ({"http_health_check": {"path": "/", "codec_client_type": "HTTP3"}},
     f"{HC}.http_health_check.codec_client_type"),
    ({"http_health_check": {"path": "/", "request_headers_to_add": [
        {"header": {"key": "x", "value": "%UPSTREAM_REMOTE_ADDRESS%"}}]}},
     f"{HC}.http_health_check.request_headers_to_add[0].header.value"),
    ({"http_health_check": {"path": "/", "send": {"text": "00"}}},
     f"{HC}.http_health_check.send"),
    ({"http_health_check": {"path": "/", "expected_statuses": [{"start": 200, "end": 200}]}},
     f"{HC}.http_health_check.expected_statuses[0]"),
    ({"http_health_check": {"path": "/", "retriable_statuses": [{"start": 99, "end": 200}]}},
     f"{HC}.http_health_check.retriable_statuses[0]"),
    ({"http_health_check": {"path": "/", "expected_statuses": [{"start": 200, "end": 601}]}},
     f"{HC}.http_health_check.expected_statuses[0]"),
    ({"http_health_check": {"path": ""}}, f"{HC}.http_health_check.path"),
    ({"tcp_health_check": {"send": {"text": "zz"}}}, f"{HC}.tcp_health_check.send.text"),
    ({"tcp_health_check": {"receive": [{"text": "abc"}]}},
     f"{HC}.tcp_health_check.receive[0].text"),
    ({"timeout": "0s"}, f"{HC}.timeout"),
    ({"interval_jitter": "-1s"}, f"{HC}.interval_jitter"),
])
def test_refused_with_the_field_path(fields: dict[str, Any], path: str) -> None:
    assert refused(hc(**fields)).path == path


def test_one_checker_per_cluster() -> None:
    assert refused([hc(), hc()]).path == f"{PATH}.health_checks[1]"


@pytest.mark.parametrize("ctype", ["STRICT_DNS", "LOGICAL_DNS"])
def test_dns_clusters_are_refused(ctype: str) -> None:
    err = refused(hc(), type=ctype)
    assert err.path == f"{PATH}.health_checks" and "STATIC" in err.message


def test_payloads_hex_and_binary() -> None:
    c = compile_hc(hc(tcp_health_check={"send": {"text": "50494e47"},
                                        "receive": [{"binary": "UE8="}, {"text": "4e47"}]}))
    assert c.check == TcpCheck(send=b"PING", receive=(b"PO", b"NG"))


def test_http_check_request_headers() -> None:
    c = compile_hc(hc(http_health_check={
        "path": "/hc", "method": "POST", "send": {"text": "7b7d"},
        "request_headers_to_add": [{"header": {"key": "X-Probe", "value": "1"}}],
        "request_headers_to_remove": ["user-agent"]}))
    check = c.check
    assert isinstance(check, HttpCheck)
    h = check.request_headers("backend", tls=False)
    assert h.get(":method") == "POST" and h.get(":path") == "/hc"
    assert h.get(":authority") == "backend" and h.get(":scheme") == "http"
    assert h.get("x-probe") == "1" and h.get("user-agent") is None
    assert h.get("content-length") == "2" and check.send == b"{}"
    c2 = compile_hc(hc(http_health_check={"path": "/", "host": "svc.local"}))
    assert c2.check.request_headers("backend", tls=True).get(":authority") == "svc.local"  # type: ignore[union-attr]
    assert c2.check.request_headers("b", tls=True).get("user-agent") == "Envoy/HC"  # type: ignore[union-attr]


def test_grpc_check_request() -> None:
    c = compile_hc(hc(grpc_health_check={
        "service_name": "pkg.Svc", "authority": "grpc.local",
        "initial_metadata": [{"header": {"key": "x-md", "value": "v"}}]}))
    assert isinstance(c.check, GrpcCheck) and c.kind == "grpc"
    h = c.check.request_headers("backend", False, 1.0)
    assert h.get(":path") == "/grpc.health.v1.Health/Check" and h.get(":method") == "POST"
    assert h.get(":authority") == "grpc.local" and h.get("content-type") == "application/grpc"
    assert h.get("grpc-timeout") == "1000m" and h.get("x-md") == "v"


def test_runtime_knobs() -> None:
    rt = Runtime.from_dict({"health_check.min_interval": 5000, "health_check.max_interval": 8000,
                            "health_check.verify_cluster": 0})
    c = compile_hc(hc(), rt)
    assert (c.min_interval_ms, c.max_interval_ms, c.verify_cluster_pct) == (5000, 8000, 0)


# ----------------------------------------------------------------------------- results
def test_payload_matcher_finds_segments_in_order() -> None:
    assert payload_matches([b"ab", b"cd"], b"xxabyycdzz")
    assert not payload_matches([b"cd", b"ab"], b"xxabyycdzz")
    assert payload_matches([], b"")
    assert not payload_matches([b"abc"], b"ab")


def http_check(**kw: Any) -> HttpCheck:
    return HttpCheck(path="/", host="", **kw)


def test_http_expected_and_retriable_statuses() -> None:
    check = http_check(expected_statuses=((200, 300),), retriable_statuses=((503, 504),))
    h = HeaderMap()
    assert evaluate_http_response(check, 204, h, b"").success
    r = evaluate_http_response(check, 500, h, b"")
    assert not r.success and not r.retriable and r.failure is FailureType.ACTIVE
    assert evaluate_http_response(check, 503, h, b"").retriable


def test_http_receive_within_the_buffer() -> None:
    check = http_check(receive=(b"OK",), response_buffer_size=4)
    assert evaluate_http_response(check, 200, HeaderMap(), b"..OK").success
    assert not evaluate_http_response(check, 200, HeaderMap(), b"...OK").success
    assert evaluate_http_response(http_check(receive=(b"OK",), response_buffer_size=0), 200,
                                  HeaderMap(), b"x" * 5000 + b"OK").success


def test_http_immediate_fail_header() -> None:
    check = http_check(retriable_statuses=((503, 504),))
    h = HeaderMap([("x-envoy-immediate-health-check-fail", "true")])
    r = evaluate_http_response(check, 503, h, b"")
    assert r.immediate and r.retriable
    # With an expected status the header changes nothing (as Envoy).
    assert evaluate_http_response(check, 200, h, b"").success


def test_http_service_name_matcher_counts_verify_cluster() -> None:
    from proxy.common.matchers import _Prefix

    stats = HealthCheckerStats(Store().scope("cluster.b."))
    check = http_check(service_name_matcher=_Prefix("locations"))
    ok = HeaderMap([("x-envoy-upstream-healthchecked-cluster", "locations-prod")])
    assert evaluate_http_response(check, 200, ok, b"", lambda: True, stats).success
    assert not evaluate_http_response(check, 200, HeaderMap(), b"", lambda: True, stats).success
    assert stats.verify_cluster.value == 2
    assert evaluate_http_response(check, 200, HeaderMap(), b"", lambda: False, stats).success
    assert stats.verify_cluster.value == 2


def test_grpc_health_messages() -> None:
    frame = encode_grpc_health_request("pkg.Svc")
    assert frame[:5] == b"\x00\x00\x00\x00\x09" and frame[5:] == b"\x0a\x07pkg.Svc"
    assert encode_grpc_health_request("") == b"\x00\x00\x00\x00\x00"
    serving = b"\x00\x00\x00\x00\x02\x08\x01"
    assert decode_grpc_health_response(serving) == 1
    assert decode_grpc_health_response(b"\x00\x00\x00\x00\x00") == 0
    assert decode_grpc_health_response(b"\x01\x00\x00\x00\x02\x08\x01") is None  # compressed
    assert decode_grpc_health_response(serving + b"x") is None
    assert evaluate_grpc_response(200, 0, serving).success
    assert not evaluate_grpc_response(200, 0, b"\x00\x00\x00\x00\x02\x08\x02").success
    assert not evaluate_grpc_response(200, 12, b"").success
    assert not evaluate_grpc_response(503, None, b"").success
    assert not evaluate_grpc_response(200, None, serving).success


def test_grpc_request_matches_grpcio_messages() -> None:
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    req = health_pb2.HealthCheckRequest()
    req.ParseFromString(encode_grpc_health_request("a.B")[5:])
    assert req.service == "a.B"
    resp = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
    raw = resp.SerializeToString()
    assert decode_grpc_health_response(b"\x00" + len(raw).to_bytes(4, "big") + raw) == 1


# ----------------------------------------------------------------------------- state machine
def policy(traffic: bool = True, rng: random.Random | None = None,
           **fields: Any) -> HealthCheckerPolicy:
    base = dict(check=TcpCheck(), timeout=1.0, interval=10.0, unhealthy_threshold=3,
                healthy_threshold=2, unhealthy_interval=20.0, unhealthy_edge_interval=5.0,
                healthy_edge_interval=2.0, no_traffic_interval=60.0,
                no_traffic_healthy_interval=90.0)
    base.update(fields)
    stats = HealthCheckerStats(Store().scope("cluster.b."))
    return HealthCheckerPolicy(HealthCheckConfig(**base), stats, rng or random.Random(1),
                               lambda: traffic)


OK = CheckResult.ok()
NET = CheckResult.failed(FailureType.NETWORK)
TIMEOUT = CheckResult.failed(FailureType.NETWORK_TIMEOUT)
ACTIVE = CheckResult.failed(FailureType.ACTIVE)
RETRIABLE = CheckResult.failed(FailureType.ACTIVE, retriable=True)


def test_host_starts_failed_and_first_success_makes_it_healthy() -> None:
    p = policy()
    s = HealthCheckSession(p)
    assert not s.healthy and s.next_delay == 0 and p.stats.healthy.value == 0
    assert s.record(OK) is Transition.CHANGED
    assert s.healthy and p.stats.healthy.value == 1 and s.next_delay == 10.0


def test_first_failure_keeps_it_failed_then_healthy_threshold_applies() -> None:
    p = policy()
    s = HealthCheckSession(p)
    assert s.record(NET) is Transition.UNCHANGED and s.next_delay == 20.0  # unhealthy_interval
    assert s.record(OK) is Transition.CHANGE_PENDING and not s.healthy
    assert s.next_delay == 2.0  # healthy_edge_interval
    assert s.record(OK) is Transition.CHANGED and s.healthy and s.next_delay == 10.0


def test_network_failures_count_to_the_unhealthy_threshold() -> None:
    p = policy()
    s = HealthCheckSession(p)
    s.record(OK)
    assert s.record(NET) is Transition.CHANGE_PENDING and s.next_delay == 5.0  # edge
    assert s.record(TIMEOUT) is Transition.CHANGE_PENDING and s.healthy
    assert s.record(NET) is Transition.CHANGED and not s.healthy
    assert s.next_delay == 20.0 and p.stats.healthy.value == 0
    st = p.stats
    assert (st.attempt.value, st.success.value, st.failure.value, st.network_failure.value) == (
        0, 1, 3, 3)


def test_a_success_resets_the_failure_count() -> None:
    s = HealthCheckSession(policy())
    s.record(OK)
    s.record(NET)
    s.record(NET)
    s.record(OK)
    assert s.record(NET) is Transition.CHANGE_PENDING and s.healthy


def test_active_failure_is_immediate_retriable_counts() -> None:
    s = HealthCheckSession(policy())
    s.record(OK)
    assert s.record(ACTIVE) is Transition.CHANGED and not s.healthy
    s2 = HealthCheckSession(policy())
    s2.record(OK)
    assert s2.record(RETRIABLE) is Transition.CHANGE_PENDING
    assert s2.record(RETRIABLE) is Transition.CHANGE_PENDING
    assert s2.record(RETRIABLE) is Transition.CHANGED


def test_immediate_fail_header_fails_at_once_even_when_retriable() -> None:
    check = http_check(retriable_statuses=((503, 504),))
    r = evaluate_http_response(
        check, 503, HeaderMap([("x-envoy-immediate-health-check-fail", "true")]), b"")
    s = HealthCheckSession(policy())
    s.record(OK)
    assert s.record(r) is Transition.CHANGED and not s.healthy


def test_passive_failure_fails_at_once_without_moving_the_timer() -> None:
    p = policy()
    s = HealthCheckSession(p)
    s.record(OK)
    before = s.next_delay
    assert s.set_unhealthy(FailureType.PASSIVE) is Transition.CHANGED and not s.healthy
    assert s.next_delay == before and p.stats.passive_failure.value == 1


def test_no_traffic_intervals() -> None:
    s = HealthCheckSession(policy(traffic=False))
    s.record(OK)
    assert s.next_delay == 90.0  # no_traffic_healthy_interval
    s.record(NET)
    assert s.next_delay == 60.0  # pending: no_traffic_interval
    s.record(ACTIVE)
    assert s.next_delay == 60.0


def test_jitter_bounds() -> None:
    p = policy(rng=random.Random(7), interval_jitter=0.5, interval_jitter_percent=10)
    seen = []
    for _ in range(2000):
        s = HealthCheckSession(p)
        s.record(OK)
        seen.append(s.next_delay)
    # base 10 s + [0, 10 % of 10 s) + [0, 0.5 s)
    assert min(seen) >= 10.0 and max(seen) < 10.0 + 1.0 + 0.5
    assert max(seen) > 11.2 and min(seen) < 10.2  # both jitters are drawn


def test_initial_jitter_and_runtime_bounds() -> None:
    p = policy(rng=random.Random(3), initial_jitter=2.0)
    delays = [HealthCheckSession(p).next_delay for _ in range(500)]
    assert 0 <= min(delays) and max(delays) < 2.0 and len(set(delays)) > 100
    capped = policy(max_interval_ms=3000)
    s = HealthCheckSession(capped)
    s.record(OK)
    assert s.next_delay == 3.0
    floored = policy(min_interval_ms=15000)
    s = HealthCheckSession(floored)
    s.record(OK)
    assert s.next_delay == 15.0


def test_removed_host_leaves_the_healthy_gauge() -> None:
    p = policy()
    s = HealthCheckSession(p)
    s.record(OK)
    s.remove()
    s.remove()
    assert p.stats.healthy.value == 0
