"""Filter chain matching (Envoy's ``FilterChainManagerImpl``), pure and precompiled.

Theory of operation
-------------------
Envoy does not scan filter chains; it compiles their ``filter_chain_match`` criteria into a
tree with one level per criterion and walks it once per connection. We build the same tree.

1. The levels, in order: destination port → destination IP → server name → transport
   protocol → application protocols → direct source IP → source type → source IP → source
   port. A chain with a repeated criterion (several server names, several CIDRs) is inserted
   under every value it lists; an empty criterion is inserted under the level's catch-all key.
2. At each level the most specific key that matches the connection wins and the walk
   descends into it, and only into it: exact port over port 0 (unset), longest CIDR prefix
   (an unset range list is ``0.0.0.0/0`` and ``::/0``), exact server name over the longest
   ``*.suffix`` wildcard over no server names, exact transport protocol over none, the first
   of the connection's application protocols that any chain names over none, source type
   ``SAME_IP_OR_LOOPBACK`` / ``EXTERNAL`` (whichever describes the connection) over ``ANY``,
   exact source port over none.
3. There is no backtracking. If the most specific branch of a level matches nothing further
   down, the connection gets ``default_filter_chain`` (or none), even when a less specific
   branch of that level would have matched. Envoy documents this for destination ports and
   behaves so at every level.
4. Two chains that end on the same leaf are ambiguous: a config error, as in Envoy ("multiple
   filter chains with overlapping matching rules are defined"); two chains with equal
   ``filter_chain_match`` messages are refused first with a message naming both.

CIDR sets are indexed by prefix length (one dict per length, longest first), so a lookup
costs one dict probe per distinct prefix length configured at that node, not one per chain.
Addresses that are not IP (or do not parse) match as ``255.255.255.255``, which only the
catch-all ranges contain, as in Envoy. IPv4-mapped IPv6 addresses match as IPv4, as Envoy
sees them on a dual-stack listener.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from proxy.config.errors import ConfigError, not_supported

T = TypeVar("T")
V = TypeVar("V")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# FilterChainMatch.ConnectionSourceType
SOURCE_TYPE_ANY = 0
SOURCE_TYPE_SAME_IP_OR_LOOPBACK = 1
SOURCE_TYPE_EXTERNAL = 2
_SOURCE_TYPES = (SOURCE_TYPE_ANY, SOURCE_TYPE_SAME_IP_OR_LOOPBACK, SOURCE_TYPE_EXTERNAL)

# Envoy matches non-IP addresses (pipes) as this one: only the catch-all ranges contain it.
_FAKE_ADDRESS = ipaddress.IPv4Address("255.255.255.255")

_CATCH_ALL = ""  # the key of "no requirement" at the string-keyed levels


@dataclass(frozen=True, slots=True)
class ConnectionFacts:
    """What filter chain matching knows about a new connection.

    ``direct_source_ip`` is the socket peer; it differs from ``source_ip`` only when a
    listener filter (PROXY protocol) rewrote the source. ``None`` means "same as source_ip".
    """

    destination_ip: str
    destination_port: int
    source_ip: str
    source_port: int
    server_name: str | None = None
    transport_protocol: str = "raw_buffer"
    application_protocols: tuple[str, ...] = ()
    direct_source_ip: str | None = None


def parse_ip(text: str) -> IpAddress:
    """The address a connection fact names, as Envoy would match it."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return _FAKE_ADDRESS
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_same_ip_or_loopback(source: IpAddress, destination: IpAddress) -> bool:
    """Envoy's ``Network::Utility::isSameIpOrLoopback``: the peer is this host."""
    return source.is_loopback or source == destination


# --------------------------------------------------------------------------------------------
# CIDR index: longest-prefix match
# --------------------------------------------------------------------------------------------

CidrKey = tuple[int, int, int]  # (ip version, network as int, prefix length)
_CATCH_ALL_CIDRS: tuple[CidrKey, ...] = ((4, 0, 0), (6, 0, 0))


class CidrIndex(Generic[V]):
    """CIDR ranges → values; ``lookup`` returns the value of the longest matching prefix."""

    __slots__ = ("entries", "_tables", "_v4", "_v6")

    def __init__(self) -> None:
        self.entries: dict[CidrKey, V] = {}
        # version → prefix length → {network_int >> host_bits: value}
        self._tables: dict[int, dict[int, dict[int, V]]] = {4: {}, 6: {}}
        # Per family, the same tables as ((prefix_len, table), ...), longest prefix first.
        self._v4: tuple[tuple[int, dict[int, V]], ...] = ()
        self._v6: tuple[tuple[int, dict[int, V]], ...] = ()

    def setdefault(self, key: CidrKey, factory: Callable[[], V]) -> V:
        """The value stored under ``key``, created with ``factory()`` on first use."""
        value = self.entries.get(key)
        if value is not None:
            return value
        value = self.entries[key] = factory()
        version, network, plen = key
        bits = 32 if version == 4 else 128
        tables = self._tables[version]
        table = tables.get(plen)
        if table is None:
            table = tables[plen] = {}
            ordered = tuple(sorted(tables.items(), reverse=True))
            if version == 4:
                self._v4 = ordered
            else:
                self._v6 = ordered
        table[network >> (bits - plen)] = value
        return value

    def lookup(self, addr: IpAddress) -> V | None:
        if addr.version == 4:
            bits, levels = 32, self._v4
        else:
            bits, levels = 128, self._v6
        value = int(addr)
        for plen, table in levels:
            hit = table.get(value >> (bits - plen))
            if hit is not None:
                return hit
        return None


def parse_cidr(cidr: Any, path: str) -> CidrKey:
    """An ``envoy.config.core.v3.CidrRange`` as Envoy's ``CidrRange::create`` reads it.

    An unset ``prefix_len`` is 0; a length beyond the family's width is clamped to it; host
    bits are masked off.
    """
    if not cidr.address_prefix:
        raise ConfigError(f"{path}.address_prefix", "must not be empty")
    plen = cidr.prefix_len.value if cidr.HasField("prefix_len") else 0
    if plen > 128:
        raise ConfigError(f"{path}.prefix_len", f"must be at most 128, not {plen}")
    try:
        addr = ipaddress.ip_address(cidr.address_prefix)
    except ValueError:
        raise ConfigError(
            f"{path}.address_prefix", f"malformed IP address: {cidr.address_prefix!r}"
        ) from None
    bits = addr.max_prefixlen
    plen = min(plen, bits)
    network = int(addr) >> (bits - plen) << (bits - plen) if plen else 0
    return (addr.version, network, plen)


def cidr_keys(ranges: Iterable[Any], path: str) -> tuple[CidrKey, ...]:
    keys = tuple(parse_cidr(r, f"{path}[{i}]") for i, r in enumerate(ranges))
    return keys or _CATCH_ALL_CIDRS


# --------------------------------------------------------------------------------------------
# The compiled criteria of one chain
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainMatch:
    """One ``FilterChainMatch``, validated and normalised (empty tuples = no requirement)."""

    destination_port: int
    prefix_ranges: tuple[CidrKey, ...]
    server_names: tuple[str, ...]  # lower case; "*.x.com" stored as ".x.com"
    transport_protocol: str
    application_protocols: tuple[str, ...]
    direct_source_prefix_ranges: tuple[CidrKey, ...]
    source_type: int
    source_prefix_ranges: tuple[CidrKey, ...]
    source_ports: tuple[int, ...]

    @staticmethod
    def from_proto(match: Any, path: str) -> ChainMatch:
        if match.address_suffix or match.HasField("suffix_len"):
            field = "address_suffix" if match.address_suffix else "suffix_len"
            raise not_supported(f"{path}.{field}", field)  # unimplemented in Envoy too
        port = 0
        if match.HasField("destination_port"):
            port = match.destination_port.value
            if not 1 <= port <= 65535:
                raise ConfigError(f"{path}.destination_port", f"must be in 1..65535, not {port}")
        source_ports: list[int] = []
        for i, p in enumerate(match.source_ports):
            if not 1 <= p <= 65535:
                raise ConfigError(f"{path}.source_ports[{i}]", f"must be in 1..65535, not {p}")
            source_ports.append(p)
        if match.source_type not in _SOURCE_TYPES:
            raise ConfigError(f"{path}.source_type", f"unknown source type {match.source_type}")
        server_names: list[str] = []
        for i, name in enumerate(match.server_names):
            if "*" in name and not name.startswith("*."):
                raise ConfigError(
                    f"{path}.server_names[{i}]",
                    f"partial wildcards are not supported in \"server_names\": {name!r}",
                )
            if "*" in name[1:]:
                raise ConfigError(
                    f"{path}.server_names[{i}]",
                    f"a wildcard is allowed only as the first label: {name!r}",
                )
            name = name.lower()
            server_names.append(name[1:] if name.startswith("*.") else name)
        return ChainMatch(
            destination_port=port,
            prefix_ranges=cidr_keys(match.prefix_ranges, f"{path}.prefix_ranges"),
            server_names=tuple(server_names),
            transport_protocol=match.transport_protocol,
            application_protocols=tuple(match.application_protocols),
            direct_source_prefix_ranges=cidr_keys(
                match.direct_source_prefix_ranges, f"{path}.direct_source_prefix_ranges"
            ),
            source_type=match.source_type,
            source_prefix_ranges=cidr_keys(
                match.source_prefix_ranges, f"{path}.source_prefix_ranges"
            ),
            source_ports=tuple(source_ports),
        )


# --------------------------------------------------------------------------------------------
# The tree. Each level maps the most specific matching key to the next level.
# --------------------------------------------------------------------------------------------

# source port → (index of the chain in filter_chains, chain)
SourcePorts = dict[int, tuple[int, Any]]
SourceIps = CidrIndex[SourcePorts]
SourceTypes = dict[int, SourceIps]
DirectSourceIps = CidrIndex[SourceTypes]
ApplicationProtocols = dict[str, DirectSourceIps]
TransportProtocols = dict[str, ApplicationProtocols]
ServerNames = dict[str, TransportProtocols]
DestinationIps = CidrIndex[ServerNames]


class FilterChainManager(Generic[T]):
    """A listener's filter chains and the precompiled tree that picks one per connection."""

    __slots__ = ("chains", "default_filter_chain", "_ports")

    def __init__(
        self,
        chains: tuple[T, ...],
        default_filter_chain: T | None,
        ports: dict[int, DestinationIps],
    ) -> None:
        self.chains = chains
        self.default_filter_chain = default_filter_chain
        self._ports = ports

    @staticmethod
    def from_proto(
        listener: Any, build_chain: Callable[[Any, str], T], path: str
    ) -> FilterChainManager[T]:
        """Compile ``listener.filter_chains`` and ``default_filter_chain``.

        ``build_chain(chain_proto, chain_path)`` compiles one chain's filters; it is called
        once per chain, in order, after that chain's match criteria have been validated.
        """
        if listener.HasField("filter_chain_matcher"):
            raise not_supported(f"{path}.filter_chain_matcher", "filter_chain_matcher")
        if not listener.filter_chains and not listener.HasField("default_filter_chain"):
            raise ConfigError(f"{path}.filter_chains", "no filter chains specified")
        builder: _TreeBuilder = _TreeBuilder(path)
        seen: dict[bytes, int] = {}
        chains: list[T] = []
        for i, proto in enumerate(listener.filter_chains):
            chain_path = f"{path}.filter_chains[{i}]"
            match_path = f"{chain_path}.filter_chain_match"
            identity = proto.filter_chain_match.SerializeToString(deterministic=True)
            if identity in seen:
                other = seen[identity]
                raise ConfigError(
                    match_path,
                    f"filter chain {_chain_label(listener, i)} has the same matching rules "
                    f"defined as {_chain_label(listener, other)}",
                )
            seen[identity] = i
            match = ChainMatch.from_proto(proto.filter_chain_match, match_path)
            chain = build_chain(proto, chain_path)
            builder.add(match, i, chain, match_path)
            chains.append(chain)
        default: T | None = None
        if listener.HasField("default_filter_chain"):
            dpath = f"{path}.default_filter_chain"
            if listener.default_filter_chain.HasField("filter_chain_match"):
                raise ConfigError(
                    f"{dpath}.filter_chain_match",
                    "the default filter chain is used when no chain matches; it takes no "
                    "filter_chain_match",
                )
            default = build_chain(listener.default_filter_chain, dpath)
        return FilterChainManager(tuple(chains), default, builder.ports)

    # ----------------------------------------------------------------------------------------
    # Lookup: one walk down the tree (rule 2), no backtracking (rule 3).
    # ----------------------------------------------------------------------------------------

    def find_filter_chain(self, facts: ConnectionFacts) -> T | None:
        """The chain for a new connection, ``default_filter_chain``, or None."""
        found = self._find(facts)
        return self.default_filter_chain if found is None else found

    def _find(self, facts: ConnectionFacts) -> T | None:
        dest_ips = self._ports.get(facts.destination_port)
        if dest_ips is None:
            dest_ips = self._ports.get(0)
            if dest_ips is None:
                return None
        destination = parse_ip(facts.destination_ip)
        server_names = dest_ips.lookup(destination)
        if server_names is None:
            return None
        transports = _find_server_name(server_names, (facts.server_name or "").lower())
        if transports is None:
            return None
        app_protocols = transports.get(facts.transport_protocol)
        if app_protocols is None:
            app_protocols = transports.get(_CATCH_ALL)
            if app_protocols is None:
                return None
        direct_ips: DirectSourceIps | None = None
        for proto in facts.application_protocols:
            direct_ips = app_protocols.get(proto)
            if direct_ips is not None:
                break
        else:
            direct_ips = app_protocols.get(_CATCH_ALL)
        if direct_ips is None:
            return None
        source = parse_ip(facts.source_ip)
        direct = source if facts.direct_source_ip is None else parse_ip(facts.direct_source_ip)
        source_types = direct_ips.lookup(direct)
        if source_types is None:
            return None
        source_ips = _find_source_type(source_types, source, destination)
        if source_ips is None:
            return None
        ports = source_ips.lookup(source)
        if ports is None:
            return None
        hit = ports.get(facts.source_port)
        if hit is None and facts.source_port != 0:
            hit = ports.get(0)
        return None if hit is None else hit[1]


def _find_server_name(server_names: ServerNames, name: str) -> TransportProtocols | None:
    exact = server_names.get(name)
    if exact is not None:
        return exact
    # Wildcards, longest suffix first: ".example.com", then ".com" for "www.example.com".
    pos = name.find(".", 1)
    while pos != -1 and pos < len(name) - 1:
        hit = server_names.get(name[pos:])
        if hit is not None:
            return hit
        pos = name.find(".", pos + 1)
    return server_names.get(_CATCH_ALL)


def _find_source_type(
    source_types: SourceTypes, source: IpAddress, destination: IpAddress
) -> SourceIps | None:
    local = source_types.get(SOURCE_TYPE_SAME_IP_OR_LOOPBACK)
    external = source_types.get(SOURCE_TYPE_EXTERNAL)
    if local is not None or external is not None:
        if is_same_ip_or_loopback(source, destination):
            if local is not None:
                return local
        elif external is not None:
            return external
    return source_types.get(SOURCE_TYPE_ANY)


def _chain_label(listener: Any, index: int) -> str:
    name = listener.filter_chains[index].name
    return f"{name!r}" if name else f"filter_chains[{index}]"


class _TreeBuilder:
    """Inserts each chain under every combination of the values it lists (rule 1)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.ports: dict[int, DestinationIps] = {}

    def add(self, m: ChainMatch, index: int, chain: Any, match_path: str) -> None:
        dest_ips = self.ports.setdefault(m.destination_port, CidrIndex())
        for dest in m.prefix_ranges:
            server_names: ServerNames = dest_ips.setdefault(dest, dict)
            for name in m.server_names or (_CATCH_ALL,):
                transports = server_names.setdefault(name, {})
                app_protocols = transports.setdefault(m.transport_protocol, {})
                for proto in m.application_protocols or (_CATCH_ALL,):
                    direct_ips = app_protocols.setdefault(proto, CidrIndex())
                    for direct in m.direct_source_prefix_ranges:
                        source_types: SourceTypes = direct_ips.setdefault(direct, dict)
                        source_ips = source_types.setdefault(m.source_type, CidrIndex())
                        for src in m.source_prefix_ranges:
                            ports: SourcePorts = source_ips.setdefault(src, dict)
                            for port in m.source_ports or (0,):
                                other = ports.get(port)
                                if other is not None:
                                    raise ConfigError(
                                        match_path,
                                        "multiple filter chains with overlapping matching "
                                        f"rules are defined (filter_chains[{index}] overlaps "
                                        f"filter_chains[{other[0]}])"
                                        if other[0] != index
                                        else "multiple filter chains with overlapping "
                                        "matching rules are defined (this chain lists the "
                                        "same value twice)",
                                    )
                                ports[port] = (index, chain)
