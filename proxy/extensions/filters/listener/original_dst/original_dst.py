"""``envoy.filters.listener.original_dst``: the destination before iptables REDIRECT / TPROXY.

Envoy's ``OriginalDstFilter``, sans-IO: the shell's ``AcceptedSocket.original_destination``
does the ``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` (``SOL_IPV6, IP6T_SO_ORIGINAL_DST`` for an
IPv6 socket). When it answers an address other than the socket's local address, that address
is restored as the connection's local address (``local_address_restored``): filter chain
matching, access logs, ``use_original_dst`` hand-off and ORIGINAL_DST clusters then see the
original destination. A connection that was not redirected keeps its local address. No stats,
as in Envoy.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.listener.listener_filter import AcceptedSocket, FilterStatus, ListenerFilter
from proxy.stats import Store


class OriginalDstFilter(ListenerFilter):
    __slots__ = ()

    def on_accept(self, sock: AcceptedSocket) -> FilterStatus:
        original = sock.original_destination()
        if original is not None and original != sock.local_address:
            sock.restore_local_address(original)
        return FilterStatus.CONTINUE


_FILTER = OriginalDstFilter()  # stateless: one for every socket


@dataclass(frozen=True)
class OriginalDstConfig:
    def bind(self, store: Store) -> OriginalDstConfig:
        return self

    def new_filter(self) -> OriginalDstFilter:
        return _FILTER
