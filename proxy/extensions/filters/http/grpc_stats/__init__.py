"""``envoy.filters.http.grpc_stats``: registers its factory on import."""

from proxy.extensions.filters.http.grpc_stats import config as config
