"""The router's CORS policy: which web pages (origins) may call it from a browser and read the answer.

None by default: the clients the router serves (Open WebUI's server, Hermes Agent, SDKs, curl) are
not browsers and send no `Origin`. llama-server's own CORS headers (it allows every origin) are
never passed on (request_rules.ANSWER_DROP); `server.cors_origins` lists the origins allowed instead
(`*` for any), and only those get `Access-Control-Allow-Origin` and answers to their preflights.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

Origins = Callable[[], Sequence[str]]
ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
PREFLIGHT_MAX_AGE = "600"


def allowed_origin(origin: str | None, origins: Sequence[str]) -> bool:
    """Whether a page of `origin` may call the router (`origins`: `server.cors_origins`)."""
    if not origin or not origins:
        return False
    return "*" in origins or origin.rstrip("/").lower() in (
        allowed.rstrip("/").lower() for allowed in origins
    )


def preflight_check(origins: Origins) -> Callable[[web.Request], web.StreamResponse | None]:
    """The check answering a browser's preflight (`OPTIONS` with `Access-Control-Request-Method`)
    from an allowed origin; any other request goes on as it is (None). The router's one middleware
    runs it."""

    def preflight(request: web.Request) -> web.StreamResponse | None:
        if (
            request.method == "OPTIONS"
            and "Access-Control-Request-Method" in request.headers
            and allowed_origin(request.headers.get("Origin"), origins())
        ):
            headers = {
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", ""),
                "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
            }
            return web.Response(status=204, headers=headers)
        return None

    return preflight


def cors_headers(origins: Origins) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """The `on_response_prepare` hook that marks each answer to an allowed origin as readable by it
    (streams included: it runs before their headers go out)."""

    async def mark(request: web.Request, response: web.StreamResponse) -> None:
        allowed = origins()
        if allowed:
            origin = request.headers.get("Origin")
            if allowed_origin(origin, allowed):
                assert origin is not None
                response.headers["Access-Control-Allow-Origin"] = origin
                response.headers["Vary"] = "Origin"

    return mark
