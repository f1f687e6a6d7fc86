"""The PROXY protocol header (HAProxy's proxy-protocol.txt, v1 and v2), sans-IO.

Theory of operation: ``parse_proxy_protocol(data, ...)`` follows Envoy's
``ProxyProtocol::Filter::readProxyHeader`` / ``parseV1Header`` / ``parseV2Header`` /
``parseTlvs`` on the bytes peeked so far, re-reading them from the start on every call:

1. With ``allow_requests_without_proxy_protocol``, bytes that cannot start an allowed
   signature (``PROXY `` for v1, the 12-byte v2 signature) mean "no header": ``NotFound``.
2. From 16 bytes on, a v2 signature makes the header v2; anything not starting ``PROXY `` is
   an error. A disallowed version is ``Denied``.
3. v2: version nibble 2; command LOCAL (0, addresses ignored) or PROXY (1) with family INET
   (1, 12 address bytes) or INET6 (2, 36 bytes) and transport STREAM or DGRAM; the length
   field covers the addresses and the TLVs, each ``type(1) length(2) value``, which must fill
   it exactly. AF_UNIX and AF_UNSPEC with PROXY are errors, as in Envoy.
4. v1: a line ending in CR LF within 108 bytes: ``PROXY TCP4|TCP6 src dst sport dport`` or
   ``PROXY UNKNOWN ...`` (addresses ignored); single spaces; the address family must match.
5. PROXY addresses must be unicast (not the any address, not broadcast, not multicast).
6. Results: ``NEED_MORE``, ``NotFound``, ``ProxyHeader`` (``length`` bytes to consume;
   ``remote``/``local`` None for LOCAL and UNKNOWN), ``ProxyProtocolError(version, reason)``
   (``version`` 0 when no version was recognised) or ``Denied(version)``. Never raises.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

__all__ = [
    "NEED_MORE", "NOT_FOUND", "V1_SIGNATURE", "V2_SIGNATURE", "Denied", "NeedMore", "NotFound",
    "ProxyHeader", "ProxyProtocolError", "parse_proxy_protocol",
]

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LEN = 16
V2_ADDR_LEN_UNIX = 216
MAX_V1_LEN = 108  # Envoy's MAX_PROXY_PROTO_LEN_V1, CR LF included
MAX_V2_LEN = V2_HEADER_LEN + V2_ADDR_LEN_UNIX  # what Envoy peeks before it knows the length
_LOCAL, _PROXY = 0, 1
_AF_INET, _AF_INET6 = 1, 2
_STREAM, _DGRAM = 1, 2
Address = tuple[str, int]


class NeedMore:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


class NotFound:
    """No PROXY header, and the filter allows connections without one."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_FOUND"


NEED_MORE: Final = NeedMore()
NOT_FOUND: Final = NotFound()


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int  # 1 or 2
    length: int  # bytes of the whole header, TLVs included
    remote: Address | None = None  # None: LOCAL command or UNKNOWN (keep the socket's)
    local: Address | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class ProxyProtocolError:
    version: int  # 0: not recognised as either version
    reason: str


@dataclass(frozen=True, slots=True)
class Denied:
    version: int


class _Error(Exception):
    pass


def parse_proxy_protocol(
    data: bytes, *, allow_v1: bool = True, allow_v2: bool = True,
    allow_requests_without_proxy_protocol: bool = False,
) -> ProxyHeader | NeedMore | NotFound | ProxyProtocolError | Denied:
    if allow_requests_without_proxy_protocol:
        match_v2 = allow_v2 and data[:12] == V2_SIGNATURE[:min(12, len(data))]
        match_v1 = allow_v1 and data[:6] == V1_SIGNATURE[:min(6, len(data))]
        if not match_v1 and not match_v2:
            return NOT_FOUND
    version = 0
    if len(data) >= V2_HEADER_LEN:
        if data[:12] == V2_SIGNATURE:
            version = 2
        elif data[:6] != V1_SIGNATURE:
            return ProxyProtocolError(0, "neither a v1 nor a v2 header")
    if version == 2:
        if not allow_v2:
            return Denied(2)
        try:
            return _parse_v2(data)
        except _Error as exc:
            return ProxyProtocolError(2, str(exc))
    end = data.find(b"\r\n")
    if end == -1:
        if len(data) > MAX_V1_LEN:
            return ProxyProtocolError(0, "no v1 header within 108 bytes")
        return NEED_MORE
    if end == 0:
        return NEED_MORE  # "\r\n..." may start a v2 signature: 16 bytes will tell
    length = end + 2
    if length > MAX_V1_LEN:
        return ProxyProtocolError(0, "no v1 header within 108 bytes")
    if not allow_v1:
        return Denied(1)
    try:
        return _parse_v1(data[:length])
    except _Error as exc:
        return ProxyProtocolError(1, str(exc))


def _parse_v2(data: bytes) -> ProxyHeader | NeedMore:
    ver_cmd, fam = data[12], data[13]
    if ver_cmd >> 4 != 2:
        raise _Error("unsupported v2 version")
    command = ver_cmd & 0x0F
    if command == _LOCAL:
        addr_len = 0
    elif fam >> 4 == _AF_INET:
        addr_len = 12
    elif fam >> 4 == _AF_INET6:
        addr_len = 36
    else:
        raise _Error("unsupported v2 address family")
    hdr_addr_len = (data[14] << 8) | data[15]
    if hdr_addr_len < addr_len:
        raise _Error(f"address length {hdr_addr_len} < {addr_len}")
    if len(data) < V2_HEADER_LEN + addr_len:
        return NEED_MORE
    if command != _LOCAL and (command != _PROXY or fam & 0x0F not in (_STREAM, _DGRAM)):
        raise _Error("unsupported command or transport")
    length = V2_HEADER_LEN + hdr_addr_len
    if len(data) < length:
        return NEED_MORE
    if command == _LOCAL:
        return ProxyHeader(2, length)  # TLVs of a LOCAL header are skipped, not parsed
    a = data[V2_HEADER_LEN:V2_HEADER_LEN + addr_len]
    if addr_len == 12:
        src = str(ipaddress.IPv4Address(a[0:4]))
        dst = str(ipaddress.IPv4Address(a[4:8]))
        ports = a[8:12]
    else:
        src = str(ipaddress.IPv6Address(a[0:16]))
        dst = str(ipaddress.IPv6Address(a[16:32]))
        ports = a[32:36]
    remote = (src, (ports[0] << 8) | ports[1])
    local = (dst, (ports[2] << 8) | ports[3])
    _check_unicast(src, dst)
    tlvs = _parse_tlvs(data[V2_HEADER_LEN + addr_len:length])
    return ProxyHeader(2, length, remote, local, tlvs)


def _parse_tlvs(buf: bytes) -> tuple[tuple[int, bytes], ...]:
    out: list[tuple[int, bytes]] = []
    i, end = 0, len(buf)
    while i < end:
        tlv_type = buf[i]
        if i + 3 > end:
            raise _Error("no bytes for a TLV length")
        n = (buf[i + 1] << 8) | buf[i + 2]
        if i + 3 + n > end:
            raise _Error("no bytes for a TLV value")
        out.append((tlv_type, buf[i + 3:i + 3 + n]))
        i += 3 + n
    return tuple(out)


def _parse_v1(line: bytes) -> ProxyHeader:
    parts = line.decode("latin-1").rstrip(" \t\f\v\n\r").split(" ")
    if len(parts) < 2 or parts[0] != "PROXY":
        raise _Error("not a PROXY line")
    if parts[1] == "UNKNOWN":
        return ProxyHeader(1, len(line))
    if len(parts) != 6:
        raise _Error("a v1 header needs 6 fields")
    if parts[1] not in ("TCP4", "TCP6"):
        raise _Error(f"unknown v1 protocol {parts[1]!r}")
    family: type[ipaddress.IPv4Address | ipaddress.IPv6Address] = (
        ipaddress.IPv4Address if parts[1] == "TCP4" else ipaddress.IPv6Address)
    src, dst = _v1_ip(parts[2], family), _v1_ip(parts[3], family)
    remote = (src, _v1_port(parts[4]))
    local = (dst, _v1_port(parts[5]))
    _check_unicast(src, dst)
    return ProxyHeader(1, len(line), remote, local)


def _v1_ip(text: str, family: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> str:
    if "%" in text:
        raise _Error(f"bad address {text!r}")  # a scope id: inet_pton refuses it
    try:
        return str(family(text))
    except ValueError:
        raise _Error(f"bad address {text!r}") from None


def _v1_port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise _Error(f"bad port {text!r}")
    return int(text)


def _check_unicast(*addresses: str) -> None:
    for text in addresses:
        ip = ipaddress.ip_address(text)
        if ip.is_unspecified or ip.is_multicast or (ip.version == 4 and text == "255.255.255.255"):
            raise _Error(f"{text} is not a unicast address")
