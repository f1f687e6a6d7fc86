"""The llhttp codec against the h11 reference: same bytes in, same events (or both refuse)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.http.codec import h1, h1_fast
from proxy.http.codec.events import CodecError, ConnectionClosed, Data, RequestHeaders

_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
_VALUE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ;=/,.", max_size=20).map(str.strip)
_BODY = st.binary(max_size=64)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]))
    path = "/" + draw(st.text(alphabet="abcxyz019/_-.?=&", max_size=20))
    lines = [f"{method} {path} HTTP/1.1", "Host: example.com"]
    for _ in range(draw(st.integers(0, 5))):
        lines.append(f"{draw(_TOKEN)}: {draw(_VALUE)}")
    body = draw(_BODY)
    framing = draw(st.sampled_from(["none", "length", "chunked", "both", "bad-length"]))
    tail = b""
    if framing == "length" or framing == "both":
        lines.append(f"Content-Length: {len(body)}")
    if framing == "bad-length":
        lines.append(f"Content-Length: {len(body)}x")
    if framing == "chunked" or framing == "both":
        lines.append("Transfer-Encoding: chunked")
        tail = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    elif framing in ("length", "bad-length"):
        tail = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + tail


def _events(codec_cls: type, raw: bytes, split: int) -> list | str:
    codec = codec_cls()
    out: list = []
    try:
        for chunk in (raw[:split], raw[split:]):
            if chunk:
                codec.receive_data(chunk)
            while (ev := codec.next_event()) is not None:
                if isinstance(ev, ConnectionClosed):
                    return out
                if isinstance(ev, Data) and out and isinstance(out[-1], bytes):
                    out[-1] += ev.data
                elif isinstance(ev, Data):
                    out.append(ev.data)
                elif isinstance(ev, RequestHeaders):
                    out.append((ev.headers.items(), ev.end_stream))
                else:
                    out.append(type(ev).__name__)
    except CodecError:
        return "refused"
    return out


@settings(max_examples=300, deadline=None)
@given(requests(), st.integers(min_value=0, max_value=400))
def test_llhttp_codec_agrees_with_h11(raw: bytes, split: int) -> None:
    split = min(split, len(raw))
    ref = _events(h1.Http1ServerCodec, raw, split)
    fast = _events(h1_fast.Http1ServerCodec, raw, split)
    if ref == "refused" or fast == "refused":
        # llhttp is stricter in places (duplicate identical Content-Length): it may refuse
        # what h11 accepts, never the reverse.
        assert fast == "refused", (ref, fast)
        return
    assert fast == ref
