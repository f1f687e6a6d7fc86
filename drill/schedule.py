"""Scenario schedules from a seed: the same seed gives the same drill, step for step.

Only the choices are here (which action, how long to wait, which victim among those alive);
the scenario shell performs them. The victim is drawn as a fraction ``pick`` in [0, 1)
because which pids exist is known only when the step runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

HUP = "hup"
KILL_WORKER = "kill_worker"
KILL_NEW_MID_HANDOVER = "kill_newest_mid_handover"
KILL_OLD_MID_DRAIN = "kill_oldest_mid_drain"
CONFIG_FLIP = "config_flip"
BROKEN_CONFIG = "broken_config"

# How often each action comes up once every one has (see chaos_schedule): plain reloads and
# config flips are what production sees most; kills are rarer and each costs a relaunch.
CHAOS_WEIGHTS: dict[str, int] = {
    HUP: 3,
    KILL_WORKER: 2,
    KILL_NEW_MID_HANDOVER: 1,
    KILL_OLD_MID_DRAIN: 1,
    CONFIG_FLIP: 2,
    BROKEN_CONFIG: 1,
}


@dataclass(frozen=True)
class ChaosStep:
    action: str
    pause_s: float  # wait this long before the step
    pick: float  # in [0, 1): which victim, and where inside a handover or a drain to strike


def chaos_schedule(seed: int, steps: int, interval_s: float,
                   weights: dict[str, int] | None = None) -> list[ChaosStep]:
    """``steps`` chaos steps drawn from ``seed``.

    The first steps are every action once, in a seeded order, so that even a short CI drill
    covers each kind; the rest are drawn by weight. Pauses are ``interval_s`` give or take
    half, so restarts do not fall in lockstep with the drain timers.
    """
    if steps < 0:
        raise ValueError("steps must not be negative")
    w = dict(CHAOS_WEIGHTS if weights is None else weights)
    kinds = sorted(k for k, v in w.items() if v > 0)
    if not kinds:
        raise ValueError("no chaos action has a positive weight")
    rng = random.Random(seed)
    first = kinds[:]
    rng.shuffle(first)
    actions = first[:steps]
    actions += rng.choices(kinds, weights=[w[k] for k in kinds], k=max(0, steps - len(first)))
    return [ChaosStep(a, round(interval_s * rng.uniform(0.5, 1.5), 3), rng.random())
            for a in actions]


def concurrency_schedule(seed: int, steps: int, start: int, maximum: int) -> list[int]:
    """The ``--concurrency`` of each restart: within 1..maximum, never the previous value,
    and going both up and down (a shrink is where queued connections could be lost)."""
    if maximum < 2:
        raise ValueError("--max-concurrency must be at least 2 to change anything")
    rng = random.Random(seed)
    out: list[int] = []
    prev = start
    for i in range(steps):
        # Alternate direction where possible so both growing and shrinking are exercised.
        up = [c for c in range(prev + 1, maximum + 1)]
        down = [c for c in range(1, prev)]
        pool = (up or down) if i % 2 == 0 else (down or up)
        prev = rng.choice(pool)
        out.append(prev)
    return out


def upgrade_schedule(steps: int) -> list[str]:
    """N → N+1 → N → ...: ``steps`` restarts alternating the other version and ours."""
    return ["other" if i % 2 == 0 else "ours" for i in range(steps)]
