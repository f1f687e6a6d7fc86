"""Envoy's string, regex, header and query-parameter matchers, compiled once from their protos.

Theory of operation:

1. Everything is decided at compile time: each ``StringMatcher`` proto becomes one small object
   whose ``match(value)`` is a single ``str`` operation (``==``, ``startswith``, ``endswith``,
   ``in`` or ``Pattern.fullmatch``), so the request path pays nothing for the generality.
2. Values are compared as ``HeaderMap`` holds them: ``str`` decoded as latin-1 from the wire
   bytes. Envoy compares UTF-8 bytes, so a configured value is turned into the latin-1 view of
   its UTF-8 bytes (``wire_str``); for ASCII, which is nearly everything, nothing changes.
3. ``ignore_case`` is ASCII-only, as ``absl::EqualsIgnoreCase`` is; ``ignore_case`` together
   with ``safe_regex`` is refused, as Envoy refuses it.
4. Envoy's regexes are RE2 and always match the WHOLE value (``RE2::FullMatch``). They are
   compiled with Python's ``re`` (ASCII classes, as RE2's ``\\d \\w \\s \\b``) after a small scan
   that refuses what RE2 would refuse and Python would accept (backreferences, lookaround,
   atomic groups, possessive quantifiers, conditionals, comments, Python-only flags, repeat
   counts over 1000) and translates what both accept under different spellings (``\\z``,
   ``(?<name>``, ``\\Q...\\E``, ``\\x{...}``, POSIX classes ``[[:alpha:]]``, a literal ``{,n}``).
   RE2's program-size limit is not computed.
5. Header matching is Envoy's ``HeaderUtility::matchHeaders``: the values of a repeated header
   are joined with ``,``; a missing header matches only ``present_match: false`` (or, inverted,
   ``present_match: true``) unless ``treat_missing_header_as_empty`` makes it ``""``; an empty
   ``exact_match`` matches any value; ``invert_match`` flips the result of a present header.
6. Query parameters are parsed as Envoy's ``QueryParamsMulti::parseQueryString``: split on
   ``&`` after the first ``?``, no percent-decoding, ``name`` without ``=`` has value ``""``,
   the first value of a repeated name wins.

Sans-IO: no I/O imports (``tests/test_sans_io.py``).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any

from proxy.config.errors import ConfigError

__all__ = [
    "HeaderMatcher",
    "QueryParameterMatcher",
    "RegexRewrite",
    "StringMatcher",
    "ascii_lower",
    "compile_header_matchers",
    "compile_regex",
    "compile_regex_rewrite",
    "compile_string_matcher",
    "parse_query_params",
    "wire_str",
]

_ASCII_LOWER_TABLE = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def ascii_lower(value: str) -> str:
    """Lowercase ASCII letters only (``absl::AsciiStrToLower``)."""
    return value.lower() if value.isascii() else value.translate(_ASCII_LOWER_TABLE)


def wire_str(value: str) -> str:
    """A configured (unicode) string as HeaderMap holds wire bytes: latin-1 of its UTF-8."""
    return value if value.isascii() else value.encode("utf-8").decode("latin-1")


# ----------------------------------------------------------------------------- StringMatcher
class StringMatcher:
    """A compiled ``envoy.type.matcher.v3.StringMatcher``."""

    __slots__ = ()

    def match(self, value: str) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError


class _Exact(StringMatcher):
    __slots__ = ("_v",)

    def __init__(self, v: str) -> None:
        self._v = v

    def match(self, value: str) -> bool:
        return value == self._v


class _ExactIgnoreCase(_Exact):
    __slots__ = ()

    def match(self, value: str) -> bool:
        return ascii_lower(value) == self._v


class _Prefix(_Exact):
    __slots__ = ()

    def match(self, value: str) -> bool:
        return value.startswith(self._v)


class _PrefixIgnoreCase(_Exact):
    __slots__ = ()

    def match(self, value: str) -> bool:
        return ascii_lower(value).startswith(self._v)


class _Suffix(_Exact):
    __slots__ = ()

    def match(self, value: str) -> bool:
        return value.endswith(self._v)


class _SuffixIgnoreCase(_Exact):
    __slots__ = ()

    def match(self, value: str) -> bool:
        return ascii_lower(value).endswith(self._v)


class _Contains(_Exact):
    __slots__ = ()

    def match(self, value: str) -> bool:
        return self._v in value


class _ContainsIgnoreCase(_Exact):
    __slots__ = ()

    def match(self, value: str) -> bool:
        return self._v in ascii_lower(value)


class _Regex(StringMatcher):
    __slots__ = ("_fullmatch", "pattern")

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self._fullmatch = pattern.fullmatch

    def match(self, value: str) -> bool:
        return self._fullmatch(value) is not None


class _Always(StringMatcher):
    __slots__ = ()

    def match(self, value: str) -> bool:
        return True


_PLAIN = {
    "exact": (_Exact, _ExactIgnoreCase),
    "prefix": (_Prefix, _PrefixIgnoreCase),
    "suffix": (_Suffix, _SuffixIgnoreCase),
    "contains": (_Contains, _ContainsIgnoreCase),
}


def compile_string_matcher(msg: Any, path: str) -> StringMatcher:
    """Compile a ``StringMatcher`` proto found at ``path``."""
    kind = msg.WhichOneof("match_pattern")
    if kind is None:
        raise ConfigError(path, "one of exact, prefix, suffix, contains or safe_regex is required")
    if kind == "safe_regex":
        if msg.ignore_case:
            raise ConfigError(f"{path}.ignore_case", "ignore_case has no effect for safe_regex.")
        return _Regex(compile_regex(msg.safe_regex, f"{path}.safe_regex"))
    if kind not in _PLAIN:
        raise ConfigError(f"{path}.{kind}", f"{kind} is not supported")
    value = wire_str(getattr(msg, kind))
    if kind != "exact" and not value:
        raise ConfigError(f"{path}.{kind}", "value length must be at least 1 characters")
    plain, ignore_case = _PLAIN[kind]
    if msg.ignore_case:
        return ignore_case(ascii_lower(value))
    return plain(value)


# ----------------------------------------------------------------------------- RE2 on re
def compile_regex(msg: Any, path: str) -> re.Pattern[str]:
    """Compile a ``RegexMatcher`` proto found at ``path``; use ``fullmatch`` as Envoy does."""
    return compile_re2(msg.regex, f"{path}.regex")


def compile_re2(pattern: str, path: str) -> re.Pattern[str]:
    """Compile RE2 syntax with ``re``; refuse (ConfigError at ``path``) what RE2 refuses."""
    if not pattern:
        raise ConfigError(path, "value length must be at least 1 characters")
    translated = _translate_re2(wire_str(pattern), path)
    try:
        return re.compile(translated, re.ASCII)
    except re.error as exc:
        raise ConfigError(path, f"invalid regex {pattern!r}: {exc}") from None


_REPEAT = re.compile(r"\{(\d+)(,(\d*))?\}")
_LITERAL_BRACE = re.compile(r"\{,\d*\}")
_RE2_MAX_REPEAT = 1000
_RE2_FLAGS = frozenset("imsU-")
_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "ascii": "\\x00-\\x7f",
    "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": "\\t\\n\\v\\f\\r ",
    "upper": "A-Z",
    "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}
_GROUP_REFUSALS = (
    ("?=", "lookahead (?=...) is not supported by RE2"),
    ("?!", "lookahead (?!...) is not supported by RE2"),
    ("?<=", "lookbehind (?<=...) is not supported by RE2"),
    ("?<!", "lookbehind (?<!...) is not supported by RE2"),
    ("?P=", "backreferences (?P=name) are not supported by RE2"),
    ("?>", "atomic groups (?>...) are not supported by RE2"),
    ("?#", "comments (?#...) are not supported by RE2"),
    ("?(", "conditionals (?(...)...) are not supported by RE2"),
)


def _refuse(path: str, pattern: str, why: str) -> ConfigError:
    return ConfigError(path, f"invalid regex {pattern!r}: {why}")


def _translate_re2(pattern: str, path: str) -> str:
    out: list[str] = []
    i, n = 0, len(pattern)
    in_class = False
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                raise _refuse(path, pattern, "trailing backslash")
            d = pattern[i + 1]
            if d in "123456789":
                raise _refuse(path, pattern, f"backreferences (\\{d}) are not supported by RE2")
            if d == "Z":
                raise _refuse(path, pattern, "\\Z is not supported by RE2 (\\z is end of text)")
            if d in "uUN":
                raise _refuse(path, pattern, f"\\{d} escapes are not supported by RE2")
            if d == "z" and not in_class:
                out.append("\\Z")
                i += 2
                continue
            if d == "Q" and not in_class:
                end = pattern.find("\\E", i + 2)
                literal = pattern[i + 2 :] if end < 0 else pattern[i + 2 : end]
                out.append(re.escape(literal))
                i = n if end < 0 else end + 2
                continue
            if d == "x" and pattern.startswith("{", i + 2):
                end = pattern.find("}", i + 3)
                digits = pattern[i + 3 : end] if end > 0 else ""
                try:
                    code = int(digits, 16)
                    if not digits or code > 0x10FFFF:
                        raise ValueError
                except ValueError:
                    raise _refuse(path, pattern, "bad \\x{...} escape") from None
                out.append(f"\\U{code:08x}")
                i = end + 1
                continue
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
            elif c == "[":
                if pattern.startswith("[:", i):
                    end = pattern.find(":]", i + 2)
                    name = pattern[i + 2 : end] if end > 0 else ""
                    if name.startswith("^"):
                        raise _refuse(path, pattern, f"negated POSIX class [:{name}:] is not supported")
                    if name not in _POSIX_CLASSES:
                        raise _refuse(path, pattern, f"invalid character class range [:{name}:]")
                    out.append(_POSIX_CLASSES[name])
                    i = end + 2
                    continue
                c = "\\["  # literal in RE2; Python would warn about a nested set
            out.append(c)
            i += 1
            continue
        if c == "[":
            in_class = True
            out.append(c)
            i += 1
            if pattern.startswith("^", i):
                out.append("^")
                i += 1
            if pattern.startswith("]", i):
                out.append("\\]")
                i += 1
            continue
        if c == "(" and pattern.startswith("(?", i):
            for prefix, why in _GROUP_REFUSALS:
                if pattern.startswith(prefix, i + 1):
                    raise _refuse(path, pattern, why)
            if pattern.startswith("?<", i + 1):
                out.append("(?P<")  # RE2 accepts (?<name>...) too; Python 3.11 only (?P<name>
                i += 3
                continue
            if not pattern.startswith("?P<", i + 1):
                j = i + 2
                while j < n and pattern[j] not in ":)":
                    j += 1
                flags = pattern[i + 2 : j]
                bad = set(flags) - _RE2_FLAGS
                if bad or "U" in flags:
                    raise _refuse(path, pattern, f"flags {flags!r} are not supported")
            out.append(c)
            i += 1
            continue
        if c == "{":
            m = _REPEAT.match(pattern, i)
            if m is not None:
                low, high = int(m.group(1)), m.group(3)
                if low > _RE2_MAX_REPEAT or (high and int(high) > _RE2_MAX_REPEAT):
                    raise _refuse(path, pattern, f"bad repetition operator {m.group(0)}")
                out.append(m.group(0))
                i = m.end()
                if pattern.startswith("+", i):
                    raise _refuse(path, pattern, "possessive quantifiers are not supported by RE2")
                continue
            if _LITERAL_BRACE.match(pattern, i):
                out.append("\\{")  # RE2 reads {,n} literally; Python would read a repeat
                i += 1
                continue
        if c in "*+?" and pattern.startswith("+", i + 1) and i > 0:
            raise _refuse(path, pattern, "possessive quantifiers are not supported by RE2")
        out.append(c)
        i += 1
    return "".join(out)


# ----------------------------------------------------------------------------- regex rewrite
class RegexRewrite:
    """A compiled ``RegexMatchAndSubstitute``: RE2 ``GlobalReplace`` semantics."""

    __slots__ = ("_finditer", "_template", "pattern")

    def __init__(self, pattern: re.Pattern[str], template: str) -> None:
        self.pattern = pattern
        self._finditer = pattern.finditer
        self._template = template

    def replace_all(self, value: str) -> str:
        out: list[str] = []
        last = 0
        last_end = -1
        for m in self._finditer(value):
            start, end = m.span()
            if start == end == last_end:
                continue  # RE2 never takes an empty match right where the previous one ended
            out.append(value[last:start])
            out.append(m.expand(self._template))
            last = last_end = end
        if not out:
            return value
        out.append(value[last:])
        return "".join(out)


def compile_regex_rewrite(msg: Any, path: str) -> RegexRewrite:
    """Compile a ``RegexMatchAndSubstitute`` proto found at ``path``."""
    if not msg.HasField("pattern"):
        raise ConfigError(f"{path}.pattern", "value is required")
    pattern = compile_regex(msg.pattern, f"{path}.pattern")
    template = _re2_substitution(wire_str(msg.substitution), pattern.groups,
                                 f"{path}.substitution")
    return RegexRewrite(pattern, template)


def _re2_substitution(sub: str, groups: int, path: str) -> str:
    """RE2 rewrite syntax (``\\0``-``\\9``, ``\\\\``) as a ``Match.expand`` template."""
    out: list[str] = []
    i, n = 0, len(sub)
    while i < n:
        c = sub[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        d = sub[i + 1] if i + 1 < n else ""
        if d == "\\":
            out.append("\\\\")
        elif d.isdigit() and d.isascii():
            if int(d) > groups:
                raise ConfigError(path, f"invalid substitution {sub!r}: \\{d} names a group the "
                                        f"pattern does not have ({groups})")
            out.append(f"\\g<{d}>")
        else:
            raise ConfigError(path, f"invalid substitution {sub!r}: a backslash must be followed "
                                    "by a digit or a backslash")
        i += 2
    return "".join(out)


# ----------------------------------------------------------------------------- headers
_EXACT, _REGEX, _PRESENT, _STRING = 0, 1, 2, 3


class HeaderMatcher:
    """A compiled ``envoy.config.route.v3.HeaderMatcher``."""

    __slots__ = ("_kind", "_match", "_present", "invert_match", "name",
                 "treat_missing_header_as_empty")

    def __init__(self, name: str, matcher: StringMatcher | None, present: bool,
                 invert_match: bool, treat_missing_header_as_empty: bool) -> None:
        self.name = name
        self._match = matcher.match if matcher is not None else None
        self._present = present
        self.invert_match = invert_match
        self.treat_missing_header_as_empty = treat_missing_header_as_empty

    @classmethod
    def from_proto(cls, msg: Any, path: str) -> HeaderMatcher:
        name = ascii_lower(msg.name)
        if not name:
            raise ConfigError(f"{path}.name", "value length must be at least 1 characters")
        kind = msg.WhichOneof("header_match_specifier")
        matcher: StringMatcher | None = None
        present = True
        if kind is None:
            pass  # presence match
        elif kind == "present_match":
            present = msg.present_match
        elif kind == "exact_match":
            value = wire_str(msg.exact_match)
            matcher = _Exact(value) if value else _Always()
        elif kind == "safe_regex_match":
            matcher = _Regex(compile_regex(msg.safe_regex_match, f"{path}.safe_regex_match"))
        elif kind in ("prefix_match", "suffix_match", "contains_match"):
            value = wire_str(getattr(msg, kind))
            if not value:
                raise ConfigError(f"{path}.{kind}", "value length must be at least 1 characters")
            matcher = {"prefix_match": _Prefix, "suffix_match": _Suffix,
                       "contains_match": _Contains}[kind](value)
        elif kind == "string_match":
            matcher = compile_string_matcher(msg.string_match, f"{path}.string_match")
        else:
            raise ConfigError(f"{path}.{kind}", f"{kind} is not supported")
        return cls(name, matcher, present, msg.invert_match, msg.treat_missing_header_as_empty)

    def matches(self, headers: Any) -> bool:
        """Whether ``headers`` (a HeaderMap) satisfy this matcher."""
        values = headers.get_all(self.name)
        if not values:
            if not self.treat_missing_header_as_empty:
                # Envoy: only a presence matcher can say something about a missing header.
                if self._match is not None:
                    return False
                return self._present if self.invert_match else not self._present
            value = ""
        elif len(values) == 1:
            value = values[0]
        else:
            value = ",".join(values)
        match = self._present if self._match is None else self._match(value)
        return match != self.invert_match

    def __repr__(self) -> str:
        return f"HeaderMatcher({self.name!r})"


def compile_header_matchers(msgs: Any, path: str) -> tuple[HeaderMatcher, ...]:
    """Compile a repeated ``HeaderMatcher`` field found at ``path``."""
    return tuple(HeaderMatcher.from_proto(m, f"{path}[{i}]") for i, m in enumerate(msgs))


# ----------------------------------------------------------------------------- query parameters
def parse_query_params(path: str) -> dict[str, str]:
    """First value of each query parameter of ``path`` (undecoded, as Envoy matches them)."""
    start = path.find("?")
    if start < 0:
        return {}
    out: dict[str, str] = {}
    for param in path[start + 1 :].split("&"):
        name, eq, value = param.partition("=")
        if name not in out:
            out[name] = value if eq else ""
    return out


class QueryParameterMatcher:
    """A compiled ``envoy.config.route.v3.QueryParameterMatcher``."""

    __slots__ = ("_match", "name", "present_match")

    def __init__(self, name: str, matcher: StringMatcher | None, present_match: bool | None) -> None:
        self.name = name
        self._match = matcher.match if matcher is not None else None
        self.present_match = present_match

    @classmethod
    def from_proto(cls, msg: Any, path: str) -> QueryParameterMatcher:
        if not msg.name:
            raise ConfigError(f"{path}.name", "value length must be at least 1 characters")
        kind = msg.WhichOneof("query_parameter_match_specifier")
        if kind == "string_match":
            return cls(wire_str(msg.name),
                       compile_string_matcher(msg.string_match, f"{path}.string_match"), None)
        if kind == "present_match":
            return cls(wire_str(msg.name), None, msg.present_match)
        if kind is None:
            return cls(wire_str(msg.name), None, None)  # Envoy: a presence check
        raise ConfigError(f"{path}.{kind}", f"{kind} is not supported")

    def matches(self, params: Mapping[str, str]) -> bool:
        """``params`` as ``parse_query_params`` returns them."""
        value = params.get(self.name)
        if self.present_match is not None:
            return (value is not None) == self.present_match
        if value is None:
            return False
        return self._match is None or self._match(value)

    def __repr__(self) -> str:
        return f"QueryParameterMatcher({self.name!r})"
