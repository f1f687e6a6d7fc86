"""The listener filter chain (sans-IO) and the listener fields that configure it."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from proxy.config.bootstrap import load_bootstrap
from proxy.config.errors import ConfigError
from proxy.config.snapshot import build_snapshot
from proxy.extensions.filters.listener.original_dst.original_dst import OriginalDstConfig
from proxy.extensions.filters.listener.tls_inspector.tls_inspector import TlsInspectorConfig
from proxy.listener.listener_filter import (
    AcceptedSocket,
    Action,
    FilterStatus,
    ListenerFilter,
    ListenerFilterBuffer,
    ListenerFilterChain,
)


class _Buffer:
    def __init__(self, data: bytes = b"") -> None:
        self.data = data

    def drain(self, n: int) -> bool:
        self.data = self.data[n:]
        return True


class Recorder(ListenerFilter):
    """Waits for ``want`` bytes, optionally consumes ``eat`` of them, records what it saw."""

    def __init__(self, log: list[str], name: str, want: int = 0, eat: int = 0,
                 close: bool = False) -> None:
        self.log, self.name, self.want, self.eat, self.close = log, name, want, eat, close
        self.max_read_bytes = max(want, 1) if want else 0

    def on_accept(self, sock: AcceptedSocket) -> FilterStatus:
        self.log.append(f"{self.name}.accept")
        return FilterStatus.STOP_ITERATION if self.want else FilterStatus.CONTINUE

    def on_data(self, buffer: ListenerFilterBuffer, sock: AcceptedSocket) -> FilterStatus:
        self.log.append(f"{self.name}.data:{buffer.data.decode()}")
        if self.close:
            sock.close("no")
            return FilterStatus.STOP_ITERATION
        if len(buffer.data) < self.want:
            return FilterStatus.STOP_ITERATION
        if self.eat:
            buffer.drain(self.eat)
        return FilterStatus.CONTINUE


def sock() -> AcceptedSocket:
    return AcceptedSocket(("127.0.0.1", 80), ("127.0.0.1", 9999))


def test_no_reading_filters_finish_at_start() -> None:
    log: list[str] = []
    chain = ListenerFilterChain([Recorder(log, "a"), Recorder(log, "b")], sock())
    assert chain.start() is Action.DONE
    assert log == ["a.accept", "b.accept"]


def test_filters_run_in_order_and_the_next_sees_what_was_peeked() -> None:
    log: list[str] = []
    s = sock()
    chain = ListenerFilterChain(
        [Recorder(log, "pp", want=3, eat=2), Recorder(log, "inspect", want=2)], s)
    buf = _Buffer()
    assert chain.start() is Action.NEED_DATA
    assert not chain.has_unseen(buf)  # nothing peeked yet: the shell waits
    buf.data = b"ab"
    assert chain.on_data(buf) is Action.NEED_DATA
    buf.data = b"abcd"
    # pp consumes "ab"; "cd" is already there: inspect sees it without a new peek.
    assert chain.on_data(buf) is Action.NEED_DATA
    assert chain.has_unseen(buf)
    assert chain.on_data(buf) is Action.DONE
    assert log == ["pp.accept", "pp.data:ab", "pp.data:abcd", "inspect.accept", "inspect.data:cd"]
    assert s.transport_protocol == "raw_buffer"


def test_a_filter_that_closes_ends_the_chain() -> None:
    log: list[str] = []
    s = sock()
    chain = ListenerFilterChain([Recorder(log, "x", want=1, close=True), Recorder(log, "y")], s)
    chain.start()
    assert chain.on_data(_Buffer(b"z")) is Action.CLOSE
    assert s.closed and log == ["x.accept", "x.data:z"]


def test_a_filter_that_wants_more_than_it_may_read_is_closed() -> None:
    log: list[str] = []
    f = Recorder(log, "greedy", want=10)
    f.max_read_bytes = 4
    s = sock()
    chain = ListenerFilterChain([f], s)
    chain.start()
    assert chain.on_data(_Buffer(b"abcd")) is Action.CLOSE
    assert s.closed and "stalled" in s.close_reason


def test_restore_local_address() -> None:
    s = sock()
    assert not s.local_address_restored
    s.restore_local_address(("10.0.0.2", 9000))
    assert s.local_address == ("10.0.0.2", 9000) and s.local_address_restored


def test_original_dst_filter() -> None:
    f = OriginalDstConfig().bind(None).new_filter()
    s = AcceptedSocket(("127.0.0.1", 15001), ("10.0.0.9", 5000), lambda: ("10.0.0.2", 9000))
    assert f.on_accept(s) is FilterStatus.CONTINUE
    assert s.local_address == ("10.0.0.2", 9000) and s.local_address_restored
    # Not redirected: the kernel answers the socket's own address, or nothing.
    for answer in (("127.0.0.1", 15001), None):
        s = AcceptedSocket(("127.0.0.1", 15001), ("10.0.0.9", 5000), lambda a=answer: a)
        f.on_accept(s)
        assert not s.local_address_restored and s.local_address == ("127.0.0.1", 15001)


# ----------------------------------------------------------------------------- config
TLS = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
HTTPI = "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"
PP = "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol"
TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
L0 = "static_resources.listeners[0]"


def bootstrap(**listener: Any) -> dict[str, Any]:
    lst = {"name": "l", "address": {"socket_address": {"address": "127.0.0.1",
                                                       "port_value": 10000}},
           "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy",
                                           "typed_config": {"@type": TCP, "stat_prefix": "t",
                                                            "cluster": "c"}}]}]}
    lst.update(listener)
    return {"static_resources": {"listeners": [lst], "clusters": [{
        "name": "c", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED"}]}}


def snapshot(cfg: dict[str, Any]) -> Any:
    return build_snapshot(load_bootstrap(None, yaml.safe_dump(cfg)))


def refused(cfg: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        snapshot(cfg)
    return info.value


def test_listener_defaults_cost_nothing() -> None:
    lc = snapshot(bootstrap()).listeners[0]
    assert lc.listener_filters == ()
    assert lc.listener_filters_timeout == 15.0 and not lc.continue_on_listener_filters_timeout
    assert not lc.use_original_dst and lc.bind_to_port


def test_listener_filter_fields() -> None:
    cfg = bootstrap(
        listener_filters=[{"name": "tls", "typed_config": {"@type": TLS}},
                          {"name": "http", "typed_config": {"@type": HTTPI}}],
        listener_filters_timeout="0s", continue_on_listener_filters_timeout=True,
        use_original_dst=True)
    lc = snapshot(cfg).listeners[0]
    kinds = [type(f).__name__ for f in lc.listener_filters]
    # use_original_dst appends original_dst after the configured filters, as Envoy does.
    assert kinds == ["TlsInspectorConfig", "HttpInspectorConfig", "OriginalDstConfig"]
    assert isinstance(lc.listener_filters[0], TlsInspectorConfig)
    assert lc.listener_filters_timeout is None  # 0 disables it
    assert lc.continue_on_listener_filters_timeout and lc.use_original_dst


def test_bind_to_port_false_listeners_are_apart() -> None:
    cfg = bootstrap()
    second = yaml.safe_load(yaml.safe_dump(cfg["static_resources"]["listeners"][0]))
    second.update(name="virtual", bind_to_port=False,
                  address={"socket_address": {"address": "10.0.0.3", "port_value": 8080}})
    cfg["static_resources"]["listeners"].append(second)
    snap = snapshot(cfg)
    assert [lc.name for lc in snap.listeners] == ["l"]
    assert [lc.name for lc in snap.unbound_listeners] == ["virtual"]


@pytest.mark.parametrize(("filt", "path", "words"), [
    ({"name": "x", "typed_config": {"@type": TLS, "enable_ja3_fingerprinting": True}},
     f"{L0}.listener_filters[0].typed_config.enable_ja3_fingerprinting", "not supported"),
    ({"name": "x", "typed_config": {"@type": PP, "rules": [
        {"tlv_type": 1, "on_tlv_present": {"key": "k"}}]}},
     f"{L0}.listener_filters[0].typed_config.rules", "not supported"),
    ({"name": "x", "typed_config": {"@type": PP, "pass_through_tlvs": {"match_type": 1}}},
     f"{L0}.listener_filters[0].typed_config.pass_through_tlvs", "not supported"),
    ({"name": "x", "typed_config": {"@type": TLS}, "filter_disabled": {"any_match": True}},
     f"{L0}.listener_filters[0].filter_disabled", "not supported"),
    ({"name": "envoy.filters.listener.tls_inspector"},
     f"{L0}.listener_filters[0].typed_config", "needs a typed_config"),
    ({"name": "x", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_src.v3."
                 "OriginalSrc"}},
     f"{L0}.listener_filters[0].typed_config", "not supported"),
])
def test_refused_listener_filters(filt: dict[str, Any], path: str, words: str) -> None:
    err = refused(bootstrap(listener_filters=[filt]))
    assert err.path == path and words in err.message


def test_refused_listener_fields_stay_refused() -> None:
    err = refused(bootstrap(transparent=True))
    assert err.path == f"{L0}.transparent"
