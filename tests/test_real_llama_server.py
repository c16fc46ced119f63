"""End to end with the real llama-server on two generated tiny models."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from .conftest import RouterFactory, upstream_processes


def real_profiles(models: tuple[Path, Path], binary: Path) -> dict[str, Any]:
    common = {"binary": str(binary), "args": ["--ctx-size", "512", "--parallel", "4", "--threads", "1"]}
    return {
        "tiny-a": {"model": str(models[0]), "aliases": ["alpha"], **common},
        "tiny-b": {"model": str(models[1]), **common},
    }


async def read_sse(response: Any) -> list[str]:
    """The `data:` payloads of an SSE stream, in order."""
    events = []
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            events.append(line[len("data: ") :])
    return events


async def test_chat_plain_and_streamed(
    start_router: RouterFactory, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    router = await start_router(real_profiles(tiny_models, llama_server))
    status, body = await router.chat("tiny-a")
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["model"] == "tiny-a"
    assert body["usage"]["completion_tokens"] > 0

    payload = {
        "model": "alpha",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 6,
    }
    async with router.session.post("/v1/chat/completions", json=payload) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = await read_sse(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["model"] == "alpha" for chunk in chunks), "every chunk names the id the client asked for"
    assert any(chunk.get("usage") for chunk in chunks)


async def test_native_endpoints_are_forwarded(
    start_router: RouterFactory, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    router = await start_router(real_profiles(tiny_models, llama_server))
    async with router.session.post("/tokenize", json={"model": "tiny-b", "content": "hi there"}) as response:
        assert response.status == 200
        tokens = (await response.json())["tokens"]
        assert tokens
    async with router.session.post("/detokenize", json={"model": "tiny-b", "tokens": tokens}) as response:
        assert response.status == 200
        assert "hi there" in (await response.json())["content"]
    async with router.session.post(
        "/completion", json={"model": "tiny-b", "prompt": "once", "n_predict": 4}
    ) as response:
        assert response.status == 200
        assert "content" in await response.json()
    async with router.session.post(
        "/apply-template", json={"model": "tiny-b", "messages": [{"role": "user", "content": "x"}]}
    ) as response:
        assert response.status == 200
        assert "<|im_start|>user" in (await response.json())["prompt"]
    async with router.session.get("/props", params={"model": "tiny-b"}) as response:
        assert response.status == 200
        assert (await response.json())["model_alias"] == "tiny-b"


async def test_swap_a_b_a_keeps_one_model_resident(
    start_router: RouterFactory, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    router = await start_router(real_profiles(tiny_models, llama_server), max_resident=1)
    pids = []
    for model in ("tiny-a", "tiny-b", "tiny-a"):
        status, body = await router.chat(model)
        assert status == 200 and body["model"] == model
        async with router.session.get("/running") as response:
            running = (await response.json())["running"]
        assert [row["model"] for row in running] == [model]
        pids.append(running[0]["pid"])
        assert len(upstream_processes()) == 1
    assert len(set(pids)) == 3, "each swap started a fresh process"


async def test_concurrent_requests_across_a_swap_are_all_served(
    start_router: RouterFactory, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    router = await start_router(real_profiles(tiny_models, llama_server), max_resident=1)
    models = ["tiny-a", "tiny-b"] * 6
    results = await asyncio.gather(*(router.chat(model, max_tokens=16) for model in models))
    for model, (status, body) in zip(models, results, strict=True):
        assert status == 200, body
        assert body["model"] == model
    starts = {view.name: view.starts for view in router.controller.views()}
    # Requests for the same model are batched: far fewer loads than requests.
    assert sum(starts.values()) <= 4, starts


async def test_listing_models_never_starts_a_process(
    start_router: RouterFactory, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    router = await start_router(real_profiles(tiny_models, llama_server))
    async with router.session.get("/v1/models") as response:
        assert response.status == 200
        listing = await response.json()
    assert listing["object"] == "list"
    assert [entry["id"] for entry in listing["data"]] == ["tiny-a", "tiny-b"]
    assert all(entry["status"]["value"] == "unloaded" for entry in listing["data"])
    assert upstream_processes() == []
