"""Request forwarding: pick the profile from the request, hold its upstream, stream the answer back.

Responses with a length are read whole (one write back, the common case for non-streamed answers);
everything else, SSE in particular, is passed through chunk by chunk as it arrives, never buffered.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from .controller import Controller, Lease
from .errors import RouterError, error_body

log = logging.getLogger("llama_router.proxy")

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
MODEL_GET_PATHS = ("/props", "/v1/props", "/slots")

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
_RESPONSE_DROP = _HOP_BY_HOP | {"date", "server"}


def _forward_headers(headers: Any, drop: frozenset[str]) -> CIMultiDict[str]:
    return CIMultiDict((key, value) for key, value in headers.items() if key.lower() not in drop)


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


class Proxy:
    """Forwards client requests to the upstream their model names."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, enable_cleanup_closed=False),
            auto_decompress=False,
            trust_env=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def profile_for(self, model: str) -> str:
        """The profile serving `model`, or a 404 that lists the known names."""
        name = self.controller.config.resolve_name(model)
        if name is None:
            known = ", ".join(sorted(self.controller.config.names))
            raise RouterError(
                404, f"model {model!r} not found; known models: {known}", code="model_not_found"
            )
        return name

    async def handle_post(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        model, _ = parse_model_from_body(body)
        return await self.forward(request, self.profile_for(model), body, requested=model)

    async def handle_get(self, request: web.Request) -> web.StreamResponse:
        model = request.query.get("model")
        if not model:
            raise RouterError(
                400, f"add ?model=<name> to say which model's {request.path} to read", code="missing_model"
            )
        return await self.forward(request, self.profile_for(model), None, requested=model)

    async def forward(
        self,
        request: web.Request,
        profile: str,
        body: bytes | None,
        *,
        requested: str | None = None,
        path: str | None = None,
    ) -> web.StreamResponse:
        """Hold `profile`'s upstream for the length of this request and relay its answer."""
        served = self.controller.config.profiles[profile].served_name
        renamer = ModelRenamer(served, requested) if requested and requested != served else None
        lease = await self.controller.acquire(profile)
        try:
            return await self._relay(request, lease, body, path, renamer)
        finally:
            self.controller.release(lease)

    async def _relay(
        self,
        request: web.Request,
        lease: Lease,
        body: bytes | None,
        path: str | None,
        renamer: ModelRenamer | None,
    ) -> web.StreamResponse:
        assert self._session is not None
        url = lease.upstream.base_url + (path if path is not None else request.rel_url.raw_path_qs)
        try:
            upstream = await self._session.request(
                request.method,
                url,
                data=body,
                headers=_forward_headers(request.headers, _HOP_BY_HOP),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            )
        except aiohttp.ClientError as exc:
            raise RouterError(
                502, f"model {lease.profile!r} did not take the request: {exc}", code="upstream_unreachable"
            ) from None
        async with upstream:
            headers = _forward_headers(upstream.headers, _RESPONSE_DROP)
            if upstream.headers.get("Content-Length") is not None:
                try:
                    data = await upstream.read()
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    raise RouterError(
                        502, f"model {lease.profile!r} failed mid-answer: {exc}", code="upstream_failed"
                    ) from None
                if renamer is not None:
                    data = renamer.whole(data)
                return web.Response(status=upstream.status, body=data, headers=headers)
            return await self._stream(request, lease, upstream, headers, renamer)

    async def _stream(
        self,
        request: web.Request,
        lease: Lease,
        upstream: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        renamer: ModelRenamer | None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, headers=headers)
        is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                data = renamer.feed(chunk) if renamer is not None else chunk
                if data:
                    await response.write(data)
            if renamer is not None and (rest := renamer.flush()):
                await response.write(rest)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            message = f"model {lease.profile!r} failed mid-stream: {exc or type(exc).__name__}"
            log.warning("%s", message)
            if not is_sse:
                # Cut the connection: a truncated body is the only signal a plain stream has.
                if request.transport is not None:
                    request.transport.abort()
                return response
            event = error_body(502, message, code="upstream_failed")
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await response.write_eof()
        return response
