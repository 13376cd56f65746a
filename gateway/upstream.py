"""The providers behind the gateway: where each one is, its master key, and what passes between.

A master key lives in an `Upstream` (repr hides it) and leaves the process only in the header of
the request to its provider: never in a log line, an error, an event or a response.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import Family

__all__ = [
    "DEFAULT_BASE_URLS",
    "Upstream",
    "UsageChunkFilter",
    "client_secret",
    "request_headers",
    "response_headers",
]

# the SDKs' own base URLs: OpenAI's includes /v1, the others' paths start with their version
DEFAULT_BASE_URLS: dict[Family, str] = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
}

# request headers a client may send on to the provider (everything else stays at the gateway:
# its auth, cookies, X-Spendstream-*, the provider account's organisation/project headers)
_FORWARD_REQUEST = frozenset(
    {"content-type", "accept", "anthropic-version", "anthropic-beta", "openai-beta", "user-agent"}
)
# response headers a client gets from the provider (request ids for support tickets, timings)
_FORWARD_RESPONSE = frozenset(
    {"content-type", "x-request-id", "request-id", "openai-processing-ms", "anthropic-organization-id"}
)


@dataclass(frozen=True, slots=True)
class Upstream:
    family: Family
    base_url: str
    api_key: str | None = field(default=None, repr=False)

    def url(self, path: str, query: str) -> str:
        """`path` is the gateway's request path (/v1/chat/completions, /v1/messages, /v1beta/...)."""
        tail = path[len("/v1") :] if self.family == "openai" and path.startswith("/v1/") else path
        return self.base_url.rstrip("/") + tail + (f"?{query}" if query else "")

    def auth_headers(self) -> dict[str, str]:
        if self.api_key is None:
            return {}
        if self.family == "anthropic":
            return {"x-api-key": self.api_key}
        if self.family == "gemini":
            return {"x-goog-api-key": self.api_key}
        return {"authorization": f"Bearer {self.api_key}"}


def client_secret(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The internal key a client sent, wherever its SDK puts it: `Authorization: Bearer` (OpenAI),
    `x-api-key` (Anthropic), `x-goog-api-key` or `?key=` (Gemini)."""
    for name in ("x-api-key", "x-goog-api-key"):
        value = headers.get(name)
        if value:
            return value.strip()
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return query.get("key") or None


def request_headers(incoming: CIMultiDictProxy[str], upstream: Upstream) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict((k, v) for k, v in incoming.items() if k.lower() in _FORWARD_REQUEST)
    out.update(upstream.auth_headers())
    out["accept-encoding"] = "identity"  # streams are read (metered, filtered) as they pass
    return out


def response_headers(incoming: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in incoming.items() if k.lower() in _FORWARD_RESPONSE}


class UsageChunkFilter:
    """Drops the usage-only chunk from an OpenAI chat stream whose client did not ask for usage.

    The gateway asks the provider for it (`stream_options.include_usage`) to meter the call
    exactly; the client that did not ask must not see it. Events are passed on whole as soon as
    their blank line arrives (an SSE event is never split across what the client receives, and
    nothing waits for more than the rest of the event it is in).
    """

    def __init__(self) -> None:
        self._pending = b""
        self.dropped = 0

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        end = max(data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n"))
        if end < 0:
            self._pending = data
            return b""
        cut = end + (4 if data[end : end + 4] == b"\r\n\r\n" else 2)
        self._pending = data[cut:]
        return self._without_usage(data[:cut])

    def close(self) -> bytes:
        rest, self._pending = self._pending, b""
        return self._without_usage(rest)

    def _without_usage(self, block: bytes) -> bytes:
        if b'"usage"' not in block:
            return block
        kept: list[bytes] = []
        for event in block.replace(b"\r\n", b"\n").split(b"\n\n"):
            if event.strip() and self._is_usage_only(event):
                self.dropped += 1
                continue
            kept.append(event)
        return b"\n\n".join(kept)

    @staticmethod
    def _is_usage_only(event: bytes) -> bool:
        data = b"".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
        if not data.startswith(b"{"):
            return False
        try:
            doc = json.loads(data)
        except ValueError:
            return False
        return isinstance(doc, dict) and doc.get("choices") == [] and isinstance(doc.get("usage"), dict)
