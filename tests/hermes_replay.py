"""Hermes Agent's requests at start-up against a local llama.cpp-style endpoint, replayed in its order.

Read from NousResearch/hermes-agent's main branch (0.21 to be), `agent/model_metadata.py`:
`get_model_context_length` for a custom local endpoint (`base_url` ending in `/v1`) either

- has no persisted context (a first start): `fetch_endpoint_model_metadata` runs the server-type
  waterfall `detect_local_server_type` (`/api/v1/models` LM Studio: any 200; `/api/tags` Ollama: 200
  with `models`; `/v1/props` then `/props` llama.cpp: 200 with `default_generation_settings`;
  `/version` vLLM: 200 with `version`), then `GET /v1/models` (a 401/403 ends it) and, for
  `owned_by: "llamacpp"`, `_apply_llamacpp_props`: bare `/v1/props` then `/props`, and only when both
  fail `/models` and `/v1/props?model=` then `/props?model=` of each loaded child; when that gave no
  context, `_query_local_context_length` (below) and Ollama's `POST /api/show`;
- or has one (a later start): `_reconcile_local_cached_context_length` asks the live server through
  `_query_local_context_length`: the waterfall, then `_llamacpp_context`: `/props?model=<id>` first
  ("answered by the router even for a not-yet-loaded model"), then bare `/props`; then
  `/v1/models/<id>` and `/v1/models`.

Every call carries the key in that version (`_auth_headers(api_key)`). `keyless_rounds` replays what
0.19 did instead: waterfall rounds without the key before the keyed calls (a round that finds the
server type is remembered, so no second one runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Call:
    method: str
    path: str
    keyed: bool
    status: int


@dataclass
class Replay:
    """Hermes Agent's start against a router: its requests, and what it concluded."""

    session: aiohttp.ClientSession
    key: str | None
    calls: list[Call] = field(default_factory=list)
    server_type: str | None = None

    async def get(
        self, path: str, params: dict[str, str] | None = None, *, keyed: bool = True
    ) -> tuple[int, Any, str]:
        headers = {"Authorization": f"Bearer {self.key}"} if keyed and self.key else {}
        async with self.session.get(path, params=params or None, headers=headers) as response:
            text = await response.text()
            self.calls.append(
                Call("GET", path + (f"?model={params['model']}" if params else ""), keyed, response.status)
            )
            try:
                body = await response.json(content_type=None)
            except ValueError:
                body = None
            return response.status, body, text

    async def post(self, path: str, body: Any, *, keyed: bool = True) -> int:
        headers = {"Authorization": f"Bearer {self.key}"} if keyed and self.key else {}
        async with self.session.post(path, json=body, headers=headers) as response:
            await response.read()
            self.calls.append(Call("POST", path, keyed, response.status))
            return response.status

    @property
    def errors(self) -> int:
        return sum(call.status >= 400 for call in self.calls)

    async def detect(self, *, keyed: bool = True) -> str | None:
        """`detect_local_server_type`: the first server type whose probe answers 200 and checks out."""
        if self.server_type is not None:
            return self.server_type  # remembered for the process (and 300 s on disk)
        waterfall: list[tuple[str, tuple[str, ...], Any]] = [
            ("lm-studio", ("/api/v1/models",), lambda body, text: True),
            ("ollama", ("/api/tags",), lambda body, text: isinstance(body, dict) and "models" in body),
            ("llamacpp", ("/v1/props", "/props"), lambda body, text: "default_generation_settings" in text),
            ("vllm", ("/version",), lambda body, text: isinstance(body, dict) and "version" in body),
        ]
        for name, paths, check in waterfall:
            for path in paths:
                status, body, text = await self.get(path, keyed=keyed)
                if status == 200:
                    break
            if status == 200 and check(body, text):
                self.server_type = name
                return name
        return None

    async def llamacpp_context(self, model: str) -> int | None:
        """`_llamacpp_context`: `/props?model=<id>`, then bare `/props`."""
        for params in ({"model": model}, {}):
            status, body, _ = await self.get("/props", params)
            if status != 200 or not isinstance(body, dict):
                continue
            n_ctx = (body.get("default_generation_settings") or {}).get("n_ctx")
            if isinstance(n_ctx, int) and n_ctx > 0:
                return n_ctx
        return None

    async def local_context(self, model: str) -> int | None:
        """`_query_local_context_length_uncached`: the typed probe, `/v1/models/<id>`, `/v1/models`."""
        if await self.detect() == "llamacpp":
            found = await self.llamacpp_context(model)
            if found is not None:
                return found
        status, body, _ = await self.get(f"/v1/models/{model}")
        if status == 200 and isinstance(body, dict) and isinstance(body.get("context_length"), int):
            return int(body["context_length"])
        status, body, _ = await self.get("/v1/models")
        if status == 200:
            for entry in body.get("data", []):
                if entry.get("id") == model and isinstance(entry.get("n_ctx"), int):
                    return int(entry["n_ctx"])
        return None

    async def endpoint_context(self, model: str) -> int | None:
        """`fetch_endpoint_model_metadata` and `_apply_llamacpp_props`, then the model's entry."""
        await self.detect()
        for path in ("/v1/models", "/models"):
            status, payload, _ = await self.get(path)
            if status in (401, 403):
                return None
            if status == 200:
                break
        else:
            return None
        cache = {entry["id"]: entry.get("context_length") for entry in payload.get("data", [])}
        if any(entry.get("owned_by") == "llamacpp" for entry in payload.get("data", [])):
            props = await self.props_pair({})
            if props is not None:
                alias, n_ctx = (
                    props.get("model_alias"),
                    (props.get("default_generation_settings") or {}).get("n_ctx"),
                )
                if n_ctx and alias in cache:
                    cache[alias] = n_ctx
            else:
                status, native, _ = await self.get("/models")
                for child in native.get("data", []) if status == 200 else []:
                    if child["id"] in cache and child["status"]["value"] in ("loaded", "ready"):
                        props = await self.props_pair({"model": child["id"]})
                        n_ctx = (props or {}).get("default_generation_settings", {}).get("n_ctx")
                        if n_ctx:
                            cache[child["id"]] = n_ctx
        found = cache.get(model)
        return found if isinstance(found, int) else None

    async def props_pair(self, params: dict[str, str]) -> dict[str, Any] | None:
        """`_props`: `/v1/props`, and `/props` when that is an error."""
        for path in ("/v1/props", "/props"):
            status, body, _ = await self.get(path, params)
            if status < 400:
                return body if isinstance(body, dict) else None
        return None

    async def start(self, model: str, *, cached: int | None = None, keyless_rounds: int = 0) -> int | None:
        """One start of Hermes Agent for `model`: its context length as Hermes concludes it."""
        for _ in range(keyless_rounds):
            if await self.detect(keyed=False) is not None:
                break
        if cached is not None:
            return await self.local_context(model) or cached
        found = await self.endpoint_context(model)
        if found is not None:
            return found
        found = await self.local_context(model)
        if found is not None:
            return found
        await self.post("/api/show", {"name": model})
        return None
