"""The route table: Envoy's ``RouteConfiguration`` compiled for the request path.

Theory of operation:

1. Virtual host selection is Envoy's ``RouteMatcher::findVirtualHost``: the ``:authority``
   value, ASCII-lowercased and with its port kept (a Host with a port only matches a domain
   written with that port), is looked up among the exact domains (a dict), then among the
   suffix wildcards (``*.example.com``, ``*-bar.example.com``) longest first, then among the
   prefix wildcards (``foo.*``) longest first, then ``*``. A wildcard never matches an empty
   remainder (``*.foo.com`` does not match ``.foo.com``). With ``*`` as the only domain every
   request gets it, even one without ``:authority``; otherwise no ``:authority``, no route.
   A domain listed twice, or more than one ``*``, is refused, as Envoy refuses them.
2. Routes of the chosen virtual host are tried in order; the first whose path specifier,
   ``headers`` and ``query_parameters`` all match wins. Path specifiers see the path without
   query and fragment (up to the first ``?`` or ``#``): ``prefix`` and ``path_separated_prefix``
   are ``startswith`` (the latter then needs the end of the path or a ``/``), ``path`` is
   ``==``, ``safe_regex`` is a full match; ``case_sensitive: false`` compares ASCII-lowercased
   (it does nothing to a regex). A request without ``:path`` matches no route (CONNECT
   routes are not implemented).
3. A route carries exactly one of ``route_action``, ``redirect`` or ``direct_response``.
4. Header mutations (``request/response_headers_to_add/remove``) exist at three levels.
   ``most_specific_header_mutations_wins`` is false by default (and not configurable here),
   so Envoy applies the route's, then the virtual host's, then the route configuration's: the
   least specific level is applied last and wins an overwrite. Within one level removals go
   first, then every value is formatted, then overwrites, then additions. A value holding
   ``%`` is compiled with the access-log formatter (``%REQ(x)%``, ``%DOWNSTREAM_REMOTE_ADDRESS%``);
   other values are plain strings. A value that formats to ``""`` is not added unless
   ``keep_empty_value``. Adding or removing ``:``-headers or ``host`` is refused.
5. Path rewrites follow ``rewritePathByPrefixOrRegex``: ``prefix_rewrite`` replaces the
   *matched* part (the configured prefix or path; for a regex route, the whole path without
   query), ``regex_rewrite`` substitutes in the path without query and keeps the query; an
   empty result leaves the path alone. Redirects apply their own ``prefix_rewrite`` the same
   way before building ``Location`` (``Http::Utility::newUri``).

Sans-IO (``tests/test_sans_io.py``); the one read is a direct-response body ``filename``, at
compile time.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from proxy.common.hash import hash64
from proxy.common.matchers import (
    HeaderMatcher,
    QueryParameterMatcher,
    RegexRewrite,
    ascii_lower,
    compile_header_matchers,
    compile_regex,
    compile_regex_rewrite,
    parse_query_params,
    wire_str,
)
from proxy.config.errors import ConfigError, not_supported
from proxy.config.protos import duration_s, wrapped

if TYPE_CHECKING:
    import random
    import re

    from proxy.config.context import FactoryContext
    from proxy.http.headers import HeaderMap
    from proxy.stream_info import StreamInfo

__all__ = [
    "DEFAULT_ROUTE_TIMEOUT_S",
    "MAX_DIRECT_RESPONSE_BODY_SIZE_BYTES",
    "DirectResponse",
    "Redirect",
    "Route",
    "RouteAction",
    "RouteTable",
    "VirtualHost",
]

DEFAULT_ROUTE_TIMEOUT_S = 15.0  # Envoy's DEFAULT_ROUTE_TIMEOUT_MS
MAX_DIRECT_RESPONSE_BODY_SIZE_BYTES = 4096  # Envoy's default max_direct_response_body_size_bytes
_UINT32_MAX = 2**32 - 1
_MASK64 = 2**64 - 1

# RedirectAction.RedirectResponseCode
_REDIRECT_CODES = {0: 301, 1: 302, 2: 303, 3: 307, 4: 308}

# HeaderValueOption.HeaderAppendAction
_APPEND_IF_EXISTS_OR_ADD, _ADD_IF_ABSENT, _OVERWRITE_IF_EXISTS_OR_ADD, _OVERWRITE_IF_EXISTS = (
    0, 1, 2, 3)

# Path specifier kinds.
_PREFIX, _PREFIX_NOCASE, _PATH, _PATH_NOCASE, _REGEX, _SEP_PREFIX, _SEP_PREFIX_NOCASE = range(7)

# Hash policy kinds.
_HASH_HEADER, _HASH_COOKIE, _HASH_SOURCE_IP = range(3)


def _path_only(path: str) -> str:
    """``PathUtil::removeQueryAndFragment``."""
    i = path.find("?")
    if i >= 0:
        path = path[:i]
    i = path.find("#")
    if i >= 0:
        path = path[:i]
    return path


# ----------------------------------------------------------------------------- header mutations
class _HeaderToAdd:
    __slots__ = ("action", "formatter", "keep_empty_value", "key", "value")

    def __init__(self, key: str, value: str, formatter: Any, action: int,
                 keep_empty_value: bool) -> None:
        self.key = key
        self.value = value
        self.formatter = formatter
        self.action = action
        self.keep_empty_value = keep_empty_value


class _HeaderParser:
    """One level's ``*_headers_to_add`` / ``*_headers_to_remove`` (Envoy's HeaderParser)."""

    __slots__ = ("_add", "_remove")

    def __init__(self, add: tuple[_HeaderToAdd, ...], remove: frozenset[str]) -> None:
        self._add = add
        self._remove = remove

    def evaluate(self, headers: HeaderMap, stream_info: StreamInfo | None) -> None:
        if self._remove:
            headers.remove_if(self._remove)
        if not self._add:
            return
        overwrite: list[tuple[str, str]] = []
        add: list[tuple[str, str]] = []
        for entry in self._add:
            value = entry.value if entry.formatter is None else entry.formatter.format(stream_info)
            if not value and not entry.keep_empty_value:
                continue
            action = entry.action
            if action == _APPEND_IF_EXISTS_OR_ADD:
                add.append((entry.key, value))
            elif action == _ADD_IF_ABSENT:
                if entry.key not in headers:
                    add.append((entry.key, value))
            elif action == _OVERWRITE_IF_EXISTS:
                if entry.key in headers:
                    overwrite.append((entry.key, value))
            else:
                overwrite.append((entry.key, value))
        for key, value in overwrite:
            headers.set(key, value)
        for key, value in add:
            headers.add(key, value)


def _modifiable(key: str) -> bool:
    """``HeaderUtility::isModifiableHeader`` / ``isRemovableHeader``."""
    return not key.startswith(":") and key != "host"


def _compile_header_parser(msg: Any, which: str, path: str) -> _HeaderParser | None:
    """``{which}_headers_to_add`` and ``{which}_headers_to_remove`` of ``msg``."""
    add_field, remove_field = f"{which}_headers_to_add", f"{which}_headers_to_remove"
    adds: list[_HeaderToAdd] = []
    for i, option in enumerate(getattr(msg, add_field)):
        opath = f"{path}.{add_field}[{i}]"
        if not option.HasField("header"):
            raise ConfigError(f"{opath}.header", "value is required")
        key = ascii_lower(option.header.key)
        if not key:
            raise ConfigError(f"{opath}.header.key", "value length must be at least 1 characters")
        if not _modifiable(key):
            raise ConfigError(f"{opath}.header.key",
                              ":-prefixed or host headers may not be modified")
        if option.HasField("append"):
            if option.append_action != _APPEND_IF_EXISTS_OR_ADD:
                raise ConfigError(f"{opath}.append_action",
                                  "Both append and append_action are set and it's not allowed")
            action = _APPEND_IF_EXISTS_OR_ADD if option.append.value else _OVERWRITE_IF_EXISTS_OR_ADD
        else:
            action = option.append_action
            if action not in (_APPEND_IF_EXISTS_OR_ADD, _ADD_IF_ABSENT,
                              _OVERWRITE_IF_EXISTS_OR_ADD, _OVERWRITE_IF_EXISTS):
                raise ConfigError(f"{opath}.append_action",
                                  f"value must be one of the defined enum values, not {action}")
        value, formatter = _compile_header_value(option.header.value, f"{opath}.header.value")
        adds.append(_HeaderToAdd(key, value, formatter, action, option.keep_empty_value))
    removes: set[str] = set()
    for i, name in enumerate(getattr(msg, remove_field)):
        key = ascii_lower(name)
        if not key:
            raise ConfigError(f"{path}.{remove_field}[{i}]",
                              "value length must be at least 1 characters")
        if not _modifiable(key):
            raise ConfigError(f"{path}.{remove_field}[{i}]",
                              ":-prefixed or host headers may not be removed")
        removes.add(key)
    if not adds and not removes:
        return None
    return _HeaderParser(tuple(adds), frozenset(removes))


def _compile_header_value(value: str, path: str) -> tuple[str, Any]:
    """A plain value, or a formatter when the value holds format operators."""
    if "%" not in value:
        return wire_str(value), None
    try:
        from proxy.access_log.formatter import compile_format
    except ModuleNotFoundError as exc:
        if exc.name not in ("proxy.access_log.formatter", "proxy.access_log"):
            raise
        raise not_supported(path, "format operators in header values") from None
    # Envoy formats header values with omit_empty_values: a missing %REQ(x)% is "", not "-",
    # so that the header is then not added (unless keep_empty_value).
    return "", compile_format(value, path, omit_empty_values=True)


# ----------------------------------------------------------------------------- redirects
def _process_request_host(headers: HeaderMap, new_scheme: str, new_port: str) -> str:
    """Envoy's ``processRequestHost``: the request host, without a port the new URL drops."""
    host = headers.get(":authority") or ""
    if not host:
        return host
    if host[0] == "[":
        end = host.rfind("]:")
        if end >= 0:
            end += 1
    else:
        end = host.rfind(":")
    if end >= 0:
        port = host[end:]
        # Envoy strips by X-Forwarded-Proto, which its connection manager always sets.
        proto = headers.get("x-forwarded-proto")
        if proto is None:
            proto = headers.get(":scheme") or ""
        remove = bool(new_port)
        if new_scheme != proto:
            remove = remove or (proto == "https" and port == ":443") or (
                proto == "http" and port == ":80")
        if remove:
            return host[:end]
    return host


def _new_uri(headers: HeaderMap, scheme: str, host: str, port: str, path: str) -> str:
    if not host:
        host = _process_request_host(headers, scheme, port)
    if not path.startswith("/"):
        path = "/" + path
    return f"{scheme}://{host}{port}{path}"


def _rewrite_prefix(path: str, matched_len: int | None, rewrite: str) -> str:
    """``generateNewPath``: ``rewrite`` replaces the matched part of ``path``."""
    if matched_len is None:  # regex route: the whole path without query is the matched part
        matched_len = len(_path_only(path))
    return rewrite + path[matched_len:]


class Redirect:
    """A compiled ``RedirectAction``; ``location(request_headers)`` is Envoy's ``newUri``."""

    __slots__ = ("_host", "_matched_len", "_path", "_path_has_query", "_port", "_prefix_rewrite",
                 "_scheme", "_strip_query", "status")

    def __init__(self, msg: Any, matched_len: int | None, path: str) -> None:
        code = msg.response_code
        if code not in _REDIRECT_CODES:
            raise ConfigError(f"{path}.response_code",
                              f"value must be one of the defined enum values, not {code}")
        self.status: int = _REDIRECT_CODES[code]
        scheme = msg.WhichOneof("scheme_rewrite_specifier")
        self._scheme: str | None = None
        if scheme == "scheme_redirect" and msg.scheme_redirect:
            self._scheme = msg.scheme_redirect
        elif scheme == "https_redirect" and msg.https_redirect:
            self._scheme = "https"
        self._host = wire_str(msg.host_redirect)
        self._port = f":{msg.port_redirect}" if msg.port_redirect else ""
        which = msg.WhichOneof("path_rewrite_specifier")
        if which not in (None, "path_redirect", "prefix_rewrite"):
            raise ConfigError(f"{path}.{which}", f"{which} is not supported")
        self._path = wire_str(msg.path_redirect)
        self._path_has_query = "?" in self._path
        self._prefix_rewrite = wire_str(msg.prefix_rewrite)
        self._matched_len = matched_len
        self._strip_query = msg.strip_query

    def location(self, headers: HeaderMap) -> str:
        scheme = self._scheme
        if scheme is None:
            scheme = headers.get(":scheme") or ""
        path = headers.get(":path") or ""
        if self._prefix_rewrite:
            path = _rewrite_prefix(path, self._matched_len, self._prefix_rewrite)
        if self._path:
            if self._path_has_query:
                path = self._path
            else:
                q = path.find("?")
                path = self._path + path[q:] if q >= 0 else self._path
        if self._strip_query and not self._path_has_query:
            q = path.find("?")
            if q >= 0:
                path = path[:q]
        return _new_uri(headers, scheme, self._host, self._port, path)

    def __repr__(self) -> str:
        return f"Redirect(status={self.status})"


# ----------------------------------------------------------------------------- direct responses
class DirectResponse:
    """A compiled ``DirectResponseAction``: status and the body read at compile time."""

    __slots__ = ("body", "status")

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body

    def location(self, headers: HeaderMap) -> str | None:
        """Envoy adds ``Location`` (the request URL) to a 201 or 3xx direct response."""
        if not (self.status == 201 or 300 <= self.status < 400):
            return None
        path = headers.get(":path")
        if path is None:
            return None
        scheme = headers.get(":scheme") or ""
        return _new_uri(headers, scheme, "", "", path)

    @classmethod
    def from_proto(cls, msg: Any, path: str) -> DirectResponse:
        status = msg.status
        if not 200 <= status < 600:
            raise ConfigError(f"{path}.status", "value must be inside range [200, 600)")
        return cls(status, _read_body(msg, f"{path}.body") if msg.HasField("body") else b"")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DirectResponse) and (self.status, self.body) == (
            other.status, other.body)

    def __hash__(self) -> int:
        return hash((self.status, self.body))

    def __repr__(self) -> str:
        return f"DirectResponse(status={self.status}, body={self.body!r})"


def _read_body(msg: Any, path: str) -> bytes:
    body = msg.body
    which = body.WhichOneof("specifier")
    limit = MAX_DIRECT_RESPONSE_BODY_SIZE_BYTES
    if which == "filename":
        name = body.filename
        try:
            with open(name, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise ConfigError(f"{path}.filename",
                              f"response body file {name} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"{path}.filename",
                              f"cannot read response body file {name}: {exc}") from None
        if len(data) > limit:
            raise ConfigError(f"{path}.filename",
                              f"response body file {name} is larger than {limit} bytes; "
                              f"maximum is {limit}")
        return data
    if which == "inline_bytes":
        data = body.inline_bytes
        field = "inline_bytes"
    elif which == "inline_string":
        data = body.inline_string.encode("utf-8")
        field = "inline_string"
    elif which is None:
        raise ConfigError(path, "one of filename, inline_bytes or inline_string is required")
    else:
        raise ConfigError(f"{path}.{which}", f"{which} is not supported")
    if len(data) > limit:
        raise ConfigError(f"{path}.{field}",
                          f"response body size is {len(data)} bytes; maximum is {limit}")
    return data


# ----------------------------------------------------------------------------- route action
class _WeightedClusters:
    __slots__ = ("_ends", "_names", "total")

    def __init__(self, names: tuple[str, ...], weights: tuple[int, ...]) -> None:
        self._names = names
        ends: list[int] = []
        total = 0
        for w in weights:
            total += w
            ends.append(total)
        self._ends = tuple(ends)
        self.total = total

    def pick(self, rng: random.Random) -> str:
        # Envoy: random_value % total, then the interval [begin, end) that holds it.
        selected = min(int(rng.random() * self.total), self.total - 1)
        return self._names[bisect_right(self._ends, selected)]


class RouteAction:
    """A compiled ``RouteAction``: where to send the request and how to change it."""

    __slots__ = ("_cluster", "_cluster_header", "_hash_policies", "_matched_len",
                 "_prefix_rewrite", "_regex_rewrite", "_weighted", "auto_host_rewrite",
                 "has_hash_policy", "host_rewrite_literal", "timeout",
                 "grpc_timeout_header_max", "grpc_timeout_header_offset",
                 "retry_policy", "priority", "retry_buffer_limit",
                 "include_attempt_count", "include_attempt_count_in_response")

    def __init__(self, msg: Any, matched_len: int | None, path: str) -> None:
        which = msg.WhichOneof("cluster_specifier")
        self._cluster: str | None = None
        self._cluster_header: str | None = None
        self._weighted: _WeightedClusters | None = None
        if which == "cluster":
            if not msg.cluster:
                raise ConfigError(f"{path}.cluster", "value length must be at least 1 characters")
            self._cluster = msg.cluster
        elif which == "cluster_header":
            name = ascii_lower(msg.cluster_header)
            if not name:
                raise ConfigError(f"{path}.cluster_header",
                                  "value length must be at least 1 characters")
            self._cluster_header = name
        elif which == "weighted_clusters":
            self._weighted = _compile_weighted(msg.weighted_clusters, f"{path}.weighted_clusters")
        elif which is None:
            raise ConfigError(path, "one of cluster, cluster_header or weighted_clusters is "
                                    "required")
        else:
            raise ConfigError(f"{path}.{which}", f"{which} is not supported")

        self.timeout: float | None = _route_timeout(msg, f"{path}.timeout")
        # max_stream_duration.grpc_timeout_header_max: None = grpc-timeout is ignored; 0 =
        # honoured without a cap. The offset is subtracted from it (Envoy's finalTimeout).
        self.grpc_timeout_header_max: float | None = None
        self.grpc_timeout_header_offset = 0.0
        if msg.HasField("max_stream_duration"):
            msd = msg.max_stream_duration
            self.grpc_timeout_header_max = duration_s(msd, "grpc_timeout_header_max")
            self.grpc_timeout_header_offset = duration_s(msd, "grpc_timeout_header_offset") or 0.0
            for name in ("grpc_timeout_header_max", "grpc_timeout_header_offset"):
                v = duration_s(msd, name)
                if v is not None and v < 0:
                    raise ConfigError(f"{path}.max_stream_duration.{name}", "must not be negative")
        self.host_rewrite_literal: str | None = (
            wire_str(msg.host_rewrite_literal) if msg.host_rewrite_literal else None)
        self.auto_host_rewrite: bool = bool(wrapped(msg, "auto_host_rewrite", False))

        self._prefix_rewrite = wire_str(msg.prefix_rewrite)
        self._regex_rewrite: RegexRewrite | None = None
        if msg.HasField("regex_rewrite"):
            if self._prefix_rewrite:
                raise ConfigError(f"{path}.regex_rewrite",
                                  "Specify only one of prefix_rewrite, regex_rewrite or "
                                  "path_rewrite_policy")
            self._regex_rewrite = compile_regex_rewrite(msg.regex_rewrite,
                                                        f"{path}.regex_rewrite")
        self._matched_len = matched_len
        self._hash_policies = _compile_hash_policies(msg.hash_policy, f"{path}.hash_policy")
        # Whether hash_key can produce a key at all (lets the router skip the call).
        self.has_hash_policy: bool = bool(self._hash_policies)
        # Resilience (issue #6), filled by _compile_resilience: the retry policy (route's, else
        # the virtual host's; None: none), the routing priority (circuit breakers), the
        # request bytes buffered for retries (None: the connection's buffer limit), and
        # x-envoy-attempt-count on the request / the response.
        if msg.priority not in (0, 1):
            raise ConfigError(f"{path}.priority", f"unknown value {msg.priority}")
        self.priority: int = msg.priority
        self.retry_policy: Any = None
        self.retry_buffer_limit: int | None = None
        self.include_attempt_count = False
        self.include_attempt_count_in_response = False

    # -- cluster selection -------------------------------------------------------------
    def cluster_name(self, headers: HeaderMap, rng: random.Random) -> str | None:
        """The target cluster; None when ``cluster_header`` is absent (or empty)."""
        if self._cluster is not None:
            return self._cluster
        if self._weighted is not None:
            return self._weighted.pick(rng)
        return headers.get(self._cluster_header) or None  # type: ignore[arg-type]

    @property
    def cluster_names(self) -> tuple[str, ...]:
        """The clusters this action can name statically (none for ``cluster_header``)."""
        if self._cluster is not None:
            return (self._cluster,)
        if self._weighted is not None:
            return self._weighted._names
        return ()

    # -- rewrites ----------------------------------------------------------------------
    def rewrite_request(self, headers: HeaderMap) -> None:
        """Apply ``host_rewrite_literal`` and ``prefix_rewrite`` / ``regex_rewrite``."""
        if self.host_rewrite_literal is not None:
            headers.set(":authority", self.host_rewrite_literal)
        if not self._prefix_rewrite and self._regex_rewrite is None:
            return
        path = headers.get(":path")
        if path is None:
            return
        if self._prefix_rewrite:
            new_path = _rewrite_prefix(path, self._matched_len, self._prefix_rewrite)
        else:
            only = _path_only(path)
            new_only = self._regex_rewrite.replace_all(only)  # type: ignore[union-attr]
            if not new_only:
                return  # Envoy: an empty rewrite result leaves the path alone
            new_path = new_only + path[len(only):]
        if new_path != path:
            headers.set(":path", new_path)

    # -- hashing -----------------------------------------------------------------------
    def hash_key(self, headers: HeaderMap, source_ip: str) -> int | None:
        """Envoy's ``HashPolicyImpl::generateHash``; None when no policy produced a key."""
        result: int | None = None
        for kind, arg, terminal in self._hash_policies:
            key: int | None = None
            if kind == _HASH_HEADER:
                values = headers.get_all(arg)
                if len(values) == 1:
                    key = hash64(values[0])
                elif values:
                    key = hash64("\x00".join(sorted(values)))
            elif kind == _HASH_COOKIE:
                value = _cookie_value(headers, arg)
                if value:
                    key = hash64(value)
            elif source_ip:
                key = hash64(source_ip)
            if key is not None:
                # Rotating the old value keeps duplicate rules from cancelling each other out.
                result = key if result is None else (
                    ((result << 1) | (result >> 63)) & _MASK64) ^ key
            if terminal and result is not None:
                break
        return result

    def __repr__(self) -> str:
        return f"RouteAction(cluster={self._cluster or self._cluster_header or self._weighted!r})"


def _compile_weighted(msg: Any, path: str) -> _WeightedClusters:
    if not msg.clusters:
        raise ConfigError(f"{path}.clusters", "value must contain at least 1 item(s)")
    names: list[str] = []
    weights: list[int] = []
    for i, cw in enumerate(msg.clusters):
        cpath = f"{path}.clusters[{i}]"
        if not cw.name:
            raise ConfigError(cpath, "At least one of name or cluster_header need to be specified")
        if not cw.HasField("weight"):
            raise ConfigError(f"{cpath}.weight", "value is required")
        names.append(cw.name)
        weights.append(cw.weight.value)
    total = sum(weights)
    if total > _UINT32_MAX:
        raise ConfigError(f"{path}.clusters",
                          f"The sum of weights of all weighted clusters exceeds {_UINT32_MAX}")
    if total == 0:
        raise ConfigError(f"{path}.clusters",
                          "Sum of weights in the weighted_cluster must be greater than 0.")
    # total_weight is deprecated: the sum is what counts. Where it is set, the documented
    # contract is that the weights add up to it, so a disagreement is refused, not guessed at.
    declared = wrapped(msg, "total_weight", 0)
    if declared and declared != total:
        raise ConfigError(f"{path}.total_weight",
                          f"Sum of weights in the weighted_cluster should add up to {declared} "
                          f"(they add up to {total})")
    return _WeightedClusters(tuple(names), tuple(weights))


def _route_timeout(msg: Any, path: str) -> float | None:
    """``PROTOBUF_GET_MS_OR_DEFAULT(route, timeout, 15000)``; 0 ms disables it."""
    if not msg.HasField("timeout"):
        return DEFAULT_ROUTE_TIMEOUT_S
    d = msg.timeout
    if d.seconds < 0 or d.nanos < 0:
        raise ConfigError(path, "Duration out-of-range: must not be negative")
    ms = d.seconds * 1000 + d.nanos // 1_000_000
    return ms / 1000 if ms else None


def _compile_hash_policies(msgs: Sequence[Any], path: str) -> tuple[tuple[int, str, bool], ...]:
    out: list[tuple[int, str, bool]] = []
    for i, hp in enumerate(msgs):
        hpath = f"{path}[{i}]"
        which = hp.WhichOneof("policy_specifier")
        if which == "header":
            name = ascii_lower(hp.header.header_name)
            if not name:
                raise ConfigError(f"{hpath}.header.header_name",
                                  "value length must be at least 1 characters")
            out.append((_HASH_HEADER, name, hp.terminal))
        elif which == "cookie":
            if hp.cookie.HasField("ttl"):
                # Envoy would set the cookie when it is missing; trioxy only reads it.
                raise not_supported(f"{hpath}.cookie.ttl", "generating a hash cookie (ttl)")
            if not hp.cookie.name:
                raise ConfigError(f"{hpath}.cookie.name",
                                  "value length must be at least 1 characters")
            out.append((_HASH_COOKIE, hp.cookie.name, hp.terminal))
        elif which == "connection_properties":
            if hp.connection_properties.source_ip:  # false: Envoy adds no policy at all
                out.append((_HASH_SOURCE_IP, "", hp.terminal))
        elif which is None:
            raise ConfigError(hpath, "one of header, cookie or connection_properties is required")
        else:
            raise ConfigError(f"{hpath}.{which}", f"{which} is not supported")
    return tuple(out)


def _cookie_value(headers: HeaderMap, name: str) -> str:
    """``Http::Utility::parseCookieValue``: the first cookie ``name`` of the Cookie headers."""
    for key, header in headers:
        if key != "cookie":
            continue
        for part in header.split(";"):
            eq = part.find("=")
            if eq < 0:
                continue
            if part[:eq].lstrip(" ") == name:
                value = part[eq + 1 :]
                if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
                    value = value[1:-1]
                return value
    return ""


# ----------------------------------------------------------------------------- routes
class Route:
    """One compiled ``Route``: how it matches and what it does."""

    __slots__ = ("_headers", "_kind", "_query", "_regex", "_request_parsers",
                 "_response_parsers", "_value", "direct_response", "name", "redirect",
                 "route_action", "virtual_host_name")

    def __init__(self, name: str, virtual_host_name: str) -> None:
        self.name = name
        self.virtual_host_name = virtual_host_name
        self.direct_response: DirectResponse | None = None
        self.redirect: Redirect | None = None
        self.route_action: RouteAction | None = None
        self._kind = _PREFIX
        self._value = ""
        self._regex: Callable[[str], re.Match[str] | None] | None = None
        self._headers: tuple[HeaderMatcher, ...] = ()
        self._query: tuple[QueryParameterMatcher, ...] = ()
        self._request_parsers: tuple[_HeaderParser, ...] = ()
        self._response_parsers: tuple[_HeaderParser, ...] = ()

    def finalize_request_headers(self, headers: HeaderMap, stream_info: StreamInfo | None) -> None:
        """Route, virtual host, then route configuration ``request_headers_to_add/remove``."""
        for parser in self._request_parsers:
            parser.evaluate(headers, stream_info)

    def finalize_response_headers(self, headers: HeaderMap,
                                  stream_info: StreamInfo | None) -> None:
        """Route, virtual host, then route configuration ``response_headers_to_add/remove``."""
        for parser in self._response_parsers:
            parser.evaluate(headers, stream_info)

    def __repr__(self) -> str:
        return f"Route(name={self.name!r}, virtual_host={self.virtual_host_name!r})"


def _compile_match(route: Route, msg: Any, path: str) -> int | None:
    """Fill the route's path specifier; returns the matched length used by prefix rewrites."""
    case_sensitive = bool(wrapped(msg, "case_sensitive", True))
    which = msg.WhichOneof("path_specifier")
    matched_len: int | None
    if which == "prefix":
        value = wire_str(msg.prefix)
        route._kind = _PREFIX if case_sensitive else _PREFIX_NOCASE
        route._value = value if case_sensitive else ascii_lower(value)
        matched_len = len(value)
    elif which == "path":
        value = wire_str(msg.path)
        route._kind = _PATH if case_sensitive else _PATH_NOCASE
        route._value = value if case_sensitive else ascii_lower(value)
        matched_len = len(value)
    elif which == "safe_regex":
        route._kind = _REGEX
        route._regex = compile_regex(msg.safe_regex, f"{path}.safe_regex").fullmatch
        matched_len = None
    elif which == "path_separated_prefix":
        value = wire_str(msg.path_separated_prefix)
        # PGV pattern ^[^?#]+[^?#/]$ (not enforced by proxy.config.pgv, so here).
        if not value or "?" in value or "#" in value or value.endswith("/"):
            raise ConfigError(f"{path}.path_separated_prefix",
                              "value does not match regex pattern \"^[^?#]+[^?#/]$\"")
        route._kind = _SEP_PREFIX if case_sensitive else _SEP_PREFIX_NOCASE
        route._value = value if case_sensitive else ascii_lower(value)
        matched_len = len(value)
    elif which is None:
        raise ConfigError(path, "one of prefix, path, safe_regex or path_separated_prefix is "
                                "required")
    else:
        raise ConfigError(f"{path}.{which}", f"{which} is not supported")
    route._headers = compile_header_matchers(msg.headers, f"{path}.headers")
    route._query = tuple(QueryParameterMatcher.from_proto(q, f"{path}.query_parameters[{i}]")
                         for i, q in enumerate(msg.query_parameters))
    return matched_len


def _compile_resilience(ra: RouteAction, msg: Any, vmsg: Any, path: str,
                        vpath: str) -> None:
    """Retry policy, buffer limit and attempt-count headers (route over virtual host)."""
    from proxy.router.retry_state import RetryPolicy

    if msg.route.HasField("retry_policy"):
        ra.retry_policy = RetryPolicy.from_proto(msg.route.retry_policy,
                                                 f"{path}.route.retry_policy")
    elif vmsg is not None and vmsg.HasField("retry_policy"):
        ra.retry_policy = RetryPolicy.from_proto(vmsg.retry_policy, f"{vpath}.retry_policy")
    limit = wrapped(msg, "per_request_buffer_limit_bytes", None)
    if limit is None and vmsg is not None:
        limit = wrapped(vmsg, "per_request_buffer_limit_bytes", None)
    ra.retry_buffer_limit = limit
    if vmsg is not None:
        ra.include_attempt_count = vmsg.include_request_attempt_count
        ra.include_attempt_count_in_response = vmsg.include_attempt_count_in_response


def _compile_route(msg: Any, vhost_name: str, vhost_parsers: tuple[Any, Any],
                   table_parsers: tuple[Any, Any], ctx: FactoryContext,
                   validate_clusters: bool, path: str, vmsg: Any = None,
                   vpath: str = "") -> Route:
    route = Route(msg.name, vhost_name)
    if not msg.HasField("match"):
        raise ConfigError(f"{path}.match", "value is required")
    matched_len = _compile_match(route, msg.match, f"{path}.match")
    action = msg.WhichOneof("action")
    if action == "route":
        ra = RouteAction(msg.route, matched_len, f"{path}.route")
        _compile_resilience(ra, msg, vmsg, path, vpath)
        if validate_clusters:
            _validate_clusters(ra, msg.route, ctx.cluster_names, f"{path}.route")
        route.route_action = ra
    elif action == "redirect":
        route.redirect = Redirect(msg.redirect, matched_len, f"{path}.redirect")
    elif action == "direct_response":
        route.direct_response = DirectResponse.from_proto(msg.direct_response,
                                                          f"{path}.direct_response")
    elif action is None:
        raise ConfigError(path, "one of route, redirect or direct_response is required")
    else:
        raise ConfigError(f"{path}.{action}", f"{action} is not supported")
    req = _compile_header_parser(msg, "request", path)
    resp = _compile_header_parser(msg, "response", path)
    # most_specific_header_mutations_wins is false: route, vhost, then table (applied last).
    route._request_parsers = tuple(p for p in (req, vhost_parsers[0], table_parsers[0]) if p)
    route._response_parsers = tuple(p for p in (resp, vhost_parsers[1], table_parsers[1]) if p)
    return route


def _validate_clusters(ra: RouteAction, msg: Any, known: frozenset[str], path: str) -> None:
    """``RouteEntryImplBase::validateClusters``: named clusters must exist."""
    if ra._cluster is not None and ra._cluster not in known:
        raise ConfigError(f"{path}.cluster", f"route: unknown cluster '{ra._cluster}'")
    if ra._weighted is not None:
        for i, cw in enumerate(msg.weighted_clusters.clusters):
            if cw.name not in known:
                raise ConfigError(f"{path}.weighted_clusters.clusters[{i}].name",
                                  f"route: unknown weighted cluster '{cw.name}'")


def _headers_match(matchers: tuple[HeaderMatcher, ...], headers: HeaderMap) -> bool:
    for m in matchers:
        if not m.matches(headers):
            return False
    return True


class VirtualHost:
    """One compiled ``VirtualHost``: its routes, tried in order."""

    __slots__ = ("_nocase", "domains", "name", "routes")

    def __init__(self, name: str, domains: tuple[str, ...], routes: tuple[Route, ...]) -> None:
        self.name = name
        self.domains = domains
        self.routes = routes
        self._nocase = any(r._kind in (_PREFIX_NOCASE, _PATH_NOCASE, _SEP_PREFIX_NOCASE)
                           for r in routes)

    def match(self, headers: HeaderMap, path: str) -> Route | None:
        """The first route matching ``headers`` (``path`` is their ``:path``)."""
        p = _path_only(path)
        lp = ascii_lower(p) if self._nocase else p
        query: dict[str, str] | None = None
        for r in self.routes:
            kind = r._kind
            if kind == _PREFIX:
                if not p.startswith(r._value):
                    continue
            elif kind == _PATH:
                if p != r._value:
                    continue
            elif kind == _PREFIX_NOCASE:
                if not lp.startswith(r._value):
                    continue
            elif kind == _PATH_NOCASE:
                if lp != r._value:
                    continue
            elif kind == _REGEX:
                if r._regex(p) is None:  # type: ignore[misc]
                    continue
            else:
                v = r._value
                s = p if kind == _SEP_PREFIX else lp
                if not s.startswith(v) or (len(s) != len(v) and s[len(v)] != "/"):
                    continue
            if r._headers and not _headers_match(r._headers, headers):
                continue
            if r._query:
                if query is None:
                    query = parse_query_params(path)
                if not all(q.matches(query) for q in r._query):
                    continue
            return r
        return None

    def __repr__(self) -> str:
        return f"VirtualHost(name={self.name!r})"


# ----------------------------------------------------------------------------- the table
_WildcardTable = tuple[tuple[int, dict[str, VirtualHost]], ...]


class RouteTable:
    """A compiled ``RouteConfiguration``; ``route(request_headers)`` picks the route."""

    __slots__ = ("_default", "_exact", "_only_default", "_prefixes", "_suffixes", "name",
                 "virtual_hosts")

    def __init__(self, name: str, virtual_hosts: tuple[VirtualHost, ...],
                 exact: dict[str, VirtualHost], suffixes: _WildcardTable,
                 prefixes: _WildcardTable, default: VirtualHost | None) -> None:
        self.name = name
        self.virtual_hosts = virtual_hosts
        self._exact = exact
        self._suffixes = suffixes
        self._prefixes = prefixes
        self._default = default
        self._only_default = not exact and not suffixes and not prefixes

    @classmethod
    def from_proto(cls, msg: Any, ctx: FactoryContext, path: str) -> RouteTable:
        """Compile a ``RouteConfiguration`` found at ``path``."""
        validate_clusters = bool(wrapped(msg, "validate_clusters", ctx.validate_clusters))
        table_parsers = (_compile_header_parser(msg, "request", path),
                         _compile_header_parser(msg, "response", path))
        exact: dict[str, VirtualHost] = {}
        suffixes: dict[int, dict[str, VirtualHost]] = {}
        prefixes: dict[int, dict[str, VirtualHost]] = {}
        default: VirtualHost | None = None
        vhosts: list[VirtualHost] = []
        for i, vmsg in enumerate(msg.virtual_hosts):
            vpath = f"{path}.virtual_hosts[{i}]"
            if not vmsg.name:
                raise ConfigError(f"{vpath}.name", "value length must be at least 1 characters")
            if not vmsg.domains:
                raise ConfigError(f"{vpath}.domains", "value must contain at least 1 item(s)")
            vparsers = (_compile_header_parser(vmsg, "request", vpath),
                        _compile_header_parser(vmsg, "response", vpath))
            routes = tuple(
                _compile_route(rmsg, vmsg.name, vparsers, table_parsers, ctx, validate_clusters,
                               f"{vpath}.routes[{j}]", vmsg, vpath)
                for j, rmsg in enumerate(vmsg.routes))
            domains = tuple(ascii_lower(wire_str(d)) for d in vmsg.domains)
            vhost = VirtualHost(vmsg.name, domains, routes)
            vhosts.append(vhost)
            for j, domain in enumerate(domains):
                dpath = f"{vpath}.domains[{j}]"
                if domain == "*":
                    if default is not None:
                        raise ConfigError(dpath, "Only a single wildcard domain is permitted in "
                                                 f"route {msg.name}")
                    default = vhost
                    continue
                if domain.startswith("*"):
                    table, key = suffixes.setdefault(len(domain) - 1, {}), domain[1:]
                elif domain.endswith("*"):
                    table, key = prefixes.setdefault(len(domain) - 1, {}), domain[:-1]
                else:
                    table, key = exact, domain
                if key in table:
                    raise ConfigError(dpath, "Only unique values for domains are permitted. "
                                             f"Duplicate entry of domain {domain} in route "
                                             f"{msg.name}")
                table[key] = vhost

        def longest_first(t: dict[int, dict[str, VirtualHost]]) -> _WildcardTable:
            return tuple(sorted(t.items(), key=lambda kv: -kv[0]))

        return cls(msg.name, tuple(vhosts), exact, longest_first(suffixes),
                   longest_first(prefixes), default)

    def find_virtual_host(self, headers: HeaderMap) -> VirtualHost | None:
        """Envoy's ``RouteMatcher::findVirtualHost``."""
        if self._only_default:
            return self._default
        host = headers.get(":authority")
        if host is None:
            return None
        host = ascii_lower(host)
        vhost = self._exact.get(host)
        if vhost is not None:
            return vhost
        n = len(host)
        for length, table in self._suffixes:
            if length < n:
                vhost = table.get(host[n - length :])
                if vhost is not None:
                    return vhost
        for length, table in self._prefixes:
            if length < n:
                vhost = table.get(host[:length])
                if vhost is not None:
                    return vhost
        return self._default

    def route(self, headers: HeaderMap) -> Route | None:
        """The route for a request, or None (Envoy: NR, 404)."""
        vhost = self.find_virtual_host(headers)
        if vhost is None:
            return None
        path = headers.get(":path")
        if path is None:
            return None
        return vhost.match(headers, path)

    def __repr__(self) -> str:
        return f"RouteTable(name={self.name!r}, virtual_hosts={len(self.virtual_hosts)})"
