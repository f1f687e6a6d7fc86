"""What trioxy implements of Envoy's config, as an allowlist; any other set field is refused.

Silently ignoring a config field is a security hole (a ``require_tls`` or an RBAC filter that
does nothing), so every SET field of the bootstrap, the unpacked ``typed_config`` messages
included, must be named here. ``check`` walks ``ListFields()`` (so oneofs, repeated fields and
maps are covered) and raises ``ConfigError(path, "<field> is not supported")`` otherwise.

Theory of operation:

1. ``SUPPORTED`` maps a message full name to the field names trioxy reads from it. A message
   type absent from the table supports no field at all; an ``Any`` whose type is absent is
   refused outright, even when empty.
2. ``SUBSETS`` narrows a message type where one use of it supports less than another:
   ``(parent type, field name) -> field names``, e.g. the upstream HTTP protocol options allow
   only ``idle_timeout``, ``max_requests_per_connection`` and
   ``max_connection_duration`` of ``HttpProtocolOptions``.
3. ``MAP_KEYS`` restricts the keys of a map field.
4. ``WELL_KNOWN`` types (Duration, wrappers, Struct...) are leaves accepted whole.

Whether a supported field's *value* is supported (``codec_type: HTTP3``, ``type: EDS``) is the
business of the module that compiles it; this table only answers "is the field read at all".
When unsure whether a field is implemented, leave it out: refused loudly is safe.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from proxy.config.errors import ConfigError

__all__ = ["MAP_KEYS", "SUBSETS", "SUPPORTED", "WELL_KNOWN", "check"]


def _f(*names: str) -> frozenset[str]:
    return frozenset(names)


_HEADERS_ADD_REMOVE = (
    "request_headers_to_add", "request_headers_to_remove",
    "response_headers_to_add", "response_headers_to_remove",
)

SUPPORTED: Mapping[str, frozenset[str]] = {
    # ---- bootstrap ---------------------------------------------------------------------
    "envoy.config.bootstrap.v3.Bootstrap": _f(
        "node", "static_resources", "layered_runtime", "admin"),
    "envoy.config.bootstrap.v3.Bootstrap.StaticResources": _f("listeners", "clusters"),
    # Admin is served by a later issue; real configs carry it, so its address and log parse.
    "envoy.config.bootstrap.v3.Admin": _f("address", "access_log", "access_log_path"),
    "envoy.config.bootstrap.v3.LayeredRuntime": _f("layers"),
    # Static layers only: rtds_layer, disk_layer and admin_layer are refused.
    "envoy.config.bootstrap.v3.RuntimeLayer": _f("name", "static_layer"),
    "envoy.config.core.v3.Node": _f("id", "cluster", "metadata", "locality"),
    "envoy.config.core.v3.Locality": _f("region", "zone", "sub_zone"),
    "envoy.config.core.v3.Metadata": _f("filter_metadata"),

    # ---- addresses ---------------------------------------------------------------------
    "envoy.config.core.v3.Address": _f("socket_address"),
    "envoy.config.core.v3.SocketAddress": _f("address", "port_value", "protocol", "ipv4_compat"),
    "envoy.config.core.v3.CidrRange": _f("address_prefix", "prefix_len"),

    # ---- listeners ---------------------------------------------------------------------
    "envoy.config.listener.v3.Listener": _f(
        "name", "address", "filter_chains", "default_filter_chain",
        "per_connection_buffer_limit_bytes", "stat_prefix",
        "traffic_direction",  # admin /drain_listeners?inboundonly
        # proxy/listener/listener_filter.py, active_tcp_socket.py
        "listener_filters", "listener_filters_timeout", "continue_on_listener_filters_timeout",
        "use_original_dst", "bind_to_port",
    ),
    "envoy.config.listener.v3.FilterChain": _f(
        "filter_chain_match", "filters", "name",
        "transport_socket", "transport_socket_connect_timeout",  # proxy/tls/
    ),
    "envoy.config.listener.v3.FilterChainMatch": _f(
        "destination_port", "prefix_ranges", "direct_source_prefix_ranges", "source_type",
        "source_prefix_ranges", "source_ports", "server_names", "transport_protocol",
        "application_protocols",
    ),
    "envoy.config.listener.v3.Filter": _f("name", "typed_config"),
    "envoy.config.listener.v3.ListenerFilter": _f("name", "typed_config"),

    # ---- listener filters (proxy/extensions/filters/listener/) --------------------------
    # JA3/JA4 fingerprints are refused: nothing would read them.
    "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector": _f(
        "max_client_hello_size", "initial_read_buffer_size",
        "close_connection_on_client_hello_parsing_errors"),
    "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector": _f(),
    "envoy.extensions.filters.listener.original_dst.v3.OriginalDst": _f(),
    # rules (TLV -> dynamic metadata), pass_through_tlvs and tlv_location are refused: no
    # dynamic metadata and no upstream PROXY protocol to pass TLVs to.
    "envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol": _f(
        "allow_requests_without_proxy_protocol", "disallowed_versions", "stat_prefix"),

    # ---- network filter: envoy.filters.network.tcp_proxy --------------------------------
    "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy": _f(
        "stat_prefix", "cluster", "weighted_clusters", "idle_timeout", "access_log",
        "max_connect_attempts",
    ),
    "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster": _f("clusters"),
    "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster.ClusterWeight": _f(
        "name", "weight"),

    # ---- network filter: envoy.filters.network.http_connection_manager ------------------
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager": _f(
        "stat_prefix", "codec_type", "route_config", "http_filters", "access_log",
        "request_headers_timeout", "request_timeout", "stream_idle_timeout",
        "common_http_protocol_options", "max_request_headers_kb", "use_remote_address",
        "xff_num_trusted_hops", "generate_request_id", "server_name",
        "server_header_transformation", "drain_timeout", "delayed_close_timeout",
        "http_protocol_options", "skip_xff_append", "via", "preserve_external_request_id",
        "always_set_request_id_in_response",
        "http2_protocol_options",  # HTTP/2 (proxy/http/conn_manager_h2.py)
    ),
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter": _f(
        "name", "typed_config"),
    "envoy.config.core.v3.HttpProtocolOptions": _f(
        "idle_timeout", "max_headers_count", "max_connection_duration",
        "max_requests_per_connection",
    ),
    # HTTP/1 options: the message may be given (``{}``), none of its knobs are implemented.
    "envoy.config.core.v3.Http1ProtocolOptions": _f(),
    # HTTP/2 (downstream and upstream): the settings trioxy advertises and enforces.
    "envoy.config.core.v3.Http2ProtocolOptions": _f(
        "max_concurrent_streams", "initial_stream_window_size", "initial_connection_window_size",
        "hpack_table_size"),

    # ---- HTTP filter: envoy.filters.http.router -----------------------------------------
    "envoy.extensions.filters.http.router.v3.Router": _f("suppress_envoy_headers", "dynamic_stats"),

    # ---- HTTP filter: envoy.filters.http.grpc_stats -------------------------------------
    # emit_filter_state is read only to be refused by the factory with its own message.
    "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig": _f(
        "emit_filter_state", "individual_method_stats_allowlist", "stats_for_all_methods",
        "enable_upstream_stats", "replace_dots_in_grpc_service_name"),
    "envoy.config.core.v3.GrpcMethodList": _f("services"),
    "envoy.config.core.v3.GrpcMethodList.Service": _f("name", "method_names"),

    # ---- HTTP filter: envoy.filters.http.health_check -----------------------------------
    "envoy.extensions.filters.http.health_check.v3.HealthCheck": _f(
        "pass_through_mode", "headers", "cache_time", "cluster_min_healthy_percentages"),
    "envoy.type.v3.Percent": _f("value"),

    # ---- routes ------------------------------------------------------------------------
    "envoy.config.route.v3.RouteConfiguration": _f(
        "name", "virtual_hosts", "validate_clusters", *_HEADERS_ADD_REMOVE),
    "envoy.config.route.v3.VirtualHost": _f(
        "name", "domains", "routes", *_HEADERS_ADD_REMOVE,
        # resilience (issue #6): proxy/router/retry_state.py
        "retry_policy", "include_request_attempt_count", "include_attempt_count_in_response",
        "per_request_buffer_limit_bytes"),
    "envoy.config.route.v3.Route": _f(
        "name", "match", "route", "redirect", "direct_response", *_HEADERS_ADD_REMOVE,
        "per_request_buffer_limit_bytes"),
    "envoy.config.route.v3.RouteMatch": _f(
        "prefix", "path", "safe_regex", "path_separated_prefix", "case_sensitive", "headers",
        "query_parameters",
    ),
    "envoy.config.route.v3.HeaderMatcher": _f(
        "name", "exact_match", "safe_regex_match", "present_match", "prefix_match",
        "suffix_match", "contains_match", "string_match", "invert_match",
        "treat_missing_header_as_empty",
    ),
    "envoy.config.route.v3.QueryParameterMatcher": _f("name", "string_match", "present_match"),
    "envoy.config.route.v3.RouteAction": _f(
        "cluster", "weighted_clusters", "cluster_header", "prefix_rewrite", "regex_rewrite",
        "host_rewrite_literal", "auto_host_rewrite", "timeout", "hash_policy",
        "max_stream_duration",  # grpc-timeout only (router/config.py)
        "retry_policy", "priority",  # resilience (issue #6)
    ),
    # Refused: per_try_idle_timeout, retry_priority, retry_options_predicates,
    # rate_limited_retry_back_off; host predicates other than previous_hosts (retry_state.py).
    "envoy.config.route.v3.RetryPolicy": _f(
        "retry_on", "num_retries", "per_try_timeout", "retry_host_predicate",
        "host_selection_retry_max_attempts", "retriable_status_codes", "retry_back_off",
        "retriable_headers", "retriable_request_headers"),
    "envoy.config.route.v3.RetryPolicy.RetryBackOff": _f("base_interval", "max_interval"),
    "envoy.config.route.v3.RetryPolicy.RetryHostPredicate": _f("name", "typed_config"),
    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate": _f(),
    # max_stream_duration itself (a stream duration bound) is not implemented.
    "envoy.config.route.v3.RouteAction.MaxStreamDuration": _f(
        "grpc_timeout_header_max", "grpc_timeout_header_offset"),
    "envoy.config.route.v3.WeightedCluster": _f("clusters", "total_weight"),
    "envoy.config.route.v3.WeightedCluster.ClusterWeight": _f("name", "weight"),
    "envoy.config.route.v3.RouteAction.HashPolicy": _f(
        "header", "cookie", "connection_properties", "terminal"),
    "envoy.config.route.v3.RouteAction.HashPolicy.Header": _f("header_name"),
    "envoy.config.route.v3.RouteAction.HashPolicy.Cookie": _f("name", "ttl", "path"),
    "envoy.config.route.v3.RouteAction.HashPolicy.ConnectionProperties": _f("source_ip"),
    "envoy.config.route.v3.RedirectAction": _f(
        "https_redirect", "scheme_redirect", "host_redirect", "port_redirect", "path_redirect",
        "prefix_rewrite", "response_code", "strip_query",
    ),
    "envoy.config.route.v3.DirectResponseAction": _f("status", "body"),
    "envoy.config.core.v3.HeaderValueOption": _f(
        "header", "append", "append_action", "keep_empty_value"),
    "envoy.config.core.v3.HeaderValue": _f("key", "value"),
    "envoy.config.core.v3.DataSource": _f("inline_string", "inline_bytes", "filename"),

    # ---- matchers ----------------------------------------------------------------------
    "envoy.type.matcher.v3.StringMatcher": _f(
        "exact", "prefix", "suffix", "contains", "safe_regex", "ignore_case"),
    "envoy.type.matcher.v3.RegexMatcher": _f("google_re2", "regex"),
    "envoy.type.matcher.v3.RegexMatcher.GoogleRE2": _f(),  # max_program_size: not implemented
    "envoy.type.matcher.v3.RegexMatchAndSubstitute": _f("pattern", "substitution"),

    # ---- clusters ----------------------------------------------------------------------
    "envoy.config.cluster.v3.Cluster": _f(
        "name", "type", "connect_timeout", "lb_policy", "load_assignment",
        "per_connection_buffer_limit_bytes", "dns_refresh_rate", "dns_lookup_family",
        "ring_hash_lb_config", "maglev_lb_config", "least_request_lb_config",
        "typed_extension_protocol_options", "common_http_protocol_options",
        "cleanup_interval", "original_dst_lb_config",  # ORIGINAL_DST only
        "transport_socket",  # proxy/tls/ (transport_socket_matches is refused)
        "http2_protocol_options",  # deprecated, still common: an HTTP/2 upstream
        # resilience (issue #6): proxy/upstream/resource_manager.py, outlier_detection.py
        "circuit_breakers", "outlier_detection", "common_lb_config",
        "health_checks",  # proxy/upstream/health_checker.py (STATIC clusters, one checker)
    ),
    # Per-host thresholds and max_connection_pools are refused (resource_manager.py).
    "envoy.config.cluster.v3.CircuitBreakers": _f("thresholds", "per_host_thresholds"),
    "envoy.config.cluster.v3.CircuitBreakers.Thresholds": _f(
        "priority", "max_connections", "max_pending_requests", "max_requests", "max_retries",
        "retry_budget", "track_remaining", "max_connection_pools"),
    "envoy.config.cluster.v3.CircuitBreakers.Thresholds.RetryBudget": _f(
        "budget_percent", "min_retry_concurrency"),
    # monitors (extensions) are refused by OutlierDetectionConfig.from_proto.
    "envoy.config.cluster.v3.OutlierDetection": _f(
        "consecutive_5xx", "interval", "base_ejection_time", "max_ejection_percent",
        "enforcing_consecutive_5xx", "enforcing_success_rate", "success_rate_minimum_hosts",
        "success_rate_request_volume", "success_rate_stdev_factor",
        "consecutive_gateway_failure", "enforcing_consecutive_gateway_failure",
        "split_external_local_origin_errors", "consecutive_local_origin_failure",
        "enforcing_consecutive_local_origin_failure", "enforcing_local_origin_success_rate",
        "failure_percentage_threshold", "enforcing_failure_percentage",
        "enforcing_failure_percentage_local_origin", "failure_percentage_minimum_hosts",
        "failure_percentage_request_volume", "max_ejection_time", "max_ejection_time_jitter",
        "successful_active_health_check_uneject_host", "always_eject_one_host"),
    # Only the panic threshold: zone-aware and locality-weighted balancing are not implemented.
    "envoy.config.cluster.v3.Cluster.CommonLbConfig": _f("healthy_panic_threshold"),
    # metadata_key is refused: no dynamic metadata.
    "envoy.config.cluster.v3.Cluster.OriginalDstLbConfig": _f(
        "use_http_header", "http_header_name", "upstream_port_override"),
    "envoy.config.cluster.v3.Cluster.RingHashLbConfig": _f(
        "minimum_ring_size", "maximum_ring_size", "hash_function"),
    "envoy.config.cluster.v3.Cluster.MaglevLbConfig": _f("table_size"),
    "envoy.config.cluster.v3.Cluster.LeastRequestLbConfig": _f("choice_count"),
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _f(
        "common_http_protocol_options", "explicit_http_config", "auto_config"),
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.ExplicitHttpConfig": _f(
        "http_protocol_options", "http2_protocol_options"),
    # ALPN (TLS clusters only, cluster_config._upstream_protocol): HTTP/3 is refused.
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.AutoHttpConfig": _f(
        "http_protocol_options", "http2_protocol_options"),

    # ---- active health checking (proxy/upstream/health_checker.py) ----------------------
    # Refused: custom_health_check, alt_port, event logs (event_log_path, event_logger,
    # event_service, always_log_health_check_failures / _success), transport_socket_match_
    # criteria, TCP proxy_protocol_config.
    "envoy.config.core.v3.HealthCheck": _f(
        "timeout", "interval", "initial_jitter", "interval_jitter", "interval_jitter_percent",
        "unhealthy_threshold", "healthy_threshold", "reuse_connection", "http_health_check",
        "tcp_health_check", "grpc_health_check", "no_traffic_interval",
        "no_traffic_healthy_interval", "unhealthy_interval", "unhealthy_edge_interval",
        "healthy_edge_interval", "tls_options"),
    "envoy.config.core.v3.HealthCheck.HttpHealthCheck": _f(
        "host", "path", "send", "receive", "response_buffer_size", "request_headers_to_add",
        "request_headers_to_remove", "expected_statuses", "retriable_statuses",
        "codec_client_type", "service_name_matcher", "method"),
    "envoy.config.core.v3.HealthCheck.TcpHealthCheck": _f("send", "receive"),
    "envoy.config.core.v3.HealthCheck.GrpcHealthCheck": _f(
        "service_name", "authority", "initial_metadata"),
    "envoy.config.core.v3.HealthCheck.Payload": _f("text", "binary"),
    "envoy.config.core.v3.HealthCheck.TlsOptions": _f("alpn_protocols"),
    "envoy.type.v3.Int64Range": _f("start", "end"),

    # ---- endpoints ---------------------------------------------------------------------
    "envoy.config.endpoint.v3.ClusterLoadAssignment": _f("cluster_name", "endpoints"),
    "envoy.config.endpoint.v3.LocalityLbEndpoints": _f(
        "locality", "lb_endpoints", "load_balancing_weight", "priority"),
    "envoy.config.endpoint.v3.LbEndpoint": _f("endpoint", "load_balancing_weight"),
    "envoy.config.endpoint.v3.Endpoint": _f("address", "hostname"),

    # ---- transport sockets (proxy/tls/, proxy/extensions/transport_sockets/) -------------
    # What is left out is refused, notably: SDS and certificate providers, session ticket
    # keys, OCSP stapling, CRLs, trust_chain_verification ACCEPT_UNTRUSTED, max_verify_depth,
    # custom validators and handshakers, key_log, signature_algorithms, compliance_policies,
    # pkcs12, private_key_provider, watched_directory, auto_sni / auto_host_sni,
    # allow_renegotiation, max_session_keys, require_sni, session_timeout.
    "envoy.config.core.v3.TransportSocket": _f("name", "typed_config"),
    "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer": _f(),
    "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext": _f(
        "common_tls_context", "require_client_certificate",
        "disable_stateless_session_resumption", "prefer_client_ciphers"),
    "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext": _f("common_tls_context", "sni"),
    "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext": _f(
        "tls_params", "tls_certificates", "validation_context", "alpn_protocols"),
    "envoy.extensions.transport_sockets.tls.v3.TlsParameters": _f(
        "tls_minimum_protocol_version", "tls_maximum_protocol_version", "cipher_suites",
        "ecdh_curves"),
    "envoy.extensions.transport_sockets.tls.v3.TlsCertificate": _f(
        "certificate_chain", "private_key", "password"),
    "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext": _f(
        "trusted_ca", "system_root_certs", "match_typed_subject_alt_names",
        "match_subject_alt_names", "verify_certificate_hash", "verify_certificate_spki",
        "allow_expired_certificate"),
    "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext.SystemRootCerts": _f(),
    "envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher": _f("san_type", "matcher"),

    # ---- access logs -------------------------------------------------------------------
    "envoy.config.accesslog.v3.AccessLog": _f("name", "typed_config", "filter"),
    "envoy.config.accesslog.v3.AccessLogFilter": _f(
        "status_code_filter", "duration_filter", "response_flag_filter",
        "not_health_check_filter", "and_filter", "or_filter",
    ),
    "envoy.config.accesslog.v3.StatusCodeFilter": _f("comparison"),
    "envoy.config.accesslog.v3.DurationFilter": _f("comparison"),
    "envoy.config.accesslog.v3.ComparisonFilter": _f("op", "value"),
    "envoy.config.core.v3.RuntimeUInt32": _f("default_value", "runtime_key"),
    "envoy.config.accesslog.v3.ResponseFlagFilter": _f("flags"),
    "envoy.config.accesslog.v3.NotHealthCheckFilter": _f(),
    "envoy.config.accesslog.v3.AndFilter": _f("filters"),
    "envoy.config.accesslog.v3.OrFilter": _f("filters"),
    "envoy.extensions.access_loggers.file.v3.FileAccessLog": _f(
        "path", "log_format",
        "format", "json_format",  # deprecated spellings of log_format, still accepted
    ),
    "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog": _f("log_format"),
    "envoy.extensions.access_loggers.stream.v3.StderrAccessLog": _f("log_format"),
    "envoy.config.core.v3.SubstitutionFormatString": _f(
        "text_format", "text_format_source", "json_format", "omit_empty_values"),
}

# One use of a message type that supports less than the type's entry in SUPPORTED:
# (parent message full name, field name) -> supported field names of the child.
_UPSTREAM_HTTP_OPTIONS = _f("idle_timeout", "max_requests_per_connection",
                            "max_connection_duration")
SUBSETS: Mapping[tuple[str, str], frozenset[str]] = {
    ("envoy.extensions.upstreams.http.v3.HttpProtocolOptions", "common_http_protocol_options"):
        _UPSTREAM_HTTP_OPTIONS,
    ("envoy.config.cluster.v3.Cluster", "common_http_protocol_options"): _UPSTREAM_HTTP_OPTIONS,
    ("envoy.config.core.v3.SubstitutionFormatString", "text_format_source"): _f("inline_string"),
}

# Map fields whose keys are restricted: (parent full name, field name) -> allowed keys.
MAP_KEYS: Mapping[tuple[str, str], frozenset[str]] = {
    ("envoy.config.cluster.v3.Cluster", "typed_extension_protocol_options"):
        _f("envoy.extensions.upstreams.http.v3.HttpProtocolOptions"),
}

# Leaves accepted whole (their content is data, not config knobs).
WELL_KNOWN: frozenset[str] = frozenset(
    f"google.protobuf.{n}"
    for n in ("Duration", "Timestamp", "Struct", "Value", "ListValue", "Empty", "DoubleValue",
              "FloatValue", "Int64Value", "UInt64Value", "Int32Value", "UInt32Value",
              "BoolValue", "StringValue", "BytesValue")
)

_ANY = "google.protobuf.Any"


def check(msg: Message, path: str = "") -> None:
    """Raise ConfigError for the first set field of ``msg`` (recursively) not in the table."""
    _check(msg, path, None)


def _check(msg: Message, path: str, allowed: frozenset[str] | None) -> None:
    desc = msg.DESCRIPTOR
    name = desc.full_name
    if name in WELL_KNOWN:
        return
    if name == _ANY:
        _check_any(msg, path)
        return
    if allowed is None:
        allowed = SUPPORTED.get(name, frozenset())
    for field, value in msg.ListFields():
        fpath = _join(path, field.name)
        if field.name not in allowed:
            raise ConfigError(fpath, f"{field.name} is not supported (in {name})")
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        subset = SUBSETS.get((name, field.name))
        if field.is_repeated and field.message_type.GetOptions().map_entry:
            keys = MAP_KEYS.get((name, field.name))
            has_messages = (
                field.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE)
            for key in value:
                kpath = f'{fpath}["{key}"]'
                if keys is not None and key not in keys:
                    raise ConfigError(kpath, f"{field.name} key {key!r} is not supported"
                                      f" (supported: {', '.join(sorted(keys))})")
                if has_messages:
                    _check(value[key], kpath, subset)
        elif field.is_repeated:
            for i, item in enumerate(value):
                _check(item, f"{fpath}[{i}]", subset)
        else:
            _check(value, fpath, subset)


def _check_any(any_msg: Message, path: str) -> None:
    from proxy.config.bootstrap import unpack_any

    inner = unpack_any(any_msg, path)  # type: ignore[arg-type]
    name = inner.DESCRIPTOR.full_name
    if name not in SUPPORTED:
        raise ConfigError(path, f"type {name} is not supported")
    _check(inner, path, None)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
