"""trioxy: an Envoy-class proxy on trio."""

__version__ = "0.1.0"
