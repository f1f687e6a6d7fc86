"""``envoy.filters.network.tcp_proxy``: registers its factory on import."""

from proxy.extensions.filters.network.tcp_proxy import config as config
