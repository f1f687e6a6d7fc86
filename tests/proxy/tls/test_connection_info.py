"""SslConnectionInfo and the TLS access-log operators that read it."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tls_certs import SPIFFE_CLIENT, Pki

from proxy.access_log.formatter import compile_format, compile_json_format
from proxy.config.errors import ConfigError
from proxy.stream_info import StreamInfo
from proxy.tls.connection_info import SslConnectionInfo, certificate_sans


def der(pair: object) -> bytes:
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())  # type: ignore[attr-defined]
    return cert.public_bytes(serialization.Encoding.DER)


def info(pki: Pki, *, peer: bytes | None) -> SslConnectionInfo:
    server = x509.load_pem_x509_certificate(pki.server.cert.read_bytes())
    return SslConnectionInfo(
        tls_version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", alpn="h2",
        sni="api.example.com", session_id=b"\x01\xab", session_reused=False, peer_der=peer,
        local=certificate_sans(server))


def test_downstream_operators(pki: Pki) -> None:
    peer = der(pki.client)
    si = StreamInfo(downstream_ssl=info(pki, peer=peer))
    fmt = compile_format(
        "%DOWNSTREAM_TLS_VERSION% %DOWNSTREAM_TLS_CIPHER% %DOWNSTREAM_TLS_SESSION_ID% "
        "%DOWNSTREAM_PEER_URI_SAN% %DOWNSTREAM_PEER_DNS_SAN% %DOWNSTREAM_LOCAL_DNS_SAN% "
        "%DOWNSTREAM_LOCAL_IP_SAN% %DOWNSTREAM_PEER_FINGERPRINT_256%", "f")
    assert fmt.format(si) == (
        f"TLSv1.3 TLS_AES_128_GCM_SHA256 01ab {SPIFFE_CLIENT} - localhost,*.example.com "
        f"127.0.0.1 {hashlib.sha256(peer).hexdigest()}")
    subject = compile_format("%DOWNSTREAM_PEER_SUBJECT%|%DOWNSTREAM_PEER_ISSUER%", "f")
    assert subject.format(si) == "CN=client,O=trioxy tests|CN=trioxy test CA,O=trioxy tests"
    serial = compile_format("%DOWNSTREAM_PEER_SERIAL%", "f").format(si)
    cert = x509.load_der_x509_certificate(peer)
    assert int(serial, 16) == cert.serial_number and len(serial) % 2 == 0


def test_no_tls_and_no_peer_print_dashes(pki: Pki) -> None:
    fmt = compile_format("%DOWNSTREAM_TLS_VERSION% %DOWNSTREAM_PEER_URI_SAN% "
                         "%UPSTREAM_TLS_VERSION% %UPSTREAM_PEER_SUBJECT%", "f")
    assert fmt.format(StreamInfo()) == "- - - -"
    si = StreamInfo(downstream_ssl=info(pki, peer=None))
    assert fmt.format(si) == "TLSv1.3 - - -"
    typed = compile_json_format({"v": "%DOWNSTREAM_TLS_VERSION%",
                                 "u": "%DOWNSTREAM_PEER_URI_SAN%"}, "f")
    assert typed.format(si) == '{"u":null,"v":"TLSv1.3"}\n'


def test_upstream_operators(pki: Pki) -> None:
    si = StreamInfo(upstream_ssl=info(pki, peer=der(pki.server)))
    fmt = compile_format("%UPSTREAM_TLS_VERSION% %UPSTREAM_PEER_DNS_SAN% %UPSTREAM_PEER_IP_SAN%",
                         "f")
    assert fmt.format(si) == "TLSv1.3 localhost,*.example.com 127.0.0.1"


def test_still_unsupported_tls_operators_are_refused() -> None:
    with pytest.raises(ConfigError) as e:
        compile_format("%DOWNSTREAM_PEER_CERT%", "f")
    assert "is not supported" in e.value.message
    with pytest.raises(ConfigError):
        compile_format("%DOWNSTREAM_TLS_VERSION(x)%", "f")


def test_peer_certificate_is_parsed_once(pki: Pki) -> None:
    i = info(pki, peer=der(pki.client))
    assert i.peer_certificate is i.peer_certificate
    assert i.peer_sans is i.peer_sans
    assert i.peer_sans.for_logging() == f"URI:{SPIFFE_CLIENT}"
    garbage = info(pki, peer=b"not der")
    assert garbage.peer_certificate is None and garbage.peer_sans.uri == ()
