"""Management endpoints: model lists, load/unload, /running, /upstream, events, logs, loading comments."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from gguf import GGUFReader

from llama_router.app import API
from llama_router.config.schema import load_config
from llama_router.sizing.context_window import training_length
from tests.make_tiny_models import make_model

from .conftest import (
    RouterFactory,
    RunningRouter,
    assert_openai_error,
    fake_profile,
    upstream_processes,
    wait_until,
)

CHAT = "/v1/chat/completions"


async def get_json(router: RunningRouter, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with router.session.get(path, **kwargs) as response:
        return response.status, await response.json()


async def post_json(router: RunningRouter, path: str, payload: Any = None, **kwargs: Any) -> tuple[int, Any]:
    async with router.session.post(path, json=payload, **kwargs) as response:
        return response.status, await response.json()


async def statuses(router: RunningRouter) -> dict[str, str]:
    """Each model's status as `/v1/models` reports it in the router's own words (`status.detail`)."""
    status, listing = await get_json(router, "/v1/models")
    assert status == 200, listing
    return {entry["id"]: entry["status"]["detail"] for entry in listing["data"]}


async def wait_status(router: RunningRouter, model: str, value: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (current := (await statuses(router))[model]) != value:
        if time.monotonic() > deadline:
            raise AssertionError(f"{model} stayed {current!r}, expected {value!r}")
        await asyncio.sleep(0.02)


def sse_lines(raw: bytes) -> list[str]:
    return [line for line in raw.decode().split("\n") if line]


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


# ---------------------------------------------------------------------------------------------- lists


def test_context_length_from_gguf_matches_the_gguf_package(tmp_path: Path) -> None:
    model = make_model(tmp_path / "ctx.gguf", n_ctx_train=98304)
    field = GGUFReader(model).fields["llama.context_length"]
    assert training_length(model) == int(field.parts[field.data[0]][0]) == 98304
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF")
    assert training_length(garbage) is None
    assert training_length(tmp_path / "missing.gguf") is None


async def test_models_lists_answer_from_memory_with_status_and_context(
    start_router: RouterFactory, dummy_model: Path, tmp_path: Path
) -> None:
    from_gguf = make_model(tmp_path / "long.gguf", n_ctx_train=131072)
    router = await start_router(
        {
            "chat": fake_profile(dummy_model, "--ctx-size", "65536", aliases=["gpt-4o-mini"]),
            "long": fake_profile(from_gguf, description="context from the GGUF"),
            "fixed": fake_profile(dummy_model, "-c", "4096", context_length=8192),
            "unknown-ctx": fake_profile(dummy_model),
        }
    )
    status, listing = await get_json(router, "/v1/models")
    assert status == 200
    assert listing["object"] == "list"
    entries = {entry["id"]: entry for entry in listing["data"]}
    assert list(entries) == ["chat", "fixed", "long", "unknown-ctx"]  # the config's order
    for entry in entries.values():
        assert entry["object"] == "model"
        assert entry["owned_by"] == "llamacpp"
        assert isinstance(entry["created"], int)
        assert entry["status"] == {"value": "unloaded", "detail": "unloaded"}
    assert entries["chat"]["aliases"] == ["gpt-4o-mini"]
    assert (entries["chat"]["context_length"], entries["chat"]["n_ctx"]) == (65536, 65536)
    assert entries["long"]["context_length"] == 131072
    assert entries["long"]["description"] == "context from the GGUF"
    assert entries["fixed"]["context_length"] == 8192, "a configured context_length wins"
    assert "context_length" not in entries["unknown-ctx"], "no guess when neither args nor GGUF say"

    status, native = await get_json(router, "/models")
    assert status == 200
    for entry in native["data"]:
        assert entry["status"] == {"value": "unloaded", "detail": "unloaded"}
        assert {**entry, "status": entries[entry["id"]]["status"]} == entries[entry["id"]]

    status, one = await get_json(router, "/v1/models/chat")
    assert (status, one) == (200, entries["chat"])
    status, body = await get_json(router, "/v1/models/nope")
    assert status == 404
    assert_openai_error(body, "model_not_found")
    assert upstream_processes() == [], "listing never starts anything"


# ---------------------------------------------------------------------------------------------- control


async def test_load_and_unload_answer_at_once_and_status_follows(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model, "--load-delay", "0.3", aliases=["mm"])})
    status, body = await post_json(router, "/models/load", {"model": "mm"})
    assert status == 200, body
    assert body["success"] is True
    assert body["model"] == "m"
    assert body["status"]["value"] == "loading"
    assert (await statuses(router))["m"] == "loading"
    await wait_status(router, "m", "loaded")

    status, running = await get_json(router, "/running")
    assert status == 200
    [row] = running["running"]
    assert (row["model"], row["state"], row["status"]) == ("m", "ready", "loaded")
    assert isinstance(row["pid"], int) and isinstance(row["port"], int)

    status, body = await post_json(router, "/models/load", {"model": "m"})
    assert (status, body["status"]["value"]) == (200, "loaded"), "loading a loaded model is a no-op"
    assert router.controller.view("m").starts == 1

    status, body = await post_json(router, "/models/unload", {"model": "m"})
    assert status == 200 and body["success"] is True, body
    await wait_status(router, "m", "unloaded")
    await wait_until(lambda: not upstream_processes(), what="the upstream to exit")
    status, running = await get_json(router, "/running")
    assert running["running"] == []


async def test_a_load_waiting_for_a_swap_answers_loading(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"a": fake_profile(dummy_model), "b": fake_profile(dummy_model, "--load-delay", "0.2")},
        max_resident=1,
    )
    await post_json(router, "/models/load?wait=1", {"model": "a"})
    status, body = await post_json(router, "/models/load", {"model": "b"})
    assert (status, body["status"]["value"]) == (200, "loading"), "the load is decided: a makes room"
    assert router.controller.view("b").state.value == "cold", "b waits for a to stop"
    assert (await statuses(router))["b"] == "loading"
    await wait_status(router, "b", "loaded")


async def test_load_and_unload_can_wait(start_router: RouterFactory, dummy_model: Path) -> None:
    router = await start_router({"m": fake_profile(dummy_model, "--load-delay", "0.2")})
    status, body = await post_json(router, "/models/load?wait=1", {"model": "m"})
    assert (status, body["status"]["value"]) == (200, "loaded"), body
    status, body = await post_json(router, "/models/unload", {"model": "m", "wait": True})
    assert (status, body["status"]["value"]) == (200, "unloaded"), body
    assert upstream_processes() == []


async def test_control_errors_are_openai_shaped(start_router: RouterFactory, dummy_model: Path) -> None:
    router = await start_router({"m": fake_profile(dummy_model)})
    for path in ("/models/load", "/models/unload"):
        status, body = await post_json(router, path, {"model": "nope"})
        assert status == 404
        assert "m" in assert_openai_error(body, "model_not_found")["message"]
        status, body = await post_json(router, path, {})
        assert status == 400
        assert_openai_error(body, "missing_model")
        async with router.session.post(path, data=b"{not json") as response:
            assert response.status == 400
            assert_openai_error(await response.json(), "invalid_json")
    assert upstream_processes() == []


async def test_a_failed_load_is_a_503_with_the_log_and_a_failed_status(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"broken": fake_profile(dummy_model, "--crash-during-load")})
    status, body = await post_json(router, "/models/load?wait=1", {"model": "broken"})
    assert status == 503
    assert "failed to load model" in assert_openai_error(body, "model_load_failed")["message"]
    status, listing = await get_json(router, "/v1/models")
    [entry] = listing["data"]
    assert (entry["status"]["value"], entry["status"]["detail"]) == ("unloaded", "failed")
    assert entry["status"]["failed"] is True
    reason, *output = entry["status"]["error"].splitlines()
    assert "exited" in reason and output, "the reason and the last lines of the model's output"
    assert any("failed to load model" in line for line in output)


async def test_loading_another_model_swaps_and_unload_all_stops_everything(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"a": fake_profile(dummy_model), "b": fake_profile(dummy_model), "c": fake_profile(dummy_model)},
        max_resident=2,
    )
    for name in ("a", "b", "c"):
        status, body = await post_json(router, "/models/load?wait=1", {"model": name})
        assert status == 200, body
    assert await statuses(router) == {"a": "unloaded", "b": "loaded", "c": "loaded"}
    status, body = await post_json(router, "/unload?wait=1")
    assert status == 200, body
    assert sorted(body["unloading"]) == ["b", "c"]
    assert set((await statuses(router)).values()) == {"unloaded"}
    assert upstream_processes() == []
    await post_json(router, "/models/load?wait=1", {"model": "a"})
    status, body = await post_json(router, "/unload?wait=1")
    assert (status, body["unloading"]) == (200, ["a"])
    assert upstream_processes() == []


async def test_upstream_passthrough_keeps_method_path_query_and_body(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model, aliases=["alias"])})
    async with router.session.post("/upstream/alias/tokenize?a=1&b=two", json={"content": "ab"}) as response:
        assert response.status == 200, await response.text()
        assert (await response.json())["tokens"] == [97, 98]
    status, last = await get_json(router, "/upstream/m/fake/last")
    assert status == 200
    assert (last["method"], last["path"], last["query"]) == ("POST", "/tokenize", "a=1&b=two")
    assert last["body"] == {"content": "ab"}, "no model was added or needed"
    status, props = await get_json(router, "/upstream/m/props")
    assert (status, props["build_info"]) == (200, "fake_upstream")
    status, body = await get_json(router, "/upstream/nope/props")
    assert status == 404
    assert_openai_error(body, "model_not_found")


# ---------------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize("path", ["/api/v1/models", "/api/tags", "/version", "/v1/version", "/api/show"])
async def test_other_servers_probe_paths_are_404(
    start_router: RouterFactory, dummy_model: Path, path: str
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)})
    status, body = await get_json(router, path)
    assert status == 404
    assert_openai_error(body, "not_found")


async def test_gets_route_by_model_query(start_router: RouterFactory, dummy_model: Path) -> None:
    router = await start_router({"m": fake_profile(dummy_model)})
    await post_json(router, "/models/load?wait=1", {"model": "m"})
    status, props = await get_json(router, "/props", params={"model": "m"})
    assert (status, props["build_info"]) == (200, "fake_upstream")
    # Any other GET naming a model is a 404: only the upstream's read-only API is reached this way.
    status, body = await get_json(router, "/fake/last", params={"model": "m"})
    assert status == 404, body
    assert_openai_error(body, "not_found", status=status)


async def test_bare_probes_answer_as_llama_server_router_mode_and_are_no_errors(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    """Hermes Agent probes `/v1/props`, `/props` and `/version` without `?model=` to tell what server
    it talks to: router mode's own answers (a router `/props`; no `/v1/props` or `/version`)."""
    router = await start_router({"m": fake_profile(dummy_model)}, max_resident=2)
    status, props = await get_json(router, "/props")
    assert status == 200
    assert (props["role"], props["max_instances"], props["models_autoload"]) == ("router", 2, True)
    assert props["default_generation_settings"]["n_ctx"] == 0
    assert props["build_info"].startswith("llama-router ")
    for path in ("/v1/props", "/version"):
        status, body = await get_json(router, path)
        assert status == 404, path
        assert_openai_error(body, "not_found")
    status, props = await get_json(router, "/props", params={"model": "m"})
    assert status == 200 and props["model_alias"] == "m", "with ?model= it is the model's"
    async with router.session.get("/metrics") as response:
        metrics = await response.text()
    errors = [line for line in metrics.splitlines() if line.startswith("llama_router_errors_total{")]
    assert errors == [], errors
    assert upstream_processes() == [], "no probe loaded anything"


async def test_no_get_loads_a_model(start_router: RouterFactory, dummy_model: Path) -> None:
    """`/props?model=`, `/slots?model=` and `/v1/models/<id>` of a model that is not loaded are
    answered from the config and the estimate, then from the `/props` it gave at its last load;
    the model stays unloaded (`/running` does not list it). Reads only a running model has are 409s."""
    router = await start_router({"m": fake_profile(dummy_model, "--ctx-size", "8192", "--parallel", "2")})

    async def running() -> list[str]:
        _, body = await get_json(router, "/running")
        return [row["model"] for row in body["running"]]

    status, props = await get_json(router, "/props", params={"model": "m"})
    assert status == 200, props
    assert (props["loaded"], props["source"], props["model_alias"]) == (False, "config and estimate", "m")
    assert props["default_generation_settings"]["n_ctx"] == 4096, "a request's window: 8192 over 2 slots"
    assert props["status"] == {"value": "unloaded", "detail": "unloaded"}
    status, slots = await get_json(router, "/slots", params={"model": "m"})
    assert status == 200 and [slot["n_ctx"] for slot in slots] == [4096, 4096]
    assert not any(slot["is_processing"] for slot in slots)
    status, entry = await get_json(router, "/v1/models/m")
    assert (status, entry["status"]["value"], entry["n_ctx"]) == (200, "unloaded", 4096)
    for path in ("/metrics", "/lora-adapters"):
        status, body = await get_json(router, path, params={"model": "m"})
        assert status == 409, (path, body)
        assert_openai_error(body, "model_not_loaded")
    assert await running() == [] and upstream_processes() == [], "no GET loaded the model"
    assert await statuses(router) == {"m": "unloaded"}

    await post_json(router, "/models/load?wait=1", {"model": "m"})
    deadline = time.monotonic() + 10
    while (await get_json(router, "/v1/models/m"))[1]["context"]["source"] != "props":
        assert time.monotonic() < deadline, "the router reads the loaded model's /props"
        await asyncio.sleep(0.02)
    status, props = await get_json(router, "/props", params={"model": "m"})
    assert (status, props["build_info"], "loaded" in props) == (200, "fake_upstream", False), "its own"
    await post_json(router, "/models/unload?wait=1", {"model": "m"})
    status, props = await get_json(router, "/props", params={"model": "m"})
    assert (props["loaded"], props["source"]) == (False, "last /props of this model")
    assert props["build_info"] == "fake_upstream" and props["default_generation_settings"]["params"]
    assert props["default_generation_settings"]["n_ctx"] == 8192, "what it said, not the estimate"
    assert await running() == [] and upstream_processes() == []


# The `status.value` words Open WebUI's model selector knows (a badge, and Eject for `loaded`).
OPEN_WEBUI_STATUS_VALUES = {"loaded", "sleeping", "loading", "unloaded"}


@pytest.mark.parametrize("listing", ["/v1/models", "/models"])
async def test_the_lists_open_webui_reads_speak_router_modes_words(
    start_router: RouterFactory, dummy_model: Path, listing: str
) -> None:
    """Open WebUI reads `/v1/models` (the URL with `/v1`) or `/models` (without): either way a
    standby model is `loaded`, a failed or unloading one `unloaded` (`failed: true` when it failed),
    and our own word is in `detail`; `/running` keeps ours."""
    router = await start_router(
        {
            "warm": fake_profile(dummy_model, standby=True),
            "broken": fake_profile(dummy_model, "--crash-during-load"),
            "stuck": fake_profile(dummy_model, "--ignore-sigterm", stop_timeout=2),
        }
    )

    async def status_of(model: str) -> dict[str, Any]:
        listed = {e["id"]: e["status"] for e in (await get_json(router, listing))[1]["data"]}
        assert {status["value"] for status in listed.values()} <= OPEN_WEBUI_STATUS_VALUES, listed
        _, entry = await get_json(router, f"/v1/models/{model}")
        assert entry["status"] == listed[model], "one entry, wherever it is read"
        return listed[model]

    await wait_until(lambda: router.controller.view("warm").standby, what="the standby preload")
    assert await status_of("warm") == {"value": "loaded", "detail": "standby"}

    status, _ = await post_json(router, "/models/load?wait=1", {"model": "broken"})
    assert status == 503
    broken = await status_of("broken")
    assert (broken["value"], broken["detail"], broken["failed"]) == ("unloaded", "failed", True)
    assert broken["error"]

    await post_json(router, "/models/load?wait=1", {"model": "stuck"})
    await post_json(router, "/models/unload", {"model": "stuck"})
    assert await status_of("stuck") == {"value": "unloaded", "detail": "unloading"}
    _, running = await get_json(router, "/running")
    assert {row["model"]: row["status"] for row in running["running"]}["stuck"] == "unloading"
    await wait_status(router, "stuck", "unloaded")


# ---------------------------------------------------------------------------------------------- loading


async def test_a_stream_waiting_for_a_load_gets_comments_and_clean_content(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"slow": fake_profile(dummy_model, "--load-delay", "0.6")}, loading_comment_interval=0.1
    )
    payload = chat_body("slow", stream=True, stream_options={"include_usage": True})
    async with router.session.post(CHAT, json=payload) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = await response.read()
    lines = sse_lines(raw)
    comments = [line for line in lines if line.startswith(":")]
    data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert len(comments) >= 3, lines
    assert all(comment.startswith(": loading slow …") for comment in comments), comments
    first_data = next(index for index, line in enumerate(lines) if line.startswith("data: "))
    assert all(line.startswith(":") for line in lines[:first_data]), "comments only before the answer"
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])
    assert text == "Hello from fake-model. (1) (2) (3) (4)", "nothing was added to the model's output"
    assert all(chunk["model"] == "slow" for chunk in chunks)
    assert any(chunk.get("usage") for chunk in chunks)


async def test_a_stream_to_a_loaded_model_and_plain_requests_get_no_comments(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"slow": fake_profile(dummy_model, "--load-delay", "0.4")}, loading_comment_interval=0.1
    )
    status, body = await post_json(router, CHAT, chat_body("slow"))
    assert status == 200 and body["object"] == "chat.completion", "a plain request just waits"
    async with router.session.post(CHAT, json=chat_body("slow", stream=True)) as response:
        raw = await response.read()
    assert not [line for line in sse_lines(raw) if line.startswith(":")]
    assert sse_lines(raw)[-1] == "data: [DONE]"


async def test_a_load_failing_after_comments_ends_the_stream_with_an_error_event(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"broken": fake_profile(dummy_model, "--load-delay", "0.5", "--crash-during-load")},
        loading_comment_interval=0.1,
    )
    async with router.session.post(CHAT, json=chat_body("broken", stream=True)) as response:
        assert response.status == 200, "the status went out with the first comment"
        raw = await response.read()
    lines = sse_lines(raw)
    assert lines[0].startswith(": loading broken")
    data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert len(data) == 1, lines
    error = assert_openai_error(json.loads(data[0]), "model_load_failed")
    assert "failed to load model" in error["message"]


async def test_a_client_leaving_during_the_load_gives_up_its_place(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"slow": fake_profile(dummy_model, "--load-delay", "1.0")}, loading_comment_interval=0.05
    )
    view = router.controller.view
    async with aiohttp.ClientSession(base_url=router.url) as session:
        response = await session.post(CHAT, json=chat_body("slow", stream=True))
        assert (await response.content.readline()).startswith(b": loading slow")
        assert view("slow").waiting == 1
        response.close()
    await wait_until(lambda: view("slow").waiting == 0, what="the request to leave the queue")
    await wait_until(lambda: view("slow").in_flight == 0, what="no request in flight")


# ---------------------------------------------------------------------------------------------- streams


async def read_event(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The next `data:` event of an SSE response (comments skipped)."""
    while True:
        line = await asyncio.wait_for(response.content.readline(), timeout=10)
        assert line, "the event stream ended"
        if line.startswith(b"data: "):
            event: dict[str, Any] = json.loads(line[len(b"data: ") :])
            return event


async def test_events_report_loads_with_durations_and_subscribers_do_not_leak(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model, "--load-delay", "0.2")})
    api = router.runner.app[API]
    async with aiohttp.ClientSession(base_url=router.url) as session:
        response = await session.get("/events")
        assert response.headers["Content-Type"].startswith("text/event-stream")
        snapshot = await read_event(response)
        assert snapshot["event"] == "snapshot"
        assert snapshot["models"] == [{"model": "m", "status": {"value": "unloaded", "detail": "unloaded"}}]
        assert api.event_subscribers == 1

        await post_json(router, "/models/load", {"model": "m"})
        seen = [await read_event(response)]
        while seen[-1]["event"] != "ready":
            seen.append(await read_event(response))
        assert [event["event"] for event in seen if event["event"] != "footprint"] == ["loading", "ready"]
        ready = seen[-1]
        assert ready["model"] == "m"
        assert 0.2 <= ready["load_seconds"] < 10

        await post_json(router, "/models/unload", {"model": "m"})
        kinds: list[str] = []
        while not kinds or kinds[-1] != "stopped":
            event = await read_event(response)
            assert event["model"] == "m"
            if event["event"] != "footprint":  # the measured memory use, reported once loaded
                kinds.append(event["event"])
        assert kinds == ["stopping", "stopped"]
        response.close()
    await wait_until(lambda: api.event_subscribers == 0, what="the subscription to end")
    # Events after the client left reach nobody and break nothing.
    status, _ = await post_json(router, "/models/load?wait=1", {"model": "m"})
    assert status == 200


async def test_logs_show_the_buffer_and_follow_streams_new_lines_until_the_client_leaves(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model, "--log-lines", "3", aliases=["alias"])})
    api = router.runner.app[API]
    async with router.session.get("/logs/m") as response:
        assert (response.status, await response.text()) == (200, ""), "nothing ran yet"
    await post_json(router, "/models/load?wait=1", {"model": "m"})
    async with router.session.get("/logs/alias") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    assert text.startswith("[llama-router] starting: ")
    assert "fake_upstream: log line 3/3" in text
    async with router.session.get("/logs/m", params={"lines": "2"}) as response:
        assert len((await response.text()).splitlines()) == 2

    async with aiohttp.ClientSession(base_url=router.url) as session:
        response = await session.get("/logs/m", params={"follow": "1"})
        assert response.status == 200
        seen = ""
        while "log line 3/3" not in seen:
            seen += (await asyncio.wait_for(response.content.readline(), 10)).decode()
        assert api.log_followers == 1
        status, _ = await post_json(router, CHAT, chat_body("m"))  # the upstream logs each request
        assert status == 200
        line = ""
        while "request: POST /v1/chat/completions" not in line:
            line = (await asyncio.wait_for(response.content.readline(), 10)).decode()
        response.close()
    await wait_until(lambda: api.log_followers == 0, what="the follower to be dropped")
    status, body = await get_json(router, "/logs/nope")
    assert status == 404
    assert_openai_error(body, "model_not_found")


async def test_shutting_down_ends_open_event_and_log_streams(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)})
    api = router.runner.app[API]
    async with aiohttp.ClientSession(base_url=router.url) as session:
        events = await session.get("/events")
        assert (await read_event(events))["event"] == "snapshot"
        logs = await session.get("/logs/m", params={"follow": "1"})
        assert logs.status == 200
        await wait_until(lambda: api.log_followers == 1, what="the follower")
        await api.close_streams()  # what the app's on_shutdown does
        assert (await asyncio.wait_for(events.read(), 5)).strip() == b"", "the event stream ended"
        assert await asyncio.wait_for(logs.read(), 5) == b"", "the log stream ended"
    assert (api.event_subscribers, api.log_followers) == (0, 0)


def test_loading_feedback_is_set_server_wide_and_per_profile(tmp_path: Path, dummy_model: Path) -> None:
    path = tmp_path / "profiles.yaml"
    profiles = {"a": fake_profile(dummy_model), "b": fake_profile(dummy_model, loading_feedback="comments")}
    path.write_text(yaml.safe_dump({"server": {"loading_feedback": "reasoning"}, "profiles": profiles}))
    config = load_config(path)
    assert (config.profiles["a"].loading_feedback, config.profiles["b"].loading_feedback) == (
        "reasoning",
        "comments",
    )
    path.write_text(yaml.safe_dump({"server": {"loading_feedback": "thoughts"}, "profiles": profiles}))
    with pytest.raises(
        Exception, match=r"server.loading_feedback: Input should be 'comments' or 'reasoning'"
    ):
        load_config(path)
