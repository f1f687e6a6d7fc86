"""Envoy's load balancers, sans-IO: pick a host of a cluster for one request or connection.

Theory of operation
-------------------
1. Priorities (Envoy's ``LoadBalancerBase``). Hosts are grouped by priority into dense levels
   ``0..max``. A level's health is ``min(100, 140 * healthy // total)`` (overprovisioning factor
   1.4, integer percent); the normalized total health is ``min(100, sum)``; each level gets
   ``health * 100 // total`` percent of the load, in priority order, until 100 is spent, and the
   rounding remainder goes to the first level with health > 0 (``compute_priority_load``).
2. Panic (threshold 50 %, runtime ``upstream.healthy_panic_threshold``): unless the total health
   is 100, a level whose healthy share is under the threshold balances over *all* its hosts.
   When every level is in panic, load is split by host count instead of health. So a cluster
   with hosts always yields one; ``None`` means no host at all (or threshold 0 and none healthy).
3. A pick: choose the level (``hash % 100 + 1`` against the cumulative loads; the hash is the
   request's for the hashing balancers, a random draw otherwise), then ask that level's picker.
   With one level taking 100 % the level choice is skipped (the common case).
4. Pickers, per level and per source (healthy hosts, or all hosts in panic):
   - ROUND_ROBIN: equal weights rotate through the list from a random start (Envoy's seed).
     Unequal weights follow Envoy's EDF schedule (deadline ``k / weight``, FIFO on ties); when
     one cycle (``sum(weights) / gcd``) is at most ``MAX_PRECOMPUTED_SCHEDULE`` picks it is
     computed once and rotated through, so a pick is O(1) either way; longer cycles run the EDF
     heap live (O(log n)).
   - LEAST_REQUEST: equal weights: ``choice_count`` random hosts, the one with the fewest
     ``rq_active`` wins (the first on ties). Unequal weights: live EDF with Envoy's dynamic
     weight ``weight / (rq_active + 1) ** 1.0``, recomputed when a host is re-inserted.
   - RANDOM: a uniform pick; weights are ignored, as in Envoy's ``RandomLoadBalancer``.
   - RING_HASH: Envoy's ketama ring: weights normalized, ``scale = min(ceil(min_w * min_size)
     / min_w, max_size)``, each host adds ``hash64(f"{address_string}_{i}")`` points while the
     running count is under the running target; lookup is the first point >= hash (wrapping).
   - MAGLEV: Envoy's table (paper listing 1 with weights): hosts sorted by address, offset
     ``hash64(key) % M``, skip ``hash64(b"\\x01" + key) % (M - 1) + 1``; on each round a host
     takes its next free slot when ``round * weight >= target`` (target += max weight).
   Without a hash key the hashing balancers use a random one (Envoy does the same).
5. Host health and membership live on the hosts; after changing them call ``update_hosts``
   (the cluster manager does, after DNS). Round-robin positions survive an update, as in Envoy.
   ``hash64`` (BLAKE2b) stands in for Envoy's xxHash64: rings and tables are stable across
   workers and restarts, but do not match Envoy's host-for-key assignment bit for bit.
"""

from __future__ import annotations

import heapq
import math
import random
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from proxy.common.hash import hash64
from proxy.upstream.cluster_config import ClusterConfig, LbPolicy
from proxy.upstream.host import Host

__all__ = [
    "MAX_PRECOMPUTED_SCHEDULE",
    "OVERPROVISIONING_FACTOR",
    "LeastRequestLoadBalancer",
    "LoadBalancer",
    "LoadBalancerContext",
    "MaglevLoadBalancer",
    "PriorityLoad",
    "RandomLoadBalancer",
    "RingHashLoadBalancer",
    "RoundRobinLoadBalancer",
    "build_maglev_table",
    "build_ring",
    "compute_priority_load",
    "create_load_balancer",
    "edf_schedule",
]

OVERPROVISIONING_FACTOR = 140  # percent; Envoy's kDefaultOverProvisioningFactor
MAX_PRECOMPUTED_SCHEDULE = 1 << 16  # longest weighted round-robin cycle kept as a list
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class LoadBalancerContext:
    """What a request tells the balancer: its hash (from the route's hash policy), if any."""

    hash_key: int | None = None
    # For ORIGINAL_DST clusters (proxy.upstream.original_dst_cluster): the downstream
    # connection's local address when a listener filter restored it, and the request headers.
    restored_local_address: tuple[str, int] | None = None
    downstream_headers: Any = None


# ----------------------------------------------------------------------------- priorities
@dataclass(frozen=True, slots=True)
class PriorityLoad:
    """Per level: percent of picks (sums to 100) and whether it balances over all its hosts."""

    loads: tuple[int, ...]
    panic: tuple[bool, ...]
    health: tuple[int, ...]


def compute_priority_load(levels: Sequence[tuple[int, int]],
                          panic_threshold: int = 50) -> PriorityLoad:
    """Envoy's per-priority load and panic for ``(healthy, total)`` host counts per level."""
    if not levels:
        levels = [(0, 0)]
    n = len(levels)
    health = [0 if total == 0 else min(100, OVERPROVISIONING_FACTOR * healthy // total)
              for healthy, total in levels]
    normalized_total = min(100, sum(health))
    loads = [0] * n
    if normalized_total > 0:
        remaining = 100
        first_available = -1
        for i, h in enumerate(health):
            if first_available < 0 and h > 0:
                first_available = i
            loads[i] = min(remaining, h * 100 // normalized_total)
            remaining -= loads[i]
        if remaining:
            loads[first_available] += remaining  # rounding errors go to the first healthy level
    threshold = min(100, panic_threshold)
    if threshold <= 0 and normalized_total == 0:
        # Panic disabled and nothing healthy: P=0 takes the (unservable) load.
        return PriorityLoad((100,) + (0,) * (n - 1), (False,) * n, tuple(health))
    panic = [
        normalized_total != 100 and (0.0 if total == 0 else 100.0 * healthy / total) < threshold
        for healthy, total in levels
    ]
    if all(panic):
        # Total panic: split by host count, regardless of health.
        total_hosts = sum(total for _, total in levels)
        if total_hosts == 0:
            loads = [100] + [0] * (n - 1)
        else:
            loads = [100 * total // total_hosts for _, total in levels]
            first_nonempty = next(i for i, (_, total) in enumerate(levels) if total)
            loads[first_nonempty] += 100 - sum(loads)
    return PriorityLoad(tuple(loads), tuple(panic), tuple(health))


# ----------------------------------------------------------------------------- base
class LoadBalancer:
    """The priority and panic logic shared by every policy; subclasses pick within a level."""

    def __init__(self, config: ClusterConfig, hosts: Sequence[Host], rng: random.Random) -> None:
        self.config = config
        self._rng = rng
        self._panic_threshold = config.healthy_panic_threshold
        # cluster.<name>.lb_healthy_panic (anything with ``inc()``): each pick made in panic
        self.panic_counter: Any = None
        self.hosts: list[Host] = []
        self.priority_load = compute_priority_load([])
        self._cumulative: tuple[int, ...] = (100,)
        self._pickers: list[Callable[..., Host] | None] = [None]
        self._only: Callable[..., Host] | None = None
        self.update_hosts(hosts)

    def update_hosts(self, hosts: Sequence[Host]) -> None:
        """Rebuild after a membership or health change (Envoy's priority update callback)."""
        self.hosts = list(hosts)
        n_levels = max((h.priority for h in self.hosts), default=0) + 1
        levels: list[list[Host]] = [[] for _ in range(n_levels)]
        for h in self.hosts:
            levels[h.priority].append(h)
        # An outlier-ejected host counts as unhealthy (Envoy's FAILED_OUTLIER_CHECK flag).
        healthy = [[h for h in level if h.healthy and not h.ejected] for level in levels]
        pl = compute_priority_load(
            [(len(hl), len(level)) for hl, level in zip(healthy, levels, strict=True)],
            self._panic_threshold)
        self.priority_load = pl
        self._cumulative = tuple(accumulate(pl.loads))
        pickers: list[Callable[..., Host] | None] = []
        for p in range(n_levels):
            source = levels[p] if pl.panic[p] else healthy[p]
            picker = self._build_picker(p, pl.panic[p], source) if source else None
            if picker is not None and pl.panic[p]:
                picker = self._counting_panic(picker)
            pickers.append(picker)
        self._pickers = pickers
        full = [p for p, load in enumerate(pl.loads) if load == 100]
        self._only = pickers[full[0]] if full else None

    def choose_host(self, ctx: LoadBalancerContext | None = None) -> Host | None:
        """The host for one request, or None when the cluster has no host to offer."""
        pick = self._only
        if pick is None:
            pick = self._pickers[self._choose_priority(self._rng.getrandbits(64))]
            if pick is None:
                return None
        return pick()

    def _counting_panic(self, picker: Callable[..., Host]) -> Callable[..., Host]:
        """Only panic levels pay for the count (Envoy's ``lb_healthy_panic``)."""

        def pick(*args: Any) -> Host:
            if self.panic_counter is not None:
                self.panic_counter.inc()
            return picker(*args)

        return pick

    def _choose_priority(self, hash_value: int) -> int:
        """Envoy's ``choosePriority``: ``hash % 100 + 1`` against the cumulative loads."""
        x = hash_value % 100 + 1
        for p, cum in enumerate(self._cumulative):
            if x <= cum:
                return p
        return 0  # unreachable: the loads sum to 100

    def _build_picker(self, priority: int, panic: bool,
                      hosts: list[Host]) -> Callable[..., Host]:
        raise NotImplementedError


def _weights_equal(hosts: Sequence[Host]) -> bool:
    w = hosts[0].weight
    return all(h.weight == w for h in hosts)


class _Rotation:
    """Round robin over a fixed sequence; the position is kept across rebuilds."""

    __slots__ = ("items", "n", "index")

    def __init__(self, items: list[Host], index: int) -> None:
        self.items = items
        self.n = len(items)
        self.index = index

    def pick(self) -> Host:
        i = self.index
        self.index = i + 1
        return self.items[i % self.n]


class _LiveEdf:
    """Envoy's EdfScheduler: pop the earliest deadline, re-insert at ``deadline + cost(host)``.

    ``cost`` is ``1 / weight`` (round robin) or ``(rq_active + 1) / weight`` (least request).
    """

    __slots__ = ("hosts", "heap", "order", "cost")

    def __init__(self, hosts: list[Host], cost: Callable[[Host], float], picks: int) -> None:
        self.hosts = hosts
        self.cost = cost
        self.heap = [(cost(h), i, i) for i, h in enumerate(hosts)]
        heapq.heapify(self.heap)
        self.order = len(hosts)
        for _ in range(picks):  # a random start, so workers do not move in lockstep
            self.pick()

    def pick(self) -> Host:
        deadline, _, i = self.heap[0]
        host = self.hosts[i]
        heapq.heapreplace(self.heap, (deadline + self.cost(host), self.order, i))
        self.order += 1
        return host


def edf_schedule(weights: Sequence[int]) -> list[int] | None:
    """One cycle of Envoy's EDF order as indices, or None if longer than the cap.

    Host ``i``'s ``k``-th deadline is ``k / w_i``; ties go to the earlier insertion. Over the
    cycle each index appears exactly ``w_i / gcd`` times.
    """
    g = math.gcd(*weights)
    w = [x // g for x in weights]
    total = sum(w)
    if total > MAX_PRECOMPUTED_SCHEDULE:
        return None
    heap = [(1 / wi, i, i) for i, wi in enumerate(w)]
    heapq.heapify(heap)
    order = len(w)
    picks = [1] * len(w)
    out: list[int] = []
    for _ in range(total):
        _, _, i = heap[0]
        out.append(i)
        picks[i] += 1
        heapq.heapreplace(heap, (picks[i] / w[i], order, i))
        order += 1
    return out


# ----------------------------------------------------------------------------- policies
class RoundRobinLoadBalancer(LoadBalancer):
    def __init__(self, config: ClusterConfig, hosts: Sequence[Host], rng: random.Random) -> None:
        self._seed = rng.getrandbits(32)
        self._rotations: dict[tuple[int, bool], _Rotation] = {}
        super().__init__(config, hosts, rng)

    def _build_picker(self, priority: int, panic: bool,
                      hosts: list[Host]) -> Callable[..., Host]:
        key = (priority, panic)
        old = self._rotations.get(key)
        index = self._seed if old is None else old.index
        if len(hosts) == 1 or _weights_equal(hosts):
            rotation = _Rotation(hosts, index)
        else:
            order = edf_schedule([h.weight for h in hosts])
            if order is None:
                return _LiveEdf(hosts, _inverse_weight,
                                self._rng.randrange(len(hosts))).pick
            rotation = _Rotation([hosts[i] for i in order], index)
        self._rotations[key] = rotation
        return rotation.pick


def _inverse_weight(host: Host) -> float:
    return 1.0 / host.weight


def _least_request_cost(host: Host) -> float:
    # Envoy: weight / (rq_active + 1) ** active_request_bias, with the default bias 1.0.
    return (host.rq_active + 1) / host.weight


class _NChoices:
    """Power of N choices on ``rq_active`` (Envoy's ``unweightedHostPickNChoices``)."""

    __slots__ = ("hosts", "n", "choices", "random")

    def __init__(self, hosts: list[Host], choices: int, rng: random.Random) -> None:
        self.hosts = hosts
        self.n = len(hosts)
        self.choices = choices
        self.random = rng.random

    def pick(self) -> Host:
        hosts, n, rnd = self.hosts, self.n, self.random
        best = hosts[int(rnd() * n)]
        for _ in range(self.choices - 1):
            sampled = hosts[int(rnd() * n)]
            if sampled.rq_active < best.rq_active:
                best = sampled
        return best

    def pick2(self) -> Host:
        """``pick`` unrolled for the default ``choice_count`` of 2 (P2C)."""
        hosts, n, rnd = self.hosts, self.n, self.random
        first = hosts[int(rnd() * n)]
        second = hosts[int(rnd() * n)]
        return second if second.rq_active < first.rq_active else first


class LeastRequestLoadBalancer(LoadBalancer):
    def _build_picker(self, priority: int, panic: bool,
                      hosts: list[Host]) -> Callable[..., Host]:
        if len(hosts) == 1:
            return _Rotation(hosts, 0).pick
        if _weights_equal(hosts):
            choices = self.config.least_request.choice_count
            picker = _NChoices(hosts, choices, self._rng)
            return picker.pick2 if choices == 2 else picker.pick
        return _LiveEdf(hosts, _least_request_cost, self._rng.randrange(len(hosts))).pick


class _Uniform:
    __slots__ = ("hosts", "n", "random")

    def __init__(self, hosts: list[Host], rng: random.Random) -> None:
        self.hosts = hosts
        self.n = len(hosts)
        self.random = rng.random

    def pick(self) -> Host:
        return self.hosts[int(self.random() * self.n)]


class RandomLoadBalancer(LoadBalancer):
    def _build_picker(self, priority: int, panic: bool,
                      hosts: list[Host]) -> Callable[..., Host]:
        return _Uniform(hosts, self._rng).pick


class _HashingLoadBalancer(LoadBalancer):
    """Ring hash and Maglev: the request's hash picks both the level and the host."""

    def choose_host(self, ctx: LoadBalancerContext | None = None) -> Host | None:
        h = None if ctx is None else ctx.hash_key
        h = self._rng.getrandbits(64) if h is None else h & _MASK64
        lookup = self._only
        if lookup is None:
            lookup = self._pickers[self._choose_priority(h)]
            if lookup is None:
                return None
        return lookup(h)


class _Lookup:
    """A sorted ring (``hashes``/``hosts``) or a Maglev table (``hosts`` only)."""

    __slots__ = ("hashes", "hosts", "size")

    def __init__(self, hashes: list[int] | None, hosts: list[Host]) -> None:
        self.hashes = hashes
        self.hosts = hosts
        self.size = len(hosts)

    def ring(self, h: int) -> Host:
        i = bisect_left(self.hashes, h)  # type: ignore[arg-type]
        return self.hosts[i if i < self.size else 0]

    def table(self, h: int) -> Host:
        return self.hosts[h % self.size]


def build_ring(hosts: Sequence[Host], minimum_ring_size: int,
               maximum_ring_size: int) -> tuple[list[int], list[Host]]:
    """Envoy's ``RingHashLoadBalancer::Ring``: sorted (hashes, hosts)."""
    total = sum(h.weight for h in hosts)
    normalized = [h.weight / total for h in hosts]
    min_w = min(normalized)
    scale = min(math.ceil(min_w * minimum_ring_size) / min_w, float(maximum_ring_size))
    entries: list[tuple[int, int]] = []
    current = 0.0
    target = 0.0
    for idx, (host, w) in enumerate(zip(hosts, normalized, strict=True)):
        prefix = f"{host.address_string}_"
        target += scale * w
        i = 0
        while current < target:
            entries.append((hash64(f"{prefix}{i}"), idx))
            i += 1
            current += 1
    entries.sort()
    return [e[0] for e in entries], [hosts[e[1]] for e in entries]


class RingHashLoadBalancer(_HashingLoadBalancer):
    def _build_picker(self, priority: int, panic: bool,
                      hosts: list[Host]) -> Callable[..., Host]:
        cfg = self.config.ring_hash
        hashes, ring_hosts = build_ring(hosts, cfg.minimum_ring_size, cfg.maximum_ring_size)
        return _Lookup(hashes, ring_hosts).ring


def build_maglev_table(hosts: Sequence[Host], table_size: int) -> list[Host]:
    """Envoy's ``OriginalMaglevTable``: ``table_size`` slots, each naming a host."""
    m = table_size
    order = sorted(range(len(hosts)), key=lambda i: (hosts[i].address_string, i))
    keys = [hosts[i].address_string.encode() for i in order]
    # Integer weights instead of Envoy's normalized doubles: the same rounds, exactly.
    weights = [hosts[i].weight for i in order]
    max_weight = max(weights)
    position = [hash64(k) % m for k in keys]  # offset, then advanced by skip
    skip = [hash64(b"\x01" + k) % (m - 1) + 1 for k in keys]
    target = [0] * len(keys)
    table = [-1] * m
    filled = 0
    n = len(keys)
    rnd = 1
    while filled < m:
        for i in range(n):
            if rnd * weights[i] < target[i]:
                continue
            target[i] += max_weight
            c, s = position[i], skip[i]
            while table[c] >= 0:
                c += s
                if c >= m:
                    c -= m
            table[c] = i
            c += s
            position[i] = c - m if c >= m else c
            filled += 1
            if filled == m:
                break
        rnd += 1
    by_slot = [hosts[i] for i in order]
    return [by_slot[i] for i in table]


class MaglevLoadBalancer(_HashingLoadBalancer):
    def _build_picker(self, priority: int, panic: bool,
                      hosts: list[Host]) -> Callable[..., Host]:
        return _Lookup(None, build_maglev_table(hosts, self.config.maglev.table_size)).table


_POLICIES: dict[LbPolicy, type[LoadBalancer]] = {
    LbPolicy.ROUND_ROBIN: RoundRobinLoadBalancer,
    LbPolicy.LEAST_REQUEST: LeastRequestLoadBalancer,
    LbPolicy.RANDOM: RandomLoadBalancer,
    LbPolicy.RING_HASH: RingHashLoadBalancer,
    LbPolicy.MAGLEV: MaglevLoadBalancer,
}


def create_load_balancer(config: ClusterConfig, hosts: Sequence[Host],
                         rng: random.Random) -> LoadBalancer:
    """The balancer of ``config.lb_policy`` over ``hosts`` (any priorities, any health)."""
    return _POLICIES[config.lb_policy](config, hosts, rng)
