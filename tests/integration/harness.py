"""Real processes on 127.0.0.1: trioxy epochs, nginx upstreams, misbehaving Python upstreams."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


class Trioxy:
    """A running ``trioxy`` epoch (main process + workers) started from a YAML config."""

    def __init__(self, proc: subprocess.Popen, log_path: Path, config_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.config_path = config_path
        self.base_id = 0

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        import psutil

        return [c.pid for c in psutil.Process(self.proc.pid).children() if c.is_running()]

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def start_trioxy(tmp_path: Path) -> Iterator:
    started: list[Trioxy] = []

    def start(
        config_yaml: str,
        *,
        wait_port: int | None = None,
        concurrency: int = 1,
        extra: list[str] | None = None,
        drain_time_s: float = 1.0,
    ) -> Trioxy:
        n = len(started)
        cfg = tmp_path / f"envoy{n}.yaml"
        cfg.write_text(textwrap.dedent(config_yaml))
        log_path = tmp_path / f"trioxy{n}.log"
        argv = [
            sys.executable, "-m", "proxy.cli", "-c", str(cfg),
            "--concurrency", str(concurrency),
            "--drain-time-s", str(drain_time_s),
            "--parent-shutdown-time-s", str(drain_time_s + 1),
            *(extra or []),
        ]
        logf = open(log_path, "wb")  # noqa: SIM115 (kept open for the process's life)
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
        t = Trioxy(proc, log_path, cfg)
        args = extra or []
        t.base_id = int(args[args.index("--base-id") + 1]) if "--base-id" in args else 0
        started.append(t)
        if wait_port is not None:
            try:
                wait_for_port(wait_port, proc=proc)
            except Exception:
                raise RuntimeError(f"trioxy did not start:\n{t.log}") from None
            # Listening happens in the main process before workers accept: wait for READY.
            deadline = time.monotonic() + 15
            while "ready" not in t.log and time.monotonic() < deadline:
                time.sleep(0.05)
        return t

    yield start
    for t in started:
        t.stop()
    # Standalone epochs leave their stats segment behind (the agent removes its own on
    # exit): remove what this test's epochs used.
    from shm.segment import Segment

    for base in {t.base_id for t in started}:
        Segment.unlink(base)


NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@pytest.fixture
def nginx_upstream(tmp_path: Path) -> Iterator[int]:
    """An nginx serving /  (100-byte body), /echo-headers and /big on a free port."""
    if not os.path.exists(NGINX):
        pytest.skip("nginx is not installed (scripts/test installs it)")
    port = free_port()
    prefix = tmp_path / "nginx"
    (prefix / "logs").mkdir(parents=True)
    (prefix / "html").mkdir()
    (prefix / "html" / "index.html").write_text("x" * 99 + "\n")
    (prefix / "html" / "big").write_bytes(os.urandom(4 * 1024 * 1024))
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
user root;
error_log stderr warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
  keepalive_requests 100000;
  server {{
    listen 127.0.0.1:{port};
    root {prefix}/html;
    location = /echo-headers {{
      default_type text/plain;
      return 200 "host=$host xff=$http_x_forwarded_for xrid=$http_x_request_id proto=$http_x_forwarded_proto conn=$http_connection\\n";
    }}
    location = /post {{
      client_max_body_size 64m;
      default_type text/plain;
      echo_read_request_body;
    }}
  }}
}}
""".replace("      echo_read_request_body;\n", "      return 200 \"posted\\n\";\n"))
    proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc=proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


class PyUpstream:
    """A small threaded HTTP/1.1 upstream that misbehaves on demand, by path.

    /ok             200 "ok" with keep-alive
    /close-after    reads the request, closes without answering (UC)
    /garbage        answers bytes that are not HTTP (UPE)
    /slow?ms=N      answers after N ms (UT)
    /reset-mid      sends headers and half the body, then resets (mid-response)
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.accepts = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepts += 1
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                head, _, buf = buf.partition(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0].decode()
                path = line.split(" ")[1]
                if path.startswith("/close-after"):
                    return
                if path.startswith("/garbage"):
                    c.sendall(b"this is not http at all\r\n\r\n")
                    return
                if path.startswith("/slow"):
                    ms = int(path.split("ms=")[1]) if "ms=" in path else 1000
                    time.sleep(ms / 1000)
                if path.startswith("/reset-mid"):
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    return
                body = b"ok\n"
                c.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n%s"
                    % (len(body), body)
                )
        except OSError:
            pass
        finally:
            c.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture
def py_upstream() -> Iterator[PyUpstream]:
    u = PyUpstream()
    yield u
    u.close()


def http_get(port: int, path: str = "/", headers: dict[str, str] | None = None, timeout: float = 10.0):
    """One request with http.client; returns (status, headers dict, body)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()
