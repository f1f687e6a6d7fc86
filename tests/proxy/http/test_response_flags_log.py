"""Response flags as an access log writes them (``%RESPONSE_FLAGS%`` in a real file access
log line), for the flags no other test reads back from a log: DPE, SI, NC, DR (issue #6)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).parent))
import h2_helpers  # noqa: E402
from test_conn_manager import (  # noqa: E402
    Client,
    Upstream,
    cluster,
    config,
    run_proxy,
)

from proxy.access_log import file_sink  # noqa: E402


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    u = Upstream()
    yield u
    u.close()


ROUTE = """
- match: {prefix: "/"}
  route: {cluster: backend}
"""

LOG_FORMAT = "%RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_HOST% %REQ(:PATH)%\\n"


def log_lines(log: Path, n: int = 1) -> list[str]:
    file_sink.flush_all(2.0)
    lines = log.read_text().splitlines() if log.exists() else []
    assert len(lines) >= n, lines
    return lines


def _count(log: Path) -> int:
    file_sink.flush_all(2.0)
    return len(log.read_text().splitlines()) if log.exists() else 0


async def wait_lines(log: Path, n: int) -> list[str]:
    for _ in range(300):
        if _count(log) >= n:
            break
        await trio.sleep(0.01)
    return log_lines(log, n)


async def test_malformed_request_is_logged_dpe(upstream: Upstream, tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    async with run_proxy(config(routes=ROUTE, clusters=cluster("backend", upstream.port),
                                access_log=log)) as p:
        c = await Client.connect(p.port)
        await c.send(b"GET / HTTP/1.1\r\nhost: a\r\nbad header\r\n\r\n")
        assert (await c.read_all()).startswith(b"HTTP/1.1 400 ")
        await c.aclose()
        lines = await wait_lines(log, 1)
    assert lines[0].split(" ")[:2] == ["400", "DPE"], lines


async def test_stream_idle_timeout_is_logged_si(upstream: Upstream, tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    routes = """
    - match: {prefix: "/"}
      route: {cluster: backend, timeout: 0s}
    """
    async with run_proxy(config(routes=routes, clusters=cluster("backend", upstream.port),
                                access_log=log, hcm_extra="\nstream_idle_timeout: 0.3s")) as p:
        c = await Client.connect(p.port)
        r = await c.request("GET", "/slow?ms=1500")
        assert r.status == 408
        await c.aclose()
        lines = await wait_lines(log, 1)
    assert lines[0].split(" ")[:2] == ["408", "SI"], lines
    assert lines[0].endswith(" /slow?ms=1500")


async def test_unknown_cluster_is_logged_nc(upstream: Upstream, tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    routes = """
    - match: {prefix: "/"}
      route: {cluster_header: x-cluster}
    """
    async with run_proxy(config(routes=routes, clusters=cluster("backend", upstream.port),
                                access_log=log)) as p:
        c = await Client.connect(p.port)
        r = await c.request("GET", "/x", headers=[("x-cluster", "nowhere")])
        assert r.status == 503
        await c.aclose()
        lines = await wait_lines(log, 1)
    assert lines[0].split(" ")[:2] == ["503", "NC"], lines


async def test_h2_client_reset_is_logged_dr(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    u = h2_helpers.H1Upstream()
    access_log = f"""
access_log:
- name: envoy.access_loggers.file
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
    path: {log}
    log_format:
      text_format_source:
        inline_string: "{LOG_FORMAT}"
"""
    try:
        cfg = h2_helpers.config(routes=ROUTE, clusters=h2_helpers.cluster("backend", u.port),
                                hcm_extra=access_log)
        async with h2_helpers.run_proxy(cfg) as p:
            c = await h2_helpers.H2Client.connect(p.port)
            sid = c.start("/slow?ms=3000")
            await c.flush()
            for _ in range(300):
                if u.requests:
                    break
                await trio.sleep(0.01)
            c.conn.reset_stream(sid, 8)  # CANCEL
            await c.flush()
            lines = await wait_lines(log, 1)
    finally:
        u.close()
    assert lines[0].split(" ")[:2] == ["0", "DR"], lines
