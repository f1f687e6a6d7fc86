"""``envoy.filters.listener.http_inspector``: registers its factory on import."""

from proxy.extensions.filters.listener.http_inspector import config as config
