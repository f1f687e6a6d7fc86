"""/clusters and /listeners in Envoy's text and JSON shapes.

Per-host counters live in the workers (each worker owns its upstream connections); the
main process asks every live worker over the control channel and sums. As in Envoy, these
per-host counters are not kept across hot restarts (they are not in /stats).
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format

from proxy.admin.admin import Admin, AdminRequest, AdminResponse, Handler
from proxy.admin.context import AdminContext

HOST_COUNTERS = ("cx_connect_fail", "cx_total", "rq_error", "rq_success", "rq_timeout",
                 "rq_total")
HOST_GAUGES = ("cx_active", "rq_active")


def merge_hosts(answers: dict[int, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """cluster -> "ip:port" -> the host summed over workers (gauges and counters added,
    healthy only if every worker sees it healthy)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for _, clusters in sorted(answers.items()):
        for c in clusters or ():
            hosts = out.setdefault(c["name"], {})
            for h in c["hosts"]:
                addr = f"[{h['address']}]:{h['port']}" if ":" in h["address"] \
                    else f"{h['address']}:{h['port']}"
                cur = hosts.get(addr)
                if cur is None:
                    hosts[addr] = dict(h)
                    continue
                for k in HOST_COUNTERS + HOST_GAUGES:
                    cur[k] += h[k]
                cur["healthy"] = cur["healthy"] and h["healthy"]
    return out


def clusters_text(snapshot: Any, hosts: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines: list[str] = []
    for name in snapshot.clusters:
        lines.append(f"{name}::observability_name::{name}")
        lines.append(f"{name}::added_via_api::false")
        for addr, h in sorted(hosts.get(name, {}).items()):
            p = f"{name}::{addr}::"
            for k in ("cx_active", "cx_connect_fail", "cx_total", "rq_active", "rq_error",
                      "rq_success", "rq_timeout", "rq_total"):
                lines.append(f"{p}{k}::{h[k]}")
            lines.append(f"{p}hostname::{h['hostname']}")
            lines.append(f"{p}health_flags::{'healthy' if h['healthy'] else '/failed_active_hc'}")
            lines.append(f"{p}weight::{h['weight']}")
            lines += [f"{p}region::", f"{p}zone::", f"{p}sub_zone::", f"{p}canary::false"]
            lines.append(f"{p}priority::{h['priority']}")
            lines.append(f"{p}success_rate::-1")
            lines.append(f"{p}local_origin_success_rate::-1")
    return "".join(line + "\n" for line in lines)


def clusters_json(snapshot: Any, hosts: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Envoy's ``envoy.admin.v3.Clusters``, built as the proto so the shape is exact."""
    from envoy.admin.v3 import clusters_pb2, metrics_pb2
    from envoy.config.core.v3 import health_check_pb2

    msg = clusters_pb2.Clusters()
    for name in snapshot.clusters:
        cs = msg.cluster_statuses.add(name=name, added_via_api=False, observability_name=name)
        for _, h in sorted(hosts.get(name, {}).items()):
            hs = cs.host_statuses.add(hostname=h["hostname"], weight=h["weight"],
                                      priority=h["priority"])
            hs.address.socket_address.address = h["address"]
            hs.address.socket_address.port_value = h["port"]
            for k in HOST_COUNTERS:
                hs.stats.add(name=k, value=h[k], type=metrics_pb2.SimpleMetric.COUNTER)
            for k in HOST_GAUGES:
                hs.stats.add(name=k, value=h[k], type=metrics_pb2.SimpleMetric.GAUGE)
            hs.health_status.eds_health_status = health_check_pb2.HEALTHY
            if not h["healthy"]:
                hs.health_status.failed_active_health_check = True
    # Envoy prints zero counters too (always_print_primitive_fields).
    return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def register(admin: Admin, ctx: AdminContext) -> None:
    async def clusters(req: AdminRequest) -> AdminResponse:
        fmt = req.choice("format", ("text", "json"), "text")
        hosts = merge_hosts(await ctx.worker_call("clusters"))
        if fmt == "json":
            doc = clusters_json(ctx.snapshot, hosts)
            return AdminResponse(200, json.dumps(doc, indent=2) + "\n", "application/json")
        return AdminResponse(200, clusters_text(ctx.snapshot, hosts))

    async def listeners(req: AdminRequest) -> AdminResponse:
        fmt = req.choice("format", ("text", "json"), "text")
        entries = ctx.listener_addresses()
        if fmt == "json":
            from envoy.admin.v3 import listeners_pb2

            msg = listeners_pb2.Listeners()
            for name, addr, _ in entries:
                ls = msg.listener_statuses.add(name=name)
                host, _, port = addr.rpartition(":")
                ls.local_address.socket_address.address = host.strip("[]")
                ls.local_address.socket_address.port_value = int(port)
            doc = json_format.MessageToDict(msg, preserving_proto_field_name=True)
            return AdminResponse(200, json.dumps(doc, indent=2) + "\n", "application/json")
        return AdminResponse(200, "".join(f"{name}::{addr}\n" for name, addr, _ in entries))

    admin.add(Handler("/clusters", "upstream cluster status", clusters,
                      params=("format=text|json",)))
    admin.add(Handler("/listeners", "print listener info", listeners,
                      params=("format=text|json",)))
