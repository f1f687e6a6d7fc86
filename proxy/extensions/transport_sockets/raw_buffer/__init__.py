"""``envoy.transport_sockets.raw_buffer``: registers its factories on import."""

from proxy.extensions.transport_sockets.raw_buffer import config as config
