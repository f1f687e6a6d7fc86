"""A worker process: one trio loop that accepts on inherited listening sockets.

Started by the epoch's main process with fork+exec (``python -m proxy.server.worker``), never
by a fork inside a running trio loop. The main process passes:
- the listening sockets as inherited fds (``--listen-fd <listener index>=<fd>``),
- the validated bootstrap, serialized, on stdin (so every worker serves exactly the config
  the main process validated, even if the file changed on disk meanwhile).
The worker writes ``READY\\n`` to stdout once it accepts, and follows these signals:
TERM = drain (stop accepting, let connections finish within ``--drain-time-s``), INT = exit
now, USR1 = reopen access logs.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

import trio

from proxy.server.drain_manager import DrainStrategy
from proxy.server.lifeline import watch_parent
from proxy.server.stats_flush import WORKER_ROLE, flush_forever, open_slot
from proxy.server.worker_context import WorkerContext

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
) -> None:
    """Run the worker until SIGTERM's drain completes or SIGINT."""
    from proxy.access_log import file_sink
    from proxy.listener.active_tcp_listener import ActiveTcpListener
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
    listeners = []
    for li, lc in enumerate(snapshot.listeners):  # type: ignore[attr-defined]
        sock = trio.socket.from_stdlib_socket(sockets[li])
        listeners.append(ActiveTcpListener(lc, sock, worker))

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
            async with trio.open_nursery() as connections:

                async def accept_all() -> None:
                    with accept_scope:
                        async with trio.open_nursery() as accepting:
                            for al in listeners:
                                accepting.start_soon(al.accept_loop, connections)

                connections.start_soon(accept_all)
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

    data = sys.stdin.buffer.read()
    snapshot = build_snapshot(bootstrap_from_bytes(data))
    sockets: dict[int, socket.socket] = {}
    for spec in args.listen_fd:
        li, fd = spec.split("=")
        sockets[int(li)] = socket.socket(fileno=int(fd))
    out = os.fdopen(os.dup(1), "w")
    writer = None
    if args.stats_slot >= 0:
        writer = open_slot(args.base_id, args.epoch, args.stats_slot, WORKER_ROLE, args.index,
                           create=False)

    def on_ready() -> None:
        out.write("READY\n")
        out.flush()

    try:
        trio.run(
            lambda: serve(
                snapshot,
                sockets,
                index=args.index,
                drain_time_s=args.drain_time_s,
                drain_strategy=DrainStrategy(args.drain_strategy),
                on_ready=on_ready,
                parent_pid=args.parent_pid,
                stats_writer=writer,
            )
        )
    except KeyboardInterrupt:
        pass
    finally:
        file_sink.close_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
