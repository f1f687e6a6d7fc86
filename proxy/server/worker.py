"""A worker process: one trio loop that accepts on inherited listening sockets.

Started by the epoch's main process with fork+exec (``python -m proxy.server.worker``), never
by a fork inside a running trio loop. The main process passes:
- the listening sockets as inherited fds (``--listen-fd <listener index>=<fd>``),
- the validated bootstrap, serialized, framed on stdin (so every worker serves exactly the
  config the main process validated, even if the file changed on disk meanwhile), then a
  JSON frame of spawn-time state (active health check results); stdin then
  carries the main process's commands (``worker_control.py``: stats flush, health-check
  state, stop accepting, drain, per-host counters for admin /clusters, log level).
The worker writes ``READY\\n`` to its control fd (a pipe of its own, ``--control-fd``: its
stdout stays free for access logs) once it accepts, answers commands there, and
follows these signals:
TERM = drain (stop accepting, let connections finish within ``--drain-time-s``), INT = exit
now, USR1 = reopen access logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

import trio

from proxy.listener.active_tcp_listener import ActiveTcpListener
from proxy.listener.active_tcp_socket import attach_connection_handler
from proxy.server.drain_manager import DrainStrategy
from proxy.server.lifeline import watch_parent
from proxy.server.logging_setup import set_log_level
from proxy.server.stats_flush import WORKER_ROLE, flush_forever, open_slot
from proxy.server.worker_context import WorkerContext
from proxy.server.worker_control import LineSender, read_bootstrap, send_events, serve_commands

log = logging.getLogger("trioxy.worker")

ORPHAN_DRAIN_S = 5.0


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trioxy-worker")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--listen-fd", action="append", default=[], help="LISTENER_INDEX=FD")
    p.add_argument("--drain-time-s", type=float, default=600.0)
    p.add_argument("--drain-strategy", default="gradual")
    p.add_argument("--log-level", default="info")
    p.add_argument("--parent-pid", type=int, default=0)
    p.add_argument("--base-id", type=int, default=0)
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--stats-slot", type=int, default=-1, help="shared-memory slot; -1: none")
    p.add_argument("--stats-region", type=int, default=-1,
                   help="the epoch's shared-memory region (chosen by the main process)")
    p.add_argument("--control-fd", type=int, default=1, help="where READY and answers go")
    return p.parse_args(argv)


async def serve(
    snapshot: object,
    sockets: dict[int, socket.socket],
    *,
    index: int,
    drain_time_s: float,
    drain_strategy: DrainStrategy,
    ready: trio.Event | None = None,
    on_ready: object = None,
    parent_pid: int = 0,
    stats_writer: object = None,
    control: tuple[trio.abc.ReceiveStream, trio.abc.SendStream] | None = None,
    host_health: dict[str, Any] | None = None,
) -> None:
    """Run the worker until SIGTERM's drain completes or SIGINT.

    ``host_health`` is the main process's active health check results at spawn time
    (cluster -> ``[[address, port, healthy], ...]``), applied before accepting."""
    from proxy.access_log import file_sink
    from proxy.stats import Store
    from proxy.upstream.cluster_manager import ClusterManager

    stats = Store()
    if stats_writer is not None:
        stats_writer.seed(stats)  # type: ignore[attr-defined]  (counters continue)
    worker = WorkerContext(
        cluster_manager=ClusterManager(snapshot.clusters, stats),  # type: ignore[attr-defined]
        snapshot=snapshot,  # type: ignore[arg-type]
        index=index,
        stats=stats,
    )
    _apply_host_health(worker, host_health or {})
    listeners = []
    for li, lc in enumerate(snapshot.listeners):  # type: ignore[attr-defined]
        sock = trio.socket.from_stdlib_socket(sockets[li])
        listeners.append(ActiveTcpListener(lc, sock, worker))
    # use_original_dst hand-off targets: these and the bind_to_port: false listeners.
    attach_connection_handler(listeners, getattr(snapshot, "unbound_listeners", ()), worker)

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
        async with trio.open_nursery() as root:
            accept_scope = trio.CancelScope()

            def orphaned() -> None:
                # The epoch's main process died (kill -9): stop accepting so the next
                # epoch gets the queue, and give what is in flight a short drain.
                grace = min(drain_time_s, ORPHAN_DRAIN_S)
                log.warning("worker %d: the epoch's main process is gone; draining %.0f s",
                            index, grace)
                accept_scope.cancel()
                worker.drain.start_drain_sequence(0, DrainStrategy.IMMEDIATE)
                root.cancel_scope.deadline = trio.current_time() + grace

            root.start_soon(watch_parent, parent_pid, orphaned)
            if stats_writer is not None:
                root.start_soon(flush_forever, stats_writer, stats)
            await root.start(worker.timers.run)
            await root.start(worker.cluster_manager.run)
            listener_scopes = [trio.CancelScope() for _ in listeners]
            sender = LineSender(control[1]) if control is not None else None
            if control is not None and sender is not None:
                handlers = _control_handlers(
                    worker, stats, stats_writer, listener_scopes,
                    lambda: worker.drain.start_drain_sequence(drain_time_s, drain_strategy))
                root.start_soon(serve_commands, control[0], sender, handlers)
                events_in, events_out = trio.open_memory_channel[dict[str, Any]](1024)

                def post_event(event: dict[str, Any]) -> None:
                    try:
                        events_in.send_nowait(event)
                    except trio.WouldBlock:
                        log.warning("worker %d: control events backed up; dropped %s",
                                    index, event.get("event"))

                worker.post_event = post_event
                root.start_soon(send_events, events_out, sender)
            async with trio.open_nursery() as connections:

                async def accept_one(al: ActiveTcpListener, scope: trio.CancelScope) -> None:
                    with scope:
                        await al.accept_loop(connections)

                async def accept_all() -> None:
                    with accept_scope:
                        async with trio.open_nursery() as accepting:
                            for al, scope in zip(listeners, listener_scopes, strict=True):
                                accepting.start_soon(accept_one, al, scope)

                connections.start_soon(accept_all)
                if sender is not None:
                    await sender.send_all(b"READY\n")
                if callable(on_ready):
                    on_ready()
                if ready is not None:
                    ready.set()
                async for signum in signals:
                    if signum == signal.SIGUSR1:
                        file_sink.reopen_all()
                        continue
                    if signum == signal.SIGINT:
                        root.cancel_scope.cancel()
                        break
                    # SIGTERM: stop accepting now. HTTP connections close themselves as they
                    # drain (Connection: close, idle ones after a grace); whatever is still
                    # open when the main process ends us (parent shutdown) is cut then.
                    log.info("worker %d draining for %.1f s", index, drain_time_s)
                    accept_scope.cancel()
                    worker.drain.start_drain_sequence(drain_time_s, drain_strategy)
                    break
            root.cancel_scope.cancel()


def _control_handlers(
    worker: WorkerContext,
    stats: Any,
    stats_writer: Any,
    listener_scopes: list[trio.CancelScope],
    start_drain: Any,
) -> dict[str, Any]:
    """What the main process may ask of this worker (``worker_control.py``)."""

    def flush(msg: dict[str, Any]) -> None:
        if stats_writer is not None:
            stats_writer.flush(stats)

    def health_check(msg: dict[str, Any]) -> None:
        worker.drain.set_health_check_failed(bool(msg["failed"]))

    def stop_accepting(msg: dict[str, Any]) -> None:
        for i in msg["listeners"]:
            listener_scopes[int(i)].cancel()

    def drain(msg: dict[str, Any]) -> None:
        start_drain()

    def reset_counters(msg: dict[str, Any]) -> None:
        for c in stats.counters.values():
            c.value = 0
        for cluster in worker.cluster_manager:
            for h in cluster.hosts:
                h.cx_total = h.cx_connect_fail = 0
                h.rq_total = h.rq_success = h.rq_error = h.rq_timeout = 0
        flush(msg)

    def log_level(msg: dict[str, Any]) -> None:
        set_log_level(msg["level"], msg.get("logger"))

    def host_health(msg: dict[str, Any]) -> int:
        # One host's active health changed (the main process's health checker).
        return _apply_host_health(
            worker, {msg["cluster"]: [(msg["address"], msg["port"], msg["healthy"])]})

    def host_health_snapshot(msg: dict[str, Any]) -> int:
        return _apply_host_health(worker, msg["clusters"])

    def host_check_success(msg: dict[str, Any]) -> bool:
        # An active health check of a healthy host passed: outlier detection un-ejects it
        # (successful_active_health_check_uneject_host). True when it was ejected.
        return _uneject_on_success(worker, msg["cluster"], msg["address"], int(msg["port"]))

    def clusters(msg: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"name": c.name, "hosts": [_host_state(h) for h in c.hosts]}
            for c in worker.cluster_manager
        ]

    def stats_(msg: dict[str, Any]) -> dict[str, Any]:
        return stats.as_data()

    return {"flush": flush, "stats": stats_, "health_check": health_check, "stop_accepting": stop_accepting,
            "drain": drain, "reset_counters": reset_counters, "log_level": log_level,
            "clusters": clusters, "host_health": host_health,
            "host_health_snapshot": host_health_snapshot,
            "host_check_success": host_check_success}


def _uneject_on_success(worker: WorkerContext, name: str, address: str, port: int) -> bool:
    cluster = worker.cluster_manager.get(name)
    if cluster is None or cluster.outlier is None:
        return False
    for host in cluster.hosts:
        if host.address == address and host.port == port and host.ejected and host.healthy:
            cluster.outlier.on_health_check_success(host)
            return not host.ejected
    return False


def _apply_host_health(worker: WorkerContext, clusters: dict[str, Any]) -> int:
    """Apply ``{cluster: [[address, port, healthy], ...]}``; how many hosts changed."""
    changed = 0
    for name, states in clusters.items():
        cluster = worker.cluster_manager.get(name)
        if cluster is not None:
            changed += cluster.apply_health(states)
    return changed


def _host_state(h: Any) -> dict[str, Any]:
    return {"address": h.address, "port": h.port, "hostname": h.hostname, "weight": h.weight,
            "priority": h.priority, "healthy": h.healthy, "cx_active": h.cx_active,
            "rq_active": h.rq_active, "cx_total": h.cx_total,
            "cx_connect_fail": h.cx_connect_fail, "rq_total": h.rq_total,
            "rq_success": h.rq_success, "rq_error": h.rq_error, "rq_timeout": h.rq_timeout}


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    from proxy.server.logging_setup import setup_logging

    setup_logging(args.log_level, f"worker {args.index}")
    # SIGTERM must not kill us before trio's receiver is installed.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    from proxy.access_log import file_sink
    from proxy.config.bootstrap import bootstrap_from_bytes
    from proxy.config.snapshot import build_snapshot

    data = read_bootstrap(0)
    snapshot = build_snapshot(bootstrap_from_bytes(data))
    # The second frame: state the main process holds at spawn time (host health).
    initial = json.loads(read_bootstrap(0) or b"{}")
    sockets: dict[int, socket.socket] = {}
    for spec in args.listen_fd:
        li, fd = spec.split("=")
        sockets[int(li)] = socket.socket(fileno=int(fd))
    writer = None
    if args.stats_slot >= 0:
        writer = open_slot(args.base_id, args.epoch, args.stats_slot, WORKER_ROLE, args.index,
                           create=False,
                           region=args.stats_region if args.stats_region >= 0 else None)

    async def run() -> None:
        # The command pipes: stdin (after the bootstrap) and stdout. Log lines go to stderr.
        control_in = trio.lowlevel.FdStream(os.dup(0))
        control_out = trio.lowlevel.FdStream(os.dup(args.control_fd))
        if args.control_fd != 1:
            os.close(args.control_fd)
        await serve(
            snapshot,
            sockets,
            index=args.index,
            drain_time_s=args.drain_time_s,
            drain_strategy=DrainStrategy(args.drain_strategy),
            parent_pid=args.parent_pid,
            stats_writer=writer,
            control=(control_in, control_out),
            host_health=initial.get("host_health"),
        )

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    finally:
        file_sink.close_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
