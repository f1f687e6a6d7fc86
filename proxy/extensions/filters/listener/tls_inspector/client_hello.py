"""The TLS ClientHello as ``tls_inspector`` reads it, sans-IO: ``parse_client_hello(data)``.

Theory of operation
-------------------
Envoy hands the peeked bytes to BoringSSL, which stops the handshake in its server-name
callback: a ClientHello that reaches that callback is TLS (``tls_found``), anything BoringSSL
rejects before it is not (``tls_not_found``). We parse the same wire format ourselves:

1. Records (RFC 8446 §5.1): content type 22 (handshake), a ``3.x`` record version, a length of
   1..2^14. The handshake message may span several records; each record is waited for whole,
   as BoringSSL does, except that a first byte that cannot start a handshake record answers
   "not TLS" at once (BoringSSL waits for a 5-byte header to say the same).
2. The handshake message: type 1 (ClientHello), a 24-bit length, then the body: a ``3.x``
   legacy version, 32 random bytes, a session id of at most 32 bytes, a non-empty even list
   of cipher suites, a non-empty list of compression methods, and optionally an extensions
   block that fills the rest of the body exactly, without duplicate extension types.
3. ``server_name`` (0): exactly one ``host_name`` entry of 1..255 bytes without NUL
   (BoringSSL's rule; otherwise "not TLS"). ``application_layer_protocol_negotiation`` (16):
   a non-empty list of non-empty names; a malformed one is ignored, as Envoy's ``onALPN``
   does. Other extensions are not interpreted.
4. The result is ``NEED_MORE``, a ``ClientHello`` (with ``size``, the bytes it took), or
   ``NotTls(reason)``. Calling again with more bytes re-parses from the start: the answer
   depends only on the bytes, never on how they were split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["NEED_MORE", "ClientHello", "NeedMore", "NotTls", "parse_client_hello"]

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_MAX_RECORD = 1 << 14
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_MAX_HOST_NAME = 255  # TLSEXT_MAXLEN_host_name


class NeedMore:
    """The bytes so far are a valid prefix of a ClientHello: wait for more."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = NeedMore()


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None  # the SNI host name as sent (not lower-cased); None without SNI
    alpn: tuple[str, ...]  # the offered protocols in order; () without the extension
    size: int  # bytes of the records that carried the hello


@dataclass(frozen=True, slots=True)
class NotTls:
    reason: str


class _Malformed(Exception):
    pass


def parse_client_hello(data: bytes) -> ClientHello | NeedMore | NotTls:
    """Parse the records at the start of ``data`` as a TLS ClientHello."""
    try:
        return _parse(data)
    except _Malformed as exc:
        return NotTls(str(exc))


def _parse(data: bytes) -> ClientHello | NeedMore:
    handshake = bytearray()
    pos = 0
    end = len(data)
    while True:
        if pos >= end:
            return NEED_MORE
        if data[pos] != _HANDSHAKE:
            raise _Malformed("not a TLS handshake record")
        if pos + 1 < end and data[pos + 1] != 3:
            raise _Malformed("not a TLS record version")
        if pos + 5 > end:
            return NEED_MORE
        length = (data[pos + 3] << 8) | data[pos + 4]
        if length == 0 or length > _MAX_RECORD:
            raise _Malformed(f"bad record length {length}")
        if pos + 5 + length > end:
            return NEED_MORE
        handshake += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if handshake[0] != _CLIENT_HELLO:
            raise _Malformed("the first handshake message is not a ClientHello")
        if len(handshake) < 4:
            continue
        body_len = (handshake[1] << 16) | (handshake[2] << 8) | handshake[3]
        if len(handshake) < 4 + body_len:
            continue
        # Handshake bytes after the ClientHello are another message: not ours to judge.
        server_name, alpn = _parse_body(bytes(handshake[4:4 + body_len]))
        return ClientHello(server_name, alpn, pos)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.remaining():
            raise _Malformed(f"truncated {what}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        b = self.take(2, what)
        return (b[0] << 8) | b[1]

    def vec8(self, what: str) -> bytes:
        return self.take(self.u8(what), what)

    def vec16(self, what: str) -> bytes:
        return self.take(self.u16(what), what)


def _parse_body(body: bytes) -> tuple[str | None, tuple[str, ...]]:
    r = _Reader(body)
    version = r.take(2, "version")
    if version[0] != 3:
        raise _Malformed("not a TLS ClientHello version")
    r.take(32, "random")
    if len(r.vec8("session id")) > 32:
        raise _Malformed("session id longer than 32 bytes")
    suites = r.vec16("cipher suites")
    if not suites or len(suites) % 2:
        raise _Malformed("bad cipher suite list")
    if not r.vec8("compression methods"):
        raise _Malformed("no compression method")
    if r.remaining() == 0:
        return None, ()  # no extensions at all (a valid, if old, ClientHello)
    extensions = _Reader(r.vec16("extensions"))
    if r.remaining():
        raise _Malformed("data after the extensions")
    seen: set[int] = set()
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    while extensions.remaining():
        ext_type = extensions.u16("extension type")
        ext_data = extensions.vec16("extension")
        if ext_type in seen:
            raise _Malformed(f"duplicate extension {ext_type}")
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            server_name = _parse_sni(ext_data)
        elif ext_type == _EXT_ALPN:
            alpn = _parse_alpn(ext_data)
    return server_name, alpn


def _parse_sni(ext: bytes) -> str:
    outer = _Reader(ext)
    names = _Reader(outer.vec16("server name list"))
    if outer.remaining():
        raise _Malformed("data after the server name list")
    name_type = names.u8("server name type")
    host = names.vec16("server name")
    if names.remaining():
        raise _Malformed("more than one server name")
    if name_type != 0 or not host or len(host) > _MAX_HOST_NAME or 0 in host:
        raise _Malformed("bad server name")
    return host.decode("latin-1")


def _parse_alpn(ext: bytes) -> tuple[str, ...]:
    """The offered protocols; () when the list is malformed (Envoy's ``onALPN`` ignores it
    and leaves the error to the TLS stack, which meets it after the server-name callback)."""
    try:
        outer = _Reader(ext)
        names = _Reader(outer.vec16("protocol name list"))
        if outer.remaining() or not names.remaining():
            return ()
        out: list[str] = []
        while names.remaining():
            name = names.vec8("protocol name")
            if not name:
                return ()
            out.append(name.decode("latin-1"))
    except _Malformed:
        return ()
    return tuple(out)
