"""Access-log filters: truth tables and config errors."""

from __future__ import annotations

import time
from typing import Any

import pytest
from envoy.config.accesslog.v3.accesslog_pb2 import AccessLogFilter
from google.protobuf import json_format

from proxy.access_log.filters import compile_filter
from proxy.config.errors import ConfigError
from proxy.config.runtime import Runtime
from proxy.stream_info import ResponseFlag, StreamInfo


def flt(d: dict[str, Any], runtime: Runtime | None = None) -> Any:
    return compile_filter(json_format.ParseDict(d, AccessLogFilter()), "al[0].filter", runtime)


def info(code: int | None = 200, ms: float | None = 100, flags: int = 0) -> StreamInfo:
    si = StreamInfo(start_monotonic=10.0, response_code=code, response_flags=flags)
    si.end_monotonic = None if ms is None else 10.0 + ms / 1000
    return si


def status(op: str, value: int, key: str = "") -> dict[str, Any]:
    return {"status_code_filter": {"comparison": {"op": op, "value": {
        "default_value": value, "runtime_key": key}}}}


def duration(op: str, value: int, key: str = "") -> dict[str, Any]:
    return {"duration_filter": {"comparison": {"op": op, "value": {
        "default_value": value, "runtime_key": key}}}}


@pytest.mark.parametrize(("op", "code", "expected"), [
    ("EQ", 200, False), ("EQ", 404, True), ("EQ", 500, False),
    ("GE", 200, False), ("GE", 404, True), ("GE", 500, True),
    ("LE", 200, True), ("LE", 404, True), ("LE", 500, False),
    ("NE", 200, True), ("NE", 404, False), ("NE", 500, True),
])
def test_status_code_truth_table(op: str, code: int, expected: bool) -> None:
    assert flt(status(op, 404))(info(code)) is expected


def test_status_code_none_is_zero() -> None:
    assert flt(status("EQ", 0))(info(None)) is True
    assert flt(status("GE", 400))(info(None)) is False


@pytest.mark.parametrize(("op", "ms", "expected"), [
    ("EQ", 999.9, False), ("EQ", 1000, True), ("EQ", 1000.9, True), ("EQ", 1001, False),
    ("GE", 999, False), ("GE", 1000, True), ("GE", 5000, True),
    ("LE", 999, True), ("LE", 1000, True), ("LE", 1001, False),
    ("NE", 1000, False), ("NE", 1, True),
])
def test_duration_truth_table(op: str, ms: float, expected: bool) -> None:
    assert flt(duration(op, 1000))(info(ms=ms)) is expected


def test_duration_in_flight_uses_now() -> None:
    si = StreamInfo(start_monotonic=time.monotonic() - 5.0)
    assert flt(duration("GE", 4000))(si) is True
    assert flt(duration("LE", 4000))(si) is False


def test_runtime_key_overrides_default() -> None:
    rt = Runtime.from_dict({"access_log": {"min_status": 500}})
    f = flt(status("GE", 400, "access_log.min_status"), rt)
    assert f(info(404)) is False and f(info(503)) is True
    # Key absent from the runtime, or no runtime at all: the default value.
    f = flt(status("GE", 400, "access_log.other"), rt)
    assert f(info(404)) is True
    f = flt(status("GE", 400, "access_log.min_status"), None)
    assert f(info(404)) is True
    # A non-integer runtime value falls back to the default, as Envoy's getInteger does.
    rt = Runtime.from_dict({"k": "abc"})
    assert flt(status("GE", 400, "k"), rt)(info(404)) is True


@pytest.mark.parametrize(("flags", "set_", "expected"), [
    ([], 0, False),
    ([], ResponseFlag.NO_HEALTHY_UPSTREAM, True),
    (["UH"], ResponseFlag.NO_HEALTHY_UPSTREAM, True),
    (["UH"], ResponseFlag.UPSTREAM_REQUEST_TIMEOUT, False),
    (["UH", "UT"], ResponseFlag.UPSTREAM_REQUEST_TIMEOUT, True),
    (["UH", "UT"], ResponseFlag.UPSTREAM_REQUEST_TIMEOUT | ResponseFlag.NO_ROUTE_FOUND, True),
    (["NR"], 0, False),
    (["DR", "DO", "DF", "OM"], ResponseFlag.DOWNSTREAM_REMOTE_RESET, True),
    (["UDO"], ResponseFlag.NO_HEALTHY_UPSTREAM, False),  # valid in Envoy, never set by trioxy
    (["UDO", "UH"], ResponseFlag.NO_HEALTHY_UPSTREAM, True),
])
def test_response_flag_truth_table(flags: list[str], set_: int, expected: bool) -> None:
    assert flt({"response_flag_filter": {"flags": flags}})(info(flags=set_)) is expected


def test_not_health_check_drops_only_health_check_requests() -> None:
    f = flt({"not_health_check_filter": {}})
    assert f(info()) is True and f(info(None, None)) is True
    hc = info()
    hc.health_check = True
    assert f(hc) is False


@pytest.mark.parametrize(("a", "b"), [(False, False), (False, True), (True, False), (True, True)])
def test_and_or_truth_tables(a: bool, b: bool) -> None:
    # a: status >= 500 (code 503 makes it true); b: any flag set.
    code = 503 if a else 200
    flags = ResponseFlag.UPSTREAM_OVERFLOW if b else 0
    si = info(code, flags=flags)
    subs = [status("GE", 500), {"response_flag_filter": {}}]
    assert flt({"and_filter": {"filters": subs}})(si) is (a and b)
    assert flt({"or_filter": {"filters": subs}})(si) is (a or b)


def test_nested_and_or() -> None:
    f = flt({"or_filter": {"filters": [
        {"and_filter": {"filters": [status("GE", 400), duration("GE", 500)]}},
        {"response_flag_filter": {"flags": ["UF"]}},
    ]}})
    assert f(info(404, 600)) is True
    assert f(info(404, 100)) is False
    assert f(info(200, 100, ResponseFlag.UPSTREAM_CONNECTION_FAILURE)) is True


# ---------------------------------------------------------------------------- errors
def err(d: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        flt(d)
    return e.value


def test_unknown_flag_is_an_error() -> None:
    e = err({"response_flag_filter": {"flags": ["UH", "XX"]}})
    assert e.path == "al[0].filter.response_flag_filter.flags[1]"
    assert e.message.startswith("unknown response flag 'XX' (known: LH, UH, UT,")


def test_empty_filter_is_an_error() -> None:
    e = err({})
    assert e.path == "al[0].filter"
    assert "needs one of status_code_filter" in e.message


def test_and_needs_two_filters() -> None:
    e = err({"and_filter": {"filters": [status("EQ", 1)]}})
    assert (e.path, e.message) == (
        "al[0].filter.and_filter.filters", "value must contain at least 2 item(s)")


def test_nested_error_path() -> None:
    e = err({"or_filter": {"filters": [
        status("EQ", 1), {"and_filter": {"filters": [status("EQ", 1), {"response_flag_filter": {
            "flags": ["ZZ"]}}]}}]}})
    assert e.path == ("al[0].filter.or_filter.filters[1].and_filter.filters[1]"
                      ".response_flag_filter.flags[0]")


def test_comparison_required() -> None:
    e = err({"status_code_filter": {}})
    assert (e.path, e.message) == ("al[0].filter.status_code_filter.comparison", "value is required")
    e = err({"duration_filter": {"comparison": {"op": "GE"}}})
    assert (e.path, e.message) == (
        "al[0].filter.duration_filter.comparison.value", "value is required")


@pytest.mark.parametrize("kind", [
    {"runtime_filter": {"runtime_key": "k"}},
    {"traceable_filter": {}},
    {"header_filter": {"header": {"name": "x", "present_match": True}}},
    {"grpc_status_filter": {}},
])
def test_unsupported_filters(kind: dict[str, Any]) -> None:
    e = err(kind)
    name = next(iter(kind))
    assert (e.path, e.message) == (f"al[0].filter.{name}", f"{name} is not supported")
