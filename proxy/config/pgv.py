"""Envoy's protoc-gen-validate annotations, enforced at load time.

Envoy's protos carry ``(validate.rules)`` on fields (``port_value`` ``lte: 65535``, ``name``
``min_len: 1``...) and ``(validate.required)`` on oneofs; Envoy runs the generated validators,
json_format does not. This module interprets the annotations from the descriptors at run time.

Theory of operation:

1. Rules are read once per message type from the field options (the ``validate`` package that
   xds-protos ships) and cached as a plan: the fields that carry rules.
2. As PGV does, scalar rules apply to a field whether or not it is set (proto3 cannot tell
   ``0`` from unset), except that a field of a oneof, or one with explicit presence, is checked
   only when set; ``ignore_empty`` skips the default value.
3. Every set message field is walked recursively (lists and maps too); an ``Any`` is unpacked
   and its content validated, as Envoy validates a ``typed_config`` when the factory takes it.
4. Rule kinds not implemented here (``pattern``, ``email``, ``hostname``, timestamps...) are
   skipped: this is validation trioxy adds on top of ``supported.check``, which is what makes
   sure nothing set is silently ignored.

Errors are ``ConfigError(path, message)`` with PGV's wording, e.g.
``static_resources.listeners[0].address.socket_address.port_value: value must be less than
or equal to 65535``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from validate import validate_pb2

from proxy.config.errors import ConfigError

__all__ = ["validate"]

_WRAPPERS = frozenset(
    f"google.protobuf.{n}"
    for n in ("DoubleValue", "FloatValue", "Int64Value", "UInt64Value", "Int32Value",
              "UInt32Value", "BoolValue", "StringValue", "BytesValue")
)
_NUMERIC_KINDS = frozenset(
    ("float", "double", "int32", "int64", "uint32", "uint64", "sint32", "sint64", "fixed32",
     "fixed64", "sfixed32", "sfixed64")
)
# PGV's well-known regexes (validate.proto, KnownRegex).
_HEADER_NAME = re.compile(r"^:?[0-9a-zA-Z!#$%&'*+-.^_|~`]+$")
_HEADER_VALUE = re.compile("^[^\u0000-\u0008\u000a-\u001f\u007f]*$")
_HEADER_LOOSE = re.compile("^[^\u0000\u000a\u000d]*$")


def validate(msg: Message, path: str = "") -> None:
    """Raise ConfigError for the first PGV rule ``msg`` (recursively) violates."""
    desc = msg.DESCRIPTOR
    if desc.full_name == "google.protobuf.Any":
        if msg.type_url:  # type: ignore[attr-defined]
            from proxy.config.bootstrap import unpack_any

            validate(unpack_any(msg, path), path)  # type: ignore[arg-type]
        return
    if _message_disabled(desc):
        return
    for oneof_name, members in _required_oneofs(desc):
        if msg.WhichOneof(oneof_name) is None:
            raise ConfigError(path or desc.full_name,
                              f"one of {', '.join(members)} must be set")
    for field, rules in _ruled_fields(desc):
        _check_field(msg, field, rules, _join(path, field.name))
    for field, value in msg.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        fpath = _join(path, field.name)
        if _is_map(field):
            if field.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                for key in value:
                    validate(value[key], f'{fpath}["{key}"]')
        elif field.is_repeated:
            for i, item in enumerate(value):
                validate(item, f"{fpath}[{i}]")
        elif not _skipped(field):
            validate(value, fpath)


# ----------------------------------------------------------------------------- plans
@cache
def _ruled_fields(desc: Descriptor) -> tuple[tuple[FieldDescriptor, Any], ...]:
    out = []
    for field in desc.fields:
        opts = field.GetOptions()
        if opts.HasExtension(validate_pb2.rules):
            out.append((field, opts.Extensions[validate_pb2.rules]))
    return tuple(out)


@cache
def _required_oneofs(desc: Descriptor) -> tuple[tuple[str, tuple[str, ...]], ...]:
    out = []
    for oneof in desc.oneofs:
        if oneof.GetOptions().Extensions[validate_pb2.required]:
            out.append((oneof.name, tuple(f.name for f in oneof.fields)))
    return tuple(out)


@cache
def _message_disabled(desc: Descriptor) -> bool:
    opts = desc.GetOptions()
    return bool(opts.Extensions[validate_pb2.disabled] or opts.Extensions[validate_pb2.ignored])


@cache
def _skipped(field: FieldDescriptor) -> bool:
    opts = field.GetOptions()
    if not opts.HasExtension(validate_pb2.rules):
        return False
    rules = opts.Extensions[validate_pb2.rules]
    return rules.HasField("message") and rules.message.skip


def _in(r: Any) -> Any:
    """The ``in`` list of a rule (a Python keyword, so not an attribute name)."""
    return getattr(r, "in")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.is_repeated
        and field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type.GetOptions().map_entry
    )


# ----------------------------------------------------------------------------- one field
def _check_field(msg: Message, field: FieldDescriptor, rules: Any, path: str) -> None:
    kind = rules.WhichOneof("type")
    if field.containing_oneof is not None and not msg.HasField(field.name):
        return  # PGV checks a oneof member only when it is the one set
    if _is_map(field):
        _check_map(getattr(msg, field.name), field, rules, path)
        return
    if field.is_repeated:
        _check_repeated(getattr(msg, field.name), field, rules, path)
        return
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        is_set = msg.HasField(field.name)
        required = (
            (rules.HasField("message") and rules.message.required)
            or (kind == "duration" and rules.duration.required)
            or (kind == "any" and rules.any.required)
            or (kind == "timestamp" and rules.timestamp.required)
        )
        if not is_set:
            if required:
                raise ConfigError(path, "value is required")
            return
        value = getattr(msg, field.name)
        if kind == "duration":
            _check_duration(value, rules.duration, path)
        elif kind == "any":
            _check_any(value, rules.any, path)
        elif kind is not None and field.message_type.full_name in _WRAPPERS:
            _check_scalar(value.value, kind, getattr(rules, kind), path, None)
        return
    if field.has_presence and not msg.HasField(field.name):
        return
    if kind is not None:
        _check_scalar(getattr(msg, field.name), kind, getattr(rules, kind), path, field)


def _check_repeated(values: Sequence[Any], field: FieldDescriptor, rules: Any, path: str) -> None:
    if rules.WhichOneof("type") != "repeated":
        return
    r = rules.repeated
    if r.ignore_empty and not values:
        return
    n = len(values)
    if r.HasField("min_items") and n < r.min_items:
        raise ConfigError(path, f"value must contain at least {r.min_items} item(s)")
    if r.HasField("max_items") and n > r.max_items:
        raise ConfigError(path, f"value must contain no more than {r.max_items} item(s)")
    if r.unique and field.type != FieldDescriptor.TYPE_MESSAGE and len(set(values)) != n:
        raise ConfigError(path, "repeated value must contain unique items")
    if r.HasField("items"):
        _check_elements(values, field, r.items, path, lambda i: f"{path}[{i}]")


def _check_map(mapping: Any, field: FieldDescriptor, rules: Any, path: str) -> None:
    if rules.WhichOneof("type") != "map":
        return
    r = rules.map
    n = len(mapping)
    if r.ignore_empty and n == 0:
        return
    if r.HasField("min_pairs") and n < r.min_pairs:
        raise ConfigError(path, f"value must contain at least {r.min_pairs} pair(s)")
    if r.HasField("max_pairs") and n > r.max_pairs:
        raise ConfigError(path, f"value must contain no more than {r.max_pairs} pair(s)")
    entry = field.message_type
    if r.HasField("keys"):
        _check_elements(list(mapping), entry.fields_by_name["key"], r.keys, path,
                        lambda k: f'{path}["{k}"]', keys=True)
    if r.HasField("values"):
        keys = list(mapping)
        _check_elements([mapping[k] for k in keys], entry.fields_by_name["value"], r.values,
                        path, lambda i: f'{path}["{keys[i]}"]')


def _check_elements(values: Sequence[Any], field: FieldDescriptor, rules: Any, path: str,
                    name: Callable[[Any], str], keys: bool = False) -> None:
    kind = rules.WhichOneof("type")
    for i, value in enumerate(values):
        where = name(value if keys else i)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if kind == "duration":
                _check_duration(value, rules.duration, where)
            elif kind == "any":
                _check_any(value, rules.any, where)
            elif kind is not None and field.message_type.full_name in _WRAPPERS:
                _check_scalar(value.value, kind, getattr(rules, kind), where, None)
        elif kind is not None:
            _check_scalar(value, kind, getattr(rules, kind), where, field)


# ----------------------------------------------------------------------------- scalar kinds
def _check_scalar(value: Any, kind: str, r: Any, path: str, field: FieldDescriptor | None) -> None:
    if kind in _NUMERIC_KINDS:
        _check_number(value, r, path)
    elif kind == "string":
        _check_string(value, r, path)
    elif kind == "bytes":
        _check_bytes(value, r, path)
    elif kind == "bool":
        if r.HasField("const") and value != r.const:
            raise ConfigError(path, f"value must equal {str(r.const).lower()}")
    elif kind == "enum":
        _check_enum(value, r, path, field)


def _check_number(value: float, r: Any, path: str) -> None:
    if getattr(r, "ignore_empty", False) and value == 0:
        return
    if r.HasField("const") and value != r.const:
        raise ConfigError(path, f"value must equal {_num(r.const)}")
    if _in(r) and value not in _in(r):
        raise ConfigError(path, f"value must be in list {[_num(v) for v in _in(r)]}")
    if value in r.not_in:
        raise ConfigError(path, f"value must not be in list {[_num(v) for v in r.not_in]}")
    _check_range(value, r, path, _num)


def _check_range(value: Any, r: Any, path: str, show: Callable[[Any], str],
                 conv: Callable[[Any], Any] = lambda v: v) -> None:
    lower = ("gt", conv(r.gt)) if r.HasField("gt") else ("gte", conv(r.gte)) if r.HasField("gte") else None
    upper = ("lt", conv(r.lt)) if r.HasField("lt") else ("lte", conv(r.lte)) if r.HasField("lte") else None
    raw = {k: getattr(r, k) for k in ("gt", "gte", "lt", "lte") if r.HasField(k)}

    def above(bound: tuple[str, Any]) -> bool:
        return value > bound[1] if bound[0] == "gt" else value >= bound[1]

    def below(bound: tuple[str, Any]) -> bool:
        return value < bound[1] if bound[0] == "lt" else value <= bound[1]

    if lower and upper:
        lo_k, hi_k = lower[0], upper[0]
        lo_s, hi_s = show(raw[lo_k]), show(raw[hi_k])
        lb = "(" if lo_k == "gt" else "["
        ub = ")" if hi_k == "lt" else "]"
        if upper[1] >= lower[1]:
            if not (above(lower) and below(upper)):
                raise ConfigError(path, f"value must be inside range {lb}{lo_s}, {hi_s}{ub}")
        elif not (above(lower) or below(upper)):
            raise ConfigError(path, f"value must be outside range {ub}{hi_s}, {lo_s}{lb}")
        return
    if lower and not above(lower):
        word = "greater than" if lower[0] == "gt" else "greater than or equal to"
        raise ConfigError(path, f"value must be {word} {show(raw[lower[0]])}")
    if upper and not below(upper):
        word = "less than" if upper[0] == "lt" else "less than or equal to"
        raise ConfigError(path, f"value must be {word} {show(raw[upper[0]])}")


def _num(v: float) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _check_string(value: str, r: Any, path: str) -> None:
    if r.ignore_empty and value == "":
        return
    if r.HasField("const") and value != r.const:
        raise ConfigError(path, f"value must equal {r.const!r}")
    n = len(value)
    if r.HasField("len") and n != r.len:
        raise ConfigError(path, f"value length must be {r.len} characters")
    if r.HasField("min_len") and n < r.min_len:
        raise ConfigError(path, f"value length must be at least {r.min_len} characters")
    if r.HasField("max_len") and n > r.max_len:
        raise ConfigError(path, f"value length must be at most {r.max_len} characters")
    nb = len(value.encode("utf-8"))
    if r.HasField("len_bytes") and nb != r.len_bytes:
        raise ConfigError(path, f"value length must be {r.len_bytes} bytes")
    if r.HasField("min_bytes") and nb < r.min_bytes:
        raise ConfigError(path, f"value length must be at least {r.min_bytes} bytes")
    if r.HasField("max_bytes") and nb > r.max_bytes:
        raise ConfigError(path, f"value length must be at most {r.max_bytes} bytes")
    if r.HasField("prefix") and not value.startswith(r.prefix):
        raise ConfigError(path, f"value does not have prefix {r.prefix!r}")
    if r.HasField("suffix") and not value.endswith(r.suffix):
        raise ConfigError(path, f"value does not have suffix {r.suffix!r}")
    if r.HasField("contains") and r.contains not in value:
        raise ConfigError(path, f"value does not contain substring {r.contains!r}")
    if r.HasField("not_contains") and r.not_contains in value:
        raise ConfigError(path, f"value contains substring {r.not_contains!r}")
    if _in(r) and value not in _in(r):
        raise ConfigError(path, f"value must be in list {list(_in(r))}")
    if value in r.not_in:
        raise ConfigError(path, f"value must not be in list {list(r.not_in)}")
    well_known = r.WhichOneof("well_known")
    if well_known == "well_known_regex":
        _check_header_regex(value, r.well_known_regex, r.strict, path)
    elif well_known in ("ip", "ipv4", "ipv6") and getattr(r, well_known):
        _check_ip(value, well_known, path)


def _check_header_regex(value: str, which: int, strict: bool, path: str) -> None:
    if which == validate_pb2.HTTP_HEADER_NAME:
        pattern, what = (_HEADER_NAME if strict else _HEADER_LOOSE), "a valid HTTP header name"
    elif which == validate_pb2.HTTP_HEADER_VALUE:
        pattern, what = (_HEADER_VALUE if strict else _HEADER_LOOSE), "a valid HTTP header value"
    else:
        return
    if not pattern.match(value):
        raise ConfigError(path, f"value must be {what}, not {value!r}")


def _check_ip(value: str, which: str, path: str) -> None:
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        addr = None
    ok = addr is not None and (
        which == "ip" or (which == "ipv4") == isinstance(addr, ipaddress.IPv4Address)
    )
    if not ok:
        want = {"ip": "an IP", "ipv4": "an IPv4", "ipv6": "an IPv6"}[which]
        raise ConfigError(path, f"value must be {want} address, not {value!r}")


def _check_bytes(value: bytes, r: Any, path: str) -> None:
    if r.ignore_empty and value == b"":
        return
    if r.HasField("const") and value != r.const:
        raise ConfigError(path, f"value must equal {r.const!r}")
    n = len(value)
    if r.HasField("len") and n != r.len:
        raise ConfigError(path, f"value length must be {r.len} bytes")
    if r.HasField("min_len") and n < r.min_len:
        raise ConfigError(path, f"value length must be at least {r.min_len} bytes")
    if r.HasField("max_len") and n > r.max_len:
        raise ConfigError(path, f"value length must be at most {r.max_len} bytes")


def _check_enum(value: int, r: Any, path: str, field: FieldDescriptor | None) -> None:
    if r.HasField("const") and value != r.const:
        raise ConfigError(path, f"value must equal {r.const}")
    if r.defined_only and field is not None and value not in field.enum_type.values_by_number:
        raise ConfigError(path, f"value must be one of the defined enum values, not {value}")
    if _in(r) and value not in _in(r):
        raise ConfigError(path, f"value must be in list {list(_in(r))}")
    if value in r.not_in:
        raise ConfigError(path, f"value must not be in list {list(r.not_in)}")


# ----------------------------------------------------------------------------- messages
def _nanos(d: Any) -> int:
    return d.seconds * 1_000_000_000 + d.nanos


def _show_duration(d: Any) -> str:
    n = _nanos(d)
    if n % 1_000_000_000 == 0:
        return f"{n // 1_000_000_000}s"
    return f"{n / 1e9:g}s"


def _check_duration(value: Any, r: Any, path: str) -> None:
    n = _nanos(value)
    if r.HasField("const") and n != _nanos(r.const):
        raise ConfigError(path, f"value must equal {_show_duration(r.const)}")
    if _in(r) and n not in {_nanos(d) for d in _in(r)}:
        raise ConfigError(path, f"value must be in list {[_show_duration(d) for d in _in(r)]}")
    if n in {_nanos(d) for d in r.not_in}:
        raise ConfigError(path, f"value must not be in list {[_show_duration(d) for d in r.not_in]}")

    _check_range(n, r, path, _show_duration, _nanos)


def _check_any(value: Any, r: Any, path: str) -> None:
    if _in(r) and value.type_url not in _in(r):
        raise ConfigError(path, f"type URL must be in list {list(_in(r))}")
    if value.type_url in r.not_in:
        raise ConfigError(path, f"type URL must not be in list {list(r.not_in)}")
