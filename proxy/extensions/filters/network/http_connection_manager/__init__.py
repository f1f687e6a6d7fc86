"""``envoy.filters.network.http_connection_manager``: registers its factory on import."""

from proxy.extensions.filters.network.http_connection_manager import config as config
