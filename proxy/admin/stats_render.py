"""The bodies of Envoy's /stats, /stats?format=json and /stats/prometheus (pure, no I/O).

Theory of operation
-------------------

The input is the summed ``shm.stats_block.Stats`` of every process; the output has
Envoy's shape, so dashboards and scripts written against Envoy's admin port work here.

1. Names. /stats and /stats?format=json print stat names as they are. /stats/prometheus
   first runs Envoy's default tag extraction (``source/common/config/well_known_names.cc``,
   ported below as data): each extractor that matches takes a tag value out of the name
   and removes part of it, so ``cluster.backend.upstream_rq_200`` becomes
   ``envoy_cluster_upstream_rq{envoy_response_code="200",envoy_cluster_name="backend"}``.
   Every extractor looks at the *original* name; what they remove is unioned and removed
   at the end (Envoy's ``TagProducerImpl::produceTags``). Extractors whose pattern is not
   anchored on a first token run first, then those anchored on the name's first token, each
   group in Envoy's order (regex extractors before tokenized ones): that order is the
   label order.
2. Order. Text and JSON: counters and gauges together, sorted by name, then histograms
   sorted by name (Envoy's ``StatsRequest`` phases). Prometheus: one block per type
   (counters, gauges, histograms), as Envoy's ``statsAsPrometheus`` writes them; in each
   block families are sorted by name, every family has one ``# TYPE`` line and all its
   series together (sorted by stat name), and a blank line ends it.
3. Histograms. We keep bucket counts over ``shm.layout.BUCKET_BOUNDS``, not Envoy's
   log-linear circllhist, so quantiles are estimated the way circllhist estimates inside
   one of its bins: samples are spread evenly over their bucket, (lower bound, upper
   bound], and a quantile is read off by linear interpolation. The first bucket starts at
   0; the last one (above every bound) has no upper bound, so a quantile that lands there
   reads as the last bound. P0 is the lower edge of the first non-empty bucket and P100
   the upper edge of the last, so the printed values always bracket the samples.
4. "Used". Envoy prints, with ``usedonly``, the stats that were ever written. The summed
   values do not say that, so a counter or gauge counts as used when it is not 0 and a
   histogram when it holds a sample.
5. ``stats.overflow`` (stats that did not fit in their shm slot) is a trioxy addition: a
   counter-like line in text and JSON, a gauge in Prometheus (it drops when a slot is
   reclaimed), shown only when it is not 0.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shm.layout import BUCKET_BOUNDS

if TYPE_CHECKING:
    from shm.stats_block import HistValue, Stats

__all__ = [
    "SUPPORTED_QUANTILES",
    "StatsQueryError",
    "compile_filter",
    "compute_quantiles",
    "extract_tags",
    "render_json",
    "render_prometheus",
    "render_text",
]

# Envoy's HistogramStatisticsImpl::supportedQuantiles().
SUPPORTED_QUANTILES: tuple[float, ...] = (0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1)
OVERFLOW_STAT = "stats.overflow"


class StatsQueryError(ValueError):
    """A bad query parameter on a stats endpoint (the client's fault: 400)."""


def compile_filter(pattern: str | None) -> re.Pattern[str] | None:
    """Envoy's ``filter=``: a regex searched for anywhere in the stat name.

    None or empty means no filter (Envoy ignores an empty ``filter=``). Python's ``re``
    stands in for Envoy's RE2; the common syntax is the same.
    """
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    # OverflowError and RecursionError: absurd repeat counts and nesting, not re.error.
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        raise StatsQueryError(f"invalid regex in filter={pattern}: {exc}") from None


def _as_pattern(filter: re.Pattern[str] | str | None) -> re.Pattern[str] | None:
    return compile_filter(filter) if isinstance(filter, str) else filter


# -- number formatting --------------------------------------------------------------------
def _fmt_double(x: float) -> str:
    """fmt's ``{}`` for a double (Envoy's quantile values): shortest round-trip digits,
    exponent past 1e16 or below 1e-4 (the same thresholds as Python's repr), no ``.0``."""
    s = repr(float(x))
    return s[:-2] if s.endswith(".0") else s


def _json_number(x: float) -> float | int | None:
    """Envoy's ``Json::Streamer::number``: NaN is null, else ``%g`` (6 significant digits).
    Integral values come back as int so json.dumps prints ``2`` as Envoy does, not ``2.0``."""
    if math.isnan(x):
        return None
    v = float(f"{x:g}")
    return int(v) if v.is_integer() else v


# -- histograms ---------------------------------------------------------------------------
def _bucket_counts(hist: HistValue) -> list[int]:
    counts = list(hist[0])
    need = len(BUCKET_BOUNDS) + 1
    if len(counts) < need:
        counts += [0] * (need - len(counts))
    return counts


def _hist_total(hist: HistValue) -> int:
    """Samples in a histogram. A reader racing a flush may see the counts and the count one
    flush apart (shm.stats_block): the larger keeps ``+Inf`` at or above every bucket."""
    return max(int(hist[2]), sum(hist[0]))


def compute_quantiles(counts: Sequence[int]) -> list[float]:
    """SUPPORTED_QUANTILES of per-bucket (non-cumulative) counts over BUCKET_BOUNDS.

    NaN for each when there are no samples (Envoy prints ``nan``, JSON ``null``).
    """
    n = sum(counts)
    if n <= 0:
        return [math.nan] * len(SUPPORTED_QUANTILES)
    last = len(counts) - 1
    out: list[float] = []
    i = 0
    below = 0  # samples in buckets before i
    for q in SUPPORTED_QUANTILES:
        target = q * n
        # The first non-empty bucket whose cumulative count reaches the target: a target
        # on a boundary belongs to the bucket below it, so P0 reads the first bucket's
        # lower edge and P100 the last bucket's upper edge.
        while i < last and (counts[i] <= 0 or below + counts[i] < target):
            below += counts[i]
            i += 1
        lo = BUCKET_BOUNDS[i - 1] if i > 0 else 0.0
        if i >= len(BUCKET_BOUNDS):
            out.append(float(lo))  # above every bound: no upper edge to interpolate to
            continue
        hi = BUCKET_BOUNDS[i]
        c = counts[i]
        frac = (target - below) / c if c > 0 else 1.0
        frac = 0.0 if frac < 0 else 1.0 if frac > 1 else frac
        out.append(float(min(hi, max(lo, lo + (hi - lo) * frac))))
    return out


def _interval_quantiles(name: str, interval: Stats | None) -> list[float]:
    if interval is not None:
        h = interval.histograms.get(name)
        if h is not None:
            return compute_quantiles(_bucket_counts(h))
    return [math.nan] * len(SUPPORTED_QUANTILES)


# -- selection ----------------------------------------------------------------------------
def _numeric(
    stats: Stats, pattern: re.Pattern[str] | None, used_only: bool
) -> list[tuple[str, int]]:
    """Counters and gauges (and stats.overflow) to print, sorted by name."""
    rows = [(n, v) for n, v in stats.counters.items()]
    rows += [(n, v) for n, v in stats.gauges.items()]
    if stats.overflow:
        rows.append((OVERFLOW_STAT, stats.overflow))
    rows = [
        (n, v) for n, v in rows
        if (not used_only or v != 0) and (pattern is None or pattern.search(n))
    ]
    rows.sort(key=lambda r: r[0])
    return rows


def _histograms(
    stats: Stats, pattern: re.Pattern[str] | None, used_only: bool
) -> list[tuple[str, HistValue]]:
    rows = [
        (n, h) for n, h in stats.histograms.items()
        if (not used_only or _hist_total(h) > 0) and (pattern is None or pattern.search(n))
    ]
    rows.sort(key=lambda r: r[0])
    return rows


# -- /stats -------------------------------------------------------------------------------
def _quantile_summary(name: str, hist: HistValue, interval: Stats | None) -> str:
    """Envoy's ``ParentHistogramImpl::quantileSummary``: ``P{:g}({interval},{cumulative})``."""
    cumulative = compute_quantiles(_bucket_counts(hist))
    intervals = _interval_quantiles(name, interval)
    return " ".join(
        f"P{100 * q:g}({_fmt_double(i)},{_fmt_double(c)})"
        for q, i, c in zip(SUPPORTED_QUANTILES, intervals, cumulative, strict=True)
    )


def render_text(
    stats: Stats,
    *,
    filter: re.Pattern[str] | str | None = None,
    used_only: bool = False,
    interval: Stats | None = None,
) -> str:
    """Envoy's /stats: ``name: value`` lines, then one line per histogram.

    ``filter`` is a compiled ``compile_filter`` pattern (a string is compiled here, and
    may raise StatsQueryError). ``used_only`` keeps counters and gauges that are not 0
    and histograms with a sample (Envoy's "ever written", approximated from sums).
    ``interval`` holds the last interval's histogram deltas; without it the interval
    quantiles read ``nan``, as Envoy prints them for an interval with no samples.
    """
    pattern = _as_pattern(filter)
    lines = [f"{n}: {v}\n" for n, v in _numeric(stats, pattern, used_only)]
    for name, hist in _histograms(stats, pattern, used_only):
        if _hist_total(hist) <= 0:
            lines.append(f"{name}: No recorded values\n")
        else:
            lines.append(f"{name}: {_quantile_summary(name, hist, interval)}\n")
    return "".join(lines)


def render_json(
    stats: Stats,
    *,
    filter: re.Pattern[str] | str | None = None,
    used_only: bool = False,
    interval: Stats | None = None,
) -> dict[str, Any]:
    """Envoy's /stats?format=json, as a dict for ``json.dumps``.

    ``{"stats": [{"name", "value"}..., {"histograms": {"supported_quantiles": [...],
    "computed_quantiles": [{"name", "values": [{"cumulative", "interval"}...]}...]}}]}``;
    the histograms entry is there only when a histogram is printed, and a quantile with
    no samples is null. Parameters as for ``render_text``.
    """
    pattern = _as_pattern(filter)
    out: list[dict[str, Any]] = [
        {"name": n, "value": v} for n, v in _numeric(stats, pattern, used_only)
    ]
    hists = _histograms(stats, pattern, used_only)
    if hists:
        computed = []
        for name, hist in hists:
            cumulative = compute_quantiles(_bucket_counts(hist))
            intervals = _interval_quantiles(name, interval)
            computed.append({
                "name": name,
                "values": [
                    {"cumulative": _json_number(c), "interval": _json_number(i)}
                    for c, i in zip(cumulative, intervals, strict=True)
                ],
            })
        out.append({"histograms": {
            "supported_quantiles": [_json_number(100 * q) for q in SUPPORTED_QUANTILES],
            "computed_quantiles": computed,
        }})
    return {"stats": out}


# -- tag extraction (Envoy's well_known_names.cc) -----------------------------------------
# Envoy's expandRegex() shorthands.
_REGEX_MACROS = {
    # An IPv4 or bracketed IPv6 address, "_", a port.
    "<ADDRESS>": r"(?:(?:\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[[a-fA-F_\d]+\])_\d+)",
    "<CIPHER>": r"[\w-]+",
    "<TLS_VERSION>": r"TLSv\d\.\d",
    "<TAG_VALUE>": r"[^\.]+",
    # Route config names may hold dots and slashes (RE2's [\w-\./], escaped for Python).
    "<ROUTE_CONFIG_NAME>": r"[\w\-./]+",
    "<SCOPED_ROUTE_CONFIG_NAME>": r"[\w\-.]+",
    "<LISTENER_OR_CLUSTER_WITH_NAME>": r"(?:listener|cluster)\..*?",
    "<PROXY_PROTOCOL_VERSION>": r"\d",
}

# (tag name, regex, substring the name must hold, tag value that does not count), in
# Envoy's order: group 1 is removed from the name, group 2 (or else 1) is the value.
# Left out: dynamo, mongo, grpc bridge, clientssl, thrift, redis, dns filter, google grpc,
# sds and TLS certificate tags (filters trioxy does not have).
REGEX_EXTRACTORS: tuple[tuple[str, str, str, str], ...] = (
    # *_rq(_<response_code>)
    ("envoy.response_code", r"_rq(_(\d{3}))$", "_rq_", ""),
    # *_rq_(<response_code_class>)xx
    ("envoy.response_code_class", r"_rq_((\d))xx$", "_rq_", ""),
    # (http|tcp).<prefix>.response_flag.(<flag>): trioxy's counter per response flag
    ("envoy.response_flag", r"^(?:http|tcp)\.[^.]+\.response_flag(\.([A-Z]+))$",
     ".response_flag.", ""),
    # listener.[<address>.]ssl.ciphers.(<cipher>)
    ("envoy.ssl_cipher", r"^listener\..*?\.ssl\.ciphers(\.(<CIPHER>))$", ".ssl.ciphers.", ""),
    # (listener|cluster).[<name>.]ssl.curves.(<curve>)
    ("envoy.ssl_curve", r"^<LISTENER_OR_CLUSTER_WITH_NAME>\.ssl\.curves(\.(<CIPHER>))$",
     ".ssl.curves.", ""),
    # (listener|cluster).[<name>.]ssl.sigalgs.(<algorithm>)
    ("envoy.ssl_sigalg", r"^<LISTENER_OR_CLUSTER_WITH_NAME>\.ssl\.sigalgs(\.(<CIPHER>))$",
     ".ssl.sigalgs.", ""),
    # (listener|cluster).[<name>.]ssl.versions.(<version>)
    ("envoy.ssl_version",
     r"^<LISTENER_OR_CLUSTER_WITH_NAME>\.ssl\.versions(\.(<TLS_VERSION>))$",
     ".ssl.versions.", ""),
    # cluster.[<cluster_name>.]ssl.ciphers.(<cipher>)
    ("cipher_suite", r"^cluster\.<TAG_VALUE>\.ssl\.ciphers(\.(<CIPHER>))$", ".ssl.ciphers.", ""),
    # listener.[<address>.]http.(<stat_prefix>.)*
    ("envoy.http_conn_manager_prefix", r"^listener\..*?\.http\.((<TAG_VALUE>)\.)", ".http.", ""),
    # (listener.<address|stat_prefix>|server|listener_manager|...).(worker_<id>.)*
    ("envoy.worker_id",
     r"^(?:listener\.(?:<ADDRESS>|<TAG_VALUE>)|server|listener_manager"
     r"|thread_local_cluster_manager)\.worker_((\d+)\.)", "", ""),
    # listener.(<address|stat_prefix>.)*, but not the admin listener
    ("envoy.listener_address", r"^listener\.((<ADDRESS>|<TAG_VALUE>)\.)", "", "admin"),
    # http.[<stat_prefix>.]rds.(<route_config_name>.)<base_stat>
    ("envoy.rds_route_config", r"^http\.<TAG_VALUE>\.rds\.((<ROUTE_CONFIG_NAME>)\.)\w+?$",
     ".rds.", ""),
    # http.[<stat_prefix>.]scoped_rds.(<scoped_route_config_name>.)<base_stat>
    ("envoy.scoped_rds_config",
     r"^http\.<TAG_VALUE>\.scoped_rds\.((<SCOPED_ROUTE_CONFIG_NAME>)\.)\w+?$",
     ".scoped_rds.", ""),
    # http.[<stat_prefix>.]rbac.[<rules_prefix>.]policy.(<policy>.)(allowed|...)
    ("envoy.rbac_policy_name",
     r"^http\.<TAG_VALUE>\.rbac\.(?:<TAG_VALUE>\.)?policy\.((<TAG_VALUE>)\.)"
     r"(allowed|shadow_allowed|denied|shadow_denied)$", "", ""),
    # http.<stat_prefix>.rbac.(<rules_stat_prefix>.)* but not policy.
    ("envoy.rbac_http_prefix", r"^http\.<TAG_VALUE>\.rbac\.((<TAG_VALUE>)\.).*?", "", "policy"),
    # proxy_proto.(<stat_prefix>.)**
    ("envoy.proxy_protocol_prefix", r"^proxy_proto\.((<TAG_VALUE>)\.).+$", "", "versions"),
    # proxy_proto.([<stat_prefix>.]versions.v(<version>).)(found|disallowed|error)
    ("envoy.proxy_protocol_version",
     r"^proxy_proto\.((?:<TAG_VALUE>\.)?versions\.v(<PROXY_PROTOCOL_VERSION>)\.)\w+$", "", ""),
)

# (tag name, dotted pattern) in Envoy's order: ``$`` is the value (one token, removed with
# a dot), ``*`` any one token, ``**`` any tokens (at least one at the end of a pattern).
TOKEN_EXTRACTORS: tuple[tuple[str, str], ...] = (
    ("envoy.http_user_agent", "http.*.user_agent.$.**"),
    ("envoy.virtual_cluster", "vhost.*.vcluster.$.**"),
    ("envoy.fault_downstream_cluster", "http.*.fault.$.**"),
    ("envoy.tcp_prefix", "tcp.$.**"),
    ("envoy.udp_prefix", "udp.$.**"),
    ("envoy.ratelimit_prefix", "ratelimit.$.**"),
    ("envoy.cluster_name", "cluster.$.**"),
    ("envoy.ext_authz_prefix", "cluster.*.ext_authz.$.**"),
    ("envoy.ext_authz_prefix", "http.*.ext_authz.$.**"),
    ("envoy.http_conn_manager_prefix", "http.$.**"),
    ("envoy.virtual_host", "vhost.$.**"),
    ("envoy.route", "vhost.*.route.$.**"),
    ("envoy.local_http_ratelimit_prefix", "$.http_local_rate_limit.**"),
    ("envoy.local_network_ratelimit_prefix", "local_rate_limit.$.**"),
    ("envoy.local_listener_ratelimit_prefix", "listener_local_ratelimit.$.**"),
    ("envoy.connection_limit_prefix", "connection_limit.$.**"),
    ("envoy.rbac_prefix", "$.rbac.**"),
)


def _expand(regex: str) -> str:
    for macro, body in _REGEX_MACROS.items():
        regex = regex.replace(macro, body)
    return regex


def _regex_prefix(regex: str) -> str:
    """Envoy's ``extractRegexPrefix``: the literal first token of a ``^word\\.`` regex."""
    if not regex.startswith("^"):
        return ""
    for i in range(1, len(regex)):
        ch = regex[i]
        if not (ch.isascii() and (ch.isalnum() or ch == "_")):
            if i > 1:
                rest = regex[i:]
                last = i == len(regex) - 1
                if (not last and (rest.startswith("\\.") or rest.startswith("(?=\\."))) or (
                        last and ch == "$"):
                    return regex[1:i]
            return ""
    return ""


@dataclass(frozen=True, slots=True)
class _RegexExtractor:
    name: str
    regex: re.Pattern[str]
    substr: str
    negative: str

    def extract(self, stat: str) -> tuple[str, int, int] | None:
        """(value, start, end of the part to remove), or None."""
        if self.substr and self.substr not in stat:
            return None
        m = self.regex.search(stat)
        if m is None or not m.group(1):
            return None
        value = (m.group(2) if m.re.groups >= 2 else None) or m.group(1)
        if self.negative and value == self.negative:
            return None
        return value, m.start(1), m.end(1)


@dataclass(frozen=True, slots=True)
class _TokenExtractor:
    name: str
    tokens: tuple[str, ...]
    match_index: int

    def extract(self, stat: str) -> tuple[str, int, int] | None:
        parts = stat.split(".")
        found = self._search(parts, 0, 0, 0, None)
        if found is None:
            return None
        start, index = found
        value = parts[index]
        end = start + len(value)
        # Take the dot after the value, or before it when the value is the last token.
        if index < len(parts) - 1:
            end += 1
        elif start > 0:
            start -= 1
        return value, start, end

    def _search(
        self, parts: list[str], ti: int, pi: int, ci: int, found: tuple[int, int] | None
    ) -> tuple[int, int] | None:
        """Envoy's ``TagExtractorTokensImpl::searchTags``: whether ``parts[ti:]`` match
        ``tokens[pi:]``; on a match, the value's (char index, token index)."""
        pattern = self.tokens
        while ti < len(parts) and pi < len(pattern):
            if pi == self.match_index:
                found = (ci, ti)
            elif pattern[pi] == "**":
                if pi == len(pattern) - 1:
                    return found  # a trailing "**" takes the rest (one token or more)
                # "**" inside a pattern: try the rest of the pattern at every later token.
                for start in range(ti, len(parts)):
                    hit = self._search(parts, start, pi + 1, ci, found)
                    if hit is not None:
                        return hit
                    ci += len(parts[start]) + 1
                return None
            elif pattern[pi] != "*" and pattern[pi] != parts[ti]:
                return None
            ci += len(parts[ti]) + 1
            ti += 1
            pi += 1
        return found if pi == len(pattern) and ti == len(parts) else None


_Extractor = _RegexExtractor | _TokenExtractor


def _build_extractors() -> tuple[tuple[_Extractor, ...], dict[str, tuple[_Extractor, ...]]]:
    """Envoy's TagProducerImpl layout: extractors with no first-token prefix (tried on
    every name), and the rest keyed by that prefix; regex ones before tokenized ones."""
    unprefixed: list[_Extractor] = []
    by_prefix: dict[str, list[_Extractor]] = {}

    def add(prefix: str, ex: _Extractor) -> None:
        (by_prefix.setdefault(prefix, []) if prefix else unprefixed).append(ex)

    for name, regex, substr, negative in REGEX_EXTRACTORS:
        expanded = _expand(regex)
        add(_regex_prefix(expanded),
            _RegexExtractor(name, re.compile(expanded, re.ASCII), substr, negative))
    for name, pattern in TOKEN_EXTRACTORS:
        tokens = tuple(pattern.split("."))
        first = tokens[0]
        add("" if first in ("$", "*", "**") else first,
            _TokenExtractor(name, tokens, tokens.index("$")))
    return tuple(unprefixed), {k: tuple(v) for k, v in by_prefix.items()}


_UNPREFIXED, _BY_PREFIX = _build_extractors()


@functools.lru_cache(maxsize=1 << 16)
def extract_tags(name: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Envoy's default tag extraction: (tag-extracted name, ((tag name, value), ...))."""
    first = name.split(".", 1)[0] if "." in name else None
    candidates: Iterable[_Extractor] = _UNPREFIXED
    if first is not None and first in _BY_PREFIX:
        candidates = (*_UNPREFIXED, *_BY_PREFIX[first])
    tags: list[tuple[str, str]] = []
    removed: list[tuple[int, int]] = []
    seen: set[str] = set()
    for ex in candidates:
        if ex.name in seen:
            continue  # a second extractor for a tag already found (two http prefixes)
        hit = ex.extract(name)
        if hit is None:
            continue
        value, start, end = hit
        seen.add(ex.name)
        tags.append((ex.name, value))
        removed.append((start, end))
    if not removed:
        return name, ()
    keep = bytearray(b"\x01") * len(name)
    for start, end in removed:
        keep[start:end] = bytes(end - start)
    return "".join(c for c, k in zip(name, keep, strict=True) if k), tuple(tags)


# -- /stats/prometheus --------------------------------------------------------------------
_INVALID_NAME_CHAR = re.compile(r"[^a-zA-Z0-9_]")


def _sanitize_name(name: str) -> str:
    """Envoy's ``sanitizeName``: anything outside [a-zA-Z0-9_] becomes ``_``."""
    return _INVALID_NAME_CHAR.sub("_", name)


def _escape_value(value: str) -> str:
    """Envoy's ``sanitizeValue`` (the exposition format's label value escapes)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@functools.lru_cache(maxsize=1 << 16)
def _series(name: str) -> tuple[str, str]:
    """(family name, formatted labels without braces) of one stat name."""
    extracted, tags = extract_tags(name)
    labels = ",".join(f'{_sanitize_name(k)}="{_escape_value(v)}"' for k, v in tags)
    return "envoy_" + _sanitize_name(extracted), labels


def _fmt_le(bound: float) -> str:
    # Envoy prints bounds with {:.32g}: fixed point for every default bound (3600000).
    return format(float(bound), ".32g")


def _group(names: Iterable[str]) -> list[tuple[str, list[tuple[str, str]]]]:
    """Stat names by family, families sorted, series in a family sorted by stat name."""
    families: dict[str, list[tuple[str, str]]] = {}
    for name in names:
        family, labels = _series(name)
        families.setdefault(family, []).append((name, labels))
    return [(f, sorted(families[f])) for f in sorted(families)]


def render_prometheus(
    stats: Stats,
    *,
    filter: re.Pattern[str] | str | None = None,
    used_only: bool = False,
) -> str:
    """Envoy's /stats/prometheus (text exposition format 0.0.4).

    Names go through Envoy's default tag extraction and get the ``envoy_`` prefix;
    counters keep Envoy's names (no ``_total`` added). ``filter`` is matched against the
    stat name before extraction, as Envoy does; ``used_only`` as for ``render_text``. A
    family name that one type already used is left out of a later type's block (two TYPE
    lines for one name would make Prometheus drop the whole scrape).
    """
    pattern = _as_pattern(filter)

    def shown(name: str, used: bool) -> bool:
        return (used or not used_only) and (pattern is None or bool(pattern.search(name)))

    out: list[str] = []
    taken: set[str] = set()
    counters = [n for n, v in stats.counters.items() if shown(n, v != 0)]
    gauges = [n for n, v in stats.gauges.items() if shown(n, v != 0)]
    overflow = stats.overflow if shown(OVERFLOW_STAT, stats.overflow != 0) else 0
    if overflow:
        gauges.append(OVERFLOW_STAT)
    values: dict[str, int] = {**stats.gauges, OVERFLOW_STAT: overflow}
    for kind, names, source in (
        ("counter", counters, stats.counters),
        ("gauge", gauges, values),
    ):
        for family, series in _group(names):
            if family in taken:
                continue
            taken.add(family)
            out.append(f"# TYPE {family} {kind}\n")
            out.extend(f"{family}{{{labels}}} {source[name]}\n" for name, labels in series)
            out.append("\n")
    hists = [n for n, h in stats.histograms.items() if shown(n, _hist_total(h) > 0)]
    for family, series in _group(hists):
        if family in taken:
            continue
        taken.add(family)
        out.append(f"# TYPE {family} histogram\n")
        for name, labels in series:
            hist = stats.histograms[name]
            counts = _bucket_counts(hist)
            total = _hist_total(hist)
            prefix = f"{labels}," if labels else ""
            cumulative = 0
            for bound, count in zip(BUCKET_BOUNDS, counts, strict=False):
                cumulative += count
                out.append(f'{family}_bucket{{{prefix}le="{_fmt_le(bound)}"}} {cumulative}\n')
            out.append(f'{family}_bucket{{{prefix}le="+Inf"}} {total}\n')
            out.append(f"{family}_sum{{{labels}}} {format(float(hist[1]), '.32g')}\n")
            out.append(f"{family}_count{{{labels}}} {total}\n")
        out.append("\n")
    return "".join(out)
