"""tls_inspector: the ClientHello parser (sans-IO) and the filter's decisions and stats.

Inputs are real ClientHellos from Python's ssl module (OpenSSL) and hand-built ones; every
property is checked with the bytes fed whole, byte by byte and in random chunks.
"""

from __future__ import annotations

import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.extensions.filters.listener.tls_inspector.client_hello import (
    NEED_MORE,
    ClientHello,
    NotTls,
    parse_client_hello,
)
from proxy.extensions.filters.listener.tls_inspector.tls_inspector import TlsInspectorConfig
from proxy.listener.listener_filter import AcceptedSocket, Action, ListenerFilterChain
from proxy.stats import Store


# ----------------------------------------------------------------------------- inputs
def openssl_hello(server_name: str | None = "example.com",
                  alpn: list[str] | None = None) -> bytes:
    """The first flight of a real OpenSSL client."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def ext(ext_type: int, body: bytes) -> bytes:
    return struct.pack("!HH", ext_type, len(body)) + body


def sni_ext(name: bytes) -> bytes:
    entry = b"\x00" + struct.pack("!H", len(name)) + name
    return ext(0, struct.pack("!H", len(entry)) + entry)


def alpn_ext(*names: bytes) -> bytes:
    lst = b"".join(bytes([len(n)]) + n for n in names)
    return ext(16, struct.pack("!H", len(lst)) + lst)


def hello_body(extensions: bytes | None = b"", session_id: bytes = b"",
               suites: bytes = b"\x13\x01\x00\xff", version: bytes = b"\x03\x03") -> bytes:
    body = version + b"\x11" * 32 + bytes([len(session_id)]) + session_id
    body += struct.pack("!H", len(suites)) + suites + b"\x01\x00"
    if extensions is not None:
        body += struct.pack("!H", len(extensions)) + extensions
    return body


def records(body: bytes, sizes: list[int] | None = None, msg_type: int = 1) -> bytes:
    """The handshake message in TLS records (split at ``sizes`` when given)."""
    msg = bytes([msg_type]) + len(body).to_bytes(3, "big") + body
    chunks, pos = [], 0
    for n in sizes or []:
        chunks.append(msg[pos:pos + n])
        pos += n
    chunks.append(msg[pos:])
    return b"".join(b"\x16\x03\x01" + struct.pack("!H", len(c)) + c for c in chunks if c)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


def parse_in_chunks(data: bytes, cuts: list[int]) -> object:
    """What the filter would conclude, peeking after each chunk arrives."""
    seen = b""
    result: object = NEED_MORE
    for chunk in chunked(data, cuts):
        seen += chunk
        result = parse_client_hello(seen)
        if result is not NEED_MORE:
            return result
    return result


# ----------------------------------------------------------------------------- the parser
@pytest.mark.parametrize(("name", "alpn"), [
    ("example.com", None), ("www.Example.COM", ["h2", "http/1.1"]), (None, ["http/1.1"]),
    (None, None)])
def test_openssl_client_hello(name: str | None, alpn: list[str] | None) -> None:
    data = openssl_hello(name, alpn)
    result = parse_client_hello(data)
    assert isinstance(result, ClientHello)
    assert result.server_name == name
    assert result.alpn == tuple(alpn or ())
    assert result.size == len(data)
    # Byte by byte, and with application data behind it: the same answer.
    assert parse_in_chunks(data, list(range(len(data)))) == result
    assert parse_client_hello(data + b"\x17\x03\x03\x00\x05hello") == result
    for n in range(len(data)):
        assert parse_client_hello(data[:n]) is NEED_MORE


def test_hello_split_over_records() -> None:
    body = hello_body(sni_ext(b"a.example") + alpn_ext(b"h2"))
    for sizes in ([1], [2, 2], [4], [10, 1, 1, 30]):
        result = parse_client_hello(records(body, sizes))
        assert result == ClientHello("a.example", ("h2",), len(records(body, sizes)))


@pytest.mark.parametrize("alpn", [alpn_ext(b"h2", b""), ext(16, b"\x00\x00"), ext(16, b"\x00")])
def test_malformed_alpn_is_ignored_as_envoy_does(alpn: bytes) -> None:
    data = records(hello_body(sni_ext(b"x.example") + alpn))
    assert parse_client_hello(data) == ClientHello("x.example", (), len(data))


def test_hello_without_extensions() -> None:
    assert parse_client_hello(records(hello_body(None))) == ClientHello(
        None, (), len(records(hello_body(None))))


@pytest.mark.parametrize(("data", "reason"), [
    (b"GET / HTTP/1.1\r\n", "not a TLS handshake record"),
    (b"\x16\x01", "not a TLS record version"),
    (b"\x80\x2e\x01\x03\x01", "not a TLS handshake record"),  # SSLv2-compatible hello
    (b"\x15\x03\x01\x00\x02\x02\x28", "not a TLS handshake record"),  # an alert
    (b"\x16\x03\x01\x00\x00", "bad record length 0"),
    (b"\x16\x03\x01\x48\x01", "bad record length 18433"),
    (records(hello_body(), msg_type=2), "the first handshake message is not a ClientHello"),
    (records(hello_body(version=b"\x02\x00")), "not a TLS ClientHello version"),
    (records(hello_body(session_id=b"s" * 33)), "session id longer than 32 bytes"),
    (records(hello_body(suites=b"\x13")), "bad cipher suite list"),
    (records(hello_body(suites=b"")), "bad cipher suite list"),
    (records(hello_body(sni_ext(b"a") + sni_ext(b"b"))), "duplicate extension 0"),
    (records(hello_body(sni_ext(b""))), "bad server name"),
    (records(hello_body(sni_ext(b"a\x00b"))), "bad server name"),
    (records(hello_body(sni_ext(b"a" * 256))), "bad server name"),
    (records(hello_body(ext(0, b"\x00\x03\x01\x00\x00"))), "bad server name"),  # not host_name
    (records(hello_body(b"\x00")), "truncated extension type"),
    (records(hello_body(b"") + b"x"), "data after the extensions"),
])
def test_not_tls(data: bytes, reason: str) -> None:
    assert parse_client_hello(data) == NotTls(reason)


@settings(max_examples=300)
@given(st.sampled_from([("h.example", ["h2"]), (None, None), ("x.y", ["http/1.1"])]),
       st.lists(st.integers(min_value=0, max_value=4000), max_size=12))
def test_random_splits_give_the_same_answer(case: tuple, cuts: list[int]) -> None:
    data = openssl_hello(*case)
    assert parse_in_chunks(data, cuts) == parse_client_hello(data)


@settings(max_examples=500)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    assert isinstance(parse_client_hello(data), ClientHello | NotTls) or (
        parse_client_hello(data) is NEED_MORE)


@settings(max_examples=500)
@given(st.data())
def test_corrupted_hellos_never_raise(data: st.DataObject) -> None:
    hello = bytearray(openssl_hello("c.example", ["h2"]))
    for _ in range(data.draw(st.integers(1, 6))):
        hello[data.draw(st.integers(0, len(hello) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(hello)))
    result = parse_client_hello(bytes(hello[:cut]))
    assert result is NEED_MORE or isinstance(result, ClientHello | NotTls)


# ----------------------------------------------------------------------------- the filter
class _Buffer:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def drain(self, n: int) -> bool:
        self.data = self.data[n:]
        return True


def run_filter(data: bytes, cuts: list[int] | None = None, **cfg: object
               ) -> tuple[Action, AcceptedSocket, Store]:
    store = Store()
    config = TlsInspectorConfig(**cfg)  # type: ignore[arg-type]
    sock = AcceptedSocket(("127.0.0.1", 443), ("127.0.0.1", 5000))
    chain = ListenerFilterChain([config.bind(store).new_filter()], sock)
    action = chain.start()
    queued = b""
    pending = chunked(data, cuts or [])
    buf = _Buffer(b"")
    while action is Action.NEED_DATA:
        buf.data = queued[:chain.max_read_bytes]  # a peek: what is queued, up to the max
        while not chain.has_unseen(buf) and pending:
            queued += pending.pop(0)
            buf.data = queued[:chain.max_read_bytes]
        if not chain.has_unseen(buf):
            break  # the peer sent everything and the filter still waits
        action = chain.on_data(buf)
    return action, sock, store


def counters(store: Store) -> dict[str, int]:
    return {k.removeprefix("tls_inspector."): c.value for k, c in store.counters.items()
            if c.value}


def test_filter_sets_the_facts_and_counts() -> None:
    action, sock, store = run_filter(openssl_hello("Svc.Example", ["h2", "http/1.1"]), [7, 100])
    assert action is Action.DONE
    assert sock.transport_protocol == "tls"
    assert sock.requested_server_name == "Svc.Example"
    assert sock.requested_application_protocols == ("h2", "http/1.1")
    assert counters(store) == {"tls_found": 1, "sni_found": 1, "alpn_found": 1}
    assert store.histograms["tls_inspector.bytes_processed"].count == 1


def test_filter_without_sni_or_alpn() -> None:
    action, sock, store = run_filter(openssl_hello(None, None))
    assert action is Action.DONE and sock.requested_server_name is None
    assert counters(store) == {"tls_found": 1, "sni_not_found": 1, "alpn_not_found": 1}


def test_plaintext_is_raw_buffer() -> None:
    action, sock, store = run_filter(b"GET / HTTP/1.1\r\n\r\n")
    assert action is Action.DONE
    assert sock.transport_protocol == "raw_buffer"
    assert counters(store) == {"tls_not_found": 1}


def test_plaintext_closes_when_configured() -> None:
    action, sock, store = run_filter(
        b"GET / HTTP/1.1\r\n", close_connection_on_client_hello_parsing_errors=True)
    assert action is Action.CLOSE and sock.closed
    assert counters(store) == {}


def test_client_hello_too_large() -> None:
    body = hello_body(ext(21, b"\x00" * 3000))  # padding
    data = records(body, [1000, 1000])
    action, sock, store = run_filter(data, [500, 1500], max_client_hello_size=2048)
    assert action is Action.CLOSE and sock.closed
    assert counters(store) == {"client_hello_too_large": 1}
    # The same hello fits the default 16 KiB.
    action, sock, store = run_filter(data, [500, 1500])
    assert action is Action.DONE and counters(store)["tls_found"] == 1


def test_peek_grows_from_initial_read_buffer_size() -> None:
    data = openssl_hello("grow.example")
    action, sock, _ = run_filter(data, list(range(0, len(data), 50)), initial_read_buffer_size=64)
    assert action is Action.DONE and sock.requested_server_name == "grow.example"


def test_config_limits() -> None:
    from envoy.extensions.filters.listener.tls_inspector.v3.tls_inspector_pb2 import TlsInspector

    from proxy.config.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        TlsInspectorConfig.from_proto(TlsInspector(max_client_hello_size={"value": 16385}), "p")
    assert info.value.path == "p.max_client_hello_size"
    cfg = TlsInspectorConfig.from_proto(
        TlsInspector(max_client_hello_size={"value": 4096},
                     initial_read_buffer_size={"value": 8192}), "p")
    assert (cfg.max_client_hello_size, cfg.initial_read_buffer_size) == (4096, 4096)
