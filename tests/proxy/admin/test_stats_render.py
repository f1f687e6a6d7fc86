"""Envoy's /stats, /stats?format=json and /stats/prometheus bodies (pure: no I/O)."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from proxy.admin.stats_render import (
    SUPPORTED_QUANTILES,
    StatsQueryError,
    compile_filter,
    compute_quantiles,
    extract_tags,
    render_json,
    render_prometheus,
    render_text,
)
from shm.layout import BUCKET_BOUNDS, BUCKETS
from shm.stats_block import Stats

QUANTILE_LABELS = ["P0", "P25", "P50", "P75", "P90", "P95", "P99", "P99.5", "P99.9", "P100"]


def one_bucket(index: int, n: int) -> list[int]:
    counts = [0] * BUCKETS
    counts[index] = n
    return counts


def sample_stats() -> Stats:
    return Stats(
        counters={
            "cluster.backend.upstream_rq_200": 5,
            "cluster.backend.upstream_rq_503": 1,
            "cluster.backend.upstream_rq_total": 6,
            "http.ingress_http.downstream_rq_2xx": 5,
            "http.ingress_http.downstream_rq_5xx": 0,
        },
        gauges={
            "server.uptime": 12,
            "listener.127.0.0.1_10000.downstream_cx_active": 2,
            "cluster.backend.upstream_cx_active": 0,
        },
        histograms={
            "cluster.backend.upstream_rq_time": (one_bucket(2, 4), 12.0, 4),
            "http.ingress_http.downstream_rq_time": ([0] * BUCKETS, 0.0, 0),
        },
    )


# -- filter= ------------------------------------------------------------------------------
def test_no_filter_is_none() -> None:
    assert compile_filter(None) is None
    assert compile_filter("") is None


def test_filter_matches_anywhere_in_the_name() -> None:
    f = compile_filter("upstream_rq_2")
    assert f is not None
    assert f.search("cluster.backend.upstream_rq_200")
    assert not f.search("cluster.backend.upstream_rq_503")


@pytest.mark.parametrize("bad", ["(", "[a-", "*x", "a{2,1}"])
def test_invalid_filter_is_a_query_error(bad: str) -> None:
    with pytest.raises(StatsQueryError, match=re.escape(f"invalid regex in filter={bad}: ")):
        compile_filter(bad)


def test_query_error_is_a_value_error() -> None:
    assert issubclass(StatsQueryError, ValueError)


def test_renderers_compile_a_string_filter() -> None:
    stats = sample_stats()
    assert render_text(stats, filter="uptime") == "server.uptime: 12\n"
    with pytest.raises(StatsQueryError):
        render_text(stats, filter="(")
    with pytest.raises(StatsQueryError):
        render_json(stats, filter="(")
    with pytest.raises(StatsQueryError):
        render_prometheus(stats, filter="(")


# -- /stats -------------------------------------------------------------------------------
def test_text_counters_and_gauges_sorted_together_then_histograms() -> None:
    text = render_text(sample_stats())
    assert text == (
        "cluster.backend.upstream_cx_active: 0\n"
        "cluster.backend.upstream_rq_200: 5\n"
        "cluster.backend.upstream_rq_503: 1\n"
        "cluster.backend.upstream_rq_total: 6\n"
        "http.ingress_http.downstream_rq_2xx: 5\n"
        "http.ingress_http.downstream_rq_5xx: 0\n"
        "listener.127.0.0.1_10000.downstream_cx_active: 2\n"
        "server.uptime: 12\n"
        "cluster.backend.upstream_rq_time: P0(nan,1) P25(nan,2) P50(nan,3) P75(nan,4) "
        "P90(nan,4.6) P95(nan,4.8) P99(nan,4.96) P99.5(nan,4.98) P99.9(nan,4.996) P100(nan,5)\n"
        "http.ingress_http.downstream_rq_time: No recorded values\n"
    )


def test_text_interval_quantiles() -> None:
    stats = Stats(histograms={"h": (one_bucket(2, 4), 12.0, 4)})
    interval = Stats(histograms={"h": (one_bucket(0, 1), 0.2, 1)})
    assert render_text(stats, interval=interval) == (
        "h: P0(0,1) P25(0.125,2) P50(0.25,3) P75(0.375,4) P90(0.45,4.6) P95(0.475,4.8) "
        "P99(0.495,4.96) P99.5(0.4975,4.98) P99.9(0.4995,4.996) P100(0.5,5)\n"
    )


def test_text_interval_without_samples_is_nan() -> None:
    stats = Stats(histograms={"h": (one_bucket(2, 4), 12.0, 4)})
    for interval in (Stats(), Stats(histograms={"h": ([0] * BUCKETS, 0.0, 0)})):
        line = render_text(stats, interval=interval)
        assert line.startswith("h: P0(nan,1) ") and line.endswith(" P100(nan,5)\n")


def test_text_quantile_labels() -> None:
    line = render_text(Stats(histograms={"h": (one_bucket(5, 1), 30.0, 1)}))
    assert re.findall(r"(P[\d.]+)\(", line) == QUANTILE_LABELS


def test_text_integral_values_print_without_fraction() -> None:
    line = render_text(Stats(histograms={"h": (one_bucket(BUCKETS - 1, 2), 1e7, 2)}))
    assert line == "h: " + " ".join(f"{p}(nan,3600000)" for p in QUANTILE_LABELS) + "\n"


def test_text_overflow_line() -> None:
    stats = Stats(counters={"a": 1, "z": 2}, overflow=3)
    assert render_text(stats) == "a: 1\nstats.overflow: 3\nz: 2\n"
    assert render_text(Stats(counters={"a": 1})) == "a: 1\n"


def test_text_used_only() -> None:
    text = render_text(sample_stats(), used_only=True)
    assert "upstream_cx_active: 0" not in text
    assert "downstream_rq_5xx" not in text
    assert "No recorded values" not in text
    assert "cluster.backend.upstream_rq_200: 5\n" in text
    assert "cluster.backend.upstream_rq_time: P0(" in text


def test_text_filter() -> None:
    text = render_text(sample_stats(), filter=compile_filter(r"^cluster\.backend\.upstream_rq"))
    assert [line.split(":")[0] for line in text.splitlines()] == [
        "cluster.backend.upstream_rq_200",
        "cluster.backend.upstream_rq_503",
        "cluster.backend.upstream_rq_total",
        "cluster.backend.upstream_rq_time",
    ]


def test_text_empty() -> None:
    assert render_text(Stats()) == ""


def test_renderers_do_not_modify_their_input() -> None:
    stats = sample_stats()
    before = copy.deepcopy(stats)
    render_text(stats, interval=stats)
    render_json(stats, interval=stats)
    render_prometheus(stats)
    assert stats == before


# -- quantiles ----------------------------------------------------------------------------
def test_quantiles_without_samples_are_nan() -> None:
    assert all(math.isnan(q) for q in compute_quantiles([0] * BUCKETS))


@pytest.mark.parametrize("index", range(len(BUCKET_BOUNDS)))
def test_quantiles_of_one_bucket_interpolate_within_it(index: int) -> None:
    lo = BUCKET_BOUNDS[index - 1] if index else 0.0
    hi = BUCKET_BOUNDS[index]
    qs = compute_quantiles(one_bucket(index, 10))
    assert qs[0] == lo
    assert qs[-1] == hi
    for q, value in zip(SUPPORTED_QUANTILES, qs, strict=True):
        assert value == pytest.approx(lo + (hi - lo) * q)


def test_quantiles_above_every_bound_read_the_last_bound() -> None:
    qs = compute_quantiles(one_bucket(BUCKETS - 1, 3))
    assert qs == [float(BUCKET_BOUNDS[-1])] * len(SUPPORTED_QUANTILES)


def test_quantiles_skip_empty_buckets() -> None:
    counts = [0] * BUCKETS
    counts[1] = 1  # (0.5, 1]
    counts[8] = 1  # (250, 500]
    qs = compute_quantiles(counts)
    assert qs[0] == 0.5  # the first non-empty bucket's lower edge
    assert qs[2] == 1  # P50: exactly the first sample's bucket top
    assert qs[-1] == 500
    assert all(not 1 < q <= 250 for q in qs)  # nothing lands in the empty buckets


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 10**9), min_size=BUCKETS, max_size=BUCKETS))
def test_quantiles_are_monotonic_and_bracket_the_samples(counts: list[int]) -> None:
    qs = compute_quantiles(counts)
    if sum(counts) == 0:
        assert all(math.isnan(q) for q in qs)
        return
    assert qs == sorted(qs)
    first = next(i for i, c in enumerate(counts) if c)
    last = max(i for i, c in enumerate(counts) if c)
    lo = BUCKET_BOUNDS[first - 1] if first else 0.0
    hi = BUCKET_BOUNDS[min(last, len(BUCKET_BOUNDS) - 1)]
    assert all(lo <= q <= hi for q in qs)
    assert 0 <= qs[0] and qs[-1] <= BUCKET_BOUNDS[-1]


# -- /stats?format=json -------------------------------------------------------------------
def test_json_shape() -> None:
    stats = Stats(
        counters={"c": 1},
        gauges={"a": 2},
        histograms={"h": (one_bucket(2, 4), 12.0, 4), "u": ([0] * BUCKETS, 0.0, 0)},
        overflow=1,
    )
    interval = Stats(histograms={"h": (one_bucket(0, 1), 0.2, 1)})
    body = render_json(stats, interval=interval)
    cumulative = [1, 2, 3, 4, 4.6, 4.8, 4.96, 4.98, 4.996, 5]
    intervals = [0, 0.125, 0.25, 0.375, 0.45, 0.475, 0.495, 0.4975, 0.4995, 0.5]
    assert body == {"stats": [
        {"name": "a", "value": 2},
        {"name": "c", "value": 1},
        {"name": "stats.overflow", "value": 1},
        {"histograms": {
            "supported_quantiles": [0, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 100],
            "computed_quantiles": [
                {"name": "h", "values": [
                    {"cumulative": c, "interval": i}
                    for c, i in zip(cumulative, intervals, strict=True)
                ]},
                {"name": "u", "values": [{"cumulative": None, "interval": None}] * 10},
            ],
        }},
    ]}
    text = json.dumps(body, allow_nan=False)
    assert '"supported_quantiles": [0, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 100]' in text
    assert '{"cumulative": 1, "interval": 0}' in text  # %g: no "1.0"


def test_json_values_have_six_significant_digits() -> None:
    counts = [0] * BUCKETS
    counts[3], counts[5] = 4, 1  # (5, 10] and (25, 50]
    stats = Stats(histograms={"h": (counts, 60.0, 5)})
    # Text prints fmt's shortest round trip, JSON Envoy's Json::Streamer::number ("%g").
    assert " P99.5(nan,49.37499999999999) " in render_text(stats)
    values = render_json(stats)["stats"][0]["histograms"]["computed_quantiles"][0]["values"]
    assert values[7] == {"cumulative": 49.375, "interval": None}


def test_json_without_histograms_has_no_histograms_entry() -> None:
    assert render_json(Stats(counters={"a": 1})) == {"stats": [{"name": "a", "value": 1}]}
    stats = Stats(counters={"a": 1}, histograms={"h": ([0] * BUCKETS, 0.0, 0)})
    assert render_json(stats, used_only=True) == {"stats": [{"name": "a", "value": 1}]}
    assert render_json(stats, filter=compile_filter("^a$")) == {
        "stats": [{"name": "a", "value": 1}]}


def test_json_used_only_and_filter() -> None:
    body = render_json(sample_stats(), used_only=True, filter=compile_filter("backend"))
    names = [e["name"] for e in body["stats"] if "name" in e]
    assert names == [
        "cluster.backend.upstream_rq_200",
        "cluster.backend.upstream_rq_503",
        "cluster.backend.upstream_rq_total",
    ]
    computed = body["stats"][-1]["histograms"]["computed_quantiles"]
    assert [h["name"] for h in computed] == ["cluster.backend.upstream_rq_time"]


# -- tag extraction -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("stat", "family", "labels"),
    [
        ("cluster.backend.upstream_rq_total", "envoy_cluster_upstream_rq_total",
         'envoy_cluster_name="backend"'),
        ("cluster.backend.upstream_rq_200", "envoy_cluster_upstream_rq",
         'envoy_response_code="200",envoy_cluster_name="backend"'),
        ("cluster.backend.upstream_rq_2xx", "envoy_cluster_upstream_rq_xx",
         'envoy_response_code_class="2",envoy_cluster_name="backend"'),
        ("http.ingress_http.downstream_rq_2xx", "envoy_http_downstream_rq_xx",
         'envoy_response_code_class="2",envoy_http_conn_manager_prefix="ingress_http"'),
        ("listener.127.0.0.1_10000.downstream_cx_total", "envoy_listener_downstream_cx_total",
         'envoy_listener_address="127.0.0.1_10000"'),
        ("tcp.ingress_tcp.downstream_cx_total", "envoy_tcp_downstream_cx_total",
         'envoy_tcp_prefix="ingress_tcp"'),
        ("server.uptime", "envoy_server_uptime", ""),
        # The admin listener keeps its name (Envoy's negative match on "admin").
        ("listener.admin.downstream_cx_total", "envoy_listener_admin_downstream_cx_total", ""),
        ("listener.admin.http.admin.downstream_rq_2xx", "envoy_listener_admin_http_downstream_rq_xx",
         'envoy_response_code_class="2",envoy_http_conn_manager_prefix="admin"'),
        ("listener.[::1]_10000.downstream_cx_total", "envoy_listener_downstream_cx_total",
         'envoy_listener_address="[::1]_10000"'),
        ("listener.ingress.downstream_cx_total", "envoy_listener_downstream_cx_total",
         'envoy_listener_address="ingress"'),
        ("listener.127.0.0.1_10000.worker_3.downstream_cx_total",
         "envoy_listener_worker_downstream_cx_total",
         'envoy_worker_id="3",envoy_listener_address="127.0.0.1_10000"'),
        ("listener_manager.worker_0.dispatcher_loop_duration_us",
         "envoy_listener_manager_worker_dispatcher_loop_duration_us", 'envoy_worker_id="0"'),
        ("server.worker_1.watchdog_miss", "envoy_server_worker_watchdog_miss",
         'envoy_worker_id="1"'),
        ("http.ingress_http.rds.local.route.config_reload", "envoy_http_rds_config_reload",
         'envoy_rds_route_config="local.route",envoy_http_conn_manager_prefix="ingress_http"'),
        ("http.ingress_http.user_agent.ios.downstream_rq_total",
         "envoy_http_user_agent_downstream_rq_total",
         'envoy_http_user_agent="ios",envoy_http_conn_manager_prefix="ingress_http"'),
        ("vhost.local.vcluster.other.upstream_rq_200", "envoy_vhost_vcluster_upstream_rq",
         'envoy_response_code="200",envoy_virtual_cluster="other",envoy_virtual_host="local"'),
        ("http.hcm.rbac.allowed", "envoy_http_rbac_allowed",
         'envoy_http_conn_manager_prefix="hcm"'),
        ("http.hcm.rbac.policy.p1.denied", "envoy_http_rbac_policy_denied",
         'envoy_rbac_policy_name="p1",envoy_http_conn_manager_prefix="hcm"'),
        ("net.rbac.allowed", "envoy_rbac_allowed", 'envoy_rbac_prefix="net"'),
        ("cluster.authz.ext_authz.ea.ok", "envoy_cluster_ext_authz_ok",
         'envoy_cluster_name="authz",envoy_ext_authz_prefix="ea"'),
        ("http.hcm.ext_authz.ea.denied", "envoy_http_ext_authz_denied",
         'envoy_ext_authz_prefix="ea",envoy_http_conn_manager_prefix="hcm"'),
        ("cluster.backend.ssl.ciphers.ECDHE-RSA-AES128-GCM-SHA256", "envoy_cluster_ssl_ciphers",
         'cipher_suite="ECDHE-RSA-AES128-GCM-SHA256",envoy_cluster_name="backend"'),
        ("listener.0.0.0.0_443.ssl.versions.TLSv1.3", "envoy_listener_ssl_versions",
         'envoy_ssl_version="TLSv1.3",envoy_listener_address="0.0.0.0_443"'),
        # Too short for "cluster.$.**": no tag, and the name is only sanitized.
        ("cluster.x", "envoy_cluster_x", ""),
        ("odd-name:with.chars", "envoy_odd_name_with_chars", ""),
    ],
)
def test_tag_extraction(stat: str, family: str, labels: str) -> None:
    text = render_prometheus(Stats(counters={stat: 7}))
    assert text == f"# TYPE {family} counter\n{family}{{{labels}}} 7\n\n"


def test_extract_tags_returns_the_tag_extracted_name() -> None:
    assert extract_tags("cluster.backend.upstream_rq_200") == (
        "cluster.upstream_rq",
        (("envoy.response_code", "200"), ("envoy.cluster_name", "backend")),
    )
    assert extract_tags("server.uptime") == ("server.uptime", ())


# -- /stats/prometheus --------------------------------------------------------------------
def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Sample (name, labels) -> value. prometheus_client's parser names a counter's samples
    ``<family>_total`` unless the name already ends so (it models OpenMetrics); Envoy's
    exposition does not append it, and the classic text format does not ask for it."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def type_lines(text: str) -> list[tuple[str, str]]:
    return [tuple(line.split()[2:4]) for line in text.splitlines() if line.startswith("# TYPE ")]


def assert_families_grouped(text: str) -> None:
    """One TYPE line per family, and every sample under its family's TYPE line."""
    names = [name for name, _ in type_lines(text)]
    assert len(names) == len(set(names))
    current = None
    kinds = dict(type_lines(text))
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            current = line.split()[2]
        elif line:
            assert current is not None
            sample = line.split("{", 1)[0]
            suffixes = ("_bucket", "_sum", "_count") if kinds[current] == "histogram" else ("",)
            assert any(sample == current + s for s in suffixes), (sample, current)


def test_prometheus_several_stat_names_fold_into_one_family() -> None:
    stats = Stats(counters={
        "cluster.a.upstream_rq_200": 1,
        "cluster.b.upstream_rq_200": 2,
        "cluster.a.upstream_rq_503": 3,
        "cluster.a.upstream_rq_total": 4,
    })
    text = render_prometheus(stats)
    assert text == (
        "# TYPE envoy_cluster_upstream_rq counter\n"
        'envoy_cluster_upstream_rq{envoy_response_code="200",envoy_cluster_name="a"} 1\n'
        'envoy_cluster_upstream_rq{envoy_response_code="503",envoy_cluster_name="a"} 3\n'
        'envoy_cluster_upstream_rq{envoy_response_code="200",envoy_cluster_name="b"} 2\n'
        "\n"
        "# TYPE envoy_cluster_upstream_rq_total counter\n"
        'envoy_cluster_upstream_rq_total{envoy_cluster_name="a"} 4\n'
        "\n"
    )
    assert_families_grouped(text)


def test_prometheus_type_blocks_in_envoy_order() -> None:
    text = render_prometheus(sample_stats())
    assert type_lines(text) == [
        ("envoy_cluster_upstream_rq", "counter"),
        ("envoy_cluster_upstream_rq_total", "counter"),
        ("envoy_http_downstream_rq_xx", "counter"),
        ("envoy_cluster_upstream_cx_active", "gauge"),
        ("envoy_listener_downstream_cx_active", "gauge"),
        ("envoy_server_uptime", "gauge"),
        ("envoy_cluster_upstream_rq_time", "histogram"),
        ("envoy_http_downstream_rq_time", "histogram"),
    ]
    assert_families_grouped(text)


def test_prometheus_parses_back_to_the_inputs() -> None:
    stats = sample_stats()
    samples = parse(render_prometheus(stats))
    backend = ("envoy_cluster_name", "backend")
    assert samples[("envoy_cluster_upstream_rq_total",
                    frozenset({("envoy_response_code", "200"), backend}))] == 5
    assert samples[("envoy_cluster_upstream_rq_total", frozenset({backend}))] == 6
    assert samples[("envoy_server_uptime", frozenset())] == 12
    assert samples[("envoy_listener_downstream_cx_active",
                    frozenset({("envoy_listener_address", "127.0.0.1_10000")}))] == 2
    le = {k[1]: v for k, v in samples.items() if k[0] == "envoy_cluster_upstream_rq_time_bucket"}
    assert le[frozenset({backend, ("le", "1")})] == 0
    assert le[frozenset({backend, ("le", "5")})] == 4
    assert le[frozenset({backend, ("le", "3600000")})] == 4
    assert le[frozenset({backend, ("le", "+Inf")})] == 4
    assert samples[("envoy_cluster_upstream_rq_time_sum", frozenset({backend}))] == 12.0
    assert samples[("envoy_cluster_upstream_rq_time_count", frozenset({backend}))] == 4


def test_prometheus_histogram_lines() -> None:
    counts = [0] * BUCKETS
    counts[0], counts[3], counts[BUCKETS - 1] = 1, 2, 1
    text = render_prometheus(Stats(histograms={"server.h": (counts, 0.1, 4)}))
    les = ["0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000",
           "10000", "30000", "60000", "300000", "600000", "1800000", "3600000"]
    cumulative = [1, 1, 1, 3] + [3] * 15
    assert text == (
        "# TYPE envoy_server_h histogram\n"
        + "".join(f'envoy_server_h_bucket{{le="{le}"}} {c}\n'
                  for le, c in zip(les, cumulative, strict=True))
        + 'envoy_server_h_bucket{le="+Inf"} 4\n'
        + "envoy_server_h_sum{} 0.10000000000000000555111512312578\n"  # Envoy's {:.32g}
        + "envoy_server_h_count{} 4\n\n"
    )


def test_prometheus_histogram_inf_never_below_the_buckets() -> None:
    # A read racing a flush: the counts are one flush ahead of the count.
    text = render_prometheus(Stats(histograms={"h": (one_bucket(2, 5), 10.0, 4)}))
    samples = parse(text)
    assert samples[("envoy_h_bucket", frozenset({("le", "+Inf")}))] == 5
    assert samples[("envoy_h_count", frozenset())] == 5


def test_prometheus_label_values_are_escaped() -> None:
    name = 'cluster.a"b\\c\nd.upstream_cx_total'
    text = render_prometheus(Stats(counters={name: 1}))
    assert text == (
        "# TYPE envoy_cluster_upstream_cx_total counter\n"
        'envoy_cluster_upstream_cx_total{envoy_cluster_name="a\\"b\\\\c\\nd"} 1\n\n'
    )
    assert parse(text) == {
        ("envoy_cluster_upstream_cx_total", frozenset({("envoy_cluster_name", 'a"b\\c\nd')})): 1
    }


def test_prometheus_used_only_and_filter() -> None:
    stats = sample_stats()
    text = render_prometheus(stats, used_only=True)
    assert "envoy_cluster_upstream_cx_active" not in text
    assert 'envoy_response_code_class="5"' not in text
    assert "envoy_http_downstream_rq_time" not in text
    assert "envoy_cluster_upstream_rq_time_count" in text
    # filter= sees the stat name before tag extraction, as in Envoy.
    text = render_prometheus(stats, filter=compile_filter(r"^cluster\.backend\.upstream_rq_\d"))
    assert type_lines(text) == [("envoy_cluster_upstream_rq", "counter")]


def test_prometheus_overflow_is_a_gauge() -> None:
    text = render_prometheus(Stats(overflow=2))
    assert text == "# TYPE envoy_stats_overflow gauge\nenvoy_stats_overflow{} 2\n\n"
    assert render_prometheus(Stats()) == ""


def test_prometheus_a_family_name_has_one_type() -> None:
    # "a.b" and "a_b" both sanitize to envoy_a_b: one family, one TYPE line ...
    text = render_prometheus(Stats(counters={"a.b": 1, "a_b": 2}))
    assert type_lines(text) == [("envoy_a_b", "counter")]
    # ... and a gauge cannot reuse a counter's family name (two TYPE lines break a scrape).
    text = render_prometheus(Stats(counters={"x.y": 1}, gauges={"x_y": 2}))
    assert text == "# TYPE envoy_x_y counter\nenvoy_x_y{} 1\n\n"


cluster_names = st.text(
    alphabet=st.sampled_from('abcXYZ019_-:"\\\né'), min_size=1, max_size=8
)
counter_names = st.one_of(
    st.builds("cluster.{}.upstream_rq_{}".format, cluster_names, st.sampled_from(
        ["200", "404", "503", "2xx", "5xx", "total"])),
    st.builds("http.{}.downstream_rq_{}".format, cluster_names, st.sampled_from(
        ["200", "2xx", "total"])),
    st.builds("tcp.{}.downstream_cx_total".format, cluster_names),
)
gauge_names = st.one_of(
    st.builds("listener.{}.downstream_cx_active".format, cluster_names),
    st.builds("cluster.{}.upstream_cx_active".format, cluster_names),
    st.sampled_from(["server.uptime", "server.live", "server.total_connections"]),
)
hist_names = st.builds("cluster.{}.upstream_rq_time".format, cluster_names)
hist_values = st.builds(
    lambda counts, s: (counts, s, sum(counts)),
    st.lists(st.integers(0, 10**12), min_size=BUCKETS, max_size=BUCKETS),
    st.floats(0, 1e15, allow_nan=False),
)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(counter_names, st.integers(0, 2**64 - 1), max_size=12),
    st.dictionaries(gauge_names, st.integers(0, 2**63), max_size=8),
    st.dictionaries(hist_names, hist_values, max_size=4),
)
def test_prometheus_round_trip(
    counters: dict[str, int], gauges: dict[str, int], histograms: dict
) -> None:
    stats = Stats(counters=counters, gauges=gauges, histograms=histograms)
    text = render_prometheus(stats)
    assert_families_grouped(text)
    samples = parse(text)

    def labels(name: str) -> frozenset[tuple[str, str]]:
        return frozenset((k.replace(".", "_"), v) for k, v in extract_tags(name)[1])

    def family(name: str) -> str:
        return "envoy_" + re.sub(r"[^a-zA-Z0-9_]", "_", extract_tags(name)[0])

    expected = {}
    for name, value in counters.items():
        fam = family(name)
        expected[(fam if fam.endswith("_total") else fam + "_total", labels(name))] = value
    for name, value in gauges.items():
        expected[(family(name), labels(name))] = value
    for name, (counts, hsum, count) in histograms.items():
        fam, tags = family(name), labels(name)
        running = 0
        for bound, c in zip(BUCKET_BOUNDS, counts, strict=False):
            running += c
            le = format(float(bound), ".32g")
            expected[(fam + "_bucket", tags | {("le", le)})] = running
        expected[(fam + "_bucket", tags | {("le", "+Inf")})] = count
        expected[(fam + "_sum", tags)] = hsum
        expected[(fam + "_count", tags)] = count
    assert samples == expected
