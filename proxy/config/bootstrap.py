"""Loading an Envoy v3 bootstrap into the real ``envoy.config.bootstrap.v3.Bootstrap`` message.

Theory of operation:

1. The file is read as YAML (``.yaml``, ``.yml``, anything unknown) or JSON (``.json``); the
   binary and text proto formats Envoy also reads (``.pb``, ``.pb_text``) are refused.
2. ``json_format`` resolves a ``typed_config`` only when the ``_pb2`` module that defines its
   ``@type`` was imported first. So before parsing, every ``"@type"`` URL in the tree is mapped
   to its module (package ``a.b.v3`` lives in directory ``a/b/v3``; the module that defines the
   message is found among that directory's ``*_pb2.py`` files, best guess first) and imported.
   Only the handful of modules a config names are imported, never all 600 of them.
3. ``--config-yaml`` is parsed into its own Bootstrap and merged over the file's with
   ``MergeFrom``, as Envoy does: scalars override, repeated fields append.
4. ``validate_bootstrap`` then refuses every set field trioxy does not implement
   (``supported.check``) and enforces Envoy's protoc-gen-validate annotations (``pgv.validate``),
   which json_format ignores.

Every error is a ``ConfigError`` naming the field path (``static_resources.listeners[0]...``).
"""

from __future__ import annotations

import datetime
import difflib
import importlib
import importlib.resources
import importlib.util
import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from google.protobuf import any_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from proxy.config.errors import ConfigError

TYPE_URL_PREFIX = "type.googleapis.com/"

__all__ = [
    "Bootstrap",
    "bootstrap_from_bytes",
    "default_bootstrap_path",
    "load_bootstrap",
    "message_class",
    "parse_bootstrap_dict",
    "unpack_any",
    "validate_bootstrap",
]


# ----------------------------------------------------------------------------- public API
def default_bootstrap_path() -> Path:
    """The embedded default config (``proxy/config/default_bootstrap.yaml``)."""
    return Path(str(importlib.resources.files("proxy.config") / "default_bootstrap.yaml"))


def load_bootstrap(config_path: str | None, config_yaml: str | None) -> Bootstrap:
    """Read, merge and validate a bootstrap, as Envoy's ``-c`` and ``--config-yaml`` do."""
    if config_path is None and config_yaml is None:
        raise ConfigError("", "no configuration: give -c/--config-path or --config-yaml")
    bootstrap = Bootstrap()
    if config_path is not None:
        bootstrap = parse_bootstrap_dict(_read_config_file(config_path))
    if config_yaml is not None:
        overlay = parse_bootstrap_dict(_load_yaml(config_yaml, "--config-yaml"))
        bootstrap.MergeFrom(overlay)
    validate_bootstrap(bootstrap)
    return bootstrap


def parse_bootstrap_dict(data: dict[str, Any]) -> Bootstrap:
    """A Bootstrap from its YAML/JSON tree, with every ``@type`` module imported first."""
    for path, type_url in _find_type_urls(data, ""):
        _import_type(_type_name(type_url, path), path)
    bootstrap = Bootstrap()
    try:
        json_format.ParseDict(data, bootstrap, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise _parse_error(exc) from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # json_format lets a few malformed shapes escape unwrapped (e.g. a well-known type in
        # an Any without its "value" key).
        raise ConfigError("", f"cannot parse the configuration: {type(exc).__name__}: {exc}") from None
    return bootstrap


def validate_bootstrap(bootstrap: Bootstrap) -> None:
    """Refuse unsupported fields, then enforce Envoy's validation annotations."""
    from proxy.config import pgv, supported

    # Unsupported first: "X is not supported" is the more useful message when both apply.
    supported.check(bootstrap, "")
    pgv.validate(bootstrap, "")


def bootstrap_from_bytes(data: bytes) -> Bootstrap:
    """The bootstrap the main process serialized for a worker, with its Any types importable."""
    try:
        bootstrap = Bootstrap.FromString(data)
    except DecodeError as exc:
        raise ConfigError("", f"cannot decode the serialized bootstrap: {exc}") from None
    for path, any_msg in _walk_anys(bootstrap, ""):
        _import_type(_type_name(any_msg.type_url, path), path)
    return bootstrap


def unpack_any(any_msg: any_pb2.Any, path: str) -> Message:
    """The message inside ``any_msg``, importing the module that defines its type if needed."""
    if not any_msg.type_url:
        raise ConfigError(path, "typed_config needs an \"@type\"")
    cls = message_class(_type_name(any_msg.type_url, path), path)
    msg = cls()
    try:
        ok = any_msg.Unpack(msg)
    except DecodeError as exc:
        raise ConfigError(path, f"cannot decode {any_msg.type_url}: {exc}") from None
    if not ok:  # pragma: no cover - the type name was resolved from the URL itself
        raise ConfigError(path, f"cannot unpack {any_msg.type_url}")
    return msg


def message_class(full_name: str, path: str) -> type[Message]:
    """The generated class for a message full name, importing its ``_pb2`` module if needed."""
    return message_factory.GetMessageClass(_import_type(full_name, path))


# ----------------------------------------------------------------------------- reading
def _read_config_file(config_path: str) -> dict[str, Any]:
    suffix = Path(config_path).suffix.lower()
    if suffix in (".pb", ".pb_text"):
        raise ConfigError(
            "", f"{config_path}: binary and text proto bootstraps ({suffix}) are not supported;"
            " use YAML (.yaml, .yml) or JSON (.json)"
        )
    with open(config_path, encoding="utf-8") as f:
        text = f.read()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError("", f"{config_path}: invalid JSON: {exc}") from None
        return _as_root(data, config_path)
    return _load_yaml(text, config_path)


def _load_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{source}: invalid YAML: {exc}") from None
    return _as_root(_normalize_yaml(data), source)


def _as_root(data: Any, source: str) -> dict[str, Any]:
    if data is None:
        raise ConfigError("", f"{source}: the configuration is empty")
    if not isinstance(data, dict):
        raise ConfigError("", f"{source}: the configuration must be a mapping, not {type(data).__name__}")
    return data


def _normalize_yaml(node: Any) -> Any:
    """Undo YAML 1.1 typing that JSON has no words for: non-string keys, dates."""
    if isinstance(node, dict):
        return {(k if isinstance(k, str) else _scalar_text(k)): _normalize_yaml(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_normalize_yaml(v) for v in node]
    if isinstance(node, datetime.date):
        return node.isoformat()
    return node


def _scalar_text(key: Any) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    return str(key)


# ----------------------------------------------------------------------------- errors
_AT_PATH = re.compile(r' at "?Bootstrap\.?([^"\s]*?)"?\.*$')
_NO_FIELD = re.compile(r'Message type "([\w.]+)" has no field named "([^"]+)"')
_FAILED_FIELD = re.compile(r"Failed to parse (\w+) field: ")


def _parse_error(exc: json_format.ParseError) -> ConfigError:
    text = str(exc).split("\n", 1)[0]
    m = _AT_PATH.search(text)
    if m:
        path, text = m.group(1), text[: m.start()]
    else:
        # No position given: fall back to the chain of field names (without list indices).
        path = ".".join(_FAILED_FIELD.findall(text))
    detail = _FAILED_FIELD.sub("", text).strip().rstrip(".")
    nf = _NO_FIELD.search(detail)
    if nf:
        type_name, field = nf.groups()
        path = f"{path}.{field}" if path else field
        detail = f"unknown field {field!r} in {type_name}"
        hint = _suggest(type_name, field)
        if hint:
            detail += f" (did you mean {hint!r}?)"
    return ConfigError(path, detail)


def _suggest(type_name: str, field: str) -> str | None:
    try:
        desc = descriptor_pool.Default().FindMessageTypeByName(type_name)
    except KeyError:
        return None
    names = [f.name for f in desc.fields]
    close = difflib.get_close_matches(field, names, n=1, cutoff=0.75)
    return close[0] if close else None


# ----------------------------------------------------------------------------- type URLs
def _find_type_urls(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """(path, type_url) of every ``"@type"`` in a YAML/JSON tree, outermost first."""
    if isinstance(node, dict):
        type_url = node.get("@type")
        if type_url is not None:
            if not isinstance(type_url, str):
                raise ConfigError(path, f"\"@type\" must be a string, not {type_url!r}")
            yield path, type_url
        for key, value in node.items():
            if isinstance(value, dict | list):
                yield from _find_type_urls(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _find_type_urls(value, f"{path}[{i}]")


def _type_name(type_url: str, path: str) -> str:
    if "/" not in type_url:
        raise ConfigError(path, f"invalid type URL {type_url!r} (want type.googleapis.com/<type>)")
    name = type_url.rsplit("/", 1)[1]
    if not name:
        raise ConfigError(path, f"invalid type URL {type_url!r} (want type.googleapis.com/<type>)")
    return name


def _import_type(full_name: str, path: str) -> Descriptor:
    """The descriptor of ``full_name``, importing the ``_pb2`` module that defines it."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindMessageTypeByName(full_name)
    except KeyError:
        pass
    for module in _candidate_modules(full_name):
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        try:
            return pool.FindMessageTypeByName(full_name)
        except KeyError:
            continue
    raise ConfigError(path, f"unknown type {TYPE_URL_PREFIX}{full_name}: no such Envoy message")


def _candidate_modules(full_name: str) -> Iterator[str]:
    """Modules that may define ``full_name``, the likeliest first.

    ``a.b.v3.Outer.Inner`` lives in package ``a.b.v3``: try the longest prefix that is a
    package, the module named after the message in snake_case first.
    """
    parts = full_name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        package = ".".join(parts[:cut])
        modules = _package_modules(package)
        if not modules:
            continue
        guess = f"{package}.{_snake(parts[cut])}_pb2"
        if guess in modules:
            yield guess
        yield from (m for m in modules if m != guess)
        return


@cache
def _package_modules(package: str) -> tuple[str, ...]:
    """The ``*_pb2`` modules of one package directory (listed once, imported lazily)."""
    if not re.fullmatch(r"[A-Za-z_][\w.]*", package):
        return ()
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return ()
    if spec is None or not spec.submodule_search_locations:
        return ()
    names: set[str] = set()
    for location in spec.submodule_search_locations:
        directory = Path(location)
        if directory.is_dir():
            names.update(p.stem for p in directory.glob("*_pb2.py"))
    return tuple(f"{package}.{n}" for n in sorted(names))


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def _walk_anys(msg: Message, path: str) -> Iterator[tuple[str, any_pb2.Any]]:
    """(path, Any) of every Any set in ``msg``, descending into the unpacked ones too."""
    if msg.DESCRIPTOR.full_name == "google.protobuf.Any":
        yield path, msg  # type: ignore[misc]
        if msg.type_url:  # type: ignore[attr-defined]
            yield from _walk_anys(unpack_any(msg, path), path)  # type: ignore[arg-type]
        return
    for field, value in msg.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        fpath = f"{path}.{field.name}" if path else field.name
        if _is_map(field):
            if field.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                for key in value:
                    yield from _walk_anys(value[key], f"{fpath}[\"{key}\"]")
        elif field.is_repeated:
            for i, item in enumerate(value):
                yield from _walk_anys(item, f"{fpath}[{i}]")
        else:
            yield from _walk_anys(value, fpath)


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.is_repeated
        and field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type.GetOptions().map_entry
    )
