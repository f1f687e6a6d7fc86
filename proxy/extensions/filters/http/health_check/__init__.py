"""``envoy.filters.http.health_check``: registers its factory on import."""

from proxy.extensions.filters.http.health_check import config as config
