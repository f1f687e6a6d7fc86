"""Filter chain matching: Envoy's precedence, its config errors, and a differential check
against a slow reference written straight from the FilterChainMatch documentation."""

from __future__ import annotations

import ipaddress
import itertools
from typing import Any

import pytest
from envoy.config.listener.v3 import listener_pb2
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.errors import ConfigError
from proxy.listener.filter_chain_manager import ConnectionFacts, FilterChainManager


def cidr(text: str) -> dict[str, Any]:
    addr, _, plen = text.partition("/")
    out: dict[str, Any] = {"address_prefix": addr}
    if plen:
        out["prefix_len"] = int(plen)
    return out


def listener(*chains: tuple[str, dict[str, Any]], default: str | None = None) -> Any:
    d: dict[str, Any] = {
        "name": "l",
        "filter_chains": [
            {"name": name, "filter_chain_match": match} if match else {"name": name}
            for name, match in chains
        ],
    }
    if default is not None:
        d["default_filter_chain"] = {"name": default}
    return json_format.ParseDict(d, listener_pb2.Listener())


def fcm(*chains: tuple[str, dict[str, Any]], default: str | None = None) -> FilterChainManager[str]:
    return FilterChainManager.from_proto(
        listener(*chains, default=default), lambda chain, path: chain.name, "listeners[0]"
    )


def facts(
    dst: str = "10.0.0.1",
    dport: int = 443,
    src: str = "192.0.2.7",
    sport: int = 40000,
    sni: str | None = None,
    transport: str = "raw_buffer",
    alpn: tuple[str, ...] = (),
    direct: str | None = None,
) -> ConnectionFacts:
    return ConnectionFacts(
        destination_ip=dst,
        destination_port=dport,
        source_ip=src,
        source_port=sport,
        server_name=sni,
        transport_protocol=transport,
        application_protocols=alpn,
        direct_source_ip=direct,
    )


# ------------------------------------------------------------------------------------------
# Precedence, level by level
# ------------------------------------------------------------------------------------------


def test_single_catch_all_chain_matches_everything() -> None:
    m = fcm(("any", {}))
    assert m.find_filter_chain(facts()) == "any"
    assert m.find_filter_chain(facts(dst="::1", src="::1", dport=1)) == "any"
    assert m.chains == ("any",)


def test_no_match_gives_default_chain_or_none() -> None:
    assert fcm(("p80", {"destination_port": 80})).find_filter_chain(facts(dport=443)) is None
    m = fcm(("p80", {"destination_port": 80}), default="fallback")
    assert m.find_filter_chain(facts(dport=443)) == "fallback"
    assert m.find_filter_chain(facts(dport=80)) == "p80"
    assert m.default_filter_chain == "fallback"


def test_destination_port_is_checked_before_server_name() -> None:
    # Envoy's order: a chain naming the port wins over one that names the SNI but no port.
    m = fcm(
        ("by_sni", {"server_names": ["www.example.com"]}),
        ("by_port", {"destination_port": 443}),
    )
    assert m.find_filter_chain(facts(dport=443, sni="www.example.com")) == "by_port"
    assert m.find_filter_chain(facts(dport=8443, sni="www.example.com")) == "by_sni"


def test_specific_port_does_not_fall_back_to_port_zero_chains() -> None:
    # "There is entry for specific port but none of the filter chain matches. Instead of
    # matching catch-all port 0, the fallback filter chain is returned."
    m = fcm(
        ("p443_tls", {"destination_port": 443, "transport_protocol": "tls"}),
        ("any_port", {}),
        default="dflt",
    )
    assert m.find_filter_chain(facts(dport=443, transport="tls")) == "p443_tls"
    assert m.find_filter_chain(facts(dport=443, transport="raw_buffer")) == "dflt"
    assert m.find_filter_chain(facts(dport=80)) == "any_port"


def test_destination_ip_longest_prefix_wins() -> None:
    m = fcm(
        ("wide", {"prefix_ranges": [cidr("10.0.0.0/8")]}),
        ("narrow", {"prefix_ranges": [cidr("10.1.0.0/16"), cidr("172.16.0.0/12")]}),
        ("host", {"prefix_ranges": [cidr("10.1.2.3/32")]}),
        ("v6", {"prefix_ranges": [cidr("2001:db8::/32")]}),
        ("unset", {}),
    )
    assert m.find_filter_chain(facts(dst="10.1.2.3")) == "host"
    assert m.find_filter_chain(facts(dst="10.1.2.4")) == "narrow"
    assert m.find_filter_chain(facts(dst="172.20.0.1")) == "narrow"
    assert m.find_filter_chain(facts(dst="10.200.0.1")) == "wide"
    assert m.find_filter_chain(facts(dst="192.168.1.1")) == "unset"
    assert m.find_filter_chain(facts(dst="2001:db8::5")) == "v6"
    assert m.find_filter_chain(facts(dst="2001:db9::5")) == "unset"
    # A dual-stack listener sees IPv4 peers as IPv4-mapped; Envoy matches them as IPv4.
    assert m.find_filter_chain(facts(dst="::ffff:10.1.2.3")) == "host"
    # Not an IP (a pipe): only the catch-all ranges match.
    assert m.find_filter_chain(facts(dst="/run/x.sock")) == "unset"


def test_cidr_host_bits_are_masked_and_prefix_len_defaults_to_zero() -> None:
    m = fcm(
        ("masked", {"prefix_ranges": [cidr("10.1.2.3/16")]}),
        ("no_len_means_slash_zero", {"prefix_ranges": [cidr("192.168.0.1")]}),
    )
    assert m.find_filter_chain(facts(dst="10.1.99.99")) == "masked"
    assert m.find_filter_chain(facts(dst="8.8.8.8")) == "no_len_means_slash_zero"
    assert m.find_filter_chain(facts(dst="2001:db8::1")) is None


def test_server_names_exact_then_longest_wildcard_then_none() -> None:
    m = fcm(
        ("exact", {"server_names": ["www.example.com", "API.example.com"]}),
        ("wild", {"server_names": ["*.example.com"]}),
        ("wilder", {"server_names": ["*.com"]}),
        ("none", {}),
    )
    assert m.find_filter_chain(facts(sni="www.example.com")) == "exact"
    assert m.find_filter_chain(facts(sni="api.example.com")) == "exact"  # lower-cased
    assert m.find_filter_chain(facts(sni="WWW.Example.COM")) == "exact"
    assert m.find_filter_chain(facts(sni="foo.example.com")) == "wild"
    assert m.find_filter_chain(facts(sni="a.b.example.com")) == "wild"
    assert m.find_filter_chain(facts(sni="example.com")) == "wilder"  # *.example.com ≠ apex
    assert m.find_filter_chain(facts(sni="example.org")) == "none"
    assert m.find_filter_chain(facts(sni=None)) == "none"


def test_server_name_branch_is_final_no_backtracking() -> None:
    m = fcm(
        ("sni_tls", {"server_names": ["a.example.com"], "transport_protocol": "tls"}),
        ("plain", {}),
    )
    assert m.find_filter_chain(facts(sni="a.example.com", transport="tls")) == "sni_tls"
    # The SNI branch is taken and has no raw_buffer chain: no match, even though "plain"
    # would accept the connection on its own.
    assert m.find_filter_chain(facts(sni="a.example.com")) is None
    assert m.find_filter_chain(facts(sni="b.example.com")) == "plain"


def test_transport_protocol_exact_then_unset() -> None:
    m = fcm(("tls", {"transport_protocol": "tls"}), ("other", {}))
    assert m.find_filter_chain(facts(transport="tls")) == "tls"
    assert m.find_filter_chain(facts(transport="raw_buffer")) == "other"


def test_application_protocols_first_offered_that_a_chain_names() -> None:
    m = fcm(
        ("h2", {"application_protocols": ["h2"]}),
        ("h1", {"application_protocols": ["http/1.1", "http/1.0"]}),
        ("none", {}),
    )
    assert m.find_filter_chain(facts(alpn=("h2", "http/1.1"))) == "h2"
    assert m.find_filter_chain(facts(alpn=("http/1.1", "h2"))) == "h1"
    assert m.find_filter_chain(facts(alpn=("spdy/3", "http/1.0"))) == "h1"
    assert m.find_filter_chain(facts(alpn=("spdy/3",))) == "none"
    assert m.find_filter_chain(facts()) == "none"


def test_direct_source_ip_is_the_socket_peer_not_the_proxied_source() -> None:
    m = fcm(
        ("from_lb", {"direct_source_prefix_ranges": [cidr("10.9.0.0/16")]}),
        ("rest", {}),
    )
    # PROXY protocol rewrote the source to 203.0.113.5; the socket peer was the LB.
    assert m.find_filter_chain(facts(src="203.0.113.5", direct="10.9.1.1")) == "from_lb"
    assert m.find_filter_chain(facts(src="10.9.1.1", direct="203.0.113.5")) == "rest"
    assert m.find_filter_chain(facts(src="10.9.1.1")) == "from_lb"  # direct defaults to src


def test_source_type_local_external_any() -> None:
    m = fcm(
        ("local", {"source_type": "SAME_IP_OR_LOOPBACK"}),
        ("external", {"source_type": "EXTERNAL"}),
    )
    assert m.find_filter_chain(facts(src="127.0.0.5")) == "local"
    assert m.find_filter_chain(facts(src="::1", dst="::1")) == "local"
    assert m.find_filter_chain(facts(src="10.0.0.1", dst="10.0.0.1")) == "local"  # same IP
    assert m.find_filter_chain(facts(src="192.0.2.1")) == "external"
    only_external = fcm(("external", {"source_type": "EXTERNAL"}), ("any", {}))
    assert only_external.find_filter_chain(facts(src="127.0.0.1")) == "any"
    assert only_external.find_filter_chain(facts(src="192.0.2.1")) == "external"
    only_local = fcm(("local", {"source_type": "SAME_IP_OR_LOOPBACK"}))
    assert only_local.find_filter_chain(facts(src="192.0.2.1")) is None


def test_source_ip_longest_prefix_then_source_port() -> None:
    m = fcm(
        ("net", {"source_prefix_ranges": [cidr("192.0.2.0/24")]}),
        ("host", {"source_prefix_ranges": [cidr("192.0.2.7/32")]}),
        ("host_port", {"source_prefix_ranges": [cidr("192.0.2.7/32")], "source_ports": [5000, 5001]}),
        ("anyone", {}),
    )
    assert m.find_filter_chain(facts(src="192.0.2.7", sport=5001)) == "host_port"
    assert m.find_filter_chain(facts(src="192.0.2.7", sport=6000)) == "host"
    assert m.find_filter_chain(facts(src="192.0.2.8", sport=5001)) == "net"
    assert m.find_filter_chain(facts(src="198.51.100.1")) == "anyone"


def test_build_chain_gets_every_chain_and_its_path() -> None:
    seen: list[tuple[str, str]] = []

    def build(chain: Any, path: str) -> str:
        seen.append((chain.name, path))
        return chain.name.upper()

    m = FilterChainManager.from_proto(
        listener(("a", {"destination_port": 1}), ("b", {}), default="d"), build, "L"
    )
    assert seen == [("a", "L.filter_chains[0]"), ("b", "L.filter_chains[1]"), ("d", "L.default_filter_chain")]
    assert m.find_filter_chain(facts(dport=1)) == "A"
    assert m.chains == ("A", "B") and m.default_filter_chain == "D"


def test_default_chain_alone_is_enough() -> None:
    m = fcm(default="only")
    assert m.find_filter_chain(facts()) == "only"


# ------------------------------------------------------------------------------------------
# Config errors
# ------------------------------------------------------------------------------------------


def _error(*chains: tuple[str, dict[str, Any]], default: str | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fcm(*chains, default=default)
    return info.value


def test_identical_matches_are_refused_naming_both_chains() -> None:
    e = _error(("a", {"server_names": ["x.com"]}), ("b", {"server_names": ["x.com"]}))
    assert e.path == "listeners[0].filter_chains[1].filter_chain_match"
    assert "'b' has the same matching rules defined as 'a'" in e.message
    e = _error(("a", {}), ("b", {}))
    assert "same matching rules" in e.message


def test_overlapping_matches_are_refused() -> None:
    e = _error(
        ("a", {"server_names": ["x.com", "y.com"]}),
        ("b", {"server_names": ["y.com", "z.com"]}),
    )
    assert e.path == "listeners[0].filter_chains[1].filter_chain_match"
    assert "multiple filter chains with overlapping matching rules are defined" in e.message
    # 10.0.0.1 and 10.0.0.1/32 are the same range.
    e = _error(
        ("a", {"prefix_ranges": [cidr("10.0.0.1/32")]}),
        ("b", {"prefix_ranges": [cidr("10.0.0.1/40")]}),  # clamped to /32
    )
    assert "overlapping" in e.message
    e = _error(("a", {"source_ports": [80, 80]}))
    assert "overlapping" in e.message


@pytest.mark.parametrize(
    ("match", "path_suffix", "words"),
    [
        ({"prefix_ranges": [cidr("10.0.0.300/8")]}, "prefix_ranges[0].address_prefix", "malformed"),
        ({"source_prefix_ranges": [{"address_prefix": ""}]}, "source_prefix_ranges[0].address_prefix", "empty"),
        ({"direct_source_prefix_ranges": [cidr("1.2.3.4/129")]}, "direct_source_prefix_ranges[0].prefix_len", "128"),
        ({"server_names": ["ok.com", "www.*.com"]}, "server_names[1]", "partial wildcards"),
        ({"server_names": ["*"]}, "server_names[0]", "partial wildcards"),
        ({"server_names": ["*.a*.com"]}, "server_names[0]", "first label"),
        ({"destination_port": 0}, "destination_port", "1..65535"),
        ({"destination_port": 70000}, "destination_port", "1..65535"),
        ({"source_ports": [443, 0]}, "source_ports[1]", "1..65535"),
        ({"address_suffix": "x"}, "address_suffix", "not supported"),
    ],
)
def test_invalid_matches_are_refused_with_their_path(
    match: dict[str, Any], path_suffix: str, words: str
) -> None:
    e = _error(("ok", {}), ("bad", match))
    assert e.path == f"listeners[0].filter_chains[1].filter_chain_match.{path_suffix}"
    assert words in e.message


def test_listener_level_errors() -> None:
    e = _error()
    assert e.path == "listeners[0].filter_chains" and "no filter chains" in e.message
    lp = listener(("a", {}))
    lp.filter_chain_matcher.SetInParent()
    with pytest.raises(ConfigError) as info:
        FilterChainManager.from_proto(lp, lambda c, p: c.name, "listeners[0]")
    assert info.value.path == "listeners[0].filter_chain_matcher"
    lp = listener(("a", {}), default="d")
    lp.default_filter_chain.filter_chain_match.destination_port.value = 1
    with pytest.raises(ConfigError) as info:
        FilterChainManager.from_proto(lp, lambda c, p: c.name, "listeners[0]")
    assert info.value.path == "listeners[0].default_filter_chain.filter_chain_match"


def test_build_chain_errors_propagate() -> None:
    def build(chain: Any, path: str) -> str:
        raise ConfigError(f"{path}.filters", "boom")

    with pytest.raises(ConfigError) as info:
        FilterChainManager.from_proto(listener(("a", {})), build, "L")
    assert info.value.path == "L.filter_chains[0].filters"


# ------------------------------------------------------------------------------------------
# Differential: the compiled tree against a slow reference of the documented rules
# ------------------------------------------------------------------------------------------

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
CATCH_ALL_NETS = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def _nets(ranges: list[str]) -> tuple[Net, ...]:
    return tuple(ipaddress.ip_network(r, strict=False) for r in ranges) or CATCH_ALL_NETS


def _addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    a = ipaddress.ip_address(text)
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def _best_by_prefix(cands: list[dict[str, Any]], key: str, ip: Any) -> list[dict[str, Any]]:
    def best(c: dict[str, Any]) -> int:
        return max((n.prefixlen for n in _nets(c[key]) if ip in n), default=-1)

    top = max((best(c) for c in cands), default=-1)
    return [c for c in cands if top >= 0 and best(c) == top]


def reference_find(chains: list[dict[str, Any]], f: ConnectionFacts) -> str | None:
    """The FilterChainMatch docs as a filter per level: keep the most specific survivors."""
    c = [ch for ch in chains if ch["port"] == f.destination_port] or [
        ch for ch in chains if ch["port"] is None
    ]
    dst, src = _addr(f.destination_ip), _addr(f.source_ip)
    direct = src if f.direct_source_ip is None else _addr(f.direct_source_ip)
    c = _best_by_prefix(c, "dst", dst)
    sni = (f.server_name or "").lower()
    names = [ch for ch in c if sni in [n.lower() for n in ch["names"]]]
    if not names:
        labels = sni.split(".")
        for i in range(1, len(labels) if sni else 0):
            wild = "*." + ".".join(labels[i:])
            names = [ch for ch in c if wild in ch["names"]]
            if names:
                break
        else:
            names = [ch for ch in c if not ch["names"]]
    c = names
    c = [ch for ch in c if ch["transport"] == f.transport_protocol] or [
        ch for ch in c if ch["transport"] == ""
    ]
    for p in f.application_protocols:
        hit = [ch for ch in c if p in ch["alpn"]]
        if hit:
            c = hit
            break
    else:
        c = [ch for ch in c if not ch["alpn"]]
    c = _best_by_prefix(c, "direct", direct)
    local = src.is_loopback or src == dst
    wanted = "SAME_IP_OR_LOOPBACK" if local else "EXTERNAL"
    c = [ch for ch in c if ch["type"] == wanted] or [ch for ch in c if ch["type"] == "ANY"]
    c = _best_by_prefix(c, "src", src)
    c = [ch for ch in c if f.source_port in ch["sports"]] or [ch for ch in c if not ch["sports"]]
    assert len(c) <= 1, c
    return c[0]["name"] if c else None


def reference_overlaps(chains: list[dict[str, Any]]) -> bool:
    """Two chains are ambiguous when every criterion shares a value (empty = catch-all)."""

    def keys(ch: dict[str, Any]) -> list[list[Any]]:
        return [
            [ch["port"] or 0],
            [(n.network_address, n.prefixlen) for n in _nets(ch["dst"])],
            [n[1:] if n.startswith("*.") else n for n in ch["names"]] or [""],
            [ch["transport"]],
            ch["alpn"] or [""],
            [(n.network_address, n.prefixlen) for n in _nets(ch["direct"])],
            [ch["type"]],
            [(n.network_address, n.prefixlen) for n in _nets(ch["src"])],
            ch["sports"] or [0],
        ]

    ks = [keys(ch) for ch in chains]
    if any(len(set(level)) != len(level) for k in ks for level in k):
        return True
    return any(
        all(set(la) & set(lb) for la, lb in zip(a, b, strict=True))
        for a, b in itertools.combinations(ks, 2)
    )


def to_match(ch: dict[str, Any]) -> dict[str, Any]:
    m: dict[str, Any] = {}
    if ch["port"] is not None:
        m["destination_port"] = ch["port"]
    for key, field in (
        ("dst", "prefix_ranges"),
        ("direct", "direct_source_prefix_ranges"),
        ("src", "source_prefix_ranges"),
    ):
        if ch[key]:
            m[field] = [cidr(r) for r in ch[key]]
    if ch["names"]:
        m["server_names"] = ch["names"]
    if ch["transport"]:
        m["transport_protocol"] = ch["transport"]
    if ch["alpn"]:
        m["application_protocols"] = ch["alpn"]
    if ch["type"] != "ANY":
        m["source_type"] = ch["type"]
    if ch["sports"]:
        m["source_ports"] = ch["sports"]
    return m


DST_NETS = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "0.0.0.0/0", "fd00::/8", "::/0"]
SRC_NETS = ["127.0.0.0/8", "192.0.2.0/24", "192.0.2.7/32", "10.0.0.0/8", "::1/128"]
NAMES = ["a.example.com", "*.example.com", "*.com", "example.com", "B.example.com"]


def _subset(pool: list[Any], max_size: int = 2) -> st.SearchStrategy[list[Any]]:
    # Mostly empty: a criterion left unset is the common case, and it keeps matches likely.
    some = st.lists(st.sampled_from(pool), min_size=1, max_size=max_size, unique=True)
    return st.one_of(st.just([]), st.just([]), some)


chain_strategy = st.fixed_dictionaries(
    {
        "port": st.sampled_from([None, None, None, 443, 80]),
        "dst": _subset(DST_NETS),
        "names": _subset(NAMES),
        "transport": st.sampled_from(["", "", "", "tls", "raw_buffer"]),
        "alpn": _subset(["h2", "http/1.1"]),
        "direct": _subset(SRC_NETS, 1),
        "type": st.sampled_from(["ANY", "ANY", "ANY", "SAME_IP_OR_LOOPBACK", "EXTERNAL"]),
        "src": _subset(SRC_NETS),
        "sports": _subset([1000, 2000], 1),
    }
)

IPS = ["10.1.2.3", "10.1.9.9", "10.200.0.1", "8.8.8.8", "127.0.0.1", "192.0.2.7", "192.0.2.9",
       "fd00::1", "2001:db8::1", "::1", "::ffff:10.1.2.3"]
facts_strategy = st.builds(
    ConnectionFacts,
    destination_ip=st.sampled_from(IPS),
    destination_port=st.sampled_from([443, 80, 8080]),
    source_ip=st.sampled_from(IPS),
    source_port=st.sampled_from([1000, 2000, 3000]),
    server_name=st.sampled_from([None, "a.example.com", "b.example.com", "x.example.com",
                                 "example.com", "y.x.example.com", "foo.com", "A.Example.COM"]),
    transport_protocol=st.sampled_from(["raw_buffer", "tls"]),
    application_protocols=st.lists(st.sampled_from(["h2", "http/1.1", "spdy"]), max_size=2,
                                   unique=True).map(tuple),
    direct_source_ip=st.sampled_from([None, None, "127.0.0.1", "10.0.0.9", "203.0.113.1"]),
)


@settings(max_examples=300, deadline=None)
@given(
    chains=st.lists(chain_strategy, min_size=1, max_size=5),
    probes=st.lists(facts_strategy, min_size=1, max_size=12),
    with_default=st.booleans(),
)
def test_compiled_tree_agrees_with_reference(
    chains: list[dict[str, Any]], probes: list[ConnectionFacts], with_default: bool
) -> None:
    for i, ch in enumerate(chains):
        ch["name"] = f"c{i}"
    specs = [(ch["name"], to_match(ch)) for ch in chains]
    default = "dflt" if with_default else None
    if reference_overlaps(chains):
        with pytest.raises(ConfigError, match="same matching rules|overlapping"):
            fcm(*specs, default=default)
        return
    m = fcm(*specs, default=default)
    for f in probes:
        expected = reference_find(chains, f)
        assert m.find_filter_chain(f) == (expected if expected is not None else default), f
