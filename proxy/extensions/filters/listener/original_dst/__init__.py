"""``envoy.filters.listener.original_dst``: registers its factory on import."""

from proxy.extensions.filters.listener.original_dst import config as config
