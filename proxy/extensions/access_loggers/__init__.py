"""Access loggers: importing this package registers ``envoy.access_loggers.file``,
``envoy.access_loggers.stdout`` and ``envoy.access_loggers.stderr``."""

from proxy.extensions.access_loggers import file as file
from proxy.extensions.access_loggers import stream as stream
