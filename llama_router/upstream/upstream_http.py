"""A lean HTTP/1.1 client for the router's own upstreams: local llama-server processes.

Why not aiohttp's client: on the proxy's hot path it cost more CPU than the rest of the router
together (request and response objects, URL handling, timers, cookie and redirect machinery), and on
streams it does bookkeeping per HTTP chunk, while llama-server sends every token as a chunk of its
own. Upstreams are processes on loopback that speak plain HTTP/1.1 (peers may add TLS), so a small
protocol with a keep-alive pool does the job: a request goes out as one prebuilt buffer; an answer
with a length is collected whole; a chunked answer is handed over as it arrives, each run of whole
chunks decoded in one go rather than chunk by chunk.

Errors say where the exchange broke, because the proxy decides by that whether a request may be
sent again: `ConnectFailed` (nothing was sent), `ConnectionDropped` (closed or reset before the
answer began), `UpstreamTimeout` (no answer in time), `BodyFailed` (broke mid-answer).
"""

from __future__ import annotations

import asyncio
import collections
import os
import ssl
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TypeAlias, cast

from multidict import CIMultiDict, CIMultiDictProxy

# Reading from an upstream pauses while this much of its answer waits for a slow client.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
MAX_HEAD = 64 * 1024  # bytes of status line and headers
MAX_CHUNK_LINE = 4096  # bytes of a chunk-size line, extensions included
# Idle connections older than this are not reused: cpp-httplib (llama-server) closes them after 5 s,
# and a request sent just as the server closes would fail for no good reason.
IDLE_TIMEOUT = 4.0
CONNECT_TIMEOUT = 10.0
JOIN_BODY_UP_TO = 64 * 1024  # bytes of body sent in one write with the head
# Where an upstream listens: (host, port), or the path of a Unix socket.
Address: TypeAlias = tuple[str, int] | str
# Asked when an upstream has sent nothing for the given seconds: True to wait that long again (it is
# busy, with this request queued behind others), False to give up with an UpstreamTimeout.
Patience: TypeAlias = Callable[[float], Awaitable[bool]]


class UpstreamError(Exception):
    """An exchange with an upstream failed."""


class ConnectFailed(UpstreamError):
    """No connection could be made (refused, unreachable): the request was not sent."""


class ConnectionDropped(UpstreamError):
    """The connection ended before the answer began. `reset`: by a reset or broken pipe (often a
    process that died with the request unread) rather than an orderly close; `reused`: on a kept-alive
    connection, which the server may have closed just before the request reached it."""

    def __init__(self, message: str, *, reset: bool, reused: bool = False) -> None:
        super().__init__(message)
        self.reset = reset
        self.reused = reused


class UpstreamTimeout(UpstreamError):
    """No byte of the answer for the allowed time."""


class BodyFailed(UpstreamError):
    """The answer began but broke off (connection closed mid-answer, or malformed)."""


def decode_chunked(raw: bytes) -> bytes:
    """The data of a run of whole HTTP chunks, in their framing."""
    parts = []
    pos, end = 0, len(raw)
    while pos < end:
        eol = raw.find(b"\r\n", pos)
        if eol < 0:
            break
        size = int(raw[pos:eol].split(b";", 1)[0], 16)
        if size == 0:
            break
        parts.append(raw[eol + 2 : eol + 2 + size])
        pos = eol + 4 + size
    return parts[0] if len(parts) == 1 else b"".join(parts)


_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _DONE = range(5)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an upstream, one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: UpstreamPool) -> None:
        self.loop = loop
        self.pool = pool
        self.uses = 0
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = True
        self.idle_since = 0.0
        self.answer: Answer | None = None
        self._buffer = b""
        self._mode = _DONE
        self._remaining = 0
        self._need = 0  # bytes the first pending chunk needs before it is whole (0: size unknown)
        self._no_body = False
        self._paused = False

    # ---------------------------------------------------------------------------------------- protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self.pool.discard(self)
        answer = self.answer
        if answer is None:
            return
        if self._mode == _HEAD:
            reset = isinstance(exc, OSError)
            why = f"connection reset: {exc}" if reset else "connection closed before the answer began"
            answer.fail(ConnectionDropped(why, reset=reset, reused=self.uses > 1))
        elif self._mode == _UNTIL_CLOSE and exc is None:
            self._finish()  # an answer without a length ends with its connection
        elif self._mode != _DONE:
            answer.fail(BodyFailed("connection closed mid-answer"))

    def eof_received(self) -> bool:
        return False  # close our side too

    def pause_writing(self) -> None:
        pass  # requests are small next to socket buffers

    def resume_writing(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        mode = self._mode
        if mode == _CHUNKED:
            self._chunked(data)
        elif mode == _LENGTH:
            self._length(data)
        elif mode == _HEAD:
            self._head(data)
        elif mode == _UNTIL_CLOSE:
            self._emit(data)
        else:  # bytes nobody asked for: this connection cannot be trusted with another request
            self.reusable = False
            if self.transport is not None:
                self.transport.close()

    # ---------------------------------------------------------------------------------------- exchange

    def start(self, answer: Answer, head: bytes, body: bytes | None, *, no_body: bool) -> None:
        assert self.transport is not None
        self.answer = answer
        self.uses += 1
        self._mode = _HEAD
        self._no_body = no_body
        self._buffer = b""
        self._need = 0
        if body and len(body) > JOIN_BODY_UP_TO:
            self.transport.write(head)  # a large body is not copied to join its head
            self.transport.write(body)
        else:
            self.transport.write(head + body if body else head)

    def _head(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    self._broken("answer head too long")
                    return
                self._buffer = buffer
                return
            try:
                status = self._parse_head(buffer[:end])
            except ValueError as exc:
                self._broken(f"malformed answer head: {exc}")
                return
            buffer = buffer[end + 4 :]
            if status >= 200 or status == 101:
                break
            # 1xx interim answers (100 Continue) come before the real one.
        self._buffer = b""
        answer = self.answer
        assert answer is not None
        if self._no_body or status in (204, 304) or (answer.content_length == 0 and not answer.chunked):
            self._finish()
        elif answer.chunked:
            self._mode = _CHUNKED
            # llama-server closes the connection after a stream without saying so (no
            # `Connection: close`): reusing it would race that close.
            self.reusable = self.pool.keep_streams
        elif answer.content_length is not None:
            self._mode = _LENGTH
            self._remaining = answer.content_length
        else:
            self._mode = _UNTIL_CLOSE
            self.reusable = False
        answer.head_arrived()
        if buffer:
            self.data_received(buffer)

    def _parse_head(self, head: bytes) -> int:
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/"):
            raise ValueError(repr(lines[0][:80]))
        status = int(code)
        headers: list[tuple[str, str]] = []
        length: int | None = None
        chunked = False
        content_type = ""
        close = version == "HTTP/1.0"
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                raise ValueError(f"header line without a colon: {line[:80]!r}")
            name = name.strip()
            value = value.strip()
            headers.append((name, value))
            lower = name.lower()
            if lower == "content-length":
                length = int(value)
            elif lower == "transfer-encoding":
                chunked = value.lower().endswith("chunked")
            elif lower == "content-type":
                content_type = value
            elif lower == "connection":
                close = "close" in value.lower()
        if status < 200 and status != 101:
            return status
        if close:
            self.reusable = False
        answer = self.answer
        assert answer is not None
        answer.status = status
        answer.reason = reason
        answer.raw_headers = headers
        answer.content_length = None if chunked else length
        answer.chunked = chunked
        answer.content_type = content_type
        return status

    def _length(self, data: bytes) -> None:
        if len(data) > self._remaining:
            data = data[: self._remaining]
            self.reusable = False  # more than it announced
        self._remaining -= len(data)
        self._emit(data)
        if self._remaining == 0:
            self._finish()

    def _chunked(self, data: bytes) -> None:
        """Pass on every run of whole chunks as it completes; hold back a chunk still arriving."""
        buffer = self._buffer + data if self._buffer else data
        if len(buffer) < self._need:
            self._buffer = buffer
            return
        pos, end = 0, len(buffer)
        need = 0
        while True:
            eol = buffer.find(b"\r\n", pos)
            if eol < 0:
                if end - pos > MAX_CHUNK_LINE:
                    self._broken("chunk size line too long")
                    return
                break
            try:
                size = int(buffer[pos:eol].split(b";", 1)[0], 16)
            except ValueError:
                self._broken(f"bad chunk size line {buffer[pos:eol][:40]!r}")
                return
            if size == 0:  # the last chunk, then optional trailers and a blank line
                stop = buffer.find(b"\r\n\r\n", eol)
                if stop < 0:
                    break
                stop += 4
                if stop < end:
                    self.reusable = False
                self._buffer = b""
                self._emit(buffer[:stop] if pos or stop < end else buffer)
                self._finish()
                return
            after = eol + 4 + size
            if after > end:
                need = after - pos
                break
            if buffer[after - 2 : after] != b"\r\n":
                self._broken("chunk not followed by CRLF")
                return
            pos = after
        self._need = need
        if pos:
            self._emit(buffer[:pos] if pos < end else buffer)
            self._buffer = buffer[pos:]
        else:
            self._buffer = buffer

    def _emit(self, data: bytes) -> None:
        answer = self.answer
        if answer is None or not data:
            return
        answer.feed(data)
        if answer.buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def consumed(self, buffered: int) -> None:
        if self._paused and buffered < LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def _finish(self) -> None:
        self._mode = _DONE
        answer = self.answer
        if answer is not None:
            answer.complete()

    def _broken(self, why: str) -> None:
        answer = self.answer
        if answer is not None:
            dropped = ConnectionDropped(why, reset=False, reused=self.uses > 1)
            answer.fail(BodyFailed(why) if self._mode != _HEAD else dropped)
        self._mode = _DONE
        self.close()

    def close(self) -> None:
        self.reusable = False
        self.closed = True
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class Answer:
    """An upstream's answer: status and headers at once, the body as it arrives.

    Release it (or use `async with`) when done: a connection whose answer was read to its end goes
    back to the pool, any other is closed (which also tells the upstream to stop working on it)."""

    __slots__ = (
        "_conn",
        "_done",
        "_error",
        "_pieces",
        "_pool",
        "_released",
        "_waiter",
        "buffered",
        "chunked",
        "content_length",
        "content_type",
        "patience",
        "raw_headers",
        "reason",
        "status",
    )

    def __init__(self, conn: _Connection, pool: UpstreamPool) -> None:
        # The head's fields, filled in by `_Connection._parse_head` when it arrives.
        self.status = 0
        self.reason = ""
        self.raw_headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self.chunked = False
        self.content_type = ""
        self._conn = conn
        self._pool = pool
        self._pieces: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: UpstreamError | None = None
        self._released = False
        self.buffered = 0
        self.patience: Patience | None = None

    # -------------------------------------------------------------------------------- fed by the protocol

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def head_arrived(self) -> None:
        self._wake()

    def feed(self, data: bytes) -> None:
        self._pieces.append(data)
        self.buffered += len(data)
        self._wake()

    def complete(self) -> None:
        self._done = True
        self._wake()

    def fail(self, error: UpstreamError) -> None:
        if self._error is None and not self._done:
            self._error = error
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_exception(error)

    # -------------------------------------------------------------------------------- read by the proxy

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return CIMultiDictProxy(CIMultiDict(self.raw_headers))

    async def _wait(self, timeout: float | None) -> None:
        """Wait for the exchange to move on; after `timeout` seconds of silence, UpstreamTimeout unless
        `patience` says to wait on (then it returns, and the caller looks again and waits again)."""
        waiter = self._conn.loop.create_future()
        self._waiter = waiter
        timer = None
        if timeout is not None:
            timer = self._conn.loop.call_later(timeout, self._timed_out, waiter, timeout)
        try:
            await waiter
        except UpstreamTimeout:
            if timeout is None or self.patience is None or not await self.patience(timeout):
                raise
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = None

    def _timed_out(self, waiter: asyncio.Future[None], timeout: float) -> None:
        if not waiter.done():
            waiter.set_exception(UpstreamTimeout(f"no answer for {timeout:g}s"))

    async def next_piece(self, timeout: float | None = None) -> bytes | None:
        """The next piece of the body as it came (None at its end); raises when it broke off."""
        while not self._pieces:
            if self._done:
                return None
            if self._error is not None:
                raise self._error
            await self._wait(timeout)
        piece = self._pieces.popleft()
        self.buffered -= len(piece)
        self._conn.consumed(self.buffered)
        return piece

    async def read(self, timeout: float | None = None) -> bytes:
        """The whole body, decoded; `timeout` bounds each wait for more of it."""
        if self._done and self._error is None:  # all of it came with the head: nothing to wait for
            parts = list(self._pieces)
            self._pieces.clear()
            self.buffered = 0
            self._conn.consumed(0)
        else:
            parts = []
            while (piece := await self.next_piece(timeout)) is not None:
                parts.append(piece)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        return decode_chunked(data) if self.chunked and data else data

    def pieces(self, timeout: float | None = None) -> Pieces:
        """The body's data as it arrives; `timeout` (its `timeout` attribute, which may change)
        bounds each wait for more of it."""
        return Pieces(self, timeout=timeout)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._pieces.clear()
        conn = self._conn
        conn.answer = None
        if self._done and self._error is None and conn.reusable and not conn.closed:
            self._pool.put_back(conn)
        else:
            conn.close()

    async def __aenter__(self) -> Answer:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class Pieces:
    """Async iterator over an answer's body (see `Answer.pieces`)."""

    __slots__ = ("_answer", "_decode", "timeout")

    def __init__(self, answer: Answer, *, timeout: float | None) -> None:
        self._answer = answer
        self._decode: Callable[[bytes], bytes] | None = decode_chunked if answer.chunked else None
        self.timeout = timeout

    def __aiter__(self) -> Pieces:
        return self

    async def __anext__(self) -> bytes:
        while True:
            piece = await self._answer.next_piece(self.timeout)
            if piece is None:
                raise StopAsyncIteration
            if self._decode is not None:
                piece = self._decode(piece)
                if not piece:
                    continue  # only the last chunk
            return piece


class UpstreamPool:
    """Keep-alive connections per upstream address, reused most recently used first."""

    def __init__(
        self,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        keep_streams: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._idle: dict[Address, list[_Connection]] = {}
        self._address: dict[_Connection, Address] = {}
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.keep_streams = keep_streams  # reuse connections that carried a chunked answer
        self.tls = tls  # TCP connections are made over TLS with it (an https:// peer)

    async def _connect(self, address: Address) -> _Connection:
        loop = asyncio.get_running_loop()
        where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
        try:
            async with asyncio.timeout(self.connect_timeout):
                if isinstance(address, str):
                    _, conn = await loop.create_unix_connection(lambda: _Connection(loop, self), address)
                else:
                    host, port = address
                    _, conn = await loop.create_connection(
                        lambda: _Connection(loop, self),
                        host,
                        port,
                        ssl=self.tls,
                        server_hostname=host if self.tls is not None else None,
                    )
        except ssl.SSLError as exc:  # before OSError, its base: a certificate that does not check out
            raise ConnectFailed(f"cannot connect to {where}: TLS: {exc.reason or exc}") from None
        except OSError as exc:
            # asyncio words a refused TCP connection "Connect call failed (...)": the errno says it.
            why = os.strerror(exc.errno) if exc.errno else exc.strerror or exc
            raise ConnectFailed(f"cannot connect to {where}: {why}") from None
        except TimeoutError:
            raise ConnectFailed(f"cannot connect to {where}: timed out") from None
        self._address[conn] = address
        return conn

    def _reuse(self, address: Address) -> _Connection | None:
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.loop.time() - conn.idle_since < self.idle_timeout:
                return conn
            self._forget(conn)
        return None

    def _forget(self, conn: _Connection) -> None:
        conn.close()
        self._address.pop(conn, None)

    def discard(self, conn: _Connection) -> None:
        """A connection closed: drop it (an upstream that stopped leaves nothing behind)."""
        address = self._address.pop(conn, None)
        if address is None:
            return
        idle = self._idle.get(address)
        if idle is not None and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[address]

    def put_back(self, conn: _Connection) -> None:
        address = self._address.get(conn)
        if address is None or conn.closed:
            conn.close()
            return
        conn.consumed(0)  # reading may have been paused for a slow reader
        conn.idle_since = conn.loop.time()
        self._idle.setdefault(address, []).append(conn)

    async def request(
        self,
        address: Address,
        head: bytes,
        body: bytes | None,
        *,
        timeout: float | None = None,
        patience: Patience | None = None,
        no_body: bool = False,
        fresh: bool = False,
    ) -> Answer:
        """Send one request (`head`: request line and headers, blank line included) and wait for
        the answer's head; `timeout` bounds each wait for it, and for the body later, unless
        `patience` lets it go on; `fresh`: on a new connection. Cancelling closes the connection."""
        conn = (None if fresh else self._reuse(address)) or await self._connect(address)
        answer = Answer(conn, self)
        answer.patience = patience
        try:
            conn.start(answer, head, body, no_body=no_body)
            while answer.status == 0:
                if answer._error is not None:
                    raise answer._error
                await answer._wait(timeout)
        except BaseException:
            self._forget(conn)
            answer._released = True
            raise
        return answer

    async def close(self) -> None:
        for conn in list(self._address):
            conn.close()
        self._idle.clear()
        self._address.clear()
        await asyncio.sleep(0)  # let the transports finish closing
