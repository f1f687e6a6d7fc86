"""Envoy's runtime: layered key/value overrides read by features (``bootstrap.layered_runtime``).

Only static layers are supported (``supported.py`` refuses RTDS, disk and admin layers).
Semantics follow Envoy's ``source/common/runtime/runtime_impl.cc``:

1. Layers are applied in order; a key in a later layer replaces the same key of an earlier one.
   Layer names must be unique.
2. A static layer is a ``Struct``; nested structs flatten to dotted keys
   (``{envoy: {resource_limits: {x: 1}}}`` -> ``envoy.resource_limits.x``). A struct that is
   empty or has ``numerator``/``denominator`` is a value itself (a FractionalPercent). Lists
   and nulls are invalid.
3. Every entry keeps its raw string and the typed readings Envoy derives from it: a boolean
   (``true``/``false`` in any case, or any integer: non-zero is true), a double, and an unsigned
   integer (any non-negative number, floored).
4. ``feature_enabled(key, default_pct)`` is true for ``random_value % 100 < min(pct, 100)``
   where ``pct`` is the key's integer value, else the default.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from google.protobuf import struct_pb2

from proxy.config.errors import ConfigError

__all__ = ["Entry", "FractionalPercent", "Runtime"]

_UINT64_MAX = 2**64 - 1
_DENOMINATORS = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000,
                 0: 100, 1: 10_000, 2: 1_000_000}


@dataclass(frozen=True, slots=True)
class FractionalPercent:
    numerator: int
    denominator: int  # 100, 10_000 or 1_000_000


@dataclass(frozen=True, slots=True)
class Entry:
    """One runtime value, with Envoy's typed readings of it."""

    raw: str
    bool_value: bool | None = None
    double_value: float | None = None
    uint_value: int | None = None
    fractional_percent: FractionalPercent | None = None

    @classmethod
    def from_string(cls, raw: str) -> Entry:
        stripped = raw.strip()
        if stripped.lower() in ("true", "false"):
            return cls(raw, bool_value=stripped.lower() == "true")
        bool_value = None
        digits = stripped.removeprefix("+")
        if digits.isascii() and digits.isdigit() and int(digits) <= _UINT64_MAX:
            bool_value = int(digits) != 0  # absl::SimpleAtoi into a uint64: non-zero is true
        if "_" in raw:  # Python's float() reads "1_0"; absl::SimpleAtod does not
            return cls(raw, bool_value=bool_value)
        try:
            double = float(raw)
        except ValueError:
            return cls(raw, bool_value=bool_value)
        if math.isnan(double):
            return cls(raw, bool_value=bool_value, double_value=double)
        uint = int(double) if 0 <= double <= _UINT64_MAX else None
        return cls(raw, bool_value=bool_value, double_value=double, uint_value=uint)


class Runtime:
    """An immutable snapshot of the merged runtime layers."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Entry] | None = None) -> None:
        self._values: Mapping[str, Entry] = MappingProxyType(dict(values or {}))

    @classmethod
    def from_proto(cls, layered_runtime: Any, path: str) -> Runtime:
        """Merge the static layers of an ``envoy.config.bootstrap.v3.LayeredRuntime``."""
        values: dict[str, Entry] = {}
        names: set[str] = set()
        for i, layer in enumerate(layered_runtime.layers):
            lpath = f"{path}.layers[{i}]"
            if layer.name in names:
                raise ConfigError(f"{lpath}.name", f"duplicate runtime layer name {layer.name!r}")
            names.add(layer.name)
            kind = layer.WhichOneof("layer_specifier")
            if kind is None:
                continue
            if kind != "static_layer":
                raise ConfigError(f"{lpath}.{kind}", f"{kind} is not supported")
            layer_values: dict[str, Entry] = {}
            for key, value in layer.static_layer.fields.items():
                _walk(value, key, layer_values, f"{lpath}.static_layer")
            values.update(layer_values)
        return cls(values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Runtime:
        """A runtime from a (possibly nested) mapping, as one static layer would give."""
        layer = struct_pb2.Struct()
        layer.update(values)
        out: dict[str, Entry] = {}
        for key, value in layer.fields.items():
            _walk(value, key, out, "")
        return cls(out)

    # ---- readers (Envoy's Snapshot API) ---------------------------------------------------
    def get(self, key: str, default: str | None = None) -> str | None:
        """The raw string value of ``key``."""
        entry = self._values.get(key)
        return default if entry is None else entry.raw

    def get_int(self, key: str, default: int) -> int:
        """The unsigned integer value of ``key`` (Envoy's ``getInteger``)."""
        entry = self._values.get(key)
        if entry is None or entry.uint_value is None:
            return default
        return entry.uint_value

    def get_double(self, key: str, default: float) -> float:
        entry = self._values.get(key)
        if entry is None or entry.double_value is None:
            return default
        return entry.double_value

    def get_bool(self, key: str, default: bool) -> bool:
        entry = self._values.get(key)
        if entry is None or entry.bool_value is None:
            return default
        return entry.bool_value

    def get_fractional_percent(self, key: str) -> FractionalPercent | None:
        entry = self._values.get(key)
        return None if entry is None else entry.fractional_percent

    def feature_enabled(self, key: str, default_pct: int, random_value: int | None = None) -> bool:
        """Whether a percentage-gated feature is on for this draw (Envoy's ``featureEnabled``).

        Pure given ``random_value``; without one, a value is drawn from ``random``.
        """
        cutoff = min(self.get_int(key, default_pct), 100)
        if cutoff <= 0:
            return False
        if cutoff >= 100:
            return True
        if random_value is None:
            random_value = random.getrandbits(64)
        return random_value % 100 < cutoff

    # ---- mapping-ish ------------------------------------------------------------------------
    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __repr__(self) -> str:
        return f"Runtime({ {k: e.raw for k, e in self._values.items()} })"


def _walk(value: struct_pb2.Value, prefix: str, out: dict[str, Entry], path: str) -> None:
    kind = value.WhichOneof("kind")
    if kind in (None, "null_value", "list_value"):
        raise ConfigError(f"{path}.{prefix}" if path else prefix,
                          f"invalid runtime entry value for {prefix} (want a string, number,"
                          " boolean or mapping)")
    if kind == "string_value":
        out.setdefault(prefix, Entry.from_string(value.string_value))
    elif kind == "bool_value":
        out.setdefault(prefix, Entry.from_string("true" if value.bool_value else "false"))
    elif kind == "number_value":
        out.setdefault(prefix, Entry.from_string(_number_text(value.number_value)))
    else:
        fields = value.struct_value.fields
        if not fields or "numerator" in fields or "denominator" in fields:
            out.setdefault(prefix, _fraction_entry(value.struct_value))
            return
        for key, sub in fields.items():
            _walk(sub, f"{prefix}.{key}", out, path)


def _number_text(n: float) -> str:
    if n.is_integer() and abs(n) < 2**63:
        return str(int(n))
    return repr(n)


def _fraction_entry(struct: struct_pb2.Struct) -> Entry:
    fields = struct.fields
    raw = "{" + ", ".join(
        f"{k}: {_number_text(v.number_value) if v.WhichOneof('kind') == 'number_value' else v.string_value}"
        for k, v in sorted(fields.items())) + "}"
    num = fields.get("numerator")
    den = fields.get("denominator")
    if num is None:
        numerator: int | None = 0
    elif num.WhichOneof("kind") == "number_value" and num.number_value >= 0:
        numerator = int(num.number_value)
    else:
        numerator = None
    if den is None:
        denominator: int | None = 100
    elif den.WhichOneof("kind") == "string_value":
        denominator = _DENOMINATORS.get(den.string_value)
    elif den.WhichOneof("kind") == "number_value" and den.number_value.is_integer():
        denominator = _DENOMINATORS.get(int(den.number_value))
    else:
        denominator = None
    fraction = None
    if numerator is not None and denominator is not None and set(fields) <= {"numerator", "denominator"}:
        fraction = FractionalPercent(numerator, denominator)
    return Entry(raw, fractional_percent=fraction)


def layer_entries(layered_runtime: Any) -> list[tuple[str, dict[str, str]]]:
    """(layer name, key -> raw value) of each layer, in order (admin ``/runtime``)."""
    out: list[tuple[str, dict[str, str]]] = []
    for layer in layered_runtime.layers:
        values: dict[str, Entry] = {}
        if layer.WhichOneof("layer_specifier") == "static_layer":
            for key, value in layer.static_layer.fields.items():
                _walk(value, key, values, "")
        out.append((layer.name, {k: e.raw for k, e in values.items()}))
    return out
