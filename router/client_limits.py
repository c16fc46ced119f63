"""What one client may hold of the router: connections, file descriptors, body bytes and time.

Without limits a busy or hostile client could starve everyone: a thousand idle or trickling
connections used up the process's 1024 file descriptors until `/health` failed, a body was read
whole however large, and a truncated body held its connection forever. So:

- the soft `RLIMIT_NOFILE` is raised to the hard limit at start;
- at most `server.max_connections` client connections are open at once (by default half the
  descriptors, up to 8192); one past the cap is answered and closed at once: `GET /health` with
  200 (the router is up), anything else with 503 `too_many_connections`;
- a connection must send a whole request head within `server.idle_timeout` seconds of opening or of
  its last answer (aiohttp's keep-alive timer, which also covers a head trickled byte by byte);
- a body may go `server.body_timeout` seconds without a byte, then the request gets 408 and its
  connection is closed; a `Content-Length` over `server.max_body_mb` gets 413 before a byte of the
  body is read, and a body without a length is cut off there too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web

from .errors import RouterError, error_body

log = logging.getLogger("llama_router")

MIB = 1024 * 1024
# Connections kept for upstreams, log files and the like when the cap is derived from the fd limit.
RESERVED_FDS = 128
MAX_CONNECTIONS = 8192  # the derived cap's ceiling
REFUSAL_WAIT = 1.0  # seconds a connection past the cap has to show its request line
# Seconds the rest of a refused body is read and dropped before its connection is closed, so that
# a client still sending sees the answer rather than a reset (aiohttp's lingering close).
LINGER = 2.0
REFUSAL_LINE = 4096  # bytes of it read
PREALLOCATE_FROM = 1 << 20  # bytes of a body with a length from which it is read into one buffer


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one (where allowed); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        for target in (hard, 1 << 20, 65536, 10240):
            if target == resource.RLIM_INFINITY or target <= soft:
                continue
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (ValueError, OSError):
                continue  # macOS refuses RLIM_INFINITY and values above kern.maxfilesperproc
            soft = target
            break
    return soft


def connection_cap(configured: int | None, fd_limit: int) -> int:
    """The most client connections open at once: the configured number, else half the descriptors
    left after a reserve (each proxied request also holds one to its upstream), up to 8192."""
    if configured is not None:
        return configured
    return max(16, min(MAX_CONNECTIONS, (fd_limit - RESERVED_FDS) // 2))


class _Refusal(asyncio.Protocol):
    """A connection past the cap: it gets one answer, then is closed. `GET /health` is answered as
    the router is up; anything else gets 503 with Retry-After. At most one request line is read,
    for at most `REFUSAL_WAIT` seconds."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._line = b""
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_WAIT, self._answer)

    def data_received(self, data: bytes) -> None:
        self._line += data[: REFUSAL_LINE - len(self._line)]
        if b"\n" in self._line or len(self._line) >= REFUSAL_LINE:
            self._answer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    def _answer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        transport, self._transport = self._transport, None
        if transport is None:
            return
        if self._line.startswith((b"GET /health ", b"GET /health?")):
            status, extra, body = "200 OK", b"", {"status": "ok"}
        else:
            message = "the router has as many client connections open as it takes; try again shortly"
            status, extra = "503 Service Unavailable", b"Retry-After: 1\r\n"
            body = error_body(503, message, code="too_many_connections")
        data = json.dumps(body).encode()
        head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        transport.write(head.encode() + extra + b"Connection: close\r\n\r\n" + data)
        transport.close()


class CappedSite(web.TCPSite):
    """aiohttp's TCP site, with a new connection past `limit` open ones refused (see `_Refusal`)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, limit: int, **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self.limit = limit
        self.refused = 0

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registered with its runner, as TCPSite.start does first
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.Protocol:
            if len(server.connections) >= self.limit:
                self.refused += 1
                if self.refused == 1 or self.refused % 1000 == 0:
                    log.warning("%d client connections open, the cap: refusing more", self.limit)
                return _Refusal()
            return server()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            protocol,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )


def body_reader(
    max_bytes: Callable[[], int], timeout: Callable[[], float]
) -> Callable[[web.Request], Awaitable[None]]:
    """What reads a request's body, if it has one, before the handler does (the router's one
    middleware awaits it): 413 for a `Content-Length` over `max_bytes()` (nothing read) or a body
    that grows past it, 408 for one silent `timeout()` seconds, raised as RouterError. Handlers then
    get the body from `request.read()` at once."""

    async def read_body(request: web.Request) -> None:
        if request.body_exists and request._read_bytes is None:
            limit = max_bytes()
            length = request.content_length
            if length is not None and length > limit:
                raise _too_large(request, limit)
            request._read_bytes = await _read(request, limit, timeout())

    return read_body


async def _read(request: web.Request, limit: int, timeout: float) -> bytes:
    """The whole body, each wait for more bounded by `timeout`. A large body with a length is read
    into one buffer of that size (a bytearray, which every reader takes as bytes): one copy of it,
    not chunks plus their join."""
    content = request.content
    length = request.content_length
    if content.is_eof() and length is not None:
        # The whole body came with its head (the usual small request): nothing to wait for. aiohttp
        # ends a body with a length exactly there, and the length was checked against the limit.
        return content.read_nowait()
    whole = bytearray(length) if length is not None and length > PREALLOCATE_FROM else None
    parts: list[bytes] = []
    size = 0
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout) as timer:
            while chunk := await content.readany():
                end = size + len(chunk)
                if end > limit:
                    raise _too_large(request, limit)
                if whole is not None:
                    whole[size:end] = chunk
                else:
                    parts.append(chunk)
                size = end
                timer.reschedule(loop.time() + timeout)
    except TimeoutError:
        _close_after_answer(request)
        raise RouterError(
            408, f"the request body stalled: no byte for {timeout:g}s", code="request_timeout"
        ) from None
    if whole is not None:
        if size != len(whole):  # aiohttp ends a body at its length; this one ended early
            raise RouterError(400, "the request body ended before its Content-Length", code="invalid_request")
        # A bytearray does whatever the body's readers do with bytes (json, re, len, slicing, the
        # transport's write); turning it into bytes would copy it.
        return cast(bytes, whole)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _too_large(request: web.Request, limit: int) -> RouterError:
    _close_after_answer(request)
    return RouterError(
        413,
        f"request body over {limit / MIB:g} MiB (server.max_body_mb); send less, or raise the limit",
        code="request_too_large",
    )


def _close_after_answer(request: web.Request) -> None:
    """The rest of the body will not be read: the connection is closed once the answer is out."""
    if request.protocol is not None:
        request.protocol.close()
