"""What a factory may consult while compiling config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.config.runtime import Runtime


@dataclass(frozen=True)
class FactoryContext:
    cluster_names: frozenset[str] = frozenset()
    runtime: Runtime | None = None
    # Whether route configs must name only known clusters (Envoy: true for static routes).
    validate_clusters: bool = True
    # Envoy's LocalInfo clusterName(): the bootstrap's node.cluster ("" when unset).
    local_cluster_name: str = ""
    extra: dict[str, object] = field(default_factory=dict)
