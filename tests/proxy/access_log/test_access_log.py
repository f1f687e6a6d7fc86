"""build_access_logs, the three registered loggers, and AccessLog.log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.config.accesslog.v3.accesslog_pb2 import AccessLog as AccessLogProto
from google.protobuf import json_format

import proxy.extensions.access_loggers  # noqa: F401  (registrations)
from proxy.access_log import file_sink
from proxy.access_log.access_log import AccessLog, build_access_logs
from proxy.access_log.formatter import DEFAULT_FORMAT, compile_format
from proxy.config.bootstrap import parse_bootstrap_dict
from proxy.config.context import FactoryContext
from proxy.config.errors import ConfigError
from proxy.config.runtime import Runtime
from proxy.registry import access_loggers
from proxy.stream_info import ResponseFlag, StreamInfo

ROOT = Path(__file__).resolve().parents[3]
FILE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
STDOUT = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
STDERR = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog"


@pytest.fixture(autouse=True)
def _close_sinks() -> Iterator[None]:
    yield
    file_sink.close_all(5.0)


def protos(entries: list[dict[str, Any]]) -> list[AccessLogProto]:
    # Through the bootstrap parser, so that "@type" resolves as in a real config.
    boot = parse_bootstrap_dict({"static_resources": {"listeners": [{
        "name": "l", "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": "s", "cluster": "c", "access_log": entries,
            },
        }]}],
    }]}})
    from envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2 import TcpProxy

    tp = TcpProxy()
    boot.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.Unpack(tp)
    return list(tp.access_log)


def build(entries: list[dict[str, Any]], runtime: Runtime | None = None) -> tuple[AccessLog, ...]:
    return build_access_logs(protos(entries), FactoryContext(runtime=runtime), "tp.access_log")


def info(**kw: Any) -> StreamInfo:
    si = StreamInfo(start_time=1704164645.678, start_monotonic=5.0, end_monotonic=5.5,
                    upstream_host="10.0.0.1:80", bytes_received=3, bytes_sent=4)
    for k, v in kw.items():
        setattr(si, k, v)
    return si


def test_registry_has_three_loggers() -> None:
    assert set(access_loggers.names()) >= {
        "envoy.access_loggers.file", "envoy.access_loggers.stdout", "envoy.access_loggers.stderr"}


def test_file_logger_default_format(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    (al,) = build([{"name": "envoy.access_loggers.file",
                    "typed_config": {"@type": FILE, "path": str(path)}}])
    assert al.path == str(path) and al.formatter.source == DEFAULT_FORMAT
    assert al.name == "envoy.access_loggers.file"
    assert not path.exists()  # building opens nothing
    al.log(info())
    assert file_sink.flush_all(5.0)
    assert path.read_text() == (
        '[2024-01-02T03:04:05.678Z] "- - -" 0 - 3 4 500 - "-" "-" "-" "-" "10.0.0.1:80"\n')


@pytest.mark.parametrize(("extra", "expected"), [
    ({"log_format": {"text_format": "%BYTES_SENT%|%REQ(X)%\n"}}, "4|-\n"),
    ({"log_format": {"text_format_source": {"inline_string": "%BYTES_SENT%|%REQ(X)%\n"},
                     "omit_empty_values": True}}, "4|\n"),
    ({"log_format": {"json_format": {"sent": "%BYTES_SENT%", "p": "%PROTOCOL%"}}},
     '{"p":null,"sent":4}\n'),
    ({"format": "%BYTES_RECEIVED%\n"}, "3\n"),
    ({"json_format": {"sent": "%BYTES_SENT%", "p": "%PROTOCOL%"}}, '{"p":"-","sent":"4"}\n'),
])
def test_file_logger_formats(tmp_path: Path, extra: dict[str, Any], expected: str) -> None:
    path = tmp_path / "a.log"
    (al,) = build([{"name": "x", "typed_config": {"@type": FILE, "path": str(path), **extra}}])
    al.log(info())
    assert file_sink.flush_all(5.0)
    assert path.read_text() == expected


def test_empty_deprecated_format_is_default() -> None:
    from envoy.extensions.access_loggers.file.v3.file_pb2 import FileAccessLog

    from proxy.extensions.access_loggers.file.config import create_file_access_log

    msg = FileAccessLog(path="/tmp/x.log", format="")
    assert create_file_access_log(msg, None, "p").formatter.source == DEFAULT_FORMAT


def test_filter_applies(tmp_path: Path) -> None:
    path = tmp_path / "f.log"
    (al,) = build([{
        "name": "envoy.access_loggers.file",
        "typed_config": {"@type": FILE, "path": str(path), "log_format": {
            "text_format": "%RESPONSE_CODE% %RESPONSE_FLAGS%\n"}},
        "filter": {"or_filter": {"filters": [
            {"status_code_filter": {"comparison": {"op": "GE", "value": {
                "default_value": 500, "runtime_key": "log.min"}}}},
            {"response_flag_filter": {"flags": ["UF"]}},
        ]}},
    }], Runtime.from_dict({"log": {"min": 400}}))
    al.log(info(response_code=200))
    al.log(info(response_code=404))
    al.log(info(response_code=0, response_flags=ResponseFlag.UPSTREAM_CONNECTION_FAILURE))
    al.log(info(response_code=204))
    assert file_sink.flush_all(5.0)
    assert path.read_text() == "404 -\n0 UF\n"


def test_two_logs_to_one_file_share_a_sink(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.log")
    a, b = build([
        {"name": "a", "typed_config": {"@type": FILE, "path": path, "format": "a\n"}},
        {"name": "b", "typed_config": {"@type": FILE, "path": path, "format": "b\n"}},
    ])
    a.log(info())
    b.log(info())
    assert file_sink.sink_for(path) is a._sink is b._sink
    assert file_sink.flush_all(5.0)
    assert Path(path).read_text() == "a\nb\n"


def test_log_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Boom:
        source = "boom"

        def format(self, si: StreamInfo) -> str:
            raise RuntimeError("formatter bug")

    al = AccessLog("x", str(tmp_path / "x.log"), Boom())  # type: ignore[arg-type]
    al.log(info())
    al.log(info())
    assert al.errors == 2
    assert "formatter bug" in caplog.text
    bad = AccessLog("y", str(tmp_path / "no" / "dir" / "y.log"), compile_format("x\n", "p"))
    bad.log(info())
    assert bad.errors == 1


def test_stdout_and_stderr_loggers() -> None:
    code = r"""
import json, sys
from google.protobuf import json_format
from envoy.config.accesslog.v3.accesslog_pb2 import AccessLog
from envoy.extensions.access_loggers.stream.v3 import stream_pb2  # noqa: F401
from proxy.access_log import file_sink
from proxy.access_log.access_log import build_access_logs
from proxy.config.context import FactoryContext
from proxy.stream_info import StreamInfo
entries = json.loads(sys.argv[1])
msgs = [json_format.ParseDict(e, AccessLog()) for e in entries]
for log in build_access_logs(msgs, FactoryContext(), "x"):
    log.log(StreamInfo(start_time=0.0, bytes_sent=9))
file_sink.close_all(5.0)
"""
    entries = [
        {"name": "envoy.access_loggers.stdout", "typed_config": {
            "@type": STDOUT, "log_format": {"text_format": "out %BYTES_SENT%\n"}}},
        {"name": "envoy.access_loggers.stderr", "typed_config": {"@type": STDERR}},
    ]
    r = subprocess.run([sys.executable, "-c", code, json.dumps(entries)], capture_output=True,
                       text=True, timeout=30, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout == "out 9\n"
    assert r.stderr == '[1970-01-01T00:00:00.000Z] "- - -" 0 - 0 9 0 - "-" "-" "-" "-" "-"\n'


# ---------------------------------------------------------------------------- errors
def err(entries: list[dict[str, Any]]) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        build(entries)
    return e.value


def test_missing_typed_config() -> None:
    msg = json_format.ParseDict({"name": "envoy.access_loggers.file"}, AccessLogProto())
    with pytest.raises(ConfigError) as e:
        build_access_logs([msg], FactoryContext(), "hcm.access_log")
    assert e.value.path == "hcm.access_log[0]"
    assert e.value.message.startswith("access log 'envoy.access_loggers.file' needs a typed_config")


def test_unknown_logger_type() -> None:
    e = err([{"name": "x", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"}}])
    assert e.path == "tp.access_log[0].typed_config"
    assert "is not supported" in e.message


def test_file_path_required() -> None:
    e = err([{"name": "x", "typed_config": {"@type": FILE}}])
    assert (e.path, e.message) == (
        "tp.access_log[0].typed_config.path", "value length must be at least 1 characters")


@pytest.mark.parametrize(("extra", "path", "message"), [
    ({"format": "%NOPE%"}, "tp.access_log[1].typed_config.format",
     "Not supported field in StreamInfo: NOPE"),
    ({"log_format": {"text_format": "%REQ%"}}, "tp.access_log[1].typed_config.log_format.text_format",
     "REQ requires parameters"),
    ({"log_format": {"text_format_source": {"inline_string": "%START_TIME:2%"}}},
     "tp.access_log[1].typed_config.log_format.text_format_source.inline_string",
     "START_TIME does not allow length to be specified."),
    ({"log_format": {"json_format": {"a": {"b": "%PROTOCOL(x)%"}}}},
     "tp.access_log[1].typed_config.log_format.json_format.a.b",
     "PROTOCOL does not take any parameters or length"),
    ({"json_format": {"a": "%BAD"}}, "tp.access_log[1].typed_config.json_format.a", None),
])
def test_format_error_paths(tmp_path: Path, extra: dict[str, Any], path: str,
                            message: str | None) -> None:
    ok = {"name": "ok", "typed_config": {"@type": FILE, "path": str(tmp_path / "ok.log")}}
    e = err([ok, {"name": "x", "typed_config": {"@type": FILE, "path": "/tmp/x", **extra}}])
    assert e.path == path
    if message is not None:
        assert e.message == message


def test_filter_error_path() -> None:
    e = err([{"name": "x", "typed_config": {"@type": STDOUT},
              "filter": {"response_flag_filter": {"flags": ["BOGUS"]}}}])
    assert e.path == "tp.access_log[0].filter.response_flag_filter.flags[0]"


def test_typed_json_format_refused() -> None:
    from envoy.extensions.access_loggers.file.v3.file_pb2 import FileAccessLog

    from proxy.extensions.access_loggers.file.config import create_file_access_log

    msg = FileAccessLog(path="/tmp/x.log")
    msg.typed_json_format.update({"a": "%PROTOCOL%"})
    with pytest.raises(ConfigError) as e:
        create_file_access_log(msg, None, "p")
    assert (e.value.path, e.value.message) == ("p.typed_json_format",
                                               "typed_json_format is not supported")
