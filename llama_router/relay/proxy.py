"""Request forwarding: pick the profile from the request, hold its upstream, stream the answer back.

The rules (which paths, which headers, stall limits, when to send again, renaming, usage) are in
`request_rules`; this module applies them to aiohttp's requests and responses. Answers with a length
are read whole and sent in one write (the common case for non-streamed answers); everything else,
SSE in particular, is passed on as it arrives, never buffered. Upstreams are reached with the lean
client of `upstream_http`.

A streamed request that has to wait for its model (a load, a swap) gets its `200 text/event-stream`
answer early, with an SSE comment line (`: loading <model> …`) every `loading_comment_interval`
seconds until the upstream's first chunk: proxies and clients with idle timeouts keep the connection,
and SSE parsers ignore comments, so nothing enters the model's output (`loading_feedback: reasoning`
sends a chat's loading progress as `reasoning_content` deltas instead; see loading_feedback.py). A
failure after that point can no longer change the status, so it arrives as an OpenAI-shaped
`data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Any, TypeVar

from aiohttp import web

from llama_router.core.errors import RouterError, error_body
from llama_router.core.scheduler import ProfileView
from llama_router.relay.loading_feedback import CHAT_PATHS, LoadingFeedback, Progress, strip_loading_lines
from llama_router.relay.request_rules import (
    EXIT_GRACE,
    PEER_DROP,
    SSE_HEADERS,
    WHOLE_PARSE_UP_TO,
    ModelRenamer,
    RequestRecord,
    Resend,
    UsageTail,
    answer_headers,
    as_fallback,
    exited_twice,
    failed_mid_answer,
    model_in_body,
    model_in_query,
    not_taken,
    parse_timings,
    parse_usage,
    profile_for,
    renamer,
    request_drop,
    resend,
    resend_to_live,
    stall_limit,
    stalled,
    upstream_head,
)
from llama_router.upstream.controller import Controller, Lease
from llama_router.upstream.downloads import PendingModel
from llama_router.upstream.upstream_http import Answer, Pieces, UpstreamError, UpstreamTimeout

# Each request's record, on the request.
RECORD: web.RequestKey[RequestRecord] = web.RequestKey("llama_router.record", RequestRecord)

log = logging.getLogger("llama_router.proxy")

T = TypeVar("T")


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


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

    def __init__(self, controller: Controller, *, strip_auth: bool = False) -> None:
        self.controller = controller
        self.strip_auth = strip_auth

    @property
    def strip_auth(self) -> bool:
        """Whether the client's Authorization/x-api-key headers are kept from the upstream: the router's
        keys are its own. Set again when a reload changes the keys; the header filter is built here,
        not per request."""
        return self._strip_auth

    @strip_auth.setter
    def strip_auth(self, strip: bool) -> None:
        self._strip_auth = strip
        self.request_drop = request_drop(strip_auth=strip)

    @property
    def loading_interval(self) -> float:
        """Seconds between `: loading` comments (read each time: a config reload may change it)."""
        return self.controller.config.server.loading_comment_interval

    def profile_for(self, model: str) -> str:
        """The profile serving `model`, or a 404 that lists the known names."""
        return profile_for(self.controller.config, model)

    def route_for(self, model: str) -> str:
        """The profile serving `model`, else the route of a peer's model (`<peer>/<model>`), or a 404."""
        return profile_for(self.controller.config, model, self.controller.peers)

    async def model_in_body(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        """The profile a request's JSON body names, and the body parsed (recorded for the log)."""
        model, payload = model_in_body(await request.read())
        request[RECORD].model = model
        return self.profile_for(model), payload

    async def handle_post(self, request: web.Request) -> web.StreamResponse:
        record = request[RECORD]
        record.for_model = True
        body = await request.read()
        model, payload = model_in_body(body)
        record.model = model
        stream = payload.get("stream") is True
        if request.path in CHAT_PATHS and len(body) <= WHOLE_PARSE_UP_TO and strip_loading_lines(payload):
            body = json.dumps(payload, ensure_ascii=False).encode()  # parsed whole: nothing else changes
        download = self._download_of(model)
        profile = model if download is not None else self.route_for(model)
        return await self.forward(request, profile, body, requested=model, stream=stream, download=download)

    async def handle_get(self, request: web.Request) -> web.StreamResponse:
        record = request[RECORD]
        record.for_model = True
        model = record.model = model_in_query(request.path, request.query.get("model"))
        download = self._download_of(model)
        profile = model if download is not None else self.route_for(model)
        return await self.forward(request, profile, None, requested=model, download=download)

    def _download_of(self, model: str) -> PendingModel | None:
        """The download under way of a model no profile serves yet (POST /models): a request for
        it waits for the download, then for the load."""
        download = self.controller.downloads.get(model)
        if download is None or self.controller.config.resolve_name(model) is not None:
            return None
        return download

    async def forward(
        self,
        request: web.Request,
        profile: str,
        body: bytes | None,
        *,
        requested: str | None = None,
        path: str | None = None,
        stream: bool = False,
        download: PendingModel | None = None,
    ) -> web.StreamResponse:
        """Hold `profile`'s upstream for the length of this request and relay its answer (once
        `download`, where the model is still being downloaded, has ended: its `wait_timeout`
        counts from then)."""
        record = request[RECORD]
        record.for_model = True
        record.profile = profile
        if record.model is None:
            record.model = profile
        started = self.controller.now()
        client = _client_of(request)
        # When it reached the router, on the controller's clock: it keeps its place before requests
        # for other models that the scheduler hears of first.
        arrived = started - (time.perf_counter() - record.started)
        # A stream that will wait for its model gets its head and loading comments meanwhile (the
        # check costs a request that is not streamed nothing: `take` looks for itself).
        waits = (download is not None or not self.controller.accepting(profile)) if stream else False
        if waits and self.loading_interval > 0:
            feedback = self._feedback(request, profile, requested or profile)
            acquiring = asyncio.ensure_future(
                self._acquire_in_line(profile, feedback, client, arrived, download)
            )
            try:
                await asyncio.wait({acquiring}, timeout=self.loading_interval)
            except asyncio.CancelledError:
                _abandon(acquiring, self.controller)
                raise
            if not acquiring.done():
                return await self._stream_while_waiting(
                    request, profile, feedback, acquiring, body, path, requested, started, download
                )
            lease = self._lease(request, acquiring, started)
        else:
            try:
                if download is not None:
                    await download.arrived()
                taken = self.controller.take(profile, client=client, arrived=arrived)
                lease = taken if isinstance(taken, Lease) else await taken
            except RouterError:
                self._waited(request, started)
                raise
        self._waited(request, started)
        retried = False
        while True:
            try:
                return await self._relay(request, lease, body, path, requested, stream)
            except _UpstreamGone:
                if retried:
                    raise exited_twice(profile) from None
                retried = True
            finally:
                self.controller.release(lease)
            # Nothing was sent to the client yet and the body is in hand: send it to a fresh upstream.
            lease = await self.controller.acquire(profile, client=client)

    def _lease(self, request: web.Request, acquired: asyncio.Future[Lease], started: float) -> Lease:
        """The lease of a finished acquire; its RouterError if it failed."""
        try:
            return acquired.result()
        except RouterError:
            self._waited(request, started)
            raise

    def _waited(self, request: web.Request, started: float) -> None:
        """Record how long the request waited for its model (the first wait only)."""
        record = request[RECORD]
        if record.waited is None:
            record.waited = self.controller.now() - started

    # ------------------------------------------------------------------------------------------ relay

    async def _send(self, request: web.Request, lease: Lease, body: bytes | None, path: str | None) -> Answer:
        """Send the request upstream and wait for its status; sent again only as `resend` allows."""
        request[RECORD].served_by = lease.profile
        if lease.ask_as is not None and body:
            body = as_fallback(body, lease.ask_as)
        upstream = lease.target
        method = request.method
        target = upstream.request_target(
            path if path is not None else request.rel_url.raw_path_qs, lease.ask_as, bool(body)
        )
        drop = self.request_drop if upstream.takes_client_key else PEER_DROP
        head = upstream_head(
            method, target, upstream.authority, request.raw_headers, body, drop, upstream.credentials
        )
        pool, patience = upstream.pool, upstream.patience()
        limit = stall_limit(self.controller.config.server, first_byte=False)
        attempt = 1
        sent_before = False
        sent_at = time.monotonic()
        while True:
            try:
                answer = await pool.request(
                    upstream.address,
                    head,
                    body,
                    timeout=limit,
                    patience=patience,
                    no_body=method == "HEAD",
                    fresh=attempt > 1,
                )
            except UpstreamTimeout:
                raise self._stalled(lease, limit) from None
            except UpstreamError as exc:
                action = resend(exc, attempt, serving=upstream.serving(), sent_before=sent_before)
                sent_before = action is Resend.SAME_UPSTREAM
                if action is Resend.IF_EXITED:
                    if await self._died(lease):
                        raise _UpstreamGone from None
                    if not resend_to_live(exc, attempt):
                        raise self._failed(lease, not_taken(lease.profile, exc)) from None
                elif action is Resend.NEVER:
                    raise self._failed(lease, not_taken(lease.profile, exc)) from None
            else:
                upstream.answered(time.monotonic() - sent_at)
                return answer
            attempt += 1

    def _stalled(self, lease: Lease, seconds: float) -> RouterError:
        """An upstream sent nothing for `seconds`: have it restarted (a peer: marked down); the error
        for the client."""
        error = stalled(lease.profile, seconds, then=lease.target.after_stall)
        lease.target.unhealthy(error.message)
        return error

    def _broke_off(self, lease: Lease, exc: UpstreamError, limit: float) -> RouterError:
        """The error for a client whose upstream broke off an answer under way: silent past `limit`
        (a stall), or failed."""
        if isinstance(exc, UpstreamTimeout):
            return self._stalled(lease, limit)
        return self._failed(lease, failed_mid_answer(lease.profile, exc))

    def _failed(self, lease: Lease, error: RouterError) -> RouterError:
        """An exchange with the upstream failed: for a peer, its health notes it and the error names
        it and where it is; the error for the client."""
        where = lease.target.failed(error.message)
        return RouterError(error.status, error.message + where, code=error.code) if where else error

    async def _died(self, lease: Lease) -> bool:
        """Whether the lease's target is gone (a process of ours that exited)."""
        return await lease.target.died(EXIT_GRACE)

    async def _relay(
        self,
        request: web.Request,
        lease: Lease,
        body: bytes | None,
        path: str | None,
        requested: str | None,
        stream: bool = False,
    ) -> web.StreamResponse:
        if stream and lease.target.quiet_loads and self.loading_interval > 0:
            # A peer may be loading the model: its answer may be long in coming, and it may say
            # nothing meanwhile. Past `loading_interval` the client gets its stream's head and
            # comments, as for a local load.
            opening = asyncio.ensure_future(self._send(request, lease, body, path))
            try:
                await asyncio.wait({opening}, timeout=self.loading_interval)
            except asyncio.CancelledError:
                _drop_opening(opening)
                raise
            if not opening.done():
                return await self._stream_opening(request, lease, opening, requested or lease.profile)
            upstream = opening.result()
        else:
            upstream = await self._send(request, lease, body, path)
        rename = _renamer(lease, requested)
        try:  # (not `async with`: one coroutine less per request)
            fallback = f"{lease.fallback_for} -> {lease.profile}" if lease.fallback_for is not None else None
            headers = answer_headers(upstream.raw_headers, fallback)
            if upstream.content_length is not None:
                limit = stall_limit(self.controller.config.server, first_byte=False)
                try:
                    data = await upstream.read(limit)
                except UpstreamError as exc:
                    raise self._broke_off(lease, exc, limit) from None
                whole = web.Response(
                    status=upstream.status,
                    body=rename.whole(data) if rename is not None else data,
                    headers=headers,
                )
                # Sent before the lease is released and usage and timings are read: none holds up the client.
                await whole.prepare(request)
                await whole.write_eof()
                if upstream.status == 200:
                    record = request[RECORD]
                    record.usage, record.timings = parse_usage(data), parse_timings(data)
                return whole
            response = web.StreamResponse(status=upstream.status, headers=headers)
            is_sse = upstream.content_type.startswith("text/event-stream")
            await response.prepare(request)
            chunks = upstream.pieces(stall_limit(self.controller.config.server, first_byte=False))
            await self._pump(request, response, lease, chunks, rename, is_sse)
            return response
        finally:
            upstream.release()

    async def _pump(
        self,
        request: web.Request,
        response: web.StreamResponse,
        lease: Lease,
        chunks: Pieces,
        rename: ModelRenamer | None,
        is_sse: bool,
        first: bytes | None = None,
    ) -> None:
        """Copy the upstream's chunks (`first`, if one was read already) to the client as they come;
        end with an error event (SSE) or a cut connection (other streams) when the upstream fails
        mid-way. The stall limit counts only waits for the upstream, never writes to a slow client."""
        tail = UsageTail()
        record = request[RECORD]
        server = self.controller.config.server
        try:
            async for chunk in chunks if first is None else _prepend(first, chunks):
                if record.first_byte is None:
                    record.first_byte = time.perf_counter()
                tail.feed(chunk)
                data = rename.feed(chunk) if rename is not None else chunk
                if data:
                    await response.write(data)
                chunks.timeout = stall_limit(server, first_byte=True)
            if rename is not None and (rest := rename.flush()):
                await response.write(rest)
        except UpstreamError as exc:
            error = self._broke_off(lease, exc, chunks.timeout or 0)
            log.warning("%s", error.message)
            request[RECORD].error = error.code
            if not is_sse:
                # Cut the connection: a truncated body is the only signal a plain stream has.
                if request.transport is not None:
                    request.transport.abort()
                return
            await response.write(sse_event(error.body()))
        await response.write_eof()
        record.usage, record.timings = tail.usage(), tail.timings()

    # ------------------------------------------------------------------------------------------ feedback

    def _feedback(self, request: web.Request, profile: str, name: str) -> LoadingFeedback:
        """How this waiting stream hears of its model's progress (see loading_feedback.py)."""
        config = self.controller.config
        profiled = config.profiles.get(profile)  # none yet for a model being downloaded
        how = profiled.loading_feedback if profiled is not None else config.server.loading_feedback
        return LoadingFeedback(name, request.path in CHAT_PATHS and how == "reasoning")

    def _progress(self, profile: str, download: PendingModel | None) -> Progress | None:
        """How far the model a request waits for has come: its download, then its load (where its
        llama-server reports that)."""
        if download is not None and not download.ended.done():
            fraction = download.fraction
            return Progress("Downloading", int(fraction * 100) if fraction is not None else None)
        load = self.controller.load_progress(profile)
        return Progress("Loading", load.percent) if load is not None else None

    async def _acquire_in_line(
        self,
        profile: str,
        feedback: LoadingFeedback,
        client: Hashable | None,
        arrived: float | None = None,
        download: PendingModel | None = None,
    ) -> Lease:
        """Acquire `profile` (once `download` has ended), noting the request's place in its queue in
        the very step it joins it (the controller queues it before its first await), so requests
        arriving together differ."""
        if download is not None:
            await download.arrived()
        feedback.position = self.controller.view(profile).waiting + 1
        return await self.controller.acquire(profile, client=client, arrived=arrived)

    def _view(self, profile: str) -> ProfileView | None:
        try:
            return self.controller.view(profile)
        except KeyError:  # removed by a reload meanwhile
            return None

    async def _with_feedback(
        self,
        response: web.StreamResponse,
        task: asyncio.Future[T],
        message: Callable[[float], bytes],
        started: float,
    ) -> T:
        """Await `task`, writing `message(seconds waited)` every `loading_interval` seconds meanwhile."""
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.loading_interval)
                if done:
                    return task.result()
                await response.write(message(self.controller.now() - started))
        except BaseException:
            if not task.done():
                task.cancel()
            raise

    async def _stream_while_waiting(
        self,
        request: web.Request,
        profile: str,
        feedback: LoadingFeedback,
        acquiring: asyncio.Future[Lease],
        body: bytes | None,
        path: str | None,
        requested: str | None,
        started: float,
        download: PendingModel | None = None,
    ) -> web.StreamResponse:
        """Answer a streamed request whose model is not ready yet: progress while it loads (SSE
        comments, or reasoning deltas), comments until its first chunk, then the upstream's stream;
        failures become error events."""
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        lease: Lease | None = None
        try:
            await response.prepare(request)
            await response.write(feedback.begin())
            retried = False
            while True:
                try:
                    lease = await self._with_feedback(
                        response,
                        acquiring,
                        lambda elapsed: feedback.loading(
                            elapsed, self._view(profile), self._progress(profile, download)
                        ),
                        started,
                    )
                except RouterError as exc:
                    self._waited(request, started)
                    return await self._fail_stream(request, response, exc.body(), exc.code)
                self._waited(request, started)
                if ready := feedback.ready(self.controller.now() - started):
                    await response.write(ready)
                try:
                    await self._relay_started(
                        request, response, lease, body, path, requested, feedback, started
                    )
                    return response
                except _UpstreamGone:
                    self.controller.release(lease)
                    lease = None
                    if retried:
                        error = exited_twice(profile)
                        return await self._fail_stream(request, response, error.body(), error.code)
                    retried = True
                    acquiring = asyncio.ensure_future(
                        self._acquire_in_line(profile, feedback, _client_of(request))
                    )
        finally:
            if lease is not None:
                self.controller.release(lease)
            else:
                _abandon(acquiring, self.controller)

    async def _stream_opening(
        self, request: web.Request, lease: Lease, opening: asyncio.Future[Answer], name: str
    ) -> web.StreamResponse:
        """Answer a stream whose upstream (a peer) has not answered yet: the head and comments now,
        then its stream, as for a model that loads here."""
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        feedback = LoadingFeedback(name, False)
        try:
            await response.prepare(request)
            await response.write(feedback.begin())
        except BaseException:
            _drop_opening(opening)
            raise
        started = self.controller.now()
        await self._relay_started(request, response, lease, None, None, name, feedback, started, opening)
        return response

    async def _relay_started(
        self,
        request: web.Request,
        response: web.StreamResponse,
        lease: Lease,
        body: bytes | None,
        path: str | None,
        requested: str | None,
        feedback: LoadingFeedback,
        started: float,
        opening: asyncio.Future[Answer] | None = None,
    ) -> None:
        """Relay the upstream's answer into a stream whose 200 and SSE headers are already sent
        (`opening`: the request already sent, its answer awaited)."""
        rename = _renamer(lease, requested)
        try:
            if opening is None:
                opening = asyncio.ensure_future(self._send(request, lease, body, path))
            upstream = await self._with_feedback(response, opening, feedback.waiting, started)
        except RouterError as exc:
            await self._fail_stream(request, response, exc.body(), exc.code)
            return
        async with upstream:
            if upstream.status >= 400:
                await self._fail_stream(request, response, await self._error_of(upstream), None)
                return
            is_sse = upstream.content_type.startswith("text/event-stream")
            limit = stall_limit(self.controller.config.server, first_byte=False)
            chunks = upstream.pieces(timeout=limit)
            try:
                first = await self._with_feedback(
                    response, asyncio.ensure_future(chunks.__anext__()), feedback.waiting, started
                )
            except StopAsyncIteration:
                await response.write_eof()
                return
            except UpstreamError as exc:
                error = self._broke_off(lease, exc, limit)
                await self._fail_stream(request, response, error.body(), error.code)
                return
            await self._pump(request, response, lease, chunks, rename, is_sse, first)

    async def _error_of(self, upstream: Answer) -> dict[str, Any]:
        """An upstream's error answer as an OpenAI error object (its own when it sent one)."""
        try:
            data = await upstream.read(stall_limit(self.controller.config.server, first_byte=False))
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
        self, request: web.Request, response: web.StreamResponse, error: dict[str, Any], code: str | None
    ) -> web.StreamResponse:
        inner = error.get("error")
        found = inner.get("code") if isinstance(inner, dict) else None
        request[RECORD].error = code or (found if isinstance(found, str) else None) or "upstream_error"
        await response.write(sse_event(error))
        await response.write_eof()
        return response


def _client_of(request: web.Request) -> Hashable | None:
    """The client's connection (its address and port), which the scheduler uses to tell a client
    switching models from one coming back to its own."""
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    return tuple(peer) if isinstance(peer, (tuple, list)) and peer else None


def _renamer(lease: Lease, requested: str | None) -> ModelRenamer | None:
    if lease.target.listed_as is not None and lease.fallback_for is not None:
        return renamer(lease.served_name, lease.target.listed_as, fallback=False)
    return renamer(lease.served_name, requested, fallback=lease.fallback_for is not None)


def _drop_opening(opening: asyncio.Future[Answer]) -> None:
    """Give up a request sent to an upstream whose answer is no longer wanted."""
    if not opening.done():
        opening.cancel()
    elif not opening.cancelled() and opening.exception() is None:
        opening.result().release()


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk
