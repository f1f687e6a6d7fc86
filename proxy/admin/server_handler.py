"""The server-level admin endpoints: /server_info, /ready, /hot_restart_version,
/healthcheck/{fail,ok}, /drain_listeners, /quitquitquit, /memory, /logging, /runtime,
/runtime_modify and /config_dump."""

from __future__ import annotations

import json
from typing import Any

import psutil

from proxy import __version__
from proxy.admin.admin import Admin, AdminRequest, AdminResponse, BadRequest, Handler
from proxy.admin.config_dump import ConfigDumpQueryError, apply_query, build_config_dump
from proxy.admin.context import AdminContext
from proxy.admin.server_info import build_server_info
from proxy.config.runtime import layer_entries
from proxy.server.hot_restart import HOT_RESTART_VERSION
from proxy.server.logging_setup import LEVELS, get_log_levels

JSON = "application/json"


def _json(doc: Any) -> AdminResponse:
    return AdminResponse(200, json.dumps(doc, indent=2) + "\n", JSON)


def register(admin: Admin, ctx: AdminContext) -> None:
    async def server_info(req: AdminRequest) -> AdminResponse:
        return _json(build_server_info(
            version=__version__, state=ctx.server_state(),
            hot_restart_version=HOT_RESTART_VERSION, options=ctx.options,
            node=ctx.snapshot.bootstrap.node, uptime_current_epoch_s=ctx.uptime_current_s(),
            uptime_all_epochs_s=ctx.uptime_all_s()))

    async def ready(req: AdminRequest) -> AdminResponse:
        state = ctx.server_state()
        return AdminResponse(200 if state == "LIVE" else 503, state + "\n")

    async def hot_restart_version(req: AdminRequest) -> AdminResponse:
        return AdminResponse(200, HOT_RESTART_VERSION + "\n")

    async def hc_fail(req: AdminRequest) -> AdminResponse:
        await ctx.set_health_check_failed(True)
        return AdminResponse(200, "OK\n")

    async def hc_ok(req: AdminRequest) -> AdminResponse:
        await ctx.set_health_check_failed(False)
        return AdminResponse(200, "OK\n")

    async def drain_listeners(req: AdminRequest) -> AdminResponse:
        graceful = req.flag("graceful")
        skip_exit = req.flag("skip_exit")
        if skip_exit and not graceful:
            raise BadRequest("skip_exit must be used with graceful")
        await ctx.drain_listeners(graceful=graceful, inbound_only=req.flag("inboundonly"),
                                  skip_exit=skip_exit)
        return AdminResponse(200, "OK\n")

    async def quitquitquit(req: AdminRequest) -> AdminResponse:
        ctx.quit()
        return AdminResponse(200, "OK\n")

    async def memory(req: AdminRequest) -> AdminResponse:
        procs = []
        total = 0
        for role, pid in ctx.processes():
            try:
                rss = psutil.Process(pid).memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            procs.append({"role": role, "pid": pid, "rss": str(rss)})
        # Envoy's Memory fields (tcmalloc's) have no Python equivalent but the resident
        # size; "processes" is trioxy's: one line per process of this epoch.
        return _json({"allocated": str(total), "total_physical_bytes": str(total),
                      "processes": procs})

    async def logging_(req: AdminRequest) -> AdminResponse:
        if req.query:
            if req.method != "POST":
                return AdminResponse(405, "/logging changes log levels: use POST\n",
                                     headers=[("allow", "POST")])
            for key, value in req.query.items():
                if value not in LEVELS:
                    raise BadRequest(f"unknown log level {value!r} (known: {', '.join(LEVELS)})")
                await ctx.set_log_level(value, None if key == "level" else key)
        levels = get_log_levels()
        body = "active loggers:\n" + "".join(f"  {k}: {v}\n" for k, v in levels.items())
        return AdminResponse(200, body)

    async def runtime(req: AdminRequest) -> AdminResponse:
        layers = layer_entries(ctx.snapshot.bootstrap.layered_runtime)
        entries: dict[str, Any] = {}
        keys = sorted({k for _, values in layers for k in values})
        for key in keys:
            layer_values = [values.get(key, "") for _, values in layers]
            final = next((v for v in reversed(layer_values) if v != ""), "")
            entries[key] = {"layer_values": layer_values, "final_value": final}
        return _json({"layers": [name for name, _ in layers], "entries": entries})

    async def runtime_modify(req: AdminRequest) -> AdminResponse:
        # As Envoy without an admin layer in layered_runtime. trioxy refuses admin layers:
        # runtime values are compiled into the config snapshot, so a value changed here
        # would show in /runtime and change nothing. The bootstrap and a SIGHUP do it.
        return AdminResponse(503, "No admin layer specified\n(trioxy compiles runtime values"
                                  " into its config: change layered_runtime and reload)\n")

    async def config_dump(req: AdminRequest) -> AdminResponse:
        dump = build_config_dump(ctx.snapshot.bootstrap, loaded_at=ctx.loaded_at)
        try:
            doc = apply_query(dump, resource=req.get("resource"), mask=req.get("mask"),
                              name_regex=req.get("name_regex"))
        except ConfigDumpQueryError as exc:
            return AdminResponse(exc.status, f"{exc}\n")  # 404: no such resource, as Envoy
        return _json(doc)

    admin.add(Handler("/server_info", "print server version/status information", server_info))
    admin.add(Handler("/ready", "print server state, return 200 if LIVE, otherwise return 503",
                      ready))
    admin.add(Handler("/hot_restart_version", "print the hot restart compatibility version",
                      hot_restart_version))
    admin.add(Handler("/healthcheck/fail", "cause the server to fail health checks", hc_fail,
                      mutates=True))
    admin.add(Handler("/healthcheck/ok", "cause the server to pass health checks", hc_ok,
                      mutates=True))
    admin.add(Handler(
        "/drain_listeners", "drain listeners", drain_listeners, mutates=True,
        params=("graceful: discourage requests for --drain-time-s before stopping listeners",
                "inboundonly: only listeners with traffic_direction INBOUND",
                "skip_exit: with graceful, keep the listeners after the drain period")))
    admin.add(Handler("/quitquitquit", "exit the server (drain as on SIGTERM)", quitquitquit,
                      mutates=True))
    admin.add(Handler("/memory", "print current allocation/heap usage (RSS per process)",
                      memory))
    admin.add(Handler("/logging", "query/change logging levels (POST to change)", logging_,
                      params=("*", "level=<level>: every logger",
                              "<logger>=<level>: one logger")))
    admin.add(Handler("/runtime", "print runtime values", runtime))
    admin.add(Handler("/runtime_modify", "modify runtime values (needs an admin layer)",
                      runtime_modify, mutates=True, params=("*",)))
    admin.add(Handler(
        "/config_dump", "dump current Envoy configs (secrets redacted)", config_dump,
        params=("resource=<field>: one repeated field, e.g. static_clusters",
                "mask=<paths>: a FieldMask, comma-separated",
                "name_regex=<regex>: resources whose name matches",
                "include_eds: accepted (no EDS)")))
