"""Wiring: builds the aiohttp application from a config and runs it."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .access_log import IN_FLIGHT, InFlight, access_log
from .api import Api
from .auth import KeyRing, Keys, auth_middleware, resolve_keys, warn_if_open
from .config import RouterConfig
from .controller import Controller
from .errors import RouterError, error_response
from .fastlane import FastLane
from .metrics import CONTENT_TYPE_LATEST as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .proxy import MODEL_GET_PATHS, MODEL_POST_PATHS, Proxy
from .reload import RELOADER, ConfigReloader, reload_status, watching
from .sdnotify import Notifier
from .stale import remove_stale

log = logging.getLogger("llama_router")

CONTROLLER: web.AppKey[Controller] = web.AppKey("controller", Controller)
PROXY: web.AppKey[Proxy] = web.AppKey("proxy", Proxy)
API: web.AppKey[Api] = web.AppKey("api", Api)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
KEYS: web.AppKey[KeyRing] = web.AppKey("keys", KeyRing)

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


def build_app(config: RouterConfig) -> web.Application:
    """The router's aiohttp application for `config` (not yet listening)."""
    key_ring = KeyRing(resolve_keys(config.server))
    warn_if_open(key_ring.keys, config.server.host)
    # Always installed: a reload may add keys to a router that started without any.
    middlewares: list[Any] = [access_log, openai_errors, auth_middleware(key_ring)]
    app = web.Application(middlewares=middlewares, client_max_size=256 * 1024 * 1024)
    controller = Controller(config)
    metrics = Metrics(controller)
    proxy = Proxy(controller, metrics)

    def strip_auth_while_keys_are_set(keys: Keys) -> None:
        proxy.strip_auth = keys.enabled

    key_ring.subscribe(strip_auth_while_keys_are_set)
    api = Api(controller, proxy)
    app[KEYS] = key_ring
    app[CONTROLLER] = controller
    app[PROXY] = proxy
    app[API] = api
    app[METRICS] = metrics

    async def on_startup(_: web.Application) -> None:
        await controller.start()
        await proxy.start()

    async def on_shutdown(_: web.Application) -> None:
        await api.close_streams()

    async def on_cleanup(_: web.Application) -> None:
        await api.close()
        # The config of now (a reload may have changed it): saving prompt caches, then stopping.
        current = controller.config
        stop = max(p.stop_timeout for p in current.profiles.values())
        await controller.close(grace=current.server.context_save_timeout + stop + 1)
        await proxy.close()
        metrics.close()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)

    async def health(request: web.Request) -> web.Response:
        body: dict[str, Any] = {"status": "ok"}
        reload = reload_status(request.app)
        if reload is not None:
            body["reload"] = reload
        return web.json_response(body)

    async def metrics_page(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_page)
    api.add_routes(app)
    for path in MODEL_POST_PATHS:
        app.router.add_post(path, proxy.handle_post)
    for path in MODEL_GET_PATHS:
        app.router.add_get(path, proxy.handle_get)
    app.router.add_route("*", "/{tail:.*}", api.fallback)
    return app


# Allocations (less frees) between young-generation collections; Python's default is 700.
GC_YOUNG_THRESHOLD = 10_000
# Seconds aiohttp gives requests still running after the drain (long-lived streams) before cancelling them.
_CANCEL_GRACE = 1.0


def _settle_garbage_collector() -> None:
    """Keep what start-up built (the config, aiohttp, pydantic, prometheus...: it lives as long as the
    router) out of the cyclic collector's scans, and collect young garbage less often: requests make
    many short-lived objects, and full collections over the whole heap were the router's longest
    pauses under load."""
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, second, third)


async def _watchdog(notifier: Notifier, interval: float) -> None:
    """WATCHDOG=1 from the event loop itself: a blocked loop stops the pings and systemd restarts us."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


async def serve(
    config: RouterConfig,
    *,
    ready: Callable[[], None] | None = None,
    loader: Callable[[], RouterConfig] | None = None,
) -> None:
    """Listen until SIGTERM or SIGINT, then drain requests and stop every upstream.

    Before listening, upstreams a dead router left behind are removed. SIGHUP, or a change of the
    config file, reloads it (`loader` reads it again; default: the same file). Under systemd
    (`Type=notify`) it sends READY=1 once the port accepts connections, WATCHDOG=1 when asked,
    RELOADING=1 around reloads and STOPPING=1 when the shutdown starts. A second SIGTERM/SIGINT stops
    waiting for requests in flight.
    """
    notifier = Notifier.from_environment()
    app = build_app(config)
    in_flight = InFlight()
    app[IN_FLIGHT] = in_flight
    reloader = ConfigReloader(app[CONTROLLER], config, loader=loader, notifier=notifier, keys=app[KEYS])
    app[RELOADER] = reloader
    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()
    background: set[asyncio.Task[Any]] = set()

    def on_stop(name: str) -> None:
        if stop.is_set():
            log.warning("%s again: not waiting for requests in flight any longer", name)
            force.set()
        else:
            log.info("%s received: shutting down", name)
            stop.set()

    listening = False
    hangup_pending = False

    def on_hangup() -> None:
        nonlocal hangup_pending
        if not listening:  # the start-up is still under way: reload once it is done
            hangup_pending = True
            return
        task = asyncio.create_task(reloader.reload("SIGHUP"))
        background.add(task)
        task.add_done_callback(background.discard)

    # First of all: a signal during start-up must not kill the router with its default action.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig.name)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        removed = await asyncio.to_thread(remove_stale, config.server.stop_timeout)
    except Exception:  # a failed scan must not keep the router from serving
        log.exception("looking for stale upstreams failed")
        removed = []
    if removed:
        log.warning("removed %d stale upstream process(es) of an earlier router", len(removed))

    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=_CANCEL_GRACE)
    lane: FastLane | None = None
    listener: asyncio.Server | None = None
    try:
        await runner.setup()
        assert runner.server is not None
        if config.server.fast_lane:
            lane = FastLane(app[CONTROLLER], app[PROXY], app[METRICS], app[KEYS], in_flight, runner.server)
            listener = await loop.create_server(
                lane, config.server.host, config.server.port, reuse_address=True
            )
            addresses = [socket.getsockname() for socket in listener.sockets]
        else:
            site = web.TCPSite(runner, config.server.host, config.server.port, reuse_address=True)
            await site.start()
            addresses = runner.addresses
    except BaseException:
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        raise
    urls = ", ".join(f"http://{address[0]}:{address[1]}" for address in addresses)
    log.info("llama-router listening on %s", urls, extra={"fields": {"event": "listening", "urls": urls}})
    _settle_garbage_collector()

    # Pings go on through the shutdown, which may take server.shutdown_timeout seconds.
    watchdog: asyncio.Task[None] | None = None
    if notifier.watchdog_interval is not None:
        watchdog = asyncio.create_task(_watchdog(notifier, notifier.watchdog_interval))
    notifier.ready(f"serving {len(config.profiles)} profile(s) on {urls}")
    listening = True
    if hangup_pending:
        on_hangup()
    if ready is not None:
        ready()
    try:
        async with watching(reloader):
            await stop.wait()
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        notifier.stopping("draining requests, then stopping upstreams")
        started = time.monotonic()
        for task in list(background):  # reloads under way
            task.cancel()
        # No new connections; keep-alive connections close once their current request is answered.
        if listener is not None:
            listener.close()
        if lane is not None:
            lane.shutdown()
        for running_site in list(runner.sites):
            await running_site.stop()
        if runner.server is not None:
            runner.server.pre_shutdown()
        timeout = reloader.config.server.shutdown_timeout
        if in_flight.count and not force.is_set():
            log.info("draining %d request(s) in flight, up to %.0fs", in_flight.count, timeout)
            waits = [asyncio.ensure_future(in_flight.wait_idle()), asyncio.ensure_future(force.wait())]
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waits:
                waiter.cancel()
        if in_flight.count:
            log.warning("cancelling %d request(s) still in flight", in_flight.count)
        if lane is not None:
            lane.abort()
        await runner.cleanup()
        if watchdog is not None:
            watchdog.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("stopped in %.2fs", time.monotonic() - started)
