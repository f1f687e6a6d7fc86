"""A stable 64-bit hash for consistent hashing (ring hash, Maglev, hash policies).

Python's ``hash()`` is salted per process, and the workers of an epoch (and the epochs of a
hot restart) must send the same key to the same host, so keys are hashed with BLAKE2b cut
to 64 bits: stable everywhere, well mixed, and about half a microsecond for a short key.
Envoy uses xxHash64; the values differ but the properties the balancers rely on do not.
"""

from __future__ import annotations

from hashlib import blake2b

__all__ = ["hash64"]


def hash64(data: bytes | str) -> int:
    """Unsigned 64-bit hash of ``data`` (str is hashed as UTF-8)."""
    if isinstance(data, str):
        data = data.encode()
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little")
