"""ClusterManager: static clusters, DNS resolution and refresh, stats, under trio.

Real resolution uses "localhost" (answered from /etc/hosts, no network). Everything else about
DNS goes through trio's own hook, ``trio.socket.set_custom_hostname_resolver``, with a table the
test edits, and runs on ``autojump_clock`` so that refresh intervals take no time.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio
import trio.testing

from proxy.stats import Store
from proxy.upstream.cluster_config import (
    ClusterConfig,
    DiscoveryType,
    DnsLookupFamily,
    EndpointSpec,
    LbPolicy,
)
from proxy.upstream.cluster_manager import (
    CLUSTER_COUNTERS,
    CLUSTER_GAUGES,
    DNS_RESOLVE_TIMEOUT_S,
    ClusterManager,
    resolve_name,
)
from proxy.upstream.load_balancer import LoadBalancerContext


def static_cluster(name: str = "static", *addrs: str, **kw: Any) -> ClusterConfig:
    return ClusterConfig(name=name, endpoints=tuple(EndpointSpec(a, 8000 + i)
                                                    for i, a in enumerate(addrs)), **kw)


def dns_cluster(name: str, *dns_names: str, type: DiscoveryType = DiscoveryType.STRICT_DNS,
                family: DnsLookupFamily = DnsLookupFamily.V4_ONLY, refresh: float = 5.0,
                **kw: Any) -> ClusterConfig:
    return ClusterConfig(
        name=name, type=type, dns_lookup_family=family, dns_refresh_rate=refresh,
        endpoints=tuple(EndpointSpec(n, 9000 + i, hostname=n, weight=2, priority=0)
                        for i, n in enumerate(dns_names)), **kw)


def stat(store: Store, cluster: str, name: str) -> int:
    full = f"cluster.{cluster}.{name}"
    if full in store.counters:
        return store.counters[full].value
    return store.gauges[full].value


# ----------------------------------------------------------------------------- fake DNS
class FakeResolver(trio.abc.HostnameResolver):
    """name -> {family: [addresses]}, or an exception to raise, or a trio.Event to wait on."""

    def __init__(self) -> None:
        self.table: dict[str, Any] = {}
        self.calls: list[tuple[str, int]] = []

    async def getaddrinfo(self, host: bytes | None, port: Any, family: int = 0, type: int = 0,
                          proto: int = 0, flags: int = 0) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        self.calls.append((name, family))
        entry = self.table.get(name)
        if isinstance(entry, trio.Event):
            await entry.wait()
            entry = self.table.get(name)
        if entry is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if isinstance(entry, BaseException):
            raise entry
        out = []
        for fam in (socket.AF_INET6, socket.AF_INET):
            if family not in (0, fam):
                continue
            for addr in entry.get(fam, []):
                sockaddr = (addr, 0, 0, 0) if fam == socket.AF_INET6 else (addr, 0)
                out.append((fam, socket.SOCK_STREAM, 6, "", sockaddr))
        if not out:
            raise socket.gaierror(socket.EAI_ADDRFAMILY, "Address family for hostname not supported")
        return out

    async def getnameinfo(self, sockaddr: Any, flags: int) -> Any:  # pragma: no cover
        raise NotImplementedError


@pytest.fixture
async def fake_dns() -> FakeResolver:
    resolver = FakeResolver()
    trio.socket.set_custom_hostname_resolver(resolver)
    return resolver


def v4(*addrs: str) -> dict[int, list[str]]:
    return {socket.AF_INET: list(addrs)}


# ----------------------------------------------------------------------------- static
async def test_static_cluster_hosts_stats_and_get() -> None:
    store = Store()
    cm = ClusterManager({"static": static_cluster("static", "10.0.0.1", "10.0.0.2")}, store)
    cluster = cm.get("static")
    assert cluster is not None and cm.get("nope") is None
    assert cluster.name == "static"
    assert [h.address_string for h in cluster.hosts] == ["10.0.0.1:8000", "10.0.0.2:8001"]
    assert {cluster.choose_host(), cluster.choose_host()} == set(cluster.hosts)
    assert cluster.pools == {}
    assert stat(store, "static", "membership_total") == 2
    assert stat(store, "static", "membership_healthy") == 2
    # The typed stats are the very objects the Scope hands out by name.
    for name in CLUSTER_COUNTERS:
        assert getattr(cluster.cluster_stats, name) is cluster.stats.counter(name)
        assert f"cluster.static.{name}" in store.counters
    for name in CLUSTER_GAUGES:
        assert getattr(cluster.cluster_stats, name) is cluster.stats.gauge(name)
    async with trio.open_nursery() as nursery:
        await nursery.start(cm.run)  # nothing to resolve: started at once, and returns


def test_envoy_stat_names() -> None:
    for name in ("upstream_cx_total", "upstream_cx_connect_fail", "upstream_cx_connect_timeout",
                 "upstream_cx_destroy", "upstream_rq_total", "upstream_rq_completed",
                 "upstream_rq_timeout", "upstream_rq_retry", "upstream_cx_none_healthy",
                 "update_attempt", "update_success", "update_failure"):
        assert name in CLUSTER_COUNTERS
    for name in ("upstream_cx_active", "upstream_rq_active", "membership_total",
                 "membership_healthy"):
        assert name in CLUSTER_GAUGES


async def test_refresh_health_and_hash_context() -> None:
    cm = ClusterManager({"c": static_cluster("c", "10.0.0.1", "10.0.0.2", "10.0.0.3",
                                             lb_policy=LbPolicy.RING_HASH)}, Store())
    cluster = cm.get("c")
    assert cluster is not None
    ctx = LoadBalancerContext(2**63 + 5)
    host = cluster.choose_host(ctx)
    assert host is not None and cluster.choose_host(ctx) is host
    host.healthy = False
    cluster.refresh_health()
    assert cluster.cluster_stats.membership_healthy.value == 2
    assert cluster.choose_host(ctx) is not host


async def test_empty_cluster_has_no_host() -> None:
    cm = ClusterManager({"empty": ClusterConfig(name="empty")}, Store())
    cluster = cm.get("empty")
    assert cluster is not None and cluster.choose_host() is None


# ----------------------------------------------------------------------------- real DNS
async def test_strict_dns_localhost() -> None:
    store = Store()
    cm = ClusterManager({"local": dns_cluster("local", "localhost")}, store)
    cluster = cm.get("local")
    assert cluster is not None and cluster.hosts == []
    assert cluster.choose_host() is None  # not resolved yet: 503 UH
    async with trio.open_nursery() as nursery:
        await nursery.start(cm.run)
        assert [h.address_string for h in cluster.hosts] == ["127.0.0.1:9000"]
        host = cluster.choose_host()
        assert host is not None
        assert (host.hostname, host.weight) == ("localhost", 2)
        assert stat(store, "local", "update_attempt") == 1
        assert stat(store, "local", "update_success") == 1
        assert stat(store, "local", "membership_total") == 1
        nursery.cancel_scope.cancel()


async def test_resolve_name_localhost_auto_falls_back_to_v4() -> None:
    addrs = await resolve_name("localhost", DnsLookupFamily.AUTO)
    assert addrs and all(a in ("127.0.0.1", "::1") for a in addrs)
    assert await resolve_name("localhost", DnsLookupFamily.V4_ONLY) == ["127.0.0.1"]
    assert await resolve_name("127.0.0.1", DnsLookupFamily.V4_ONLY) == ["127.0.0.1"]


# ----------------------------------------------------------------------------- fake DNS
async def test_lookup_families(fake_dns: FakeResolver) -> None:
    fake_dns.table["both"] = {socket.AF_INET: ["10.0.0.1"], socket.AF_INET6: ["fd00::1"]}
    fake_dns.table["v4"] = v4("10.0.0.2")
    fake_dns.table["v6"] = {socket.AF_INET6: ["fd00::2"]}
    assert await resolve_name("both", DnsLookupFamily.AUTO) == ["fd00::1"]
    assert await resolve_name("v4", DnsLookupFamily.AUTO) == ["10.0.0.2"]
    assert await resolve_name("both", DnsLookupFamily.V4_PREFERRED) == ["10.0.0.1"]
    assert await resolve_name("v6", DnsLookupFamily.V4_PREFERRED) == ["fd00::2"]
    assert await resolve_name("both", DnsLookupFamily.V4_ONLY) == ["10.0.0.1"]
    assert await resolve_name("both", DnsLookupFamily.V6_ONLY) == ["fd00::1"]
    assert set(await resolve_name("both", DnsLookupFamily.ALL)) == {"10.0.0.1", "fd00::1"}
    assert await resolve_name("v6", DnsLookupFamily.V4_ONLY) == []
    assert await resolve_name("missing", DnsLookupFamily.AUTO) == []
    fake_dns.calls.clear()
    await resolve_name("v4", DnsLookupFamily.AUTO)
    assert fake_dns.calls == [("v4", socket.AF_INET6), ("v4", socket.AF_INET)]


async def test_ipv6_host_address_string(fake_dns: FakeResolver, autojump_clock: Any) -> None:
    fake_dns.table["v6"] = {socket.AF_INET6: ["fd00::2"]}
    cm = ClusterManager({"c": dns_cluster("c", "v6", family=DnsLookupFamily.AUTO)}, Store())
    async with trio.open_nursery() as nursery:
        await nursery.start(cm.run)
        cluster = cm.get("c")
        assert cluster is not None
        assert [h.address_string for h in cluster.hosts] == ["[fd00::2]:9000"]
        nursery.cancel_scope.cancel()


async def test_strict_dns_refresh_keeps_host_identity(fake_dns: FakeResolver,
                                                      autojump_clock: Any) -> None:
    fake_dns.table["a"] = v4("10.0.0.1", "10.0.0.2")
    fake_dns.table["b"] = v4("10.0.1.1")
    store = Store()
    cm = ClusterManager({"c": dns_cluster("c", "a", "b", refresh=2.0)}, store)
    cluster = cm.get("c")
    assert cluster is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(cm.run)
        assert [h.address for h in cluster.hosts] == ["10.0.0.1", "10.0.0.2", "10.0.1.1"]
        assert stat(store, "c", "update_attempt") == 2  # one per name
        kept = cluster.hosts[1]
        kept.rq_active = 3
        changes = stat(store, "c", "membership_change")

        fake_dns.table["a"] = v4("10.0.0.2", "10.0.0.3")
        await trio.sleep(2.5)
        assert [h.address for h in cluster.hosts] == ["10.0.0.2", "10.0.0.3", "10.0.1.1"]
        assert cluster.hosts[0] is kept and kept.rq_active == 3
        assert stat(store, "c", "update_attempt") == 4
        assert stat(store, "c", "update_success") == 4
        assert stat(store, "c", "update_no_rebuild") == 1  # "b" did not change
        assert stat(store, "c", "membership_change") == changes + 1
        assert stat(store, "c", "membership_total") == 3

        # Same addresses in another order: nothing to rebuild.
        fake_dns.table["a"] = v4("10.0.0.3", "10.0.0.2")
        await trio.sleep(2.0)
        assert [h.address for h in cluster.hosts] == ["10.0.0.2", "10.0.0.3", "10.0.1.1"]
        assert stat(store, "c", "update_no_rebuild") == 3
        nursery.cancel_scope.cancel()


async def test_failure_keeps_last_good_hosts(fake_dns: FakeResolver,
                                             autojump_clock: Any) -> None:
    fake_dns.table["a"] = v4("10.0.0.1")
    store = Store()
    cm = ClusterManager({"c": dns_cluster("c", "a", refresh=1.0)}, store)
    cluster = cm.get("c")
    assert cluster is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(cm.run)
        fake_dns.table["a"] = socket.gaierror(socket.EAI_AGAIN, "Temporary failure")
        await trio.sleep(3.5)
        assert [h.address for h in cluster.hosts] == ["10.0.0.1"]
        assert stat(store, "c", "update_failure") == 3
        assert stat(store, "c", "update_success") == 1
        assert cluster.choose_host() is cluster.hosts[0]
        # A name that no longer exists is an answer (Envoy: success, no records): no hosts.
        del fake_dns.table["a"]
        await trio.sleep(1.0)
        assert cluster.hosts == [] and cluster.choose_host() is None
        assert stat(store, "c", "update_success") == 2
        nursery.cancel_scope.cancel()


async def test_first_failure_still_starts(fake_dns: FakeResolver, autojump_clock: Any) -> None:
    fake_dns.table["a"] = OSError("resolver exploded")
    store = Store()
    cm = ClusterManager({"c": dns_cluster("c", "a")}, store)
    async with trio.open_nursery() as nursery:
        await nursery.start(cm.run)
        assert stat(store, "c", "update_failure") == 1
        cluster = cm.get("c")
        assert cluster is not None and cluster.choose_host() is None
        nursery.cancel_scope.cancel()


async def test_started_waits_for_every_first_resolution(fake_dns: FakeResolver,
                                                        autojump_clock: Any) -> None:
    gate = trio.Event()
    fake_dns.table["slow"] = gate
    fake_dns.table["fast"] = v4("10.0.0.1")
    cm = ClusterManager({"fast": dns_cluster("fast", "fast"),
                         "slow": dns_cluster("slow", "slow"),
                         "static": static_cluster("static", "10.9.9.9")}, Store())
    started = trio.Event()

    async def start(nursery: trio.Nursery) -> None:
        await nursery.start(cm.run)
        started.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(start, nursery)
        await trio.testing.wait_all_tasks_blocked()
        assert not started.is_set()
        fast = cm.get("fast")
        assert fast is not None and len(fast.hosts) == 1
        fake_dns.table["slow"] = v4("10.0.0.2")
        gate.set()
        await started.wait()
        slow = cm.get("slow")
        assert slow is not None and [h.address for h in slow.hosts] == ["10.0.0.2"]
        nursery.cancel_scope.cancel()


async def test_hung_resolution_times_out(fake_dns: FakeResolver, autojump_clock: Any) -> None:
    fake_dns.table["hang"] = trio.Event()  # never set
    store = Store()
    cm = ClusterManager({"c": dns_cluster("c", "hang")}, store)
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(cm.run)
        assert trio.current_time() - t0 == pytest.approx(DNS_RESOLVE_TIMEOUT_S)
        assert stat(store, "c", "update_failure") == 1
        nursery.cancel_scope.cancel()


async def test_logical_dns_one_host_that_moves(fake_dns: FakeResolver,
                                               autojump_clock: Any) -> None:
    fake_dns.table["svc"] = v4("10.0.0.1", "10.0.0.2")
    store = Store()
    cm = ClusterManager({"l": dns_cluster("l", "svc", type=DiscoveryType.LOGICAL_DNS,
                                          refresh=1.0)}, store)
    cluster = cm.get("l")
    assert cluster is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(cm.run)
        assert [h.address_string for h in cluster.hosts] == ["10.0.0.1:9000"]
        host = cluster.hosts[0]
        assert host.hostname == "svc"
        fake_dns.table["svc"] = v4("10.0.0.7")
        await trio.sleep(1.5)
        assert cluster.hosts == [host] and host.address_string == "10.0.0.7:9000"
        assert cluster.choose_host() is host
        # An empty answer does not take the logical host away (Envoy: counted as a failure).
        del fake_dns.table["svc"]
        await trio.sleep(1.0)
        assert cluster.hosts == [host] and host.address == "10.0.0.7"
        assert stat(store, "l", "update_failure") == 1
        assert stat(store, "l", "membership_total") == 1
        nursery.cancel_scope.cancel()
