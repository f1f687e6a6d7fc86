"""Factory for ``envoy.access_loggers.file`` (the FileAccessLog message).

As Envoy's ``FileAccessLogFactory``: ``log_format`` (a SubstitutionFormatString), or the
deprecated ``format`` (a text format; empty means the default) and ``json_format`` (every value
rendered as a string); no format at all is Envoy's default format. ``typed_json_format`` is not
supported (``supported.py`` refuses it first in a full bootstrap).
"""

from __future__ import annotations

from typing import Any

from envoy.extensions.access_loggers.file.v3.file_pb2 import FileAccessLog
from google.protobuf import json_format

from proxy.access_log.access_log import AccessLoggerConfig
from proxy.access_log.formatter import (
    DEFAULT_FORMAT,
    compile_format,
    compile_json_format,
    compile_substitution_format,
)
from proxy.config.errors import ConfigError, not_supported
from proxy.registry import access_loggers


@access_loggers.register("envoy.access_loggers.file", FileAccessLog)
def create_file_access_log(msg: Any, ctx: Any, path: str) -> AccessLoggerConfig:
    if not msg.path:
        raise ConfigError(f"{path}.path", "value length must be at least 1 characters")
    kind = msg.WhichOneof("access_log_format")
    if kind is None:
        formatter = compile_format(DEFAULT_FORMAT, path)
    elif kind == "format":
        formatter = compile_format(msg.format or DEFAULT_FORMAT, f"{path}.format")
    elif kind == "json_format":
        formatter = compile_json_format(
            json_format.MessageToDict(msg.json_format), f"{path}.json_format", typed=False)
    elif kind == "log_format":
        formatter = compile_substitution_format(msg.log_format, f"{path}.log_format")
    else:
        raise not_supported(f"{path}.{kind}", kind)
    return AccessLoggerConfig(msg.path, formatter)
