"""The upstreams a drill routes to: a small built-in HTTP/1.1 server, and nginx when present.

The built-in one always runs, because it also answers ``/delay?ms=N`` (the slow load mode):
nginx cannot delay without a module. When nginx is used, it serves everything else, so the
proxy's pools talk to a fast, independent server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

BODY = b"ok\n"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


class BuiltinUpstream:
    """Threaded HTTP/1.1 with keep-alive: ``ok`` for every GET, after ``ms`` for /delay?ms=."""

    name = "builtin"

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port: int = self.sock.getsockname()[1]
        self.requests = 0
        self._closed = False
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        threading.Thread(target=self._serve, daemon=True, name="drill-upstream").start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(c)
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = c.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                path = lines[0].split(b" ")[1].decode("latin-1")
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(b":") for line in lines[1:])}
                length = int(headers.get(b"content-length", b"0") or 0)
                while len(buf) < length:  # a body is read and dropped: GETs have none
                    data = c.recv(65536)
                    if not data:
                        return
                    buf += data
                buf = buf[length:]
                if path.startswith("/delay"):
                    ms = int(path.split("ms=", 1)[1]) if "ms=" in path else 500
                    time.sleep(ms / 1000)
                close = headers.get(b"connection", b"").lower() == b"close"
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                          b"%d\r\n%s\r\n%s" % (len(BODY),
                                               b"Connection: close\r\n" if close else b"", BODY))
                with self._lock:
                    self.requests += 1
                if close:
                    return
        except (OSError, ValueError, IndexError):
            return
        finally:
            with self._lock:
                self._conns.discard(c)
            c.close()

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        with self._lock:
            for c in list(self._conns):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_available() -> bool:
    return os.access(NGINX, os.X_OK)


class NginxUpstream:
    """nginx in the foreground (no master, one worker) answering ``ok`` on a free port."""

    name = "nginx"

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        prefix = workdir / "nginx"
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf.write_text(f"""daemon off;
master_process off;
worker_processes 1;
{user}error_log stderr warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{self.port} backlog=1024;
    location / {{ default_type text/plain; return 200 "ok\\n"; }}
  }}
}}
""")
        self.log = open(prefix / "nginx.log", "wb")  # noqa: SIM115 (open for nginx's life)
        self.proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, 10.0, self.proc)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
