"""The agent's policy, tested as the pure object it is: events in, actions out."""

from __future__ import annotations

from supervisor.restarter import (
    FATAL_EXIT_CODES,
    Exit,
    Log,
    Notify,
    Restarter,
    SignalEpoch,
    SpawnEpoch,
)


def test_start_spawns_epoch_zero() -> None:
    assert Restarter().on_start() == [SpawnEpoch(0)]


def test_term_drains_every_live_epoch_then_exits_when_last_one_leaves() -> None:
    r = Restarter()
    r.on_start()
    assert r.on_signal("TERM") == [Notify("STOPPING=1\nSTATUS=SIGTERM: stopping"),
                                   SignalEpoch(0, "TERM")]
    assert r.on_epoch_exit(0, 0) == [Exit(0)]


def test_int_and_quit_are_fast_exits() -> None:
    for name in ("INT", "QUIT"):
        r = Restarter()
        r.on_start()
        assert [a for a in r.on_signal(name) if not isinstance(a, Notify)] == [
            SignalEpoch(0, "INT")]


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


def spawned(actions: list) -> list[int]:
    return [a.epoch for a in actions if isinstance(a, SpawnEpoch)]


def test_hup_starts_the_next_epoch_and_a_storm_coalesces_into_one_more() -> None:
    r = Restarter()
    r.on_start()
    r.on_epoch_ready(0)
    assert spawned(r.on_signal("HUP")) == [1]
    for _ in range(5):  # epoch 1 is still starting: these wait, as one
        assert spawned(r.on_signal("HUP")) == []
    assert spawned(r.on_epoch_ready(1)) == [2]
    assert spawned(r.on_epoch_ready(2)) == []
    assert r.reloads == 2


def test_at_most_three_epochs_live_the_oldest_is_terminated() -> None:
    r = Restarter()
    r.on_start()
    r.on_epoch_ready(0)
    r.on_signal("HUP")
    r.on_epoch_ready(1)
    r.on_signal("HUP")
    r.on_epoch_ready(2)
    actions = r.on_signal("HUP")  # epochs 0, 1, 2 alive (0 and 1 still draining)
    assert SignalEpoch(0, "INT") in actions and spawned(actions) == [3]


def test_a_bad_config_on_reload_leaves_the_serving_epoch_alone() -> None:
    r = Restarter()
    r.on_start()
    r.on_epoch_ready(0)
    r.on_signal("HUP")
    actions = r.on_epoch_exit(1, 1)  # config error
    assert not spawned(actions) and not any(isinstance(a, Exit) for a in actions)
    assert r.reload_failures == 1 and r.live == {0}
    assert spawned(r.on_signal("HUP")) == [2]  # the next HUP is tried again


def test_old_epoch_finishing_its_drain_is_not_a_crash() -> None:
    r = Restarter()
    r.on_start()
    r.on_epoch_ready(0)
    r.on_signal("HUP")
    r.on_epoch_ready(1)
    assert spawned(r.on_epoch_exit(0, 0)) == []


def test_newest_epoch_killed_while_an_old_one_drains_is_relaunched() -> None:
    r = Restarter()
    r.on_start()
    r.on_epoch_ready(0)
    r.on_signal("HUP")
    r.on_epoch_ready(1)
    assert spawned(r.on_epoch_exit(1, -9)) == [2]


def test_hup_during_shutdown_is_ignored() -> None:
    r = Restarter()
    r.on_start()
    r.on_signal("TERM")
    assert spawned(r.on_signal("HUP")) == []


def test_sd_notify_states_follow_the_reload() -> None:
    r = Restarter()
    r.on_start()
    states = [a.state for a in r.on_epoch_ready(0) if isinstance(a, Notify)]
    assert states[0].startswith("READY=1\nSTATUS=epoch 0 serves")
    states = [a.state for a in r.on_signal("HUP") if isinstance(a, Notify)]
    assert states[0].startswith("RELOADING=1\n")
    states = [a.state for a in r.on_epoch_exit(1, 1) if isinstance(a, Notify)]
    assert states[0].startswith("READY=1\nSTATUS=reload failed: epoch 1 exited with 1")


def test_relaunch_backoff_is_capped_by_the_flag() -> None:
    r = Restarter(backoff_max_s=1.0)
    r.on_start()
    delays = []
    for epoch in range(6):
        delays += [a.delay_s for a in r.on_epoch_exit(epoch, -9) if isinstance(a, SpawnEpoch)]
    assert delays == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_term_during_relaunch_backoff_exits_without_starting_the_epoch() -> None:
    r = Restarter()
    r.on_start()
    (spawn,) = [a for a in r.on_epoch_exit(0, -9) if isinstance(a, SpawnEpoch)]
    r.on_signal("TERM")  # the agent is still sleeping the backoff before spawn.epoch
    assert r.on_epoch_exit(spawn.epoch, 0) == [Exit(0)]
