"""The sans-IO agreement (STYLE convention 1): policy modules import no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SANS_IO = [
    "proxy/stream_info.py",
    "proxy/http/headers.py",
    "proxy/http/codec",
    "proxy/http/grpc.py",
    "proxy/router/config.py",
    "proxy/common/matchers.py",
    "proxy/upstream/load_balancer.py",
    "proxy/upstream/cluster_config.py",
    "proxy/upstream/health_checker.py",
    "proxy/listener/filter_chain_manager.py",
    "proxy/listener/listener_filter.py",
    "proxy/extensions/filters/listener/tls_inspector",
    "proxy/extensions/filters/listener/http_inspector",
    "proxy/extensions/filters/listener/proxy_protocol",
    "proxy/extensions/filters/listener/original_dst",
    "proxy/upstream/original_dst_cluster.py",
    "proxy/upstream/resource_manager.py",
    "proxy/upstream/outlier_detection.py",
    "proxy/router/retry_state.py",
    "proxy/access_log/formatter.py",
    "proxy/access_log/filters.py",
    "proxy/server/drain_manager.py",
    "proxy/config",
    "supervisor/restarter.py",
    "proxy/admin/stats_render.py",
    "proxy/admin/config_dump.py",
    "proxy/admin/server_info.py",
    "proxy/admin/clusters_handler.py",
]
FORBIDDEN = {"trio", "socket", "subprocess", "asyncio", "selectors", "threading", "signal"}


def _files() -> list[Path]:
    out: list[Path] = []
    for entry in SANS_IO:
        p = ROOT / entry
        if p.is_dir():
            out += sorted(p.glob("*.py"))
        elif p.exists():
            out.append(p)
    return out


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_imports_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for n in names:
            assert n.split(".")[0] not in FORBIDDEN, f"{path.name} imports {n}"
