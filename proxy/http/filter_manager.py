"""The HTTP filter chain of one stream (Envoy's FilterManager).

Decoder filters see the request in config order; encoder filters see the response in
reverse order; the router is the last decoder and has no encoder side. A filter returns
``FilterStatus.CONTINUE`` to pass the event on or ``STOP_ITERATION`` when it has taken
the stream over (it answered with a local reply, or it is the router and owns the
upstream). Later events of a stopped direction stop at the same filter.

Theory of operation:
1. ``FilterFactory.create_filter(callbacks)`` makes one filter per stream; a filter may be
   a decoder, an encoder or both (``decode_*`` / ``encode_*`` methods present).
2. Filters never touch the codec: they call ``callbacks.encode_headers`` and friends, which
   run the encoder filters and end at the connection manager's sink. The sink only
   buffers; ``await callbacks.flush()`` writes what has been encoded, so a response whose
   headers and body arrive in one upstream read leaves in one downstream write.
3. Envoy's resumable StopIteration (continueDecoding with buffered data) is not here yet:
   the filters that need it (ext_authz, buffer) arrive with it.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from proxy.http.headers import HeaderMap


class FilterStatus(enum.Enum):
    CONTINUE = 0
    STOP_ITERATION = 1


CONTINUE = FilterStatus.CONTINUE
STOP_ITERATION = FilterStatus.STOP_ITERATION


class FilterFactory(Protocol):
    """What an HTTP filter's config factory returns."""

    def create_filter(self, callbacks: Any) -> Any: ...


class EncodeSink(Protocol):
    """The end of the encoder chain: the connection manager's stream."""

    def sink_headers(self, headers: HeaderMap, end_stream: bool) -> None: ...
    def sink_data(self, data: bytes, end_stream: bool) -> None: ...
    def sink_trailers(self, trailers: HeaderMap) -> None: ...


class FilterManager:
    """Runs one stream's filters; ``decoders`` end with the router."""

    __slots__ = ("decoders", "encoders", "sink", "_decode_stop", "_encode_stop")

    def __init__(self, decoders: Sequence[Any], encoders: Sequence[Any], sink: EncodeSink):
        self.decoders = decoders
        self.encoders = encoders  # already in encode (reverse config) order
        self.sink = sink
        self._decode_stop = len(decoders)
        self._encode_stop = len(encoders)

    # -- request direction ----------------------------------------------------------------
    async def decode_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        for i, f in enumerate(self.decoders):
            if await f.decode_headers(headers, end_stream) is STOP_ITERATION:
                self._decode_stop = i
                return

    async def decode_data(self, data: bytes, end_stream: bool) -> None:
        for f in self.decoders[: self._decode_stop + 1]:
            if await f.decode_data(data, end_stream) is STOP_ITERATION:
                return

    async def decode_trailers(self, trailers: HeaderMap) -> None:
        for f in self.decoders[: self._decode_stop + 1]:
            if await f.decode_trailers(trailers) is STOP_ITERATION:
                return

    # -- response direction ---------------------------------------------------------------
    async def encode_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        for i, f in enumerate(self.encoders):
            if await f.encode_headers(headers, end_stream) is STOP_ITERATION:
                self._encode_stop = i
                return
        self.sink.sink_headers(headers, end_stream)

    async def encode_data(self, data: bytes, end_stream: bool) -> None:
        for f in self.encoders[: self._encode_stop]:
            if await f.encode_data(data, end_stream) is STOP_ITERATION:
                return
        if self._encode_stop == len(self.encoders):
            self.sink.sink_data(data, end_stream)

    async def encode_trailers(self, trailers: HeaderMap) -> None:
        for f in self.encoders[: self._encode_stop]:
            if await f.encode_trailers(trailers) is STOP_ITERATION:
                return
        if self._encode_stop == len(self.encoders):
            self.sink.sink_trailers(trailers)

    def on_destroy(self) -> None:
        for f in self.decoders:
            hook: Callable[[], Awaitable[None] | None] | None = getattr(f, "on_destroy", None)
            if hook is not None:
                hook()

