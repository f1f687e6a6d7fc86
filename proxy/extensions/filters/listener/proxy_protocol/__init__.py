"""``envoy.filters.listener.proxy_protocol``: registers its factory on import."""

from proxy.extensions.filters.listener.proxy_protocol import config as config
