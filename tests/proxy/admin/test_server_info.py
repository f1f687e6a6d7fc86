"""/server_info: Envoy's ServerInfo from trioxy's options."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.admin.v3.server_info_pb2 import ServerInfo
from envoy.config.core.v3.base_pb2 import Node
from google.protobuf import json_format

from proxy.admin.server_info import build_server_info, version_string
from proxy.server.options import parse_options


def info(argv: list[str], **overrides: Any) -> dict[str, Any]:
    options, _ = parse_options(argv)
    kwargs: dict[str, Any] = {
        "version": "0.1.0",
        "state": "LIVE",
        "hot_restart_version": "trioxy.hot_restart.1.shm.1",
        "options": options,
        "node": Node(id="edge-1", cluster="edge"),
        "uptime_current_epoch_s": 12.9,
        "uptime_all_epochs_s": 3600.2,
    }
    kwargs.update(overrides)
    return build_server_info(**kwargs)


def test_parses_back_into_server_info() -> None:
    out = info(["-c", "examples/front-proxy.yaml", "--concurrency", "3"])
    parsed = json_format.ParseDict(out, ServerInfo())
    assert parsed.state == ServerInfo.LIVE
    assert parsed.command_line_options.concurrency == 3
    assert parsed.node.id == "edge-1"


def test_top_level_fields() -> None:
    out = info(["-c", "x.yaml"])
    assert out["state"] == "LIVE"
    assert out["hot_restart_version"] == "trioxy.hot_restart.1.shm.1"
    # Envoy subtracts whole seconds.
    assert out["uptime_current_epoch"] == "12s"
    assert out["uptime_all_epochs"] == "3600s"
    assert out["node"]["id"] == "edge-1" and out["node"]["cluster"] == "edge"


@pytest.mark.parametrize("state", ["LIVE", "DRAINING", "PRE_INITIALIZING", "INITIALIZING"])
def test_every_state(state: str) -> None:
    assert info(["-c", "x.yaml"], state=state)["state"] == state


def test_unknown_state_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown server state 'live'"):
        info(["-c", "x.yaml"], state="live")


def test_command_line_options_carry_trioxys_flags_under_envoys_names() -> None:
    argv = [
        "-c", "front.yaml", "--config-yaml", "admin: {}", "--mode", "validate",
        "--concurrency", "4", "-l", "debug", "--restart-epoch", "2", "--base-id", "7",
        "--drain-time-s", "30.5", "--parent-shutdown-time-s", "45",
        "--drain-strategy", "immediate", "--disable-hot-restart",
    ]
    opts = info(argv)["command_line_options"]
    assert opts["config_path"] == "front.yaml"
    assert opts["config_yaml"] == "admin: {}"
    assert opts["mode"] == "Validate"
    assert opts["concurrency"] == 4
    assert opts["log_level"] == "debug"
    assert opts["restart_epoch"] == 2
    assert opts["base_id"] == "7"  # uint64: a string in proto3 JSON
    assert opts["drain_time"] == "30.500s"
    assert opts["parent_shutdown_time"] == "45s"
    assert opts["drain_strategy"] == "Immediate"
    assert opts["disable_hot_restart"] is True


def test_defaults_are_printed_as_envoy_prints_them() -> None:
    opts = info(["-c", "x.yaml"])["command_line_options"]
    assert opts["mode"] == "Serve"
    assert opts["drain_strategy"] == "Gradual"
    assert opts["drain_time"] == "600s" and opts["parent_shutdown_time"] == "900s"
    # always_print_primitive_fields: zero values of flags trioxy lacks appear too.
    assert opts["use_dynamic_base_id"] is False
    assert opts["config_yaml"] == "" and opts["restart_epoch"] == 0
    assert opts["disabled_extensions"] == []


def test_warn_is_spelled_as_spdlog_spells_it() -> None:
    assert info(["-c", "x.yaml", "-l", "warn"])["command_line_options"]["log_level"] == "warning"


def test_node_is_present_even_when_none_is_given() -> None:
    out = info(["-c", "x.yaml"], node=None)
    assert out["node"]["id"] == ""
    json_format.ParseDict(out, ServerInfo())


def test_version_has_envoys_five_slots() -> None:
    assert info(["-c", "x.yaml"])["version"].split("/")[:4] == [
        "trioxy", "0.1.0", "Distribution", "RELEASE",
    ]
    assert version_string("1.2.3", ssl_library="BoringSSL") == (
        "trioxy/1.2.3/Distribution/RELEASE/BoringSSL"
    )
