"""TLS contexts from Envoy configs: what compiles, what is refused (by field path), expiry."""

from __future__ import annotations

import base64
import hashlib
import ssl
import time
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tls_certs import SPIFFE_CLIENT, Pki

from proxy.config.bootstrap import parse_bootstrap_dict, validate_bootstrap
from proxy.config.errors import ConfigError
from proxy.config.snapshot import build_snapshot
from proxy.tls.connection_info import certificate_sans
from proxy.tls.context import (
    TlsContext,
    days_until_first_cert_expiring,
    dns_name_match,
    iter_tls_contexts,
)

DOWNSTREAM = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
LISTENER_TS = "static_resources.listeners[0].filter_chains[0].transport_socket.typed_config"
CLUSTER_TS = "static_resources.clusters[0].transport_socket.typed_config"


def bootstrap(downstream: dict[str, Any] | None = None, upstream: dict[str, Any] | None = None,
              *, chain_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    chain: dict[str, Any] = {
        "filters": [{
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": "tcp", "cluster": "backend"},
        }],
    }
    if downstream is not None:
        chain["transport_socket"] = {"name": "envoy.transport_sockets.tls",
                                     "typed_config": {"@type": DOWNSTREAM, **downstream}}
    chain.update(chain_extra or {})
    cluster: dict[str, Any] = {
        "name": "backend", "type": "STATIC",
        "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": 9}}}}]}]},
    }
    if upstream is not None:
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls",
                                       "typed_config": {"@type": UPSTREAM, **upstream}}
    return {"static_resources": {
        "listeners": [{"name": "l", "address": {"socket_address": {
            "address": "127.0.0.1", "port_value": 10000}}, "filter_chains": [chain]}],
        "clusters": [cluster],
    }}


def build(data: dict[str, Any]) -> Any:
    b = parse_bootstrap_dict(data)
    validate_bootstrap(b)
    return build_snapshot(b)


def refused(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        build(data)
    return e.value


def server_cert(pki: Pki, **extra: Any) -> dict[str, Any]:
    common = {"tls_certificates": [{"certificate_chain": {"filename": str(pki.server.cert)},
                                    "private_key": {"filename": str(pki.server.key)}}]}
    common.update(extra)
    return {"common_tls_context": common}


def chain_tls(snapshot: Any) -> TlsContext:
    return snapshot.listeners[0].filter_chains.chains[0].transport_socket


# ----------------------------------------------------------------------------- compiles
def test_downstream_defaults_are_envoys(pki: Pki) -> None:
    snap = build(bootstrap(server_cert(pki)))
    chain = snap.listeners[0].filter_chains.chains[0]
    tls = chain.transport_socket
    assert isinstance(tls, TlsContext) and tls.server
    ctx = tls.ssl_context
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    assert ctx.maximum_version is ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode is ssl.CERT_NONE  # no validation_context: no client certificate asked
    assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    ciphers = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert ciphers[:2] == ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"]
    assert chain.transport_socket_connect_timeout == 15.0
    assert tls.local.dns == ("localhost", "*.example.com") and tls.local.ip == ("127.0.0.1",)


def test_upstream_defaults_are_envoys(pki: Pki) -> None:
    snap = build(bootstrap(upstream={}))
    tls = snap.clusters["backend"].transport_socket
    assert isinstance(tls, TlsContext) and not tls.server
    ctx = tls.ssl_context
    # Envoy's client default is TLSv1_2..TLSv1_2, and no verification without trusted_ca.
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    assert ctx.maximum_version is ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode is ssl.CERT_NONE and not ctx.check_hostname
    assert tls.sni is None


def test_inline_pem_and_client_verification_modes(pki: Pki) -> None:
    common = {"tls_certificates": [{"certificate_chain": {"inline_string": pki.server.cert_pem},
                                    "private_key": {"inline_bytes": base64.b64encode(
                                        pki.server.key.read_bytes()).decode()}}],
              "validation_context": {"trusted_ca": {"inline_string": pki.ca.cert_pem}}}
    tls = chain_tls(build(bootstrap({"common_tls_context": common})))
    assert tls.ssl_context.verify_mode is ssl.CERT_OPTIONAL  # asked, not required
    tls = chain_tls(build(bootstrap({"common_tls_context": common,
                                     "require_client_certificate": True})))
    assert tls.ssl_context.verify_mode is ssl.CERT_REQUIRED
    # A SAN matcher makes the certificate required too (SSL_VERIFY_FAIL_IF_NO_PEER_CERT).
    common["validation_context"]["match_typed_subject_alt_names"] = [
        {"san_type": "URI", "matcher": {"exact": SPIFFE_CLIENT}}]
    tls = chain_tls(build(bootstrap({"common_tls_context": common})))
    assert tls.ssl_context.verify_mode is ssl.CERT_REQUIRED
    assert tls.validator.active


def test_upstream_with_everything(pki: Pki) -> None:
    tls = build(bootstrap(upstream={
        "sni": "api.example.com",
        "common_tls_context": {
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_params": {"tls_maximum_protocol_version": "TLSv1_3",
                           "cipher_suites": ["[ECDHE-RSA-AES128-GCM-SHA256|ECDHE-RSA-CHACHA20-POLY1305]",
                                             "ECDHE-ECDSA-AES256-GCM-SHA384"],
                           "ecdh_curves": ["P-256"]},
            "tls_certificates": [{"certificate_chain": {"filename": str(pki.client.cert)},
                                  "private_key": {"filename": str(pki.client.key)}}],
            "validation_context": {
                "trusted_ca": {"filename": str(pki.ca.cert)},
                "match_typed_subject_alt_names": [
                    {"san_type": "DNS", "matcher": {"exact": "localhost"}}],
            },
        },
    })).clusters["backend"].transport_socket
    assert tls.sni == "api.example.com"
    assert tls.alpn_protocols == ("h2", "http/1.1")
    assert tls.ssl_context.maximum_version is ssl.TLSVersion.TLSv1_3
    assert tls.ssl_context.verify_mode is ssl.CERT_REQUIRED
    names = [c["name"] for c in tls.ssl_context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert names == ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-CHACHA20-POLY1305",
                     "ECDHE-ECDSA-AES256-GCM-SHA384"]
    assert tls.local.uri == (SPIFFE_CLIENT,)
    # One context per ALPN list, built once.
    other = tls.ssl_context_for(["http/1.1"])
    assert other is not tls.ssl_context and tls.ssl_context_for(["http/1.1"]) is other
    assert tls.ssl_context_for(["h2", "http/1.1"]) is tls.ssl_context
    assert tls.ssl_context_for(None) is tls.ssl_context


def test_raw_buffer_is_plaintext(pki: Pki) -> None:
    data = bootstrap(chain_extra={"transport_socket": {
        "name": "envoy.transport_sockets.raw_buffer",
        "typed_config": {"@type": "type.googleapis.com/"
                                  "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}})
    assert build(data).listeners[0].filter_chains.chains[0].transport_socket is None


def test_handshake_timeout_field() -> None:
    snap = build(bootstrap(chain_extra={"transport_socket_connect_timeout": "2.5s"}))
    assert snap.listeners[0].filter_chains.chains[0].transport_socket_connect_timeout == 2.5
    snap = build(bootstrap(chain_extra={"transport_socket_connect_timeout": "0s"}))
    assert snap.listeners[0].filter_chains.chains[0].transport_socket_connect_timeout is None


def test_password_protected_key(pki: Pki, tmp_path: Any) -> None:
    from tls_certs import make_ca, make_leaf

    _, ca_cert, ca_key = make_ca(tmp_path, "ca2", "ca2")
    leaf = make_leaf(tmp_path, "locked", "locked", ca_cert, ca_key, dns=("a",),
                     password=b"sesame")
    common = {"tls_certificates": [{"certificate_chain": {"filename": str(leaf.cert)},
                                    "private_key": {"filename": str(leaf.key)},
                                    "password": {"inline_string": "sesame"}}]}
    assert chain_tls(build(bootstrap({"common_tls_context": common}))) is not None
    del common["tls_certificates"][0]["password"]
    e = refused(bootstrap({"common_tls_context": common}))
    assert e.path == f"{LISTENER_TS}.common_tls_context.tls_certificates[0].private_key"
    assert "Failed to load private key" in e.message


# ----------------------------------------------------------------------------- refused
@pytest.mark.parametrize(("extra", "path", "message"), [
    ({"require_sni": True}, "require_sni", "require_sni is not supported"),
    ({"session_timeout": "10s"}, "session_timeout", "session_timeout is not supported"),
    ({"ocsp_staple_policy": "MUST_STAPLE"}, "ocsp_staple_policy",
     "ocsp_staple_policy is not supported"),
    ({"disable_stateful_session_resumption": True}, "disable_stateful_session_resumption",
     "is not supported"),
])
def test_downstream_unsupported_fields(pki: Pki, extra: dict[str, Any], path: str,
                                       message: str) -> None:
    e = refused(bootstrap({**server_cert(pki), **extra}))
    assert e.path == f"{LISTENER_TS}.{path}"
    assert message in e.message


@pytest.mark.parametrize(("common", "path", "message"), [
    ({"key_log": {"path": "/tmp/keys"}}, "key_log", "key_log is not supported"),
    ({"tls_certificate_sds_secret_configs": [{"name": "x"}]},
     "tls_certificate_sds_secret_configs", "is not supported"),
    ({"validation_context": {"crl": {"inline_string": "x"}}}, "validation_context.crl",
     "crl is not supported"),
    ({"validation_context": {"trust_chain_verification": "ACCEPT_UNTRUSTED"}},
     "validation_context.trust_chain_verification", "is not supported"),
    ({"validation_context": {"max_verify_depth": 2}}, "validation_context.max_verify_depth",
     "is not supported"),
    ({"tls_params": {"signature_algorithms": ["ecdsa_secp256r1_sha256"]}},
     "tls_params.signature_algorithms", "is not supported"),
    ({"tls_params": {"tls_minimum_protocol_version": "TLSv1_1"}},
     "tls_params.tls_minimum_protocol_version", "TLSv1_1 (OpenSSL 3 disables"),
    ({"tls_params": {"tls_minimum_protocol_version": "TLSv1_3",
                     "tls_maximum_protocol_version": "TLSv1_2"}},
     "tls_params", "is greater than"),
    ({"tls_params": {"cipher_suites": ["ECDHE-RSA-AES128-GCM-SHA256", "NOT-A-CIPHER"]}},
     "tls_params.cipher_suites[1]", "unknown cipher suite 'NOT-A-CIPHER'"),
    ({"tls_params": {"cipher_suites": ["TLS_AES_128_GCM_SHA256"]}},
     "tls_params.cipher_suites[0]", "TLS 1.3 cipher suites are not configurable"),
    ({"tls_params": {"ecdh_curves": ["X25519", "P-256"]}}, "tls_params.ecdh_curves[1]",
     "more than one ecdh curve"),
    ({"tls_params": {"ecdh_curves": ["P-999"]}}, "tls_params.ecdh_curves[0]", "unknown curve"),
    ({"validation_context": {"match_typed_subject_alt_names": [
        {"san_type": "URI", "matcher": {"exact": "spiffe://x"}}]}},
     "validation_context", "SAN-based verification of peer certificates without trusted CA is"
                           " insecure and not allowed"),
    ({"validation_context": {"trusted_ca": {"filename": "/nonexistent/ca.pem"}}},
     "validation_context.trusted_ca.filename", "unable to read file: /nonexistent/ca.pem"),
    ({"validation_context": {"trusted_ca": {"inline_string": "not a pem"}}},
     "validation_context.trusted_ca", "Failed to load trusted CA certificates from <inline>"),
    ({"validation_context": {"trusted_ca": {"environment_variable": "CA"}}},
     "validation_context.trusted_ca.environment_variable", "is not supported"),
    ({"validation_context": {"verify_certificate_hash": ["zz" * 32]}},
     "validation_context.verify_certificate_hash[0]", "Invalid hex-encoded SHA-256 zzzz"),
    ({"validation_context": {"verify_certificate_spki": ["a" * 44]}},
     "validation_context.verify_certificate_spki[0]", "Invalid base64-encoded SHA-256 aaaa"),
    ({"alpn_protocols": [""]}, "alpn_protocols[0]", "1 to 255 bytes"),
    ({"custom_handshaker": {"name": "x"}}, "custom_handshaker", "is not supported"),
])
def test_common_context_refusals(pki: Pki, common: dict[str, Any], path: str,
                                 message: str) -> None:
    cfg = server_cert(pki)
    cfg["common_tls_context"].update(common)
    e = refused(bootstrap(cfg))
    assert e.path == f"{LISTENER_TS}.common_tls_context.{path}"
    assert message in e.message


def test_san_matcher_refusals(pki: Pki) -> None:
    base = {"trusted_ca": {"filename": str(pki.ca.cert)}}
    vpath = f"{LISTENER_TS}.common_tls_context.validation_context"
    for matcher, path, message in [
        ({"san_type": "OTHER_NAME", "matcher": {"exact": "x"}},
         "match_typed_subject_alt_names[0].san_type", "OTHER_NAME is not supported"),
        ({"san_type": "URI", "matcher": {"exact": "x"}, "oid": "1.2.3"},
         "match_typed_subject_alt_names[0].oid", "oid is not supported"),
        ({"san_type": "URI", "matcher": {"safe_regex": {"regex": "(unclosed"}}},
         "match_typed_subject_alt_names[0].matcher.safe_regex.regex", ""),
        ({"san_type": "IP_ADDRESS", "matcher": {"exact": "::0001"}},
         "match_typed_subject_alt_names[0].matcher.exact", "write the IP address as '::1'"),
    ]:
        cfg = server_cert(pki, validation_context={**base,
                                                   "match_typed_subject_alt_names": [matcher]})
        e = refused(bootstrap(cfg))
        assert e.path == f"{vpath}.{path}", e
        assert message in e.message
    cfg = server_cert(pki, validation_context={
        **base, "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "a"}}],
        "match_subject_alt_names": [{"exact": "a"}]})
    assert refused(bootstrap(cfg)).path == f"{vpath}.match_subject_alt_names"


def test_server_context_refusals(pki: Pki) -> None:
    e = refused(bootstrap({"common_tls_context": {}}))
    assert e.path == f"{LISTENER_TS}.common_tls_context.tls_certificates"
    assert e.message == "No TLS certificates found for server context"
    two = server_cert(pki)
    two["common_tls_context"]["tls_certificates"] *= 2
    e = refused(bootstrap(two))
    assert e.path == f"{LISTENER_TS}.common_tls_context.tls_certificates[1]"
    e = refused(bootstrap({**server_cert(pki), "require_client_certificate": True}))
    assert e.path == f"{LISTENER_TS}.require_client_certificate"
    e = refused(bootstrap(server_cert(pki, tls_certificates=[
        {"certificate_chain": {"filename": str(pki.server.cert)},
         "private_key": {"filename": str(pki.client.key)}}])))
    assert e.path == f"{LISTENER_TS}.common_tls_context.tls_certificates[0]"
    assert "KEY_VALUES_MISMATCH" in e.message
    e = refused(bootstrap(server_cert(pki, tls_certificates=[
        {"certificate_chain": {"filename": str(pki.server.cert)}}])))
    assert e.path == f"{LISTENER_TS}.common_tls_context.tls_certificates[0].private_key"
    e = refused(bootstrap(server_cert(pki, validation_context={"verify_certificate_hash": [
        "00" * 32]})))
    assert e.path == f"{LISTENER_TS}.common_tls_context.validation_context"


def test_upstream_refusals(pki: Pki) -> None:
    for extra, path in [({"allow_renegotiation": True}, "allow_renegotiation"),
                        ({"max_session_keys": 4}, "max_session_keys"),
                        ({"auto_host_sni": True}, "auto_host_sni"),
                        ({"auto_sni_san_validation": True}, "auto_sni_san_validation")]:
        e = refused(bootstrap(upstream=extra))
        assert e.path == f"{CLUSTER_TS}.{path}", e
        assert "is not supported" in e.message
    e = refused(bootstrap(upstream={"sni": "a\0b"}))
    assert e.path == f"{CLUSTER_TS}.sni"
    two = {"certificate_chain": {"filename": str(pki.client.cert)},
           "private_key": {"filename": str(pki.client.key)}}
    e = refused(bootstrap(upstream={"common_tls_context": {"tls_certificates": [two, two]}}))
    assert e.message == "Multiple TLS certificates are not supported for client contexts"
    data = bootstrap(upstream={})
    data["static_resources"]["clusters"][0]["transport_socket_matches"] = [
        {"name": "m", "transport_socket": {"name": "envoy.transport_sockets.raw_buffer"}}]
    assert refused(data).path == "static_resources.clusters[0].transport_socket_matches"


def test_unknown_transport_socket() -> None:
    data = bootstrap(chain_extra={"transport_socket": {
        "name": "envoy.transport_sockets.alts",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.alts.v3.Alts",
                         "handshaker_service": "x"}}})
    e = refused(data)
    assert e.path.startswith("static_resources.listeners[0].filter_chains[0].transport_socket")


def test_static_secrets_are_refused(pki: Pki) -> None:
    data = bootstrap(server_cert(pki))
    data["static_resources"]["secrets"] = [{"name": "s", "tls_certificate": {
        "certificate_chain": {"filename": str(pki.server.cert)}}}]
    assert refused(data).path == "static_resources.secrets"


# ----------------------------------------------------------------------------- matching
@pytest.mark.parametrize(("name", "pattern", "ok"), [
    ("localhost", "localhost", True),
    ("LocalHost", "localhost", True),
    ("api.example.com", "*.example.com", True),
    ("a.b.example.com", "*.example.com", False),
    ("example.com", "*.example.com", False),
    ("api.example.com", "a*.example.com", True),
    ("xapi.example.com", "a*.example.com", False),
    ("api.example.com", "*.*.com", False),
    ("xn--a.example.com", "xn--*.example.com", False),
])
def test_dns_name_match(name: str, pattern: str, ok: bool) -> None:
    assert dns_name_match(name, pattern) is ok


def test_validator_checks(pki: Pki) -> None:
    der = x509.load_pem_x509_certificate(pki.client.cert.read_bytes()).public_bytes(
        serialization.Encoding.DER)
    spki = x509.load_der_x509_certificate(der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ca = {"trusted_ca": {"filename": str(pki.ca.cert)}}

    def validator(**vc: Any) -> Any:
        return chain_tls(build(bootstrap(server_cert(pki, validation_context={**ca, **vc})))
                         ).validator

    uri = [{"san_type": "URI", "matcher": {"prefix": "spiffe://example.org/ns/default/"}}]
    assert validator(match_typed_subject_alt_names=uri).verify(der) is None
    bad = [{"san_type": "DNS", "matcher": {"exact": SPIFFE_CLIENT}}]  # right value, wrong type
    stat, detail = validator(match_typed_subject_alt_names=bad).verify(der)
    assert stat == "fail_verify_san" and f"URI:{SPIFFE_CLIENT}" in detail
    legacy = validator(match_subject_alt_names=[{"suffix": "/sa/client"}])
    assert legacy.verify(der) is None
    assert validator(match_typed_subject_alt_names=uri).verify(None)[0] == "fail_verify_no_cert"
    good_hash = hashlib.sha256(der).hexdigest()
    colons = ":".join(good_hash[i:i + 2] for i in range(0, 64, 2)).upper()
    assert validator(verify_certificate_hash=[colons]).verify(der) is None
    assert validator(verify_certificate_hash=["00" * 32]).verify(der)[0] == "fail_verify_cert_hash"
    pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    assert validator(verify_certificate_hash=["00" * 32], verify_certificate_spki=[pin]
                     ).verify(der) is None


def test_certificate_sans_ip_forms(pki: Pki) -> None:
    cert = x509.load_pem_x509_certificate(pki.server.cert.read_bytes())
    sans = certificate_sans(cert)
    assert sans.ip == ("127.0.0.1",) and "CN=localhost" in sans.subject


# ----------------------------------------------------------------------------- expiry
def test_days_until_first_cert_expiring(pki: Pki, tmp_path: Any) -> None:
    from tls_certs import make_ca, make_leaf

    assert days_until_first_cert_expiring(build(bootstrap())) == 2**32 - 1
    snap = build(bootstrap(server_cert(pki), upstream={
        "common_tls_context": {"validation_context": {"trusted_ca": {"filename": str(pki.ca.cert)}}}}))
    assert len(list(iter_tls_contexts(snap))) == 2
    now = time.time()
    expected = int((pki.server.not_after.timestamp() - now) // 86400)  # 90-day leaf < 365-day CA
    assert days_until_first_cert_expiring(snap, now) == expected
    assert days_until_first_cert_expiring(snap, pki.server.not_after.timestamp() + 1) == 0
    _, ca_cert, ca_key = make_ca(tmp_path, "soon-ca", "soon")
    soon = make_leaf(tmp_path, "soon", "soon", ca_cert, ca_key, dns=("soon",), days=3)
    snap = build(bootstrap({"common_tls_context": {"tls_certificates": [
        {"certificate_chain": {"filename": str(soon.cert)},
         "private_key": {"filename": str(soon.key)}}]}}))
    assert days_until_first_cert_expiring(snap) == 2


def test_validate_mode_yaml_example(pki: Pki, tmp_path: Any) -> None:
    """The shape of the README example loads as YAML too."""
    text = yaml.safe_dump(bootstrap(server_cert(pki), upstream={"sni": "backend.internal"}))
    assert build(yaml.safe_load(text)).clusters["backend"].transport_socket.sni == "backend.internal"
