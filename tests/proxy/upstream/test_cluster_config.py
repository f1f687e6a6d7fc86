"""ClusterConfig.from_proto: Envoy's defaults, the values it refuses, and the paths it names."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from proxy.config.bootstrap import load_bootstrap
from proxy.config.context import FactoryContext
from proxy.config.errors import ConfigError
from proxy.config.runtime import Runtime
from proxy.config.snapshot import build_snapshot
from proxy.upstream.cluster_config import (
    DEFAULT_UPSTREAM_IDLE_TIMEOUT_S,
    HTTP_PROTOCOL_OPTIONS_KEY,
    ClusterConfig,
    DiscoveryType,
    DnsLookupFamily,
    EndpointSpec,
    LbPolicy,
)

PATH = "static_resources.clusters[3]"
HPO_TYPE = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def sa(address: str, port: int = 8080, **extra: Any) -> dict[str, Any]:
    return {"endpoint": {"address": {"socket_address": {
        "address": address, "port_value": port}}}, **extra}


def cluster(**fields: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": "backend"}
    d.update(fields)
    return d


def compile_cluster(d: dict[str, Any], ctx: FactoryContext | None = None) -> ClusterConfig:
    return ClusterConfig.from_proto(json_format.ParseDict(d, Cluster()), ctx or FactoryContext(),
                                    PATH)


def refused(d: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        compile_cluster(d)
    return info.value


def static(*endpoints: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return cluster(load_assignment={"cluster_name": "backend",
                                    "endpoints": [{"lb_endpoints": list(endpoints)}]}, **fields)


# ----------------------------------------------------------------------------- defaults
def test_envoy_defaults() -> None:
    cfg = compile_cluster(static(sa("127.0.0.1")))
    assert cfg.name == "backend"
    assert cfg.type is DiscoveryType.STATIC
    assert cfg.connect_timeout == 5.0
    assert cfg.lb_policy is LbPolicy.ROUND_ROBIN
    assert cfg.ring_hash.minimum_ring_size == 1024
    assert cfg.ring_hash.maximum_ring_size == 8 * 1024 * 1024
    assert cfg.maglev.table_size == 65537
    assert cfg.least_request.choice_count == 2
    assert cfg.dns_refresh_rate == 5.0
    assert cfg.dns_lookup_family is DnsLookupFamily.AUTO
    assert cfg.per_connection_buffer_limit_bytes == 1024 * 1024
    assert cfg.idle_timeout == DEFAULT_UPSTREAM_IDLE_TIMEOUT_S == 4.0
    assert cfg.max_requests_per_connection is None
    assert cfg.healthy_panic_threshold == 50
    assert cfg.endpoints == (EndpointSpec("127.0.0.1", 8080),)
    assert not cfg.is_dns


def test_set_values() -> None:
    cfg = compile_cluster(static(
        sa("10.0.0.1"),
        connect_timeout="0.25s", lb_policy="LEAST_REQUEST",
        least_request_lb_config={"choice_count": 3},
        per_connection_buffer_limit_bytes=32768, dns_refresh_rate="2s",
        dns_lookup_family="V4_ONLY"))
    assert cfg.connect_timeout == 0.25
    assert cfg.lb_policy is LbPolicy.LEAST_REQUEST
    assert cfg.least_request.choice_count == 3
    assert cfg.per_connection_buffer_limit_bytes == 32768
    assert cfg.dns_refresh_rate == 2.0
    assert cfg.dns_lookup_family is DnsLookupFamily.V4_ONLY


def test_zero_endpoints_is_a_valid_cluster() -> None:
    assert compile_cluster(cluster()).endpoints == ()
    assert compile_cluster(cluster(type="STRICT_DNS")).endpoints == ()


def test_load_assignment_cluster_name_may_differ() -> None:
    d = static(sa("127.0.0.1"))
    d["load_assignment"]["cluster_name"] = "something_else"
    assert compile_cluster(d).name == "backend"


def test_panic_threshold_from_runtime() -> None:
    rt = Runtime.from_dict({"upstream": {"healthy_panic_threshold": 30}})
    assert compile_cluster(cluster(), FactoryContext(runtime=rt)).healthy_panic_threshold == 30
    rt = Runtime.from_dict({"upstream.healthy_panic_threshold": 250})
    assert compile_cluster(cluster(), FactoryContext(runtime=rt)).healthy_panic_threshold == 100


# ----------------------------------------------------------------------------- endpoints
def test_endpoints_weights_priorities_localities_hostnames() -> None:
    d = cluster(load_assignment={"cluster_name": "backend", "endpoints": [
        {"lb_endpoints": [sa("10.0.0.1", 80, load_balancing_weight=3),
                          {"endpoint": {"hostname": "a.example",
                                        "address": {"socket_address": {
                                            "address": "0:0::1", "port_value": 81}}}}]},
        {"priority": 1, "load_balancing_weight": 7,
         "locality": {"zone": "z"}, "lb_endpoints": [sa("10.0.0.3", 82)]},
    ]})
    assert compile_cluster(d).endpoints == (
        EndpointSpec("10.0.0.1", 80, "", 3, 0, None),
        EndpointSpec("::1", 81, "a.example", 1, 0, None),  # IPv6 normalized
        EndpointSpec("10.0.0.3", 82, "", 1, 1, 7),
    )


def test_static_refuses_a_hostname_naming_the_field() -> None:
    err = refused(static(sa("10.0.0.1"), sa("backend.internal")))
    assert err.path == (f"{PATH}.load_assignment.endpoints[0].lb_endpoints[1]"
                        ".endpoint.address.socket_address.address")
    assert "malformed IP address: backend.internal" in err.message


def test_strict_dns_takes_names_and_uses_them_as_hostnames() -> None:
    cfg = compile_cluster(static(sa("backend.internal", 80), sa("other", 81),
                                 {"endpoint": {"hostname": "explicit", "address": {
                                     "socket_address": {"address": "x", "port_value": 82}}}},
                                 type="STRICT_DNS"))
    assert cfg.is_dns
    assert [(e.address, e.hostname) for e in cfg.endpoints] == [
        ("backend.internal", "backend.internal"), ("other", "other"), ("x", "explicit")]


def test_logical_dns_needs_exactly_one_endpoint() -> None:
    err = refused(static(sa("a"), sa("b"), type="LOGICAL_DNS"))
    assert err.path == f"{PATH}.load_assignment"
    assert "single" in err.message
    err = refused(cluster(type="LOGICAL_DNS"))
    assert err.path == f"{PATH}.load_assignment"
    two_localities = cluster(type="LOGICAL_DNS", load_assignment={
        "cluster_name": "b", "endpoints": [{"lb_endpoints": [sa("a")]},
                                           {"lb_endpoints": [sa("b")]}]})
    assert refused(two_localities).path == f"{PATH}.load_assignment"


def test_logical_dns_priority_is_forced_to_zero() -> None:
    cfg = compile_cluster(cluster(type="LOGICAL_DNS", load_assignment={
        "cluster_name": "b", "endpoints": [{"priority": 2, "lb_endpoints": [sa("a")]}]}))
    assert cfg.endpoints[0].priority == 0


@pytest.mark.parametrize(
    ("endpoint", "field", "words"),
    [
        (sa("10.0.0.1", 0), "endpoint.address.socket_address.port_value", "1..65535"),
        ({"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 1,
                                                      "protocol": "UDP"}}}},
         "endpoint.address.socket_address.protocol", "TCP"),
        ({"endpoint": {}}, "endpoint.address", "needs an address"),
        (sa("10.0.0.1", 80, load_balancing_weight=0), "load_balancing_weight", ">= 1"),
    ],
)
def test_bad_endpoint_fields(endpoint: dict[str, Any], field: str, words: str) -> None:
    err = refused(static(endpoint))
    assert err.path == f"{PATH}.load_assignment.endpoints[0].lb_endpoints[0].{field}"
    expected = "greater than or equal to 1" if words == ">= 1" else words
    assert expected in err.message


def test_weight_sum_per_priority_must_fit_uint32() -> None:
    big = 2**31
    err = refused(static(sa("10.0.0.1", 1, load_balancing_weight=big),
                         sa("10.0.0.2", 1, load_balancing_weight=big)))
    assert err.path.endswith("lb_endpoints[1].load_balancing_weight")
    assert "4294967295" in err.message


def test_priority_above_128_refused() -> None:
    d = cluster(load_assignment={"cluster_name": "b", "endpoints": [
        {"priority": 129, "lb_endpoints": [sa("10.0.0.1")]}]})
    assert refused(d).path == f"{PATH}.load_assignment.endpoints[0].priority"


@given(st.lists(st.tuples(st.integers(0, 3), st.lists(
    st.tuples(st.integers(1, 255), st.integers(1, 65535), st.integers(1, 1000)),
    min_size=0, max_size=4)), max_size=4))
def test_endpoints_flatten_in_config_order(localities: list[Any]) -> None:
    d = cluster(load_assignment={"cluster_name": "b", "endpoints": [
        {"priority": prio, "lb_endpoints": [
            sa(f"10.0.0.{octet}", port, load_balancing_weight=w) for octet, port, w in eps]}
        for prio, eps in localities]})
    assert compile_cluster(d).endpoints == tuple(
        EndpointSpec(f"10.0.0.{octet}", port, "", w, prio)
        for prio, eps in localities for octet, port, w in eps)


# ----------------------------------------------------------------------------- types, policies
@pytest.mark.parametrize("ctype", ["EDS"])
def test_refused_discovery_types(ctype: str) -> None:
    err = refused(cluster(type=ctype))
    assert err.path == f"{PATH}.type"
    assert ctype in err.message


def test_custom_cluster_type_refused() -> None:
    err = refused(cluster(cluster_type={"name": "envoy.clusters.aggregate"}))
    assert err.path.startswith(f"{PATH}.cluster_type")


@pytest.mark.parametrize("policy", ["LOAD_BALANCING_POLICY_CONFIG"])
def test_refused_lb_policies(policy: str) -> None:
    err = refused(cluster(lb_policy=policy))
    assert err.path == f"{PATH}.lb_policy"
    assert policy in err.message


@pytest.mark.parametrize("policy", [p for p in LbPolicy if p is not LbPolicy.CLUSTER_PROVIDED])
def test_accepted_lb_policies(policy: LbPolicy) -> None:
    assert compile_cluster(cluster(lb_policy=policy.value)).lb_policy is policy


def test_unsupported_field_refused_by_the_allowlist() -> None:
    err = refused(cluster(upstream_connection_options={}))
    assert err.path == f"{PATH}.upstream_connection_options"


def test_name_required() -> None:
    assert refused({"connect_timeout": "1s"}).path == f"{PATH}.name"


def test_connect_timeout_must_be_positive() -> None:
    assert refused(cluster(connect_timeout="0s")).path == f"{PATH}.connect_timeout"


def test_ring_hash_config() -> None:
    cfg = compile_cluster(cluster(lb_policy="RING_HASH", ring_hash_lb_config={
        "minimum_ring_size": 16, "maximum_ring_size": 4096}))
    assert (cfg.ring_hash.minimum_ring_size, cfg.ring_hash.maximum_ring_size) == (16, 4096)
    err = refused(cluster(lb_policy="RING_HASH", ring_hash_lb_config={
        "minimum_ring_size": 4096, "maximum_ring_size": 16}))
    assert err.path == f"{PATH}.ring_hash_lb_config"
    assert "minimum_ring_size (4096) > maximum_ring_size (16)" in err.message
    err = refused(cluster(lb_policy="RING_HASH", ring_hash_lb_config={
        "maximum_ring_size": 8388609}))
    assert err.path == f"{PATH}.ring_hash_lb_config.maximum_ring_size"
    err = refused(cluster(lb_policy="RING_HASH", ring_hash_lb_config={"minimum_ring_size": 0}))
    assert err.path == f"{PATH}.ring_hash_lb_config.minimum_ring_size"


def test_ring_hash_function() -> None:
    compile_cluster(cluster(lb_policy="RING_HASH", ring_hash_lb_config={
        "hash_function": "XX_HASH"}))
    err = refused(cluster(lb_policy="RING_HASH", ring_hash_lb_config={
        "hash_function": "MURMUR_HASH_2"}))
    assert err.path == f"{PATH}.ring_hash_lb_config.hash_function"


def test_maglev_table_size_must_be_prime() -> None:
    assert compile_cluster(cluster(lb_policy="MAGLEV", maglev_lb_config={
        "table_size": 251})).maglev.table_size == 251
    for bad in (65536, 1, 5000011 * 2):
        err = refused(cluster(lb_policy="MAGLEV", maglev_lb_config={"table_size": bad}))
        assert err.path == f"{PATH}.maglev_lb_config.table_size"


def test_choice_count_at_least_two() -> None:
    err = refused(cluster(lb_policy="LEAST_REQUEST", least_request_lb_config={
        "choice_count": 1}))
    assert err.path == f"{PATH}.least_request_lb_config.choice_count"


# ----------------------------------------------------------------------------- HTTP options
def typed_http(**common: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {"@type": HPO_TYPE,
                            "explicit_http_config": {"http_protocol_options": {}}}
    if common:
        opts["common_http_protocol_options"] = common
    return {HTTP_PROTOCOL_OPTIONS_KEY: opts}


def test_typed_http_protocol_options() -> None:
    cfg = compile_cluster(cluster(typed_extension_protocol_options=typed_http(
        idle_timeout="30s", max_requests_per_connection=100)))
    assert cfg.idle_timeout == 30.0
    assert cfg.max_requests_per_connection == 100
    cfg = compile_cluster(cluster(typed_extension_protocol_options=typed_http()))
    assert cfg.idle_timeout == 4.0
    assert cfg.max_requests_per_connection is None


def test_idle_timeout_zero_disables_and_zero_requests_is_unlimited() -> None:
    cfg = compile_cluster(cluster(typed_extension_protocol_options=typed_http(
        idle_timeout="0s", max_requests_per_connection=0)))
    assert cfg.idle_timeout is None
    assert cfg.max_requests_per_connection is None


def test_deprecated_cluster_common_http_protocol_options() -> None:
    cfg = compile_cluster(cluster(common_http_protocol_options={
        "idle_timeout": "1.5s", "max_requests_per_connection": 1}))
    assert (cfg.idle_timeout, cfg.max_requests_per_connection) == (1.5, 1)


def test_both_http_option_spellings_refused() -> None:
    d = cluster(typed_extension_protocol_options=typed_http(idle_timeout="1s"),
                common_http_protocol_options={"idle_timeout": "2s"})
    assert refused(d).path == f"{PATH}.common_http_protocol_options"


@pytest.mark.parametrize(
    "options",
    [
        {"@type": HPO_TYPE, "explicit_http_config": {"http3_protocol_options": {}}},
        {"@type": HPO_TYPE, "auto_config": {}},  # plaintext: nothing to negotiate with
        {"@type": HPO_TYPE, "use_downstream_protocol_config": {}},
        {"@type": HPO_TYPE, "explicit_http_config": {"http_protocol_options": {}},
         "common_http_protocol_options": {"max_headers_count": 10}},
    ],
)
def test_unsupported_http_options_refused(options: dict[str, Any]) -> None:
    err = refused(cluster(typed_extension_protocol_options={HTTP_PROTOCOL_OPTIONS_KEY: options}))
    assert err.path.startswith(
        f'{PATH}.typed_extension_protocol_options["{HTTP_PROTOCOL_OPTIONS_KEY}"]')


def test_upstream_http2_spellings() -> None:
    explicit = compile_cluster(
        cluster(typed_extension_protocol_options={HTTP_PROTOCOL_OPTIONS_KEY: {
            "@type": HPO_TYPE, "explicit_http_config": {"http2_protocol_options": {
                "max_concurrent_streams": 5}}}}))
    assert explicit.upstream_protocol == "http2"
    assert explicit.http2_options.max_concurrent_streams == 5
    deprecated = compile_cluster(
        cluster(http2_protocol_options={"initial_stream_window_size": 131072}))
    assert deprecated.upstream_protocol == "http2"
    assert deprecated.http2_options.initial_stream_window_size == 131072
    assert compile_cluster(cluster()).upstream_protocol == "http1"
    err = refused(cluster(http2_protocol_options={"max_concurrent_streams": 0}))
    assert err.path == f"{PATH}.http2_protocol_options.max_concurrent_streams"
    err = refused(cluster(http2_protocol_options={}, typed_extension_protocol_options=typed_http()))
    assert err.path == f"{PATH}.http2_protocol_options"


# ----------------------------------------------------------------------------- through a bootstrap
def test_bootstrap_to_snapshot() -> None:
    yaml = """
static_resources:
  clusters:
  - name: web
    connect_timeout: 0.5s
    type: STRICT_DNS
    lb_policy: MAGLEV
    maglev_lb_config: {table_size: 1031}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options: {idle_timeout: 10s}
        explicit_http_config: {http_protocol_options: {}}
    load_assignment:
      cluster_name: web
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: localhost, port_value: 8080}}}
"""
    snapshot = build_snapshot(load_bootstrap(None, yaml))
    cfg = snapshot.clusters["web"]
    assert cfg.type is DiscoveryType.STRICT_DNS
    assert cfg.lb_policy is LbPolicy.MAGLEV
    assert cfg.maglev.table_size == 1031
    assert cfg.idle_timeout == 10.0
    assert cfg.endpoints == (EndpointSpec("localhost", 8080, "localhost"),)


def test_bootstrap_static_hostname_names_the_cluster_path() -> None:
    yaml = """
static_resources:
  clusters:
  - name: ok
    load_assignment: {cluster_name: ok}
  - name: web
    load_assignment:
      cluster_name: web
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: localhost, port_value: 8080}}}
"""
    with pytest.raises(ConfigError) as info:
        build_snapshot(load_bootstrap(None, yaml))
    assert info.value.path == ("static_resources.clusters[1].load_assignment.endpoints[0]"
                               ".lb_endpoints[0].endpoint.address.socket_address.address")


def test_auto_config_over_tls() -> None:
    """auto_config: ALPN picks HTTP/2 or HTTP/1.1 per host; TLS only, as Envoy."""
    tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                 "UpstreamTlsContext"}}
    auto = {HTTP_PROTOCOL_OPTIONS_KEY: {"@type": HPO_TYPE, "auto_config": {
        "http2_protocol_options": {"max_concurrent_streams": 7}}}}
    cfg = compile_cluster(cluster(transport_socket=tls, typed_extension_protocol_options=auto))
    assert cfg.upstream_protocol == "auto"
    assert cfg.http2_options.max_concurrent_streams == 7
    raw = {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3."
                 "RawBuffer"}}
    err = refused(cluster(transport_socket=raw, typed_extension_protocol_options=auto))
    assert err.path.endswith(".auto_config")
