"""How far a load has come, from llama-server itself (its router-child state reports), wherever a
user looks: `/models/sse`, the model lists, a waiting stream's feedback, and the log kept whole.

The real llama-server loads a generated model big enough, without mmap, for its progress to take
several values; the fake upstream shows a report in a shape the router does not know (it falls back
to watching the load as before) and a child that dies mid-load."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from llama_router.app import API
from llama_router.upstream.child_protocol import STATE_PREFIX, NotUnderstood, load_progress, parse_state
from tests.make_tiny_models import make_model

from .conftest import RouterFactory, RunningRouter, fake_profile, upstream_processes, wait_until


class Sse:
    """The `data:` events of `/models/sse`, read in the background."""

    def __init__(self, router: RunningRouter) -> None:
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self._task = asyncio.ensure_future(self._read(router))

    @classmethod
    async def open(cls, router: RunningRouter) -> Sse:
        """A reader subscribed (so that it misses no event of a load started next)."""
        api = router.runner.app[API]
        before = api.event_subscribers
        sse = cls(router)
        await wait_until(lambda: api.event_subscribers > before, what="the /models/sse subscription")
        return sse

    async def _read(self, router: RunningRouter) -> None:
        timeout = aiohttp.ClientTimeout(total=None)
        async with router.session.get("/models/sse", timeout=timeout) as response:
            assert response.status == 200
            async for raw in response.content:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    self.events.append(json.loads(line[len("data: ") :]))
                    self.changed.set()

    async def wait_for(self, model: str, status: str, timeout: float = 60) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events:
                    data = event.get("data") or {}
                    if event["model"] == model and data.get("status") == status and "progress" not in data:
                        return event
                self.changed.clear()
                await self.changed.wait()

    def progress(self, model: str) -> list[float]:
        return [
            event["data"]["progress"]["value"]
            for event in self.events
            if event["model"] == model and "progress" in (event.get("data") or {})
        ]

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def stream_chat(router: RunningRouter, model: str) -> tuple[list[str], list[str], str]:
    """A streamed chat: its SSE comments, its reasoning deltas and its content."""
    payload = {
        "model": model,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    }
    comments, reasoning, content = [], [], []
    async with router.session.post("/v1/chat/completions", json=payload) as response:
        assert response.status == 200
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("data: {"):
                chunk = json.loads(line[len("data: ") :])
                assert "error" not in chunk, chunk
                delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                if delta.get("reasoning_content"):
                    reasoning.append(delta["reasoning_content"])
                if delta.get("content"):
                    content.append(delta["content"])
    return comments, reasoning, "".join(content)


# ---------------------------------------------------------------------------------------------- real


@pytest.fixture(scope="session")
def bigger_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight model of about 600 MB: read without mmap, its load takes several reports."""
    folder = tmp_path_factory.mktemp("bigger")
    return make_model(folder / "bigger.gguf", seed=3, n_embd=1024, n_layer=10, vocab=4000)


async def test_real_llama_server_reports_its_load_everywhere(
    start_router: RouterFactory, bigger_model: Path, llama_server: Path
) -> None:
    args = ["--ctx-size", "256", "--parallel", "1", "--threads", "1", "--load-mode", "none"]
    router = await start_router(
        {
            "big": {
                "model": str(bigger_model),
                "binary": str(llama_server),
                "args": args,
                "loading_feedback": "reasoning",
            }
        },
        loading_comment_interval=0.1,
    )
    sse = await Sse.open(router)
    listed_progress: list[dict[str, Any]] = []

    async def watch_list() -> None:
        while True:
            async with router.session.get("/v1/models") as response:
                entry = (await response.json())["data"][0]
            if "progress" in entry["status"]:
                listed_progress.append(entry["status"]["progress"])
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(watch_list())
    try:
        _, reasoning, content = await stream_chat(router, "big")
    finally:
        watcher.cancel()
    await sse.wait_for("big", "loaded")
    await sse.close()

    values = sse.progress("big")
    assert values[0] == 0.0, values
    assert any(0 < value < 1 for value in values), f"only the ends of the load were reported: {values}"
    assert values == sorted(values), "progress only grows"
    loading = [event for event in sse.events if event["model"] == "big" and "progress" in event["data"]]
    assert loading[0]["data"] == {
        "status": "loading",
        "progress": {"stages": ["text_model"], "current": "text_model", "value": 0.0},
    }, "as llama.cpp's router sends it"
    assert listed_progress and all(p["stages"] == ["text_model"] for p in listed_progress)

    shown = "".join(reasoning)
    percents = [int(p) for p in re.findall(r"Loading big… (\d+) %", shown)]
    assert percents and percents == sorted(percents), shown
    assert content, "the answer came after the feedback"

    log = router.controller.logs["big"]
    reports = [line for line in log if line.startswith(STATE_PREFIX)]
    assert len(reports) >= len(values) + 1 and '"state":"ready"' in reports[-1], "all kept in the log"
    assert "model loaded" in "\n".join(log), "and the rest of its output with them"

    # Once loaded it reads its stdin, and exits when that closes: the router keeps it open.
    upstream = router.controller.upstreams["big"]
    assert upstream.is_alive() and upstream.process is not None and upstream.process.stdin is not None
    status, _ = await router.chat("big")
    assert status == 200
    async with router.session.get("/v1/models") as response:
        assert "progress" not in (await response.json())["data"][0]["status"], "none once loaded"
    async with router.session.post("/models/unload?wait=1", json={"model": "big"}) as response:
        assert response.status == 200
    assert upstream.returncode == 0, "a stop lets it end cleanly: its stdin closes only after it exited"


# ---------------------------------------------------------------------------------------------- fake


async def test_progress_feeds_sse_lists_and_comments_and_a_stop_ends_the_child_cleanly(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"m": fake_profile(dummy_model, "--child-protocol", "llama", "--load-delay", "1.2")},
        loading_comment_interval=0.1,
    )
    sse = await Sse.open(router)
    events: list[Any] = []
    router.controller.events.subscribe(events.append)
    comments, reasoning, content = await stream_chat(router, "m")
    await sse.wait_for("m", "loaded")
    assert content.startswith("Hello from") and not reasoning
    assert sse.progress("m")[:4] == [0.0, 0.25, 0.5, 0.75], "(1.0 too, unless it was read after the load)"
    shown = [c for c in comments if "%" in c]
    assert shown and all(re.fullmatch(r": loading m… (\d+) % \(\d+s\)", c) for c in shown), comments
    assert {"25", "50", "75"} & {re.findall(r"(\d+) %", c)[0] for c in shown}

    upstream = router.controller.upstreams["m"]
    async with router.session.post("/models/unload?wait=1", json={"model": "m"}) as response:
        assert response.status == 200
    await sse.wait_for("m", "unloaded")
    kinds = [event.kind for event in events]
    assert "stopped" in kinds and "failed" not in kinds
    assert upstream.returncode == 0, "the exit command ended it, not its stdin closing (code 1)"
    await sse.close()


async def test_a_report_in_an_unknown_shape_falls_back_and_the_load_goes_on(
    start_router: RouterFactory, dummy_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    router = await start_router(
        {"m": fake_profile(dummy_model, "--child-protocol", "garbled", "--load-delay", "0.6")},
        loading_comment_interval=0.1,
    )
    sse = await Sse.open(router)
    comments, _, content = await stream_chat(router, "m")
    await sse.wait_for("m", "loaded")
    assert content.startswith("Hello from"), "loaded and answered as without reports"
    assert sse.progress("m") == []
    assert comments and all(re.fullmatch(r": loading m …( \d+s)?", c) for c in comments), comments
    assert any(line == f"{STATE_PREFIX}v2 loading text_model 0.5" for line in router.controller.logs["m"])
    assert "state report not understood" in caplog.text
    assert router.controller.upstreams["m"].is_alive(), "its stdin is kept open all the same"
    await sse.close()


async def test_a_child_that_dies_mid_load_fails_its_waiting_requests_and_leaves_no_progress(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    flags = ("--child-protocol", "llama", "--load-delay", "0.8", "--crash-during-load")
    router = await start_router({"m": fake_profile(dummy_model, *flags)}, loading_comment_interval=0.1)
    sse = await Sse.open(router)
    payload = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with router.session.post("/v1/chat/completions", json=payload) as response:
        text = (await response.read()).decode()
    error = json.loads(
        next(line for line in text.splitlines() if line.startswith("data: {")).removeprefix("data: ")
    )
    assert "exited with code 1 during load" in error["error"]["message"]
    assert "cmd_child_to_router" not in error["error"]["message"], "the reason is its log, not its reports"
    assert re.search(r": loading m… \d+ %", text)
    unloaded = await sse.wait_for("m", "unloaded")
    assert unloaded["data"]["failed"] is True
    assert sse.progress("m")[:2] == [0.0, 0.25]
    async with router.session.get("/models") as response:
        status = (await response.json())["data"][0]["status"]
    assert "progress" not in status
    await wait_until(lambda: not upstream_processes(), what="the dead child to be reaped")
    await sse.close()


async def test_a_binary_without_router_mode_is_started_as_before(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)})
    status, _ = await router.chat("m")
    assert status == 200
    upstream = router.controller.upstreams["m"]
    assert upstream.pid is not None and upstream.process is not None
    assert "LLAMA_SERVER_ROUTER_PORT" not in psutil.Process(upstream.pid).environ()
    assert upstream.process.stdin is None, "its stdin is /dev/null, as ever"


# ---------------------------------------------------------------------------------------------- parsing


def test_state_reports_are_read_or_refused_whole() -> None:
    assert parse_state("srv  load_model: loading model") is None
    stages = '"stages":["text_model","mmproj_model"],"current":"mmproj_model"'
    state = parse_state(STATE_PREFIX + '{"state":"loading","payload":{' + stages + ',"value":0.5}}')
    assert state is not None and state.state == "loading"
    progress = load_progress(state.payload)
    assert progress is not None and progress.percent == 75, "over all stages"
    assert load_progress({"stage": "mmproj_model"}) is None, "a stage's start without a fraction"
    for bad in ("v2 loading", '{"payload":{}}', '{"state":"loading","payload":[1]}'):
        with pytest.raises(NotUnderstood):
            parse_state(STATE_PREFIX + bad)
    for payload in (
        {"value": 2, "stages": ["t"], "current": "t"},
        {"value": 0.5, "stages": ["t"], "current": "x"},
    ):
        with pytest.raises(NotUnderstood):
            load_progress(payload)
