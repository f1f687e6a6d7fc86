"""Loading Envoy bootstraps: formats, --config-yaml merging, @type resolution, PGV rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from google.protobuf import any_pb2, duration_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config.bootstrap import (
    bootstrap_from_bytes,
    default_bootstrap_path,
    load_bootstrap,
    unpack_any,
)
from proxy.config.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
L0 = "static_resources.listeners[0]"
HCM_PATH = f"{L0}.filter_chains[0].filters[0].typed_config"


def http_config(port: int = 10000) -> dict:
    return {
        "static_resources": {
            "listeners": [{
                "name": "http",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": HCM,
                        "stat_prefix": "ingress_http",
                        "route_config": {"virtual_hosts": [{
                            "name": "vh", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}],
                        }]},
                        "http_filters": [{"name": "envoy.filters.http.router",
                                          "typed_config": {"@type": ROUTER}}],
                    },
                }]}],
            }],
            "clusters": [{
                "name": "backend",
                "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {
                        "address": "127.0.0.1", "port_value": 8081}}}}]}]},
            }],
        }
    }


def load(cfg: dict) -> object:
    return load_bootstrap(None, yaml.safe_dump(cfg))


def refused(cfg: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(cfg)
    return info.value


def hcm(cfg: dict) -> dict:
    return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


# ----------------------------------------------------------------------------- shipped configs
def test_default_bootstrap_loads_and_answers_with_a_page() -> None:
    path = default_bootstrap_path()
    assert path.is_file()
    b = load_bootstrap(str(path), None)
    (listener,) = b.static_resources.listeners
    assert listener.name == "trioxy_default"
    assert (listener.address.socket_address.address, listener.address.socket_address.port_value) \
        == ("127.0.0.1", 10000)
    cfg = unpack_any(listener.filter_chains[0].filters[0].typed_config, "x")
    assert cfg.stat_prefix == "ingress_http"
    route = cfg.route_config.virtual_hosts[0].routes[0]
    assert route.direct_response.status == 200
    body = route.direct_response.body.inline_string
    assert body.startswith("trioxy works.")
    assert "--mode validate -c examples/front-proxy.yaml" in body
    assert cfg.access_log[0].typed_config.type_url.endswith("StdoutAccessLog")


@pytest.mark.parametrize("name", ["front-proxy.yaml", "tcp-proxy.yaml"])
def test_examples_load(name: str) -> None:
    b = load_bootstrap(str(ROOT / "examples" / name), None)
    assert b.static_resources.listeners and b.static_resources.clusters


def test_front_proxy_has_the_sandbox_shape() -> None:
    b = load_bootstrap(str(ROOT / "examples" / "front-proxy.yaml"), None)
    (listener,) = b.static_resources.listeners
    assert listener.address.socket_address.port_value == 8080
    cfg = unpack_any(listener.filter_chains[0].filters[0].typed_config, "x")
    routes = cfg.route_config.virtual_hosts[0].routes
    assert [(r.match.prefix, r.route.cluster) for r in routes] == [
        ("/service/1", "service1"), ("/service/2", "service2")]
    assert [c.name for c in b.static_resources.clusters] == ["service1", "service2"]
    assert all(c.type == c.STRICT_DNS for c in b.static_resources.clusters)


# ----------------------------------------------------------------------------- formats
def test_yaml_and_json_files_give_the_same_bootstrap(tmp_path: Path) -> None:
    cfg = http_config()
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "a.yml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "a.json").write_text(json.dumps(cfg))
    (tmp_path / "a.conf").write_text(yaml.safe_dump(cfg))  # unknown extension: read as YAML
    loaded = [load_bootstrap(str(tmp_path / n), None) for n in ("a.yaml", "a.yml", "a.json", "a.conf")]
    assert all(b == loaded[0] for b in loaded)
    assert loaded[0].static_resources.clusters[0].connect_timeout.seconds == 1


@pytest.mark.parametrize("suffix", [".pb", ".pb_text"])
def test_proto_formats_are_refused(tmp_path: Path, suffix: str) -> None:
    p = tmp_path / f"envoy{suffix}"
    p.write_bytes(b"")
    with pytest.raises(ConfigError, match="YAML"):
        load_bootstrap(str(p), None)


def test_no_config_at_all_is_an_error() -> None:
    with pytest.raises(ConfigError, match="--config-path"):
        load_bootstrap(None, None)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "a: [b\n"])
def test_empty_or_malformed_yaml_is_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        load_bootstrap(None, text)


def test_malformed_json_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.json"
    p.write_text("{")
    with pytest.raises(ConfigError, match="bad.json: invalid JSON"):
        load_bootstrap(str(p), None)


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        load_bootstrap(str(tmp_path / "nope.yaml"), None)


# ----------------------------------------------------------------------------- --config-yaml
def test_config_yaml_merges_over_the_file(tmp_path: Path) -> None:
    p = tmp_path / "envoy.yaml"
    p.write_text(yaml.safe_dump(http_config()))
    overlay = """
node: {id: edge-1, cluster: edge}
static_resources:
  clusters:
  - name: extra
    connect_timeout: 2s
    load_assignment:
      cluster_name: extra
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 9}}}}]}]
"""
    b = load_bootstrap(str(p), overlay)
    assert b.node.id == "edge-1"
    # Repeated fields append, as proto MergeFrom does in Envoy.
    assert [c.name for c in b.static_resources.clusters] == ["backend", "extra"]
    assert len(b.static_resources.listeners) == 1


def test_config_yaml_scalars_override(tmp_path: Path) -> None:
    p = tmp_path / "envoy.yaml"
    p.write_text(yaml.safe_dump({**http_config(), "node": {"id": "a", "cluster": "c"}}))
    b = load_bootstrap(str(p), "node: {id: b}")
    assert (b.node.id, b.node.cluster) == ("b", "c")


def test_config_yaml_alone_is_a_config() -> None:
    b = load_bootstrap(None, yaml.safe_dump(http_config()))
    assert b.static_resources.listeners[0].name == "http"


def test_merged_result_is_validated(tmp_path: Path) -> None:
    p = tmp_path / "envoy.yaml"
    p.write_text(yaml.safe_dump(http_config()))
    with pytest.raises(ConfigError) as info:
        load_bootstrap(str(p), "static_resources: {clusters: [{name: ''}]}")
    assert info.value.path == "static_resources.clusters[1].name"


# ----------------------------------------------------------------------------- parse errors
def test_unknown_field_typo_names_the_path_and_suggests() -> None:
    cfg = http_config()
    listener = cfg["static_resources"]["listeners"][0]
    listener["adress"] = listener.pop("address")
    err = refused(cfg)
    assert err.path == f"{L0}.adress"
    assert "unknown field 'adress'" in err.message
    assert "did you mean 'address'" in err.message


def test_unknown_field_inside_typed_config_names_the_path() -> None:
    cfg = http_config()
    hcm(cfg)["stat_prefx"] = "x"
    err = refused(cfg)
    assert err.path == f"{HCM_PATH}.stat_prefx"
    assert "HttpConnectionManager" in err.message


def test_bad_value_names_the_path() -> None:
    cfg = http_config()
    cfg["static_resources"]["clusters"][0]["connect_timeout"] = "5"
    err = refused(cfg)
    assert err.path == "static_resources.clusters[0].connect_timeout"
    assert "Duration" in err.message


def test_unknown_enum_value_names_the_path() -> None:
    cfg = http_config()
    cfg["static_resources"]["clusters"][0]["type"] = "NOT_A_TYPE"
    err = refused(cfg)
    assert err.path == "static_resources.clusters[0].type"
    assert "NOT_A_TYPE" in err.message


def test_unknown_type_url_names_the_path() -> None:
    cfg = http_config()
    hcm(cfg)["@type"] = "type.googleapis.com/envoy.extensions.filters.network.nope.v3.Nope"
    err = refused(cfg)
    assert err.path == HCM_PATH
    assert "envoy.extensions.filters.network.nope.v3.Nope" in err.message


def test_type_url_of_a_real_but_unsupported_extension_is_refused() -> None:
    cfg = http_config()
    hcm(cfg)["http_filters"].insert(0, {
        "name": "envoy.filters.http.cors",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"},
    })
    err = refused(cfg)
    assert err.path == f"{HCM_PATH}.http_filters[0].typed_config"
    assert "envoy.extensions.filters.http.cors.v3.Cors is not supported" in err.message


# ----------------------------------------------------------------------------- Any, bytes
def test_unpack_any_imports_the_module_on_demand() -> None:
    any_msg = any_pb2.Any()
    # A type no test above names, in a package with several modules.
    any_msg.type_url = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer"
    msg = unpack_any(any_msg, "p")
    assert msg.DESCRIPTOR.full_name == "envoy.extensions.filters.http.buffer.v3.Buffer"


def test_unpack_any_nested_message_type() -> None:
    any_msg = any_pb2.Any(type_url="type.googleapis.com/envoy.config.route.v3.RouteAction.HashPolicy")
    assert unpack_any(any_msg, "p").DESCRIPTOR.name == "HashPolicy"


def test_unpack_any_unknown_type_names_the_path() -> None:
    with pytest.raises(ConfigError) as info:
        unpack_any(any_pb2.Any(type_url="type.googleapis.com/no.such.Type"), "a.b")
    assert info.value.path == "a.b"


def test_unpack_any_well_known_type() -> None:
    any_msg = any_pb2.Any()
    any_msg.Pack(duration_pb2.Duration(seconds=3))
    assert unpack_any(any_msg, "p").seconds == 3


def test_bootstrap_round_trips_through_bytes() -> None:
    b = load_bootstrap(str(ROOT / "examples" / "front-proxy.yaml"), None)
    again = bootstrap_from_bytes(b.SerializeToString())
    assert again == b
    cfg = unpack_any(again.static_resources.listeners[0].filter_chains[0].filters[0].typed_config, "x")
    assert cfg.http_filters[0].name == "envoy.filters.http.router"


def test_bootstrap_from_garbage_bytes_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        bootstrap_from_bytes(b"\xff\xff\xff")


# ----------------------------------------------------------------------------- PGV rules
def test_port_out_of_range_is_refused() -> None:
    err = refused(http_config(port=70000))
    assert err.path == f"{L0}.address.socket_address.port_value"
    assert err.message == "value must be less than or equal to 65535"


def test_cluster_without_name_is_refused() -> None:
    cfg = http_config()
    del cfg["static_resources"]["clusters"][0]["name"]
    err = refused(cfg)
    assert err.path == "static_resources.clusters[0].name"
    assert "at least 1" in err.message


def test_zero_connect_timeout_is_refused() -> None:
    cfg = http_config()
    cfg["static_resources"]["clusters"][0]["connect_timeout"] = "0s"
    err = refused(cfg)
    assert err.path == "static_resources.clusters[0].connect_timeout"
    assert err.message == "value must be greater than 0s"


def test_dns_refresh_rate_must_exceed_one_millisecond() -> None:
    cfg = http_config()
    cfg["static_resources"]["clusters"][0]["dns_refresh_rate"] = "0.001s"
    err = refused(cfg)
    assert err.message == "value must be greater than 0.001s"
    cfg["static_resources"]["clusters"][0]["dns_refresh_rate"] = "0.002s"
    load(cfg)


def test_socket_address_without_address_is_refused() -> None:
    cfg = http_config()
    del cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["address"]
    err = refused(cfg)
    assert err.path == f"{L0}.address.socket_address.address"


def test_hcm_without_stat_prefix_is_refused() -> None:
    cfg = http_config()
    del hcm(cfg)["stat_prefix"]
    err = refused(cfg)
    assert err.path == f"{HCM_PATH}.stat_prefix"


def test_route_without_match_or_action_is_refused() -> None:
    cfg = http_config()
    routes = hcm(cfg)["route_config"]["virtual_hosts"][0]["routes"]
    routes[0] = {"match": {"prefix": "/"}}
    err = refused(cfg)
    assert err.path == f"{HCM_PATH}.route_config.virtual_hosts[0].routes[0]"
    assert "route" in err.message and "direct_response" in err.message
    routes[0] = {"route": {"cluster": "backend"}}
    err = refused(cfg)
    assert err.path == f"{HCM_PATH}.route_config.virtual_hosts[0].routes[0].match"
    assert err.message == "value is required"


def test_virtual_host_needs_a_domain() -> None:
    cfg = http_config()
    hcm(cfg)["route_config"]["virtual_hosts"][0]["domains"] = []
    err = refused(cfg)
    assert err.path == f"{HCM_PATH}.route_config.virtual_hosts[0].domains"
    assert "at least 1" in err.message


def test_header_name_rule_applies_to_list_items() -> None:
    cfg = http_config()
    hcm(cfg)["route_config"]["virtual_hosts"][0]["request_headers_to_remove"] = ["x-ok", ""]
    err = refused(cfg)
    assert err.path == f"{HCM_PATH}.route_config.virtual_hosts[0].request_headers_to_remove[1]"


def test_wrapper_rule_applies_to_the_wrapped_value() -> None:
    cfg = http_config()
    hcm(cfg)["max_request_headers_kb"] = 9000
    err = refused(cfg)
    assert err.path == f"{HCM_PATH}.max_request_headers_kb"
    assert err.message == "value must be inside range (0, 8192]"


def test_header_value_with_newline_is_refused() -> None:
    cfg = http_config()
    hcm(cfg)["server_name"] = "evil\r\nx: y"
    err = refused(cfg)
    assert err.path == f"{HCM_PATH}.server_name"


def test_enum_number_outside_the_enum_is_refused() -> None:
    cfg = http_config()
    cfg["static_resources"]["clusters"][0]["lb_policy"] = 99
    err = refused(cfg)
    assert err.path == "static_resources.clusters[0].lb_policy"
    assert "defined enum values" in err.message


def test_tcp_proxy_max_connect_attempts_at_least_one() -> None:
    cfg = http_config()
    cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0] = {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": TCP, "stat_prefix": "t", "cluster": "backend",
                         "max_connect_attempts": 0},
    }
    err = refused(cfg)
    assert err.path == f"{HCM_PATH}.max_connect_attempts"
    assert err.message == "value must be greater than or equal to 1"


# ----------------------------------------------------------------------------- robustness
_scalars = st.none() | st.booleans() | st.integers(-2, 70000) | st.sampled_from(
    ["", "x", "1s", "STATIC", "127.0.0.1", "@type", "type.googleapis.com/" + HCM.rsplit("/", 1)[1]])
_keys = st.sampled_from(["name", "address", "socket_address", "port_value", "filter_chains",
                         "filters", "typed_config", "@type", "clusters", "listeners", "type",
                         "connect_timeout", "load_assignment", "endpoints", "stat_prefix", "zzz"])
_trees = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(_keys, inner, max_size=4), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=st.dictionaries(st.sampled_from(["static_resources", "node", "admin", "layered_runtime"]),
                            _trees, max_size=2))
def test_any_input_loads_or_raises_config_error(tree: dict) -> None:
    try:
        load_bootstrap(None, json.dumps(tree))
    except ConfigError:
        pass


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


_BASE_PATHS = _paths(http_config())[1:]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(where=st.sampled_from(_BASE_PATHS), value=_trees)
def test_any_mutation_of_a_valid_config_loads_or_raises_config_error(where: tuple, value: object) -> None:
    cfg = http_config()
    node = cfg
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    try:
        load_bootstrap(None, json.dumps(cfg))
    except ConfigError as exc:
        assert "Traceback" not in str(exc)
