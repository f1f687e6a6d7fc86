"""``envoy.filters.listener.tls_inspector``: registers its factory on import."""

from proxy.extensions.filters.listener.tls_inspector import config as config
