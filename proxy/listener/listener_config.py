"""A listener compiled from ``envoy.config.listener.v3.Listener`` (pure: binds nothing)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3.base_pb2 import TrafficDirection

from proxy.config.context import FactoryContext
from proxy.config.errors import ConfigError
from proxy.listener.filter_chain_manager import FilterChainManager
from proxy.network.connection import DEFAULT_BUFFER_LIMIT
from proxy.registry import network_filters


@dataclass(frozen=True, slots=True)
class NetworkFilterChain:
    """The network filters of one filter chain; the last one is terminal."""

    name: str
    filters: tuple[Any, ...]

    @property
    def terminal(self) -> Any:
        return self.filters[-1]


def bind_address(address: Any, path: str) -> tuple[str, int]:
    """The (ip, port) a listener (or the admin listener) binds; ``path`` names the Address."""
    if address.WhichOneof("address") != "socket_address":
        raise ConfigError(path, "only socket_address is supported")
    sa = address.socket_address
    sa_path = f"{path}.socket_address"
    try:
        ip = ipaddress.ip_address(sa.address)
    except ValueError:
        raise ConfigError(
            f"{sa_path}.address", f"{sa.address!r} is not an IP address (listeners bind IPs)"
        ) from None
    if sa.WhichOneof("port_specifier") != "port_value" and sa.HasField("named_port"):
        raise ConfigError(f"{sa_path}.named_port", "named_port is not supported")
    if sa.protocol != 0:
        raise ConfigError(f"{sa_path}.protocol", "only TCP listeners are supported")
    return (str(ip), sa.port_value)


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    address: tuple[str, int]
    filter_chains: FilterChainManager[NetworkFilterChain]
    per_connection_buffer_limit_bytes: int
    stat_prefix: str
    # "UNSPECIFIED", "INBOUND" or "OUTBOUND": admin /drain_listeners?inboundonly drains
    # only INBOUND listeners, as Envoy does.
    traffic_direction: str = "UNSPECIFIED"

    @property
    def address_string(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def family_is_v6(self) -> bool:
        return ":" in self.address[0]

    @staticmethod
    def from_proto(listener: Any, ctx: FactoryContext, path: str) -> ListenerConfig:
        if not listener.HasField("address"):
            raise ConfigError(f"{path}.address", "a listener needs an address")
        address = bind_address(listener.address, f"{path}.address")

        def build_chain(chain: Any, chain_path: str) -> NetworkFilterChain:
            return build_network_filter_chain(chain, ctx, chain_path)

        fcm = FilterChainManager.from_proto(listener, build_chain, path)
        limit = (
            listener.per_connection_buffer_limit_bytes.value
            if listener.HasField("per_connection_buffer_limit_bytes")
            else DEFAULT_BUFFER_LIMIT
        )
        name = listener.name or f"{address[0]}_{address[1]}"
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        stat_prefix = listener.stat_prefix or f"{host}_{address[1]}"
        return ListenerConfig(
            name=name,
            address=address,
            filter_chains=fcm,
            per_connection_buffer_limit_bytes=limit,
            stat_prefix=stat_prefix,
            traffic_direction=TrafficDirection.Name(listener.traffic_direction),
        )


def build_network_filter_chain(chain: Any, ctx: FactoryContext, path: str) -> NetworkFilterChain:
    from proxy.config.bootstrap import unpack_any

    if not chain.filters:
        raise ConfigError(f"{path}.filters", "a filter chain needs at least one network filter")
    built: list[Any] = []
    for i, f in enumerate(chain.filters):
        fpath = f"{path}.filters[{i}]"
        if not f.HasField("typed_config"):
            raise ConfigError(f"{fpath}.typed_config", "a network filter needs a typed_config")
        ext = network_filters.lookup(f.name, f.typed_config.type_url, fpath)
        msg = unpack_any(f.typed_config, f"{fpath}.typed_config")
        built.append(ext.factory(msg, ctx, f"{fpath}.typed_config"))
    for i, cfg in enumerate(built):
        terminal = hasattr(cfg, "serve_connection")
        last = i == len(built) - 1
        if terminal and not last:
            raise ConfigError(
                f"{path}.filters[{i}]",
                f"terminal filter {chain.filters[i].name!r} must be the last filter in the chain",
            )
        if last and not terminal:
            raise ConfigError(
                f"{path}.filters[{i}]",
                f"the last filter in a chain must be terminal (tcp_proxy or "
                f"http_connection_manager), not {chain.filters[i].name!r}",
            )
    return NetworkFilterChain(name=chain.name, filters=tuple(built))
