"""``envoy.filters.listener.proxy_protocol``: the real client behind a PROXY-speaking balancer.

Envoy's ``ProxyProtocol::Filter``, sans-IO (the shell peeks and drains):

1. ``header.parse_proxy_protocol`` reads v1 or v2 from the peeked bytes. A PROXY header sets
   the connection's remote address (what access logs, ``x-forwarded-for`` and
   ``source_prefix_ranges`` see; ``direct_source_prefix_ranges`` keep the socket peer) and
   restores the local address when it differs (``destination_port`` / ``prefix_ranges`` and
   ``use_original_dst`` hand-off then use it). LOCAL (v2) and UNKNOWN (v1) keep the socket's.
   The header is consumed; the bytes after it are the connection's.
2. A malformed header closes the connection and counts ``downstream_cx_proxy_proto_error``
   (root scope, Envoy's legacy name) and ``proxy_proto.[<stat_prefix>.]versions.v1|v2.error``,
   or ``not_found_disallowed`` when no version was recognised. Good headers count
   ``versions.<v>.found``; a version in ``disallowed_versions`` counts ``found`` and
   ``disallowed`` and closes; no header under ``allow_requests_without_proxy_protocol``
   counts ``not_found_allowed`` and continues with the socket's addresses.
3. TLVs are checked for framing and skipped: ``rules`` (TLV → dynamic metadata),
   ``pass_through_tlvs`` and ``tlv_location`` are refused at config time.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from proxy.config.errors import ConfigError
from proxy.extensions.filters.listener.proxy_protocol.header import (
    MAX_V2_LEN,
    V2_HEADER_LEN,
    V2_SIGNATURE,
    Denied,
    NeedMore,
    NotFound,
    ProxyHeader,
    ProxyProtocolError,
    parse_proxy_protocol,
)
from proxy.listener.listener_filter import (
    AcceptedSocket,
    FilterStatus,
    ListenerFilter,
    ListenerFilterBuffer,
)
from proxy.stats import Counter, Store

_V1, _V2 = 0, 1  # envoy.config.core.v3.ProxyProtocolConfig.Version


class _VersionStats:
    __slots__ = ("found", "disallowed", "error")

    def __init__(self, store: Store, prefix: str) -> None:
        self.found = store.counter(prefix + "found")
        self.disallowed = store.counter(prefix + "disallowed")
        self.error = store.counter(prefix + "error")


class ProxyProtocolStats:
    __slots__ = ("downstream_cx_proxy_proto_error", "not_found_allowed", "not_found_disallowed",
                 "v1", "v2")

    def __init__(self, store: Store, stat_prefix: str) -> None:
        prefix = f"proxy_proto.{stat_prefix}." if stat_prefix else "proxy_proto."
        self.downstream_cx_proxy_proto_error: Counter = store.counter(
            "downstream_cx_proxy_proto_error")
        self.not_found_allowed = store.counter(prefix + "not_found_allowed")
        self.not_found_disallowed = store.counter(prefix + "not_found_disallowed")
        self.v1 = _VersionStats(store, prefix + "versions.v1.")
        self.v2 = _VersionStats(store, prefix + "versions.v2.")


@dataclass(frozen=True)
class ProxyProtocolConfig:
    allow_requests_without_proxy_protocol: bool = False
    allow_v1: bool = True
    allow_v2: bool = True
    stat_prefix: str = ""
    _stats: weakref.WeakKeyDictionary[Store, ProxyProtocolStats] = field(
        default_factory=weakref.WeakKeyDictionary, init=False, repr=False, compare=False)

    @staticmethod
    def from_proto(msg: Any, path: str) -> ProxyProtocolConfig:
        disallowed = set(msg.disallowed_versions)
        for i, v in enumerate(msg.disallowed_versions):
            if v not in (_V1, _V2):
                raise ConfigError(f"{path}.disallowed_versions[{i}]", f"unknown version {v}")
        if {_V1, _V2} <= disallowed:
            raise ConfigError(f"{path}.disallowed_versions",
                              "Proxy Protocol filter is misconfigured: all proxy protocol "
                              "versions are disallowed.")
        return ProxyProtocolConfig(
            allow_requests_without_proxy_protocol=msg.allow_requests_without_proxy_protocol,
            allow_v1=_V1 not in disallowed,
            allow_v2=_V2 not in disallowed,
            stat_prefix=msg.stat_prefix,
        )

    def bind(self, store: Store) -> _Factory:
        stats = self._stats.get(store)
        if stats is None:
            stats = self._stats[store] = ProxyProtocolStats(store, self.stat_prefix)
        return _Factory(self, stats)


@dataclass(frozen=True, slots=True)
class _Factory:
    config: ProxyProtocolConfig
    stats: ProxyProtocolStats

    def new_filter(self) -> ProxyProtocolFilter:
        return ProxyProtocolFilter(self.config, self.stats)


class ProxyProtocolFilter(ListenerFilter):
    __slots__ = ("config", "stats", "max_read_bytes")

    def __init__(self, config: ProxyProtocolConfig, stats: ProxyProtocolStats) -> None:
        self.config = config
        self.stats = stats
        self.max_read_bytes = MAX_V2_LEN

    def on_accept(self, sock: AcceptedSocket) -> FilterStatus:
        return FilterStatus.STOP_ITERATION

    def on_data(self, buffer: ListenerFilterBuffer, sock: AcceptedSocket) -> FilterStatus:
        cfg, st = self.config, self.stats
        data = buffer.data
        result = parse_proxy_protocol(
            data, allow_v1=cfg.allow_v1, allow_v2=cfg.allow_v2,
            allow_requests_without_proxy_protocol=cfg.allow_requests_without_proxy_protocol)
        if isinstance(result, NeedMore):
            if len(data) >= V2_HEADER_LEN and data[:12] == V2_SIGNATURE:
                # A v2 header may be longer than the first peek (TLVs): read what it says.
                whole = V2_HEADER_LEN + ((data[14] << 8) | data[15])
                self.max_read_bytes = max(self.max_read_bytes, whole)
            return FilterStatus.STOP_ITERATION
        if isinstance(result, NotFound):
            st.not_found_allowed.inc()
            return FilterStatus.CONTINUE
        if isinstance(result, Denied):
            vst = st.v1 if result.version == 1 else st.v2
            vst.found.inc()
            vst.disallowed.inc()
            sock.close(f"proxy_protocol: v{result.version} is disallowed")
            return FilterStatus.STOP_ITERATION
        if isinstance(result, ProxyProtocolError):
            if result.version == 0:
                st.not_found_disallowed.inc()
            else:
                (st.v1 if result.version == 1 else st.v2).error.inc()
            st.downstream_cx_proxy_proto_error.inc()
            sock.close(f"proxy_protocol: {result.reason}")
            return FilterStatus.STOP_ITERATION
        assert isinstance(result, ProxyHeader)
        if not buffer.drain(result.length):
            (st.v1 if result.version == 1 else st.v2).error.inc()
            st.downstream_cx_proxy_proto_error.inc()
            sock.close("proxy_protocol: could not consume the header")
            return FilterStatus.STOP_ITERATION
        (st.v1 if result.version == 1 else st.v2).found.inc()
        if result.remote is not None and result.local is not None:
            if result.local != sock.local_address:
                sock.restore_local_address(result.local)
            sock.remote_address = result.remote
        return FilterStatus.CONTINUE
