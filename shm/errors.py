"""The one exception shm raises: the segment or a slot cannot be used (and why, and what to do)."""

from __future__ import annotations


class SegmentError(Exception):
    pass
