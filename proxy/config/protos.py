"""Small readers for protobuf well-known types, so every module reads them the same way."""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf.message import Message

from proxy.config.errors import ConfigError

T = TypeVar("T")


def duration_s(msg: Message, field: str) -> float | None:
    """A ``google.protobuf.Duration`` field in seconds, or None when unset."""
    if not msg.HasField(field):
        return None
    d = getattr(msg, field)
    return d.seconds + d.nanos / 1e9


def positive_duration_s(msg: Message, field: str, path: str, default: float | None) -> float | None:
    """A Duration that must be > 0 when set (Envoy's ``gt: {}`` rule)."""
    v = duration_s(msg, field)
    if v is None:
        return default
    if v <= 0:
        raise ConfigError(f"{path}.{field}", "must be greater than 0s")
    return v


def wrapped(msg: Message, field: str, default: T) -> T | Any:
    """The value of a wrapper field (``UInt32Value``, ``BoolValue``...), or ``default``."""
    if not msg.HasField(field):
        return default
    return getattr(msg, field).value


def which(msg: Message, oneof: str) -> str | None:
    return msg.WhichOneof(oneof)
