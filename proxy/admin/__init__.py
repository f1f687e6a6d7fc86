"""Envoy's admin interface (/stats, /stats/prometheus, ...)."""
