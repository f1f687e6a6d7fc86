"""A cluster compiled from ``envoy.config.cluster.v3.Cluster`` (pure: resolves and opens nothing).

Theory of operation
-------------------
1. ``ClusterConfig.from_proto`` first runs the allowlist (``supported.check``) over the cluster,
   so a set field trioxy does not read is refused even when the bootstrap validator was skipped
   (tests, tools). Then it checks the *values* the allowlist cannot judge: discovery type, load
   balancing policy, endpoint addresses, ring and table sizes.
2. Discovery types: ``STATIC`` (IP literals only, as Envoy: a name is a ``ConfigError``),
   ``STRICT_DNS`` (every endpoint name resolved, every address a host) and ``LOGICAL_DNS`` (one
   endpoint; the first address of the answer is the one host). ``ORIGINAL_DST`` (lb_policy
   ``CLUSTER_PROVIDED`` only, no ``load_assignment``): each connection's original destination
   is its host (``proxy.upstream.original_dst_cluster``). ``EDS`` and custom ``cluster_type``
   are refused. Resolving is the cluster manager's job (trio shell).
3. Endpoints come from ``load_assignment`` in config order, flattened to ``EndpointSpec``
   (address, port, hostname, weight, priority, locality weight). A cluster with no endpoint is
   valid: its requests get ``503 UH``. ``load_assignment.cluster_name`` may differ from the
   cluster name (Envoy ignores it for static assignments).
4. Defaults are Envoy's (connect_timeout 5 s, dns_refresh_rate 5 s, ring 1024..8M, Maglev 65537,
   choice_count 2, buffer limit 1 MiB, dns_lookup_family AUTO), except the upstream HTTP/1 idle
   timeout: 4 s instead of Envoy's 1 h, see ``DEFAULT_UPSTREAM_IDLE_TIMEOUT_S``.
"""

from __future__ import annotations

import enum
import ipaddress
import math
from dataclasses import dataclass, field
from typing import Any

from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from proxy.config import supported
from proxy.config.context import FactoryContext
from proxy.config.errors import ConfigError, not_supported
from proxy.config.protos import duration_s, positive_duration_s, wrapped

__all__ = [
    "DEFAULT_CLEANUP_INTERVAL_S",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_DNS_REFRESH_RATE_S",
    "DEFAULT_HEALTHY_PANIC_THRESHOLD",
    "DEFAULT_PER_CONNECTION_BUFFER_LIMIT_BYTES",
    "DEFAULT_UPSTREAM_IDLE_TIMEOUT_S",
    "HTTP_PROTOCOL_OPTIONS_KEY",
    "ClusterConfig",
    "DiscoveryType",
    "DnsLookupFamily",
    "EndpointSpec",
    "LbPolicy",
    "LeastRequestConfig",
    "MaglevConfig",
    "OriginalDstLbConfig",
    "RingHashConfig",
]

DEFAULT_CONNECT_TIMEOUT_S = 5.0  # Envoy: connect_timeout defaults to 5 s
DEFAULT_DNS_REFRESH_RATE_S = 5.0  # Envoy: dns_refresh_rate defaults to 5000 ms
DEFAULT_CLEANUP_INTERVAL_S = 5.0  # Envoy: ORIGINAL_DST cleanup_interval defaults to 5000 ms
ORIGINAL_DST_HOST_HEADER = "x-envoy-original-dst-host"  # Envoy's EnvoyOriginalDstHost
DEFAULT_PER_CONNECTION_BUFFER_LIMIT_BYTES = 1024 * 1024  # Envoy: 1 MiB
# Envoy's upstream idle_timeout default is 1 h, which only works against upstreams that keep an
# idle connection that long. Common servers close idle keep-alive connections much sooner
# (nginx keepalive_timeout 75 s, Node.js http.Server keepAliveTimeout 5 s); a pooled connection
# the upstream has already closed fails the next request that reuses it (a race with the
# server's FIN). Closing our side first, below the shortest common server timeout, avoids it.
DEFAULT_UPSTREAM_IDLE_TIMEOUT_S = 4.0
# Envoy's default healthy panic threshold (percent); runtime key upstream.healthy_panic_threshold.
DEFAULT_HEALTHY_PANIC_THRESHOLD = 50
RUNTIME_PANIC_THRESHOLD = "upstream.healthy_panic_threshold"

HTTP_PROTOCOL_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# Envoy's limits (PGV rules of the protos, and Envoy's checks).
MAX_RING_SIZE = 8 * 1024 * 1024  # RingHashLbConfig: lte 8388608
DEFAULT_MIN_RING_SIZE = 1024
DEFAULT_MAX_RING_SIZE = MAX_RING_SIZE
DEFAULT_MAGLEV_TABLE_SIZE = 65537
MAX_MAGLEV_TABLE_SIZE = 5000011  # MaglevLbConfig.table_size: lte 5000011
DEFAULT_CHOICE_COUNT = 2
MAX_PRIORITY = 128  # LocalityLbEndpoints.priority: lte 128
_UINT32_MAX = 2**32 - 1


class DiscoveryType(enum.StrEnum):
    STATIC = "STATIC"
    STRICT_DNS = "STRICT_DNS"
    LOGICAL_DNS = "LOGICAL_DNS"
    ORIGINAL_DST = "ORIGINAL_DST"


class LbPolicy(enum.StrEnum):
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"
    RING_HASH = "RING_HASH"
    MAGLEV = "MAGLEV"
    CLUSTER_PROVIDED = "CLUSTER_PROVIDED"  # ORIGINAL_DST clusters only


class DnsLookupFamily(enum.StrEnum):
    AUTO = "AUTO"  # IPv6 first; IPv4 when the IPv6 lookup has no address
    V4_ONLY = "V4_ONLY"
    V6_ONLY = "V6_ONLY"
    V4_PREFERRED = "V4_PREFERRED"  # IPv4 first; IPv6 when the IPv4 lookup has no address
    ALL = "ALL"  # both families


# Proto enum numbers (envoy.config.cluster.v3.Cluster) -> our names.
_DISCOVERY_TYPES = {0: DiscoveryType.STATIC, 1: DiscoveryType.STRICT_DNS,
                    2: DiscoveryType.LOGICAL_DNS, 4: DiscoveryType.ORIGINAL_DST}
_REFUSED_DISCOVERY_TYPES = {3: "EDS"}
_LB_POLICIES = {0: LbPolicy.ROUND_ROBIN, 1: LbPolicy.LEAST_REQUEST, 2: LbPolicy.RING_HASH,
                3: LbPolicy.RANDOM, 5: LbPolicy.MAGLEV, 6: LbPolicy.CLUSTER_PROVIDED}
_REFUSED_LB_POLICIES = {7: "LOAD_BALANCING_POLICY_CONFIG"}
_DNS_LOOKUP_FAMILIES = {0: DnsLookupFamily.AUTO, 1: DnsLookupFamily.V4_ONLY,
                        2: DnsLookupFamily.V6_ONLY, 3: DnsLookupFamily.V4_PREFERRED,
                        4: DnsLookupFamily.ALL}
_XX_HASH, _MURMUR_HASH_2 = 0, 1
_TCP = 0  # envoy.config.core.v3.SocketAddress.Protocol


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """One ``lb_endpoints`` entry: an IP literal (STATIC) or a name to resolve (DNS types)."""

    address: str
    port: int
    hostname: str = ""
    weight: int = 1
    priority: int = 0
    locality_weight: int | None = None


@dataclass(frozen=True, slots=True)
class RingHashConfig:
    minimum_ring_size: int = DEFAULT_MIN_RING_SIZE
    maximum_ring_size: int = DEFAULT_MAX_RING_SIZE


@dataclass(frozen=True, slots=True)
class MaglevConfig:
    table_size: int = DEFAULT_MAGLEV_TABLE_SIZE


@dataclass(frozen=True, slots=True)
class LeastRequestConfig:
    choice_count: int = DEFAULT_CHOICE_COUNT


@dataclass(frozen=True, slots=True)
class OriginalDstLbConfig:
    """``original_dst_lb_config`` of an ORIGINAL_DST cluster."""

    http_header_name: str | None = None  # lower case; None unless use_http_header
    upstream_port_override: int | None = None


@dataclass(frozen=True)
class ClusterConfig:
    """A compiled cluster; immutable, shared by every worker of an epoch."""

    name: str
    type: DiscoveryType = DiscoveryType.STATIC
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S  # seconds
    lb_policy: LbPolicy = LbPolicy.ROUND_ROBIN
    ring_hash: RingHashConfig = field(default_factory=RingHashConfig)
    maglev: MaglevConfig = field(default_factory=MaglevConfig)
    least_request: LeastRequestConfig = field(default_factory=LeastRequestConfig)
    endpoints: tuple[EndpointSpec, ...] = ()
    dns_refresh_rate: float = DEFAULT_DNS_REFRESH_RATE_S  # seconds
    dns_lookup_family: DnsLookupFamily = DnsLookupFamily.AUTO
    per_connection_buffer_limit_bytes: int = DEFAULT_PER_CONNECTION_BUFFER_LIMIT_BYTES
    # Upstream HTTP/1.1 connection options (HttpProtocolOptions.common_http_protocol_options).
    idle_timeout: float | None = DEFAULT_UPSTREAM_IDLE_TIMEOUT_S  # seconds; None: never
    max_requests_per_connection: int | None = None  # None: unlimited
    # Percent of healthy hosts under which a priority level balances over all its hosts.
    healthy_panic_threshold: int = DEFAULT_HEALTHY_PANIC_THRESHOLD
    # ORIGINAL_DST: hosts unused for a cleanup_interval are removed; the LB config.
    cleanup_interval: float = DEFAULT_CLEANUP_INTERVAL_S  # seconds
    original_dst: OriginalDstLbConfig | None = None  # set for ORIGINAL_DST clusters
    # The upstream TLS context (proxy.tls.context.TlsContext) of transport_socket; None: plaintext.
    transport_socket: Any = None
    # Upstream HTTP protocol: "http1", "http2" (explicit, or the deprecated
    # http2_protocol_options) or "auto" (ALPN over TLS); see _upstream_protocol.
    upstream_protocol: str = "http1"
    http2_options: Any = None  # proxy.http.codec.h2.Http2Options for "http2" and "auto"
    # Resilience (issue #6): proxy.upstream.resource_manager.CircuitBreakers (Envoy's
    # defaults when unset), proxy.upstream.outlier_detection.OutlierDetectionConfig or None,
    # and the upstream connections' max_connection_duration (s; None: unbounded).
    circuit_breakers: Any = None
    outlier_detection: Any = None
    max_connection_duration: float | None = None
    # Active health checking (proxy.upstream.health_checker.HealthCheckConfig), run by the
    # epoch's main process; hosts of such a cluster start failed until their first check.
    health_checks: tuple[Any, ...] = ()

    @property
    def is_dns(self) -> bool:
        return self.type is DiscoveryType.STRICT_DNS or self.type is DiscoveryType.LOGICAL_DNS

    @staticmethod
    def from_proto(cluster: Any, ctx: FactoryContext, path: str) -> ClusterConfig:
        supported.check(cluster, path)
        if not cluster.name:
            raise ConfigError(f"{path}.name", "a cluster needs a name")
        ctype = _discovery_type(cluster, path)
        connect_timeout = positive_duration_s(
            cluster, "connect_timeout", path, DEFAULT_CONNECT_TIMEOUT_S)
        assert connect_timeout is not None
        lb_policy = _lb_policy(cluster, path)
        cleanup_interval, original_dst = _original_dst(cluster, ctype, lb_policy, path)
        ring_hash = _ring_hash(cluster, lb_policy, path)
        maglev = _maglev(cluster, path)
        least_request = _least_request(cluster, path)
        endpoints = _endpoints(cluster, ctype, path)
        dns_refresh_rate = positive_duration_s(
            cluster, "dns_refresh_rate", path, DEFAULT_DNS_REFRESH_RATE_S)
        assert dns_refresh_rate is not None
        family = _DNS_LOOKUP_FAMILIES.get(cluster.dns_lookup_family)
        if family is None:
            raise ConfigError(f"{path}.dns_lookup_family",
                              f"unknown value {cluster.dns_lookup_family}")
        idle_timeout, max_requests = _http_options(cluster, path)
        threshold = _healthy_panic_threshold(cluster, path)
        if ctx.runtime is not None:
            threshold = min(100, ctx.runtime.get_int(RUNTIME_PANIC_THRESHOLD, threshold))
        transport_socket = _transport_socket(cluster, ctx, path)
        return ClusterConfig(
            name=cluster.name,
            type=ctype,
            connect_timeout=connect_timeout,
            lb_policy=lb_policy,
            ring_hash=ring_hash,
            maglev=maglev,
            least_request=least_request,
            endpoints=endpoints,
            dns_refresh_rate=dns_refresh_rate,
            dns_lookup_family=family,
            per_connection_buffer_limit_bytes=wrapped(
                cluster, "per_connection_buffer_limit_bytes",
                DEFAULT_PER_CONNECTION_BUFFER_LIMIT_BYTES),
            idle_timeout=idle_timeout,
            max_requests_per_connection=max_requests,
            healthy_panic_threshold=threshold,
            cleanup_interval=cleanup_interval,
            original_dst=original_dst,
            transport_socket=transport_socket,
            **_resilience(cluster, path),
            health_checks=_health_checks(cluster, ctype, ctx, path),
            **_upstream_protocol(cluster, path, transport_socket is not None),
        )


# ----------------------------------------------------------------------------- pieces
def _discovery_type(cluster: Any, path: str) -> DiscoveryType:
    if cluster.HasField("cluster_type"):
        raise not_supported(f"{path}.cluster_type", "a custom cluster_type")
    ctype = _DISCOVERY_TYPES.get(cluster.type)
    if ctype is None:
        name = _REFUSED_DISCOVERY_TYPES.get(cluster.type, str(cluster.type))
        raise ConfigError(
            f"{path}.type",
            f"type {name} is not supported"
            f" (supported: STATIC, STRICT_DNS, LOGICAL_DNS, ORIGINAL_DST)")
    return ctype


def _lb_policy(cluster: Any, path: str) -> LbPolicy:
    policy = _LB_POLICIES.get(cluster.lb_policy)
    if policy is None:
        name = _REFUSED_LB_POLICIES.get(cluster.lb_policy, str(cluster.lb_policy))
        raise ConfigError(
            f"{path}.lb_policy",
            f"lb_policy {name} is not supported"
            f" (supported: {', '.join(p.value for p in LbPolicy)})")
    return policy


def _original_dst(cluster: Any, ctype: DiscoveryType, policy: LbPolicy,
                  path: str) -> tuple[float, OriginalDstLbConfig | None]:
    """Envoy's ``OriginalDstClusterFactory::createClusterImpl`` checks, and its config."""
    if ctype is not DiscoveryType.ORIGINAL_DST:
        if policy is LbPolicy.CLUSTER_PROVIDED:
            raise ConfigError(f"{path}.lb_policy",
                              f"cluster: LB policy CLUSTER_PROVIDED is not valid for Cluster type"
                              f" {ctype.value}. 'CLUSTER_PROVIDED' is allowed only with cluster"
                              " type 'ORIGINAL_DST'")
        for fname in ("cleanup_interval", "original_dst_lb_config"):
            if cluster.HasField(fname):
                raise ConfigError(f"{path}.{fname}",
                                  f"{fname} is only used by ORIGINAL_DST clusters")
        return DEFAULT_CLEANUP_INTERVAL_S, None
    if policy is not LbPolicy.CLUSTER_PROVIDED:
        raise ConfigError(f"{path}.lb_policy",
                          f"cluster: LB policy {policy.value} is not valid for Cluster type"
                          " ORIGINAL_DST. Only 'CLUSTER_PROVIDED' is allowed with cluster type"
                          " 'ORIGINAL_DST'")
    if cluster.HasField("load_assignment"):
        raise ConfigError(f"{path}.load_assignment",
                          "ORIGINAL_DST clusters must have no load assignment configured")
    cleanup = positive_duration_s(cluster, "cleanup_interval", path, DEFAULT_CLEANUP_INTERVAL_S)
    assert cleanup is not None
    lb = cluster.original_dst_lb_config
    lpath = f"{path}.original_dst_lb_config"
    if not lb.use_http_header and lb.http_header_name:
        raise ConfigError(f"{lpath}.http_header_name",
                          f"ORIGINAL_DST cluster: invalid config http_header_name="
                          f"{lb.http_header_name} and use_http_header is false. Set "
                          "use_http_header to true if http_header_name is desired.")
    header = None
    if lb.use_http_header:
        header = (lb.http_header_name or ORIGINAL_DST_HOST_HEADER).lower()
    port = wrapped(lb, "upstream_port_override", None)
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"{lpath}.upstream_port_override",
                          "value must be less than or equal to 65535")
    return cleanup, OriginalDstLbConfig(http_header_name=header, upstream_port_override=port)


def _ring_hash(cluster: Any, policy: LbPolicy, path: str) -> RingHashConfig:
    if not cluster.HasField("ring_hash_lb_config"):
        return RingHashConfig()
    cfg = cluster.ring_hash_lb_config
    cpath = f"{path}.ring_hash_lb_config"
    if cfg.hash_function == _MURMUR_HASH_2:
        # MURMUR_HASH_2 exists to agree with other clients' rings (gRPC, libketama users);
        # trioxy hashes with proxy.common.hash.hash64, so it could not agree: refuse it.
        raise not_supported(f"{cpath}.hash_function", "MURMUR_HASH_2")
    if cfg.hash_function != _XX_HASH:
        raise ConfigError(f"{cpath}.hash_function", f"unknown value {cfg.hash_function}")
    minimum = wrapped(cfg, "minimum_ring_size", DEFAULT_MIN_RING_SIZE)
    maximum = wrapped(cfg, "maximum_ring_size", DEFAULT_MAX_RING_SIZE)
    for fname, value in (("minimum_ring_size", minimum), ("maximum_ring_size", maximum)):
        if value > MAX_RING_SIZE:
            raise ConfigError(f"{cpath}.{fname}",
                              f"value must be less than or equal to {MAX_RING_SIZE}")
    if minimum < 1:
        # Envoy accepts 0 and then builds an empty ring that fails every request.
        raise ConfigError(f"{cpath}.minimum_ring_size", "must be at least 1")
    if policy is LbPolicy.RING_HASH and minimum > maximum:
        raise ConfigError(cpath, f"ring hash: minimum_ring_size ({minimum}) >"
                                 f" maximum_ring_size ({maximum})")
    return RingHashConfig(minimum_ring_size=minimum, maximum_ring_size=maximum)


def _maglev(cluster: Any, path: str) -> MaglevConfig:
    if not cluster.HasField("maglev_lb_config"):
        return MaglevConfig()
    size = wrapped(cluster.maglev_lb_config, "table_size", DEFAULT_MAGLEV_TABLE_SIZE)
    spath = f"{path}.maglev_lb_config.table_size"
    if size > MAX_MAGLEV_TABLE_SIZE:
        raise ConfigError(spath, f"value must be less than or equal to {MAX_MAGLEV_TABLE_SIZE}")
    if not _is_prime(size):
        raise ConfigError(spath, f"the table size of maglev must be prime number (got {size})")
    return MaglevConfig(table_size=size)


def _least_request(cluster: Any, path: str) -> LeastRequestConfig:
    if not cluster.HasField("least_request_lb_config"):
        return LeastRequestConfig()
    count = wrapped(cluster.least_request_lb_config, "choice_count", DEFAULT_CHOICE_COUNT)
    if count < 2:
        raise ConfigError(f"{path}.least_request_lb_config.choice_count",
                          "value must be greater than or equal to 2")
    return LeastRequestConfig(choice_count=count)


def _endpoints(cluster: Any, ctype: DiscoveryType, path: str) -> tuple[EndpointSpec, ...]:
    la = cluster.load_assignment
    la_path = f"{path}.load_assignment"
    if ctype is DiscoveryType.LOGICAL_DNS and (
        len(la.endpoints) != 1 or len(la.endpoints[0].lb_endpoints) != 1
    ):
        if cluster.HasField("load_assignment"):
            raise ConfigError(la_path, "LOGICAL_DNS clusters must have a single"
                                       " locality_lb_endpoint and a single lb_endpoint")
        raise ConfigError(la_path, "LOGICAL_DNS clusters must have a single host")
    out: list[EndpointSpec] = []
    weight_per_priority: dict[int, int] = {}
    for i, locality in enumerate(la.endpoints):
        lpath = f"{la_path}.endpoints[{i}]"
        priority = locality.priority
        if priority > MAX_PRIORITY:
            raise ConfigError(f"{lpath}.priority",
                              f"value must be less than or equal to {MAX_PRIORITY}")
        if ctype is DiscoveryType.LOGICAL_DNS:
            priority = 0  # as Envoy's convertPriority: the one host is always P=0
        locality_weight = wrapped(locality, "load_balancing_weight", None)
        if locality_weight is not None and locality_weight < 1:
            raise ConfigError(f"{lpath}.load_balancing_weight",
                              "value must be greater than or equal to 1")
        for j, lb_endpoint in enumerate(locality.lb_endpoints):
            epath = f"{lpath}.lb_endpoints[{j}]"
            weight = wrapped(lb_endpoint, "load_balancing_weight", 1)
            if weight < 1:
                raise ConfigError(f"{epath}.load_balancing_weight",
                                  "value must be greater than or equal to 1")
            total = weight_per_priority.get(priority, 0) + weight
            if total > _UINT32_MAX:
                raise ConfigError(
                    f"{epath}.load_balancing_weight",
                    f"the sum of weights of all endpoints at priority {priority}"
                    f" exceeds {_UINT32_MAX}")
            weight_per_priority[priority] = total
            address, port = _socket_address(lb_endpoint, ctype, epath)
            hostname = lb_endpoint.endpoint.hostname
            if ctype is not DiscoveryType.STATIC and not hostname:
                hostname = address  # Envoy: a DNS host's hostname is its DNS name
            out.append(EndpointSpec(
                address=address, port=port, hostname=hostname, weight=weight,
                priority=priority, locality_weight=locality_weight))
    return tuple(out)


def _socket_address(lb_endpoint: Any, ctype: DiscoveryType, epath: str) -> tuple[str, int]:
    apath = f"{epath}.endpoint.address"
    if not lb_endpoint.endpoint.HasField("address"):
        raise ConfigError(apath, "an endpoint needs an address")
    if lb_endpoint.endpoint.address.WhichOneof("address") != "socket_address":
        raise ConfigError(apath, "only socket_address is supported")
    sa = lb_endpoint.endpoint.address.socket_address
    spath = f"{apath}.socket_address"
    if sa.protocol != _TCP:
        raise ConfigError(f"{spath}.protocol", "only TCP upstream endpoints are supported")
    # ipv4_compat only changes how a socket is bound (IPV6_V6ONLY); it has no effect on an
    # upstream connect, in Envoy as here.
    if not sa.address:
        raise ConfigError(f"{spath}.address", "value length must be at least 1 characters")
    if not 1 <= sa.port_value <= 65535:
        # Envoy accepts port 0 and then fails every connection; refusing says why up front.
        raise ConfigError(f"{spath}.port_value",
                          f"an upstream port must be 1..65535 (got {sa.port_value})")
    address = sa.address
    if ctype is DiscoveryType.STATIC:
        try:
            address = str(ipaddress.ip_address(sa.address))
        except ValueError:
            raise ConfigError(
                f"{spath}.address",
                f"malformed IP address: {sa.address}. Consider setting the cluster type to"
                " 'STRICT_DNS' or 'LOGICAL_DNS'") from None
    return address, sa.port_value


def _http_options(cluster: Any, path: str) -> tuple[float | None, int | None]:
    """(idle_timeout, max_requests_per_connection) of the upstream HTTP/1.1 connections."""
    options = None
    opath = ""
    typed = cluster.typed_extension_protocol_options
    for key in typed:
        if key != HTTP_PROTOCOL_OPTIONS_KEY:
            raise not_supported(f'{path}.typed_extension_protocol_options["{key}"]', key)
    if HTTP_PROTOCOL_OPTIONS_KEY in typed:
        tpath = f'{path}.typed_extension_protocol_options["{HTTP_PROTOCOL_OPTIONS_KEY}"]'
        msg = http_protocol_options_pb2.HttpProtocolOptions()
        if not typed[HTTP_PROTOCOL_OPTIONS_KEY].Unpack(msg):
            raise ConfigError(tpath, f"expected an {HTTP_PROTOCOL_OPTIONS_KEY}")
        which = msg.WhichOneof("upstream_protocol_options")
        if which is None:
            raise ConfigError(tpath, "one of explicit_http_config, use_downstream_protocol_config,"
                                     " auto_config must be set")
        if which == "use_downstream_protocol_config":
            raise not_supported(f"{tpath}.{which}", which)
        # explicit_http_config (HTTP/1.1 or HTTP/2) and auto_config: _upstream_protocol().
        if cluster.HasField("common_http_protocol_options"):
            raise ConfigError(
                f"{path}.common_http_protocol_options",
                "cannot be set together with typed_extension_protocol_options"
                f' ["{HTTP_PROTOCOL_OPTIONS_KEY}"]')
        if msg.HasField("common_http_protocol_options"):
            options = msg.common_http_protocol_options
            opath = f"{tpath}.common_http_protocol_options"
    elif cluster.HasField("common_http_protocol_options"):
        options = cluster.common_http_protocol_options
        opath = f"{path}.common_http_protocol_options"
    if options is None:
        return DEFAULT_UPSTREAM_IDLE_TIMEOUT_S, None
    idle = duration_s(options, "idle_timeout")
    if idle is not None and idle < 0:
        raise ConfigError(f"{opath}.idle_timeout", "must not be negative")
    # Envoy: an explicit 0 disables the idle timeout.
    idle_timeout = DEFAULT_UPSTREAM_IDLE_TIMEOUT_S if idle is None else (idle or None)
    max_requests = wrapped(options, "max_requests_per_connection", 0) or None  # 0: unlimited
    return idle_timeout, max_requests


def _healthy_panic_threshold(cluster: Any, path: str) -> int:
    """``common_lb_config.healthy_panic_threshold`` (rounded percent; 0 disables panic), the
    default of the ``upstream.healthy_panic_threshold`` runtime key, as in Envoy."""
    if not cluster.common_lb_config.HasField("healthy_panic_threshold"):
        return DEFAULT_HEALTHY_PANIC_THRESHOLD
    value = cluster.common_lb_config.healthy_panic_threshold.value
    if not 0.0 <= value <= 100.0:
        raise ConfigError(f"{path}.common_lb_config.healthy_panic_threshold.value",
                          "value must be inside range [0, 100]")
    return round(value)


def _resilience(cluster: Any, path: str) -> dict[str, Any]:
    """Circuit breakers, outlier detection and max_connection_duration (issue #6)."""
    from proxy.upstream.outlier_detection import OutlierDetectionConfig
    from proxy.upstream.resource_manager import CircuitBreakers

    out: dict[str, Any] = {"circuit_breakers": CircuitBreakers()}
    if cluster.HasField("circuit_breakers"):
        out["circuit_breakers"] = CircuitBreakers.from_proto(
            cluster.circuit_breakers, f"{path}.circuit_breakers")
    if cluster.HasField("outlier_detection"):
        out["outlier_detection"] = OutlierDetectionConfig.from_proto(
            cluster.outlier_detection, f"{path}.outlier_detection")
    options = cluster.common_http_protocol_options
    opath = f"{path}.common_http_protocol_options"
    typed = cluster.typed_extension_protocol_options
    if HTTP_PROTOCOL_OPTIONS_KEY in typed:
        msg = http_protocol_options_pb2.HttpProtocolOptions()
        typed[HTTP_PROTOCOL_OPTIONS_KEY].Unpack(msg)
        options = msg.common_http_protocol_options
        opath = (f'{path}.typed_extension_protocol_options["{HTTP_PROTOCOL_OPTIONS_KEY}"]'
                 ".common_http_protocol_options")
    duration = duration_s(options, "max_connection_duration")
    if duration is not None:
        if duration < 0:
            raise ConfigError(f"{opath}.max_connection_duration", "must not be negative")
        out["max_connection_duration"] = duration or None  # 0: unbounded
    return out


def _transport_socket(cluster: Any, ctx: FactoryContext, path: str) -> Any:
    """The cluster's ``transport_socket`` compiled (a TLS context), or None for plaintext."""
    if not cluster.HasField("transport_socket"):
        return None
    from proxy.extensions.transport_sockets import build_transport_socket
    from proxy.registry import upstream_transport_sockets

    return build_transport_socket(cluster.transport_socket, upstream_transport_sockets, ctx,
                                  f"{path}.transport_socket")


def _health_checks(cluster: Any, ctype: DiscoveryType, ctx: FactoryContext,
                   path: str) -> tuple[Any, ...]:
    """``health_checks``: one active checker per cluster, of a STATIC cluster."""
    if not cluster.health_checks:
        return ()
    from proxy.upstream.health_checker import HealthCheckConfig

    hpath = f"{path}.health_checks"
    if len(cluster.health_checks) > 1:
        raise not_supported(f"{hpath}[1]", "more than one health check per cluster")
    if ctype is not DiscoveryType.STATIC:
        # DNS clusters resolve in the workers; the main process, which checks, does not.
        raise not_supported(hpath, f"active health checking of a {ctype.value} cluster"
                                   " (STATIC clusters only)")
    return (HealthCheckConfig.from_proto(cluster.health_checks[0], f"{hpath}[0]",
                                         ctx.runtime),)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def _upstream_protocol(cluster: Any, path: str, tls: bool) -> dict[str, Any]:
    """The upstream HTTP protocol: ``explicit_http_config`` (HTTP/1.1 or HTTP/2), the
    deprecated ``Cluster.http2_protocol_options``, or ``auto_config`` (ALPN: TLS only)."""
    from proxy.http.codec.h2 import Http2Options

    typed = cluster.typed_extension_protocol_options
    if cluster.HasField("http2_protocol_options"):
        if HTTP_PROTOCOL_OPTIONS_KEY in typed:
            raise ConfigError(
                f"{path}.http2_protocol_options",
                "cannot be set together with typed_extension_protocol_options"
                f' ["{HTTP_PROTOCOL_OPTIONS_KEY}"]')
        return {"upstream_protocol": "http2", "http2_options": Http2Options.from_proto(
            cluster.http2_protocol_options, f"{path}.http2_protocol_options")}
    if HTTP_PROTOCOL_OPTIONS_KEY not in typed:
        return {}
    tpath = f'{path}.typed_extension_protocol_options["{HTTP_PROTOCOL_OPTIONS_KEY}"]'
    msg = http_protocol_options_pb2.HttpProtocolOptions()
    typed[HTTP_PROTOCOL_OPTIONS_KEY].Unpack(msg)
    which = msg.WhichOneof("upstream_protocol_options")
    if which == "explicit_http_config":
        if msg.explicit_http_config.WhichOneof("protocol_config") == "http2_protocol_options":
            opts = msg.explicit_http_config.http2_protocol_options
            return {"upstream_protocol": "http2", "http2_options": Http2Options.from_proto(
                opts, f"{tpath}.explicit_http_config.http2_protocol_options")}
        return {}
    if which == "auto_config":
        apath = f"{tpath}.auto_config"
        if not tls:
            # Envoy refuses it too ("ALPN configured for cluster ... which has a non-ALPN
            # transport socket"): without TLS there is nothing to negotiate with.
            raise ConfigError(apath, "auto_config needs a TLS transport_socket (ALPN chooses h2"
                                     " or http/1.1); for a plaintext upstream use"
                                     " explicit_http_config")
        auto = msg.auto_config
        options = Http2Options()
        if auto.HasField("http2_protocol_options"):
            options = Http2Options.from_proto(
                auto.http2_protocol_options, f"{apath}.http2_protocol_options")
        return {"upstream_protocol": "auto", "http2_options": options}
    return {}

