"""A test PKI shared by the TLS unit tests (made once per session, in a temp dir)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tls_certs import Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(Path(tmp_path_factory.mktemp("pki")))
