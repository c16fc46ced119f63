"""One log line per request (method, path, model, status, duration, bytes) and the in-flight count.

The middleware is the outermost one, so it sees the final status after errors were turned into
OpenAI-shaped answers. A response the handler returns unsent is sent here, so the duration runs to the
last byte and `bytes` is what went on the wire (headers included) for streamed and whole answers alike.

The same middleware counts requests in flight: a graceful shutdown waits for that count to reach zero.
A handler that serves a long-lived stream which should not hold up a shutdown (an `/events` feed)
calls `mark_long_lived(request)`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

log = logging.getLogger("llama_router.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Paths polled by monitors: logged at DEBUG so they do not drown the request log.
QUIET_PATHS = frozenset({"/health", "/metrics"})
# The model id the client asked for, recorded on the request by the handler that read it.
MODEL_KEY: web.RequestKey[str] = web.RequestKey("llama_router.model", str)
LEGACY_MODEL_KEY = "model"  # the same, as a plain string key
_COUNTED: web.RequestKey[bool] = web.RequestKey("llama_router.counted", bool)
_BODY_PEEK_LIMIT = 4 * 1024 * 1024  # bytes of an already-read body we will parse for its model
CLIENT_CLOSED = 499  # status logged when the client went away before the answer was complete


class InFlight:
    """Requests being handled right now, with an event for 'none left' (a shutdown waits on it)."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        self.count += 1
        self._idle.clear()

    def end(self) -> None:
        self.count -= 1
        if self.count <= 0:
            self.count = 0
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


IN_FLIGHT: web.AppKey[InFlight] = web.AppKey("in_flight", InFlight)


def mark_long_lived(request: web.Request) -> None:
    """Exclude this request from the in-flight count a shutdown drains (for endless streams)."""
    tracker = request.app.get(IN_FLIGHT)
    if request.get(_COUNTED) and tracker is not None:
        request[_COUNTED] = False
        tracker.end()


async def _model_of(request: web.Request, *, peek_body: bool = True) -> str | None:
    """The model the request named: as the proxy recorded it, else `?model=`, else its JSON body."""
    model = request.get(MODEL_KEY) or request.get(LEGACY_MODEL_KEY)
    if isinstance(model, str):
        return model
    if (query := request.query.get("model")) is not None:
        return query
    # A body the handler already read completely is cached by aiohttp: reading it again is free.
    if (
        peek_body
        and request.method == "POST"
        and request.body_exists
        and not request.can_read_body
        and (request.content_length or 0) <= _BODY_PEEK_LIMIT
    ):
        try:
            payload = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError, web.HTTPException):
            return None
        if isinstance(payload, dict) and isinstance(payload.get("model"), str):
            return str(payload["model"])
    return None


def _level(path: str, status: int) -> int:
    if status >= 500 and status != CLIENT_CLOSED:
        return logging.WARNING
    return logging.DEBUG if path in QUIET_PATHS else logging.INFO


def _log_line(
    method: str,
    path: str,
    level: int,
    model: str | None,
    status: int,
    started: float,
    sent: int,
    client: str | None,
) -> None:
    duration_ms = (time.perf_counter() - started) * 1000
    fields = {
        "method": method,
        "path": path,
        "model": model,
        "status": status,
        "duration_ms": round(duration_ms, 2),
        "bytes": sent,
        "client": client,
    }
    log.log(
        level,
        "%s %s model=%s status=%s duration_ms=%.1f bytes=%d",
        method,
        path,
        model or "-",
        status,
        duration_ms,
        sent,
        extra={"fields": fields},
    )


def log_request(
    method: str, path: str, model: str | None, status: int, started: float, sent: int, client: str | None
) -> None:
    """The line for a request served outside aiohttp (the fast lane); `started` is a perf_counter."""
    level = _level(path, status)
    if log.isEnabledFor(level):
        _log_line(method, path, level, model, status, started, sent, client)


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Log one line when the request ends, however it ends; keep the in-flight count."""
    started = time.perf_counter()
    tracker = request.app.get(IN_FLIGHT)
    if tracker is not None:
        tracker.begin()
        request[_COUNTED] = True
    status = 500
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        status = response.status
        if not response.prepared:
            await response.prepare(request)
        await response.write_eof()  # a no-op when the handler already ended the stream
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        status = CLIENT_CLOSED
        raise
    finally:
        if tracker is not None and request.get(_COUNTED):
            request[_COUNTED] = False
            tracker.end()
        # Nothing is looked up or built for a line the log level drops.
        level = _level(request.path, status)
        if log.isEnabledFor(level):
            sent = response.body_length if response is not None and response.prepared else 0
            model = request.get(MODEL_KEY)
            if not isinstance(model, str):
                model = await _model_of(request, peek_body=status != CLIENT_CLOSED)
            _log_line(request.method, request.path, level, model, status, started, sent, request.remote)
