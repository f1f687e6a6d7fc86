"""Fixtures for real-process tests; the helpers live in harness.py (importable by tests)."""

from harness import nginx_upstream, py_upstream, start_trioxy  # noqa: F401
