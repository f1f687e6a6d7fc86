"""``envoy.access_loggers.stdout`` and ``envoy.access_loggers.stderr``: register on import."""

from proxy.extensions.access_loggers.stream import config as config
