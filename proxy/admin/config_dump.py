"""The ``/config_dump`` admin response: Envoy's ``envoy.admin.v3.ConfigDump``, built sans-IO.

Theory of operation:

1. ``build_config_dump`` turns the loaded bootstrap into one ``*ConfigDump`` per component, in
   the order Envoy prints them. Envoy keys its config tracker by component name in a
   ``std::map``, so the order is alphabetical by key: ``bootstrap``, ``clusters``,
   ``listeners``, ``route_scopes``, ``routes``, ``secrets``. The two route dumps exist only
   when an ``http_connection_manager`` is configured (in Envoy the HCM factory creates the
   route config provider managers that register them); the secrets dump always exists.
2. Every field annotated ``[(udpa.annotations.sensitive) = true]`` is redacted first
   (``redact``, Envoy's ``MessageUtil::redact``): sensitivity is inherited by everything below
   the field; strings and bytes become ``"[redacted]"``, other scalars are cleared; of a map
   only the values are redacted; an ``Any`` (or a ``TypedStruct``) whose type is known is
   unpacked, redacted and repacked, one whose type is unknown is walked as a plain message.
3. ``apply_query`` implements the query parameters on a built dump, with Envoy's semantics
   (``source/server/admin/config_dump_handler.cc``):

   - ``name_regex``: a regex that must match a resource's whole name (RE2 ``FullMatch``);
     resources of every dump are filtered, the bootstrap is not. Empty means unset.
   - ``resource``: the first dump (in order) with a field of that name wins. A repeated field
     gives ``{"configs": [each entry packed as an Any]}``; a singular one is refused (use
     ``mask``); no dump with it: 404.
   - ``mask`` alone: FieldMask paths (comma-separated) trimmed on each whole dump. A dump the
     mask does not fit is left out; if it fits none, the request is refused.
   - ``resource`` and ``mask``: the mask is trimmed on each entry, and a path through the
     entry's ``Any`` field (``cluster.name``) reaches into the resource it holds.

   A path may not go through a repeated field or past a scalar (``FieldMaskUtil``'s rule).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from envoy.admin.v3.config_dump_pb2 import BootstrapConfigDump, ConfigDump, SecretsConfigDump
from envoy.admin.v3.config_dump_shared_pb2 import (
    ClustersConfigDump,
    ListenersConfigDump,
    RoutesConfigDump,
    ScopedRoutesConfigDump,
)
from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from envoy.config.listener.v3.listener_components_pb2 import Filter
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, json_format, struct_pb2, text_format, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import DecodeError, Message
from udpa.annotations import sensitive_pb2

from proxy.config.bootstrap import message_class
from proxy.config.errors import ConfigError

HttpConnectionManager = hcm_pb2.HttpConnectionManager

__all__ = [
    "REDACTED",
    "ConfigDumpQueryError",
    "apply_query",
    "build_config_dump",
    "redact",
]

REDACTED = "[redacted]"
_TYPED_STRUCTS = frozenset({"xds.type.v3.TypedStruct", "udpa.type.v1.TypedStruct"})


class ConfigDumpQueryError(ValueError):
    """A query parameter ``/config_dump`` cannot honour; ``status`` is Envoy's HTTP code."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- building
def build_config_dump(bootstrap: Bootstrap, *, loaded_at: float) -> ConfigDump:
    """The redacted ConfigDump of a static bootstrap loaded at ``loaded_at`` (epoch seconds)."""
    source = Bootstrap()
    source.CopyFrom(bootstrap)
    redact(source)
    updated = _timestamp(loaded_at)
    resources = source.static_resources

    dumps: list[Message] = [BootstrapConfigDump(bootstrap=source, last_updated=updated)]

    clusters = ClustersConfigDump()
    for cluster in resources.clusters:
        clusters.static_clusters.add(last_updated=updated).cluster.Pack(cluster)
    dumps.append(clusters)

    listeners = ListenersConfigDump()
    for listener in resources.listeners:
        listeners.static_listeners.add(last_updated=updated).listener.Pack(listener)
    dumps.append(listeners)

    hcms = list(_http_connection_managers(source))
    if hcms:
        # Inline scoped routes are not configurable in trioxy; Envoy prints the dump empty.
        dumps.append(ScopedRoutesConfigDump())
        routes = RoutesConfigDump()
        for hcm in hcms:
            if hcm.HasField("route_config"):
                entry = routes.static_route_configs.add(last_updated=updated)
                entry.route_config.Pack(hcm.route_config)
        dumps.append(routes)

    secrets = SecretsConfigDump()
    for secret in resources.secrets:
        entry = secrets.static_secrets.add(name=secret.name, last_updated=updated)
        entry.secret.Pack(secret)
    dumps.append(secrets)

    dump = ConfigDump()
    for d in dumps:
        dump.configs.add().Pack(d)
    return dump


def _timestamp(epoch_s: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    # Envoy's TimestampUtil::systemClockToTimestamp keeps milliseconds, truncated.
    ts.FromMilliseconds(math.floor(epoch_s * 1000))
    return ts


def _http_connection_managers(bootstrap: Bootstrap) -> Iterator[HttpConnectionManager]:
    for listener in bootstrap.static_resources.listeners:
        chains = list(listener.filter_chains)
        if listener.HasField("default_filter_chain"):
            chains.append(listener.default_filter_chain)
        for chain in chains:
            for f in chain.filters:
                hcm = _as_hcm(f)
                if hcm is not None:
                    yield hcm


def _as_hcm(f: Filter) -> HttpConnectionManager | None:
    # The @type, not the filter's name, picks the factory in v3.
    if not f.HasField("typed_config") or not f.typed_config.Is(HttpConnectionManager.DESCRIPTOR):
        return None
    hcm = HttpConnectionManager()
    f.typed_config.Unpack(hcm)
    return hcm


# ----------------------------------------------------------------------------- redaction
def redact(message: Message, ancestor_is_sensitive: bool = False) -> None:
    """Redact, in place, every field marked ``udpa.annotations.sensitive`` and all below it."""
    full_name = message.DESCRIPTOR.full_name
    if full_name == "google.protobuf.Any" and _redact_any(message, ancestor_is_sensitive):
        return
    if full_name in _TYPED_STRUCTS and _redact_typed_struct(message, ancestor_is_sensitive):
        return
    for field, value in message.ListFields():
        sensitive = ancestor_is_sensitive or _is_sensitive(field)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if _is_map(field):
                _redact_map(value, field.message_type.fields_by_name["value"], sensitive)
            elif field.is_repeated:
                for item in value:
                    redact(item, sensitive)
            else:
                redact(value, sensitive)
        elif sensitive:
            if field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
                placeholder = _placeholder(field)
                if field.is_repeated:
                    for i in range(len(value)):
                        value[i] = placeholder
                else:
                    setattr(message, field.name, placeholder)
            else:
                message.ClearField(field.name)


def _redact_map(container: Any, value_field: FieldDescriptor, sensitive: bool) -> None:
    # Values only: redacting keys would collapse the map onto one "[redacted]" key.
    if value_field.type == FieldDescriptor.TYPE_MESSAGE:
        for key in container:
            redact(container[key], sensitive)
    elif sensitive:
        if value_field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
            replacement = _placeholder(value_field)
        else:
            replacement = value_field.default_value
        for key in list(container):
            container[key] = replacement


def _redact_any(any_msg: Any, ancestor_is_sensitive: bool) -> bool:
    """True when handled; False: walk it as a plain message (Envoy's redactOpaque)."""
    if not any_msg.type_url and not any_msg.value:
        return True
    if not any_msg.type_url or not any_msg.value:
        return False
    typed = _new_message(any_msg.type_url)
    if typed is None:
        return False
    try:
        typed.ParseFromString(any_msg.value)
    except DecodeError:
        return False
    redact(typed, ancestor_is_sensitive)
    any_msg.value = typed.SerializeToString()
    return True


def _redact_typed_struct(typed_struct: Any, ancestor_is_sensitive: bool) -> bool:
    if not typed_struct.type_url and not typed_struct.HasField("value"):
        return True
    if not typed_struct.type_url or not typed_struct.HasField("value"):
        return False
    typed = _new_message(typed_struct.type_url)
    if typed is None:
        return False
    try:
        json_format.ParseDict(
            json_format.MessageToDict(typed_struct.value), typed, ignore_unknown_fields=True
        )
    except json_format.ParseError:
        return False
    redact(typed, ancestor_is_sensitive)
    value = struct_pb2.Struct()
    value.update(json_format.MessageToDict(typed, preserving_proto_field_name=True))
    typed_struct.value.CopyFrom(value)
    return True


def _new_message(type_url: str) -> Message | None:
    try:
        return message_class(type_url.rsplit("/", 1)[-1], "")()
    except ConfigError:
        return None


_SENSITIVE: dict[str, bool] = {}


def _is_sensitive(field: FieldDescriptor) -> bool:
    hit = _SENSITIVE.get(field.full_name)
    if hit is None:
        hit = _SENSITIVE[field.full_name] = bool(
            field.GetOptions().Extensions[sensitive_pb2.sensitive]
        )
    return hit


def _placeholder(field: FieldDescriptor) -> str | bytes:
    return REDACTED.encode() if field.type == FieldDescriptor.TYPE_BYTES else REDACTED


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.is_repeated
        and field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type.GetOptions().map_entry
    )


# ----------------------------------------------------------------------------- queries
def apply_query(
    dump: ConfigDump, *, resource: str | None, mask: str | None, name_regex: str | None
) -> dict[str, Any]:
    """The JSON-ready dict of ``dump`` after ``?resource=``, ``?mask=`` and ``?name_regex=``."""
    matches = _name_matcher(name_regex)
    field_mask = _field_mask(mask) if mask is not None else None
    dumps = [_filter_names(_unpack(config), matches) for config in dump.configs]

    out = ConfigDump()
    if resource is not None:
        for entry in _resource_entries(dumps, resource):
            if field_mask is not None and not _trim_resource(field_mask, entry):
                raise ConfigDumpQueryError(
                    f"FieldMask {_mask_text(field_mask)} could not be successfully used."
                )
            out.configs.add().Pack(entry)
    else:
        for d in dumps:
            if field_mask is not None and not _check_and_trim(field_mask, d):
                # Each dump type fits different paths: the mask picks the dumps it fits.
                continue
            out.configs.add().Pack(d)
        if field_mask is not None and not out.configs:
            raise ConfigDumpQueryError(
                f"FieldMask {mask} could not be successfully applied to any configs."
            )
    return json_format.MessageToDict(out, preserving_proto_field_name=True)


def _unpack(config: any_pb2.Any) -> Message:
    msg = message_class(config.type_url.rsplit("/", 1)[-1], "configs")()
    config.Unpack(msg)
    return msg


def _name_matcher(name_regex: str | None) -> Callable[[str], bool]:
    if not name_regex:
        return lambda _name: True
    try:
        pattern = re.compile(name_regex)
    except re.error as exc:
        raise ConfigDumpQueryError(
            f"Error while parsing name_regex from {name_regex}: {exc}"
        ) from None
    return lambda name: pattern.fullmatch(name) is not None


def _filter_names(d: Message, matches: Callable[[str], bool]) -> Message:
    """``d`` without the resources whose name ``matches`` refuses."""
    for field, value in d.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE or not field.is_repeated:
            continue
        for i in reversed(range(len(value))):
            if not _keep(value[i], matches):
                del value[i]
    return d


def _keep(entry: Message, matches: Callable[[str], bool]) -> bool:
    name = _resource_name(entry)
    return name is None or matches(name)


def _resource_name(entry: Message) -> str | None:
    """The name Envoy matches ``name_regex`` against, or None when the entry has none.

    An entry names itself (``DynamicListener.name``, ``StaticSecret.name``) or holds its
    resource in an Any: ``Listener.name``, ``Cluster.name``, ``RouteConfiguration.name``,
    ``ClusterLoadAssignment.cluster_name``, ``TypedExtensionConfig.name``.
    """
    fields = entry.DESCRIPTOR.fields_by_name
    own = fields.get("name")
    if own is not None and own.type == FieldDescriptor.TYPE_STRING:
        return str(getattr(entry, own.name))
    for field in entry.DESCRIPTOR.fields:
        if _is_any(field) and entry.HasField(field.name):
            inner = _new_message(getattr(entry, field.name).type_url)
            if inner is None:
                return None
            getattr(entry, field.name).Unpack(inner)
            for key in ("name", "cluster_name"):
                if key in inner.DESCRIPTOR.fields_by_name:
                    return str(getattr(inner, key))
            return None
    return None


def _resource_entries(dumps: Sequence[Message], resource: str) -> list[Message]:
    for d in dumps:
        field = d.DESCRIPTOR.fields_by_name.get(resource)
        if field is None:
            continue
        if not field.is_repeated or field.type != FieldDescriptor.TYPE_MESSAGE:
            raise ConfigDumpQueryError(
                f"{resource} is not a repeated field. Use ?mask={resource} to get only this field"
            )
        return [_copy(entry) for entry in getattr(d, resource)]
    raise ConfigDumpQueryError(f"{resource} not found in config dump", status=404)


def _copy(msg: Message) -> Message:
    out = type(msg)()
    out.CopyFrom(msg)
    return out


# ----------------------------------------------------------------------------- field masks
def _field_mask(mask: str) -> FieldMask:
    # FieldMaskUtil::FromString: comma-separated, empty pieces skipped, names as in the proto.
    return FieldMask(paths=[p for p in mask.split(",") if p])


def _mask_text(field_mask: FieldMask) -> str:
    return text_format.MessageToString(field_mask, as_one_line=True)


def _check_and_trim(field_mask: FieldMask, message: Message) -> bool:
    if not all(_valid_path(message.DESCRIPTOR, path) for path in field_mask.paths):
        return False
    _trim(_mask_tree(field_mask.paths), message)
    return True


def _trim_resource(field_mask: FieldMask, entry: Message) -> bool:
    """Trim one resource entry, reaching through its single Any field (``cluster.name``)."""
    outer, inner = FieldMask(), FieldMask()
    any_field: FieldDescriptor | None = None
    for path in field_mask.paths:
        head, _, rest = path.partition(".")
        field = entry.DESCRIPTOR.fields_by_name.get(head)
        if field is not None and _is_any(field) and not field.is_repeated:
            any_field = field
            outer.paths.append(head)
            inner.paths.append(rest)
        else:
            outer.paths.append(path)
    if any_field is not None and entry.HasField(any_field.name):
        packed = getattr(entry, any_field.name)
        inner_msg = _new_message(packed.type_url)
        if inner_msg is None or not packed.Unpack(inner_msg):
            return False
        if not _check_and_trim(inner, inner_msg):
            return False
        packed.Pack(inner_msg)
    return _check_and_trim(outer, entry)


def _valid_path(descriptor: Any, path: str) -> bool:
    """FieldMaskUtil::GetFieldDescriptors: descend only through singular message fields."""
    for name in (p for p in path.split(".") if p):
        if descriptor is None:
            return False
        field = descriptor.fields_by_name.get(name)
        if field is None:
            return False
        singular_message = field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated
        descriptor = field.message_type if singular_message else None
    return True


_Tree = dict[str, "_Tree"]


def _mask_tree(paths: Sequence[str]) -> _Tree:
    """FieldMaskTree: an empty node keeps the whole field; a shorter path covers a longer one."""
    root: _Tree = {}
    for path in paths:
        parts = [p for p in path.split(".") if p]
        if not parts:
            continue
        node = root
        for i, part in enumerate(parts):
            if part in node and not node[part]:
                break  # already covered by a shorter path
            if i == len(parts) - 1:
                node[part] = {}
            else:
                node = node.setdefault(part, {})
    return root


def _trim(tree: _Tree, message: Message) -> None:
    """FieldMaskTree::TrimMessage: clear what the tree does not name; an empty tree trims nothing."""
    if not tree:
        return
    for field, value in message.ListFields():
        child = tree.get(field.name)
        if child is None:
            message.ClearField(field.name)
        elif child and field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated:
            _trim(child, value)


def _is_any(field: FieldDescriptor) -> bool:
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type.full_name == "google.protobuf.Any"
    )
