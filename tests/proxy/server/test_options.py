from __future__ import annotations

import pytest

from proxy.server.drain_manager import DrainStrategy
from proxy.server.options import Mode, UsageError, parse_options


def test_envoy_flag_names_parse() -> None:
    opts, _ = parse_options(
        ["-c", "e.yaml", "--mode", "validate", "--concurrency", "3", "--restart-epoch", "2",
         "--base-id", "7", "--drain-time-s", "5", "--parent-shutdown-time-s", "10",
         "--drain-strategy", "immediate", "-l", "debug"]
    )
    assert opts.config_path == "e.yaml" and opts.mode is Mode.VALIDATE
    assert opts.concurrency == 3 and opts.restart_epoch == 2 and opts.base_id == 7
    assert opts.drain_strategy is DrainStrategy.IMMEDIATE and opts.log_level == "debug"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--concurrency", "0"], "--concurrency"),
        (["--drain-time-s", "10", "--parent-shutdown-time-s", "5"], "must be less than"),
        (["--drain-strategy", "sometimes"], "drain-strategy"),
        (["--mode", "init_only"], "mode"),
    ],
)
def test_bad_flags_are_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_options(argv)
