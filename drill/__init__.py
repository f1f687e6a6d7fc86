"""``trioxy-drill``: restart drills against a real trioxy-agent, with invariants that gate CI.

Theory of operation
-------------------
1. One machine, real processes: the drill starts an upstream, writes a bootstrap into a
   private run directory and starts ``trioxy-agent`` on free loopback ports and a unique
   base id. Nothing it starts outlives it.
2. Load is its own (``drill.load``): pluggable modes (HTTP/1.1 new connections and
   keep-alive, slow requests that straddle drains, tcp_proxy streams, h2c), each paced to a
   share of ``--rate``, bounded in time, recording every request's outcome and latency.
3. A scenario (``drill.scenarios``) acts on the agent: SIGHUPs, ``kill -9`` of workers and
   epochs, config flips and broken configs, a binary upgrade and back, ``--concurrency``
   changes. Each step waits until the service is back to one serving epoch, or says why not.
4. A monitor thread (``drill.monitor``) watches all along: the agent's log (restart and
   serving times), its process tree (epochs alive, old epochs gone, fds), and the admin
   API's counters.
5. Afterwards the pure layers judge: ``drill.invariants`` turns the records into
   violations (a failure is excused only when its connection was held by a process the drill
   killed with -9), ``drill.report`` into figures. Any violation makes the exit status 1.

The pure modules (``metrics``, ``schedule``, ``invariants``, ``report``, ``model``) import
no sockets, threads or processes, so their tests need none.
"""

from __future__ import annotations

# Exit statuses of trioxy-drill, named so CI can tell a broken invariant from a broken setup.
EXIT_OK = 0
EXIT_INVARIANT_BROKEN = 1
EXIT_SETUP_ERROR = 2
EXIT_UNSUPPORTED = 3  # the scenario needs an agent feature this trioxy does not have
