"""Incremental readers for what passes through the transport: content decoding and SSE events.

Both work chunk by chunk on bytes the caller is reading anyway; nothing is held back from the
caller, and only the current incomplete line is kept.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

__all__ = ["SSEParser", "decoder_for"]

Decoder = Callable[[bytes], bytes]


def _zlib(wbits: int) -> Decoder:
    d = zlib.decompressobj(wbits)
    return d.decompress


def _deflate() -> Decoder:
    # "deflate" is zlib-wrapped in practice, raw in some servers: try zlib first, like httpx does.
    state: dict[str, Any] = {"d": zlib.decompressobj(), "first": True}

    def decode(data: bytes) -> bytes:
        if state["first"]:
            state["first"] = False
            try:
                return bytes(state["d"].decompress(data))
            except zlib.error:
                state["d"] = zlib.decompressobj(-zlib.MAX_WBITS)
        return bytes(state["d"].decompress(data))

    return decode


def _brotli() -> Decoder | None:
    for name in ("brotli", "brotlicffi"):
        try:
            module: Any = __import__(name)
        except ImportError:
            continue
        d = module.Decompressor()
        fn = getattr(d, "process", None) or d.decompress
        return fn  # type: ignore[no-any-return]
    return None


def _zstd() -> Decoder | None:
    try:
        import zstandard  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    d = zstandard.ZstdDecompressor().decompressobj()
    return d.decompress  # type: ignore[no-any-return]


def decoder_for(content_encoding: str | None) -> Decoder | None:
    """A chunk decoder for a Content-Encoding value; identity -> a no-op; unknown -> None."""
    if not content_encoding:
        return _identity
    steps: list[Decoder] = []
    for raw in reversed(content_encoding.split(",")):
        name = raw.strip().lower()
        if name in ("", "identity"):
            continue
        if name in ("gzip", "x-gzip"):
            steps.append(_zlib(zlib.MAX_WBITS | 16))
        elif name == "deflate":
            steps.append(_deflate())
        elif name == "br":
            step = _brotli()
            if step is None:
                return None
            steps.append(step)
        elif name == "zstd":
            step = _zstd()
            if step is None:
                return None
            steps.append(step)
        else:
            return None
    if not steps:
        return _identity
    if len(steps) == 1:
        return steps[0]

    def chain(data: bytes) -> bytes:
        for step in steps:
            data = step(data)
        return data

    return chain


def _identity(data: bytes) -> bytes:
    return data


class SSEParser:
    """Server-sent events from byte chunks: `feed(chunk)` returns the events it completed."""

    __slots__ = ("_data", "_event", "_partial")

    def __init__(self) -> None:
        self._partial = b""
        self._event: str | None = None
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[tuple[str | None, bytes]]:
        if not chunk:
            return []
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        events: list[tuple[str | None, bytes]] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append((self._event, b"\n".join(self._data)))
                self._event, self._data = None, []
            elif line[0] == 0x3A:  # ":" comment / keep-alive
                continue
            else:
                field, _, value = line.partition(b":")
                if value[:1] == b" ":
                    value = value[1:]
                if field == b"data":
                    self._data.append(value)
                elif field == b"event":
                    self._event = value.decode("utf-8", "replace")
        return events

    def close(self) -> list[tuple[str | None, bytes]]:
        """Events left when the stream ends without a final blank line."""
        tail = self.feed(b"\n\n") if self._partial or self._data else []
        return tail
