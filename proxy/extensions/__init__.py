"""Every built-in extension; importing this package fills the registries.

Envoy links its extensions statically; so do we, by importing each package here.
"""

from proxy.extensions import access_loggers as access_loggers
from proxy.extensions.filters.http import health_check as health_check
from proxy.extensions.filters.http import router as router
from proxy.extensions.filters.network import http_connection_manager as http_connection_manager
from proxy.extensions.filters.network import tcp_proxy as tcp_proxy
