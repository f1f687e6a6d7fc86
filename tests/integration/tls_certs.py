"""Certificates for TLS tests, made with ``cryptography`` (a CA, servers, clients; no files in git).

``make_pki(dir)`` writes a small PKI under ``dir`` and returns the paths:

- ``ca``: a self-signed CA; ``other_ca``: a second, unrelated CA (for "wrong CA" tests).
- ``server``: signed by ``ca``, SANs DNS ``localhost``, DNS ``*.example.com``, IP ``127.0.0.1``.
- ``client``: signed by ``ca``, SAN URI ``spiffe://example.org/ns/default/sa/client``.
- ``other_client``: signed by ``ca``, SAN URI ``spiffe://example.org/ns/default/sa/intruder``.
- ``rogue_client``: signed by ``other_ca`` (same SPIFFE URI as ``client``).
- ``other_server``: signed by ``other_ca``, same SANs as ``server``.

Keys are ECDSA P-256 (fast to make); certificates are valid from an hour ago for ``days``.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SPIFFE_CLIENT = "spiffe://example.org/ns/default/sa/client"
SPIFFE_INTRUDER = "spiffe://example.org/ns/default/sa/intruder"


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path
    not_after: datetime.datetime

    @property
    def cert_pem(self) -> str:
        return self.cert.read_text()

    @property
    def key_pem(self) -> str:
        return self.key.read_text()


@dataclass(frozen=True)
class Pki:
    ca: Pair
    other_ca: Pair
    server: Pair
    client: Pair
    other_client: Pair
    rogue_client: Pair
    other_server: Pair


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trioxy tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
           password: bytes | None = None) -> Pair:
    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    key_path.chmod(0o600)
    return Pair(cert_path, key_path, cert.not_valid_after_utc)


def make_ca(directory: Path, stem: str, cn: str, days: int = 365) -> tuple[Pair, x509.Certificate,
                                                                         ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(directory, stem, cert, key), cert, key


def make_leaf(directory: Path, stem: str, cn: str, ca_cert: x509.Certificate,
              ca_key: ec.EllipticCurvePrivateKey, *, dns: tuple[str, ...] = (),
              ips: tuple[str, ...] = (), uris: tuple[str, ...] = (), emails: tuple[str, ...] = (),
              days: int = 90, password: bytes | None = None) -> Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.RFC822Name(e) for e in emails]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return _write(directory, stem, cert, key, password)


def make_pki(directory: Path, *, server_days: int = 90) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_cert, ca_key = make_ca(directory, "ca", "trioxy test CA")
    other_ca, other_cert, other_key = make_ca(directory, "other-ca", "some other CA")
    server_sans = {"dns": ("localhost", "*.example.com"), "ips": ("127.0.0.1",)}
    return Pki(
        ca=ca,
        other_ca=other_ca,
        server=make_leaf(directory, "server", "localhost", ca_cert, ca_key, days=server_days,
                         **server_sans),  # type: ignore[arg-type]
        client=make_leaf(directory, "client", "client", ca_cert, ca_key, uris=(SPIFFE_CLIENT,)),
        other_client=make_leaf(directory, "other-client", "intruder", ca_cert, ca_key,
                               uris=(SPIFFE_INTRUDER,)),
        rogue_client=make_leaf(directory, "rogue-client", "client", other_cert, other_key,
                               uris=(SPIFFE_CLIENT,)),
        other_server=make_leaf(directory, "other-server", "localhost", other_cert, other_key,
                               **server_sans),  # type: ignore[arg-type]
    )
