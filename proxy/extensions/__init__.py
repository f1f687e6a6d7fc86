"""Every built-in extension; importing this package fills the registries.

Envoy links its extensions statically; so do we, by importing each package here.
"""

from proxy.extensions import access_loggers as access_loggers
from proxy.extensions.filters.http import grpc_stats as grpc_stats
from proxy.extensions.filters.http import health_check as health_check
from proxy.extensions.filters.http import router as router
from proxy.extensions.filters.listener import http_inspector as http_inspector
from proxy.extensions.filters.listener import original_dst as original_dst
from proxy.extensions.filters.listener import proxy_protocol as proxy_protocol
from proxy.extensions.filters.listener import tls_inspector as tls_inspector
from proxy.extensions.filters.network import http_connection_manager as http_connection_manager
from proxy.extensions.filters.network import tcp_proxy as tcp_proxy
from proxy.extensions.transport_sockets import raw_buffer as raw_buffer
from proxy.extensions.transport_sockets import tls as tls
