"""Wiring: builds the aiohttp application from a config, and runs it.

`RouterServer` is the router as a server, in three steps as uvicorn's `Server` has them: `start`
(listen), `serve` (until asked to stop) and `shutdown` (stop listening, drain requests in flight,
stop every upstream). `serve()` runs one under the process's signals and systemd; the tests start
theirs the same way, without signals.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web

from llama_router.config.schema import ConfigError, RouterConfig
from llama_router.config.state import prepare_state_dir, state_dir
from llama_router.config.tls import server_context
from llama_router.core.errors import RouterError, printable
from llama_router.front.access_log import IN_FLIGHT, InFlight, log_request
from llama_router.front.auth import KeyRing, Keys, key_accepted, key_check, resolve_keys, warn_if_open
from llama_router.front.browser_guard import browser_check, own_host
from llama_router.front.client_limits import (
    LINGER,
    MIB,
    BodyBudget,
    BodyHold,
    BodyLimits,
    CappedSite,
    connection_cap,
    raise_fd_limit,
)
from llama_router.front.cors import cors_headers, preflight_check
from llama_router.front.error_response import error_response, router_error_response
from llama_router.manage.activity import ActivityStore
from llama_router.manage.api import Api
from llama_router.manage.board import RequestBoard
from llama_router.manage.dashboard import Dashboard
from llama_router.manage.metrics import CONTENT_TYPE_LATEST as METRICS_CONTENT_TYPE
from llama_router.manage.metrics import Metrics
from llama_router.manage.reload import RELOADER, ConfigReloader, reload_status, watching
from llama_router.manage.request_ends import RequestEnds
from llama_router.manage.sdnotify import Notifier
from llama_router.relay.proxy import RECORD, Proxy
from llama_router.relay.request_rules import CLIENT_CLOSED, MODEL_GET_PATHS, MODEL_POST_PATHS, RequestRecord
from llama_router.upstream.controller import Controller
from llama_router.upstream.stale import remove_stale

log = logging.getLogger("llama_router")

CONTROLLER: web.AppKey[Controller] = web.AppKey("controller", Controller)
PROXY: web.AppKey[Proxy] = web.AppKey("proxy", Proxy)
API: web.AppKey[Api] = web.AppKey("api", Api)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
KEYS: web.AppKey[KeyRing] = web.AppKey("keys", KeyRing)
DASHBOARD: web.AppKey[Dashboard] = web.AppKey("dashboard", Dashboard)
BODY_BUDGET: web.AppKey[BodyBudget] = web.AppKey("body_budget", BodyBudget)
ENDS: web.AppKey[RequestEnds] = web.AppKey("request_ends", RequestEnds)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
# A rule a request meets before its handler runs: the answer that ends it there (a refusal, a
# preflight's), or None to go on.
Check = Callable[[web.Request], web.StreamResponse | None]
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _error_response(request: web.Request, exc: Exception) -> web.StreamResponse:
    """A failure as an OpenAI-shaped answer; no traceback ever reaches a client."""
    if isinstance(exc, RouterError):
        return router_error_response(exc)
    if isinstance(exc, web.HTTPException):
        path = printable(request.path)
        message = f"{exc.reason}: {request.method} {path}" if exc.status in (404, 405) else exc.text
        return error_response(exc.status, message or exc.reason, code=_HTTP_CODES.get(exc.status))
    log.error("unhandled error on %s %s", request.method, printable(request.path), exc_info=exc)
    return error_response(500, "internal router error; see the router's log", code="internal_error")


def each_request(
    in_flight: InFlight,
    board: RequestBoard,
    ends: RequestEnds,
    checks: Sequence[Check],
    bodies: BodyLimits,
) -> Middleware:
    """The router's one middleware: every request's record, from its arrival to its last byte.

    It counts the request in flight, applies `checks` in order (the browser guard, CORS preflights,
    keys: the first answer ends the request there), has `bodies` take the body within its limits
    (waiting only for one that did not come whole with its head), calls the handler, turns failures
    into OpenAI-shaped answers, sends an answer the handler returned unsent, and when the request
    ends (however it ends) hands it to `ends`, which counts it in the metrics and the activity log
    (requests for a model) and writes its access line. One middleware rather than one per rule, and
    no coroutine of its own for a body in hand: each layer of aiohttp's chain, and each coroutine,
    costs every request its calls."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        # The path (decoded) and the model are the client's words: escaped and capped for every reader.
        record = RequestRecord(request.method, printable(request.path), time.perf_counter())
        request[RECORD] = record
        in_flight.begin()
        board.request_started(request, record)
        response: web.StreamResponse | None = None
        body: BodyHold | None = None
        try:
            try:
                for check in checks:
                    response = check(request)
                    if response is not None:
                        break
                else:
                    body = bodies.hold(request)
                    if body is not None and not body.whole:
                        await body.read_rest()
                    response = await handler(request)
            except RouterError as exc:
                record.error = exc.code
                response = _error_response(request, exc)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                response = _error_response(request, exc)
            except ConnectionResetError:
                raise
            except Exception as exc:
                response = _error_response(request, exc)
            record.status = response.status
            if not response.prepared:
                await response.prepare(request)
            await response.write_eof()  # a no-op when the handler already ended the stream
            return response
        except web.HTTPException as exc:
            record.status = exc.status
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            record.status = CLIENT_CLOSED
            raise
        finally:
            if body is not None:
                body.give_back()
            if not record.long_lived:
                in_flight.end()
            if response is not None and response.prepared:
                record.sent = response.body_length
            if record.model is not None:
                record.model = printable(record.model)
            ends.add(request, record)

    return middleware


def build_app(config: RouterConfig) -> web.Application:
    """The router's aiohttp application for `config` (not yet listening)."""
    key_ring = KeyRing(resolve_keys(config.server))
    warn_if_open(key_ring.keys, config.server.host)
    controller = Controller(config)
    metrics = Metrics(controller)
    in_flight = InFlight()
    proxy = Proxy(controller)
    api = Api(controller, proxy)
    activity = ActivityStore(state_dir(config) / "activity.sqlite3")
    board = RequestBoard(activity, key_ring, controller.events)
    dashboard = Dashboard(controller, api, key_ring, activity, board)
    body_budget = BodyBudget(lambda: int(controller.config.server.max_body_total_mb * MIB))
    # Keys are always checked: a reload may add keys to a router that started without any.
    checks = (
        browser_check(key_ring, lambda: controller.config.server),
        preflight_check(lambda: controller.config.server.cors_origins),
        key_check(key_ring),
    )
    bodies = BodyLimits(
        lambda: int(controller.config.server.max_body_mb * MIB),
        lambda: controller.config.server.body_timeout,
        body_budget,
    )
    ends = RequestEnds((metrics.request_ended, board.request_ended, log_request))
    middlewares: list[Any] = [each_request(in_flight, board, ends, checks, bodies)]
    app = web.Application(middlewares=middlewares, client_max_size=int(config.server.max_body_mb * MIB))

    def strip_auth_while_keys_are_set(keys: Keys) -> None:
        proxy.strip_auth = keys.enabled

    key_ring.subscribe(strip_auth_while_keys_are_set)
    app[KEYS] = key_ring
    app[CONTROLLER] = controller
    app[PROXY] = proxy
    app[API] = api
    app[METRICS] = metrics
    app[IN_FLIGHT] = in_flight
    app[DASHBOARD] = dashboard
    app[BODY_BUDGET] = body_budget
    app[ENDS] = ends

    async def on_startup(_: web.Application) -> None:
        await activity.open()
        await dashboard.start()
        await controller.start()

    async def on_shutdown(_: web.Application) -> None:
        await api.close_streams()

    async def on_cleanup(_: web.Application) -> None:
        ends.flush()  # the requests drained (or cancelled) are recorded before their upstreams stop
        await api.close()
        # The config of now (a reload may have changed it): saving prompt caches, then stopping.
        current = controller.config
        stop = max(p.stop_timeout for p in current.profiles.values())
        await controller.close(grace=current.server.context_save_timeout + stop + 1)
        metrics.close()
        await dashboard.close()
        board.close()
        await activity.close()

    app.on_startup.append(on_startup)
    app.on_response_prepare.append(cors_headers(lambda: controller.config.server.cors_origins))
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)

    async def health(request: web.Request) -> web.Response:
        """Up or not, for anyone; the reload state (the config's path, its errors) only for a client
        with a key, or, without keys, one that names the router by one of its own names."""
        body: dict[str, Any] = {"status": "ok"}
        server = controller.config.server
        if key_accepted(key_ring, request) or (
            not key_ring.enabled and own_host(request.host, server.host, server.allowed_hosts)
        ):
            reload = reload_status(request.app)
            if reload is not None:
                body["reload"] = reload
        return web.json_response(body)

    async def metrics_page(request: web.Request) -> web.StreamResponse:
        """The router's metrics; with `?model=`, that model's own (llama-server's `--metrics`)."""
        if request.query.get("model"):
            return await api.model_read(request)
        ends.flush()  # the requests that ended just now count
        return web.Response(body=metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_page)
    api.add_routes(app)
    dashboard.add_routes(app)
    for path in MODEL_POST_PATHS:
        app.router.add_post(path, proxy.handle_post)
    for path in MODEL_GET_PATHS:
        app.router.add_get(path, api.model_read)
    app.router.add_route("*", "/{tail:.*}", api.fallback)
    return app


# Seconds aiohttp gives requests still running after the drain (long-lived streams) before cancelling them.
_CANCEL_GRACE = 1.0


class RouterServer:
    """The router listening on its address: `start`, `serve`, `shutdown` (see the module's doc)."""

    def __init__(
        self,
        config: RouterConfig,
        *,
        loader: Callable[[], RouterConfig] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier or Notifier(None)
        try:
            self.tls = server_context(config.server)  # None: plain HTTP
        except ConfigError as exc:
            raise ConfigError(f"{config.path}: {exc}") from None
        self.app = build_app(config)
        self.reloader = ConfigReloader(
            self.app[CONTROLLER],
            config,
            loader=loader,
            notifier=self.notifier,
            keys=self.app[KEYS],
            tls=self.tls,
        )
        self.app[RELOADER] = self.reloader
        self.reloader.audit = self.app[DASHBOARD].board.config_reloaded
        self.runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=_CANCEL_GRACE,
            keepalive_timeout=config.server.idle_timeout,  # also bounds the wait for a first request
            lingering_time=LINGER,
        )
        self.should_exit = asyncio.Event()
        self.force_exit = asyncio.Event()  # stop waiting for requests in flight
        self.urls = ""
        self.max_connections = 0  # client connections open at once (set when it starts listening)
        self._reloads: set[asyncio.Task[Any]] = set()

    @property
    def controller(self) -> Controller:
        return self.app[CONTROLLER]

    @property
    def port(self) -> int:
        """The port it listens on (the one the kernel chose, for port 0)."""
        return int(self.runner.addresses[0][1])

    async def start(self) -> None:
        """Start the controller and listen on the configured host and port (once the state
        directory is known to be usable: StateDirError says which and why otherwise)."""
        server = self.config.server
        prepare_state_dir(self.config)
        fd_limit = raise_fd_limit()
        self.max_connections = connection_cap(server.max_connections, fd_limit)
        log.debug("open files: up to %d; client connections: up to %d", fd_limit, self.max_connections)
        try:
            await self.runner.setup()
            site = CappedSite(
                self.runner,
                server.host,
                server.port,
                limit=self.max_connections,
                reuse_address=True,
                ssl_context=self.tls,
            )
            await site.start()
        except BaseException:
            await self.runner.cleanup()
            raise
        scheme = "https" if self.tls is not None else "http"
        self.urls = ", ".join(f"{scheme}://{address[0]}:{address[1]}" for address in self.runner.addresses)
        log.info(
            "llama-router listening on %s",
            self.urls,
            extra={"fields": {"event": "listening", "urls": self.urls}},
        )

    def reload(self, trigger: str) -> None:
        """Reload the config file in the background (a SIGHUP)."""
        task = asyncio.create_task(self.reloader.reload(trigger))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    def stop(self, *, force: bool = False) -> None:
        """Ask `serve` to return; `force`: the shutdown does not wait for requests in flight."""
        self.should_exit.set()
        if force:
            self.force_exit.set()

    async def serve(self) -> None:
        """Serve until `stop()`, reloading the config file when it changes."""
        async with watching(self.reloader):
            await self.should_exit.wait()

    async def shutdown(self) -> None:
        """Stop listening; let requests in flight finish for up to `server.shutdown_timeout` (not
        waiting once `force_exit` is set); then end what is left and stop every upstream."""
        started = time.monotonic()
        for task in list(self._reloads):  # reloads under way
            task.cancel()
        # No new connections; keep-alive connections close once their current request is answered.
        for site in list(self.runner.sites):
            await site.stop()
        if self.runner.server is not None:
            self.runner.server.pre_shutdown()
        in_flight = self.app[IN_FLIGHT]
        timeout = self.reloader.config.server.shutdown_timeout
        if in_flight.count and not self.force_exit.is_set():
            log.info("draining %d request(s) in flight, up to %.0fs", in_flight.count, timeout)
            waits = [
                asyncio.ensure_future(in_flight.wait_idle()),
                asyncio.ensure_future(self.force_exit.wait()),
            ]
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waits:
                waiter.cancel()
        if in_flight.count:
            log.warning("cancelling %d request(s) still in flight", in_flight.count)
        await self.runner.cleanup()
        log.info("stopped in %.2fs", time.monotonic() - started)


# Allocations (less frees) between young-generation collections; Python's default is 700.
GC_YOUNG_THRESHOLD = 10_000


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
    server = RouterServer(config, loader=loader, notifier=notifier)
    loop = asyncio.get_running_loop()
    listening = False
    hangup_pending = False

    def on_stop(name: str) -> None:
        if server.should_exit.is_set():
            log.warning("%s again: not waiting for requests in flight any longer", name)
            server.stop(force=True)
        else:
            log.info("%s received: shutting down", name)
            server.stop()

    def on_hangup() -> None:
        nonlocal hangup_pending
        if not listening:  # the start-up is still under way: reload once it is done
            hangup_pending = True
            return
        server.reload("SIGHUP")

    # First of all: a signal during start-up must not kill the router with its default action.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig.name)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        try:
            removed = await asyncio.to_thread(remove_stale, config.server.stop_timeout)
        except Exception:  # a failed scan must not keep the router from serving
            log.exception("looking for stale upstreams failed")
            removed = []
        if removed:
            log.warning("removed %d stale upstream process(es) of an earlier router", len(removed))
        await server.start()
    except BaseException:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        raise
    _settle_garbage_collector()

    # Pings go on through the shutdown, which may take server.shutdown_timeout seconds.
    watchdog: asyncio.Task[None] | None = None
    if notifier.watchdog_interval is not None:
        watchdog = asyncio.create_task(_watchdog(notifier, notifier.watchdog_interval))
    notifier.ready(f"serving {len(config.profiles)} profile(s) on {server.urls}")
    listening = True
    if hangup_pending:
        on_hangup()
    if ready is not None:
        ready()
    try:
        await server.serve()
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        notifier.stopping("draining requests, then stopping upstreams")
        await server.shutdown()
        if watchdog is not None:
            watchdog.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
