"""/stats, /stats/prometheus and /reset_counters.

Stats are summed over every process of every epoch from shared memory after a fresh flush
(``AdminContext.current_stats``), so what /stats shows matches what clients saw. Reading
and rendering run in a thread: a large stats segment never stalls the main loop.
"""

from __future__ import annotations

import trio

from proxy.admin.admin import Admin, AdminRequest, AdminResponse, BadRequest, Handler
from proxy.admin.context import AdminContext
from proxy.admin.stats_render import (
    StatsQueryError,
    compile_filter,
    render_json,
    render_prometheus,
    render_text,
)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=UTF-8"


def register(admin: Admin, ctx: AdminContext) -> None:
    async def stats(req: AdminRequest) -> AdminResponse:
        fmt = req.choice("format", ("text", "json", "prometheus"), "text")
        try:
            flt = compile_filter(req.get("filter"))
        except StatsQueryError as exc:
            raise BadRequest(str(exc)) from None
        used_only = req.flag("usedonly")
        current = await ctx.current_stats()
        if fmt == "prometheus":
            body = await trio.to_thread.run_sync(
                lambda: render_prometheus(current, filter=flt, used_only=used_only))
            return AdminResponse(200, body, PROMETHEUS_CONTENT_TYPE)
        interval = ctx.histogram_interval()
        if fmt == "json":
            import json

            doc = await trio.to_thread.run_sync(
                lambda: render_json(current, filter=flt, used_only=used_only, interval=interval))
            return AdminResponse(200, json.dumps(doc, indent=2) + "\n", "application/json")
        body = await trio.to_thread.run_sync(
            lambda: render_text(current, filter=flt, used_only=used_only, interval=interval))
        return AdminResponse(200, body)

    async def prometheus(req: AdminRequest) -> AdminResponse:
        try:
            flt = compile_filter(req.get("filter"))
        except StatsQueryError as exc:
            raise BadRequest(str(exc)) from None
        current = await ctx.current_stats()
        body = await trio.to_thread.run_sync(
            lambda: render_prometheus(current, filter=flt, used_only=req.flag("usedonly")))
        return AdminResponse(200, body, PROMETHEUS_CONTENT_TYPE)

    async def reset_counters(req: AdminRequest) -> AdminResponse:
        await ctx.reset_counters()
        return AdminResponse(200, "OK\n")

    admin.add(Handler(
        "/stats", "print server stats", stats,
        params=("filter=<regex>: only stats whose name matches",
                "format=text|json|prometheus", "usedonly: only stats that were written")))
    admin.add(Handler(
        "/stats/prometheus", "print server stats in prometheus format", prometheus,
        params=("filter=<regex>: only stats whose name matches",
                "usedonly: only stats that were written")))
    admin.add(Handler("/reset_counters", "reset all counters to zero", reset_counters,
                      mutates=True))
