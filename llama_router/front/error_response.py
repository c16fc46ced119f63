"""OpenAI-shaped errors (core/errors.py) as the aiohttp responses a client gets."""

from __future__ import annotations

import json
import math

from aiohttp import web

from llama_router.core.errors import RouterError, error_body


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    type: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(error_body(status, message, code=code, type=type)).encode(),
        content_type="application/json",
        headers=headers,
    )


def router_error_response(error: RouterError) -> web.Response:
    """A RouterError's answer, with `Retry-After` when it says when to come back."""
    retry = error.retry_after
    headers = {"Retry-After": str(max(1, math.ceil(retry)))} if retry else None
    return error_response(error.status, error.message, code=error.code, type=error.type, headers=headers)
