"""Which provider endpoint a request goes to, from its host and path.

Paths are matched on their tail so that base URLs with prefixes (proxies, gateways, a local test
server) work: `.../v1/chat/completions` is Chat Completions wherever it is mounted.

    kind            provider                       endpoints
    chat            openai / azure                 /chat/completions, /completions
    responses       openai / azure                 /responses, /responses/compact
    embeddings      openai / azure                 /embeddings
    transcription   openai / azure                 /audio/transcriptions, /audio/translations
    speech          openai / azure                 /audio/speech
    images          openai / azure                 /images/generations, /images/edits, /images/variations
    file_content    openai / azure                 GET /files/{id}/content (batch output, metered per line)
    batch_create    openai / azure / anthropic     POST /batches, POST /messages/batches (guarded, metered on results)
    messages        anthropic                      /messages
    batch_results   anthropic                      GET /messages/batches/{id}/results (metered per line)
    gemini          google / vertex_ai             models/{model}:generateContent, :streamGenerateContent
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Route", "route_of"]


@dataclass(frozen=True, slots=True)
class Route:
    provider: str
    kind: str
    model: str | None = None  # from the path (Gemini model, Azure deployment), else from the body
    billable: bool = True  # False: metered from what comes back, but the request itself costs nothing


_OPENAI_KINDS = (
    ("/chat/completions", "chat"),
    ("/completions", "chat"),
    ("/responses", "responses"),
    ("/responses/compact", "responses"),
    ("/embeddings", "embeddings"),
    ("/audio/transcriptions", "transcription"),
    ("/audio/translations", "transcription"),
    ("/audio/speech", "speech"),
    ("/images/generations", "images"),
    ("/images/edits", "images"),
    ("/images/variations", "images"),
)
_AZURE_DEPLOYMENT = re.compile(r"/openai/deployments/([^/]+)(/.*)$")
_GEMINI = re.compile(r"/models/([^/:]+):(generateContent|streamGenerateContent)$")
_FILE_CONTENT = re.compile(r"/files/[^/]+/content$")
_ANTHROPIC_BATCH_RESULTS = re.compile(r"/messages/batches/[^/]+/results$")


def _is_azure(host: str, path: str) -> bool:
    return path.startswith("/openai/") or host.endswith(
        (".openai.azure.com", ".cognitiveservices.azure.com", ".services.ai.azure.com")
    )


def route_of(method: str, host: str, path: str) -> Route | None:
    """The metered route of a request, or None for anything that is not a metered endpoint."""
    path = path.rstrip("/")
    if method == "POST":
        gemini = _GEMINI.search(path)
        if gemini:
            vertex = host.endswith("aiplatform.googleapis.com") or "/publishers/google/" in path
            return Route("vertex_ai" if vertex else "google", "gemini", gemini.group(1))
        if path.endswith("/messages") and "/threads/" not in path:  # not OpenAI Assistants
            return Route("anthropic", "messages")
        if path.endswith("/messages/batches"):
            return Route("anthropic", "batch_create")
        azure = _is_azure(host, path)
        deployment = None
        if azure:
            match = _AZURE_DEPLOYMENT.search(path)
            if match:
                deployment, path = match.group(1), match.group(2)
        provider = "azure" if azure else "openai"
        if path.endswith("/batches"):
            return Route(provider, "batch_create")
        for suffix, kind in _OPENAI_KINDS:
            if path.endswith(suffix):
                return Route(provider, kind, deployment)
        return None
    if method == "GET":
        if _FILE_CONTENT.search(path):
            return Route("azure" if _is_azure(host, path) else "openai", "file_content", billable=False)
        if _ANTHROPIC_BATCH_RESULTS.search(path):
            return Route("anthropic", "batch_results", billable=False)
    return None
