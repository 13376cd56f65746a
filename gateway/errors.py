"""Refusals in each provider's own error shape, so its SDK raises its usual exception.

    status  OpenAI (type / code)                   Anthropic type          Gemini status
    400     invalid_request_error                  invalid_request_error   INVALID_ARGUMENT
    401     invalid_request_error / invalid_api_key authentication_error   UNAUTHENTICATED
    403     permission_error / model_not_allowed    permission_error        PERMISSION_DENIED
    404     invalid_request_error / not_found       not_found_error         NOT_FOUND
    413     invalid_request_error / too_large       request_too_large       INVALID_ARGUMENT
    429     budget_exceeded | requests | tokens     rate_limit_error        RESOURCE_EXHAUSTED
    502     upstream_error                          api_error               UNAVAILABLE
    503     gateway_unavailable                     overloaded_error        UNAVAILABLE

The official SDKs map the HTTP status to their exception classes (openai.AuthenticationError,
anthropic.PermissionDeniedError, ...); the body gives the message and, for spendstream's own
refusals, the detail (scope, reason, window, limits) as extra fields.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from aiohttp import web

__all__ = ["Family", "error_response"]

Family = Literal["openai", "anthropic", "gemini"]

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    502: "api_error",
    503: "overloaded_error",
}
_GEMINI_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
}
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "gateway_unavailable",
}


def error_body(
    family: Family,
    status: int,
    message: str,
    *,
    code: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON error document `family`'s API would send for `status`."""
    extra = dict(detail or {})
    if family == "anthropic":
        error = {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message, **extra}
        return {"type": "error", "error": error}
    if family == "gemini":
        return {
            "error": {
                "code": status,
                "message": message,
                "status": _GEMINI_STATUS.get(status, "INTERNAL"),
                **extra,
            }
        }
    return {
        "error": {
            "message": message,
            "type": code if status == 429 and code else _OPENAI_TYPES.get(status, "api_error"),
            "param": None,
            "code": code,
            **extra,
        }
    }


def error_response(
    family: Family,
    status: int,
    message: str,
    *,
    code: str | None = None,
    detail: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    retry: bool = True,
) -> web.Response:
    """A JSON error response. `retry=False` adds `x-should-retry: false`: the Stainless SDKs
    (openai, anthropic) then raise at once instead of retrying a refusal that will not change."""
    out = dict(headers or {})
    if not retry:
        out["x-should-retry"] = "false"
    body = json.dumps(error_body(family, status, message, code=code, detail=detail), separators=(",", ":"))
    return web.Response(status=status, body=body.encode(), content_type="application/json", headers=out)
