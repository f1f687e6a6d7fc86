"""Transport sockets (``envoy.transport_sockets.*``) and the helper that compiles a
``TransportSocket`` message through the registries."""

from __future__ import annotations

from typing import Any

from proxy.config.errors import ConfigError
from proxy.registry import Registry


def build_transport_socket(msg: Any, registry: Registry, ctx: Any, path: str) -> Any:
    """Compile an ``envoy.config.core.v3.TransportSocket`` at ``path``: the factory's result
    (a ``TlsContext``), or None for plaintext (``raw_buffer``)."""
    from proxy.config.bootstrap import message_class, unpack_any
    from proxy.extensions.transport_sockets import raw_buffer, tls  # noqa: F401  (registers)

    if msg.HasField("typed_config"):
        ext = registry.lookup(msg.name, msg.typed_config.type_url, f"{path}.typed_config")
        config = unpack_any(msg.typed_config, f"{path}.typed_config")
    else:
        if not msg.name:
            raise ConfigError(f"{path}.name", "a transport socket needs a name or a typed_config")
        ext = registry.lookup(msg.name, "", f"{path}.name")
        config = message_class(ext.type_url.rsplit("/", 1)[-1], path)()  # the empty config, as Envoy
    return ext.factory(config, ctx, f"{path}.typed_config")
