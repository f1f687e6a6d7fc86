"""The allowlist: every set field trioxy does not implement is refused, naming its path."""

from __future__ import annotations

import copy

import pytest
import yaml
from google.protobuf import descriptor_pool

from proxy.config.bootstrap import load_bootstrap, message_class
from proxy.config.errors import ConfigError
from proxy.config.supported import MAP_KEYS, SUBSETS, SUPPORTED, WELL_KNOWN, check

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
UPSTREAM_HTTP = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
L0 = "static_resources.listeners[0]"
HCM_PATH = f"{L0}.filter_chains[0].filters[0].typed_config"
ROUTE0 = f"{HCM_PATH}.route_config.virtual_hosts[0].routes[0]"
C0 = "static_resources.clusters[0]"

BASE = yaml.safe_load(f"""
static_resources:
  listeners:
  - name: http
    address: {{socket_address: {{address: 127.0.0.1, port_value: 10000}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: ingress_http
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: vh
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: backend}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": {ROUTER}}}
  clusters:
  - name: backend
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 8081}}}}}}
""")


def config() -> dict:
    return copy.deepcopy(BASE)


def hcm(cfg: dict) -> dict:
    return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def route(cfg: dict) -> dict:
    return hcm(cfg)["route_config"]["virtual_hosts"][0]["routes"][0]


def cluster(cfg: dict) -> dict:
    return cfg["static_resources"]["clusters"][0]


def refused(cfg: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_bootstrap(None, yaml.safe_dump(cfg))
    return info.value


# ----------------------------------------------------------------------------- the table
def test_every_table_entry_names_a_real_message_and_real_fields() -> None:
    for name, fields in SUPPORTED.items():
        desc = message_class(name, name).DESCRIPTOR
        unknown = fields - set(desc.fields_by_name)
        assert not unknown, f"{name}: no such field(s) {sorted(unknown)}"
    pool = descriptor_pool.Default()
    for (parent, field), fields in SUBSETS.items():
        child = pool.FindMessageTypeByName(parent).fields_by_name[field].message_type
        assert fields <= SUPPORTED[child.full_name], (parent, field)
    for (parent, field), keys in MAP_KEYS.items():
        assert field in SUPPORTED[parent] and keys
    for name in WELL_KNOWN:
        pool.FindMessageTypeByName(name)


def test_the_base_config_is_accepted() -> None:
    load_bootstrap(None, yaml.safe_dump(config()))


def test_a_broad_supported_config_is_accepted() -> None:
    cfg = config()
    cfg["node"] = {"id": "n", "cluster": "c", "locality": {"zone": "z"},
                   "metadata": {"filter_metadata": {"x": {"a": [1, 2]}}}}
    cfg["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}},
                    "access_log_path": "/dev/null"}
    cfg["layered_runtime"] = {"layers": [{"name": "s", "static_layer": {"a": {"b": 1}}}]}
    h = hcm(cfg)
    h.update({
        "use_remote_address": True, "xff_num_trusted_hops": 1, "via": "trioxy",
        "common_http_protocol_options": {"idle_timeout": "60s", "max_headers_count": 50},
        "http_protocol_options": {},
        "access_log": [{"name": "envoy.access_loggers.file",
                        "filter": {"and_filter": {"filters": [
                            {"status_code_filter": {"comparison": {"op": "GE", "value": {
                                "default_value": 400, "runtime_key": "k"}}}},
                            {"not_health_check_filter": {}}]}},
                        "typed_config": {"@type": FILE_LOG, "path": "/dev/stdout",
                                         "log_format": {"text_format_source": {
                                             "inline_string": "%PROTOCOL%\n"}}}}],
    })
    h["route_config"]["virtual_hosts"][0]["routes"] = [
        {"match": {"prefix": "/a", "headers": [{"name": "x", "string_match": {"exact": "1"}}]},
         "route": {"weighted_clusters": {"clusters": [{"name": "backend", "weight": 1}]},
                   "hash_policy": [{"header": {"header_name": "x"}}, {"connection_properties": {
                       "source_ip": True}, "terminal": True}],
                   "regex_rewrite": {"pattern": {"regex": "^/a"}, "substitution": "/"},
                   "timeout": "5s"}},
        {"match": {"safe_regex": {"regex": "^/r"}}, "redirect": {"https_redirect": True}},
        {"match": {"path": "/d"}, "direct_response": {"status": 404, "body": {"inline_string": "x"}},
         "response_headers_to_add": [{"header": {"key": "k", "value": "v"},
                                      "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]},
    ]
    c = cluster(cfg)
    c.update({"lb_policy": "RING_HASH", "ring_hash_lb_config": {"minimum_ring_size": 1024},
              "typed_extension_protocol_options": {UPSTREAM_HTTP: {
                  "@type": f"type.googleapis.com/{UPSTREAM_HTTP}",
                  "common_http_protocol_options": {"idle_timeout": "4s"},
                  "explicit_http_config": {"http_protocol_options": {}}}}})
    load_bootstrap(None, yaml.safe_dump(cfg))


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("mutate", "path", "field"), [
    (lambda c: c["static_resources"]["listeners"][0].update(freebind=True),
     f"{L0}.freebind", "freebind"),
    (lambda c: c["static_resources"]["listeners"][0].update(enable_reuse_port=False),
     f"{L0}.enable_reuse_port", "enable_reuse_port"),
    (lambda c: route(c)["route"].update(retry_policy={"per_try_idle_timeout": "1s"}),
     f"{ROUTE0}.route.retry_policy.per_try_idle_timeout", "per_try_idle_timeout"),
    (lambda c: route(c)["route"].update(hedge_policy={"initial_requests": 2}),
     f"{ROUTE0}.route.hedge_policy", "hedge_policy"),
    (lambda c: route(c)["route"].update(idle_timeout="5s"),
     f"{ROUTE0}.route.idle_timeout", "idle_timeout"),
    (lambda c: hcm(c).update(normalize_path=True), f"{HCM_PATH}.normalize_path", "normalize_path"),
    (lambda c: hcm(c).update(http_protocol_options={"accept_http_10": True}),
     f"{HCM_PATH}.http_protocol_options.accept_http_10", "accept_http_10"),
    (lambda c: hcm(c)["http_filters"][0].update(is_optional=True),
     f"{HCM_PATH}.http_filters[0].is_optional", "is_optional"),
    (lambda c: hcm(c)["http_filters"][0]["typed_config"].update(start_child_span=True),
     f"{HCM_PATH}.http_filters[0].typed_config.start_child_span", "start_child_span"),
    (lambda c: hcm(c)["route_config"]["virtual_hosts"][0].update(require_tls="ALL"),
     f"{HCM_PATH}.route_config.virtual_hosts[0].require_tls", "require_tls"),
    (lambda c: route(c).update(metadata={"filter_metadata": {"a": {}}}),
     f"{ROUTE0}.metadata", "metadata"),
    (lambda c: route(c)["match"].update(grpc={}), f"{ROUTE0}.match.grpc", "grpc"),
    (lambda c: route(c).update(match={"safe_regex": {
        "regex": "x", "google_re2": {"max_program_size": 10}}}),
     f"{ROUTE0}.match.safe_regex.google_re2.max_program_size", "max_program_size"),
    (lambda c: cluster(c).update(respect_dns_ttl=True), f"{C0}.respect_dns_ttl", "respect_dns_ttl"),
    (lambda c: cluster(c).update(health_checks=[{"timeout": "1s", "interval": "1s",
                                                 "tcp_health_check": {},
                                                 "event_log_path": "/tmp/hc.log"}]),
     f"{C0}.health_checks[0].event_log_path", "event_log_path"),
    (lambda c: cluster(c).update(common_http_protocol_options={"max_headers_count": 10}),
     f"{C0}.common_http_protocol_options.max_headers_count", "max_headers_count"),
    (lambda c: cluster(c)["load_assignment"]["endpoints"][0]["lb_endpoints"][0].update(
        health_status="HEALTHY"),
     f"{C0}.load_assignment.endpoints[0].lb_endpoints[0].health_status", "health_status"),
    (lambda c: c.update(stats_flush_interval="5s"), "stats_flush_interval", "stats_flush_interval"),
    (lambda c: c.update(layered_runtime={"layers": [{"name": "d", "disk_layer": {
        "symlink_root": "/x"}}]}), "layered_runtime.layers[0].disk_layer", "disk_layer"),
    (lambda c: c.update(admin={"profile_path": "/tmp/p"}), "admin.profile_path", "profile_path"),
])
def test_unsupported_field_is_refused_naming_its_path(mutate, path: str, field: str) -> None:  # noqa: ANN001
    cfg = config()
    mutate(cfg)
    err = refused(cfg)
    assert err.path == path
    assert f"{field} is not supported" in err.message


def test_upstream_http2_options_not_implemented_are_refused() -> None:
    cfg = config()
    cluster(cfg)["typed_extension_protocol_options"] = {UPSTREAM_HTTP: {
        "@type": f"type.googleapis.com/{UPSTREAM_HTTP}",
        "explicit_http_config": {"http2_protocol_options": {"allow_connect": True}}}}
    err = refused(cfg)
    assert err.path == (f'{C0}.typed_extension_protocol_options["{UPSTREAM_HTTP}"]'
                        ".explicit_http_config.http2_protocol_options.allow_connect")


def test_unknown_protocol_options_key_is_refused() -> None:
    key = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
    cfg = config()
    cluster(cfg)["typed_extension_protocol_options"] = {key: {"@type": f"type.googleapis.com/{key}",
                                                              "stat_prefix": "x"}}
    err = refused(cfg)
    assert err.path == f'{C0}.typed_extension_protocol_options["{key}"]'


def test_empty_typed_config_of_an_unsupported_type_is_refused() -> None:
    cfg = config()
    hcm(cfg)["http_filters"].insert(0, {"name": "gzip", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer"}})
    err = refused(cfg)
    assert err.path == f"{HCM_PATH}.http_filters[0].typed_config"
    assert "Buffer is not supported" in err.message


def test_text_format_source_only_inline() -> None:
    cfg = config()
    hcm(cfg)["access_log"] = [{"name": "f", "typed_config": {
        "@type": FILE_LOG, "path": "/dev/stdout",
        "log_format": {"text_format_source": {"filename": "/etc/passwd"}}}}]
    err = refused(cfg)
    assert err.path == f"{HCM_PATH}.access_log[0].typed_config.log_format.text_format_source.filename"


def test_codec_type_value_is_left_to_the_hcm_factory() -> None:
    cfg = config()
    hcm(cfg)["codec_type"] = "HTTP3"
    load_bootstrap(None, yaml.safe_dump(cfg))  # the HCM factory refuses HTTP3, not the table


def test_check_on_a_bare_message() -> None:
    from envoy.config.listener.v3.listener_pb2 import Listener

    msg = Listener(name="x")
    msg.listener_filters.add(name="y").filter_disabled.any_match = True
    with pytest.raises(ConfigError) as info:
        check(msg, "l")
    assert info.value.path == "l.listener_filters[0].filter_disabled"
