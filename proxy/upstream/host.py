"""One upstream endpoint as a worker sees it (Envoy's ``HostImpl``), with its per-worker counters.

A ``Host`` belongs to one worker's cluster: ``rq_active`` / ``cx_active`` / ``healthy`` are
plain attributes (and the per-host counters) that the data path and the load balancer read and write without locks (each
worker is one thread). Identity is the object: pools and maps may key on the host itself.

The address is an IP literal (a resolved one for DNS clusters). A LOGICAL_DNS host keeps its
identity when DNS moves it: ``set_address`` updates ``address`` and ``address_string`` together,
so assign through it, never to ``address`` directly.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Host", "format_host_address"]


def format_host_address(address: str, port: int) -> str:
    """``ip:port``, with an IPv6 address in brackets (Envoy's ``Address::asString``)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class Host:
    """An upstream endpoint: address, port, weight, priority; counters owned by the worker."""

    __slots__ = (
        "address",
        "port",
        "hostname",
        "weight",
        "priority",
        "locality_weight",
        "address_string",
        "rq_active",
        "cx_active",
        "healthy",
        "ejected",
        "outlier",
        "cx_total",
        "cx_connect_fail",
        "rq_total",
        "rq_success",
        "rq_error",
        "rq_timeout",
    )

    def __init__(
        self,
        address: str,
        port: int,
        hostname: str = "",
        weight: int = 1,
        priority: int = 0,
        locality_weight: int | None = None,
    ) -> None:
        self.address = address
        self.port = port
        # Endpoint.hostname, or the DNS name of a DNS cluster's endpoint; "" for a STATIC
        # endpoint without one. Used by auto_host_rewrite.
        self.hostname = hostname
        self.weight = weight
        self.priority = priority
        # LocalityLbEndpoints.load_balancing_weight; kept for display only: as in Envoy, it
        # shapes traffic only with locality_weighted_lb_config, which trioxy refuses.
        self.locality_weight = locality_weight
        self.address_string = format_host_address(address, port)
        self.rq_active = 0
        self.cx_active = 0
        self.healthy = True
        # Outlier detection (proxy.upstream.outlier_detection), apart from active health
        # checking's ``healthy``: the balancer uses a host when ``healthy and not ejected``.
        self.ejected = False
        self.outlier: Any = None  # its HostMonitor when the cluster has outlier_detection
        # Envoy's per-host stats (shown by admin /clusters, not in /stats): plain ints of
        # this worker, summed over the epoch's workers when admin asks.
        self.cx_total = 0
        self.cx_connect_fail = 0
        self.rq_total = 0
        self.rq_success = 0
        self.rq_error = 0
        self.rq_timeout = 0

    def set_address(self, address: str, port: int | None = None) -> None:
        """Move the host (LOGICAL_DNS re-resolution); existing connections are unaffected."""
        self.address = address
        if port is not None:
            self.port = port
        self.address_string = format_host_address(self.address, self.port)

    def __repr__(self) -> str:
        extra = f" hostname={self.hostname!r}" if self.hostname else ""
        return (
            f"<Host {self.address_string}{extra} weight={self.weight} priority={self.priority}"
            f" healthy={self.healthy} rq_active={self.rq_active} cx_active={self.cx_active}>"
        )
