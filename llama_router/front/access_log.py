"""One log line per request (method, path, model, status, duration, bytes) and the in-flight count.

Both read the request's `RequestRecord` (llama_router/relay/request_rules.py), which the router's outermost
middleware (llama_router/app.py) makes when a request arrives and hands here when its last byte is out,
so the duration runs to that byte and `bytes` is what went on the wire (head included).

A graceful shutdown waits for the in-flight count to reach zero. A handler that serves a long-lived
stream which should not hold up a shutdown (an `/events` feed) calls `mark_long_lived(request)`.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from llama_router.core.errors import printable
from llama_router.relay.proxy import RECORD
from llama_router.relay.request_rules import CLIENT_CLOSED, RequestRecord

log = logging.getLogger("llama_router.access")

# Paths polled by monitors: logged at DEBUG so they do not drown the request log.
QUIET_PATHS = frozenset({"/health", "/metrics"})


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
    record = request[RECORD]
    if not record.long_lived:
        record.long_lived = True
        request.app[IN_FLIGHT].end()


def log_request(request: web.Request, record: RequestRecord) -> None:
    """The access line of a request that has ended; nothing is built for a line the level drops."""
    status = record.status
    path = record.path
    if status >= 500 and status != CLIENT_CLOSED:
        level = logging.WARNING
    else:
        level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
    if not log.isEnabledFor(level):
        return
    # A model named in the path or the query, by endpoints that did not record one.
    model = record.model or request.query.get("model") or request.match_info.get("model")
    if model is not None and model is not record.model:
        model = printable(model)  # (the record's is made safe by the router's outer middleware)
    log.handle(AccessRecord(level, record, model, request.remote))


# What every access record holds alike: no arguments, no exception, no caller (a record made with
# `logging._srcfile` off, as the router's logging setup has it, names none either).
_ALIKE = {
    name: value
    for name, value in vars(logging.LogRecord(log.name, logging.INFO, "", 0, "", (), None)).items()
    if name not in ("msg", "levelname", "levelno", "created", "msecs", "relativeCreated")
}


class AccessRecord(logging.LogRecord):
    """An access line's log record, made here rather than by `Logger.log`: the same attributes as
    any record, and its structured fields in `fields` (as `extra=` gives other records), without the
    per-call work `makeRecord` does for a line whose caller, file and arguments are always the same.
    `fields` is made only when a formatter or handler reads it (the JSON format does, the text one
    does not)."""

    __slots__ = ("_line",)  # what `fields` is made of: out of `vars()`, which the JSON format reports

    def __init__(self, level: int, record: RequestRecord, model: str | None, client: str | None) -> None:
        # Stamped with the request's end, not with the moment its line is written (RequestEnds
        # gathers ended requests for a few milliseconds first).
        created = record.end_time()
        self.__dict__.update(_ALIKE)
        duration_ms = record.duration() * 1000
        # Written whole: a message without arguments is not formatted again by each handler.
        self.msg = (
            f"{record.method} {record.path} model={model or '-'} status={record.status} "
            f"duration_ms={duration_ms:.1f} bytes={record.sent}"
        )
        self.levelno = level
        self.levelname = logging.getLevelName(level)
        self.created = created
        self.msecs = int((created - int(created)) * 1000) + 0.0
        self.relativeCreated = (created - logging._startTime) * 1000  # type: ignore[attr-defined]
        self._line = (record.method, record.path, model, record.status, duration_ms, record.sent, client)

    @property
    def fields(self) -> dict[str, object]:
        method, path, model, status, duration_ms, sent, client = self._line
        return {
            "method": method,
            "path": path,
            "model": model,
            "status": status,
            "duration_ms": round(duration_ms, 2),
            "bytes": sent,
            "client": client,
        }
