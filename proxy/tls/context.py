"""TLS contexts compiled from Envoy's ``DownstreamTlsContext`` and ``UpstreamTlsContext``.

Theory of operation
-------------------
1. A context is compiled once per filter chain (downstream) or cluster (upstream), in each
   process that builds the snapshot. Certificate, key and CA data are read then (``filename``,
   ``inline_string``, ``inline_bytes``), parsed with ``cryptography`` and loaded into an
   ``ssl.SSLContext``: a missing file, a key that does not match its certificate or an unknown
   cipher is a ``ConfigError`` naming the field, at load, never at the first handshake. Nothing
   is bound or connected. Keys are handed to OpenSSL through an anonymous memory file
   (``memfd``), never written to disk.
2. Defaults are Envoy's: downstream TLSv1.2..TLSv1.3, upstream TLSv1.2..TLSv1.2; the TLS <= 1.2
   cipher list is Envoy's default list, BoringSSL's equal-preference groups ``[A|B]`` flattened
   to OpenSSL's ``A:B``; the server prefers its own cipher order (``prefer_client_ciphers``
   flips it); renegotiation is refused. TLSv1_0 / TLSv1_1 are refused: OpenSSL 3 disables them
   at its default security level, so accepting the setting would be a lie.
3. Peer verification is Envoy's ``DefaultCertValidator``:
   - no ``validation_context``: the peer is not verified. Upstream, that is Envoy's documented
     default (server certificates are not checked unless ``trusted_ca`` is set); downstream, no
     client certificate is requested.
   - ``trusted_ca`` (or ``system_root_certs``): the chain must verify, partial chains allowed
     (``X509_V_FLAG_PARTIAL_CHAIN``); ``allow_expired_certificate`` skips the validity period.
     Downstream, a client certificate is requested and, unless ``require_client_certificate``
     or a SAN / hash / SPKI check is configured, a client that sends none is accepted.
   - ``match_typed_subject_alt_names`` (and the deprecated ``match_subject_alt_names``, one
     matcher per SAN type as Envoy expands it): any matcher matching any SAN of its type
     passes; a DNS ``exact`` matcher follows DNS wildcard rules (``*.example.com``).
     ``verify_certificate_hash`` / ``verify_certificate_spki``: any listed SHA-256 passes.
   - The host name is never checked implicitly (Envoy neither).
   Python's ``ssl`` has no verify callback, so SAN / hash / SPKI checks run right after the
   handshake (``CertValidator.verify``). A failure closes the connection (downstream) or
   fails the connect (upstream) and is counted as Envoy counts it; the one visible difference
   is that no TLS alert is sent.
4. Upstream ALPN can be chosen per connection (the HTTP pool asks for ``h2,http/1.1``); an
   ``ssl.SSLContext`` holds one ALPN list, so ``TlsContext.ssl_context_for(alpn)`` builds one
   context per distinct list on first use and keeps it. Each context keeps the last session
   for resumption (Envoy's ``max_session_keys`` default of 1).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import os
import ssl
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from proxy.common.matchers import StringMatcher, compile_string_matcher
from proxy.config.errors import ConfigError, not_supported
from proxy.tls.connection_info import CertificateSans, certificate_sans, load_der

__all__ = [
    "DEFAULT_CIPHER_SUITES",
    "CertValidator",
    "TlsContext",
    "client_context_from_proto",
    "days_until_first_cert_expiring",
    "dns_name_match",
    "iter_tls_contexts",
    "read_data_source",
    "server_context_from_proto",
]

# Envoy's DEFAULT_CIPHER_SUITES (server and client alike, non-FIPS), in BoringSSL syntax.
DEFAULT_CIPHER_SUITES = (
    "[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]",
    "[ECDHE-RSA-AES128-GCM-SHA256|ECDHE-RSA-CHACHA20-POLY1305]",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
)
# envoy.extensions.transport_sockets.tls.v3.TlsParameters.TlsProtocol
_TLS_AUTO, _TLSV1_0, _TLSV1_1, _TLSV1_2, _TLSV1_3 = range(5)
_VERSIONS = {_TLSV1_2: ssl.TLSVersion.TLSv1_2, _TLSV1_3: ssl.TLSVersion.TLSv1_3}
_VERSION_NAMES = {_TLSV1_0: "TLSv1_0", _TLSV1_1: "TLSv1_1"}
# SubjectAltNameMatcher.SanType
_SAN_TYPES = {1: "EMAIL", 2: "DNS", 3: "URI", 4: "IP_ADDRESS"}
_OTHER_NAME = 5
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (Python's ssl has no name for it).
_X509_V_FLAG_NO_CHECK_TIME = 0x200000
# Envoy's ecdh_curves names -> OpenSSL's.
_CURVES = {"P-256": "prime256v1", "P-384": "secp384r1", "P-521": "secp521r1",
           "X25519": "X25519", "X448": "X448"}
_UINT32_MAX = 2**32 - 1


# ----------------------------------------------------------------------------- data sources
def read_data_source(ds: Any, path: str) -> tuple[bytes, str]:
    """The bytes of a ``DataSource`` and how to name it in errors (its file, or ``<inline>``)."""
    which = ds.WhichOneof("specifier")
    if which == "filename":
        try:
            with open(ds.filename, "rb") as f:
                return f.read(), ds.filename
        except OSError as exc:
            raise ConfigError(f"{path}.filename",
                              f"unable to read file: {ds.filename}: {exc.strerror}") from None
    if which == "inline_bytes":
        return bytes(ds.inline_bytes), "<inline>"
    if which == "inline_string":
        return ds.inline_string.encode(), "<inline>"
    if which is None:
        return b"", ""
    raise not_supported(f"{path}.{which}", which)


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that holds ``data``: a memfd on Linux, else a private temp file."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("trioxy-tls", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="trioxy-tls-") as d:
        p = os.path.join(d, "pem")
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield p


# ----------------------------------------------------------------------------- matching
def dns_name_match(dns_name: str, pattern: str) -> bool:
    """Envoy's ``Utility::dnsNameMatch``: exact (case-insensitive) or a left-most-label wildcard."""
    name = dns_name.lower()
    pat = pattern.lower()
    if name == pat:
        return True
    p_first, _, p_rest = pat.partition(".")
    n_first, _, n_rest = name.partition(".")
    if not p_rest or not n_rest:
        return False
    if "*" in p_first and "*" not in p_rest and not p_first.startswith("xn--"):
        return n_rest == p_rest and _label_wildcard_match(n_first, p_first)
    return False


def _label_wildcard_match(label: str, pattern: str) -> bool:
    if pattern == "*":
        return True
    if pattern.count("*") != 1:
        return False
    head, tail = pattern.split("*")
    return len(pattern) <= len(label) + 1 and label.startswith(head) and label.endswith(tail)


@dataclass(frozen=True, slots=True)
class SanMatcher:
    """One ``SubjectAltNameMatcher``: a string matcher over the SANs of one type."""

    san_type: str  # "DNS", "URI", "EMAIL", "IP_ADDRESS"
    matcher: StringMatcher
    dns_exact: str | None = None  # a DNS exact matcher follows DNS wildcard semantics

    def match(self, sans: CertificateSans) -> bool:
        values = sans.of(self.san_type)
        if self.dns_exact is not None:
            return any(dns_name_match(self.dns_exact, v) for v in values)
        return any(self.matcher.match(v) for v in values)


@dataclass(frozen=True)
class CertValidator:
    """The checks Envoy runs on the peer certificate beyond the chain (see rule 3)."""

    san_matchers: tuple[SanMatcher, ...] = ()
    cert_hashes: frozenset[bytes] = frozenset()
    spki_hashes: frozenset[bytes] = frozenset()

    @property
    def active(self) -> bool:
        return bool(self.san_matchers or self.cert_hashes or self.spki_hashes)

    def verify(self, peer_der: bytes | None) -> tuple[str, str] | None:
        """None when the peer passes; else (ssl stat name, Envoy's error detail)."""
        if not self.active:
            return None
        if peer_der is None:
            return "fail_verify_no_cert", "peer did not provide required client certificate"
        cert = load_der(peer_der)
        if self.san_matchers:
            sans = certificate_sans(cert)
            if not any(m.match(sans) for m in self.san_matchers):
                return ("fail_verify_san",
                        f"verify cert failed: SAN matcher, certificate SANs are "
                        f"[{sans.for_logging()}]")
        if self.cert_hashes or self.spki_hashes:
            ok = False
            if self.cert_hashes:
                ok = _sha256(peer_der) in self.cert_hashes
            if not ok and self.spki_hashes and cert is not None:
                spki = cert.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
                ok = _sha256(spki) in self.spki_hashes
            if not ok:
                return "fail_verify_cert_hash", "verify cert failed: cert hash and spki"
        return None


def _sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


# ----------------------------------------------------------------------------- the context
@dataclass(frozen=True, eq=False)
class TlsContext:
    """A compiled TLS context: what a handshake needs, shared by every connection using it."""

    server: bool
    ssl_context: ssl.SSLContext  # the context with the configured ALPN list
    validator: CertValidator
    alpn_protocols: tuple[str, ...] = ()
    sni: str | None = None  # upstream: UpstreamTlsContext.sni ("" -> None: no SNI sent)
    # not_after (UNIX seconds) of each configured certificate's leaf and of the first
    # trusted CA: what server.days_until_first_cert_expiring is computed from.
    expirations: tuple[float, ...] = ()
    local: CertificateSans = field(default_factory=CertificateSans)  # our certificate's names
    _build: Callable[[tuple[str, ...]], ssl.SSLContext] | None = field(default=None, repr=False)
    _by_alpn: dict[tuple[str, ...], ssl.SSLContext] = field(default_factory=dict, repr=False)
    _sessions: dict[int, ssl.SSLSession] = field(default_factory=dict, repr=False)

    def ssl_context_for(self, alpn: Iterable[str] | None) -> ssl.SSLContext:
        """The context to use when the caller overrides ALPN (upstream); built once per list."""
        if alpn is None:
            return self.ssl_context
        key = tuple(alpn)
        if key == self.alpn_protocols or self._build is None:
            return self.ssl_context
        ctx = self._by_alpn.get(key)
        if ctx is None:
            ctx = self._by_alpn[key] = self._build(key)
        return ctx

    def session_for(self, ctx: ssl.SSLContext) -> ssl.SSLSession | None:
        return self._sessions.get(id(ctx))

    def remember_session(self, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> None:
        if session is not None:
            self._sessions[id(ctx)] = session


@dataclass(frozen=True)
class _Certificate:
    chain: bytes
    key: bytes
    password: bytes | None
    leaf: x509.Certificate


@dataclass(frozen=True)
class _Validation:
    ca: bytes  # PEM, possibly empty (system roots only)
    system_roots: bool
    allow_expired: bool
    validator: CertValidator
    ca_not_after: float | None


@dataclass(frozen=True)
class _Common:
    min_version: ssl.TLSVersion
    max_version: ssl.TLSVersion
    ciphers: str
    curve: str | None
    certificates: tuple[_Certificate, ...]
    validation: _Validation | None
    alpn: tuple[str, ...]


def server_context_from_proto(msg: Any, path: str) -> TlsContext:
    """Compile a ``DownstreamTlsContext`` (``path`` names it, for errors)."""
    cpath = f"{path}.common_tls_context"
    common = _common(msg.common_tls_context, cpath, server=True)
    if not common.certificates:
        raise ConfigError(f"{cpath}.tls_certificates", "No TLS certificates found for server context")
    require = msg.require_client_certificate.value if msg.HasField(
        "require_client_certificate") else False
    v = common.validation
    if require and v is None:
        # Envoy requests no certificate without a CA, so the flag would do nothing: refuse it.
        raise ConfigError(f"{path}.require_client_certificate",
                          "require_client_certificate needs common_tls_context.validation_context"
                          " with trusted_ca to verify client certificates against")
    if v is not None and not v.ca and not v.system_roots:
        if v.validator.active:
            # Envoy accepts a hash / SPKI pin without a CA by requesting the certificate
            # without verifying it; Python's ssl cannot request without verifying.
            raise ConfigError(f"{cpath}.validation_context",
                              "verify_certificate_hash / verify_certificate_spki without trusted_ca"
                              " are not supported downstream")
    prefer_client = msg.prefer_client_ciphers
    no_tickets = (msg.WhichOneof("session_ticket_keys_type") == "disable_stateless_session_resumption"
                  and msg.disable_stateless_session_resumption)
    if v is None:
        verify_mode = ssl.CERT_NONE
    elif require or v.validator.active:
        verify_mode = ssl.CERT_REQUIRED
    else:
        verify_mode = ssl.CERT_OPTIONAL

    def build(alpn: tuple[str, ...]) -> ssl.SSLContext:
        ctx = _base_context(common, server=True, alpn=alpn, path=path, verify_mode=verify_mode)
        if prefer_client:
            ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
        else:
            ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        if no_tickets:
            ctx.options |= ssl.OP_NO_TICKET
        ctx.sni_callback = _remember_sni
        return ctx

    return TlsContext(
        server=True,
        ssl_context=build(common.alpn),
        validator=v.validator if v is not None else CertValidator(),
        alpn_protocols=common.alpn,
        expirations=_expirations(common),
        local=certificate_sans(common.certificates[0].leaf),
    )


def client_context_from_proto(msg: Any, path: str) -> TlsContext:
    """Compile an ``UpstreamTlsContext`` (``path`` names it, for errors)."""
    cpath = f"{path}.common_tls_context"
    common = _common(msg.common_tls_context, cpath, server=False)
    if len(common.certificates) > 1:
        raise ConfigError(f"{cpath}.tls_certificates",
                          "Multiple TLS certificates are not supported for client contexts")
    if "\0" in msg.sni:
        raise ConfigError(f"{path}.sni", "SNI names containing NULL-byte are not allowed")
    if len(msg.sni) > 255:
        raise ConfigError(f"{path}.sni", "value length must be at most 255 characters")
    v = common.validation
    verify_mode = ssl.CERT_REQUIRED if v is not None and (v.ca or v.system_roots) else ssl.CERT_NONE

    def build(alpn: tuple[str, ...]) -> ssl.SSLContext:
        return _base_context(common, server=False, alpn=alpn, path=path, verify_mode=verify_mode)

    return TlsContext(
        server=False,
        ssl_context=build(common.alpn),
        validator=v.validator if v is not None else CertValidator(),
        alpn_protocols=common.alpn,
        sni=msg.sni or None,
        expirations=_expirations(common),
        local=certificate_sans(common.certificates[0].leaf) if common.certificates
        else CertificateSans(),
        _build=build,
    )


def _remember_sni(sslobj: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
    # The SNI the client sent, for %REQUESTED_SERVER_NAME% (read back in ssl_socket).
    sslobj.trioxy_sni = server_name


def _expirations(common: _Common) -> tuple[float, ...]:
    out = [c.leaf.not_valid_after_utc.timestamp() for c in common.certificates]
    if common.validation is not None and common.validation.ca_not_after is not None:
        out.append(common.validation.ca_not_after)
    return tuple(out)


# ----------------------------------------------------------------------------- pieces
def _common(msg: Any, path: str, *, server: bool) -> _Common:
    params = msg.tls_params
    ppath = f"{path}.tls_params"
    default_max = _TLSV1_3 if server else _TLSV1_2
    min_v = _version(params.tls_minimum_protocol_version, _TLSV1_2,
                     f"{ppath}.tls_minimum_protocol_version")
    max_v = _version(params.tls_maximum_protocol_version, default_max,
                     f"{ppath}.tls_maximum_protocol_version")
    if min_v > max_v:
        raise ConfigError(ppath, f"tls_minimum_protocol_version ({min_v.name}) is greater than"
                                 f" tls_maximum_protocol_version ({max_v.name})")
    ciphers = _openssl_ciphers(params.cipher_suites or DEFAULT_CIPHER_SUITES,
                               f"{ppath}.cipher_suites", explicit=bool(params.cipher_suites))
    curve = None
    if params.ecdh_curves:
        if len(params.ecdh_curves) > 1:
            raise not_supported(f"{ppath}.ecdh_curves[1]",
                                "more than one ecdh curve (Python's ssl sets one)")
        name = params.ecdh_curves[0]
        curve = _CURVES.get(name)
        if curve is None:
            raise ConfigError(f"{ppath}.ecdh_curves[0]",
                              f"unknown curve {name!r} (known: {', '.join(sorted(_CURVES))})")
    certificates = tuple(
        _certificate(c, f"{path}.tls_certificates[{i}]")
        for i, c in enumerate(msg.tls_certificates))
    if server and len(certificates) > 1:
        # Envoy picks among several by SNI and key type; one certificate per context here.
        raise not_supported(f"{path}.tls_certificates[1]",
                            "more than one certificate per server context")
    validation = (_validation(msg.validation_context, f"{path}.validation_context")
                  if msg.HasField("validation_context") else None)
    alpn = tuple(msg.alpn_protocols)
    for i, p in enumerate(alpn):
        if not p or len(p.encode()) > 255:
            raise ConfigError(f"{path}.alpn_protocols[{i}]",
                              "an ALPN protocol name is 1 to 255 bytes")
    return _Common(min_v, max_v, ciphers, curve, certificates, validation, alpn)


def _version(value: int, default: int, path: str) -> ssl.TLSVersion:
    if value == _TLS_AUTO:
        value = default
    if value in _VERSION_NAMES:
        raise not_supported(path, f"{_VERSION_NAMES[value]} (OpenSSL 3 disables TLS 1.0 and 1.1"
                                  " at its default security level)")
    version = _VERSIONS.get(value)
    if version is None:
        raise ConfigError(path, f"unknown value {value}")
    return version


def _openssl_ciphers(suites: Iterable[str], path: str, *, explicit: bool) -> str:
    """Envoy/BoringSSL cipher list -> OpenSSL's; each unknown name refused by index."""
    names: list[str] = []
    for i, entry in enumerate(suites):
        epath = f"{path}[{i}]"
        text = entry.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1].replace("|", ":")  # an equal-preference group: plain order here
        for name in filter(None, (n.strip() for n in text.split(":"))):
            if name.startswith("TLS_"):
                raise ConfigError(epath, f"{name!r}: TLS 1.3 cipher suites are not configurable"
                                         " (cipher_suites applies to TLS 1.0-1.2)")
            probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                probe.set_ciphers(name)
            except ssl.SSLError:
                what = "cipher suite" if explicit else "default cipher suite"
                raise ConfigError(epath, f"unknown {what} {name!r} (or one OpenSSL disables)"
                                  ) from None
            names.append(name)
    if not names:
        raise ConfigError(path, "no cipher suite left")
    return ":".join(names)


def _certificate(msg: Any, path: str) -> _Certificate:
    if not msg.HasField("certificate_chain") or not msg.HasField("private_key"):
        missing = "certificate_chain" if not msg.HasField("certificate_chain") else "private_key"
        raise ConfigError(f"{path}.{missing}",
                          "a TLS certificate needs both certificate_chain and private_key")
    chain, chain_name = read_data_source(msg.certificate_chain, f"{path}.certificate_chain")
    key, key_name = read_data_source(msg.private_key, f"{path}.private_key")
    password = None
    if msg.HasField("password"):
        password, _ = read_data_source(msg.password, f"{path}.password")
        password = password.rstrip(b"\r\n") or None
    try:
        certs = x509.load_pem_x509_certificates(chain)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"{path}.certificate_chain",
                          f"Failed to load certificate chain from {chain_name}")
    try:
        serialization.load_pem_private_key(key, password)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}.private_key",
                          f"Failed to load private key from {key_name}: {exc}") from None
    return _Certificate(chain, key, password, certs[0])


def _validation(msg: Any, path: str) -> _Validation:
    ca = b""
    ca_not_after = None
    if msg.HasField("trusted_ca"):
        ca, ca_name = read_data_source(msg.trusted_ca, f"{path}.trusted_ca")
        try:
            certs = x509.load_pem_x509_certificates(ca)
        except ValueError:
            certs = []
        if not certs:
            raise ConfigError(f"{path}.trusted_ca",
                              f"Failed to load trusted CA certificates from {ca_name}")
        ca_not_after = certs[0].not_valid_after_utc.timestamp()
    system_roots = msg.HasField("system_root_certs")
    has_ca = bool(ca) or system_roots
    typed = msg.match_typed_subject_alt_names
    legacy = msg.match_subject_alt_names
    if typed and legacy:
        # Envoy uses the typed list and warns; refusing says which one counts.
        raise ConfigError(f"{path}.match_subject_alt_names",
                          "set either match_typed_subject_alt_names or the deprecated"
                          " match_subject_alt_names, not both")
    matchers: list[SanMatcher] = []
    for i, m in enumerate(typed):
        mpath = f"{path}.match_typed_subject_alt_names[{i}]"
        if m.san_type == _OTHER_NAME:
            raise not_supported(f"{mpath}.san_type", "OTHER_NAME")
        san_type = _SAN_TYPES.get(m.san_type)
        if san_type is None:
            raise ConfigError(f"{mpath}.san_type", "value must be one of EMAIL, DNS, URI,"
                                                   " IP_ADDRESS")
        if not m.HasField("matcher"):
            raise ConfigError(f"{mpath}.matcher", "value is required")
        matchers.append(_san_matcher(san_type, m.matcher, f"{mpath}.matcher"))
    for i, sm in enumerate(legacy):
        for san_type in ("DNS", "URI", "EMAIL", "IP_ADDRESS"):
            matchers.append(_san_matcher(san_type, sm, f"{path}.match_subject_alt_names[{i}]"))
    if matchers and not has_ca:
        raise ConfigError(path, "SAN-based verification of peer certificates without trusted CA"
                                " is insecure and not allowed")
    if msg.allow_expired_certificate and not has_ca:
        raise ConfigError(f"{path}.allow_expired_certificate",
                          "Certificate validity period is always ignored without trusted CA")
    cert_hashes = frozenset(
        _hex_sha256(h, f"{path}.verify_certificate_hash[{i}]")
        for i, h in enumerate(msg.verify_certificate_hash))
    spki_hashes = frozenset(
        _b64_sha256(h, f"{path}.verify_certificate_spki[{i}]")
        for i, h in enumerate(msg.verify_certificate_spki))
    return _Validation(
        ca=ca, system_roots=system_roots, allow_expired=msg.allow_expired_certificate,
        validator=CertValidator(tuple(matchers), cert_hashes, spki_hashes),
        ca_not_after=ca_not_after)


def _san_matcher(san_type: str, msg: Any, path: str) -> SanMatcher:
    matcher = compile_string_matcher(msg, path)
    dns_exact = None
    if san_type == "DNS" and msg.WhichOneof("match_pattern") == "exact":
        dns_exact = msg.exact
    if san_type == "IP_ADDRESS" and msg.WhichOneof("match_pattern") == "exact":
        try:  # an exact IP is compared in canonical form, as the SAN is printed
            ip = str(ipaddress.ip_address(msg.exact))
        except ValueError:
            ip = None
        if ip is not None and ip != msg.exact:
            raise ConfigError(f"{path}.exact", f"write the IP address as {ip!r}")
    return SanMatcher(san_type, matcher, dns_exact)


def _hex_sha256(text: str, path: str) -> bytes:
    h = text.replace(":", "") if len(text) == 95 else text
    try:
        raw = binascii.unhexlify(h)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ConfigError(path, f"Invalid hex-encoded SHA-256 {text}")
    return raw


def _b64_sha256(text: str, path: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ConfigError(path, f"Invalid base64-encoded SHA-256 {text}")
    return raw


def _base_context(common: _Common, *, server: bool, alpn: tuple[str, ...], path: str,
                  verify_mode: ssl.VerifyMode) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    if not server:
        ctx.check_hostname = False  # Envoy checks names only through SAN matchers
    ctx.minimum_version = common.min_version
    ctx.maximum_version = common.max_version
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.set_ciphers(common.ciphers)
    if common.curve is not None:
        ctx.set_ecdh_curve(common.curve)
    for i, cert in enumerate(common.certificates):
        with _memory_file(cert.chain) as chain_path, _memory_file(cert.key) as key_path:
            try:
                # A password callback, never None: OpenSSL would prompt on the terminal.
                ctx.load_cert_chain(chain_path, key_path,
                                    password=cert.password or (lambda: b""))
            except ssl.SSLError as exc:
                raise ConfigError(f"{path}.common_tls_context.tls_certificates[{i}]",
                                  f"cannot use this certificate and key: {exc.reason or exc}"
                                  ) from None
    v = common.validation
    if v is not None:
        if v.ca:
            try:
                ctx.load_verify_locations(cadata=v.ca.decode("ascii", "replace"))
            except ssl.SSLError as exc:
                raise ConfigError(f"{path}.common_tls_context.validation_context.trusted_ca",
                                  f"Failed to load trusted CA certificates: {exc.reason or exc}"
                                  ) from None
        if v.system_roots:
            ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH)
        flags = ctx.verify_flags | ssl.VERIFY_X509_PARTIAL_CHAIN
        if v.allow_expired:
            flags |= _X509_V_FLAG_NO_CHECK_TIME
        ctx.verify_flags = flags
    ctx.verify_mode = verify_mode
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


# ----------------------------------------------------------------------------- expiry
def iter_tls_contexts(snapshot: Any) -> Iterator[TlsContext]:
    """Every TLS context of a snapshot: listener filter chains, then clusters."""
    for lc in getattr(snapshot, "listeners", ()):
        fcm = lc.filter_chains
        chains = list(getattr(fcm, "chains", ()))
        if getattr(fcm, "default_filter_chain", None) is not None:
            chains.append(fcm.default_filter_chain)
        for chain in chains:
            ts = getattr(chain, "transport_socket", None)
            if isinstance(ts, TlsContext):
                yield ts
    for cluster in getattr(snapshot, "clusters", {}).values():
        ts = getattr(cluster, "transport_socket", None)
        if isinstance(ts, TlsContext):
            yield ts


def days_until_first_cert_expiring(snapshot: Any, now: float | None = None) -> int:
    """Envoy's ``server.days_until_first_cert_expiring``: whole days until the first configured
    certificate (leaf or trusted CA) expires; 0 once one has expired; ``UINT32_MAX`` with none."""
    now = time.time() if now is None else now
    first: float | None = None
    for ctx in iter_tls_contexts(snapshot):
        for t in ctx.expirations:
            first = t if first is None else min(first, t)
    if first is None:
        return _UINT32_MAX
    if first < now:
        return 0
    return min(_UINT32_MAX, int((first - now) // 86400))
