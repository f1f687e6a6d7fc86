"""The ORIGINAL_DST cluster's load balancer (Envoy's ``OriginalDstCluster``), sans-IO.

Theory of operation
-------------------
1. The host of a request or connection is its original destination, in Envoy's order: the
   ``use_http_header`` header (``x-envoy-original-dst-host`` unless ``http_header_name``; the
   first value, an ``ip:port``; a bad one counts ``original_dst_host_invalid`` and is
   ignored), else the downstream connection's local address when a listener filter restored
   it (``original_dst``, PROXY protocol). Neither: no host (the caller answers ``UH``).
   ``upstream_port_override`` replaces the port.
2. Hosts are made on demand, one per ``ip:port``, in the worker that needs them (each worker
   has its own, as each has its own connection pools); membership stats follow.
3. ``cleanup()`` runs every ``cleanup_interval`` (the cluster manager's timer): a host picked
   since the last cleanup is kept (and unmarked); so is one with connections or requests in
   flight (pooled idle connections count: Envoy keeps hosts "in any of the connection pools");
   the others are removed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from proxy.upstream.cluster_config import ClusterConfig, OriginalDstLbConfig
from proxy.upstream.host import Host, format_host_address
from proxy.upstream.load_balancer import LoadBalancerContext

__all__ = ["OriginalDstLoadBalancer", "downstream_context", "parse_ip_port"]


def parse_ip_port(text: str) -> tuple[str, int] | None:
    """``1.2.3.4:80`` or ``[::1]:80`` (Envoy's ``parseInternetAddressAndPortNoThrow``)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            return None
        family: Any = ipaddress.IPv6Address
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            return None
        family = ipaddress.IPv4Address
    if not port.isascii() or not port.isdigit() or int(port) > 65535 or "%" in host:
        return None
    try:
        return str(family(host)), int(port)
    except ValueError:
        return None


class OriginalDstLoadBalancer:
    """One worker's ORIGINAL_DST hosts, keyed by ``ip:port``."""

    def __init__(self, config: ClusterConfig, on_membership: Callable[[list[Host]], None],
                 invalid_counter: Any = None) -> None:
        self.config = config
        self.lb_config: OriginalDstLbConfig = config.original_dst or OriginalDstLbConfig()
        self.hosts: dict[str, Host] = {}
        self._used: set[str] = set()
        self._on_membership = on_membership
        self.invalid_counter = invalid_counter  # cluster.<name>.original_dst_host_invalid
        self.panic_counter: Any = None  # never in panic: the interface of LoadBalancer

    def update_hosts(self, hosts: Any) -> None:
        """Membership is ours (made on demand); nothing to rebuild."""

    def choose_host(self, ctx: Any = None) -> Host | None:
        if ctx is None:
            return None
        dst = self._override_host(ctx)
        if dst is None:
            dst = getattr(ctx, "restored_local_address", None)
            if dst is None:
                return None
        port = self.lb_config.upstream_port_override
        if port is not None:
            dst = (dst[0], port)
        key = format_host_address(dst[0], dst[1])
        host = self.hosts.get(key)
        if host is None:
            host = self.hosts[key] = Host(dst[0], dst[1])
            self._on_membership(list(self.hosts.values()))
        self._used.add(key)
        return host

    def _override_host(self, ctx: Any) -> tuple[str, int] | None:
        name = self.lb_config.http_header_name
        headers = getattr(ctx, "downstream_headers", None)
        if name is None or headers is None:
            return None
        value = headers.get(name)  # the first one: the header is untrusted (Envoy)
        if value is None:
            return None
        parsed = parse_ip_port(value)
        if parsed is None and self.invalid_counter is not None:
            self.invalid_counter.inc()
        return parsed

    def cleanup(self) -> int:
        """Remove the hosts nobody picked or uses since the last cleanup; how many went."""
        stale = [key for key, h in self.hosts.items()
                 if key not in self._used and not h.cx_active and not h.rq_active]
        self._used.clear()
        for key in stale:
            del self.hosts[key]
        if stale:
            self._on_membership(list(self.hosts.values()))
        return len(stale)


def downstream_context(conn: Any, headers: Any = None,
                       hash_key: int | None = None) -> LoadBalancerContext:
    """The balancer context of a request or connection to an ORIGINAL_DST cluster."""
    restored = conn.local_address if conn.stream_info.downstream_local_address_restored else None
    return LoadBalancerContext(hash_key, restored, headers)
