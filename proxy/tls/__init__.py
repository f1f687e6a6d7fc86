"""TLS transport sockets (Envoy's ``source/common/tls``): contexts, validation and the TLS socket.

``context`` compiles ``DownstreamTlsContext`` / ``UpstreamTlsContext`` into ``TlsContext``
(an ``ssl.SSLContext`` plus Envoy's peer checks); ``ssl_socket`` runs handshakes and moves
bytes; ``connection_info`` is what access logs read about a TLS connection.
"""
