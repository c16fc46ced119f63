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
- a whole body must arrive within `server.body_timeout` seconds (a total, so a body trickled a byte
  at a time cannot hold its connection and memory for long), else the request gets 408 and its
  connection is closed; a `Content-Length` over `server.max_body_mb` gets 413 before a byte of the
  body is read, and a body without a length is cut off there too;
- the bodies held at once, across every connection and until their requests end (a request waiting
  for its model holds its body), are at most `server.max_body_total_mb`: a body that would go past it
  gets 503 with `Retry-After` before it is read (one without a length, when it grows past it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web

from llama_router.core.errors import RouterError, error_body

log = logging.getLogger("llama_router")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
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
    """aiohttp's TCP site (with TLS when given an `ssl_context`), with a new connection past `limit`
    open ones refused (see `_Refusal`)."""

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
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )


class BodyBudget:
    """The bytes of request bodies the router holds at once, across all connections, against
    `server.max_body_total_mb`. A body's bytes are taken before it is read (its length) or as it
    arrives (without one) and given back when its request ends."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self.limit = limit
        self.held = 0
        self.refused = 0  # bodies answered 503 for want of room

    def take(self, size: int) -> bool:
        """Hold `size` more bytes, if they fit under the limit."""
        if self.held + size > self.limit():
            self.refused += 1
            return False
        self.held += size
        return True

    def give_back(self, size: int) -> None:
        self.held = max(0, self.held - size)


class BodyLimits:
    """What reads a request's body, if it has one, before the handler does (the router's one
    middleware asks it, rather than aiohttp's chain): 413 for a `Content-Length` over `max_bytes()`
    (nothing read) or a body that grows past it, 503 for one the `budget` has no room for (nothing
    read, when it has a length), 408 for one not whole within `timeout()` seconds. Handlers then get
    the body from `request.read()` at once; its bytes count against the budget until the request
    ends (`BodyHold.give_back`)."""

    def __init__(
        self, max_bytes: Callable[[], int], timeout: Callable[[], float], budget: BodyBudget
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.budget = budget

    def hold(self, request: web.Request) -> BodyHold | None:
        """The room taken for `request`'s body, read already where it all came with the head (the
        usual small request: nothing to wait for, no coroutine); None where there is no body to
        read. Raises the 413 or 503 at once."""
        if not request.body_exists or request._read_bytes is not None:
            return None
        limit = self.max_bytes()
        length = request.content_length
        if length is not None and length > limit:
            raise _too_large(request, limit)
        hold = BodyHold(self, request, limit)
        if length is not None:
            hold.take(length)
            content = request.content
            if content.is_eof():
                # aiohttp ends a body with a length exactly there, and the length was checked.
                request._read_bytes = content.read_nowait()
        return hold


class BodyHold:
    """What one request holds of the budget, and the reading of its body."""

    __slots__ = ("limit", "limits", "request", "size")

    def __init__(self, limits: BodyLimits, request: web.Request, limit: int) -> None:
        self.limits = limits
        self.request = request
        self.limit = limit
        self.size = 0

    @property
    def whole(self) -> bool:
        """Whether the whole body is in hand."""
        return self.request._read_bytes is not None

    async def read_rest(self) -> None:
        """Wait for the rest of the body, within the limits."""
        self.request._read_bytes = await _read(self.request, self.limit, self.limits.timeout(), self)

    def take(self, size: int) -> None:
        budget = self.limits.budget
        if not budget.take(size):
            _close_after_answer(self.request)
            raise RouterError(
                503,
                "the router holds as many request bodies as it may at once "
                f"({budget.limit() / MIB:g} MiB, server.max_body_total_mb); try again shortly",
                code="bodies_over_capacity",
                retry_after=1,
            )
        self.size += size

    def give_back(self) -> None:
        self.limits.budget.give_back(self.size)
        self.size = 0


async def _read(request: web.Request, limit: int, timeout: float, hold: BodyHold) -> bytes:
    """The whole body, within `timeout` seconds in all. A large body with a length is read into one
    buffer of that size (a bytearray, which every reader takes as bytes): one copy of it, not chunks
    plus their join. A body without a length takes its room in the budget as it arrives."""
    content = request.content
    length = request.content_length
    whole = bytearray(length) if length is not None and length > PREALLOCATE_FROM else None
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await content.readany():
                end = size + len(chunk)
                if end > limit:
                    raise _too_large(request, limit)
                if length is None:
                    hold.take(len(chunk))
                if whole is not None:
                    whole[size:end] = chunk
                else:
                    parts.append(chunk)
                size = end
    except TimeoutError:
        _close_after_answer(request)
        raise RouterError(
            408,
            f"the request body did not arrive within {timeout:g}s (server.body_timeout)",
            code="request_timeout",
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
