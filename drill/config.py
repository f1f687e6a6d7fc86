"""Bootstraps for a drill: the built-in pair (flipped by chaos), a broken one, and what the
drill needs to know about a user's config (``-c``): its ports and stat prefix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

CONFIG_HEADER = "x-drill-config"  # which of the two built-in configs answered


@dataclass(frozen=True)
class Endpoints:
    http_port: int | None
    tcp_port: int | None
    admin_port: int | None
    http_stat_prefix: str | None
    tcp_stat_prefix: str | None
    host: str = "127.0.0.1"


def builtin_bootstrap(http_port: int, tcp_port: int, admin_port: int, upstream_port: int,
                      slow_port: int, variant: str = "a") -> str:
    """An HTTP listener (``/delay`` to the built-in upstream, the rest to ``upstream``), a
    tcp_proxy listener to ``upstream``, and admin, all on loopback.

    Variants ``a`` and ``b`` differ in a response header (so a flip is visible to clients)
    and in the cluster's connect timeout (so the new snapshot really is another one); the
    listeners are the same, so a flip hands over every socket.
    """
    if variant not in ("a", "b"):
        raise ValueError(f"variant must be a or b, not {variant!r}")
    timeout = "1s" if variant == "a" else "2s"

    def cluster(name: str, port: int) -> str:
        return f"""  - name: {name}
    type: STATIC
    connect_timeout: {timeout}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
"""

    return f"""# trioxy-drill built-in config, variant {variant}
static_resources:
  listeners:
  - name: drill_http
    address: {{socket_address: {{address: 127.0.0.1, port_value: {http_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: drill_http
          codec_type: AUTO
          route_config:
            response_headers_to_add:
            - header: {{key: {CONFIG_HEADER}, value: "{variant}"}}
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/delay"}}
                route: {{cluster: slow, timeout: 10s}}
              - match: {{prefix: "/"}}
                route: {{cluster: upstream}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  - name: drill_tcp
    address: {{socket_address: {{address: 127.0.0.1, port_value: {tcp_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: drill_tcp
          cluster: upstream
  clusters:
{cluster("upstream", upstream_port)}{cluster("slow", slow_port)}admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
"""


def broken_bootstrap(text: str) -> str:
    """The same config with a field no bootstrap has: any trioxy must refuse it."""
    return text + "\n# trioxy-drill: a deliberately broken config\ndrill_broken_field: true\n"


def _port(address: dict[str, Any] | None) -> int | None:
    sa = (address or {}).get("socket_address") or {}
    port = sa.get("port_value")
    return int(port) if port else None


def endpoints_of(text: str) -> Endpoints:
    """The first HTTP and tcp_proxy listeners of a bootstrap, and its admin port."""
    doc = yaml.safe_load(text) or {}
    http_port = tcp_port = None
    http_prefix = tcp_prefix = None
    for lst in (doc.get("static_resources") or {}).get("listeners") or []:
        for chain in lst.get("filter_chains") or []:
            for f in chain.get("filters") or []:
                name = f.get("name", "")
                cfg = f.get("typed_config") or {}
                if name.endswith("http_connection_manager") and http_port is None:
                    http_port = _port(lst.get("address"))
                    http_prefix = cfg.get("stat_prefix")
                elif name.endswith("tcp_proxy") and tcp_port is None:
                    tcp_port = _port(lst.get("address"))
                    tcp_prefix = cfg.get("stat_prefix")
    admin_port = _port((doc.get("admin") or {}).get("address"))
    return Endpoints(http_port, tcp_port, admin_port, http_prefix, tcp_prefix)
