"""What one TLS connection negotiated and who the peer is (Envoy's ``Ssl::ConnectionInfo``).

Access logs read it from ``StreamInfo.downstream_ssl`` / ``StreamInfo.upstream_ssl``
(``%DOWNSTREAM_TLS_VERSION%``, ``%DOWNSTREAM_PEER_URI_SAN%``...). The peer certificate is
kept as DER and parsed (with ``cryptography``) only when something asks, and at most once:
most connections are never asked. SAN lists keep the certificate's order; values are printed
as Envoy prints them (IP addresses in their canonical text form).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509

__all__ = ["CertificateSans", "SslConnectionInfo", "certificate_sans", "load_der"]

SAN_TYPES = ("DNS", "URI", "EMAIL", "IP_ADDRESS")


@dataclass(frozen=True, slots=True)
class CertificateSans:
    """A certificate's subject alternative names by Envoy SAN type, and its subject."""

    dns: tuple[str, ...] = ()
    uri: tuple[str, ...] = ()
    email: tuple[str, ...] = ()
    ip: tuple[str, ...] = ()
    subject: str = ""

    def of(self, san_type: str) -> tuple[str, ...]:
        if san_type == "DNS":
            return self.dns
        if san_type == "URI":
            return self.uri
        if san_type == "EMAIL":
            return self.email
        return self.ip

    def for_logging(self) -> str:
        """Envoy's ``getCertificateSansForLogging`` shape: ``DNS:a, URI:b``."""
        parts = [f"DNS:{v}" for v in self.dns] + [f"URI:{v}" for v in self.uri]
        parts += [f"email:{v}" for v in self.email] + [f"IP:{v}" for v in self.ip]
        return ", ".join(parts)


def load_der(der: bytes) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


def certificate_sans(cert: x509.Certificate | None) -> CertificateSans:
    if cert is None:
        return CertificateSans()
    try:
        subject = cert.subject.rfc4514_string()
    except ValueError:
        subject = ""
    try:
        ext: Any = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return CertificateSans(subject=subject)
    return CertificateSans(
        dns=tuple(ext.get_values_for_type(x509.DNSName)),
        uri=tuple(ext.get_values_for_type(x509.UniformResourceIdentifier)),
        email=tuple(ext.get_values_for_type(x509.RFC822Name)),
        ip=tuple(str(a) for a in ext.get_values_for_type(x509.IPAddress)),
        subject=subject,
    )


class SslConnectionInfo:
    """One handshake's outcome; the peer certificate is parsed on first use."""

    __slots__ = ("tls_version", "cipher", "alpn", "sni", "session_id", "session_reused",
                 "peer_der", "local", "_peer", "_peer_sans")

    def __init__(self, *, tls_version: str, cipher: str, alpn: str | None, sni: str | None,
                 session_id: bytes, session_reused: bool, peer_der: bytes | None,
                 local: CertificateSans) -> None:
        self.tls_version = tls_version  # "TLSv1.3", as SSL_get_version
        self.cipher = cipher  # OpenSSL's name: "TLS_AES_128_GCM_SHA256", "ECDHE-RSA-AES128-GCM-SHA256"
        self.alpn = alpn
        self.sni = sni
        self.session_id = session_id
        self.session_reused = session_reused
        self.peer_der = peer_der
        self.local = local  # our own certificate's names (precomputed per context)
        self._peer: x509.Certificate | None = None
        self._peer_sans: CertificateSans | None = None

    # -- the peer certificate ----------------------------------------------------------------
    @property
    def peer_certificate(self) -> x509.Certificate | None:
        if self._peer is None and self.peer_der is not None:
            self._peer = load_der(self.peer_der)
        return self._peer

    @property
    def peer_sans(self) -> CertificateSans:
        if self._peer_sans is None:
            self._peer_sans = certificate_sans(self.peer_certificate)
        return self._peer_sans

    @property
    def peer_subject(self) -> str | None:
        return self.peer_sans.subject or None

    @property
    def peer_issuer(self) -> str | None:
        cert = self.peer_certificate
        if cert is None:
            return None
        try:
            return cert.issuer.rfc4514_string() or None
        except ValueError:
            return None

    @property
    def peer_serial(self) -> str | None:
        cert = self.peer_certificate
        return None if cert is None else format(cert.serial_number, "x")

    @property
    def peer_fingerprint_256(self) -> str | None:
        return None if self.peer_der is None else hashlib.sha256(self.peer_der).hexdigest()

    @property
    def peer_fingerprint_1(self) -> str | None:
        return None if self.peer_der is None else hashlib.sha1(self.peer_der).hexdigest()  # noqa: S324

    @property
    def session_id_hex(self) -> str | None:
        return self.session_id.hex() if self.session_id else None

    def __repr__(self) -> str:
        return f"<SslConnectionInfo {self.tls_version} {self.cipher} alpn={self.alpn!r}>"
