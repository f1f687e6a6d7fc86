"""A listener compiled from ``envoy.config.listener.v3.Listener`` (pure: binds nothing)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3.base_pb2 import TrafficDirection

from proxy.config.context import FactoryContext
from proxy.config.errors import ConfigError
from proxy.config.protos import wrapped
from proxy.listener.filter_chain_manager import FilterChainManager
from proxy.listener.listener_filter import (
    DEFAULT_LISTENER_FILTERS_TIMEOUT_S,
    build_listener_filters,
    listener_filters_timeout_s,
)
from proxy.network.connection import DEFAULT_BUFFER_LIMIT
from proxy.registry import network_filters


@dataclass(frozen=True, slots=True)
class NetworkFilterChain:
    """The network filters of one filter chain; the last one is terminal."""

    name: str
    filters: tuple[Any, ...]
    # The downstream TLS context (proxy.tls.context.TlsContext) of transport_socket, or None
    # for plaintext; the handshake runs after the chain is chosen, before the filters.
    transport_socket: Any = None
    # Bound on that handshake (s): transport_socket_connect_timeout; None = no bound.
    transport_socket_connect_timeout: float | None = None

    @property
    def terminal(self) -> Any:
        return self.filters[-1]


# Envoy puts no bound on a TLS handshake unless transport_socket_connect_timeout is set; a
# client that opens a connection and never finishes the handshake would then hold it forever.
# trioxy bounds it by default (like listener_filters_timeout's 15 s); an explicit 0s turns it off.
DEFAULT_TRANSPORT_SOCKET_CONNECT_TIMEOUT_S = 15.0


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
    # Listener filters in run order (proxy.listener.listener_filter); () costs nothing.
    listener_filters: tuple[Any, ...] = ()
    listener_filters_timeout: float | None = DEFAULT_LISTENER_FILTERS_TIMEOUT_S  # None: off
    continue_on_listener_filters_timeout: bool = False
    use_original_dst: bool = False  # hand restored connections to the listener of that address
    bind_to_port: bool = True  # False: reachable only through a use_original_dst hand-off

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
            listener_filters=build_listener_filters(listener, ctx, path),
            listener_filters_timeout=listener_filters_timeout_s(listener, path),
            continue_on_listener_filters_timeout=listener.continue_on_listener_filters_timeout,
            use_original_dst=wrapped(listener, "use_original_dst", False),
            bind_to_port=wrapped(listener, "bind_to_port", True),
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
    tls, timeout = _transport_socket(chain, ctx, path)
    return NetworkFilterChain(name=chain.name, filters=tuple(built), transport_socket=tls,
                              transport_socket_connect_timeout=timeout)


def _transport_socket(chain: Any, ctx: FactoryContext, path: str) -> tuple[Any, float | None]:
    """(TLS context or None, handshake bound) of a filter chain's transport_socket."""
    from proxy.config.protos import duration_s
    from proxy.extensions.transport_sockets import build_transport_socket
    from proxy.registry import downstream_transport_sockets

    tls = None
    if chain.HasField("transport_socket"):
        tls = build_transport_socket(chain.transport_socket, downstream_transport_sockets, ctx,
                                     f"{path}.transport_socket")
    timeout = duration_s(chain, "transport_socket_connect_timeout")
    if timeout is not None and timeout < 0:
        raise ConfigError(f"{path}.transport_socket_connect_timeout", "must not be negative")
    if timeout is None:
        timeout = DEFAULT_TRANSPORT_SOCKET_CONNECT_TIMEOUT_S
    return tls, (timeout or None)
