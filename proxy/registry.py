"""One registry per extension category, keyed by Envoy's names.

A factory is registered under its Envoy name (``envoy.filters.http.router``) and the type
URL of its ``typed_config`` message. Envoy looks an extension up by type URL first and by
name second; so do we. An unknown extension is a config error, never ignored.

A factory is called once per config as ``factory(typed_config, ctx, path)`` where
``typed_config`` is the unpacked proto message, ``ctx`` the ``FactoryContext`` of the build
and ``path`` the field path of ``typed_config`` for error messages; it returns the compiled,
immutable filter config (which creates one filter per connection or stream).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.config.errors import ConfigError

Factory = Callable[[Any, Any, str], Any]


@dataclass(frozen=True, slots=True)
class Extension:
    name: str
    type_url: str
    factory: Factory


class Registry:
    def __init__(self, category: str) -> None:
        self.category = category
        self._by_name: dict[str, Extension] = {}
        self._by_type: dict[str, Extension] = {}

    def register(self, name: str, message_type: type) -> Callable[[Factory], Factory]:
        type_url = "type.googleapis.com/" + message_type.DESCRIPTOR.full_name

        def deco(factory: Factory) -> Factory:
            ext = Extension(name, type_url, factory)
            self._by_name[name] = ext
            self._by_type[type_url] = ext
            return factory

        return deco

    def lookup(self, name: str, type_url: str, path: str) -> Extension:
        if type_url:
            ext = self._by_type.get(type_url)
            if ext is None:
                raise ConfigError(
                    path, f"{self.category} with typed_config {type_url!r} is not supported"
                    f" (known: {', '.join(sorted(self._by_name)) or 'none'})"
                )
            return ext
        ext = self._by_name.get(name)
        if ext is None:
            raise ConfigError(
                path, f"unknown {self.category} {name!r}"
                f" (known: {', '.join(sorted(self._by_name)) or 'none'})"
            )
        return ext

    def names(self) -> list[str]:
        return sorted(self._by_name)


network_filters = Registry("network filter")
http_filters = Registry("HTTP filter")
access_loggers = Registry("access logger")
listener_filters = Registry("listener filter")
# Transport sockets (envoy.transport_sockets.tls, .raw_buffer): a factory returns the compiled
# context (proxy.tls.context.TlsContext), or None for plaintext.
downstream_transport_sockets = Registry("downstream transport socket")
upstream_transport_sockets = Registry("upstream transport socket")
