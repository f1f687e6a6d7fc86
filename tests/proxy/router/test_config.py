"""The route table: Envoy's virtual host and route selection, redirects, direct responses,
route actions, header mutations and every config error path, with differential checks
against slow references written from the Envoy source."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from envoy.config.route.v3 import route_pb2
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.common.hash import hash64
from proxy.config.context import FactoryContext
from proxy.config.errors import ConfigError
from proxy.http.headers import HeaderMap
from proxy.router.config import (
    DEFAULT_ROUTE_TIMEOUT_S,
    DirectResponse,
    Route,
    RouteAction,
    RouteTable,
)
from proxy.stream_info import StreamInfo

CLUSTERS = frozenset({"a", "b", "c", "d"})


def rc(d: dict[str, Any]) -> Any:
    return json_format.ParseDict(d, route_pb2.RouteConfiguration())


def table(d: dict[str, Any], clusters: frozenset[str] = CLUSTERS, validate: bool = True,
          path: str = "rc") -> RouteTable:
    ctx = FactoryContext(cluster_names=clusters, validate_clusters=validate)
    return RouteTable.from_proto(rc(d), ctx, path)


def vh(name: str, domains: list[str], *routes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "domains": domains, "routes": list(routes), **extra}


def rt(name: str = "r", match: dict[str, Any] | None = None, **action: Any) -> dict[str, Any]:
    if not action:
        action = {"route": {"cluster": "a"}}
    return {"name": name, "match": match if match is not None else {"prefix": "/"}, **action}


def one(*routes: dict[str, Any], **extra: Any) -> RouteTable:
    """A table with one catch-all virtual host."""
    return table({"name": "t", "virtual_hosts": [vh("v", ["*"], *routes, **extra)]})


def req(path: str | None = "/", host: str | None = "example.com", *extra: tuple[str, str],
        scheme: str = "http", method: str = "GET") -> HeaderMap:
    items = [(":method", method), (":scheme", scheme)]
    if path is not None:
        items.append((":path", path))
    if host is not None:
        items.append((":authority", host))
    return HeaderMap([*items, *extra])


def err(d: dict[str, Any], **kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        table(d, **kw)
    return e.value


def route_err(*routes: dict[str, Any], **extra: Any) -> ConfigError:
    return err({"name": "t", "virtual_hosts": [vh("v", ["*"], *routes, **extra)]})


def name_of(route: Route | None) -> str | None:
    return None if route is None else route.name


# ----------------------------------------------------------------------------- virtual hosts
DOMAINS_TABLE = table({"name": "t", "virtual_hosts": [
    vh("exact", ["www.example.com", "Mixed.Example.COM"], rt("exact")),
    vh("star-dot", ["*.example.com"], rt("star-dot")),
    vh("star-dash", ["*-bar.example.com"], rt("star-dash")),
    vh("prefix", ["www.*"], rt("prefix")),
    vh("prefix-long", ["www.example.*"], rt("prefix-long")),
    vh("port", ["api.example.com:8080"], rt("port")),
    vh("default", ["*"], rt("default")),
]})


@pytest.mark.parametrize(
    ("host", "vhost"),
    [
        ("www.example.com", "exact"),
        ("WWW.EXAMPLE.COM", "exact"),  # case-insensitive on :authority
        ("mixed.example.com", "exact"),  # and on the configured domains
        ("foo.example.com", "star-dot"),
        ("foo-bar.example.com", "star-dash"),  # longest suffix wildcard first
        ("a.b.example.com", "star-dot"),
        (".example.com", "default"),  # a wildcard needs a non-empty rest
        ("www.example.org", "prefix-long"),  # prefix wildcards after suffix ones, longest first
        ("www.other.net", "prefix"),
        ("www.", "default"),
        ("www.example.com:80", "prefix-long"),  # the port is part of the host
        ("foo.example.com:80", "default"),
        ("api.example.com:8080", "port"),
        ("api.example.com", "star-dot"),
        ("unknown.net", "default"),
    ],
)
def test_virtual_host_selection(host: str, vhost: str) -> None:
    route = DOMAINS_TABLE.route(req("/", host))
    assert route is not None and route.virtual_host_name == vhost


def test_no_authority_no_route_unless_only_default() -> None:
    assert DOMAINS_TABLE.route(req("/", None)) is None
    only_default = one(rt("x"))
    assert name_of(only_default.route(req("/", None))) == "x"
    no_default = table({"name": "t", "virtual_hosts": [vh("v", ["a.com"], rt("x"))]})
    assert no_default.route(req("/", "b.com")) is None
    assert name_of(no_default.route(req("/", "A.com"))) == "x"


def test_virtual_host_errors() -> None:
    e = err({"name": "t", "virtual_hosts": [vh("v1", ["a.com"], rt()), vh("v2", ["A.COM"], rt())]})
    assert e.path == "rc.virtual_hosts[1].domains[0]"
    assert "Duplicate entry of domain a.com in route t" in e.message
    e = err({"name": "t", "virtual_hosts": [vh("v1", ["*.a.com", "*.A.com"], rt())]})
    assert e.path == "rc.virtual_hosts[0].domains[1]"
    e = err({"name": "t", "virtual_hosts": [vh("v1", ["a.*"], rt()), vh("v2", ["x", "a.*"])]})
    assert e.path == "rc.virtual_hosts[1].domains[1]"
    e = err({"name": "t", "virtual_hosts": [vh("v1", ["*"], rt()), vh("v2", ["*"], rt())]})
    assert e.path == "rc.virtual_hosts[1].domains[0]"
    assert e.message == "Only a single wildcard domain is permitted in route t"
    e = err({"name": "t", "virtual_hosts": [{"name": "v", "domains": []}]})
    assert e.path == "rc.virtual_hosts[0].domains"
    e = err({"name": "t", "virtual_hosts": [{"domains": ["*"]}]})
    assert e.path == "rc.virtual_hosts[0].name"


def _reference_vhost(domains: list[str], host: str) -> int | None:
    """findVirtualHost, straight from RouteMatcher: exact, suffix, prefix, default."""
    host = host.lower()
    if host in domains:
        return domains.index(host)
    best: tuple[int, int] | None = None
    for i, d in enumerate(domains):
        if d.startswith("*") and d != "*":
            rest = d[1:]
            if len(rest) < len(host) and host.endswith(rest) and (
                    best is None or len(rest) > best[0]):
                best = (len(rest), i)
    if best is not None:
        return best[1]
    for i, d in enumerate(domains):
        if d.endswith("*") and d != "*":
            rest = d[:-1]
            if len(rest) < len(host) and host.startswith(rest) and (
                    best is None or len(rest) > best[0]):
                best = (len(rest), i)
    if best is not None:
        return best[1]
    return domains.index("*") if "*" in domains else None


_label = st.text(alphabet="ab.-", min_size=0, max_size=4)
_domain = st.one_of(
    _label.filter(bool),
    _label.map(lambda s: "*" + s),
    _label.map(lambda s: s + "*"),
)


@settings(max_examples=300)
@given(domains=st.lists(_domain, min_size=1, max_size=6, unique=True),
       host=st.text(alphabet="abAB.-", max_size=6))
def test_domain_precedence_matches_reference(domains: list[str], host: str) -> None:
    t = table({"name": "t", "virtual_hosts": [
        vh(f"v{i}", [d], rt(f"r{i}")) for i, d in enumerate(domains)]})
    expected = _reference_vhost(domains, host)
    route = t.route(req("/", host))
    assert name_of(route) == (None if expected is None else f"r{expected}")


# ----------------------------------------------------------------------------- route matching
def test_path_specifiers() -> None:
    t = one(
        rt("exact", {"path": "/exact"}),
        rt("exact-nocase", {"path": "/NoCase", "case_sensitive": False}),
        rt("regex", {"safe_regex": {"regex": "/re/[0-9]+"}}),
        rt("sep", {"path_separated_prefix": "/sep"}),
        rt("sep-nocase", {"path_separated_prefix": "/SEPI", "case_sensitive": False}),
        rt("prefix", {"prefix": "/pre"}),
        rt("prefix-nocase", {"prefix": "/UP", "case_sensitive": False}),
    )
    cases = {
        "/exact": "exact",
        "/exact?x=1": "exact",  # the query is not part of the path
        "/exact#frag": "exact",
        "/exact/": None,
        "/EXACT": None,
        "/nocase": "exact-nocase",
        "/NOCASE?q": "exact-nocase",
        "/re/123": "regex",
        "/re/123?a=b": "regex",
        "/re/123/x": None,  # full match
        "/re/abc": None,
        "/sep": "sep",
        "/sep/": "sep",
        "/sep/x": "sep",
        "/sep?x": "sep",
        "/sepx": None,
        "/sepi/y": "sep-nocase",
        "/SePi": "sep-nocase",
        "/pre": "prefix",
        "/prefix/long": "prefix",
        "/PRE": None,
        "/up/x": "prefix-nocase",
        "/Uploads": "prefix-nocase",
        "/other": None,
    }
    for path, expected in cases.items():
        assert name_of(t.route(req(path))) == expected, path


def test_first_match_wins_and_no_path_no_route() -> None:
    t = one(rt("api", {"prefix": "/api"}), rt("all", {"prefix": "/"}), rt("never", {"prefix": "/api"}))
    assert name_of(t.route(req("/api/x"))) == "api"
    assert name_of(t.route(req("/x"))) == "all"
    assert t.route(req(None)) is None
    assert name_of(one(rt("e", {"prefix": ""})).route(req("/anything"))) == "e"


def test_header_and_query_conditions_all_must_match() -> None:
    t = one(
        rt("both", {"prefix": "/", "headers": [{"name": "x-a", "exact_match": "1"},
                                               {"name": ":method", "exact_match": "POST"}],
                    "query_parameters": [{"name": "v", "string_match": {"exact": "2"}}]}),
        rt("hdr", {"prefix": "/", "headers": [{"name": "x-a", "present_match": True}]}),
        rt("qp", {"prefix": "/", "query_parameters": [{"name": "debug"}]}),
        rt("rest"),
    )
    assert name_of(t.route(req("/?v=2", "h", ("x-a", "1"), method="POST"))) == "both"
    assert name_of(t.route(req("/?v=2", "h", ("x-a", "1")))) == "hdr"
    assert name_of(t.route(req("/?v=3&debug", "h", method="POST"))) == "qp"
    assert name_of(t.route(req("/", "h"))) == "rest"


def _reference_route(prefixes: list[tuple[str, bool]], path: str) -> int | None:
    only = path.split("?")[0].split("#")[0]
    for i, (prefix, case_sensitive) in enumerate(prefixes):
        if (only if case_sensitive else only.lower()).startswith(
                prefix if case_sensitive else prefix.lower()):
            return i
    return None


@settings(max_examples=300)
@given(prefixes=st.lists(st.tuples(st.text(alphabet="/aB", max_size=4), st.booleans()),
                         min_size=1, max_size=6),
       path=st.text(alphabet="/abAB?#", max_size=8))
def test_prefix_matching_matches_reference(prefixes: list[tuple[str, bool]], path: str) -> None:
    t = one(*(rt(f"r{i}", {"prefix": p, "case_sensitive": cs})
              for i, (p, cs) in enumerate(prefixes)))
    expected = _reference_route(prefixes, path)
    assert name_of(t.route(req(path))) == (None if expected is None else f"r{expected}")


def test_route_match_errors() -> None:
    e = route_err(rt(), rt(), rt("x", {"safe_regex": {"regex": "a(?=b)"}}))
    assert e.path == "rc.virtual_hosts[0].routes[2].match.safe_regex.regex"
    e = route_err(rt("x", {"path_separated_prefix": "/a/"}))
    assert e.path == "rc.virtual_hosts[0].routes[0].match.path_separated_prefix"
    e = route_err(rt("x", {"path_separated_prefix": "/a?b"}))
    assert e.path == "rc.virtual_hosts[0].routes[0].match.path_separated_prefix"
    e = route_err(rt("x", {"case_sensitive": True}))
    assert e.path == "rc.virtual_hosts[0].routes[0].match"
    e = route_err({"name": "x", "route": {"cluster": "a"}})
    assert e.path == "rc.virtual_hosts[0].routes[0].match"
    e = route_err({"name": "x", "match": {"prefix": "/"}})
    assert e.path == "rc.virtual_hosts[0].routes[0]"
    e = route_err(rt("x", {"prefix": "/", "headers": [{"name": "h", "contains_match": ""}]}))
    assert e.path == "rc.virtual_hosts[0].routes[0].match.headers[0].contains_match"
    e = route_err(rt("x", {"prefix": "/", "query_parameters": [
        {"name": "q"}, {"name": "v", "string_match": {"safe_regex": {"regex": "(a)\\1"}}}]}))
    assert e.path == "rc.virtual_hosts[0].routes[0].match.query_parameters[1].string_match" \
                     ".safe_regex.regex"


# ----------------------------------------------------------------------------- direct responses
def test_direct_response_bodies(tmp_path: Path) -> None:
    body_file = tmp_path / "body.txt"
    body_file.write_bytes(b"from a file\n")
    t = one(
        rt("s", {"path": "/s"}, direct_response={"status": 200, "body": {"inline_string": "hé"}}),
        rt("b", {"path": "/b"}, direct_response={"status": 503, "body": {"inline_bytes": "AAE="}}),
        rt("f", {"path": "/f"}, direct_response={"status": 404,
                                                 "body": {"filename": str(body_file)}}),
        rt("n", {"path": "/n"}, direct_response={"status": 204}),
    )
    for path, expected in {"/s": DirectResponse(200, "hé".encode()),
                           "/b": DirectResponse(503, b"\x00\x01"),
                           "/f": DirectResponse(404, b"from a file\n"),
                           "/n": DirectResponse(204, b"")}.items():
        route = t.route(req(path))
        assert route is not None and route.direct_response == expected
        assert route.redirect is None and route.route_action is None
    body_file.write_bytes(b"changed")  # read at compile time, not per request
    assert t.route(req("/f")).direct_response.body == b"from a file\n"  # type: ignore[union-attr]


def test_direct_response_location_for_3xx_and_201() -> None:
    t = one(rt("m", {"path": "/m"}, direct_response={"status": 301}),
            rt("c", {"path": "/c"}, direct_response={"status": 201}),
            rt("o", {"path": "/o"}, direct_response={"status": 200}))
    assert t.route(req("/m?q")).direct_response.location(req("/m?q", "h:80")) == \
        "http://h:80/m?q"  # type: ignore[union-attr]
    assert t.route(req("/c")).direct_response.location(req("/c")) == \
        "http://example.com/c"  # type: ignore[union-attr]
    assert t.route(req("/o")).direct_response.location(req("/o")) is None  # type: ignore[union-attr]


def test_direct_response_errors(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * 4097)
    ok = tmp_path / "ok"
    ok.write_bytes(b"x" * 4096)
    one(rt(direct_response={"status": 200, "body": {"filename": str(ok)}}))
    e = route_err(rt(), rt(direct_response={"status": 200, "body": {"filename": str(big)}}))
    assert e.path == "rc.virtual_hosts[0].routes[1].direct_response.body.filename"
    e = route_err(rt(direct_response={"status": 200,
                                      "body": {"filename": str(tmp_path / "missing")}}))
    assert e.path == "rc.virtual_hosts[0].routes[0].direct_response.body.filename"
    assert "does not exist" in e.message
    e = route_err(rt(direct_response={"status": 200, "body": {"inline_string": "y" * 4097}}))
    assert e.path == "rc.virtual_hosts[0].routes[0].direct_response.body.inline_string"
    assert e.message == "response body size is 4097 bytes; maximum is 4096"
    e = route_err(rt(direct_response={"status": 200,
                                      "body": {"inline_bytes": "eA==" * 0 + "A" * 5464 + "=="}}))
    assert e.path == "rc.virtual_hosts[0].routes[0].direct_response.body.inline_bytes"
    e = route_err(rt(direct_response={"status": 99}))
    assert e.path == "rc.virtual_hosts[0].routes[0].direct_response.status"
    e = route_err(rt(direct_response={"status": 200, "body": {}}))
    assert e.path == "rc.virtual_hosts[0].routes[0].direct_response.body"


# ----------------------------------------------------------------------------- redirects
def redirect_location(redirect: dict[str, Any], headers: HeaderMap,
                      match: dict[str, Any] | None = None) -> tuple[int, str]:
    t = one(rt("x", match, redirect=redirect))
    route = t.route(headers)
    assert route is not None and route.redirect is not None
    assert route.direct_response is None and route.route_action is None
    return route.redirect.status, route.redirect.location(headers)


@pytest.mark.parametrize(
    ("redirect", "headers", "status", "location"),
    [
        ({"host_redirect": "new.com"}, req("/p?q=1", "old.com"), 301, "http://new.com/p?q=1"),
        ({"https_redirect": True}, req("/p", "old.com"), 301, "https://old.com/p"),
        ({"https_redirect": True}, req("/p", "old.com:80"), 301, "https://old.com/p"),
        ({"https_redirect": True}, req("/p", "old.com:8080"), 301, "https://old.com:8080/p"),
        ({"scheme_redirect": "http"}, req("/p", "h:443", ("x-forwarded-proto", "https"),
                                          scheme="https"), 301, "http://h/p"),
        ({"scheme_redirect": "https"}, req("/p", "h:80", ("x-forwarded-proto", "https")),
         301, "https://h:80/p"),  # ports are dropped by X-Forwarded-Proto, as Envoy does
        ({"port_redirect": 8443}, req("/p", "h:80"), 301, "http://h:8443/p"),
        ({"port_redirect": 8443}, req("/p", "[::1]:80"), 301, "http://[::1]:8443/p"),
        ({"https_redirect": True}, req("/p", "[::1]:80"), 301, "https://[::1]/p"),
        ({"host_redirect": "n.com", "port_redirect": 9}, req("/", "h:1"), 301, "http://n.com:9/"),
        ({"path_redirect": "/new"}, req("/old?x=1", "h"), 301, "http://h/new?x=1"),
        ({"path_redirect": "/new?y=2"}, req("/old?x=1", "h"), 301, "http://h/new?y=2"),
        ({"path_redirect": "/new?y=2", "strip_query": True}, req("/old?x=1", "h"), 301,
         "http://h/new?y=2"),  # a query in path_redirect is never stripped
        ({"path_redirect": "/new", "strip_query": True}, req("/old?x=1", "h"), 301,
         "http://h/new"),
        ({"strip_query": True}, req("/old?x=1", "h"), 301, "http://h/old"),
        ({"path_redirect": "rel"}, req("/old", "h"), 301, "http://h/rel"),
        ({"response_code": "FOUND", "host_redirect": "n"}, req("/", "h"), 302, "http://n/"),
        ({"response_code": "SEE_OTHER", "host_redirect": "n"}, req("/", "h"), 303, "http://n/"),
        ({"response_code": "TEMPORARY_REDIRECT", "host_redirect": "n"}, req("/", "h"), 307,
         "http://n/"),
        ({"response_code": "PERMANENT_REDIRECT", "host_redirect": "n"}, req("/", "h"), 308,
         "http://n/"),
    ],
)
def test_redirects(redirect: dict[str, Any], headers: HeaderMap, status: int,
                   location: str) -> None:
    assert redirect_location(redirect, headers) == (status, location)


def test_redirect_prefix_rewrite_replaces_the_matched_part() -> None:
    assert redirect_location({"prefix_rewrite": "/v2"}, req("/v1/users?id=1", "h"),
                             {"prefix": "/v1"}) == (301, "http://h/v2/users?id=1")
    assert redirect_location({"prefix_rewrite": "/v2", "strip_query": True},
                             req("/V1/users?id=1", "h"),
                             {"prefix": "/v1", "case_sensitive": False}) == (301, "http://h/v2/users")
    assert redirect_location({"prefix_rewrite": "/new"}, req("/old?q", "h"),
                             {"path": "/old"}) == (301, "http://h/new?q")
    assert redirect_location({"prefix_rewrite": "/whole"}, req("/re/1?q", "h"),
                             {"safe_regex": {"regex": "/re/[0-9]"}}) == (301, "http://h/whole?q")


# ----------------------------------------------------------------------------- route actions
def action(route: dict[str, Any], match: dict[str, Any] | None = None,
           headers: HeaderMap | None = None) -> RouteAction:
    t = one(rt("x", match, route=route))
    r = t.route(headers if headers is not None else req("/"))
    assert r is not None and r.route_action is not None
    assert r.redirect is None and r.direct_response is None
    return r.route_action


def test_cluster_and_cluster_header() -> None:
    rng = random.Random(1)
    assert action({"cluster": "a"}).cluster_name(req(), rng) == "a"
    ra = action({"cluster_header": "X-Cluster"})
    assert ra.cluster_name(req("/", "h", ("x-cluster", "b"), ("x-cluster", "c")), rng) == "b"
    assert ra.cluster_name(req(), rng) is None
    assert ra.cluster_name(req("/", "h", ("x-cluster", "")), rng) is None


def test_timeouts() -> None:
    assert action({"cluster": "a"}).timeout == DEFAULT_ROUTE_TIMEOUT_S == 15.0
    assert action({"cluster": "a", "timeout": "2.5s"}).timeout == 2.5
    assert action({"cluster": "a", "timeout": "0s"}).timeout is None  # 0 disables it
    assert action({"cluster": "a", "timeout": "0.0005s"}).timeout is None  # Envoy counts ms
    assert action({"cluster": "a", "timeout": "0.0015s"}).timeout == 0.001
    e = route_err(rt(route={"cluster": "a", "timeout": "-1s"}))
    assert e.path == "rc.virtual_hosts[0].routes[0].route.timeout"


def test_weighted_clusters_proportions_with_a_seeded_rng() -> None:
    ra = action({"weighted_clusters": {"clusters": [
        {"name": "a", "weight": 1}, {"name": "b", "weight": 0}, {"name": "c", "weight": 3}]}})
    rng = random.Random(7)
    counts = Counter(ra.cluster_name(req(), rng) for _ in range(8000))
    assert counts["b"] == 0
    assert abs(counts["a"] / 8000 - 0.25) < 0.03
    assert abs(counts["c"] / 8000 - 0.75) < 0.03
    assert ra.cluster_names == ("a", "b", "c")


class FixedRng(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@given(weights=st.lists(st.integers(0, 50), min_size=1, max_size=5).filter(lambda w: sum(w) > 0),
       r=st.floats(0, 1, exclude_max=True))
def test_weighted_pick_is_envoys_interval_rule(weights: list[int], r: float) -> None:
    names = ["a", "b", "c", "d", "a"][: len(weights)]
    ra = action({"weighted_clusters": {"clusters": [
        {"name": n, "weight": w} for n, w in zip(names, weights, strict=True)]}})
    total = sum(weights)
    selected = min(int(r * total), total - 1)
    begin = 0
    for name, w in zip(names, weights, strict=True):
        if begin <= selected < begin + w:
            expected = name
            break
        begin += w
    assert ra.cluster_name(req(), FixedRng(r)) == expected


def test_weighted_total_weight() -> None:
    ra = action({"weighted_clusters": {"total_weight": 10, "clusters": [
        {"name": "a", "weight": 4}, {"name": "b", "weight": 6}]}})
    assert ra.cluster_name(req(), FixedRng(0.39)) == "a"
    assert ra.cluster_name(req(), FixedRng(0.4)) == "b"
    e = route_err(rt(route={"weighted_clusters": {"total_weight": 100, "clusters": [
        {"name": "a", "weight": 4}, {"name": "b", "weight": 6}]}}))
    assert e.path == "rc.virtual_hosts[0].routes[0].route.weighted_clusters.total_weight"


def test_weighted_cluster_errors() -> None:
    base = "rc.virtual_hosts[0].routes[0].route.weighted_clusters"
    e = route_err(rt(route={"weighted_clusters": {"clusters": [
        {"name": "a", "weight": 0}, {"name": "b", "weight": 0}]}}))
    assert e.path == f"{base}.clusters"
    assert "greater than 0" in e.message
    e = route_err(rt(route={"weighted_clusters": {"clusters": [
        {"name": "a", "weight": 1}, {"name": "b"}]}}))
    assert e.path == f"{base}.clusters[1].weight"
    e = route_err(rt(route={"weighted_clusters": {"clusters": [{"weight": 1}]}}))
    assert e.path == f"{base}.clusters[0]"
    e = route_err(rt(route={"weighted_clusters": {"clusters": []}}))
    assert e.path == f"{base}.clusters"
    e = route_err(rt(route={"weighted_clusters": {"clusters": [
        {"name": "a", "weight": 2**32 - 1}, {"name": "b", "weight": 1}]}}))
    assert e.path == f"{base}.clusters"


def test_unknown_clusters_are_refused() -> None:
    e = route_err(rt(), rt(route={"cluster": "nope"}))
    assert e.path == "rc.virtual_hosts[0].routes[1].route.cluster"
    assert e.message == "route: unknown cluster 'nope'"
    e = route_err(rt(route={"weighted_clusters": {"clusters": [
        {"name": "a", "weight": 1}, {"name": "zz", "weight": 1}]}}))
    assert e.path == "rc.virtual_hosts[0].routes[0].route.weighted_clusters.clusters[1].name"
    assert e.message == "route: unknown weighted cluster 'zz'"
    # cluster_header, redirects and direct responses name no cluster to check
    one(rt(route={"cluster_header": "x-c"}), rt(redirect={"host_redirect": "h"}),
        rt(direct_response={"status": 200}))
    # validate_clusters: false in the config, or off in the context
    d = {"name": "t", "validate_clusters": False,
         "virtual_hosts": [vh("v", ["*"], rt(route={"cluster": "nope"}))]}
    assert table(d).route(req()) is not None
    d = {"name": "t", "virtual_hosts": [vh("v", ["*"], rt(route={"cluster": "nope"}))]}
    assert table(d, validate=False).route(req()) is not None
    e = err({**d, "validate_clusters": True}, validate=False)  # explicit true wins
    assert e.path == "rc.virtual_hosts[0].routes[0].route.cluster"


def test_route_action_errors() -> None:
    e = route_err(rt(route={"prefix_rewrite": "/x", "regex_rewrite": {
        "pattern": {"regex": "a"}, "substitution": "b"}, "cluster": "a"}))
    assert e.path == "rc.virtual_hosts[0].routes[0].route.regex_rewrite"
    e = route_err(rt(route={"timeout": "1s"}))
    assert e.path == "rc.virtual_hosts[0].routes[0].route"
    e = route_err(rt(route={"cluster": "a", "regex_rewrite": {
        "pattern": {"regex": "(?<!a)"}, "substitution": "b"}}))
    assert e.path == "rc.virtual_hosts[0].routes[0].route.regex_rewrite.pattern.regex"
    e = route_err(rt(route={"cluster": "a", "hash_policy": [
        {"header": {"header_name": "x"}}, {"cookie": {"name": "c", "ttl": "10s"}}]}))
    assert e.path == "rc.virtual_hosts[0].routes[0].route.hash_policy[1].cookie.ttl"
    assert "not supported" in e.message
    e = route_err(rt(route={"cluster": "a", "hash_policy": [{"terminal": True}]}))
    assert e.path == "rc.virtual_hosts[0].routes[0].route.hash_policy[0]"


@pytest.mark.parametrize(
    ("match", "route", "path", "expected"),
    [
        ({"prefix": "/api"}, {"prefix_rewrite": "/v2"}, "/api/users?x=1", "/v2/users?x=1"),
        ({"prefix": "/api/"}, {"prefix_rewrite": "/"}, "/api/users", "/users"),
        ({"prefix": "/API", "case_sensitive": False}, {"prefix_rewrite": "/x"}, "/api/u", "/x/u"),
        ({"path_separated_prefix": "/api"}, {"prefix_rewrite": "/b"}, "/api/u", "/b/u"),
        ({"path": "/old"}, {"prefix_rewrite": "/new"}, "/old?q", "/new?q"),
        ({"safe_regex": {"regex": "/r/.*"}}, {"prefix_rewrite": "/all"}, "/r/x?q", "/all?q"),
        ({"prefix": "/"}, {"regex_rewrite": {"pattern": {"regex": "^/service/([^/]+)(/.*)$"},
                                             "substitution": "\\2/instance/\\1"}},
         "/service/foo/v1/api?q=/service/a/b", "/v1/api/instance/foo?q=/service/a/b"),
        ({"prefix": "/"}, {"regex_rewrite": {"pattern": {"regex": "/x"}, "substitution": ""}},
         "/x?q", "/x?q"),  # an empty result leaves the path alone
        ({"prefix": "/"}, {}, "/same?q", "/same?q"),
    ],
)
def test_path_rewrites(match: dict[str, Any], route: dict[str, Any], path: str,
                       expected: str) -> None:
    headers = req(path)
    action({"cluster": "a", **route}, match, headers).rewrite_request(headers)
    assert headers.path == expected
    assert headers.authority == "example.com"


def test_host_rewrites() -> None:
    headers = req("/p", "old.com")
    ra = action({"cluster": "a", "host_rewrite_literal": "new.com"}, headers=headers)
    ra.rewrite_request(headers)
    assert headers.authority == "new.com" and headers.path == "/p"
    assert ra.auto_host_rewrite is False
    assert action({"cluster": "a", "auto_host_rewrite": True}).auto_host_rewrite is True
    assert action({"cluster": "a"}).host_rewrite_literal is None


def test_hash_key() -> None:
    assert action({"cluster": "a"}).has_hash_policy is False
    assert action({"cluster": "a"}).hash_key(req(), "10.0.0.1") is None
    ra = action({"cluster": "a", "hash_policy": [{"header": {"header_name": "X-User"}}]})
    assert ra.has_hash_policy is True
    assert ra.hash_key(req(), "10.0.0.1") is None
    assert ra.hash_key(req("/", "h", ("x-user", "bob")), "10.0.0.1") == hash64("bob")
    # repeated values hash the same whatever their order
    assert ra.hash_key(req("/", "h", ("x-user", "a"), ("x-user", "b")), "") == \
        ra.hash_key(req("/", "h", ("x-user", "b"), ("x-user", "a")), "")

    ip = action({"cluster": "a", "hash_policy": [{"connection_properties": {"source_ip": True}}]})
    assert ip.hash_key(req(), "10.0.0.1") == hash64("10.0.0.1")
    assert ip.hash_key(req(), "") is None
    assert action({"cluster": "a", "hash_policy": [
        {"connection_properties": {"source_ip": False}}]}).has_hash_policy is False
    no_ip = action({"cluster": "a", "hash_policy": [
        {"connection_properties": {"source_ip": False}, "terminal": True},
        {"header": {"header_name": "x-user"}}]})
    assert no_ip.hash_key(req("/", "h", ("x-user", "u")), "10.0.0.1") == hash64("u")

    cookie = action({"cluster": "a", "hash_policy": [{"cookie": {"name": "sid", "path": "/"}}]})
    h = req("/", "h", ("cookie", "a=1; sid=\"abc\"; sid=zzz"), ("cookie", "sid=later"))
    assert cookie.hash_key(h, "") == hash64("abc")
    assert cookie.hash_key(req("/", "h", ("cookie", "xsid=1;bad; sid=q")), "") == hash64("q")
    assert cookie.hash_key(req("/", "h", ("cookie", "other=1")), "") is None


def test_hash_key_combines_and_stops_at_terminal() -> None:
    def rotl(v: int) -> int:
        return ((v << 1) | (v >> 63)) & (2**64 - 1)

    both = action({"cluster": "a", "hash_policy": [
        {"header": {"header_name": "x-a"}}, {"header": {"header_name": "x-b"}}]})
    h = req("/", "h", ("x-a", "1"), ("x-b", "2"))
    assert both.hash_key(h, "") == rotl(hash64("1")) ^ hash64("2")
    same = action({"cluster": "a", "hash_policy": [
        {"header": {"header_name": "x-a"}}, {"header": {"header_name": "x-a"}}]})
    assert same.hash_key(h, "") == rotl(hash64("1")) ^ hash64("1") != 0  # no cancelling out
    terminal = action({"cluster": "a", "hash_policy": [
        {"header": {"header_name": "x-a"}, "terminal": True},
        {"connection_properties": {"source_ip": True}}]})
    assert terminal.hash_key(h, "10.0.0.1") == hash64("1")
    assert terminal.hash_key(req(), "10.0.0.1") == hash64("10.0.0.1")  # no key: go on
    # a terminal policy that produced nothing still stops once an earlier one produced a key
    late = action({"cluster": "a", "hash_policy": [
        {"header": {"header_name": "x-a"}}, {"header": {"header_name": "x-z"}, "terminal": True},
        {"connection_properties": {"source_ip": True}}]})
    assert late.hash_key(h, "10.0.0.1") == hash64("1")


# ----------------------------------------------------------------------------- header mutations
def mutations(level: str, adds: list[dict[str, Any]], removes: list[str] | None = None,
              which: str = "request") -> dict[str, Any]:
    out: dict[str, Any] = {f"{which}_headers_to_add": adds}
    if removes:
        out[f"{which}_headers_to_remove"] = removes
    return out


def hv(key: str, value: str, **kw: Any) -> dict[str, Any]:
    return {"header": {"key": key, "value": value}, **kw}


def three_levels(which: str, route: list[dict[str, Any]], vhost: list[dict[str, Any]],
                 top: list[dict[str, Any]]) -> Route:
    t = table({"name": "t", **mutations("rc", top, which=which), "virtual_hosts": [
        vh("v", ["*"], {**rt("r"), **mutations("route", route, which=which)},
           **mutations("vh", vhost, which=which))]})
    r = t.route(req())
    assert r is not None
    return r


@pytest.mark.parametrize("which", ["request", "response"])
def test_levels_apply_route_then_vhost_then_route_configuration(which: str) -> None:
    r = three_levels(
        which,
        [hv("x-o", "route", append_action="OVERWRITE_IF_EXISTS_OR_ADD"), hv("x-a", "route")],
        [hv("x-o", "vhost", append_action="OVERWRITE_IF_EXISTS_OR_ADD"), hv("x-a", "vhost")],
        [hv("x-o", "rc", append_action="OVERWRITE_IF_EXISTS_OR_ADD"), hv("x-a", "rc")],
    )
    h = HeaderMap([(":status", "200")] if which == "response" else [(":path", "/")])
    finalize = r.finalize_request_headers if which == "request" else r.finalize_response_headers
    finalize(h, StreamInfo())
    assert h.get_all("x-o") == ["rc"]  # the least specific level is applied last and wins
    assert h.get_all("x-a") == ["route", "vhost", "rc"]


def test_append_actions() -> None:
    r = one({**rt("r"), "request_headers_to_add": [
        hv("x-append", "new"),
        hv("x-absent", "new", append_action="ADD_IF_ABSENT"),
        hv("x-absent-missing", "new", append_action="ADD_IF_ABSENT"),
        hv("x-over", "new", append_action="OVERWRITE_IF_EXISTS_OR_ADD"),
        hv("x-over-missing", "new", append_action="OVERWRITE_IF_EXISTS_OR_ADD"),
        hv("x-if-exists", "new", append_action="OVERWRITE_IF_EXISTS"),
        hv("x-if-exists-missing", "new", append_action="OVERWRITE_IF_EXISTS"),
        hv("x-legacy-false", "new", append=False),
        hv("x-legacy-true", "new", append=True),
        hv("x-empty", ""),
        hv("x-empty-kept", "", keep_empty_value=True),
        hv("X-Upper", "v"),
        hv("x-utf8", "é"),
    ]}).route(req())
    assert r is not None
    h = HeaderMap([(":path", "/"), ("x-append", "old"), ("x-absent", "old"), ("x-over", "old"),
                   ("x-over", "old2"), ("x-if-exists", "old"), ("x-legacy-false", "old"),
                   ("x-legacy-true", "old")])
    r.finalize_request_headers(h, None)
    assert h.get_all("x-append") == ["old", "new"]
    assert h.get_all("x-absent") == ["old"]
    assert h.get_all("x-absent-missing") == ["new"]
    assert h.get_all("x-over") == ["new"]
    assert h.get_all("x-over-missing") == ["new"]
    assert h.get_all("x-if-exists") == ["new"]
    assert "x-if-exists-missing" not in h
    assert h.get_all("x-legacy-false") == ["new"]
    assert h.get_all("x-legacy-true") == ["old", "new"]
    assert "x-empty" not in h
    assert h.get_all("x-empty-kept") == [""]
    assert h.get_all("x-upper") == ["v"]
    assert h.get_all("x-utf8") == ["é".encode().decode("latin-1")]


def test_removals_come_before_additions() -> None:
    r = one({**rt("r"), "response_headers_to_add": [hv("x-a", "new")],
             "response_headers_to_remove": ["X-A", "server"]}).route(req())
    assert r is not None
    h = HeaderMap([(":status", "200"), ("x-a", "old"), ("server", "s"), ("x-keep", "1")])
    r.finalize_response_headers(h, None)
    assert list(h) == [(":status", "200"), ("x-keep", "1"), ("x-a", "new")]


def test_no_mutations_is_a_no_op() -> None:
    r = one(rt("r")).route(req())
    assert r is not None
    h = req()
    before = h.copy()
    r.finalize_request_headers(h, None)
    r.finalize_response_headers(h, None)
    assert h == before


@pytest.mark.parametrize(
    ("where", "entry", "suffix", "message"),
    [
        ("request_headers_to_add", hv(":path", "/x"), "[0].header.key", "may not be modified"),
        ("request_headers_to_add", hv("Host", "x"), "[0].header.key", "may not be modified"),
        ("response_headers_to_add", hv(":status", "500"), "[0].header.key", "may not be modified"),
        ("request_headers_to_remove", ":authority", "[0]", "may not be removed"),
        ("response_headers_to_remove", "HOST", "[0]", "may not be removed"),
        ("request_headers_to_add", hv("x", "v", append=True, append_action="ADD_IF_ABSENT"),
         "[0].append_action", "Both append and append_action are set"),
    ],
)
@pytest.mark.parametrize("level", ["route", "vhost", "rc"])
def test_header_mutation_errors(where: str, entry: Any, suffix: str, message: str,
                                level: str) -> None:
    field = {where: [entry]}
    d: dict[str, Any] = {"name": "t", "virtual_hosts": [vh("v", ["*"], rt("r"))]}
    prefix = {"route": "rc.virtual_hosts[0].routes[0]", "vhost": "rc.virtual_hosts[0]",
              "rc": "rc"}[level]
    if level == "route":
        d["virtual_hosts"][0]["routes"][0].update(field)
    elif level == "vhost":
        d["virtual_hosts"][0].update(field)
    else:
        d.update(field)
    e = err(d)
    assert e.path == f"{prefix}.{where}{suffix}"
    assert message in e.message


def test_plain_values_never_touch_the_formatter(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "proxy.access_log.formatter", None)  # import would fail
    r = one({**rt("r"), "request_headers_to_add": [hv("x-a", "plain")]}).route(req())
    assert r is not None
    h = req()
    r.finalize_request_headers(h, None)
    assert h.get("x-a") == "plain"


def test_format_operators_use_the_access_log_formatter() -> None:
    pytest.importorskip("proxy.access_log.formatter")
    r = one({**rt("r"), "request_headers_to_add": [
        hv("x-peer", "%DOWNSTREAM_REMOTE_ADDRESS%"),
        hv("x-pct", "100%%"),
    ]}).route(req())
    assert r is not None
    info = StreamInfo(downstream_remote_address="192.0.2.1:5555")
    h = req()
    r.finalize_request_headers(h, info)
    assert h.get("x-peer") == "192.0.2.1:5555"
    assert h.get("x-pct") == "100%"


def test_format_operator_that_formats_to_nothing_adds_nothing() -> None:
    pytest.importorskip("proxy.access_log.formatter")
    r = one({**rt("r"), "response_headers_to_add": [
        hv("x-echo", "%REQ(x-missing)%"),
        hv("x-kept", "%REQ(x-missing)%", keep_empty_value=True),
        hv("x-ua", "ua=%REQ(user-agent)%"),
    ]}).route(req())
    assert r is not None
    request = req("/", "h", ("user-agent", "curl"))
    info = StreamInfo(request_headers=request)
    h = HeaderMap([(":status", "200")])
    r.finalize_response_headers(h, info)
    assert "x-echo" not in h  # Envoy formats header values with omit_empty_values
    assert h.get_all("x-kept") == [""]
    assert h.get("x-ua") == "ua=curl"


def test_bad_format_operator_is_a_config_error() -> None:
    pytest.importorskip("proxy.access_log.formatter")
    e = route_err({**rt("r"), "request_headers_to_add": [hv("x", "ok"), hv("x", "%NOPE(")]})
    assert e.path.startswith("rc.virtual_hosts[0].routes[0].request_headers_to_add[1].header.value")


# ----------------------------------------------------------------------------- the request path
def test_route_carries_names() -> None:
    t = table({"name": "t", "virtual_hosts": [
        vh("api", ["api.com"], rt("users", {"prefix": "/users"}))]})
    r = t.route(req("/users/1", "api.com"))
    assert r is not None and (r.name, r.virtual_host_name) == ("users", "api")
    assert t.name == "t" and [v.name for v in t.virtual_hosts] == ["api"]


def test_route_is_fast_for_a_typical_table() -> None:
    import time

    t = table({"name": "t", "virtual_hosts": [
        vh(f"v{i}", [f"svc{i}.example.com", f"*.svc{i}.example.com"],
           *(rt(f"r{j}", {"prefix": f"/api/v{j}/"}) for j in range(10)), rt("rest"))
        for i in range(20)
    ] + [vh("default", ["*"], rt("d"))]})
    h = req("/api/v9/users?id=1", "svc7.example.com", ("user-agent", "x"), ("accept", "*/*"))
    assert name_of(t.route(h)) == "r9"
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        t.route(h)
    per_call = (time.perf_counter() - start) / n
    assert per_call < 100e-6  # a few µs in practice; loose bound against pathological slowness
