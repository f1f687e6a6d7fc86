"""``envoy.access_loggers.file``: registers its factory on import."""

from proxy.extensions.access_loggers.file import config as config
