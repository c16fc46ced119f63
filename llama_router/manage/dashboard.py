"""The web dashboard (`/ui/`) and the JSON it reads that the other endpoints do not give.

The page itself is static (llama_router/manage/ui/, shipped in the package) and is fed like any script would
be: `/events` for what happens (lifecycle events, and with `?requests=1` the requests waiting, running
and just finished), and these endpoints for the state at a moment:

- `GET /overview`: every model with what the router knows of it (state, footprint and its source,
  load time, restarts, TTL, back-off, saved prompt caches), each device's budget with the resident
  models stacked in it, the page-cache state of each model file (once, with the profiles using it),
  the requests now, the recent timeline;
- `GET /config`: the profiles as loaded (keys and secret-looking values never shown), the last reload;
- `GET /activity` (`?model=`, `?status=`, `?kind=`, `?limit=`, `?before=`, `?after=`) and
  `GET /activity.csv`: one row per finished request and per management call, from the SQLite
  activity log (llama_router/manage/activity.py);
- `GET /requests` and `POST /requests/<id>/cancel` (an admin endpoint): what waits and runs, and a
  way to end one (its client's connection is closed, which also stops the upstream's work on it);
- `GET /router/log` (`?lines=N`, `?follow=1`): the router's own log lines, as `/logs/<model>` does
  for a model.

The live requests and the activity rows just written are the requests board's
(llama_router/manage/board.py); the activity store is the app's, which opens and closes it.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import os
import threading
import time
from collections import deque
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from llama_router.config.schema import ResolvedProfile, RouterConfig
from llama_router.core.errors import RouterError
from llama_router.core.events import (
    DownloadProgress,
    Event,
    Failed,
    FootprintLearned,
    LoadingProgress,
    Ready,
    Reloaded,
    RequestsChanged,
    Unhealthy,
)
from llama_router.core.redact import redacted_args, redacted_env
from llama_router.core.scheduler import State
from llama_router.core.status import our_word
from llama_router.front.auth import KeyRing, is_admin
from llama_router.manage.activity import ActivityStore
from llama_router.manage.api import Api
from llama_router.manage.audit import DETAIL
from llama_router.manage.board import RequestBoard
from llama_router.manage.logging_setup import TextFormatter
from llama_router.manage.reload import reload_status
from llama_router.relay.proxy import RECORD
from llama_router.sizing.pagecache import cached_bytes
from llama_router.upstream.controller import Controller
from llama_router.upstream.logs import FollowableLog

log = logging.getLogger("llama_router.dashboard")

TIMELINE_EVENTS = 500  # lifecycle events kept for a page that opens later
LOG_TAIL = 20  # lines of a failed model's output shown with it
ROUTER_LOG_LINES = 1000
DISK_FACTS_AGE = 2.0  # seconds page-cache and saved-cache figures are reused for
_RUNNING = (State.STARTING, State.READY, State.STOPPING)


def _ui_files() -> dict[str, Path]:
    """The page's files, by name (the package's `ui/` folder, flat)."""
    folder = Path(str(resources.files("llama_router.manage") / "ui"))
    return {path.name: path for path in folder.iterdir() if path.is_file() and not path.name.startswith(".")}


# Served with every page file: no framing by other sites (clickjacking of the buttons), scripts and
# styles only from the router itself, no referrer leaving it.
UI_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
}


class _RouterLogHandler(logging.Handler):
    """Copies the router's log lines (not the access log's, which the activity log shows better)
    into a followable buffer; lines from other threads are handed to the event loop."""

    def __init__(self, buffer: FollowableLog, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.INFO)
        self.buffer = buffer
        self.loop = loop
        self.loop_thread = threading.get_ident()
        self.setFormatter(TextFormatter())

    def filter(self, record: logging.LogRecord) -> bool:
        # A filter, not a test in `emit`: a line turned away here costs no lock (one per request).
        return record.levelno >= logging.WARNING or record.name != "llama_router.access"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if threading.get_ident() == self.loop_thread:
            self.buffer.append(line)
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.buffer.append, line)


class Dashboard:
    """The page, its endpoints and the timeline; it reads the activity log and the requests board."""

    def __init__(
        self, controller: Controller, api: Api, keys: KeyRing, activity: ActivityStore, board: RequestBoard
    ) -> None:
        self.controller = controller
        self.api = api
        self.keys = keys
        self.activity = activity  # the app's: it opens and closes it
        self.board = board
        self.router_log = FollowableLog((), ROUTER_LOG_LINES)
        self.timeline: deque[dict[str, Any]] = deque(maxlen=TIMELINE_EVENTS)
        self.load_seconds: dict[str, float] = {}
        self.restarts: dict[str, int] = {}
        self._files = _ui_files()
        self._log_handler: _RouterLogHandler | None = None
        self._disk_facts: tuple[float, RouterConfig, dict[str, dict[str, Any]]] | None = None
        self._sources: dict[str, tuple[ResolvedProfile, str]] = {}
        controller.events.subscribe(self._on_event)

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._log_handler = _RouterLogHandler(self.router_log, asyncio.get_running_loop())
        logging.getLogger("llama_router").addHandler(self._log_handler)

    async def close(self) -> None:
        if self._log_handler is not None:
            logging.getLogger("llama_router").removeHandler(self._log_handler)
            self._log_handler = None

    def add_routes(self, app: web.Application) -> None:
        router = app.router
        router.add_get("/", self.root)
        router.add_get("/ui", self.to_ui)
        router.add_get("/ui/", self.page)
        router.add_get("/ui/{name}", self.page)
        router.add_get("/overview", self.overview)
        router.add_get("/config", self.config)
        router.add_get("/activity", self.activity_rows)
        router.add_get("/activity.csv", self.activity_csv)
        router.add_get("/requests", self.requests)
        router.add_post("/requests/{id}/cancel", self.cancel)
        router.add_get("/router/log", self.log)

    # ------------------------------------------------------------------------------------------ requests

    async def requests(self, _: web.Request) -> web.Response:
        return web.json_response({"requests": self.board.requests_now()})

    async def cancel(self, request: web.Request) -> web.Response:
        """End a waiting or running request: its client's connection is closed (as if it had left),
        which gives up its place in the queue or, upstream, stops the work on it."""
        try:
            live_id = int(request.match_info["id"])
        except ValueError:
            live_id = -1
        target = self.board.find(live_id)
        if target is None or target is request or not target[RECORD].for_model:
            raise RouterError(
                404, f"no request {request.match_info['id']!r} is waiting or running", code="not_found"
            )
        record = target[RECORD]
        request[RECORD].model = record.model
        request[DETAIL] = f"request {live_id} ({record.method} {record.path})"
        record.error = "cancelled"
        transport = target.transport
        if transport is not None:
            transport.abort()
        log.info("request %d (%s %s for %s) cancelled", live_id, record.method, record.path, record.model)
        return web.json_response({"success": True, "cancelled": live_id, "model": record.model})

    # ------------------------------------------------------------------------------------------ events

    def _on_event(self, event: Event) -> None:
        # Not what the timeline is for (several a second); the page reads progress from /events.
        if isinstance(event, (RequestsChanged, DownloadProgress, LoadingProgress)):
            return
        self.timeline.append(event.json())
        match event:
            case Ready(model=model, load_seconds=seconds):
                self.load_seconds[model] = seconds
            case Failed(model=model) | Unhealthy(model=model):
                self.restarts[model] = self.restarts.get(model, 0) + 1
            case FootprintLearned() | Reloaded():
                self._sources.clear()

    # ------------------------------------------------------------------------------------------ page

    async def root(self, request: web.Request) -> web.StreamResponse:
        """`GET /`: a browser is sent to the dashboard; anything else gets the usual 404."""
        if "text/html" in request.headers.get("Accept", ""):
            raise web.HTTPFound("/ui/")
        return await self.api.fallback(request)

    async def to_ui(self, _: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/ui/")

    async def page(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("name") or "index.html"
        path = self._files.get(name)
        if path is None:
            raise RouterError(404, f"no such page file: {name}", code="not_found")
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith(("javascript", "json", "svg+xml")):
            content_type += "; charset=utf-8"
        body = await asyncio.to_thread(path.read_bytes)
        return web.Response(body=body, headers={**UI_HEADERS, "Content-Type": content_type})

    # ------------------------------------------------------------------------------------------ overview

    async def overview(self, request: web.Request) -> web.Response:
        config = self.controller.config
        disk = await self._disk(config)
        models = self._models(config, disk)
        now = time.time()
        return web.json_response(
            {
                "time": now,
                "started_at": self.controller.started_at,
                "pid": os.getpid(),
                "auth": {"api_keys": bool(self.keys.keys.api), "admin_keys": bool(self.keys.keys.admin)},
                "models": models,
                "devices": self._devices(models),
                "memory_notes": self.controller.sizing.notes,
                "readahead": {"enabled": config.server.readahead, "files": _files_once(disk)},
                "requests": self.board.requests_now(),
                "timeline": list(self.timeline),
                "reload": reload_status(request.app),
            }
        )

    def _source(self, profile: ResolvedProfile) -> str:
        """Where a profile's footprint comes from: configured, learned or estimated (cached until a
        footprint is learned or the config changes, since an estimate reads the GGUF header)."""
        cached = self._sources.get(profile.name)
        if cached is None or cached[0] is not profile:
            cached = self._sources[profile.name] = (
                profile,
                self.controller.sizing.footprint_and_source(profile)[1],
            )
        return cached[1]

    def _models(self, config: RouterConfig, disk: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        now_wall, now = time.time(), self.controller.now()

        def wall(moment: float | None) -> float | None:
            if moment is None or moment == float("-inf"):
                return None
            return round(now_wall + (moment - now), 3)

        models = []
        for row, view in zip(self.controller.describe(), self.controller.views(), strict=True):
            profile = config.profiles.get(view.name)
            if profile is None:
                continue
            entry: dict[str, Any] = {
                **row,
                "status": our_word(view.state, view.standby),
                "footprint_source": self._source(profile),
                "load_seconds": self.load_seconds.get(view.name),
                "loads": view.starts,
                "restarts": self.restarts.get(view.name, 0),
                "last_used": wall(view.last_used),
                "retry_at": wall(view.retry_at),
                "ttl": profile.ttl,
                "ttl_expires_at": wall(view.ttl_expiry),
                "pinned": profile.pinned,
                "standby_profile": profile.standby,
                "priority": profile.priority,
                "aliases": list(profile.aliases),
                "description": profile.description,
                "fallback": list(profile.fallback),
                "keep_context": profile.keep_context,
                "saved_context_bytes": disk.get(view.name, {}).get("saved_context_bytes"),
            }
            progress = self.controller.load_progress(view.name)
            entry["progress"] = progress.percent if progress is not None else None  # of its load
            if view.state is State.FAILED:
                entry["log_tail"] = list(self.controller.logs[view.name])[-LOG_TAIL:]
            models.append(entry)
        return models

    def _devices(self, models: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each device's budget with the models that hold memory on it now, largest first."""
        devices = []
        for name, budget in self.controller.budgets().items():
            resident = [
                {
                    "model": model["model"],
                    "bytes": model["footprint"][name],
                    "source": model["footprint_source"],
                    "status": model["status"],
                    "progress": model["progress"],
                    "placement": model["placement"],  # where the router placed it and why, or None
                }
                for model in models
                if model["state"] in _RUNNING and model["footprint"].get(name)
            ]
            resident.sort(key=lambda item: -item["bytes"])
            devices.append({"name": name, **budget, "models": resident})
        return devices

    async def _disk(self, config: RouterConfig) -> dict[str, dict[str, Any]]:
        """Per profile: how much of its model file is in the page cache, and the size of its saved
        prompt caches; read in a thread, and reused for DISK_FACTS_AGE seconds."""
        cached = self._disk_facts
        now = time.monotonic()
        if cached is not None and cached[1] is config and now - cached[0] < DISK_FACTS_AGE:
            return cached[2]
        contexts = self.controller.contexts
        folders = {
            name: contexts.profile_dir(profile)
            for name, profile in config.profiles.items()
            if profile.keep_context
        }
        facts = await asyncio.to_thread(_disk_facts, config, folders)
        self._disk_facts = (now, config, facts)
        return facts

    # ------------------------------------------------------------------------------------------ config

    async def config(self, request: web.Request) -> web.Response:
        """The config as the router runs it: the file, the server settings (keys as counts only),
        each profile resolved (paths, command line, secret-looking values hidden; `env` values only
        for an admin key, or when no keys are set), the last reload."""
        config = self.controller.config
        server = config.server.model_dump(mode="json")
        for field in ("api_keys", "admin_keys"):
            server[field] = f"{len(server[field])} key(s)" if server[field] else []
        profiles = {}
        admin = is_admin(self.keys, request)
        for name, profile in config.profiles.items():
            entry = profile.model_dump(mode="json")
            entry["args"] = redacted_args(profile.args)
            entry["env"] = redacted_env(profile.env, values=admin)
            entry["command"] = profile.shown_command()
            profiles[name] = entry
        return web.json_response(
            {
                "path": str(config.path),
                "server": server,
                "profiles": profiles,
                "reload": reload_status(request.app),
            }
        )

    # ------------------------------------------------------------------------------------------ activity

    async def activity_rows(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            rows = await self.activity.query(
                model=query.get("model") or None,
                status=query.get("status") or None,
                kind=query.get("kind") or None,
                limit=_int(query, "limit", None) or 100,
                before=_int(query, "before", None),
                after=_int(query, "after", None),
            )
        except ValueError as exc:
            raise RouterError(400, str(exc), code="invalid_filter") from None
        return web.json_response({"activity": rows})

    async def activity_csv(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            text = await self.activity.csv(
                model=query.get("model") or None,
                status=query.get("status") or None,
                kind=query.get("kind") or None,
            )
        except ValueError as exc:
            raise RouterError(400, str(exc), code="invalid_filter") from None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return web.Response(
            text=text,
            content_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="llama-router-activity-{stamp}.csv"'},
        )

    # ------------------------------------------------------------------------------------------ logs

    async def log(self, request: web.Request) -> web.StreamResponse:
        return await self.api.stream_log(request, self.router_log)


def _int(query: Any, name: str, default: int | None) -> int | None:
    value = query.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RouterError(
            400, f"{name}: expected a whole number, got {value!r}", code="invalid_filter"
        ) from None


def _files_once(disk: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The page-cache view: each model file once, with the profiles that use it (many profiles, one
    file, is common: the same weights with other settings), in the order profiles are listed."""
    files: dict[str, dict[str, Any]] = {}
    for name, facts in disk.items():
        file = facts.get("file")
        if file:
            files.setdefault(file["path"], {**file, "profiles": []})["profiles"].append(name)
    return list(files.values())


def _disk_facts(config: RouterConfig, folders: dict[str, Path]) -> dict[str, dict[str, Any]]:
    facts: dict[str, dict[str, Any]] = {}
    measured: dict[Path, tuple[int | None, int | None]] = {}  # each file's size and cached bytes, once

    def measure(path: Path) -> tuple[int | None, int | None]:
        if path not in measured:
            size = _size(path)
            measured[path] = (size, cached_bytes(path) if size is not None else None)
        return measured[path]

    for name, profile in config.profiles.items():
        entry: dict[str, Any] = {}
        files = profile.model_files or (profile.model_path,)
        sizes = [measure(path)[0] for path in files]
        if all(size is not None for size in sizes):
            cached = [measure(path)[1] for path in files]
            entry["file"] = {
                "path": str(profile.model_path),
                "bytes": sum(size or 0 for size in sizes),
                "cached_bytes": None if None in cached else sum(part or 0 for part in cached),
            }
        folder = folders.get(name)
        if folder is not None:
            entry["saved_context_bytes"] = _folder_size(folder)
        facts[name] = entry
    return facts


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _folder_size(folder: Path) -> int:
    total = 0
    try:
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    except OSError:
        return total
    return total
