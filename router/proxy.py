"""Request forwarding: pick the profile from the request, hold its upstream, stream the answer back.

Responses with a length are read whole (one write back, the common case for non-streamed answers);
everything else, SSE in particular, is passed through chunk by chunk as it arrives, never buffered.
Upstreams are reached with the lean client of `upstream_http`; a chunked answer that needs no
rewriting reaches an HTTP/1.1 client in the upstream's own framing, with no decoding on the way.

A streamed request that has to wait for its model (a load, a swap) gets its `200 text/event-stream`
answer early, with an SSE comment line (`: loading <model> …`) every `loading_comment_interval`
seconds until the upstream's first chunk: proxies and clients with idle timeouts keep the connection,
and SSE parsers ignore comments, so nothing enters the model's output. A failure after that point can
no longer change the status, so it arrives as an OpenAI-shaped `data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from aiohttp import web
from aiohttp.http_writer import StreamWriter
from multidict import CIMultiDict

from .access_log import MODEL_KEY
from .controller import Controller, Lease
from .errors import RouterError, error_body
from .metrics import UsageTail, parse_usage
from .scheduler import State
from .upstream_http import (
    LAST_CHUNK,
    Answer,
    ConnectFailed,
    ConnectionDropped,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
    decode_chunked,
    frame_chunk,
)

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("llama_router.proxy")

T = TypeVar("T")

# llama-server's inference and utility endpoints whose POST body names the model.
MODEL_POST_PATHS = (
    "/v1/chat/completions",
    "/chat/completions",
    "/v1/completions",
    "/completions",
    "/completion",
    "/v1/embeddings",
    "/embeddings",
    "/embedding",
    "/v1/rerank",
    "/rerank",
    "/v1/reranking",
    "/reranking",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/infill",
    "/tokenize",
    "/detokenize",
    "/apply-template",
)
# Upstream pages read with GET, routed by `?model=`.
MODEL_GET_PATHS = ("/props", "/v1/props", "/slots", "/lora-adapters")

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# The router's own keys mean nothing to an upstream; they are not passed on when the router checks them.
_AUTH_HEADERS = frozenset({"authorization", "x-api-key"})
_RESPONSE_DROP = _HOP_BY_HOP | {"date", "server"}
# The router has the whole body in hand before it sends it: no upstream should wait for a go-ahead.
_REQUEST_ONLY = frozenset({"expect"})
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_CLOSED = 499  # status counted for a client that left before its answer was complete
EXIT_GRACE = 0.5  # seconds a process that reset a connection has to show it exited
FALLBACK_HEADER = "X-Llama-Router-Fallback"  # "<asked for> -> <answered by>" when a fallback answers


def _forward_headers(headers: list[tuple[str, str]], drop: frozenset[str]) -> CIMultiDict[str]:
    return CIMultiDict([(key, value) for key, value in headers if key.lower() not in drop])


def _request_head(
    method: str,
    target: str,
    host: str,
    port: int,
    raw_headers: Any,
    body: bytes | None,
    drop: frozenset[bytes],
) -> bytes:
    """The request line and headers for the upstream: the client's headers minus hop-by-hop ones, with
    the upstream's Host and the length of the body the router holds."""
    parts = [f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode("latin-1")]
    for name, value in raw_headers:
        if name.lower() not in drop:
            parts += (name, b": ", value, b"\r\n")
    if body is not None:
        parts.append(b"Content-Length: %d\r\n" % len(body))
    parts.append(b"\r\n")
    return b"".join(parts)


def _take_framing(writer: Any) -> bool:
    """Make `writer` (a prepared chunked response's) send bytes as they are, so whole chunks from the
    upstream pass through in their own framing instead of being decoded and framed again."""
    if type(writer) is StreamWriter and writer.chunked and not getattr(writer, "_compress", None):
        writer.chunked = False
        return True
    return False


def parse_model_from_body(body: bytes) -> tuple[str, dict[str, Any]]:
    """The `model` a JSON body names; RouterError 400 for malformed or missing."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RouterError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise RouterError(400, "request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if model is None or model == "":
        raise RouterError(
            400, "the request has no 'model' field; say which model to use", code="missing_model"
        )
    if not isinstance(model, str):
        raise RouterError(400, "'model' must be a string", code="invalid_model")
    return model, payload


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class ModelRenamer:
    """Rewrites the `model` field llama-server writes into the id the client asked for.

    Works on raw bytes: non-streamed bodies in one go, streams line by line (a partial line is held
    back until its end arrives, so a name split across two reads is still found).
    """

    def __init__(self, served: str, requested: str) -> None:
        self.old = b'"model":' + json.dumps(served, ensure_ascii=False).encode()
        self.new = b'"model":' + json.dumps(requested, ensure_ascii=False).encode()
        self._pending = b""

    def whole(self, data: bytes) -> bytes:
        return data.replace(self.old, self.new)

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        cut = data.rfind(b"\n") + 1
        self._pending = data[cut:]
        return data[:cut].replace(self.old, self.new)

    def flush(self) -> bytes:
        data, self._pending = self._pending, b""
        return data.replace(self.old, self.new)


class _UpstreamGone(Exception):
    """The upstream's process died before it took the request; acquiring again starts a fresh one."""


def _abandon(task: asyncio.Future[Lease], controller: Controller) -> None:
    """Give up a pending acquire: cancel it, or hand back the lease it got just now."""
    if not task.done():
        task.cancel()
    elif not task.cancelled() and task.exception() is None:
        controller.release(task.result())


class Proxy:
    """Forwards client requests to the upstream their model names."""

    def __init__(
        self, controller: Controller, metrics: Metrics | None = None, *, strip_auth: bool = False
    ) -> None:
        self.controller = controller
        self.metrics = metrics
        self.strip_auth = strip_auth
        self._pool: UpstreamPool | None = None

    @property
    def strip_auth(self) -> bool:
        """Whether the client's Authorization/x-api-key headers are kept from the upstream: the router's
        keys are its own. Set again when a reload changes the keys; the header filter is built here,
        not per request."""
        return self._strip_auth

    @strip_auth.setter
    def strip_auth(self, strip: bool) -> None:
        self._strip_auth = strip
        drop = _HOP_BY_HOP | _REQUEST_ONLY | (_AUTH_HEADERS if strip else frozenset())
        self.request_drop = frozenset(name.encode() for name in drop)

    async def start(self) -> None:
        self._pool = UpstreamPool()

    # The pool, for the fast lane (router/fastlane.py), which speaks to upstreams on its own.

    def idle_connection(self, host: str, port: int) -> UpstreamConnection | None:
        assert self._pool is not None
        return self._pool.idle_connection(host, port)

    async def connect(self, host: str, port: int) -> UpstreamConnection:
        assert self._pool is not None
        return await self._pool.connect(host, port)

    def put_back(self, conn: UpstreamConnection) -> None:
        assert self._pool is not None
        self._pool.put_back(conn)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    @property
    def loading_interval(self) -> float:
        """Seconds between `: loading` comments (read each time: a config reload may change it)."""
        return self.controller.config.server.loading_comment_interval

    def profile_for(self, model: str) -> str:
        """The profile serving `model`, or a 404 that lists the known names."""
        name = self.controller.config.resolve_name(model)
        if name is None:
            known = ", ".join(sorted(self.controller.config.names))
            raise RouterError(
                404, f"model {model!r} not found; known models: {known}", code="model_not_found"
            )
        return name

    def _rejected(self, exc: RouterError) -> None:
        """Count a request turned away before it named a known model."""
        if self.metrics is not None:
            self.metrics.request_done(None, exc.status)
            self.metrics.error(None, exc.code)

    async def handle_post(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.read()
            model, payload = parse_model_from_body(body)
            request[MODEL_KEY] = model
            profile = self.profile_for(model)
        except RouterError as exc:
            self._rejected(exc)
            raise
        stream = payload.get("stream") is True
        return await self.forward(request, profile, body, requested=model, stream=stream)

    async def handle_get(self, request: web.Request) -> web.StreamResponse:
        model = request.query.get("model")
        try:
            if not model:
                raise RouterError(
                    400,
                    f"add ?model=<name> to say which model's {request.path} to read",
                    code="missing_model",
                )
            request[MODEL_KEY] = model
            profile = self.profile_for(model)
        except RouterError as exc:
            self._rejected(exc)
            raise
        return await self.forward(request, profile, None, requested=model)

    async def forward(
        self,
        request: web.Request,
        profile: str,
        body: bytes | None,
        *,
        requested: str | None = None,
        path: str | None = None,
        stream: bool = False,
    ) -> web.StreamResponse:
        """Hold `profile`'s upstream for the length of this request and relay its answer."""
        status = 500
        try:
            response = await self._forward(request, profile, body, requested, path, stream)
            status = response.status
            return response
        except RouterError as exc:
            status = exc.status
            if self.metrics is not None:
                self.metrics.error(profile, exc.code)
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            status = CLIENT_CLOSED
            raise
        finally:
            if self.metrics is not None:
                self.metrics.request_done(profile, status)

    async def _forward(
        self,
        request: web.Request,
        profile: str,
        body: bytes | None,
        requested: str | None,
        path: str | None,
        stream: bool,
    ) -> web.StreamResponse:
        started = asyncio.get_running_loop().time()
        if stream and self.loading_interval > 0 and not self._accepting(profile):
            acquiring = asyncio.ensure_future(self.controller.acquire(profile))
            try:
                await asyncio.wait({acquiring}, timeout=self.loading_interval)
            except asyncio.CancelledError:
                _abandon(acquiring, self.controller)
                raise
            if not acquiring.done():
                name = requested or profile
                return await self._stream_while_waiting(
                    request, profile, name, acquiring, body, path, requested, started
                )
            lease = self._lease(profile, acquiring, started)
        else:
            try:
                lease = await self.controller.acquire(profile)
            except RouterError:
                self._waited(profile, started)
                raise
        self._waited(profile, started)
        retried = False
        while True:
            try:
                return await self._relay(request, lease, body, path, requested)
            except _UpstreamGone:
                if retried:
                    raise RouterError(
                        502, f"model {profile!r} exited twice before taking the request", code="upstream_gone"
                    ) from None
                retried = True
            finally:
                self.controller.release(lease)
            # Nothing was sent to the client yet and the body is in hand: send it to a fresh upstream.
            lease = await self.controller.acquire(profile)

    def _accepting(self, profile: str) -> bool:
        """Whether `profile` takes requests right now (then acquiring needs no timer or task)."""
        view = self.controller.scheduler.view(profile)
        return view.state is State.READY and not view.draining

    def _lease(self, profile: str, acquired: asyncio.Future[Lease], started: float) -> Lease:
        """The lease of a finished acquire; its RouterError if it failed."""
        try:
            return acquired.result()
        except RouterError:
            self._waited(profile, started)
            raise

    def _waited(self, profile: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.waited(profile, asyncio.get_running_loop().time() - started)

    # ------------------------------------------------------------------------------------------ relay

    def _open(
        self, request: web.Request, lease: Lease, body: bytes | None, path: str | None, *, fresh: bool = False
    ) -> Any:
        """The upstream request, to await: it resolves once the upstream's status and headers came."""
        assert self._pool is not None
        upstream = lease.upstream
        method = request.method
        target = path if path is not None else request.rel_url.raw_path_qs
        head = _request_head(
            method, target, upstream.host, upstream.port, request.raw_headers, body, self.request_drop
        )
        return self._pool.request(
            upstream.host,
            upstream.port,
            head,
            body,
            # No byte for this long, waiting for the answer to begin, means a wedged upstream.
            timeout=self.controller.config.server.stall_timeout_prompt,
            no_body=method == "HEAD",
            fresh=fresh,
        )

    async def _send(self, request: web.Request, lease: Lease, body: bytes | None, path: str | None) -> Answer:
        """Send the request upstream and wait for its status.

        A connection refused or reset (the request never reached a live process) is how a crash often
        shows first: _UpstreamGone if the process has died (the caller sends the request to a fresh
        one), one more try if it lives (a keep-alive connection the server had just closed). A
        connection closed after the request went out may mean the request itself killed the server:
        never sent again, it is a 502 like any other failure."""
        if lease.fallback_for is not None and body:
            body = _naming(body, lease.profile)
        error: UpstreamError
        for attempt in (1, 2):
            try:
                answer: Answer = await self._open(request, lease, body, path, fresh=attempt == 2)
                return answer
            except UpstreamTimeout:
                stall = self.controller.config.server.stall_timeout_prompt
                raise RouterError(502, self._stalled(lease, stall), code="upstream_stalled") from None
            except (ConnectFailed, ConnectionDropped) as exc:
                error = exc
                if isinstance(exc, ConnectionDropped) and not exc.reset:
                    # Closed after the request went out: it is never sent again, unless it was a
                    # kept-alive connection of a process that goes on serving (the server closed
                    # it as the request arrived): then once more, on a new connection.
                    if exc.reused and attempt == 1 and serving(lease):
                        continue
                    break
                if await self._died(lease):
                    raise _UpstreamGone from None
                if isinstance(exc, ConnectFailed) or attempt == 2:
                    break
            except UpstreamError as exc:
                error = exc
                break
        raise RouterError(
            502, f"model {lease.profile!r} did not take the request: {error}", code="upstream_unreachable"
        )

    def _stalled(self, lease: Lease, seconds: float) -> str:
        """An upstream sent nothing for `seconds`: have it restarted; the message for the client."""
        message = f"model {lease.profile!r} stalled: no output for {seconds:g}s; it is being restarted"
        self.controller.upstream_unhealthy(lease.upstream, message)
        return message

    async def _died(self, lease: Lease) -> bool:
        """Whether the upstream's process has died, allowing it a moment: the kernel resets its
        connections while it exits, just before the exit can be seen."""
        upstream = lease.upstream
        if await self.controller.upstream_refused(upstream):
            return True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(upstream.gone.wait(), EXIT_GRACE)
        return await self.controller.upstream_refused(upstream)

    async def _relay(
        self,
        request: web.Request,
        lease: Lease,
        body: bytes | None,
        path: str | None,
        requested: str | None,
    ) -> web.StreamResponse:
        upstream = await self._send(request, lease, body, path)
        renamer = _renamer(lease, requested)
        try:  # (not `async with`: one coroutine less per request)
            headers = _forward_headers(upstream.raw_headers, _RESPONSE_DROP)
            if lease.fallback_for is not None:
                headers[FALLBACK_HEADER] = f"{lease.fallback_for} -> {lease.profile}"
            if upstream.content_length is not None:
                try:
                    data = await upstream.read(self.controller.config.server.stall_timeout_prompt)
                except UpstreamError as exc:
                    raise RouterError(
                        502, f"model {lease.profile!r} failed mid-answer: {exc}", code="upstream_failed"
                    ) from None
                if self.metrics is not None and upstream.status == 200:
                    self.metrics.usage(lease.profile, parse_usage(data))
                if renamer is not None:
                    data = renamer.whole(data)
                return web.Response(status=upstream.status, body=data, headers=headers)
            response = web.StreamResponse(status=upstream.status, headers=headers)
            is_sse = upstream.content_type.startswith("text/event-stream")
            writer = await response.prepare(request)
            framed = renamer is None and upstream.chunked and _take_framing(writer)
            chunks = upstream.pieces(framed=framed)
            await self._pump(request, response, lease, chunks, renamer, is_sse, framed=framed)
            return response
        finally:
            upstream.release()

    async def _pump(
        self,
        request: web.Request,
        response: web.StreamResponse,
        lease: Lease,
        chunks: AsyncIterator[bytes],
        renamer: ModelRenamer | None,
        is_sse: bool,
        *,
        framed: bool = False,
    ) -> None:
        """Copy the upstream's chunks to the client as they come; end with an error event (SSE) or a
        cut connection (other streams) when the upstream fails mid-way.

        `framed`: the chunks are whole HTTP chunks in their framing, last chunk included, and the
        response sends them as they are (see `_take_framing`)."""
        tail = UsageTail() if self.metrics is not None else None
        server = self.controller.config.server
        loop = asyncio.get_running_loop()
        stall = server.stall_timeout_prompt  # until the first chunk: prompt processing may be long
        try:
            # The stall timer runs only while waiting for the upstream, never while writing to a slow client.
            async with asyncio.timeout(stall) as timer:
                async for chunk in chunks:
                    timer.reschedule(None)
                    if tail is not None:
                        tail.feed(chunk)
                    data = renamer.feed(chunk) if renamer is not None else chunk
                    if data:
                        await response.write(data)
                    stall = server.stall_timeout
                    timer.reschedule(loop.time() + stall)
            if renamer is not None and (rest := renamer.flush()):
                await response.write(rest)
        except (TimeoutError, UpstreamError, aiohttp.ClientError) as exc:
            if isinstance(exc, ConnectionResetError):
                raise  # our client left; nothing to tell it
            if timer.expired():
                code, message = "upstream_stalled", self._stalled(lease, stall)
            else:
                code = "upstream_failed"
                message = f"model {lease.profile!r} failed mid-stream: {exc or type(exc).__name__}"
            log.warning("%s", message)
            if self.metrics is not None:
                self.metrics.error(lease.profile, code)
            if not is_sse:
                # Cut the connection: a truncated body is the only signal a plain stream has.
                if request.transport is not None:
                    request.transport.abort()
                return
            event = sse_event(error_body(502, message, code=code))
            await response.write(frame_chunk(event) + LAST_CHUNK if framed else event)
        if tail is not None and self.metrics is not None:
            self.metrics.usage(lease.profile, tail.usage(decode_chunked if framed else None))
        await response.write_eof()

    # ------------------------------------------------------------------------------------------ feedback

    async def _with_comments(
        self, response: web.StreamResponse, task: asyncio.Future[T], what: str, started: float
    ) -> T:
        """Await `task`, writing an SSE comment every `loading_interval` seconds until it is done."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.loading_interval)
                if done:
                    return task.result()
                elapsed = loop.time() - started
                await response.write(f": {what} … {elapsed:.0f}s\n\n".encode())
        except BaseException:
            if not task.done():
                task.cancel()
            raise

    async def _stream_while_waiting(
        self,
        request: web.Request,
        profile: str,
        name: str,
        acquiring: asyncio.Future[Lease],
        body: bytes | None,
        path: str | None,
        requested: str | None,
        started: float,
    ) -> web.StreamResponse:
        """Answer a streamed request whose model is not ready yet: SSE comments while it loads (and
        until its first chunk), then the upstream's stream; failures become error events."""
        response = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        lease: Lease | None = None
        try:
            await response.prepare(request)
            loading = f"loading {name}"
            await response.write(f": {loading} …\n\n".encode())
            retried = False
            while True:
                try:
                    lease = await self._with_comments(response, acquiring, loading, started)
                except RouterError as exc:
                    self._waited(profile, started)
                    return await self._fail_stream(response, profile, exc.body(), exc.code)
                if not retried:
                    self._waited(profile, started)
                try:
                    await self._relay_started(request, response, lease, body, path, requested, name, started)
                    return response
                except _UpstreamGone:
                    self.controller.release(lease)
                    lease = None
                    if retried:
                        message = f"model {profile!r} exited twice before taking the request"
                        error = error_body(502, message, code="upstream_gone")
                        return await self._fail_stream(response, profile, error, "upstream_gone")
                    retried = True
                    acquiring = asyncio.ensure_future(self.controller.acquire(profile))
        finally:
            if lease is not None:
                self.controller.release(lease)
            else:
                _abandon(acquiring, self.controller)

    async def _relay_started(
        self,
        request: web.Request,
        response: web.StreamResponse,
        lease: Lease,
        body: bytes | None,
        path: str | None,
        requested: str | None,
        name: str,
        started: float,
    ) -> None:
        """Relay the upstream's answer into a stream whose 200 and SSE headers are already sent."""
        renamer = _renamer(lease, requested)
        waiting = f"waiting for {name}"
        try:
            opening = asyncio.ensure_future(self._send(request, lease, body, path))
            upstream = await self._with_comments(response, opening, waiting, started)
        except RouterError as exc:
            await self._fail_stream(response, lease.profile, exc.body(), exc.code)
            return
        async with upstream:
            if upstream.status >= 400:
                await self._fail_stream(response, lease.profile, await self._error_of(upstream), None)
                return
            is_sse = upstream.content_type.startswith("text/event-stream")
            stall = self.controller.config.server.stall_timeout_prompt
            chunks = upstream.pieces(framed=False, timeout=stall)
            try:
                first = await self._with_comments(
                    response, asyncio.ensure_future(chunks.__anext__()), waiting, started
                )
            except StopAsyncIteration:
                await response.write_eof()
                return
            except (TimeoutError, UpstreamError, aiohttp.ClientError) as exc:
                if isinstance(exc, ConnectionResetError):
                    raise
                if isinstance(exc, UpstreamTimeout):
                    self._stalled(lease, stall)
                reason = exc or type(exc).__name__
                message = f"model {lease.profile!r} failed before its first chunk: {reason}"
                await self._fail_stream(
                    response, lease.profile, error_body(502, message, code="upstream_failed"), None
                )
                return
            await self._pump(request, response, lease, _prepend(first, chunks), renamer, is_sse)

    async def _error_of(self, upstream: Answer) -> dict[str, Any]:
        """An upstream's error answer as an OpenAI error object (its own when it sent one)."""
        try:
            data = await upstream.read(self.controller.config.server.stall_timeout_prompt)
        except UpstreamError:
            data = b""
        try:
            payload = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            payload = None
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            return payload
        text = data.decode("utf-8", "replace").strip() or upstream.reason or "error"
        return error_body(upstream.status, f"upstream answered {upstream.status}: {text}")

    async def _fail_stream(
        self, response: web.StreamResponse, profile: str, error: dict[str, Any], code: str | None
    ) -> web.StreamResponse:
        if self.metrics is not None:
            inner = error.get("error")
            found = inner.get("code") if isinstance(inner, dict) else None
            code = code or (found if isinstance(found, str) else None) or "upstream_error"
            self.metrics.error(profile, code)
        await response.write(sse_event(error))
        await response.write_eof()
        return response


def serving(lease: Lease) -> bool:
    """Whether the lease's upstream process lives and is not being stopped."""
    upstream = lease.upstream
    return not upstream.stopping and not upstream.gone.is_set() and upstream.is_alive()


def _naming(body: bytes, model: str) -> bytes:
    """The request body with `model` replaced: a fallback is asked under its own name."""
    payload = json.loads(body)
    payload["model"] = model
    return json.dumps(payload).encode()


def _renamer(lease: Lease, requested: str | None) -> ModelRenamer | None:
    """Rename answers to the id the client asked for; a fallback answers under its own name."""
    if not requested or lease.fallback_for is not None:
        return None
    served = lease.upstream.profile.served_name
    return ModelRenamer(served, requested) if requested != served else None


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk
