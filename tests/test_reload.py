"""Live reload: SIGHUP or an edit of profiles.yaml reloads it; an untouched model keeps serving (a
request stream to it sees no error), a changed one restarts, a removed one stops, an added one appears;
an invalid file keeps the running config and says why (log, /events, /health)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from router.config import load_config
from router.reload import ConfigReloader
from tests.conftest import fake_profile, wait_until
from tests.router_process import RouterProcess, write_config


class StreamLoop:
    """Back-to-back streamed chats to one model, recording every failure, until stopped."""

    def __init__(self, url: str, model: str) -> None:
        self.url = url
        self.model = model
        self.completed = 0
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> StreamLoop:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        body = {"model": self.model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        body.update(fake_chunks=4, fake_chunk_delay=0.05)
        async with aiohttp.ClientSession() as session:
            while not self._stop.is_set():
                try:
                    async with session.post(f"{self.url}/v1/chat/completions", json=body) as response:
                        text = await response.text()
                    if response.status != 200 or not text.rstrip().endswith("data: [DONE]"):
                        self.errors.append(f"{response.status}: {text[-300:]}")
                    else:
                        self.completed += 1
                except aiohttp.ClientError as exc:
                    self.errors.append(repr(exc))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


async def chat(url: str, model: str) -> tuple[int, dict[str, Any]]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/chat/completions", json=body) as response,
    ):
        return response.status, await response.json()


async def pids(router: RouterProcess) -> dict[str, int]:
    return {row["model"]: row["pid"] for row in await router.running() if row.get("pid")}


def profiles_v1(model: Path) -> dict[str, Any]:
    return {
        "keep": fake_profile(model),
        "change": fake_profile(model),
        "gone": fake_profile(model),
    }


def profiles_v2(model: Path) -> dict[str, Any]:
    return {
        "keep": fake_profile(model),
        "change": fake_profile(model, "--name", "changed-v2"),
        "new": fake_profile(model),
    }


@pytest.mark.parametrize("trigger", ["SIGHUP", "file changed"])
async def test_reload_keeps_untouched_model_serving_and_restarts_changed_one(
    tmp_path: Path, dummy_model: Path, router_processes: list[RouterProcess], trigger: str
) -> None:
    path = tmp_path / "profiles.yaml"
    server = {"max_resident": 3, "watch_config": trigger == "file changed"}
    write_config(path, profiles_v1(dummy_model), **server)
    router = await RouterProcess(path).start()
    router_processes.append(router)
    for model in ("keep", "change", "gone"):
        assert (await chat(router.url, model))[0] == 200
    before = await pids(router)
    assert set(before) == {"keep", "change", "gone"}

    stream = StreamLoop(router.url, "keep").start()
    await wait_until(lambda: stream.completed >= 2, what="the request stream to run")
    write_config(path, profiles_v2(dummy_model), **server)
    if trigger == "SIGHUP":
        router.signal(signal.SIGHUP)
    entry = await router.wait_log(lambda e: e.get("event") == "config_reloaded", what="the reload")
    assert entry["trigger"] == trigger
    assert entry["kept"] == ["keep"] and entry["restarted"] == ["change"]
    assert entry["added"] == ["new"] and entry["removed"] == ["gone"]

    async def settled() -> bool:
        now = await pids(router)
        return "gone" not in now and now.get("change") not in (None, before["change"])

    # The changed model restarts at once (it is idle); the removed one is stopped.
    await wait_until(settled, timeout=15, what="the changed model to restart and the removed one to stop")
    completed_at_reload = stream.completed
    await wait_until(lambda: stream.completed >= completed_at_reload + 2, what="the stream to go on")
    await stream.stop()
    assert stream.errors == []
    after = await pids(router)
    assert after["keep"] == before["keep"], "the untouched model was restarted"

    status, answer = await chat(router.url, "change")
    assert status == 200 and "changed-v2" in answer["choices"][0]["message"]["content"]
    status, answer = await chat(router.url, "gone")
    assert status == 404 and answer["error"]["code"] == "model_not_found"
    assert (await chat(router.url, "new"))[0] == 200
    router.signal(signal.SIGTERM)
    assert await router.wait_exit() == 0


async def read_events(url: str, into: list[dict[str, Any]], subscribed: asyncio.Event) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/events") as response:
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                into.append(json.loads(line[len("data: ") :]))
                subscribed.set()


async def test_invalid_config_keeps_the_running_one_and_says_why(
    tmp_path: Path, dummy_model: Path, router_processes: list[RouterProcess]
) -> None:
    path = tmp_path / "profiles.yaml"
    write_config(path, profiles_v1(dummy_model), max_resident=3)
    router = await RouterProcess(path).start()
    router_processes.append(router)
    assert (await chat(router.url, "keep"))[0] == 200
    keep_pid = (await pids(router))["keep"]
    events: list[dict[str, Any]] = []
    subscribed = asyncio.Event()
    reader = asyncio.create_task(read_events(router.url, events, subscribed))
    try:
        await asyncio.wait_for(subscribed.wait(), 10)
        bad = yaml.safe_load(path.read_text())
        bad["profiles"]["keep"]["load_timeout"] = -1
        bad["profiles"]["extra"] = fake_profile(dummy_model)
        path.write_text(yaml.safe_dump(bad))
        entry = await router.wait_log(lambda e: e.get("event") == "config_error", what="the failed reload")
        assert entry["trigger"] == "file changed"
        assert str(path) in entry["message"] and "profiles.keep.load_timeout" in entry["message"]
        assert "keeping the running config" in entry["message"]
        await wait_until(lambda: any(e.get("event") == "config_error" for e in events), what="the event")
        event = next(e for e in events if e.get("event") == "config_error")
        assert "profiles.keep.load_timeout" in event["message"]

        # Old config still in force: same process, the new profile unknown.
        assert (await chat(router.url, "keep"))[0] == 200
        assert (await pids(router))["keep"] == keep_pid
        assert (await chat(router.url, "extra"))[0] == 404

        # Fixed file: reloads, and the error is cleared.
        del bad["profiles"]["keep"]["load_timeout"]
        path.write_text(yaml.safe_dump(bad))
        entry = await router.wait_log(lambda e: e.get("event") == "config_reloaded", what="the good reload")
        assert entry["added"] == ["extra"] and sorted(entry["kept"]) == ["change", "gone", "keep"]
        assert (await chat(router.url, "extra"))[0] == 200
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await reader
    router.signal(signal.SIGTERM)
    assert await router.wait_exit() == 0


async def test_health_shows_the_reload_error(
    tmp_path: Path, dummy_model: Path, router_processes: list[RouterProcess]
) -> None:
    """`/health` carries the reloader's status under `reload` (wired by the API's health handler)."""
    path = write_config(tmp_path / "profiles.yaml", profiles_v1(dummy_model), max_resident=3)
    router = await RouterProcess(path).start()
    router_processes.append(router)
    path.write_text("profiles: [not, a, mapping")
    router.signal(signal.SIGHUP)
    await router.wait_log(lambda e: e.get("event") == "config_error", what="the failed reload")
    async with aiohttp.ClientSession() as session, session.get(f"{router.url}/health") as response:
        health = await response.json()
    error = health["reload"]["last_error"]
    assert error["trigger"] == "SIGHUP" and "invalid YAML" in error["message"]


class _FakeController:
    def __init__(self) -> None:
        self.applied: list[Any] = []
        self.events: list[tuple[str, dict[str, Any]]] = []

    async def reload(self, config: Any) -> dict[str, list[str]]:
        self.applied.append(config)
        return {"kept": list(config.profiles), "restarted": [], "added": [], "removed": []}

    def emit(self, kind: str, **fields: Any) -> None:
        self.events.append((kind, fields))


async def test_watcher_ignores_touch_and_same_bytes(tmp_path: Path, dummy_model: Path) -> None:
    path = write_config(tmp_path / "profiles.yaml", profiles_v1(dummy_model), max_resident=3)
    controller = _FakeController()
    reloader = ConfigReloader(controller, load_config(path))  # type: ignore[arg-type]
    assert not reloader.changed_on_disk()
    path.touch()
    path.write_bytes(path.read_bytes())
    assert not reloader.changed_on_disk()
    path.write_text(path.read_text() + "\n# a comment\n")
    assert reloader.changed_on_disk()
    assert not reloader.changed_on_disk()
    assert await reloader.reload("test") is True
    assert reloader.generation == 1 and reloader.last_error is None
    assert sorted(reloader.status()["last_reload"]["kept"]) == ["change", "gone", "keep"]
    path.write_text("server: {port: -5}\nprofiles: {}\n")
    assert await reloader.reload("test") is False
    assert reloader.status()["last_error"]["message"].startswith(str(path))
    assert controller.events[-1][0] == "config_error"
    assert len(controller.applied) == 1
