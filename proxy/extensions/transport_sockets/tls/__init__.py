"""``envoy.transport_sockets.tls``: registers its factories on import."""

from proxy.extensions.transport_sockets.tls import config as config
