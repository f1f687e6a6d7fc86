"""String, regex, header and query-parameter matchers: Envoy's semantics, RE2's refusals and
the error paths, with hypothesis checks against one-line references."""

from __future__ import annotations

import re
from typing import Any

import pytest
from envoy.config.route.v3 import route_components_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from proxy.common.matchers import (
    HeaderMatcher,
    QueryParameterMatcher,
    ascii_lower,
    compile_header_matchers,
    compile_regex,
    compile_regex_rewrite,
    compile_string_matcher,
    parse_query_params,
    wire_str,
)
from proxy.config.errors import ConfigError
from proxy.http.headers import HeaderMap


def sm(d: dict[str, Any], path: str = "m") -> Any:
    return compile_string_matcher(json_format.ParseDict(d, string_pb2.StringMatcher()), path)


def rx(pattern: str, path: str = "r") -> re.Pattern[str]:
    return compile_regex(regex_pb2.RegexMatcher(regex=pattern), path)


def hm(d: dict[str, Any], path: str = "h") -> HeaderMatcher:
    return HeaderMatcher.from_proto(
        json_format.ParseDict(d, route_components_pb2.HeaderMatcher()), path)


def qm(d: dict[str, Any], path: str = "q") -> QueryParameterMatcher:
    return QueryParameterMatcher.from_proto(
        json_format.ParseDict(d, route_components_pb2.QueryParameterMatcher()), path)


def headers(*items: tuple[str, str]) -> HeaderMap:
    return HeaderMap([(":method", "GET"), (":path", "/"), *items])


# ----------------------------------------------------------------------------- StringMatcher
@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        ({"exact": "abc"}, "abc", True),
        ({"exact": "abc"}, "ABC", False),
        ({"exact": "abc", "ignore_case": True}, "aBC", True),
        ({"exact": ""}, "", True),
        ({"exact": ""}, "x", False),
        ({"prefix": "/api"}, "/api/v1", True),
        ({"prefix": "/api"}, "/API/v1", False),
        ({"prefix": "/api", "ignore_case": True}, "/API/v1", True),
        ({"suffix": ".js"}, "app.js", True),
        ({"suffix": ".js", "ignore_case": True}, "APP.JS", True),
        ({"suffix": ".js"}, "app.JS", False),
        ({"contains": "needle"}, "haystackneedlehay", True),
        ({"contains": "Needle", "ignore_case": True}, "HAYNEEDLE", True),
        ({"contains": "needle"}, "NEEDLE", False),
        ({"safe_regex": {"regex": "a+b"}}, "aaab", True),
        ({"safe_regex": {"regex": "a+b"}}, "aaabc", False),  # full match, not search
        ({"safe_regex": {"regex": "a+b"}}, "xaab", False),
        ({"safe_regex": {"google_re2": {}, "regex": "[0-9]{3}"}}, "123", True),
    ],
)
def test_string_matcher(spec: dict[str, Any], value: str, expected: bool) -> None:
    assert sm(spec).match(value) is expected


def test_ignore_case_is_ascii_only() -> None:
    # absl::EqualsIgnoreCase folds ASCII letters only.
    assert sm({"exact": "x", "ignore_case": True}).match("X")
    assert not sm({"exact": wire_str("é"), "ignore_case": True}).match(wire_str("É"))
    assert ascii_lower("ÀBC") == "Àbc"


def test_non_ascii_values_compare_as_wire_bytes() -> None:
    # HeaderMap holds latin-1 views of the wire bytes; Envoy compares UTF-8 bytes.
    wire = "café".encode().decode("latin-1")
    assert sm({"exact": "café"}).match(wire)
    assert not sm({"exact": "café"}).match("café")


def test_string_matcher_errors_name_the_field() -> None:
    with pytest.raises(ConfigError) as e:
        sm({"safe_regex": {"regex": "a"}, "ignore_case": True}, "x.string_match")
    assert e.value.path == "x.string_match.ignore_case"
    assert "no effect for safe_regex" in e.value.message
    with pytest.raises(ConfigError) as e:
        compile_string_matcher(string_pb2.StringMatcher(), "x.m")
    assert e.value.path == "x.m"
    with pytest.raises(ConfigError) as e:
        sm({"prefix": ""}, "x.m")
    assert e.value.path == "x.m.prefix"  # PGV min_len 1
    with pytest.raises(ConfigError) as e:
        sm({"safe_regex": {"regex": "(a"}}, "x.m")
    assert e.value.path == "x.m.safe_regex.regex"


_text = st.text(alphabet="abAB/.-é", max_size=8)


@given(kind=st.sampled_from(["exact", "prefix", "suffix", "contains"]),
       pattern=_text.filter(bool), value=_text, ignore_case=st.booleans())
def test_string_matcher_matches_reference(kind: str, pattern: str, value: str,
                                          ignore_case: bool) -> None:
    m = sm({kind: pattern, "ignore_case": ignore_case})
    p, v = wire_str(pattern), wire_str(value)
    if ignore_case:
        p, v = ascii_lower(p), ascii_lower(v)
    expected = {
        "exact": v == p,
        "prefix": v.startswith(p),
        "suffix": v.endswith(p),
        "contains": p in v,
    }[kind]
    assert m.match(wire_str(value)) is expected


# ----------------------------------------------------------------------------- RE2 on re
@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"(a)\1", "backreference"),
        (r"(?P<x>a)(?P=x)", "backreference"),
        (r"a(?=b)", "lookahead"),
        (r"a(?!b)", "lookahead"),
        (r"(?<=a)b", "lookbehind"),
        (r"(?<!a)b", "lookbehind"),
        (r"(?>a+)b", "atomic"),
        (r"a*+", "possessive"),
        (r"a++", "possessive"),
        (r"a?+", "possessive"),
        (r"a{2}+", "possessive"),
        (r"a(?#comment)", "comments"),
        (r"(a)?(?(1)b|c)", "conditionals"),
        (r"(?x)a b", "flags"),
        (r"(?a)\w", "flags"),
        (r"(?U)a+", "flags"),
        (r"a\Z", r"\Z"),
        (r"\u0041", r"\u"),
        (r"a{1001}", "repetition"),
        (r"a{2,1001}", "repetition"),
        (r"[[:^alpha:]]", "negated"),
        (r"[[:nope:]]", "character class"),
        ("\\", "trailing backslash"),
        (r"\x{zz}", r"\x{"),
        (r"(a", "invalid regex"),
        (r"\pL", "invalid regex"),
    ],
)
def test_re2_refusals(pattern: str, why: str) -> None:
    with pytest.raises(ConfigError) as e:
        rx(pattern, "route.match.safe_regex")
    assert e.value.path == "route.match.safe_regex.regex"
    assert why in e.value.message


def test_empty_regex_refused() -> None:
    with pytest.raises(ConfigError) as e:
        rx("", "m")
    assert e.value.path == "m.regex"


@pytest.mark.parametrize(
    ("pattern", "yes", "no"),
    [
        (r"a\z", "a", "a\n"),
        (r"(?<word>[a-z]+)-\d", "abc-1", "abc-x"),
        (r"\Qa.b*\E+", "a.b**", "a.b*a.b*"),  # the + repeats the last literal
        (r"[[:alpha:]]+[[:digit:]]", "abC1", "ab_1"),
        (r"[[:xdigit:][:punct:]]+", "0aF-!", "g"),
        (r"a{,2}", "a{,2}", "aa"),  # RE2 reads {,n} as literal text
        (r"\x{41}b", "Ab", "ab"),
        (r"\d+", "0123", "٣"),  # ASCII classes, as RE2
        (r"(?i)abc", "AbC", "abd"),
        (r"[]a]+", "]a]", "b"),
        (r"[^]a]", "b", "]"),
        (r"[a[]", "[", "]"),
        (r"a{2,3}", "aaa", "aaaa"),
    ],
)
def test_re2_translations(pattern: str, yes: str, no: str) -> None:
    compiled = rx(pattern)
    assert compiled.fullmatch(yes)
    assert not compiled.fullmatch(no)


# ----------------------------------------------------------------------------- regex rewrite
def rewrite(pattern: str, substitution: str, path: str = "rw") -> Any:
    msg = route_components_pb2.RouteAction().regex_rewrite
    msg.pattern.regex = pattern
    msg.substitution = substitution
    return compile_regex_rewrite(msg, path)


@pytest.mark.parametrize(
    ("pattern", "sub", "value", "expected"),
    [
        ("^/service/([^/]+)(/.*)$", r"\2/instance/\1", "/service/foo/v1/api",
         "/v1/api/instance/foo"),
        ("one", "two", "/xxx/one/yyy/one/zzz", "/xxx/two/yyy/two/zzz"),
        ("(?i)/xxx/", "/yyy/", "/aaa/XxX/bbb", "/aaa/yyy/bbb"),
        ("^(.*)$", r"\0\0", "ab", "abab"),
        ("a", r"\\", "bab", "b\\b"),
        ("x*", "-", "abxd", "-a-b-d-"),  # RE2 GlobalReplace skips an empty match at a match end
        ("z", "y", "abc", "abc"),
        ("(a)|(b)", r"[\1\2]", "ab", "[a][b]"),
    ],
)
def test_regex_rewrite(pattern: str, sub: str, value: str, expected: str) -> None:
    assert rewrite(pattern, sub).replace_all(value) == expected


def test_regex_rewrite_errors() -> None:
    with pytest.raises(ConfigError) as e:
        rewrite("(a)", r"\2", "x.regex_rewrite")
    assert e.value.path == "x.regex_rewrite.substitution"
    with pytest.raises(ConfigError) as e:
        rewrite("(a)", r"\n", "x.regex_rewrite")
    assert e.value.path == "x.regex_rewrite.substitution"
    with pytest.raises(ConfigError) as e:
        rewrite("(?=a)", "b", "x.regex_rewrite")
    assert e.value.path == "x.regex_rewrite.pattern.regex"
    with pytest.raises(ConfigError) as e:
        compile_regex_rewrite(route_components_pb2.RouteAction().regex_rewrite, "x.rr")
    assert e.value.path == "x.rr.pattern"


# ----------------------------------------------------------------------------- HeaderMatcher
@pytest.mark.parametrize(
    ("spec", "present", "absent"),
    [
        ({"name": "x-a"}, [("x-a", "")], []),
        ({"name": "x-a", "exact_match": "v"}, [("x-a", "v")], [("x-a", "w")]),
        ({"name": "x-a", "exact_match": ""}, [("x-a", "anything")], []),  # empty exact: any
        ({"name": "x-a", "safe_regex_match": {"regex": "[0-9]+"}}, [("x-a", "42")],
         [("x-a", "42a")]),
        ({"name": "x-a", "prefix_match": "ab"}, [("x-a", "abc")], [("x-a", "cab")]),
        ({"name": "x-a", "suffix_match": "bc"}, [("x-a", "abc")], [("x-a", "bca")]),
        ({"name": "x-a", "contains_match": "b"}, [("x-a", "abc")], [("x-a", "ac")]),
        ({"name": "x-a", "string_match": {"exact": "V", "ignore_case": True}}, [("x-a", "v")],
         [("x-a", "w")]),
        ({"name": "X-A", "exact_match": "v"}, [("x-a", "v")], []),  # names are lowercased
        ({"name": "x-a", "exact_match": "1,2"}, [("x-a", "1"), ("x-a", "2")], [("x-a", "1")]),
        ({"name": "x-a", "present_match": True}, [("x-a", "v")], []),
        ({"name": "x-a", "present_match": False}, [], [("x-a", "v")]),
        ({"name": "x-a", "exact_match": "v", "invert_match": True}, [("x-a", "w")],
         [("x-a", "v")]),
    ],
)
def test_header_matcher(spec: dict[str, Any], present: list[tuple[str, str]],
                        absent: list[tuple[str, str]]) -> None:
    m = hm(spec)
    assert m.matches(headers(*present))
    assert not m.matches(headers(*absent))


def test_header_matcher_sees_pseudo_headers() -> None:
    assert hm({"name": ":method", "exact_match": "GET"}).matches(headers())
    assert not hm({"name": ":method", "exact_match": "POST"}).matches(headers())


def _reference_header_match(kind: str, invert: bool, treat_missing: bool,
                            values: list[str]) -> bool:
    """HeaderUtility::matchHeaders, written from the Envoy source."""
    if not values and not treat_missing:
        if invert:
            return kind == "present_true"
        return kind == "present_false"
    value = ",".join(values)
    match = {
        "exact": value == "a",
        "prefix": value.startswith("a"),
        "present_true": True,
        "present_false": False,
        "regex": re.fullmatch("a+", value) is not None,
    }[kind]
    return match != invert


_KINDS = {
    "exact": {"exact_match": "a"},
    "prefix": {"prefix_match": "a"},
    "present_true": {"present_match": True},
    "present_false": {"present_match": False},
    "regex": {"safe_regex_match": {"regex": "a+"}},
}


@given(kind=st.sampled_from(sorted(_KINDS)), invert=st.booleans(), treat_missing=st.booleans(),
       values=st.lists(st.sampled_from(["a", "b", "", "aa", "ab"]), max_size=3))
def test_header_matcher_matches_reference(kind: str, invert: bool, treat_missing: bool,
                                          values: list[str]) -> None:
    m = hm({"name": "x-k", **_KINDS[kind], "invert_match": invert,
            "treat_missing_header_as_empty": treat_missing})
    h = headers(("x-other", "a"), *(("x-k", v) for v in values))
    assert m.matches(h) is _reference_header_match(kind, invert, treat_missing, values)


def test_missing_header_semantics() -> None:
    # Missing header: only a presence matcher can match (present_match false, or inverted true).
    assert not hm({"name": "x", "exact_match": "v", "invert_match": True}).matches(headers())
    assert hm({"name": "x", "present_match": True, "invert_match": True}).matches(headers())
    assert not hm({"name": "x", "present_match": False, "invert_match": True}).matches(headers())
    # treat_missing_header_as_empty: the value is "" and the matcher runs on it.
    assert hm({"name": "x", "exact_match": "v", "invert_match": True,
               "treat_missing_header_as_empty": True}).matches(headers())
    assert hm({"name": "x", "safe_regex_match": {"regex": "a*"},
               "treat_missing_header_as_empty": True}).matches(headers())


def test_header_matcher_errors_name_the_field() -> None:
    with pytest.raises(ConfigError) as e:
        compile_header_matchers(
            [json_format.ParseDict({"name": "x", "safe_regex_match": {"regex": "(?=x)"}},
                                   route_components_pb2.HeaderMatcher())], "r.match.headers")
    assert e.value.path == "r.match.headers[0].safe_regex_match.regex"
    with pytest.raises(ConfigError) as e:
        hm({"name": "x", "string_match": {"ignore_case": True, "safe_regex": {"regex": "a"}}},
           "h")
    assert e.value.path == "h.string_match.ignore_case"
    with pytest.raises(ConfigError) as e:
        hm({"name": ""}, "h")
    assert e.value.path == "h.name"
    with pytest.raises(ConfigError) as e:
        hm({"name": "x", "prefix_match": ""}, "h")
    assert e.value.path == "h.prefix_match"


# ----------------------------------------------------------------------------- query parameters
def test_parse_query_params() -> None:
    assert parse_query_params("/p") == {}
    assert parse_query_params("/p?a=1&b&c=&a=2&d=x=y") == {
        "a": "1", "b": "", "c": "", "d": "x=y"}
    assert parse_query_params("/p?q=%20x+y") == {"q": "%20x+y"}  # not decoded, as Envoy


@pytest.mark.parametrize(
    ("spec", "path", "expected"),
    [
        ({"name": "debug"}, "/?debug", True),  # nothing set: presence
        ({"name": "debug"}, "/?other=1", False),
        ({"name": "debug", "present_match": True}, "/?debug=0", True),
        ({"name": "debug", "present_match": True}, "/", False),
        ({"name": "debug", "present_match": False}, "/", True),
        ({"name": "debug", "present_match": False}, "/?debug", False),
        ({"name": "v", "string_match": {"exact": "2"}}, "/?v=2", True),
        ({"name": "v", "string_match": {"exact": "2"}}, "/?v=1&v=2", False),  # first value
        ({"name": "v", "string_match": {"exact": "2"}}, "/", False),
        ({"name": "v", "string_match": {"safe_regex": {"regex": "[0-9]+"}}}, "/?v=12", True),
        ({"name": "v", "string_match": {"prefix": "A", "ignore_case": True}}, "/?v=abc", True),
    ],
)
def test_query_parameter_matcher(spec: dict[str, Any], path: str, expected: bool) -> None:
    assert qm(spec).matches(parse_query_params(path)) is expected


def test_query_parameter_matcher_errors() -> None:
    with pytest.raises(ConfigError) as e:
        qm({"name": "v", "string_match": {"safe_regex": {"regex": "a(?!b)"}}}, "m.qp[0]")
    assert e.value.path == "m.qp[0].string_match.safe_regex.regex"
    with pytest.raises(ConfigError) as e:
        qm({"name": ""}, "m.qp[1]")
    assert e.value.path == "m.qp[1].name"
