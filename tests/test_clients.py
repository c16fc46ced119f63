"""Real clients against the router: the official OpenAI SDK, and replays of Open WebUI and Hermes Agent.

The replays send what those clients were observed to send (see DESIGN.md, "Clients we must serve
well") and check each answer's shape the way the client reads it.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from llama_router.relay.loading_feedback import MARK
from tests.make_tiny_models import make_model

from .conftest import RouterFactory, RunningRouter, fake_profile, upstream_processes
from .hermes_replay import Replay

CHAT = "/v1/chat/completions"
HERMES_MINIMUM_CONTEXT = 64_000


def real_profiles(models: tuple[Path, Path], binary: Path) -> dict[str, Any]:
    common = {"binary": str(binary), "args": ["--ctx-size", "512", "--parallel", "2", "--threads", "1"]}
    return {
        "tiny-a": {"model": str(models[0]), "aliases": ["alpha"], **common},
        "tiny-b": {"model": str(models[1]), **common},
    }


def sdk(router: RunningRouter, api_key: str = "sk-unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=router.url + "/v1", api_key=api_key, max_retries=0, timeout=60)


def tools(count: int, description_bytes: int) -> list[dict[str, Any]]:
    """`count` function tools whose descriptions add up to about `description_bytes`."""
    text = ("Look things up and report back precisely. " * (description_bytes // count // 40 + 1))[
        : description_bytes // count
    ]
    return [
        {
            "type": "function",
            "function": {
                "name": f"tool_{index}",
                "description": text,
                "parameters": {
                    "type": "object",
                    "properties": {"query": {"type": "string", "description": "what to look up"}},
                    "required": ["query"],
                },
            },
        }
        for index in range(count)
    ]


async def read_stream(response: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    """A chat stream as a client reads it: `data:` events in order, ending with `[DONE]`."""
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = []
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            events.append(line[len("data: ") :])
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(event) for event in events[:-1]]


# ---------------------------------------------------------------------------------------------- openai SDK


async def test_openai_sdk_lists_chats_streams_and_gets_not_found(
    start_router: RouterFactory, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    router = await start_router(real_profiles(tiny_models, llama_server))
    async with sdk(router) as client:
        models = [model async for model in client.models.list()]
        assert [model.id for model in models] == ["tiny-a", "tiny-b"]
        assert all(model.owned_by == "llamacpp" for model in models)
        assert (models[0].model_extra or {})["status"] == {"value": "unloaded", "detail": "unloaded"}
        assert (await client.models.retrieve("tiny-b")).id == "tiny-b"
        assert upstream_processes() == [], "listing started nothing"

        answer = await client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
        assert answer.model == "alpha", "the answer names the id the client asked for"
        assert answer.choices[0].message.role == "assistant"
        assert answer.usage is not None and answer.usage.completion_tokens > 0

        stream = await client.chat.completions.create(
            model="tiny-b",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks and all(chunk.model == "tiny-b" for chunk in chunks)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])
        assert caught.value.status_code == 404
        assert caught.value.code == "model_not_found"
        assert "tiny-a" in caught.value.message
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("gpt-5")


async def test_openai_sdk_with_keys_and_across_a_slow_load(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {
            "slow": fake_profile(dummy_model, "--load-delay", "0.5"),
            "broken": fake_profile(dummy_model, "--load-delay", "0.3", "--crash-during-load"),
        },
        api_keys=["sk-router"],
        loading_comment_interval=0.05,
    )
    async with sdk(router, "sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    async with sdk(router, "sk-router") as client:
        stream = await client.chat.completions.create(
            model="slow", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        assert text == "Hello from fake-model. (1) (2) (3) (4)", "loading comments never reach the text"

        stream = await client.chat.completions.create(
            model="broken", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(openai.APIError, match="failed to load model"):
            async for _ in stream:
                pass


async def test_openai_sdk_reads_loading_progress_as_reasoning_never_as_content(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    """`loading_feedback: reasoning`: what a chat UI shows as thinking while the model loads; the
    SDK parses it as `delta.reasoning_content` and the answer's content is the model's alone."""
    router = await start_router(
        {
            "slow": fake_profile(dummy_model, "--load-delay", "0.8", loading_feedback="reasoning"),
            "quiet": fake_profile(dummy_model, "--load-delay", "0.5"),
        },
        loading_comment_interval=0.1,
    )

    async def stream(client: openai.AsyncOpenAI, model: str) -> tuple[str, str, list[Any]]:
        chunks = [
            chunk
            async for chunk in await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], stream=True
            )
        ]
        deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
        reasoning = "".join(getattr(delta, "reasoning_content", None) or "" for delta in deltas)
        content = "".join(delta.content or "" for delta in deltas)
        return reasoning, content, chunks

    async with sdk(router) as client:
        alone, _, _ = await stream(client, "slow")  # the only request: nothing is ahead of it
        assert set(re.findall(r"\(([^()]*)\)…", alone)) == {"next in line"}, alone
        async with router.session.post("/models/unload?wait=1", json={"model": "slow"}) as response:
            assert response.status == 200
        (first, content, chunks), (second, other, _) = await asyncio.gather(
            stream(client, "slow"), stream(client, "slow")
        )
        assert content == other == "Hello from fake-model. (1) (2) (3) (4)", "the answer is untouched"
        assert all(chunk.model == "slow" for chunk in chunks)
        lines = first.strip().splitlines()
        assert all(line.startswith(MARK) for line in lines), "each line in the router's fixed form"
        assert lines[0] == f"{MARK}Loading slow…"
        assert lines[-1].startswith(f"{MARK}slow is loaded after ")
        places = {re.findall(r"\((next in line|1 request ahead)\)", text)[-1] for text in (first, second)}
        assert places == {"next in line", "1 request ahead"}, (first, second)
        waited = [int(line.rsplit("… ", 1)[1].removesuffix(" s")) for line in lines if "(" in line]
        assert waited == sorted(waited), "seconds waited only grow"
        assert not any(
            getattr(delta, "reasoning_content", None) and delta.content
            for chunk in chunks
            if chunk.choices
            for delta in [chunk.choices[0].delta]
        )

        reasoning, content, _ = await stream(client, "quiet")
        assert reasoning == "" and content.startswith("Hello from"), "comments by default"

        # Open WebUI replays the last answer's reasoning: the model never reads the router's lines.
        loaded, third, _ = await stream(client, "slow")  # loaded: the model's own (no) reasoning
        assert loaded == "" and third
        replayed = [
            {"role": "user", "content": f"what does {MARK}Loading slow… mean?"},
            {"role": "assistant", "content": content, "reasoning_content": first},
            {"role": "assistant", "content": other, "reasoning_content": second + "The sky scatters blue."},
            {"role": "user", "content": "and then?"},
        ]
        await client.chat.completions.create(model="slow", messages=replayed)  # type: ignore[arg-type]
        async with router.session.get("/upstream/slow/fake/last", params={"path": CHAT}) as response:
            sent = (await response.json())["body"]["messages"]
        assert sent[0] == replayed[0] and sent[3] == replayed[3], "nothing else is touched"
        assert "reasoning_content" not in sent[1], "only the router's lines were in it"
        assert sent[1]["content"] == content
        assert sent[2]["reasoning_content"] == "The sky scatters blue."

    # Other streams than chat completions keep to comments.
    async with router.session.post("/models/unload?wait=1", json={"model": "slow"}) as response:
        assert response.status == 200
    body = {"model": "slow", "prompt": "hi", "stream": True}
    async with router.session.post("/v1/completions", json=body) as response:
        raw = (await response.read()).decode()
    assert "reasoning_content" not in raw and ": loading slow …" in raw


# ---------------------------------------------------------------------------------------------- Open WebUI


async def test_open_webui_sequence(start_router: RouterFactory, dummy_model: Path) -> None:
    """Page loads, a chat with a separate task model for the title, follow-ups and tags, and the
    llama.cpp connection's model management; one model fits at a time, so the two take turns."""
    router = await start_router(
        {
            "chat-model": fake_profile(dummy_model, "--ctx-size", "32768", "--chunk-delay", "0.02"),
            "task-model": fake_profile(dummy_model, "--ctx-size", "8192"),
        },
        max_resident=1,
        loading_comment_interval=0.2,
    )
    session = router.session

    # Every page load and model-picker refresh: answered at once, never loads anything.
    for _ in range(5):
        async with session.get("/v1/models", timeout=aiohttp.ClientTimeout(total=3)) as response:
            listing = await response.json()
        assert [entry["id"] for entry in listing["data"]] == ["chat-model", "task-model"]
        assert all(isinstance(entry["id"], str) and entry["object"] == "model" for entry in listing["data"])
    assert upstream_processes() == []

    history = [{"role": "user", "content": "Why is the sky blue?"}]

    async def title() -> dict[str, Any]:
        body = {
            "model": "task-model",
            "messages": [{"role": "user", "content": "Create a concise title for: Why is the sky blue?"}],
            "stream": False,
            "max_tokens": 1000,
        }
        async with session.post(CHAT, json=body) as response:
            assert response.status == 200, await response.text()
            answer: dict[str, Any] = await response.json()
            return answer

    async def chat() -> list[dict[str, Any]]:
        body = {
            "model": "chat-model",
            "messages": history,
            "stream": True,
            "stream_options": {"include_usage": True},
            "tools": tools(28, 30_000),
        }
        async with session.post(CHAT, json=body) as response:
            return await read_stream(response)

    # The title request starts just before the chat and runs beside it.
    title_task = asyncio.create_task(title())
    await asyncio.sleep(0)
    chunks, title_answer = await asyncio.gather(chat(), title_task)
    assert title_answer["object"] == "chat.completion"
    assert title_answer["model"] == "task-model"
    assert isinstance(title_answer["choices"][0]["message"]["content"], str)
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all(chunk["model"] == "chat-model" for chunk in chunks)
    reply = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])
    assert reply.startswith("Hello from")
    history.append({"role": "assistant", "content": reply})

    # Follow-up suggestions and tags: no max_tokens, on the task model.
    for prompt in ("Suggest 3 follow-up questions", "Generate 1-3 broad tags"):
        body = {"model": "task-model", "messages": [*history, {"role": "user", "content": prompt}]}
        async with session.post(CHAT, json=body) as response:
            assert response.status == 200
            assert (await response.json())["choices"][0]["message"]["content"]

    # The llama.cpp connection: /models with status.value, then load and unload.
    async with session.get("/models") as response:
        states = {entry["id"]: entry["status"]["value"] for entry in (await response.json())["data"]}
    assert states == {"chat-model": "unloaded", "task-model": "loaded"}
    async with session.post("/models/load", json={"model": "chat-model"}) as response:
        assert (await response.json())["success"] is True
    async with session.post("/models/unload", json={"model": "task-model"}) as response:
        assert (await response.json())["success"] is True
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        async with session.get("/models") as response:
            states = {entry["id"]: entry["status"]["value"] for entry in (await response.json())["data"]}
        if states == {"chat-model": "loaded", "task-model": "unloaded"}:
            break
        assert asyncio.get_running_loop().time() < deadline, states
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------------- Hermes


async def hermes_context_lengths(session: aiohttp.ClientSession, key: str) -> dict[str, int]:
    """Hermes Agent's endpoint metadata read: `/v1/models`, then (for `owned_by: "llamacpp"`) bare
    `/v1/props` or `/props`, and when those fail `/models` and `/props?model=` of loaded models."""
    auth = {"Authorization": f"Bearer {key}"}
    async with session.get("/v1/models", headers=auth) as response:
        assert response.status == 200
        payload = await response.json()
    keys = ("context_length", "n_ctx")
    lengths = {entry["id"]: next(entry[name] for name in keys if name in entry) for entry in payload["data"]}
    assert any(entry.get("owned_by") == "llamacpp" for entry in payload["data"])

    async def props(params: dict[str, str] | None = None) -> tuple[int, Any]:
        for path in ("/v1/props", "/props"):
            async with session.get(path, params=params, headers=auth) as response:
                if response.status < 400:
                    return response.status, await response.json()
        return response.status, None

    status, router_props = await props()
    assert status == 200 and router_props["role"] == "router", "a bare /props: llama.cpp's router mode"
    async with session.get("/models", headers=auth) as response:
        native = await response.json()
    for child in native["data"]:
        if child["status"]["value"] in ("loaded", "ready"):
            status, body = await props({"model": child["id"]})
            assert status == 200
            lengths[child["id"]] = body["default_generation_settings"]["n_ctx"]
    return lengths


async def test_hermes_agent_probing_and_chat(start_router: RouterFactory, dummy_model: Path) -> None:
    """Hermes Agent's start, replayed in its order (tests/hermes_replay.py), with API keys set: the
    probe paths answer alike with and without a key, so one round finds llama.cpp; the context comes
    from the list, and a later start's `/props?model=` is answered without loading the model."""
    router = await start_router(
        {
            "agent": fake_profile(dummy_model, "--ctx-size", "65536"),
            "small": fake_profile(dummy_model, "--ctx-size", "8192"),
        },
        api_keys=["hermes-key"],
    )
    async with aiohttp.ClientSession(base_url=router.url) as session:
        # Server-type detection: the same answer with no key, a wrong key and the key; no model data.
        for path in ("/api/v1/models", "/api/tags", "/v1/props", "/props", "/version"):
            answers = []
            for key in (None, "wrong", "hermes-key"):
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                async with session.get(path, headers=headers) as response:
                    answers.append((response.status, await response.json()))
            assert all(answer == answers[0] for answer in answers), (path, answers)
            status, body = answers[0]
            assert status == (200 if path == "/props" else 404), (path, body)
            assert "models" not in body and "agent" not in json.dumps(body)

        first = Replay(session, "hermes-key")
        assert await first.start("agent") == 65536
        old = Replay(session, "hermes-key")  # 0.19: detection rounds without the key first
        assert await old.start("agent", keyless_rounds=2) == 65536
        for replay in (first, old):
            assert [call.status for call in replay.calls if call.status in (401, 403)] == []
            assert replay.server_type == "llamacpp"
        assert len(old.calls) == len(first.calls), "one keyless round is enough"
        assert [call.keyed for call in old.calls[:4]] == [False] * 4
        assert upstream_processes() == [], "reading metadata loaded nothing"

        # A later start reconciles its saved context with `/props?model=` of a model not loaded.
        later = Replay(session, "hermes-key")
        assert await later.start("agent", cached=65536) == 65536
        assert later.calls[-1].path == "/props?model=agent" and later.calls[-1].status == 200
        assert upstream_processes() == []
        async with session.get("/running", headers={"Authorization": "Bearer hermes-key"}) as response:
            assert (await response.json())["running"] == [], "still unloaded"
        assert await Replay(session, "hermes-key").start("small", cached=65536) == 8192, "Hermes refuses it"
        assert HERMES_MINIMUM_CONTEXT > 8192

        auth = {"Authorization": "Bearer hermes-key"}
        body = {
            "model": "agent",
            "messages": [
                {"role": "system", "content": "You are Hermes."},
                {"role": "user", "content": "List the files."},
            ],
            "max_tokens": 65536,
            "stream": True,
            "tools": tools(17, 45_000),
        }
        assert 40_000 < len(json.dumps(body)) < 60_000
        async with session.post(CHAT, json=body, headers=auth) as response:
            chunks = await read_stream(response)
        assert all(chunk["model"] == "agent" for chunk in chunks)

        loaded = Replay(session, "hermes-key")
        assert await loaded.start("agent", cached=65536) == 65536, "the loaded model's own /props"
        lengths = await hermes_context_lengths(session, "hermes-key")
        assert lengths == {"agent": 65536, "small": 8192}


async def test_hermes_is_told_the_window_each_request_gets_with_parallel_slots(
    start_router: RouterFactory, llama_server: Path, tmp_path: Path
) -> None:
    """`-c 65536 --parallel 2` gives each request 32768 tokens: Hermes must see that and refuse the
    model, instead of accepting it and failing on conversations past 32K."""
    model = make_model(tmp_path / "long.gguf", seed=6, n_ctx_train=131072)
    common = {"model": str(model), "binary": str(llama_server)}
    router = await start_router(
        {
            "split": {**common, "args": ["-c", "65536", "--parallel", "2", "--threads", "1"]},
            "whole": {**common, "args": ["-c", "131072", "--parallel", "2", "--threads", "1"]},
        }
    )
    async with aiohttp.ClientSession(base_url=router.url) as session:
        before = await hermes_context_lengths(session, "unused")
        assert before == {"split": 32768, "whole": 65536}
        assert before["split"] < HERMES_MINIMUM_CONTEXT <= before["whole"]

        async def props(name: str) -> dict[str, Any]:
            async with session.get("/props", params={"model": name}) as response:
                assert response.status == 200
                answer: dict[str, Any] = await response.json()
                return answer

        async def running() -> list[str]:
            async with session.get("/running") as response:
                return [row["model"] for row in (await response.json())["running"]]

        # Hermes 0.21 asks /props?model= first: a cold model is answered without loading it.
        cold = await props("split")
        assert (cold["loaded"], cold["source"]) == (False, "config and estimate")
        assert cold["default_generation_settings"]["n_ctx"] == 32768
        assert await running() == [] and upstream_processes() == []
        for name in before:
            async with session.post("/models/load?wait=1", json={"model": name}) as response:
                assert response.status == 200
        assert await hermes_context_lengths(session, "unused") == before, "what /props?model= says"
        live = await props("split")
        assert "loaded" not in live and live["default_generation_settings"]["n_ctx"] == 32768, "its own"
        async with session.post("/models/unload?wait=1", json={"model": "split"}) as response:
            assert response.status == 200
        remembered = await props("split")
        assert (remembered["loaded"], remembered["source"]) == (False, "last /props of this model")
        assert remembered["build_info"] == live["build_info"], "llama-server's own answer, kept"
        assert remembered["default_generation_settings"]["n_ctx"] == 32768
        assert await running() == ["whole"]
