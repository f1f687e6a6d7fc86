"""Codec-neutral header map: Envoy's RequestHeaderMap / ResponseHeaderMap.

Theory of operation:
1. Names are lowercase ``str``; values are ``str`` decoded as latin-1, so any byte the wire
   carried survives a round trip (``value.encode("latin-1")``).
2. Pseudo-headers live in the same map, first, as in Envoy and HTTP/2: a request carries
   ``:method``, ``:path``, ``:authority`` (from ``Host`` on HTTP/1.1) and ``:scheme``; a
   response carries ``:status``. Codecs translate them to and from their wire form, so
   route matching, filters and access logs see one shape for every protocol.
3. Order is kept and repeated names are allowed (``set-cookie``); ``get`` returns the first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class HeaderMap:
    """Ordered multi-map of (lowercase name, value)."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] | None = None) -> None:
        self._items: list[tuple[str, str]] = list(items) if items is not None else []

    # -- reading -----------------------------------------------------------------------
    def get(self, name: str, default: str | None = None) -> str | None:
        for k, v in self._items:
            if k == name:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self._items if k == name]

    def __contains__(self, name: object) -> bool:
        return any(k == name for k, _ in self._items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[str, str]]:
        return self._items

    def regular(self) -> Iterator[tuple[str, str]]:
        """The headers without pseudo-headers, in order."""
        return ((k, v) for k, v in self._items if not k.startswith(":"))

    def byte_size(self) -> int:
        return sum(len(k) + len(v) for k, v in self._items)

    # -- writing -----------------------------------------------------------------------
    def add(self, name: str, value: str) -> None:
        if name.startswith(":"):
            # Pseudo-headers stay ahead of regular ones (HTTP/2 requires it).
            i = 0
            while i < len(self._items) and self._items[i][0].startswith(":"):
                i += 1
            self._items.insert(i, (name, value))
        else:
            self._items.append((name, value))

    def set(self, name: str, value: str) -> None:
        """Replace every value of ``name`` with one, keeping the first one's position."""
        items = self._items
        for i, kv in enumerate(items):
            if kv[0] == name:
                items[i] = (name, value)
                for later in items[i + 1 :]:
                    if later[0] == name:  # rare: drop the other values of a repeated name
                        items[i + 1 :] = [x for x in items[i + 1 :] if x[0] != name]
                        break
                return
        self.add(name, value)

    def set_default(self, name: str, value: str) -> None:
        if name not in self:
            self.add(name, value)

    def remove(self, name: str) -> None:
        self._items = [kv for kv in self._items if kv[0] != name]

    def remove_if(self, names: frozenset[str] | set[str]) -> None:
        self._items = [kv for kv in self._items if kv[0] not in names]

    def append_value(self, name: str, value: str, sep: str = ",") -> None:
        """Append to an existing value (as Envoy does for x-forwarded-for), or add it."""
        for i, (k, v) in enumerate(self._items):
            if k == name:
                self._items[i] = (k, f"{v}{sep}{value}" if v else value)
                return
        self.add(name, value)

    def copy(self) -> HeaderMap:
        return HeaderMap(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HeaderMap) and self._items == other._items

    def __repr__(self) -> str:
        return f"HeaderMap({self._items!r})"

    # -- pseudo-header shortcuts -------------------------------------------------------
    @property
    def method(self) -> str | None:
        return self.get(":method")

    @property
    def path(self) -> str | None:
        return self.get(":path")

    @property
    def authority(self) -> str | None:
        return self.get(":authority")

    @property
    def status(self) -> int | None:
        s = self.get(":status")
        return int(s) if s is not None else None
