"""proxy_protocol: the v1/v2 header parser (sans-IO) and the filter's decisions and stats."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from envoy.extensions.filters.listener.proxy_protocol.v3.proxy_protocol_pb2 import ProxyProtocol
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.errors import ConfigError
from proxy.extensions.filters.listener.proxy_protocol.header import (
    NEED_MORE,
    NOT_FOUND,
    V2_SIGNATURE,
    Denied,
    NeedMore,
    NotFound,
    ProxyHeader,
    ProxyProtocolError,
    parse_proxy_protocol,
)
from proxy.extensions.filters.listener.proxy_protocol.proxy_protocol import ProxyProtocolConfig
from proxy.listener.listener_filter import AcceptedSocket, Action, ListenerFilterChain
from proxy.stats import Store

PAYLOAD = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def v2(command: int = 1, family: int = 1, transport: int = 1, src: str = "192.0.2.1",
       dst: str = "198.51.100.2", sport: int = 40000, dport: int = 443,
       tlvs: bytes = b"", addr: bytes | None = None, length: int | None = None,
       version: int = 2) -> bytes:
    if addr is None:
        addr = (ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
                + struct.pack("!HH", sport, dport)) if command == 1 else b""
    body = addr + tlvs
    n = len(body) if length is None else length
    return V2_SIGNATURE + bytes([version << 4 | command, family << 4 | transport]) + \
        struct.pack("!H", n) + body


def tlv(t: int, value: bytes) -> bytes:
    return bytes([t]) + struct.pack("!H", len(value)) + value


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


# ----------------------------------------------------------------------------- the parser
@pytest.mark.parametrize(("data", "expected"), [
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 443\r\n",
     ProxyHeader(1, 45, ("192.0.2.1", 40000), ("198.51.100.2", 443))),
    (b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n",
     ProxyHeader(1, 44, ("2001:db8::1", 1), ("2001:db8::2", 65535))),
    (b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 1 2\r\n",
     ProxyHeader(1, 45, ("::ffff:c000:201", 1), ("2001:db8::2", 2))),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, 15)),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", ProxyHeader(1, 35)),
    (v2(), ProxyHeader(2, 28, ("192.0.2.1", 40000), ("198.51.100.2", 443))),
    (v2(family=2, src="2001:db8::1", dst="2001:db8::2"),
     ProxyHeader(2, 52, ("2001:db8::1", 40000), ("2001:db8::2", 443))),
    (v2(transport=2), ProxyHeader(2, 28, ("192.0.2.1", 40000), ("198.51.100.2", 443))),
    (v2(tlvs=tlv(1, b"h2") + tlv(0xEA, b"")),
     ProxyHeader(2, 28 + 5 + 3, ("192.0.2.1", 40000), ("198.51.100.2", 443),
                 ((1, b"h2"), (0xEA, b"")))),
    (v2(command=0), ProxyHeader(2, 16)),  # LOCAL: health checks keep the socket's addresses
    (v2(command=0, family=0, addr=b"junk bytes"), ProxyHeader(2, 26)),  # LOCAL: skipped
])
def test_headers(data: bytes, expected: ProxyHeader) -> None:
    assert expected.length == len(data)  # the whole header, and only it, is consumed
    assert parse_proxy_protocol(data + PAYLOAD) == expected
    for n in range(len(data)):
        assert parse_proxy_protocol(data[:n]) is NEED_MORE, n


@pytest.mark.parametrize(("data", "version"), [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 0),
    (b"PROXY TCP4 1.2.3.4" + b" " * 100, 0),  # no CR LF within 108 bytes
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n", 1),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n", 1),
    (b"PROXY  TCP4 192.0.2.1 198.51.100.2 1 2\r\n", 1),
    (b"PROXY TCP5 192.0.2.1 198.51.100.2 1 2\r\n", 1),
    (b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n", 1),
    (b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n", 1),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n", 1),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 2\r\n", 1),
    (b"PROXY TCP4 192.0.2.01 198.51.100.2 1 2\r\n", 1),
    (b"PROXY TCP6 fe80::1%eth0 2001:db8::2 1 2\r\n", 1),
    (b"PROXY TCP4 0.0.0.0 198.51.100.2 1 2\r\n", 1),  # not unicast
    (b"PROXY TCP4 192.0.2.1 224.0.0.1 1 2\r\n", 1),
    (b"PROXY TCP4 192.0.2.1 255.255.255.255 1 2\r\n", 1),
    (b"HELLO\r\n", 0),  # 16 bytes and not "PROXY ": no version
    (v2(version=1), 2),
    (v2(family=3, addr=b"\0" * 216), 2),  # AF_UNIX
    (v2(family=0), 2),  # AF_UNSPEC with PROXY
    (v2(command=2), 2),
    (v2(transport=0), 2),
    (v2(length=11), 2),  # shorter than the addresses
    (v2(tlvs=b"\x01\x00"), 2),  # no room for a TLV length
    (v2(tlvs=b"\x01\x00\x05ab"), 2),  # TLV value past the end
    (v2(src="0.0.0.0"), 2),
    (v2(family=2, src="ff02::1", dst="2001:db8::2"), 2),
])
def test_errors(data: bytes, version: int) -> None:
    result = parse_proxy_protocol(data + PAYLOAD)
    assert isinstance(result, ProxyProtocolError) and result.version == version, result


def test_a_short_line_reads_as_v1_as_in_envoy() -> None:
    # Under 16 bytes Envoy looks for CR LF before it can rule v2 out: "HELLO\r\n" alone is a
    # malformed v1 header (versions.v1.error); with more bytes behind it, no version at all.
    assert parse_proxy_protocol(b"HELLO\r\n") == ProxyProtocolError(1, "not a PROXY line")


def test_allow_requests_without_proxy_protocol() -> None:
    allow = {"allow_requests_without_proxy_protocol": True}
    assert parse_proxy_protocol(PAYLOAD, **allow) is NOT_FOUND
    assert parse_proxy_protocol(b"\x16\x03\x01", **allow) is NOT_FOUND
    assert parse_proxy_protocol(b"PRO", **allow) is NEED_MORE  # could still be a header
    assert parse_proxy_protocol(b"\r\n\r\n", **allow) is NEED_MORE
    assert parse_proxy_protocol(v2() + PAYLOAD, **allow) == parse_proxy_protocol(v2())
    # Only allowed versions count as "could be a header".
    assert parse_proxy_protocol(b"PROXY ", allow_v1=False, **allow) is NOT_FOUND


def test_disallowed_versions() -> None:
    assert parse_proxy_protocol(v2(), allow_v2=False) == Denied(2)
    assert parse_proxy_protocol(b"PROXY UNKNOWN\r\n", allow_v1=False) == Denied(1)


@settings(max_examples=400)
@given(st.sampled_from([v2(), v2(family=2, src="2001:db8::1", dst="2001:db8::9"),
                        v2(tlvs=tlv(2, b"authority.example") + tlv(5, b"\x00" * 300)),
                        v2(command=0),
                        b"PROXY TCP4 10.1.2.3 10.9.8.7 1234 80\r\n", b"PROXY UNKNOWN\r\n",
                        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n", b"NOT A PROXY HEADER!!"]),
       st.lists(st.integers(min_value=0, max_value=400), max_size=8),
       st.booleans())
def test_random_splits_give_the_same_answer(header: bytes, cuts: list[int], allow: bool) -> None:
    data = header + PAYLOAD
    whole = parse_proxy_protocol(data, allow_requests_without_proxy_protocol=allow)
    seen, result = b"", NEED_MORE
    for chunk in chunked(data, cuts):
        seen += chunk
        result = parse_proxy_protocol(seen, allow_requests_without_proxy_protocol=allow)
        if result is not NEED_MORE:
            break
    assert result == whole


_RESULTS = (NeedMore, NotFound, ProxyHeader, ProxyProtocolError, Denied)


@settings(max_examples=500)
@given(st.binary(max_size=300), st.booleans(), st.booleans())
def test_arbitrary_bytes_never_raise(data: bytes, allow: bool, allow_v1: bool) -> None:
    result = parse_proxy_protocol(data, allow_requests_without_proxy_protocol=allow,
                                  allow_v1=allow_v1)
    assert isinstance(result, _RESULTS)


@settings(max_examples=500)
@given(st.data())
def test_corrupted_v2_headers_never_raise(data: st.DataObject) -> None:
    header = bytearray(data.draw(st.sampled_from([
        v2(tlvs=tlv(1, b"h2")), v2(family=2, src="2001:db8::1", dst="2001:db8::2")])))
    for _ in range(data.draw(st.integers(1, 4))):
        header[data.draw(st.integers(12, len(header) - 1))] = data.draw(st.integers(0, 255))
    assert isinstance(parse_proxy_protocol(bytes(header)), _RESULTS)


# ----------------------------------------------------------------------------- the filter
class _Socket:
    """A kernel receive queue: peeks see it, drain consumes it."""

    def __init__(self, data: bytes, cuts: list[int]) -> None:
        self.pending = chunked(data, cuts)
        self.queued = b""
        self.data = b""

    def drain(self, n: int) -> bool:
        self.queued = self.queued[n:]
        self.data = self.data[n:]
        return True


def run_filter(data: bytes, cuts: list[int] | None = None, **proto: object
               ) -> tuple[Action, AcceptedSocket, dict[str, int], bytes]:
    store = Store()
    config = ProxyProtocolConfig.from_proto(ProxyProtocol(**proto), "pp")  # type: ignore[arg-type]
    sock = AcceptedSocket(("10.0.0.1", 8080), ("10.0.0.2", 5555))
    chain = ListenerFilterChain([config.bind(store).new_filter()], sock)
    q = _Socket(data, cuts or [])
    action = chain.start()
    while action is Action.NEED_DATA:
        q.data = q.queued[:chain.max_read_bytes]
        while not chain.has_unseen(q) and q.pending:
            q.queued += q.pending.pop(0)
            q.data = q.queued[:chain.max_read_bytes]
        if not chain.has_unseen(q):
            break
        action = chain.on_data(q)
    rest = q.queued + b"".join(q.pending)
    stats = {k: c.value for k, c in store.counters.items() if c.value}
    return action, sock, stats, rest


def test_v1_sets_the_addresses_and_consumes_the_header() -> None:
    action, sock, stats, rest = run_filter(
        b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 443\r\n" + PAYLOAD, [5, 30])
    assert action is Action.DONE
    assert sock.remote_address == ("192.0.2.1", 40000)
    assert sock.direct_remote_address == ("10.0.0.2", 5555)
    assert sock.local_address == ("198.51.100.2", 443) and sock.local_address_restored
    assert rest == PAYLOAD
    assert stats == {"proxy_proto.versions.v1.found": 1}


def test_v2_with_tlvs_longer_than_the_first_peek() -> None:
    data = v2(family=2, src="2001:db8::1", dst="2001:db8::2", tlvs=tlv(0xE0, b"x" * 1000))
    action, sock, stats, rest = run_filter(data + PAYLOAD, [100, 400])
    assert action is Action.DONE
    assert sock.remote_address == ("2001:db8::1", 40000)
    assert rest == PAYLOAD
    assert stats == {"proxy_proto.versions.v2.found": 1}


def test_same_local_address_is_not_restored() -> None:
    action, sock, _, _ = run_filter(b"PROXY TCP4 192.0.2.1 10.0.0.1 1 8080\r\n")
    assert action is Action.DONE and not sock.local_address_restored


def test_local_command_keeps_the_socket_addresses() -> None:
    action, sock, stats, rest = run_filter(v2(command=0, tlvs=tlv(1, b"x")) + PAYLOAD)
    assert action is Action.DONE
    assert sock.remote_address == ("10.0.0.2", 5555) and not sock.local_address_restored
    assert rest == PAYLOAD
    assert stats == {"proxy_proto.versions.v2.found": 1}


@pytest.mark.parametrize(("data", "stat"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "proxy_proto.not_found_disallowed"),
    (b"PROXY TCP4 nope\r\n", "proxy_proto.versions.v1.error"),
    (v2(version=3), "proxy_proto.versions.v2.error"),
])
def test_malformed_closes_and_counts(data: bytes, stat: str) -> None:
    action, sock, stats, _ = run_filter(data)
    assert action is Action.CLOSE and sock.closed
    assert stats == {stat: 1, "downstream_cx_proxy_proto_error": 1}


def test_without_proxy_protocol_allowed() -> None:
    action, sock, stats, rest = run_filter(
        PAYLOAD, allow_requests_without_proxy_protocol=True, stat_prefix="edge")
    assert action is Action.DONE and rest == PAYLOAD
    assert sock.remote_address == ("10.0.0.2", 5555)
    assert stats == {"proxy_proto.edge.not_found_allowed": 1}


def test_disallowed_version_closes() -> None:
    action, sock, stats, _ = run_filter(v2(), disallowed_versions=[1])
    assert action is Action.CLOSE
    assert stats == {"proxy_proto.versions.v2.found": 1, "proxy_proto.versions.v2.disallowed": 1}


def test_all_versions_disallowed_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        ProxyProtocolConfig.from_proto(ProxyProtocol(disallowed_versions=[0, 1]), "pp")
    assert info.value.path == "pp.disallowed_versions"
