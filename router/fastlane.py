"""The fast lane: requests that need nothing but relaying are relayed without aiohttp.

Most of a router's traffic is the simplest case: a POST to an inference endpoint naming a model that is
loaded and free to take it. Through aiohttp that case costs ~185 µs of CPU per request, most of it
in building request and response objects; here it is read, checked and relayed by a raw protocol on
the listening socket, and the answer passes back in the upstream's own framing.

The lane relays only what it can frame without doubt: HTTP/1.1, `POST` to one of the model paths with
no query, one `Content-Length` (no `Transfer-Encoding`, `Expect`, `TE` or `Upgrade`), a JSON body
naming a profile by its own name (no alias: answers need no renaming), accepted keys, and a model that
takes the request this instant (`Controller.lease_now`).

Every other request whose end the lane can tell (one `Content-Length`, or no body) is lent to the
aiohttp application through aiohttp's side of the connection (`AppSide`): a transport of the lane's
that passes aiohttp the request's bytes and writes its answer to the client. The lane goes on with
the connection's next request once that answer is out (`ResponseEnd` follows its framing); between
lent requests aiohttp's protocol waits, as on an idle kept-alive connection. aiohttp parses the
request again from its first byte and gives it the full treatment (loads, queues, fallbacks, aliases,
errors, loading comments). Requests the lane cannot delimit or should not read (chunked uploads,
upgrades, HTTP/1.0, folded or oddly spaced headers) are handed to aiohttp together with their
connection, for good, as if aiohttp had accepted it itself.

What the lane keeps from the full path: the lease (a swap never cuts a relayed request), the in-flight
count a shutdown drains, one access-log line and the request, wait, error and token metrics per
request, the stall watchdog (`stall_timeout_prompt`, `stall_timeout`), an error event ending an SSE
stream that breaks, and the rule that a request that may have reached a live upstream is never sent
twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

from .access_log import CLIENT_CLOSED, InFlight, log_request
from .auth import key_in_header_lines
from .errors import error_body
from .metrics import UsageTail, parse_usage
from .proxy import MODEL_POST_PATHS, serving, sse_event
from .response_end import ResponseEnd
from .upstream_http import (
    HIGH_WATER,
    LAST_CHUNK,
    AnswerHead,
    BodyFailed,
    ConnectionDropped,
    UpstreamError,
    decode_chunked,
    frame_chunk,
)

if TYPE_CHECKING:
    from .auth import KeyRing
    from .controller import Controller, Lease
    from .metrics import Metrics
    from .proxy import Proxy
    from .upstream_http import UpstreamConnection

log = logging.getLogger("llama_router.proxy")

ProtocolFactory = Callable[[], asyncio.BaseProtocol]

_PATHS = frozenset(path.encode() for path in MODEL_POST_PATHS)
_END_OF_HEAD = b"\r\n\r\n"
MAX_HEAD = 64 * 1024  # a longer head goes to aiohttp, which answers it properly
MAX_BODY = 8 * 1024 * 1024  # bodies above this stream into aiohttp instead of being held here
IDLE_TIMEOUT = 75.0  # seconds an idle kept-alive client connection stays open (aiohttp's default)
# Headers whose request the lane cannot delimit or must not touch: the connection goes to aiohttp.
_UNFRAMED = frozenset({b"transfer-encoding", b"upgrade"})
# Headers that ask more of the server than relaying: the request is lent to aiohttp.
_NOT_RELAYED = frozenset({b"expect", b"te"})
# Hop-by-hop answer headers: they describe the upstream connection, not the client's.
_ANSWER_DROP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "trailer"})


class FastLane:
    """What the lane's connections share: the router's parts, and the connections themselves."""

    def __init__(
        self,
        controller: Controller,
        proxy: Proxy,
        metrics: Metrics | None,
        keys: KeyRing,
        in_flight: InFlight | None,
        app_protocol: ProtocolFactory,
    ) -> None:
        self.controller = controller
        self.proxy = proxy
        self.metrics = metrics
        self.keys = keys
        self.in_flight = in_flight
        self.app_protocol = app_protocol  # aiohttp's protocol factory: where other requests go
        self.connections: set[ClientConnection] = set()
        self.closing = False
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> ClientConnection:
        """Protocol factory for `loop.create_server`."""
        if self._sweeper is None and not self.closing:
            self._sweeper = asyncio.get_running_loop().call_later(IDLE_TIMEOUT / 5, self._sweep)
        return ClientConnection(self)

    def _sweep(self) -> None:
        """Close client connections idle for longer than IDLE_TIMEOUT."""
        now = time.monotonic()
        for connection in list(self.connections):
            if not connection.busy and now - connection.idle_since > IDLE_TIMEOUT:
                connection.close()
        self._sweeper = None
        if self.connections and not self.closing:
            self._sweeper = asyncio.get_running_loop().call_later(IDLE_TIMEOUT / 5, self._sweep)

    def shutdown(self) -> None:
        """Stop taking requests: idle connections close now, busy ones once their answer is sent."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in list(self.connections):
            if not connection.busy:
                connection.close()

    def abort(self) -> None:
        """Cut every connection still open (requests that outlived the shutdown's drain)."""
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()


class ClientConnection(asyncio.Protocol):
    """One client connection while the fast lane has it."""

    __slots__ = (
        "app",
        "buffer",
        "close_after",
        "exchange",
        "idle_since",
        "lane",
        "peer",
        "transport",
    )

    def __init__(self, lane: FastLane) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.exchange: Exchange | None = None
        self.app: AppSide | None = None  # aiohttp's side of this connection, once a request was lent
        self.close_after = False
        self.idle_since = time.monotonic()
        self.peer = ""

    @property
    def busy(self) -> bool:
        """Whether a request on this connection is being answered, by the lane or by aiohttp."""
        return self.exchange is not None or (self.app is not None and self.app.lent)

    # ---------------------------------------------------------------------------------------- protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else ""
        self.lane.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.lane.connections.discard(self)
        if self.exchange is not None:
            self.exchange.client_left()
        if self.app is not None:
            self.app.detach(exc)

    def pause_writing(self) -> None:
        # A relayed answer: the exchange watches the write buffer and pauses its upstream.
        if self.app is not None:
            self.app.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.exchange is not None and self.transport is not None:
            self.exchange.client_drained(self.transport.get_write_buffer_size())
        if self.app is not None:
            self.app.handler.resume_writing()

    def data_received(self, data: bytes) -> None:
        app = self.app
        if app is not None and app.unsent:
            data = app.feed(data)  # the lent request's bytes go to aiohttp; the rest waits here
            if not data:
                return
        self.buffer = self.buffer + data if self.buffer else data
        if not self.busy:
            self.idle_since = time.monotonic()  # a request on its way: not idle
            self.next_request()
        elif len(self.buffer) > MAX_HEAD + MAX_BODY and self.transport is not None:
            self.transport.pause_reading()  # requests sent ahead: read on once this answer is out

    def eof_received(self) -> bool:
        """The client closed its side. TCP cannot tell that from leaving, and clients that half-close
        to wait for an answer are not known: the work on its behalf stops, as in the full path."""
        if self.exchange is not None:
            self.exchange.client_left()
        return False  # the transport closes; aiohttp's side learns it in connection_lost

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # ---------------------------------------------------------------------------------------- requests

    def next_request(self) -> None:
        """Relay the request at the head of the buffer, or lend it to aiohttp."""
        buffer = self.buffer
        if not buffer or self.transport is None:
            return
        if self.lane.closing:  # shutting down: as aiohttp does, no new request on a kept-alive connection
            self.close()
            return
        end = buffer.find(_END_OF_HEAD)
        if end < 0:
            if len(buffer) > MAX_HEAD:
                self.hand_over()
            return
        head = _read_head(buffer[:end])
        if head is None:
            self.hand_over()  # not delimited by a length, or not plainly formed: aiohttp keeps it all
            return
        method, target, length, headers, close, relayable = head
        total = end + 4 + length
        lane = self.lane
        controller = lane.controller
        if not relayable or length > MAX_BODY or not controller.config.server.fast_lane:
            self.lend(total, no_body=method == b"HEAD")
            return
        if len(buffer) < total:
            return  # the rest of the body is on its way
        if lane.keys.enabled and not _key_accepted(headers, lane.keys):
            self.lend(total)  # aiohttp's check answers 401 or 403 with the reason
            return
        body = buffer[end + 4 : total]
        model = _model_of(body)
        if model is None:
            self.lend(total)  # a malformed body: aiohttp answers 400 with the reason
            return
        profile = controller.config.profiles.get(model)
        if profile is None or profile.served_name != model:
            self.lend(total)  # unknown (404) or an alias (answers need renaming)
            return
        lease = controller.lease_now(model)
        if lease is None:
            self.lend(total)  # the model is loading, draining, failed or busy: the full path waits
            return
        self.buffer = buffer[total:]
        self.close_after = self.close_after or close
        if lane.metrics is not None:
            lane.metrics.lane_relayed += 1
        self.exchange = Exchange(self, lease, target, headers, body, buffer[:total], model)
        self.exchange.start()

    def lend(self, length: int, *, no_body: bool = False) -> None:
        """Give aiohttp the request at the head of the buffer (`length` bytes, head included) through
        aiohttp's side of this connection; the lane goes on once its answer is out."""
        if self.lane.metrics is not None:
            self.lane.metrics.lane_handed_over += 1
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.resume_reading()  # aiohttp paces its reading itself meanwhile
        if self.app is None or self.app.detached:  # none yet, or aiohttp let it go (keep-alive)
            self.app = AppSide(self)
        data, self.buffer = self.buffer, b""
        self.buffer = self.app.lend(data, length, no_body=no_body)

    def answered(self) -> None:
        """aiohttp's answer to a lent request is out: on with the next request, if any."""
        self.idle_since = time.monotonic()
        if self.lane.closing or (self.app is not None and self.app.close_wanted):
            self.close()
            return
        if self.transport is not None:
            self.transport.resume_reading()  # if requests sent ahead had paused it
        if self.buffer:
            self.next_request()

    def hand_over(self) -> None:
        """Give this connection to aiohttp for good, with what was received and not relayed."""
        if self.lane.metrics is not None:
            self.lane.metrics.lane_handed_over += 1
        transport = self.transport
        data, self.buffer = self.buffer, b""
        self.lane.connections.discard(self)
        if self.app is not None:
            self.app.detach()  # aiohttp's side of earlier lent requests: the connection is aiohttp's now
        if transport is None or transport.is_closing():
            return
        protocol = self.lane.app_protocol()
        self.transport = None
        transport.resume_reading()  # aiohttp paces its reading itself
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if data:
            cast(asyncio.Protocol, protocol).data_received(data)

    def exchange_done(self, *, reusable: bool) -> None:
        """The answer was sent (or cut); go on with the next request, if any."""
        self.exchange = None
        self.idle_since = time.monotonic()
        if not reusable or self.close_after or self.lane.closing:
            self.close()
            return
        if self.transport is not None:
            self.transport.resume_reading()
        if self.buffer:
            self.next_request()


class Exchange(AnswerHead):
    """One relayed request: fed by the upstream connection, writing straight to the client."""

    __slots__ = (
        "body",
        "buffered_pieces",
        "client",
        "conn",
        "connecting",
        "head_sent",
        "headers",
        "lane",
        "last_activity",
        "lease",
        "model",
        "pending_head",
        "raw_request",
        "sent",
        "sse",
        "started",
        "target",
        "timer",
        "usage",
    )

    def __init__(
        self,
        client: ClientConnection,
        lease: Lease,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        raw_request: bytes,
        model: str,
    ) -> None:
        super().__init__()  # the answer's head: set by the upstream connection when it arrives
        self.client = client
        self.lane = client.lane
        self.lease = lease
        self.target = target
        self.headers = headers
        self.body = body
        self.raw_request = raw_request
        self.model = model
        self.conn: UpstreamConnection | None = None
        self.connecting: asyncio.Future[None] | None = None
        self.started = time.perf_counter()
        self.last_activity = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.head_sent = False  # written to the client
        self.pending_head = b""  # an answer's head held back to go out with its body
        self.sent = 0
        self.usage: UsageTail | None = None
        self.buffered_pieces: list[bytes] | None = None
        self.sse = False

    # ---------------------------------------------------------------------------------------- outgoing

    def start(self) -> None:
        lane = self.lane
        if lane.in_flight is not None:
            lane.in_flight.begin()
        if lane.metrics is not None:
            lane.metrics.waited(self.lease.profile, 0.0)
        upstream = self.lease.upstream
        conn = lane.proxy.idle_connection(upstream.host, upstream.port)
        if conn is None:
            self.connecting = asyncio.ensure_future(self._connect_and_send())
        else:
            self._send(conn)

    async def _connect_and_send(self) -> None:
        upstream = self.lease.upstream
        try:
            conn = await self.lane.proxy.connect(upstream.host, upstream.port)
        except UpstreamError:
            self._take_back()  # nothing was sent: the full path finds out why, and retries or reports
            return
        if self.client.exchange is not self:  # the client left while connecting
            conn.close()
            return
        self._send(conn)

    def _send(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        upstream = self.lease.upstream
        host = upstream.host.encode()
        parts = [b"POST %s HTTP/1.1\r\nHost: %s:%d\r\n" % (self.target, host, upstream.port)]
        drop = self.lane.proxy.request_drop
        for name, line in self.headers:
            if name not in drop:
                parts += (line, b"\r\n")
        parts.append(b"Content-Length: %d\r\n\r\n" % len(self.body))
        parts.append(self.body)
        loop = asyncio.get_running_loop()
        self.last_activity = loop.time()
        server = self.lane.controller.config.server
        # One timer, first due at the shorter limit; it moves itself on while bytes keep coming.
        self.timer = loop.call_later(
            min(server.stall_timeout, server.stall_timeout_prompt), self._check_stall
        )
        conn.start(self, b"".join(parts), no_body=False)

    # ---------------------------------------------------------------------------------------- incoming

    @property
    def buffered(self) -> int:
        """Bytes the client has not taken yet: the upstream connection pauses above its high water."""
        transport = self.client.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def head_arrived(self) -> None:
        if self.lease.released:
            return  # an answer without a body: complete() came first and sent it
        self.last_activity = asyncio.get_running_loop().time()
        self.sse = self.content_type.startswith("text/event-stream")
        if self.lane.metrics is not None and self.status == 200:
            if self.chunked:
                self.usage = UsageTail()
            else:
                self.buffered_pieces = []
        if not self.chunked and self.content_length is None:
            self.client.close_after = True  # a body that ends with the upstream's connection ends ours
        if self.content_length is None:  # a stream: the client learns at once that it has begun
            self._send_head(self._answer_head())
        else:  # a body with a length follows at once: head and body go out in one write
            self.pending_head = self._answer_head()

    def _answer_head(self) -> bytes:
        parts = [b"HTTP/1.1 %d %s\r\n" % (self.status, self.reason.encode("latin-1"))]
        for name, value in self.raw_headers:
            if name.lower() not in _ANSWER_DROP:
                parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        if self.client.close_after:
            parts.append(b"Connection: close\r\n")
        if self.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif self.content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % (self.content_length or 0))
        parts.append(b"\r\n")
        return b"".join(parts)

    def _send_head(self, head: bytes, body: bytes = b"") -> None:
        self.head_sent = True
        self.pending_head = b""
        self._write(head + body if body else head)

    def feed(self, data: bytes) -> None:
        self.last_activity = asyncio.get_running_loop().time()
        if self.usage is not None:
            self.usage.feed(data)
        elif self.buffered_pieces is not None:
            self.buffered_pieces.append(data)
        if self.pending_head:
            self._send_head(self.pending_head, data)
        else:
            self._write(data)

    def _write(self, data: bytes) -> None:
        transport = self.client.transport
        if transport is not None:
            transport.write(data)
            self.sent += len(data)

    def client_drained(self, buffered: int) -> None:
        if self.conn is not None:
            self.conn.consumed(buffered)

    def complete(self) -> None:
        if not self.head_sent:  # an answer without a body (complete() may even come before its head)
            self._send_head(self.pending_head or self._answer_head())
        if self.lane.metrics is not None:
            usage = None
            if self.usage is not None:
                usage = self.usage.usage(decode_chunked)
            elif self.buffered_pieces:
                usage = parse_usage(b"".join(self.buffered_pieces))
            self.lane.metrics.usage(self.lease.profile, usage)
        self._end(self.status, keep_client=True, keep_upstream=True)

    def fail(self, error: UpstreamError) -> None:
        """The upstream connection broke (see `upstream_http` for where each error comes from)."""
        if isinstance(error, ConnectionDropped) and not self.head_sent:
            if error.reset or (error.reused and serving(self.lease)):
                # Never taken: a process that died, or a kept-alive connection that a live server had
                # just closed. The full path tells these apart, and sends the request again if it may.
                self._take_back()
                return
            # Closed after the request went out: it may be the request that killed it; not resent.
            profile = self.lease.profile
            self._fail(502, "upstream_unreachable", f"model {profile!r} did not take the request: {error}")
            return
        kind = "mid-stream" if isinstance(error, BodyFailed) else "mid-answer"
        self._fail(502, "upstream_failed", f"model {self.lease.profile!r} failed {kind}: {error}")

    # ---------------------------------------------------------------------------------------- watchdog

    def _stall_limit(self) -> float:
        server = self.lane.controller.config.server
        return server.stall_timeout if self.status else server.stall_timeout_prompt

    def _check_stall(self) -> None:
        """No byte from the upstream for too long: a wedged model. Time spent waiting for a slow
        client does not count."""
        self.timer = None
        loop = asyncio.get_running_loop()
        limit = self._stall_limit()
        quiet = loop.time() - self.last_activity
        if quiet < limit or self.buffered > HIGH_WATER:
            self.timer = loop.call_later(max(limit - quiet, 0.05), self._check_stall)
            return
        message = f"model {self.lease.profile!r} stalled: no output for {limit:g}s; it is being restarted"
        self.lane.controller.upstream_unhealthy(self.lease.upstream, message)
        self._fail(502, "upstream_stalled", message)

    # ---------------------------------------------------------------------------------------- endings

    def _fail(self, status: int, code: str, message: str) -> None:
        """End with an error: an OpenAI-shaped answer if nothing was sent yet, an SSE error event if a
        stream had begun, else a cut connection (the only signal a plain body has)."""
        log.warning("%s", message)
        if self.lane.metrics is not None:
            self.lane.metrics.error(self.lease.profile, code)
        if not self.head_sent:
            body = json.dumps(error_body(status, message, code=code)).encode()
            self.head_sent = True
            self.pending_head = b""
            self._write(
                b"HTTP/1.1 %d Bad Gateway\r\nContent-Type: application/json; charset=utf-8\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body)
            )
            self._end(status, keep_client=True, keep_upstream=False)
        elif self.sse and self.chunked:
            self._write(frame_chunk(sse_event(error_body(status, message, code=code))) + LAST_CHUNK)
            self._end(self.status, keep_client=True, keep_upstream=False)
        else:
            transport = self.client.transport
            if transport is not None:
                transport.abort()
            self._end(self.status, keep_client=False, keep_upstream=False)

    def client_left(self) -> None:
        """The client closed its connection: stop the upstream's work on it (closing it says so)."""
        self._end(CLIENT_CLOSED, keep_client=False, keep_upstream=False)

    def _take_back(self) -> None:
        """Give the request, unanswered, to the full path."""
        if not self._release(None, keep_upstream=False):
            return  # the client left meanwhile
        client = self.client
        client.exchange = None
        client.buffer = self.raw_request + client.buffer
        client.lend(len(self.raw_request))

    def _end(self, status: int, *, keep_client: bool, keep_upstream: bool) -> None:
        if self._release(status, keep_upstream=keep_upstream):
            path = self.target.decode("latin-1")
            log_request("POST", path, self.model, status, self.started, self.sent, self.client.peer)
            if self.client.exchange is self:
                self.client.exchange_done(reusable=keep_client)

    def _release(self, status: int | None, *, keep_upstream: bool) -> bool:
        """Hand back the lease and the upstream connection, once (False if that was done already);
        count the request unless it goes on elsewhere (`status` None)."""
        lease = self.lease
        if lease.released:
            return False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.answer = None
            if keep_upstream and conn.reusable and not conn.closed:
                self.lane.proxy.put_back(conn)
            else:
                conn.close()
        lane = self.lane
        lane.controller.release(lease)
        if lane.in_flight is not None:
            lane.in_flight.end()
        if status is not None and lane.metrics is not None:
            lane.metrics.request_done(lease.profile, status)
        return True


class AppSide(asyncio.Transport):
    """aiohttp's side of a client connection: to aiohttp's protocol, this is the connection's
    transport. Made when the connection's first request is lent, it lasts as long as the connection.

    A lent request's bytes are passed to the protocol (`feed`, up to the request's end: a body that
    aiohttp answered without reading still reaches it, so its parser stays in step); its answer goes
    straight to the client, and `ResponseEnd` tells when it is out. In between lent requests the
    protocol waits for its next request, as on an idle kept-alive connection, while the lane relays
    others. A `close()` from aiohttp (a `Connection: close` answer, an error) closes the client
    connection after the answer; one that comes while nothing is lent (its keep-alive timer) only
    lets the protocol go."""

    def __init__(self, client: ClientConnection) -> None:
        super().__init__()
        self.client = client
        self.unsent = 0  # bytes of the lent request not yet passed to aiohttp
        self.end = ResponseEnd()
        self.lent = False  # a request is lent and its answer not yet out
        self.close_wanted = False
        self.detached = False
        self.handler = cast(asyncio.Protocol, client.lane.app_protocol())
        self.handler.connection_made(self)

    def lend(self, data: bytes, length: int, *, no_body: bool) -> bytes:
        """Lend the request at the head of `data` (`length` bytes); what follows it."""
        self.lent = True
        self.end = ResponseEnd(no_body=no_body)
        self.unsent = length
        return self.feed(data)

    def feed(self, data: bytes) -> bytes:
        """Pass on what belongs to the lent request; return the rest."""
        take = data[: self.unsent]
        self.unsent -= len(take)
        if take and not self.detached:
            self.handler.data_received(take)
        return data[len(take) :]

    def detach(self, exc: Exception | None = None) -> None:
        """Tell aiohttp the connection is gone (the client left, or aiohttp no longer needs it)."""
        if not self.detached:
            self.detached = True
            self.handler.connection_lost(exc)

    def _answered(self) -> None:
        if self.lent:
            self.lent = False
            if self.client.app is self:
                self.client.answered()

    # ------------------------------------------------------------------------ transport, for aiohttp

    def write(self, data: bytes | bytearray | memoryview) -> None:
        transport = self.client.transport
        if self.detached or transport is None:
            return
        transport.write(data)
        if self.lent and not self.end.done and self.end.feed(bytes(data)):
            # On with the next request once aiohttp's handler has run to its next wait, not from
            # inside its write.
            asyncio.get_running_loop().call_soon(self._answered)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def is_closing(self) -> bool:
        transport = self.client.transport
        return self.detached or transport is None or transport.is_closing()

    def close(self) -> None:
        if self.detached:
            return
        if not self.lent:
            self.detach()  # idle: aiohttp lets its side go; the lane keeps the connection
            return
        self.close_wanted = True
        if not self.end.done:
            self.client.close()  # an answer cut short, or one that ends with the connection
        # else: _answered, already scheduled, closes the connection after the answer

    def abort(self) -> None:
        transport = self.client.transport
        if transport is not None:
            transport.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = self.client.transport
        return transport.get_extra_info(name, default) if transport is not None else default

    def pause_reading(self) -> None:
        if self.lent and self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.client.transport is not None:
            self.client.transport.resume_reading()

    def is_reading(self) -> bool:
        transport = self.client.transport
        return transport is not None and transport.is_reading()

    def get_write_buffer_size(self) -> int:
        transport = self.client.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.handler = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.handler


def _read_head(
    head: bytes,
) -> tuple[bytes, bytes, int, list[tuple[bytes, bytes]], bool, bool] | None:
    """(method, target, body length, headers as (lowercased name, line), close after, relayable) of
    a request whose end the lane can tell: HTTP/1.1, plainly formed, its body delimited by one
    `Content-Length` or absent. None for any other (chunked bodies, upgrades, HTTP/1.0, folded or
    oddly spaced headers): those are for aiohttp's strict parser alone. `relayable`: a POST to a
    model path with nothing asked of the server beyond relaying (no `Expect`, no `TE`)."""
    if head.count(b"\n") != head.count(b"\r\n"):
        return None  # bare line feeds
    lines = head.split(b"\r\n")
    request_line = lines[0].split(b" ")
    if len(request_line) != 3:
        return None
    method, target, version = request_line
    if version != b"HTTP/1.1" or not method.isalpha() or not method.isupper():
        return None
    length = -1
    close = False
    relayable = method == b"POST" and target in _PATHS
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name[-1:] in (b" ", b"\t") or name[:1] in (b" ", b"\t"):
            return None  # obsolete folding or space before the colon: not ours to interpret
        lower = name.lower()
        if lower == b"content-length":
            value = value.strip()
            if length >= 0 or not value.isdigit():
                return None
            length = int(value)
            continue
        if lower in _UNFRAMED:
            return None
        if lower in _NOT_RELAYED:
            relayable = False
        elif lower == b"connection":
            tokens = {token.strip().lower() for token in value.split(b",")}
            if b"upgrade" in tokens:
                return None
            close = b"close" in tokens
        headers.append((lower, line))
    if length < 0:
        relayable = False  # llama-server's POSTs carry a JSON body
        length = 0
    return method, target, length, headers, close, relayable


def _key_accepted(headers: list[tuple[bytes, bytes]], keys: KeyRing) -> bool:
    """Whether the request carries a key the ring accepts for an inference endpoint."""
    return keys.allows_inference(key_in_header_lines(headers))


def _model_of(body: bytes) -> str | None:
    try:
        payload: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    model = payload.get("model") if isinstance(payload, dict) else None
    return model if isinstance(model, str) and model else None
