"""The one error type for a refused configuration: it names the field path."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration Envoy would accept but trioxy refuses, or one that is invalid.

    ``path`` is the proto field path in Envoy's spelling
    (``static_resources.listeners[0].filter_chains[0].filters[0].typed_config.codec_type``).
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


def not_supported(path: str, what: str | None = None) -> ConfigError:
    return ConfigError(path, f"{what} is not supported" if what else "is not supported by trioxy")
