"""/config_dump: Envoy's ConfigDump from real bootstraps, redaction and the query parameters."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from envoy.admin.v3.config_dump_pb2 import ConfigDump
from envoy.config.core.v3.base_pb2 import Metadata
from google.protobuf import json_format, struct_pb2
from xds.core.v3.context_params_pb2 import ContextParams
from xds.type.v3.typed_struct_pb2 import TypedStruct

from proxy.admin.config_dump import (
    REDACTED,
    ConfigDumpQueryError,
    apply_query,
    build_config_dump,
    redact,
)
from proxy.config.bootstrap import load_bootstrap, parse_bootstrap_dict

ROOT = Path(__file__).resolve().parents[3]
ADMIN = "type.googleapis.com/envoy.admin.v3."
LOADED_AT = 1_700_000_000.1239  # 2023-11-14T22:13:20.123Z, milliseconds truncated
PRIVATE_KEY = "-----BEGIN PRIVATE KEY-----TOPSECRET"
KEY_BYTES = b"UPSTREAM-KEY-BYTES"
PASSWORD_PATH = "/etc/envoy/password-file"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def dump_of(example: str) -> ConfigDump:
    return build_config_dump(
        load_bootstrap(str(ROOT / "examples" / example), None), loaded_at=LOADED_AT
    )


def query(
    dump: ConfigDump,
    *,
    resource: str | None = None,
    mask: str | None = None,
    name_regex: str | None = None,
) -> dict[str, Any]:
    return apply_query(dump, resource=resource, mask=mask, name_regex=name_regex)


def types(out: dict[str, Any]) -> list[str]:
    return [c["@type"].removeprefix(ADMIN) for c in out.get("configs", [])]


def tls_bootstrap() -> Any:
    """Secrets and an upstream TLS key: the loader parses them, trioxy serves neither."""
    return parse_bootstrap_dict({
        "static_resources": {
            "secrets": [
                {"name": "server_cert", "tls_certificate": {
                    "certificate_chain": {"inline_string": "CERT-CHAIN"},
                    "private_key": {"inline_string": PRIVATE_KEY},
                    "password": {"filename": PASSWORD_PATH},
                }},
                {"name": "token", "generic_secret": {
                    "secret": {"inline_bytes": base64.b64encode(b"GENERIC").decode()},
                }},
            ],
            "clusters": [{
                "name": "tls_upstream",
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": UPSTREAM_TLS,
                    "sni": "backend.example",
                    "common_tls_context": {"tls_certificates": [{
                        "certificate_chain": {"inline_string": "CERT-CHAIN"},
                        "private_key": {"inline_bytes": base64.b64encode(KEY_BYTES).decode()},
                    }]},
                }},
            }],
        },
    })


# ----------------------------------------------------------------------------- the dump
def test_front_proxy_dump_has_envoys_config_types_in_order() -> None:
    out = query(dump_of("front-proxy.yaml"))
    assert types(out) == [
        "BootstrapConfigDump", "ClustersConfigDump", "ListenersConfigDump",
        "ScopedRoutesConfigDump", "RoutesConfigDump", "SecretsConfigDump",
    ]


def test_without_an_http_connection_manager_there_are_no_route_dumps() -> None:
    out = query(dump_of("tcp-proxy.yaml"))
    assert types(out) == [
        "BootstrapConfigDump", "ClustersConfigDump", "ListenersConfigDump", "SecretsConfigDump",
    ]


@pytest.mark.parametrize("example", ["front-proxy.yaml", "tcp-proxy.yaml"])
def test_unfiltered_dump_parses_back_into_config_dump(example: str) -> None:
    out = query(dump_of(example))
    parsed = json_format.ParseDict(out, ConfigDump())
    assert parsed == dump_of(example)
    json.dumps(out)  # JSON-ready: no bytes, no messages


def test_bootstrap_and_static_resources_are_dumped_with_timestamps() -> None:
    bootstrap = load_bootstrap(str(ROOT / "examples" / "front-proxy.yaml"), None)
    configs = query(build_config_dump(bootstrap, loaded_at=LOADED_AT))["configs"]
    boot, clusters, listeners = configs[0], configs[1], configs[2]
    assert boot["last_updated"] == "2023-11-14T22:13:20.123Z"
    assert boot["bootstrap"] == json_format.MessageToDict(
        bootstrap, preserving_proto_field_name=True
    )
    assert [c["cluster"]["name"] for c in clusters["static_clusters"]] == ["service1", "service2"]
    assert all(c["last_updated"] == boot["last_updated"] for c in clusters["static_clusters"])
    assert [x["listener"]["name"] for x in listeners["static_listeners"]] == ["front_proxy"]


def test_inline_route_config_of_the_http_connection_manager_is_a_static_route_config() -> None:
    routes = query(dump_of("front-proxy.yaml"))["configs"][4]
    (entry,) = routes["static_route_configs"]
    config = entry["route_config"]
    assert config["@type"] == "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
    assert config["name"] == "local_route"
    assert [r["route"]["cluster"] for r in config["virtual_hosts"][0]["routes"]] == [
        "service1", "service2",
    ]


def test_building_leaves_the_bootstrap_untouched() -> None:
    bootstrap = tls_bootstrap()
    before = bootstrap.SerializeToString()
    build_config_dump(bootstrap, loaded_at=0)
    assert bootstrap.SerializeToString() == before


# ----------------------------------------------------------------------------- redaction
def test_sensitive_fields_never_appear_in_the_json() -> None:
    dump = build_config_dump(tls_bootstrap(), loaded_at=LOADED_AT)
    text = json.dumps(query(dump))
    for secret in (PRIVATE_KEY, PASSWORD_PATH, base64.b64encode(KEY_BYTES).decode(),
                   base64.b64encode(b"GENERIC").decode()):
        assert secret not in text
    assert "CERT-CHAIN" in text and "backend.example" in text  # only sensitive fields go
    json_format.ParseDict(query(dump), ConfigDump())


def test_static_secrets_are_dumped_redacted() -> None:
    dump = build_config_dump(tls_bootstrap(), loaded_at=LOADED_AT)
    secrets = query(dump)["configs"][-1]["static_secrets"]
    assert [s["name"] for s in secrets] == ["server_cert", "token"]
    cert = secrets[0]["secret"]["tls_certificate"]
    # Sensitivity is inherited: every string below private_key/password becomes the marker.
    assert cert["private_key"] == {"inline_string": REDACTED}
    assert cert["password"] == {"filename": REDACTED}
    assert cert["certificate_chain"] == {"inline_string": "CERT-CHAIN"}
    generic = secrets[1]["secret"]["generic_secret"]["secret"]
    assert base64.b64decode(generic["inline_bytes"]) == REDACTED.encode()


def test_redaction_reaches_into_typed_config_anys() -> None:
    dump = build_config_dump(tls_bootstrap(), loaded_at=LOADED_AT)
    (cluster,) = query(dump, resource="static_clusters")["configs"]
    tls = cluster["cluster"]["transport_socket"]["typed_config"]
    assert tls["@type"] == UPSTREAM_TLS
    key = tls["common_tls_context"]["tls_certificates"][0]["private_key"]
    assert base64.b64decode(key["inline_bytes"]) == REDACTED.encode()


def test_redaction_of_a_typed_struct_reifies_it() -> None:
    secret = struct_pb2.Struct()
    secret.update({"name": "s", "tls_certificate": {"private_key": {"inline_string": "K"}}})
    typed = TypedStruct(
        type_url="type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        value=secret,
    )
    redact(typed)
    assert json_format.MessageToDict(typed.value) == {
        "name": "s", "tls_certificate": {"private_key": {"inline_string": REDACTED}},
    }


def test_redaction_of_maps_under_a_sensitive_ancestor_touches_values_only() -> None:
    params = ContextParams(params={"region": "eu", "zone": "a"})
    redact(params, ancestor_is_sensitive=True)
    assert dict(params.params) == {"region": REDACTED, "zone": REDACTED}

    metadata = Metadata()
    metadata.filter_metadata["f"].update({"token": "t", "ttl": 3})
    redact(metadata, ancestor_is_sensitive=True)
    # Strings become the marker, other scalars are cleared (number_value 0 unsets the oneof).
    fields = metadata.filter_metadata["f"].fields
    assert fields["token"].string_value == REDACTED
    assert fields["ttl"].WhichOneof("kind") is None


def test_an_any_of_an_unknown_type_is_left_as_it_is() -> None:
    boot = tls_bootstrap()
    any_msg = boot.static_resources.clusters[0].transport_socket.typed_config
    any_msg.type_url = "type.googleapis.com/no.such.v3.Type"
    before = any_msg.SerializeToString()
    redact(boot)
    assert any_msg.SerializeToString() == before


# ----------------------------------------------------------------------------- ?resource=
def test_resource_returns_only_that_repeated_field_packed_as_anys() -> None:
    out = query(dump_of("front-proxy.yaml"), resource="static_clusters")
    assert types(out) == ["ClustersConfigDump.StaticCluster"] * 2
    assert [c["cluster"]["name"] for c in out["configs"]] == ["service1", "service2"]
    json_format.ParseDict(out, ConfigDump())


def test_resource_static_route_configs_and_static_listeners() -> None:
    dump = dump_of("front-proxy.yaml")
    routes = query(dump, resource="static_route_configs")["configs"]
    assert [r["route_config"]["name"] for r in routes] == ["local_route"]
    listeners = query(dump, resource="static_listeners")["configs"]
    assert [x["listener"]["name"] for x in listeners] == ["front_proxy"]


def test_resource_that_exists_but_is_empty_gives_no_configs() -> None:
    assert query(dump_of("front-proxy.yaml"), resource="dynamic_active_clusters") == {}


def test_unknown_resource_is_not_found() -> None:
    with pytest.raises(ConfigDumpQueryError, match="no_such_thing not found") as err:
        query(dump_of("front-proxy.yaml"), resource="no_such_thing")
    assert err.value.status == 404


def test_singular_resource_points_at_mask() -> None:
    with pytest.raises(ConfigDumpQueryError, match=r"not a repeated field. Use \?mask=bootstrap"):
        query(dump_of("front-proxy.yaml"), resource="bootstrap")


# ----------------------------------------------------------------------------- ?mask=
def test_mask_alone_trims_each_dump_and_drops_those_it_does_not_fit() -> None:
    out = query(dump_of("front-proxy.yaml"), mask="bootstrap.admin,bootstrap.node")
    (boot,) = out["configs"]
    assert boot["@type"] == ADMIN + "BootstrapConfigDump"
    assert set(boot["bootstrap"]) == {"admin"}  # node unset, last_updated trimmed
    json_format.ParseDict(out, ConfigDump())


def test_mask_naming_a_repeated_field_keeps_it_whole() -> None:
    out = query(dump_of("front-proxy.yaml"), mask="static_clusters")
    (clusters,) = out["configs"]
    assert set(clusters) == {"@type", "static_clusters"}
    assert clusters["static_clusters"][0]["cluster"]["type"] == "STRICT_DNS"


def test_resource_and_mask_trim_each_entry_through_its_any() -> None:
    out = query(dump_of("front-proxy.yaml"), resource="static_clusters", mask="cluster.name")
    assert [c for c in out["configs"]] == [
        {"@type": ADMIN + "ClustersConfigDump.StaticCluster",
         "cluster": {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                     "name": name}}
        for name in ("service1", "service2")
    ]
    json_format.ParseDict(out, ConfigDump())


def test_resource_and_mask_keep_outer_fields_and_nested_paths() -> None:
    out = query(
        dump_of("tcp-proxy.yaml"),
        resource="static_clusters",
        mask="cluster.connect_timeout,cluster.load_assignment.cluster_name,last_updated",
    )
    (entry,) = out["configs"]
    assert entry["last_updated"] == "2023-11-14T22:13:20.123Z"
    assert entry["cluster"]["connect_timeout"] == "1s"
    assert entry["cluster"]["load_assignment"] == {"cluster_name": "backend"}
    assert "name" not in entry["cluster"]


@pytest.mark.parametrize("mask", ["no_such_field", "static_clusters.cluster", "bootstrap.nod"])
def test_mask_that_fits_no_dump_is_refused(mask: str) -> None:
    with pytest.raises(ConfigDumpQueryError, match="could not be successfully applied") as err:
        query(dump_of("front-proxy.yaml"), mask=mask)
    assert err.value.status == 400


@pytest.mark.parametrize("mask", ["cluster.no_such_field", "nope", "cluster.name.x"])
def test_invalid_mask_with_resource_is_refused(mask: str) -> None:
    with pytest.raises(ConfigDumpQueryError, match="could not be successfully used"):
        query(dump_of("front-proxy.yaml"), resource="static_clusters", mask=mask)


# ----------------------------------------------------------------------------- ?name_regex=
def test_name_regex_must_match_the_whole_name() -> None:
    dump = dump_of("front-proxy.yaml")
    out = query(dump, resource="static_clusters", name_regex="service2")
    assert [c["cluster"]["name"] for c in out["configs"]] == ["service2"]
    assert query(dump, resource="static_clusters", name_regex="service") == {}
    out = query(dump, resource="static_clusters", name_regex=".*ice.*")
    assert len(out["configs"]) == 2


def test_name_regex_filters_every_dump_but_the_bootstrap() -> None:
    out = query(dump_of("front-proxy.yaml"), name_regex="local_route")
    configs = {c["@type"].removeprefix(ADMIN): c for c in out["configs"]}
    assert "static_clusters" not in configs["ClustersConfigDump"]
    assert "static_listeners" not in configs["ListenersConfigDump"]
    assert configs["RoutesConfigDump"]["static_route_configs"][0]["route_config"]["name"] == (
        "local_route"
    )
    assert configs["BootstrapConfigDump"]["bootstrap"]["static_resources"]["clusters"]


def test_name_regex_applies_to_secrets_by_their_name() -> None:
    dump = build_config_dump(tls_bootstrap(), loaded_at=0)
    out = query(dump, resource="static_secrets", name_regex="tok.n")
    assert [s["name"] for s in out["configs"]] == ["token"]


def test_empty_name_regex_is_no_filter() -> None:
    dump = dump_of("front-proxy.yaml")
    assert query(dump, name_regex="") == query(dump)


def test_invalid_name_regex_is_refused() -> None:
    with pytest.raises(ConfigDumpQueryError, match=r"Error while parsing name_regex from \("):
        query(dump_of("front-proxy.yaml"), name_regex="(")
