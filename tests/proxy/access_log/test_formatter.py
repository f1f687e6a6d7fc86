"""Envoy's substitution formatter: golden lines, every operator, START_TIME, JSON, errors."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.access_log.formatter import (
    DEFAULT_FORMAT,
    compile_format,
    compile_json_format,
    compile_substitution_format,
)
from proxy.config.errors import ConfigError
from proxy.http.headers import HeaderMap
from proxy.stream_info import ResponseFlag, StreamInfo

T0 = 1704164645.678  # 2024-01-02T03:04:05.678Z


def http_info(**over: Any) -> StreamInfo:
    si = StreamInfo(
        start_time=T0,
        start_monotonic=1000.0,
        end_monotonic=1000.2509,
        last_downstream_rx_byte=1000.0015,
        first_upstream_tx_byte=1000.002,
        first_upstream_rx_byte=1000.0123,
        protocol="HTTP/1.1",
        response_code=200,
        response_code_details="via_upstream",
        bytes_received=11,
        bytes_sent=1234,
        upstream_host="10.0.0.7:8080",
        upstream_cluster="backend",
        upstream_local_address="10.0.0.1:40000",
        downstream_local_address="127.0.0.1:10000",
        downstream_remote_address="192.168.1.9:51234",
        downstream_direct_remote_address="192.168.1.8:51234",
        route_name="default",
        request_headers=HeaderMap([
            (":method", "POST"), (":path", "/api/v1/locations"), (":authority", "locations"),
            (":scheme", "http"), ("user-agent", "nsq2http"),
            ("x-request-id", "cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2"),
            ("x-forwarded-for", "10.0.35.28"), ("x-multi", "a"), ("x-multi", "b"),
        ]),
        response_headers=HeaderMap([
            (":status", "200"), ("x-envoy-upstream-service-time", "100"),
            ("content-type", "text/plain"),
        ]),
        response_trailers=HeaderMap([("grpc-status", "0"), ("grpc-message", "all good")]),
        attempt_count=1,
        connection_id=42,
    )
    for k, v in over.items():
        setattr(si, k, v)
    return si


def tcp_info(**over: Any) -> StreamInfo:
    si = StreamInfo(
        start_time=T0,
        start_monotonic=1000.0,
        end_monotonic=1001.5,
        bytes_received=5,
        bytes_sent=7,
        upstream_host="10.0.0.7:9000",
        upstream_cluster="tcp_backend",
        downstream_local_address="127.0.0.1:10001",
        downstream_remote_address="127.0.0.1:50000",
        downstream_direct_remote_address="127.0.0.1:50000",
        attempt_count=2,
        connection_id=7,
    )
    si.set_response_flag(ResponseFlag.UPSTREAM_CONNECTION_FAILURE)
    si.set_response_flag(ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED)
    for k, v in over.items():
        setattr(si, k, v)
    return si


def fmt(f: str, si: StreamInfo, **kw: Any) -> str:
    return compile_format(f, "p", **kw).format(si)


# ---------------------------------------------------------------------------- golden lines
def test_default_format_is_envoys() -> None:
    assert DEFAULT_FORMAT == (
        '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
        "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
        '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
        '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
    )


def test_golden_http_line() -> None:
    # Envoy's documented example line, with our upstream host.
    assert fmt(DEFAULT_FORMAT, http_info()) == (
        '[2024-01-02T03:04:05.678Z] "POST /api/v1/locations HTTP/1.1" 200 - 11 1234 250 100 '
        '"10.0.35.28" "nsq2http" "cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2" "locations" '
        '"10.0.0.7:8080"\n'
    )


def test_golden_http_line_prefers_original_path() -> None:
    si = http_info()
    assert si.request_headers is not None
    si.request_headers.add("x-envoy-original-path", "/before/rewrite")
    assert '"POST /before/rewrite HTTP/1.1"' in fmt(DEFAULT_FORMAT, si)


def test_golden_tcp_line() -> None:
    assert fmt(DEFAULT_FORMAT, tcp_info()) == (
        '[2024-01-02T03:04:05.678Z] "- - -" 0 UF,URX 5 7 1500 - "-" "-" "-" "-" '
        '"10.0.0.7:9000"\n'
    )


ISTIO = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% "
    '"%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER% '
    "%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% "
    "%REQUESTED_SERVER_NAME% %ROUTE_NAME%\n"
)


def test_golden_istio_tcp_line() -> None:
    si = tcp_info(connection_termination_details="tcp_proxy_init_failure:1",
                  upstream_transport_failure_reason="connection failure",
                  requested_server_name="db.internal")
    assert fmt(ISTIO, si) == (
        '[2024-01-02T03:04:05.678Z] "- - -" 0 UF,URX - tcp_proxy_init_failure:1 '
        '"connection_failure" 5 7 1500 - "-" "-" "-" "-" "10.0.0.7:9000" tcp_backend - '
        "127.0.0.1:10001 127.0.0.1:50000 db.internal -\n"
    )


# ---------------------------------------------------------------------------- each operator
HTTP_CASES = [
    ("%REQ(:METHOD)%", "POST"),
    ("%REQ(:method)%", "POST"),
    ("%REQ(USER-AGENT)%", "nsq2http"),
    ("%REQ(X-MISSING)%", "-"),
    ("%REQ(X-MISSING?USER-AGENT)%", "nsq2http"),
    ("%REQ(USER-AGENT?X-REQUEST-ID)%", "nsq2http"),
    ("%REQ(X-MISSING?X-ALSO-MISSING)%", "-"),
    ("%REQ(X-MULTI)%", "a"),
    ("%REQ(:PATH):4%", "/api"),
    ("%REQ(X-MISSING?:PATH):4%", "/api"),
    ("%REQ(:PATH):0%", ""),
    ("%REQ(:PATH):1000%", "/api/v1/locations"),
    ("%RESP(CONTENT-TYPE)%", "text/plain"),
    ("%RESP(:STATUS)%", "200"),
    ("%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%", "100"),
    ("%RESP(X-NOPE)%", "-"),
    ("%TRAILER(GRPC-STATUS)%", "0"),
    ("%TRAILER(GRPC-MESSAGE):3%", "all"),
    ("%TRAILER(X-NOPE?GRPC-MESSAGE)%", "all good"),
    ("%TRAILER(X-NOPE)%", "-"),
    ("%REQUEST_HEADERS_BYTES%", str(sum(len(k) + len(v) for k, v in http_info().request_headers))),  # type: ignore[union-attr]
    ("%RESPONSE_HEADERS_BYTES%", str(len(":status200x-envoy-upstream-service-time100content-typetext/plain"))),
    ("%RESPONSE_TRAILERS_BYTES%", str(len("grpc-status0grpc-messageall good"))),
    ("%PROTOCOL%", "HTTP/1.1"),
    ("%RESPONSE_CODE%", "200"),
    ("%RESPONSE_CODE_DETAILS%", "via_upstream"),
    ("%CONNECTION_TERMINATION_DETAILS%", "-"),
    ("%RESPONSE_FLAGS%", "-"),
    ("%RESPONSE_FLAGS_LONG%", "-"),
    ("%BYTES_RECEIVED%", "11"),
    ("%BYTES_SENT%", "1234"),
    ("%DURATION%", "250"),
    ("%REQUEST_DURATION%", "1"),
    ("%RESPONSE_DURATION%", "12"),
    ("%RESPONSE_TX_DURATION%", "-"),  # needs last_downstream_tx_byte
    ("%REQUEST_TX_DURATION%", "-"),  # needs last_upstream_tx_byte
    ("%UPSTREAM_HOST%", "10.0.0.7:8080"),
    ("%UPSTREAM_HOST_NAME%", "10.0.0.7:8080"),
    ("%UPSTREAM_HOST_NAME_WITHOUT_PORT%", "10.0.0.7"),
    ("%UPSTREAM_REMOTE_ADDRESS%", "10.0.0.7:8080"),
    ("%UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "10.0.0.7"),
    ("%UPSTREAM_REMOTE_PORT%", "8080"),
    ("%UPSTREAM_CLUSTER%", "backend"),
    ("%UPSTREAM_CLUSTER_RAW%", "backend"),
    ("%UPSTREAM_LOCAL_ADDRESS%", "10.0.0.1:40000"),
    ("%UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%", "10.0.0.1"),
    ("%UPSTREAM_LOCAL_PORT%", "40000"),
    ("%UPSTREAM_TRANSPORT_FAILURE_REASON%", "-"),
    ("%UPSTREAM_REQUEST_ATTEMPT_COUNT%", "1"),
    ("%DOWNSTREAM_REMOTE_ADDRESS%", "192.168.1.9:51234"),
    ("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "192.168.1.9"),
    ("%DOWNSTREAM_REMOTE_PORT%", "51234"),
    ("%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%", "192.168.1.8:51234"),
    ("%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%", "192.168.1.8"),
    ("%DOWNSTREAM_DIRECT_REMOTE_PORT%", "51234"),
    ("%DOWNSTREAM_LOCAL_ADDRESS%", "127.0.0.1:10000"),
    ("%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%", "127.0.0.1"),
    ("%DOWNSTREAM_LOCAL_PORT%", "10000"),
    ("%DOWNSTREAM_DIRECT_LOCAL_ADDRESS%", "127.0.0.1:10000"),
    ("%DOWNSTREAM_DIRECT_LOCAL_ADDRESS_WITHOUT_PORT%", "127.0.0.1"),
    ("%DOWNSTREAM_DIRECT_LOCAL_PORT%", "10000"),
    ("%REQUESTED_SERVER_NAME%", "-"),
    ("%ROUTE_NAME%", "default"),
    ("%VIRTUAL_CLUSTER_NAME%", "-"),
    ("%CONNECTION_ID%", "42"),
    ("%%", "%"),
    ("100%% %%%PROTOCOL%%%", "100% %HTTP/1.1%"),
    ("", ""),
    ("plain text", "plain text"),
]


@pytest.mark.parametrize(("f", "expected"), HTTP_CASES)
def test_operator_http(f: str, expected: str) -> None:
    assert fmt(f, http_info()) == expected


TCP_CASES = [
    ("%REQ(:METHOD)%", "-"),
    ("%RESP(:STATUS)%", "-"),
    ("%TRAILER(GRPC-STATUS)%", "-"),
    ("%REQUEST_HEADERS_BYTES%", "0"),
    ("%PROTOCOL%", "-"),
    ("%RESPONSE_CODE%", "0"),
    ("%RESPONSE_CODE_DETAILS%", "-"),
    ("%RESPONSE_FLAGS%", "UF,URX"),
    ("%RESPONSE_FLAGS_LONG%", "UpstreamConnectionFailure,UpstreamRetryLimitExceeded"),
    ("%DURATION%", "1500"),
    ("%REQUEST_DURATION%", "-"),
    ("%RESPONSE_DURATION%", "-"),
    ("%UPSTREAM_LOCAL_ADDRESS%", "-"),
    ("%UPSTREAM_LOCAL_PORT%", "-"),
    ("%UPSTREAM_REQUEST_ATTEMPT_COUNT%", "2"),
    ("%ROUTE_NAME%", "-"),
    ("%CONNECTION_ID%", "7"),
]


@pytest.mark.parametrize(("f", "expected"), TCP_CASES)
def test_operator_tcp(f: str, expected: str) -> None:
    assert fmt(f, tcp_info()) == expected


def test_bare_stream_info() -> None:
    si = StreamInfo(start_time=T0)
    assert fmt("%UPSTREAM_HOST% %UPSTREAM_CLUSTER% %BYTES_SENT% %DOWNSTREAM_REMOTE_PORT% "
               "%UPSTREAM_REQUEST_ATTEMPT_COUNT% %CONNECTION_ID% %UPSTREAM_HOST_NAME%", si) \
        == "- - 0 - 0 0 -"


def test_upstream_host_name_and_direct_local() -> None:
    si = FutureInfo(upstream_host="10.0.0.7:8080", downstream_local_address="1.2.3.4:80")
    si.upstream_host_name = "api.internal:8080"
    si.downstream_direct_local_address = "10.9.9.9:15001"
    assert fmt("%UPSTREAM_HOST_NAME% %UPSTREAM_HOST_NAME_WITHOUT_PORT% "
               "%DOWNSTREAM_DIRECT_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS%", si) \
        == "api.internal:8080 api.internal 10.9.9.9:15001 1.2.3.4:80"


def test_ipv6_addresses() -> None:
    si = http_info(downstream_remote_address="[::1]:5000", upstream_host="[2001:db8::1]:80")
    assert fmt("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% "
               "%DOWNSTREAM_REMOTE_PORT% %UPSTREAM_HOST_NAME_WITHOUT_PORT%", si) \
        == "[::1]:5000 ::1 5000 [2001:db8::1]"


def test_response_code_details_whitespace() -> None:
    si = http_info(response_code_details="upstream reset\tbefore response")
    assert fmt("%RESPONSE_CODE_DETAILS%", si) == "upstream_reset_before_response"
    assert fmt("%RESPONSE_CODE_DETAILS(ALLOW_WHITESPACES)%", si) == "upstream reset\tbefore response"


def test_all_flags_short_and_long() -> None:
    si = http_info(response_flags=ResponseFlag.NO_HEALTHY_UPSTREAM | ResponseFlag.OVERLOAD_MANAGER
                   | ResponseFlag.DOWNSTREAM_REMOTE_RESET)
    assert fmt("%RESPONSE_FLAGS%", si) == "UH,OM,DR"
    assert fmt("%RESPONSE_FLAGS_LONG%", si) == \
        "NoHealthyUpstream,OverloadManagerTerminated,DownstreamRemoteReset"


def test_requested_server_name_is_sanitized() -> None:
    assert fmt("%REQUESTED_SERVER_NAME%", http_info(requested_server_name="a.example.com")) \
        == "a.example.com"
    assert fmt("%REQUESTED_SERVER_NAME%", http_info(requested_server_name="bad name\n")) \
        == "invalid:bad_name_"


def test_upstream_transport_failure_reason_spaces() -> None:
    si = tcp_info(upstream_transport_failure_reason="TLS error: 268435581 bad")
    assert fmt("%UPSTREAM_TRANSPORT_FAILURE_REASON%", si) == "TLS_error:_268435581_bad"


class FutureInfo(StreamInfo):
    """StreamInfo plus fields the formatter reads with getattr until stream_info.py has them."""


def test_milestone_durations() -> None:
    si = FutureInfo(start_time=T0, start_monotonic=1000.0, first_upstream_rx_byte=1000.0123)
    si.last_downstream_tx_byte = 1000.25
    si.last_upstream_tx_byte = 1000.003
    assert fmt("%RESPONSE_TX_DURATION% %REQUEST_TX_DURATION%", si) == "237 3"


def test_duration_in_flight_uses_now() -> None:
    si = StreamInfo(start_time=T0, start_monotonic=time.monotonic() - 2.0)
    assert 1999 <= int(fmt("%DURATION%", si)) < 3000


def test_omit_empty_values_text() -> None:
    assert fmt("[%REQ(X-NOPE)%][%PROTOCOL%]", tcp_info(), omit_empty_values=True) == "[][]"


def test_non_ascii_header_bytes_survive() -> None:
    # latin-1 str from the codec: the sink writes it as UTF-8 with surrogateescape.
    raw = "caf\u00c3\u00a9 \u00ff"  # the bytes b"caf\xc3\xa9 \xff"
    si = http_info(request_headers=HeaderMap([("user-agent", raw)]))
    out = fmt("%REQ(USER-AGENT)%", si)
    assert out.encode("utf-8", "surrogateescape") == b"caf\xc3\xa9 \xff"


def test_hostname_environment_unique_id(monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    monkeypatch.setenv("TRIOXY_TEST_ENV", "hello-world")
    assert fmt("%HOSTNAME%", http_info()) == (platform.node() or "-")
    assert fmt("%ENVIRONMENT(TRIOXY_TEST_ENV)%", http_info()) == "hello-world"
    assert fmt("%ENVIRONMENT(TRIOXY_TEST_ENV):5%", http_info()) == "hello"
    assert fmt("%ENVIRONMENT(TRIOXY_NO_SUCH_ENV)%", http_info(), omit_empty_values=True) == "-"
    a, b = fmt("%UNIQUE_ID%", http_info()), fmt("%UNIQUE_ID%", http_info())
    assert len(a) == 36 and a != b


# ---------------------------------------------------------------------------- START_TIME
@pytest.mark.parametrize(("f", "expected"), [
    ("%START_TIME%", "2024-01-02T03:04:05.678Z"),
    ("%START_TIME()%", "2024-01-02T03:04:05.678Z"),
    ("%START_TIME(%Y/%m/%d)%", "2024/01/02"),
    ("%START_TIME(%s)%", "1704164645"),
    ("%START_TIME(%s.%3f)%", "1704164645.678"),
    ("%START_TIME(%f)%", "678000000"),
    ("%START_TIME(%1f|%2f|%6f|%9f)%", "6|67|678000|678000000"),
    ("%START_TIME(%*f)%", "678"),
    ("%START_TIME(%E3S)%", "05.678"),
    ("%START_TIME(%E6S)%", "05.678000"),
    ("%START_TIME(%E*S)%", "05.678"),
    ("%START_TIME(%E2f)%", "67"),
    ("%START_TIME(%H:%M:%S %z %Z)%", "03:04:05 +0000 UTC"),
    ("%START_TIME(%Ez|%E*z|%E4Y)%", "+00:00|+00:00:00|2024"),
    ("%START_TIME(%%s %% %%f)%", "%s % %f"),
    ("%START_TIME(%Y-%m-%dT%H:%M:%S.%3fZ)% x", "2024-01-02T03:04:05.678Z x"),
    ("%START_TIME(%a %b %e %j)%", "Tue Jan  2 002"),
])
def test_start_time_formats(f: str, expected: str) -> None:
    assert fmt(f, http_info()) == expected


def test_start_time_whole_second_and_truncation() -> None:
    assert fmt("%START_TIME%", http_info(start_time=1704164645.0)) == "2024-01-02T03:04:05.000Z"
    assert fmt("%START_TIME(%E*S|%*f)%", http_info(start_time=1704164645.0)) == "05|0"
    # Sub-second digits truncate, never round up into the next second.
    assert fmt("%START_TIME%", http_info(start_time=1704164645.9999)) == "2024-01-02T03:04:05.999Z"
    assert fmt("%START_TIME(%6f)%", http_info(start_time=1704164645.123456)) == "123456"


def test_start_time_cache_follows_the_second() -> None:
    f = compile_format("%START_TIME%|%START_TIME(%s.%3f)%", "p")
    assert f.format(http_info(start_time=T0)) == "2024-01-02T03:04:05.678Z|1704164645.678"
    assert f.format(http_info(start_time=T0 + 0.1)) == "2024-01-02T03:04:05.778Z|1704164645.778"
    assert f.format(http_info(start_time=T0 + 1)) == "2024-01-02T03:04:06.678Z|1704164646.678"
    assert f.format(http_info(start_time=T0)) == "2024-01-02T03:04:05.678Z|1704164645.678"


def test_start_time_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        assert fmt("%START_TIME_LOCAL%", http_info()) == "2024-01-02T08:34:05.678+0530"
        assert fmt("%START_TIME_LOCAL(%H:%M %Ez)%", http_info()) == "08:34 +05:30"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_emit_time_is_now() -> None:
    now = time.time()
    out = int(fmt("%EMIT_TIME(%s)%", http_info()))
    assert now - 2 <= out <= now + 2


# ---------------------------------------------------------------------------- JSON
def jfmt(struct: dict[str, Any], si: StreamInfo, **kw: Any) -> str:
    return compile_json_format(struct, "p", **kw).format(si)


def test_json_typed_values() -> None:
    out = jfmt({
        "code": "%RESPONSE_CODE%",
        "duration": "%DURATION%",
        "bytes": "%BYTES_SENT%",
        "port": "%DOWNSTREAM_REMOTE_PORT%",
        "method": "%REQ(:METHOD)%",
        "missing": "%REQ(X-NOPE)%",
        "flags": "%RESPONSE_FLAGS%",
        "mixed": "%REQ(:METHOD)% %REQ(X-NOPE)% %RESPONSE_CODE%",
        "literal": "plain",
        "pct": "100%%",
        "start": "%START_TIME%",
        "nested": {"host": "%UPSTREAM_HOST%", "list": ["%BYTES_RECEIVED%", "x", 3, None, True]},
        "number": 2.5,
        "whole": 7.0,
        "null": None,
        "bool": False,
    }, http_info())
    assert out.endswith("}\n") and out.count("\n") == 1
    # Keys sorted, compact separators, as Envoy's JsonFormatterImpl.
    assert out == (
        '{"bool":false,"bytes":1234,"code":200,"duration":250,"flags":"-","literal":"plain",'
        '"method":"POST","missing":null,"mixed":"POST - 200","nested":{"host":"10.0.0.7:8080",'
        '"list":[11,"x",3,null,true]},"null":null,"number":2.5,"pct":"100%","port":51234,'
        '"start":"2024-01-02T03:04:05.678Z","whole":7}\n'
    )
    json.loads(out)


def test_json_tcp_nulls() -> None:
    out = json.loads(jfmt({"proto": "%PROTOCOL%", "code": "%RESPONSE_CODE%",
                           "rd": "%REQUEST_DURATION%", "ua": "%REQ(USER-AGENT)%"}, tcp_info()))
    assert out == {"proto": None, "code": 0, "rd": None, "ua": None}


def test_json_omit_empty_values() -> None:
    out = jfmt({"a": "%PROTOCOL%", "b": "%RESPONSE_CODE%", "c": {"d": "%REQ(X)%"},
                "e": "%REQ(X)%-%PROTOCOL%", "z": None, "l": ["%PROTOCOL%"]},
               tcp_info(), omit_empty_values=True)
    assert out == '{"b":0,"c":{},"e":"-","l":[null]}\n'
    json.loads(out)
    assert jfmt({"a": "%PROTOCOL%"}, tcp_info(), omit_empty_values=True) == "{}\n"


def test_json_untyped_deprecated_file_format() -> None:
    out = jfmt({"code": "%RESPONSE_CODE%", "proto": "%PROTOCOL%", "n": 1}, tcp_info(), typed=False)
    assert out == '{"code":"0","n":1,"proto":"-"}\n'


def test_json_escaping() -> None:
    si = http_info(request_headers=HeaderMap([("x", 'a"b\\c\nd\x01'), ("y", "\u00e9\u00ff")]))
    out = jfmt({"x": "%REQ(X)%", "y": "%REQ(Y)%", "k\"ey": "v"}, si)
    assert json.loads(out) == {"x": 'a"b\\c\nd\x01', "y": "\u00e9\u00ff", 'k"ey': "v"}
    # Invalid UTF-8 on the wire becomes the \u00XX escape: still valid JSON and UTF-8.
    out.encode("utf-8")


def test_json_utf8_header_decoded() -> None:
    si = http_info(request_headers=HeaderMap([("x", "caf\u00c3\u00a9")]))  # b"caf\xc3\xa9"
    out = jfmt({"x": "%REQ(X)%"}, si)
    assert json.loads(out) == {"x": "caf\u00e9"}


def test_json_errors() -> None:
    with pytest.raises(ConfigError) as e:
        compile_json_format({"a": {"b": "%NOPE%"}}, "f.json_format")
    assert e.value.path == "f.json_format.a.b"
    assert e.value.message == "Not supported field in StreamInfo: NOPE"
    with pytest.raises(ConfigError) as e:
        compile_json_format({"a": ["ok", "50%"]}, "f.json_format")
    assert e.value.path == "f.json_format.a[1]"


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("f", "message"), [
    ("%REQ%", "REQ requires parameters"),
    ("%REQ()%", "REQ requires parameters"),
    ("%PROTOCOL(x)%", "PROTOCOL does not take any parameters or length"),
    ("%PROTOCOL%:3", None),  # fine: ":3" after the closing % is text
    ("%BYTES_SENT:3%", "BYTES_SENT does not take any parameters or length"),
    ("%START_TIME:3%", "START_TIME does not allow length to be specified."),
    ("%NO_SUCH_THING%", "Not supported field in StreamInfo: NO_SUCH_THING"),
    ("%DYNAMIC_METADATA(a:b)%", "access log operator %DYNAMIC_METADATA% is not supported"),
    ("%DOWNSTREAM_PEER_CERT%", "access log operator %DOWNSTREAM_PEER_CERT% is not supported"),
    ("%REQ(a?b?c)%", "More than 1 alternative header specified in token: a?b?c"),
    ("%START_TIME(%n)%", "Invalid header configuration. Format string contains newline."),
    ("%START_TIME(%-5n)%", "Invalid header configuration. Format string contains newline."),
    ("%RESPONSE_CODE_DETAILS(WHAT)%",
     "RESPONSE_CODE_DETAILS takes no parameter or ALLOW_WHITESPACES, got 'WHAT'"),
])
def test_operator_errors(f: str, message: str | None) -> None:
    if message is None:
        compile_format(f, "a.b")
        return
    with pytest.raises(ConfigError) as e:
        compile_format(f, "a.b")
    assert e.value.path == "a.b"
    assert e.value.message == message


@pytest.mark.parametrize(("f", "pos"), [
    ("100%", 3),
    ("%", 0),
    ("x %PROTOCOL", 2),
    ("%protocol%", 0),
    ("%REQ(:PATH%", 0),
    ("ok %PROTOCOL% then %bad", 19),
])
def test_malformed_formats(f: str, pos: int) -> None:
    with pytest.raises(ConfigError) as e:
        compile_format(f, "x.format")
    assert e.value.path == "x.format"
    assert e.value.message.startswith(
        f"Incorrect configuration: {f!r}. Couldn't find valid command at position {pos}")


# ---------------------------------------------------------------------------- round trip
@given(st.text().filter(lambda s: "%" not in s))
def test_literal_text_formats_to_itself(text: str) -> None:
    assert fmt(text, tcp_info()) == text


@given(st.text())
def test_escaped_percent_round_trip(text: str) -> None:
    assert fmt(text.replace("%", "%%"), tcp_info()) == text


@given(st.lists(st.sampled_from(["a", " ", "%%", "%PROTOCOL%", "%RESPONSE_CODE%", "\n"])))
def test_concatenation(parts: list[str]) -> None:
    si = http_info()
    assert fmt("".join(parts), si) == "".join(fmt(p, si) for p in parts)


# ---------------------------------------------------------------------------- from proto
def test_substitution_format_string_proto() -> None:
    from envoy.config.core.v3.substitution_format_string_pb2 import SubstitutionFormatString

    m = SubstitutionFormatString(text_format="%PROTOCOL%|%RESPONSE_CODE%")
    assert compile_substitution_format(m, "lf").format(http_info()) == "HTTP/1.1|200"
    m = SubstitutionFormatString()
    m.text_format_source.inline_string = "%PROTOCOL%|%REQ(X)%"
    m.omit_empty_values = True
    assert compile_substitution_format(m, "lf").format(http_info()) == "HTTP/1.1|"
    m = SubstitutionFormatString()
    m.json_format.update({"c": "%RESPONSE_CODE%", "n": 1})
    assert compile_substitution_format(m, "lf").format(http_info()) == '{"c":200,"n":1}\n'


def test_substitution_format_string_refusals() -> None:
    from envoy.config.core.v3.substitution_format_string_pb2 import SubstitutionFormatString

    with pytest.raises(ConfigError) as e:
        compile_substitution_format(SubstitutionFormatString(), "lf")
    assert (e.value.path, e.value.message) == (
        "lf", "one of text_format, text_format_source or json_format is required")
    m = SubstitutionFormatString()
    m.text_format_source.filename = "/etc/fmt"
    with pytest.raises(ConfigError) as e:
        compile_substitution_format(m, "lf")
    assert e.value.path == "lf.text_format_source.filename"
    m = SubstitutionFormatString(text_format="x", content_type="text/plain")
    with pytest.raises(ConfigError) as e:
        compile_substitution_format(m, "lf")
    assert e.value.path == "lf.content_type"
    m = SubstitutionFormatString()
    m.text_format_source.inline_string = "%BAD"
    with pytest.raises(ConfigError) as e:
        compile_substitution_format(m, "lf")
    assert e.value.path == "lf.text_format_source.inline_string"
