"""gRPC helpers (pure) and the grpc_stats filter's config."""

from __future__ import annotations

import struct

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from proxy.config.bootstrap import parse_bootstrap_dict
from proxy.config.errors import ConfigError
from proxy.config.snapshot import build_snapshot
from proxy.http.grpc import (
    MessageCounter,
    grpc_timeout_s,
    http_to_grpc_status,
    is_grpc_request,
    percent_encode,
    resolve_service_and_method,
    to_grpc_timeout,
)
from proxy.http.headers import HeaderMap


@pytest.mark.parametrize(("http", "grpc"), [
    (400, 13), (401, 16), (403, 7), (404, 12), (429, 14), (502, 14), (503, 14), (504, 14),
    (500, 2), (200, 2),
])
def test_envoy_http_to_grpc_status(http: int, grpc: int) -> None:
    assert http_to_grpc_status(http) == grpc


def test_is_grpc_request() -> None:
    for ct, want in (("application/grpc", True), ("application/grpc+proto", True),
                     ("application/grpc;x", True), ("application/grpcfoo", False),
                     ("application/json", False), (None, False)):
        h = HeaderMap([] if ct is None else [("content-type", ct)])
        assert is_grpc_request(h) is want


def test_percent_encode_and_names() -> None:
    assert percent_encode("no route") == "no route"
    assert percent_encode("50% é\n") == "50%25 %C3%A9%0A"
    assert resolve_service_and_method("/pkg.Svc/Method") == ("pkg.Svc", "Method")
    assert resolve_service_and_method("/nope") is None
    assert resolve_service_and_method("/a/b/c") is None


def test_grpc_timeout_header() -> None:
    def t(v: str) -> float | None:
        return grpc_timeout_s(HeaderMap([("grpc-timeout", v)]))

    assert t("1S") == 1.0 and t("200m") == 0.2 and t("2M") == 120.0 and t("1H") == 3600.0
    assert t("5u") == pytest.approx(5e-6)
    assert t("123456789S") is None and t("1x") is None and t("S") is None
    assert to_grpc_timeout(0.3) == "300m" and to_grpc_timeout(200000.0) == "200000S"


def frames(messages: list[bytes]) -> bytes:
    return b"".join(b"\x00" + struct.pack(">I", len(m)) + m for m in messages)


@given(st.lists(st.binary(max_size=300), max_size=20), st.lists(st.integers(1, 64), min_size=1))
def test_message_counter_any_chunking(messages: list[bytes], cuts: list[int]) -> None:
    raw = frames(messages)
    c = MessageCounter()
    i = 0
    k = 0
    while i < len(raw):
        n = cuts[k % len(cuts)]
        c.inspect(raw[i:i + n])
        i += n
        k += 1
    assert c.count == len(messages)


GRPC_STATS = """
static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: 1}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: s
          route_config: {virtual_hosts: [{name: v, domains: ["*"], routes: []}]}
          http_filters:
          - name: envoy.filters.http.grpc_stats
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig
              %s
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
"""


def grpc_stats_config(body: str) -> object:
    return build_snapshot(parse_bootstrap_dict(yaml.safe_load(GRPC_STATS % body)))


def test_grpc_stats_names() -> None:
    from proxy.extensions.filters.http.grpc_stats.grpc_stats import GrpcStatsConfig

    allow = GrpcStatsConfig(stats_for_all_methods=False, allowlist={"a.S": frozenset({"M"})},
                            enable_upstream_stats=False, replace_dots_in_grpc_service_name=True)
    assert allow.stat_prefix("c", "/a.S/M") == "cluster.c.grpc.a_S.M."
    assert allow.stat_prefix("c", "/a.S/N") == "cluster.c.grpc."
    assert allow.stat_prefix("c", "/bad") == "cluster.c.grpc."


def test_grpc_stats_emit_filter_state_is_refused() -> None:
    with pytest.raises(ConfigError, match="emit_filter_state"):
        grpc_stats_config("emit_filter_state: true")
    grpc_stats_config("stats_for_all_methods: true")
    grpc_stats_config(
        "individual_method_stats_allowlist: {services: [{name: a.S, method_names: [M]}]}")
