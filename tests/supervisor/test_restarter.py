"""The agent's policy, tested as the pure object it is: events in, actions out."""

from __future__ import annotations

from supervisor.restarter import (
    FATAL_EXIT_CODES,
    Exit,
    Log,
    Restarter,
    SignalEpoch,
    SpawnEpoch,
)


def test_start_spawns_epoch_zero() -> None:
    assert Restarter().on_start() == [SpawnEpoch(0)]


def test_term_drains_every_live_epoch_then_exits_when_last_one_leaves() -> None:
    r = Restarter()
    r.on_start()
    assert r.on_signal("TERM") == [SignalEpoch(0, "TERM")]
    assert r.on_epoch_exit(0, 0) == [Exit(0)]


def test_int_and_quit_are_fast_exits() -> None:
    for name in ("INT", "QUIT"):
        r = Restarter()
        r.on_start()
        assert r.on_signal(name) == [SignalEpoch(0, "INT")]


def test_usr1_is_forwarded() -> None:
    r = Restarter()
    r.on_start()
    assert r.on_signal("USR1") == [SignalEpoch(0, "USR1")]


def test_crash_relaunches_with_growing_backoff() -> None:
    r = Restarter()
    r.on_start()
    a1 = r.on_epoch_exit(0, -9)
    spawn1 = [a for a in a1 if isinstance(a, SpawnEpoch)]
    assert spawn1 and spawn1[0].epoch == 1
    a2 = r.on_epoch_exit(1, -9)
    spawn2 = [a for a in a2 if isinstance(a, SpawnEpoch)][0]
    assert spawn2.epoch == 2 and spawn2.delay_s > spawn1[0].delay_s


def test_config_and_boot_errors_stop_relaunching() -> None:
    for code in FATAL_EXIT_CODES:
        r = Restarter()
        r.on_start()
        actions = r.on_epoch_exit(0, code)
        assert not any(isinstance(a, SpawnEpoch) for a in actions)
        assert actions[-1] == Exit(code)
        assert isinstance(actions[0], Log)


def test_exit_during_shutdown_is_not_a_crash() -> None:
    r = Restarter()
    r.on_start()
    r.on_signal("TERM")
    assert r.on_epoch_exit(0, -15) == [Exit(0)]
