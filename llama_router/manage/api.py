"""Management endpoints: model lists, load and unload, running upstreams, events, logs, raw upstream access.

Shapes follow the clients that read them: `/v1/models` is OpenAI's list with llama-server's
`status.value` and a context length (Hermes Agent reads `context_length`/`n_ctx`, and `owned_by:
"llamacpp"` makes it read `/props?model=` of loaded models); `/models`, `/models/load` and
`/models/unload` are llama-server router mode's (Open WebUI's llama.cpp connection); `/running`,
`/unload` and `/upstream/<model>/...` are llama-swap's. Lists are answered from memory: listing never
loads or swaps anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import aiohttp
from aiohttp import web

from llama_router import __version__
from llama_router.config.schema import ResolvedProfile
from llama_router.core.errors import RouterError, printable
from llama_router.core.events import (
    DownloadFailed,
    DownloadFinished,
    DownloadProgress,
    Event,
    Failed,
    Loading,
    LoadingProgress,
    ModelRemoved,
    Ready,
    Reloaded,
    RequestsChanged,
    Stopped,
)
from llama_router.core.scheduler import ProfileView, State
from llama_router.core.status import client_status, our_word, view_word
from llama_router.front.access_log import mark_long_lived
from llama_router.manage.audit import DETAIL
from llama_router.manage.model_manager import ModelManager
from llama_router.manage.model_reads import not_running, props_from_memory, slots_from_memory
from llama_router.manage.reload import RELOADER
from llama_router.relay.proxy import RECORD, Proxy
from llama_router.relay.request_rules import MODEL_READ_PATHS, model_in_body, model_in_query
from llama_router.sizing.context_window import Window, learned, profile_window
from llama_router.upstream.controller import Controller
from llama_router.upstream.logs import FollowableLog

log = logging.getLogger("llama_router.api")

KEEPALIVE = 15.0  # seconds between keep-alive comments on idle event streams
PROPS_TIMEOUT = 5.0  # seconds to read a freshly loaded model's `/props`
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_RUNNING = (State.STARTING, State.READY, State.STOPPING)


# ---------------------------------------------------------------------------------------------- helpers


def _positive_int(value: Any) -> int | None:
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


# ---------------------------------------------------------------------------------------------- logs


def _flag(request: web.Request, name: str, default: bool = False) -> bool:
    value = request.query.get(name)
    return default if value is None else value.lower() in ("1", "true", "yes", "on")


def _transport_closed(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def native_event(event: Event) -> dict[str, Any] | None:
    """An event as llama-server's router mode words it on `/models/sse` (None: it has no such one)."""
    match event:
        case Loading(model=model):
            return {"model": model, "event": "status_change", "data": {"status": "loading"}}
        case LoadingProgress(model=model, progress=progress):
            return {
                "model": model,
                "event": "status_change",
                "data": {"status": "loading", "progress": progress},
            }
        case Ready(model=model):
            return {"model": model, "event": "status_change", "data": {"status": "loaded"}}
        case Stopped(model=model):
            return {"model": model, "event": "status_change", "data": {"status": "unloaded", "exit_code": 0}}
        case Failed(model=model, reason=reason):
            data = {"status": "unloaded", "exit_code": 1, "failed": True, "reason": reason.splitlines()[0]}
            return {"model": model, "event": "status_change", "data": data}
        case DownloadProgress(model=model, file=file, done=done, total=total):
            progress = {"progress": {file: {"done": done, "total": total}}}
            return {"model": model, "event": "download_progress", "data": progress}
        case DownloadFinished(model=model):
            return {"model": model, "event": "download_finished", "data": {}}
        case DownloadFailed(model=model, reason=reason):
            return {"model": model, "event": "download_failed", "data": {"reason": reason}}
        case ModelRemoved(model=model):
            return {"model": model, "event": "model_remove", "data": {}}
        case Reloaded():
            return {"model": "*", "event": "models_reload"}
    return None


# ---------------------------------------------------------------------------------------------- api


class Api:
    """The management endpoints of one router."""

    def __init__(self, controller: Controller, proxy: Proxy) -> None:
        self.controller = controller
        self.proxy = proxy
        self._closing = False
        self._event_queues: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._log_followers: set[asyncio.Event] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._config: Any = None
        self._static: dict[str, dict[str, Any]] = {}
        # Windows llama-server reported on `/props` once loaded, with the profile they were read for.
        self._learned: dict[str, tuple[ResolvedProfile, Window]] = {}
        # The whole `/props` each model gave at its last load, with the profile it was read for.
        self._last_props: dict[str, tuple[ResolvedProfile, dict[str, Any]]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.manager = ModelManager(controller)
        self._entries()
        controller.events.subscribe(self._on_event)

    def _entries(self) -> dict[str, dict[str, Any]]:
        """Everything but the status of each model's entry: fixed until the config is reloaded or a
        model reports its context, so computed then (the GGUF is read once) and only copied per answer."""
        config = self.controller.config
        if config is not self._config:
            created = int(self.controller.started_at)
            static: dict[str, dict[str, Any]] = {}
            for name, profile in config.profiles.items():
                static[name] = {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "llamacpp",
                    "aliases": list(profile.aliases),
                    "description": profile.description,
                    "can_remove": profile.removable,
                    "source": profile.origin,
                    **self._context_fields(profile),
                }
            self._static, self._config = static, config
        return self._static

    def window(self, profile: ResolvedProfile) -> Window | None:
        """The context window one request to `profile` gets: what its llama-server said on `/props`
        when it last loaded with this same profile, else computed from its arguments."""
        learned_for = self._learned.get(profile.name)
        if learned_for is not None and learned_for[0] == profile and profile.context_length is None:
            return learned_for[1]
        return profile_window(profile)

    def _context_fields(self, profile: ResolvedProfile) -> dict[str, Any]:
        """The entry's context fields: `context_length` and `n_ctx` (read by Hermes Agent and other
        clients), `meta` as llama-server's own `/v1/models` has it, and `context` with the detail."""
        window = self.window(profile)
        if window is None:
            return {}
        meta = {"n_ctx": window.per_request, **({"n_ctx_train": window.train} if window.train else {})}
        return {
            "context_length": window.per_request,
            "n_ctx": window.per_request,
            "meta": meta,
            "context": window.json(),
        }

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Ready):
            task = asyncio.ensure_future(self._read_window(event.model))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _read_window(self, name: str) -> None:
        """Ask a model that just loaded what context its slots have (`/props`): the figure clients
        are told from then on, since `--fit` or rope scaling can make it differ from the estimate."""
        upstream = self.controller.upstreams.get(name)
        if upstream is None:
            return
        profile = upstream.profile
        if self._session is None:
            # No idle connection is kept open to an upstream: one read per load.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True),
                timeout=aiohttp.ClientTimeout(total=PROPS_TIMEOUT),
            )
        try:
            session = upstream.client(self._session)  # its own session when it is on a Unix socket
            timeout = aiohttp.ClientTimeout(total=PROPS_TIMEOUT)
            async with session.get(upstream.base_url + "/props", timeout=timeout) as response:
                props = await response.json(content_type=None) if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("could not read /props of %s: %s", name, exc)
            return
        if not isinstance(props, dict):
            return
        self._last_props[name] = (profile, props)
        estimate = profile_window(profile)
        window = learned(estimate, props)
        if window is None:
            return
        if estimate is not None and estimate.per_request != window.per_request:
            log.info(
                "%s: llama-server gives each request %d tokens of context (estimated %d)",
                name,
                window.per_request,
                estimate.per_request,
            )
        self._learned[name] = (profile, window)
        self._config = None  # the entries are rebuilt with it on the next answer

    @property
    def event_subscribers(self) -> int:
        """Open `/events` streams (each holds one controller subscription)."""
        return len(self._event_queues)

    @property
    def log_followers(self) -> int:
        """Open `/logs/<model>?follow=1` streams."""
        return len(self._log_followers)

    def add_routes(self, app: web.Application) -> None:
        router = app.router
        router.add_get("/v1/models", self.models)
        router.add_get("/models", self.native_models)
        router.add_post("/models", self.add_model)
        router.add_delete("/models", self.remove_model)
        router.add_get("/models/sse", self.models_sse)
        router.add_get("/props", self.props)
        router.add_get("/v1/models/{model:.+}", self.model)
        router.add_post("/models/load", self.load)
        router.add_post("/models/unload", self.unload)
        router.add_get("/running", self.running)
        router.add_get("/placement", self.placement)
        router.add_post("/unload", self.unload_all)  # POST only: a page's link or image cannot unload
        router.add_route("*", "/upstream", self.upstream)
        router.add_route("*", "/upstream/{tail:.*}", self.upstream)
        router.add_get("/events", self.events)
        router.add_get("/logs/{model:.+}", self.logs)

    async def close_streams(self) -> None:
        """On shutdown: end event and log streams, which would otherwise hold the server open."""
        self._closing = True
        for queue in self._event_queues:
            with contextlib.suppress(asyncio.QueueFull):  # a full queue's reader sees `_closing` next
                queue.put_nowait(None)
        for follower in self._log_followers:
            follower.set()

    async def close(self) -> None:
        """Cancel background loads still waiting."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        await self.manager.close()
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------------------------------------ lists

    def _status(self, view: ProfileView) -> dict[str, Any]:
        """A model's `status` on the lists clients read (`/v1/models`, `/models`, `/v1/models/<id>`,
        the answers of load and unload): router mode's word in `value`, ours in `detail`; while it
        loads, `progress` as its llama-server reports it."""
        status = client_status(view_word(view), view.last_error)
        if progress := self.controller.load_progress(view.name):
            status["progress"] = progress.payload
        return status

    def model_entry(self, view: ProfileView) -> dict[str, Any]:
        static = self._entries().get(view.name) or {"id": view.name, "object": "model"}
        entry = dict(static)
        entry["status"] = self._status(view)
        # Bytes per device it uses (learned once loaded) or is expected to use (configured or estimated).
        entry["memory"] = {device: amount for device, amount in view.footprint.items() if device != "slots"}
        if view.placed is not None:  # where the router placed it at its last start, and why
            entry["placement"] = view.placed.describe()
        return entry

    def models_payload(self) -> dict[str, Any]:
        """The OpenAI model list with each model's status, in llama-server router mode's words, then
        the models being downloaded."""
        data = [self.model_entry(view) for view in self.controller.views()]
        return {"object": "list", "data": data + self.manager.pending()}

    async def models(self, _: web.Request) -> web.Response:
        """The local models, then the peers' (`<peer>/<model>`, from their last listing: never waits),
        whose part is kept serialised: a peer's long list costs a copy here, not a build."""
        data = json.dumps(self.models_payload()["data"]).encode()
        peers = self.controller.peers.listing()
        if peers:  # spliced into the list: `[local..., peers...]`
            data = data[:-1] + (b", " if data != b"[]" else b"") + peers + b"]"
        return web.Response(
            body=b'{"object": "list", "data": ' + data + b"}", content_type="application/json"
        )

    async def native_models(self, _: web.Request) -> web.Response:
        return web.json_response(self.models_payload())

    async def add_model(self, request: web.Request) -> web.Response:
        """`POST /models {"model": "<org>/<repo>[:<quant>]"}` (router mode's "Download Model"): the
        download starts and this answers at once; `/events` and `/models/sse` follow it, and the
        model is listed as `downloading` until its profile is in place."""
        model, payload = model_in_body(await request.read())
        request[RECORD].model = model
        name = await self.manager.add(payload, self._reloader(request))
        return web.json_response({"success": True, "model": name, "status": {"value": "downloading"}})

    async def remove_model(self, request: web.Request) -> web.Response:
        """`DELETE /models?model=<name>` (router mode's "Delete Model"): removes a profile POST /models
        created and the files downloaded for it that no other profile uses (`?delete_files=0` keeps
        them: Open WebUI's dialog promises the delete and sends no such flag); a hand-written profile
        is refused (403)."""
        model = request.query.get("model")
        if not model:
            raise RouterError(400, "add ?model=<name> to say which model to remove", code="missing_model")
        request[RECORD].model = model
        answer = await self.manager.remove(
            model,
            self._reloader(request),
            delete_files=_flag(request, "delete_files", default=True),
        )
        return web.json_response(answer)

    @staticmethod
    def _reloader(request: web.Request) -> Callable[[str], Awaitable[bool]]:
        reloader = request.app.get(RELOADER)
        if reloader is None:
            raise RouterError(
                503, "models cannot be added or removed without the config reloader", code="unavailable"
            )
        return reloader.reload

    async def props(self, request: web.Request) -> web.StreamResponse:
        """`/props?model=<name>`: that model's own `/props`. Bare `/props` answers as llama-server's
        router mode does (tools/server/server-models.cpp): `role: router` and a placeholder for the
        fields a single model would fill, so clients probing for llama.cpp recognise it without
        loading anything, and it is no client error."""
        if request.query.get("model"):
            return await self.model_read(request)
        server = self.controller.config.server
        return web.json_response(
            {
                "role": "router",
                "max_instances": server.max_resident or 0,
                "models_autoload": True,
                "model_alias": "llama-server",
                "model_path": "none",
                "default_generation_settings": {"params": {}, "n_ctx": 0},
                "build_info": f"llama-router {__version__}",
            }
        )

    async def model_read(self, request: web.Request) -> web.StreamResponse:
        """`GET <read-only path>?model=<id>`: the model's own answer while it is loaded or loading;
        otherwise what the router knows, without loading it (model_reads.py)."""
        model = model_in_query(request.path, request.query.get("model"))
        request[RECORD].model = model
        name = self.proxy.route_for(model)
        profile = self.controller.config.profiles.get(name)
        view = self.controller.view(name) if profile is not None else None
        if profile is None or view is None or view.state in (State.STARTING, State.READY):
            return await self.proxy.handle_get(request)
        window = self.window(profile)
        if request.path == "/props":
            last = self._last_props.get(name)
            kept = last[1] if last is not None and last[0] == profile else None
            return web.json_response(props_from_memory(profile, window, kept, self._status(view)))
        if request.path == "/slots":
            return web.json_response(slots_from_memory(window))
        raise not_running(name, request.path)

    async def model(self, request: web.Request) -> web.Response:
        wanted = request.match_info["model"]
        if (pending := self.manager.pending(wanted)) and self.controller.config.resolve_name(wanted) is None:
            return web.json_response(pending[0])  # being downloaded
        name = self.proxy.route_for(wanted)
        if name not in self.controller.config.profiles:  # a peer's model
            found = self.controller.peers.entry(wanted, name)
            if found is None:
                raise RouterError(404, f"model '{printable(wanted)}' is not listed", code="model_not_found")
            return web.json_response(found)
        return web.json_response(self.model_entry(self.controller.view(name)))

    async def running(self, _: web.Request) -> web.Response:
        rows = []
        for row, view in zip(self.controller.describe(), self.controller.views(), strict=True):
            if view.state in _RUNNING:
                rows.append({**row, "status": our_word(view.state, view.standby)})
        return web.json_response(
            {
                "running": rows,
                "budgets": self.controller.budgets(),
                "memory_notes": self.controller.sizing.notes,
                "peers": self.controller.peers.describe(),
            }
        )

    async def placement(self, request: web.Request) -> web.Response:
        """`/placement?model=<name>`: where that model would go if it started now, and what it would
        stop to make room. A dry run: nothing starts or stops."""
        model = request.query.get("model")
        if not model:
            raise RouterError(400, "give the model to place: /placement?model=<name>", code="missing_model")
        return web.json_response(self.controller.where(self.proxy.profile_for(model)))

    # ------------------------------------------------------------------------------------------ control

    async def _model_of(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        return await self.proxy.model_in_body(request)

    def _wants_wait(self, request: web.Request, payload: dict[str, Any]) -> bool:
        return _flag(request, "wait") or payload.get("wait") is True

    def _answer(self, name: str, **extra: Any) -> web.Response:
        view = self.controller.view(name)
        return web.json_response({"success": True, "model": name, "status": self._status(view), **extra})

    async def load(self, request: web.Request) -> web.Response:
        """Start loading a model (making room as a request would). Answers at once, as llama-server
        does; with `?wait=1` (or `"wait": true`) answers when it is loaded, or with the load's 503."""
        name, payload = await self._model_of(request)
        if self._wants_wait(request, payload):
            await self.controller.load(name)
            return self._answer(name)
        view = self.controller.view(name)
        if view.state not in (State.READY, State.STARTING) or view.draining:
            task = asyncio.ensure_future(self._load_in_background(name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            await asyncio.sleep(0)  # let the load register, so the answer already says "loading"
        return self._answer(name)

    async def _load_in_background(self, name: str) -> None:
        try:
            await self.controller.load(name)
        except RouterError as exc:
            log.warning("load of %s failed: %s", name, exc.message.splitlines()[0])

    async def unload(self, request: web.Request) -> web.Response:
        """Unload a model; requests in flight finish first unless `"force": true`. With `?wait=1`
        (or `"wait": true`) answers once its process is gone."""
        name, payload = await self._model_of(request)
        self.controller.unload(name, force=payload.get("force") is True)
        if self._wants_wait(request, payload):
            await self._wait_unloaded([name])
        return self._answer(name)

    async def unload_all(self, request: web.Request) -> web.Response:
        """Unload every model (llama-swap's `/unload`); `?wait=1` waits for their processes to end."""
        names = [view.name for view in self.controller.views() if view.state in _RUNNING]
        force = _flag(request, "force")
        for name in names:
            self.controller.unload(name, force=force)
        request[DETAIL] = ", ".join(names) or "nothing was loaded"
        if _flag(request, "wait"):
            await self._wait_unloaded(names)
        return web.json_response({"success": True, "unloading": names})

    async def _wait_unloaded(self, names: list[str]) -> None:
        server = self.controller.config.server
        timeout = server.drain_timeout + max(
            (self.controller.config.profiles[name].stop_timeout for name in names), default=0
        )
        done = await self._wait_for(
            lambda: all(self.controller.view(name).state in (State.COLD, State.FAILED) for name in names),
            timeout + 5,
        )
        if not done:
            raise RouterError(
                504, f"{', '.join(names)} did not unload within {timeout + 5:g}s", code="unload_timeout"
            )

    async def _wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until `condition()` holds, re-checking after each lifecycle event."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        # call_soon: the controller updates the scheduler right after it emits, in the same step.
        def on_event(_: Event) -> None:
            loop.call_soon(changed.set)

        unsubscribe = self.controller.events.subscribe(on_event)
        try:
            deadline = loop.time() + timeout
            while not condition():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                changed.clear()
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except TimeoutError:
                    return condition()
            return True
        finally:
            unsubscribe()

    async def upstream(self, request: web.Request) -> web.StreamResponse:
        """`/upstream/<model>/<path>`: any method, path and query sent as they are to that model's own
        llama-server (loaded first if needed), for its web UI, `/slots`, `/metrics` and the like."""
        # One path: the raw one, split into segments, each decoded to route it (as aiohttp matched it);
        # the rest is forwarded as it came. `%2F` inside the first two segments names nothing.
        parts = request.rel_url.raw_path.split("/", 3)  # "", "upstream", <model>, <path>
        if len(parts) < 3 or unquote(parts[1]) != "upstream" or not parts[2]:
            raise RouterError(404, "name a model: /upstream/<model>/<path>", code="not_found")
        name = self.proxy.profile_for(unquote(parts[2]))
        path = "/" + (parts[3] if len(parts) > 3 else "")
        if request.rel_url.raw_query_string:
            path += "?" + request.rel_url.raw_query_string
        body = await request.read() if request.body_exists else None
        return await self.proxy.forward(request, name, body or None, path=path)

    # ------------------------------------------------------------------------------------------ streams

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Lifecycle events as SSE: a snapshot of every model's status first, then `loading`, `ready`
        (with `load_seconds`), `stopping` (with its reason), `stopped`, `failed` (with the log tail),
        and the downloads of POST /models (`download_progress`, `download_finished`, ...).
        With `?requests=1` also `requests`: what waits and runs, and the activity rows of requests
        that ended (the dashboard's feed; sent a few times a second at most)."""
        with_requests = _flag(request, "requests")

        def translate(event: Event) -> dict[str, Any] | None:
            if not with_requests and isinstance(event, RequestsChanged):
                return None
            return event.json()

        snapshot = {
            "event": "snapshot",
            "time": time.time(),
            "models": [
                # Our own words here, as on the dashboard (which reads this stream).
                {"model": view.name, "status": {**self._status(view), "value": view_word(view)}}
                for view in self.controller.views()
            ],
            "peers": self.controller.peers.describe(),
        }
        return await self._stream_events(request, translate, snapshot)

    async def models_sse(self, request: web.Request) -> web.StreamResponse:
        """llama-server router mode's `/models/sse`: status changes and download progress in its
        shapes (`{"model", "event", "data"}`)."""
        return await self._stream_events(request, native_event)

    async def _stream_events(
        self,
        request: web.Request,
        translate: Callable[[Event], dict[str, Any] | None],
        first: dict[str, Any] | None = None,
    ) -> web.StreamResponse:
        """Send lifecycle events as SSE `data:` lines (as `translate` words them; None: skipped)
        until the client leaves or the router shuts down."""
        mark_long_lived(request)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=1000)
        overflow = False

        def listener(event: Event) -> None:
            nonlocal overflow
            payload = translate(event)
            if payload is None:
                return
            try:
                queue.put_nowait(payload)
            except asyncio.QueueFull:
                overflow = True  # a reader this slow is dropped rather than buffered without bound

        response = web.StreamResponse(headers=_SSE_HEADERS)
        unsubscribe = self.controller.events.subscribe(listener)
        self._event_queues.add(queue)
        try:
            await response.prepare(request)
            if first is not None:
                await response.write(b"data: " + json.dumps(first).encode() + b"\n\n")
            while not self._closing and not overflow:
                try:
                    event = await asyncio.wait_for(queue.get(), KEEPALIVE)
                except TimeoutError:
                    if _transport_closed(request):
                        break
                    await response.write(b": keepalive\n\n")
                    continue
                if event is None:
                    break
                await response.write(b"data: " + json.dumps(event, default=str).encode() + b"\n\n")
            if overflow:
                await response.write(b": too slow; closing\n\n")
        finally:
            unsubscribe()
            self._event_queues.discard(queue)
        await response.write_eof()
        return response

    async def logs(self, request: web.Request) -> web.StreamResponse:
        """A model's buffered output (see `stream_log`)."""
        name = self.proxy.profile_for(request.match_info["model"])
        return await self.stream_log(request, self.controller.logs[name])

    async def stream_log(self, request: web.Request, buffer: FollowableLog) -> web.StreamResponse:
        """A log buffer as text (`?lines=N` for the last N); `?follow=1` keeps the answer open and
        streams new lines as they are written, until the client leaves."""
        lines = list(buffer)
        count = _positive_int(request.query.get("lines"))
        if count is not None:
            lines = lines[-count:]
        text = "".join(line + "\n" for line in lines)
        if not _flag(request, "follow"):
            return web.Response(text=text, content_type="text/plain")
        mark_long_lived(request)
        response = web.StreamResponse(
            headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache"}
        )
        wake = asyncio.Event()
        buffer.followers.add(wake)
        self._log_followers.add(wake)
        seen = buffer.total
        try:
            await response.prepare(request)
            if text:
                await response.write(text.encode())
            while not self._closing:
                try:
                    await asyncio.wait_for(wake.wait(), KEEPALIVE)
                except TimeoutError:
                    if _transport_closed(request):
                        break
                    continue
                wake.clear()
                new, seen = buffer.total - seen, buffer.total
                if new <= 0:
                    continue
                current = list(buffer)
                out = ""
                if new > len(current):
                    out = f"[llama-router] {new - len(current)} lines were dropped from the buffer\n"
                    new = len(current)
                out += "".join(line + "\n" for line in current[-new:])
                await response.write(out.encode())
        finally:
            buffer.followers.discard(wake)
            self._log_followers.discard(wake)
        await response.write_eof()
        return response

    # ------------------------------------------------------------------------------------------ fallback

    async def fallback(self, request: web.Request) -> web.StreamResponse:
        """Unknown paths: a 404, never a catch-all 200, so clients probing for other server types
        (`/api/tags`, `/api/v1/models`) are not misled; a GET with `?model=` reaches a model's own
        server only on `MODEL_READ_PATHS`, which have routes of their own."""
        message = f"no such endpoint: {request.method} {printable(request.path)}"
        if request.query.get("model"):
            message += (
                f"; with ?model= only {', '.join(MODEL_READ_PATHS)} reach a model's own server "
                "(/upstream/<model>/... reaches the rest, with an admin key)"
            )
        raise RouterError(404, message, code="not_found")
