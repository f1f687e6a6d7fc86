"""``envoy.filters.http.router``: registers its factory on import."""

from proxy.extensions.filters.http.router import config as config
