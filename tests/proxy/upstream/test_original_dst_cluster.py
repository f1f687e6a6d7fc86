"""ORIGINAL_DST clusters: config checks (Envoy's messages) and the on-demand host balancer."""

from __future__ import annotations

import random
from typing import Any

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from proxy.config.context import FactoryContext
from proxy.config.errors import ConfigError
from proxy.http.headers import HeaderMap
from proxy.stats import Store
from proxy.upstream.cluster_config import ClusterConfig, DiscoveryType, LbPolicy
from proxy.upstream.cluster_manager import ThreadLocalCluster
from proxy.upstream.load_balancer import LoadBalancerContext
from proxy.upstream.original_dst_cluster import parse_ip_port

PATH = "static_resources.clusters[0]"


def compile_cluster(**fields: Any) -> ClusterConfig:
    d = {"name": "passthrough", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED"}
    d.update(fields)
    return ClusterConfig.from_proto(json_format.ParseDict(d, Cluster()), FactoryContext(), PATH)


def refused(**fields: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        compile_cluster(**fields)
    return info.value


def tlc(**fields: Any) -> ThreadLocalCluster:
    return ThreadLocalCluster(compile_cluster(**fields), Store(), random.Random(1))


# ----------------------------------------------------------------------------- config
def test_defaults() -> None:
    cfg = compile_cluster()
    assert cfg.type is DiscoveryType.ORIGINAL_DST and cfg.lb_policy is LbPolicy.CLUSTER_PROVIDED
    assert cfg.cleanup_interval == 5.0
    assert cfg.original_dst is not None and cfg.original_dst.http_header_name is None
    assert not cfg.is_dns and cfg.endpoints == ()


def test_set_values() -> None:
    cfg = compile_cluster(cleanup_interval="2s", original_dst_lb_config={
        "use_http_header": True, "upstream_port_override": 8443})
    assert cfg.cleanup_interval == 2.0
    assert cfg.original_dst.http_header_name == "x-envoy-original-dst-host"
    assert cfg.original_dst.upstream_port_override == 8443
    cfg = compile_cluster(original_dst_lb_config={"use_http_header": True,
                                                  "http_header_name": "X-Dst"})
    assert cfg.original_dst.http_header_name == "x-dst"


@pytest.mark.parametrize(("fields", "path", "words"), [
    ({"lb_policy": "ROUND_ROBIN"}, f"{PATH}.lb_policy", "Only 'CLUSTER_PROVIDED' is allowed"),
    ({"load_assignment": {"cluster_name": "p"}}, f"{PATH}.load_assignment",
     "must have no load assignment"),
    ({"original_dst_lb_config": {"http_header_name": "x"}},
     f"{PATH}.original_dst_lb_config.http_header_name", "use_http_header is false"),
    ({"original_dst_lb_config": {"upstream_port_override": 70000}},
     f"{PATH}.original_dst_lb_config.upstream_port_override", "65535"),
    ({"cleanup_interval": "0s"}, f"{PATH}.cleanup_interval", "greater than 0s"),
    ({"original_dst_lb_config": {"metadata_key": {"key": "k"}}},
     f"{PATH}.original_dst_lb_config.metadata_key", "not supported"),
    ({"type": "STATIC"}, f"{PATH}.lb_policy", "allowed only with cluster type 'ORIGINAL_DST'"),
    ({"type": "STATIC", "lb_policy": "ROUND_ROBIN", "cleanup_interval": "1s"},
     f"{PATH}.cleanup_interval", "only used by ORIGINAL_DST"),
    ({"type": "STATIC", "lb_policy": "ROUND_ROBIN", "original_dst_lb_config": {}},
     f"{PATH}.original_dst_lb_config", "only used by ORIGINAL_DST"),
])
def test_refused(fields: dict[str, Any], path: str, words: str) -> None:
    err = refused(**fields)
    assert err.path == path
    assert words in err.message


# ----------------------------------------------------------------------------- balancer
def test_no_context_no_host() -> None:
    c = tlc()
    assert c.choose_host(None) is None
    assert c.choose_host(LoadBalancerContext()) is None  # not redirected: no destination
    assert c.hosts == []


def test_hosts_are_made_per_destination_and_reused() -> None:
    c = tlc()
    a = c.choose_host(LoadBalancerContext(restored_local_address=("10.0.0.2", 9000)))
    assert a is not None and a.address_string == "10.0.0.2:9000"
    assert c.choose_host(LoadBalancerContext(restored_local_address=("10.0.0.2", 9000))) is a
    b = c.choose_host(LoadBalancerContext(restored_local_address=("2001:db8::1", 443)))
    assert b is not None and b.address_string == "[2001:db8::1]:443"
    assert [h.address_string for h in c.hosts] == ["10.0.0.2:9000", "[2001:db8::1]:443"]
    st = c.cluster_stats
    assert (st.membership_total.value, st.membership_change.value) == (2, 2)


def test_port_override() -> None:
    c = tlc(original_dst_lb_config={"upstream_port_override": 15443})
    h = c.choose_host(LoadBalancerContext(restored_local_address=("10.0.0.2", 9000)))
    assert h is not None and h.address_string == "10.0.0.2:15443"


def test_http_header_wins_over_the_connection() -> None:
    c = tlc(original_dst_lb_config={"use_http_header": True})
    headers = HeaderMap([("x-envoy-original-dst-host", "192.0.2.7:8080"),
                         ("x-envoy-original-dst-host", "192.0.2.8:8080")])
    h = c.choose_host(LoadBalancerContext(restored_local_address=("10.0.0.2", 9000),
                                          downstream_headers=headers))
    assert h is not None and h.address_string == "192.0.2.7:8080"  # the first value only
    bad = HeaderMap([("x-envoy-original-dst-host", "not-an-address")])
    h = c.choose_host(LoadBalancerContext(restored_local_address=("10.0.0.2", 9000),
                                          downstream_headers=bad))
    assert h is not None and h.address_string == "10.0.0.2:9000"  # falls back
    assert c.stats.counter("original_dst_host_invalid").value == 1
    assert c.choose_host(LoadBalancerContext(downstream_headers=bad)) is None


def test_header_ignored_without_use_http_header() -> None:
    c = tlc()
    headers = HeaderMap([("x-envoy-original-dst-host", "192.0.2.7:8080")])
    assert c.choose_host(LoadBalancerContext(downstream_headers=headers)) is None


def test_cleanup_keeps_used_and_busy_hosts() -> None:
    c = tlc()
    lb = c._lb
    ctx = LoadBalancerContext(restored_local_address=("10.0.0.2", 1))
    a = c.choose_host(ctx)
    b = c.choose_host(LoadBalancerContext(restored_local_address=("10.0.0.3", 1)))
    assert a is not None and b is not None
    assert lb.cleanup() == 0  # both picked since the last cleanup
    b.cx_active = 1  # a pooled or relaying connection
    assert lb.cleanup() == 1
    assert [h.address_string for h in c.hosts] == ["10.0.0.3:1"]
    b.cx_active = 0
    assert lb.cleanup() == 1 and c.hosts == []
    assert c.cluster_stats.membership_total.value == 0
    # A later pick makes a fresh host.
    assert c.choose_host(ctx) is not a


@pytest.mark.parametrize(("text", "expected"), [
    ("1.2.3.4:80", ("1.2.3.4", 80)), ("[2001:db8::1]:443", ("2001:db8::1", 443)),
    ("1.2.3.4", None), ("1.2.3.4:", None), ("1.2.3.4:65536", None), ("[::1]", None),
    ("::1:80", None), ("host.example:80", None), ("[fe80::1%eth0]:80", None),
    ("1.2.3.4:+80", None),
])
def test_parse_ip_port(text: str, expected: tuple[str, int] | None) -> None:
    assert parse_ip_port(text) == expected


@given(st.text(max_size=40))
def test_parse_ip_port_never_raises(text: str) -> None:
    parse_ip_port(text)
