"""The ``/server_info`` admin response: Envoy's ``envoy.admin.v3.ServerInfo``, built sans-IO.

Envoy prints it with ``always_print_primitive_fields``, so every scalar of
``command_line_options`` appears, defaults included; the flags trioxy has no equivalent for
(``use_dynamic_base_id``, ``log_format``, ``service_cluster``...) show Envoy's zero values.
"""

from __future__ import annotations

import ssl
from typing import Any

from envoy.admin.v3.server_info_pb2 import CommandLineOptions, ServerInfo
from envoy.config.core.v3.base_pb2 import Node
from google.protobuf import duration_pb2, json_format

from proxy.server.drain_manager import DrainStrategy
from proxy.server.options import Mode, Options

__all__ = ["build_server_info", "command_line_options", "version_string"]

_MODES = {Mode.SERVE: CommandLineOptions.Serve, Mode.VALIDATE: CommandLineOptions.Validate}
_DRAIN_STRATEGIES = {
    DrainStrategy.GRADUAL: CommandLineOptions.Gradual,
    DrainStrategy.IMMEDIATE: CommandLineOptions.Immediate,
}
# Envoy prints spdlog's level names; trioxy also accepts "warn", which spdlog calls "warning".
_LOG_LEVELS = {"warn": "warning"}


def version_string(version: str, *, ssl_library: str | None = None) -> str:
    """Envoy's ``<revision>/<version>/<status>/<build type>/<ssl>``, for trioxy.

    A Python package carries no git revision, so the revision slot names the product and the
    status is ``Distribution``, Envoy's word for a build made without SCM information. The
    build type is always ``RELEASE``; the TLS library is the one Python's ``ssl`` links.
    """
    if ssl_library is None:
        ssl_library = ssl.OPENSSL_VERSION.split(" ", 1)[0]
    return f"trioxy/{version}/Distribution/RELEASE/{ssl_library}"


def command_line_options(options: Options) -> CommandLineOptions:
    """Envoy's ``OptionsImpl::toCommandLineOptions`` for the flags trioxy has."""
    out = CommandLineOptions(
        base_id=options.base_id,
        concurrency=options.concurrency,
        config_path=options.config_path or "",
        config_yaml=options.config_yaml or "",
        log_level=_LOG_LEVELS.get(options.log_level, options.log_level),
        restart_epoch=options.restart_epoch,
        drain_strategy=_DRAIN_STRATEGIES[options.drain_strategy],
        mode=_MODES[options.mode],
        disable_hot_restart=options.disable_hot_restart,
    )
    out.drain_time.CopyFrom(_duration(options.drain_time_s))
    out.parent_shutdown_time.CopyFrom(_duration(options.parent_shutdown_time_s))
    return out


def build_server_info(
    *,
    version: str,
    state: str,
    hot_restart_version: str,
    options: Options,
    node: Node | None,
    uptime_current_epoch_s: float,
    uptime_all_epochs_s: float,
) -> dict[str, Any]:
    """The JSON-ready ``ServerInfo`` dict.

    ``version`` is trioxy's release (``proxy.__version__``), printed as ``version_string``
    formats it; ``state`` is a ``ServerInfo.State`` name (``LIVE``, ``DRAINING``,
    ``PRE_INITIALIZING``, ``INITIALIZING``).
    """
    try:
        state_value = ServerInfo.State.Value(state)
    except ValueError:
        raise ValueError(
            f"unknown server state {state!r}; want one of {list(ServerInfo.State.keys())}"
        ) from None
    info = ServerInfo(
        version=version_string(version),
        state=state_value,
        hot_restart_version=hot_restart_version,
        command_line_options=command_line_options(options),
    )
    # Envoy subtracts time_t values: whole seconds.
    info.uptime_current_epoch.seconds = int(uptime_current_epoch_s)
    info.uptime_all_epochs.seconds = int(uptime_all_epochs_s)
    # Envoy always has a node (its LocalInfo's), so the field is always present.
    info.node.SetInParent()
    if node is not None:
        info.node.CopyFrom(node)
    return json_format.MessageToDict(
        info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d
