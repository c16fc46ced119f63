"""Wiring: builds the aiohttp application from a config and runs it."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .config import RouterConfig
from .controller import Controller
from .errors import RouterError, error_response
from .proxy import MODEL_GET_PATHS, MODEL_POST_PATHS, Proxy

log = logging.getLogger("llama_router")

CONTROLLER: web.AppKey[Controller] = web.AppKey("controller", Controller)
PROXY: web.AppKey[Proxy] = web.AppKey("proxy", Proxy)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into an OpenAI-shaped error; no traceback ever reaches a client."""
    try:
        return await handler(request)
    except RouterError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        message = f"{exc.reason}: {request.method} {request.path}" if exc.status in (404, 405) else exc.text
        return error_response(exc.status, message or exc.reason, code=code)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal router error; see the router's log", code="internal_error")


def _models_list(controller: Controller) -> dict[str, Any]:
    created = int(controller.started_at)
    states = {view.name: view.state.value for view in controller.scheduler.views()}
    data = []
    for name, profile in controller.config.profiles.items():
        data.append(
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "llama-router",
                "aliases": list(profile.aliases),
                "description": profile.description,
                "status": {"value": _status_value(states[name])},
            }
        )
    return {"object": "list", "data": data}


def _status_value(state: str) -> str:
    return {"ready": "loaded", "starting": "loading", "stopping": "unloading", "cold": "unloaded"}.get(
        state, state
    )


def build_app(config: RouterConfig) -> web.Application:
    """The router's aiohttp application for `config` (not yet listening)."""
    app = web.Application(middlewares=[openai_errors], client_max_size=256 * 1024 * 1024)
    controller = Controller(config)
    proxy = Proxy(controller)
    app[CONTROLLER] = controller
    app[PROXY] = proxy

    async def on_startup(_: web.Application) -> None:
        await controller.start()
        await proxy.start()

    async def on_cleanup(_: web.Application) -> None:
        await controller.close(grace=max(p.stop_timeout for p in config.profiles.values()) + 1)
        await proxy.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)

    async def models(_: web.Request) -> web.Response:
        return web.json_response(_models_list(controller))

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def running(_: web.Request) -> web.Response:
        return web.json_response(
            {"running": [row for row in controller.describe() if row["state"] != "cold"]}
        )

    async def unload_all(_: web.Request) -> web.Response:
        names = [row["model"] for row in controller.describe() if row["state"] in ("starting", "ready")]
        for name in names:
            controller.unload(name)
        return web.json_response({"unloading": names})

    async def not_found(request: web.Request) -> web.Response:
        return error_response(404, f"no such endpoint: {request.method} {request.path}", code="not_found")

    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/running", running)
    app.router.add_post("/unload", unload_all)
    for path in MODEL_POST_PATHS:
        app.router.add_post(path, proxy.handle_post)
    for path in MODEL_GET_PATHS:
        app.router.add_get(path, proxy.handle_get)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


async def serve(config: RouterConfig, *, ready: Callable[[], None] | None = None) -> None:
    """Listen on the configured address until SIGTERM or SIGINT, then shut down cleanly."""
    app = build_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port, reuse_address=True)
    await site.start()
    log.info("llama-router listening on http://%s:%s", config.server.host, config.server.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready()
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        started = time.monotonic()
        await runner.cleanup()
        log.info("stopped in %.2fs", time.monotonic() - started)
