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

from llama_router.config.schema import load_config
from llama_router.core.events import Event, EventBus, ReloadFailed
from llama_router.manage.reload import ConfigReloader
from tests.conftest import assert_openai_error, fake_profile, wait_until
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
    assert status == 404, answer
    assert_openai_error(answer, "model_not_found", status=status)
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
        self.heard: list[Event] = []
        self.events = EventBus()
        self.events.subscribe(self.heard.append)

    async def reload(self, config: Any) -> dict[str, list[str]]:
        self.applied.append(config)
        return {"kept": list(config.profiles), "restarted": [], "added": [], "removed": []}


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
    assert isinstance(controller.heard[-1], ReloadFailed)
    assert len(controller.applied) == 1


async def reload_with(
    router: RouterProcess, path: Path, profiles: dict[str, Any], **server: Any
) -> dict[str, Any]:
    """Rewrite the config, send SIGHUP, and return the log entry that says how this reload ended."""
    seen = len(router.lines)
    write_config(path, profiles, watch_config=False, **server)
    router.signal(signal.SIGHUP)

    def outcome() -> dict[str, Any] | None:
        ends = ("config_reloaded", "config_error")
        return next((e for e in router.lines[seen:] if e.get("event") in ends), None)

    await wait_until(outcome, timeout=20, what="the reload to end")
    entry = outcome()
    assert entry is not None
    return entry


async def get_status(url: str, path: str, key: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session, session.get(f"{url}{path}", headers=headers) as response:
        return response.status, await response.json()


ADMIN_KEY = "admin-key"


async def upstream_saw_auth(url: str, key: str) -> bool:
    """Whether the upstream received the client's Authorization header with its last chat (read
    through `/upstream/`, with the admin key where keys are set)."""
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as response:
            assert response.status == 200, await response.text()
        last_chat = "/upstream/m/fake/last?path=/v1/chat/completions"
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with session.get(url + last_chat, headers=admin) as response:
            last = await response.json()
    return "authorization" in {name.lower() for name in last["headers"]}


async def test_keys_follow_reloads_added_rotated_and_removed(
    tmp_path: Path, dummy_model: Path, router_processes: list[RouterProcess]
) -> None:
    path = tmp_path / "profiles.yaml"
    profiles = {"m": fake_profile(dummy_model)}
    write_config(path, profiles, watch_config=False)
    router = await RouterProcess(path).start()
    router_processes.append(router)
    assert (await get_status(router.url, "/v1/models"))[0] == 200
    assert await upstream_saw_auth(router.url, "client-own-key"), "an open router forwards the header"

    entry = await reload_with(router, path, profiles, api_keys=["first-key"], admin_keys=[ADMIN_KEY])
    assert entry["event"] == "config_reloaded"
    changed = await router.wait_log(lambda e: e.get("event") == "keys_changed", what="the keys change")
    assert (changed["api_keys"], changed["admin_keys"]) == (1, 1)
    status, body = await get_status(router.url, "/v1/models")
    assert status == 401, body
    assert_openai_error(body, "invalid_api_key", status=status)
    assert (await get_status(router.url, "/v1/models", "first-key"))[0] == 200
    assert not await upstream_saw_auth(router.url, "first-key"), "the router's key is kept from the upstream"

    entry = await reload_with(router, path, profiles, api_keys=["second-key"], admin_keys=[ADMIN_KEY])
    assert entry["event"] == "config_reloaded"
    assert (await get_status(router.url, "/v1/models", "first-key"))[0] == 401
    assert (await get_status(router.url, "/v1/models", "second-key"))[0] == 200

    entry = await reload_with(router, path, profiles)
    assert entry["event"] == "config_reloaded"
    assert (await get_status(router.url, "/v1/models"))[0] == 200
    assert await upstream_saw_auth(router.url, "client-own-key"), "open again: the header is forwarded"

    assert [e["api_keys"] for e in router.lines if e.get("event") == "keys_changed"] == [1, 1, 0]
    assert not any(key in line for line in router.raw for key in ("first-key", "second-key"))
    router.signal(signal.SIGTERM)
    assert await router.wait_exit() == 0


async def test_a_reload_naming_an_unset_key_variable_keeps_the_old_keys(
    tmp_path: Path, dummy_model: Path, router_processes: list[RouterProcess]
) -> None:
    path = tmp_path / "profiles.yaml"
    profiles = {"m": fake_profile(dummy_model)}
    write_config(path, profiles, watch_config=False, api_keys=["old-key"])
    env = {"ROUTER_TEST_UNSET_KEYS": ""}  # named in the new config, holding no keys
    router = await RouterProcess(path, env=env).start()
    router_processes.append(router)
    assert (await get_status(router.url, "/v1/models", "old-key"))[0] == 200

    entry = await reload_with(
        router, path, profiles, api_keys=["new-key"], api_keys_env="ROUTER_TEST_UNSET_KEYS"
    )
    assert entry["event"] == "config_error" and entry["trigger"] == "SIGHUP"
    assert "ROUTER_TEST_UNSET_KEYS" in entry["message"] and "keeping the running config" in entry["message"]
    assert (await get_status(router.url, "/v1/models"))[0] == 401
    assert (await get_status(router.url, "/v1/models", "new-key"))[0] == 401
    assert (await get_status(router.url, "/v1/models", "old-key"))[0] == 200
    assert await get_status(router.url, "/health") == (200, {"status": "ok"})  # no key: up, no more
    status, health = await get_status(router.url, "/health", "old-key")
    assert status == 200 and health["reload"]["generation"] == 0
    error = health["reload"]["last_error"]
    assert error["trigger"] == "SIGHUP" and "server.api_keys_env" in error["message"]
    assert not any(e.get("event") == "keys_changed" for e in router.lines)
    router.signal(signal.SIGTERM)
    assert await router.wait_exit() == 0


async def test_a_reload_applies_new_scheduling_settings(
    tmp_path: Path, dummy_model: Path, router_processes: list[RouterProcess]
) -> None:
    """`server.max_waiting` set by a reload refuses the request beyond it: the scheduler takes its
    settings from the new config, not only its profiles."""
    path = tmp_path / "profiles.yaml"
    profiles = {"slow": fake_profile(dummy_model, "--load-delay", "2")}
    write_config(path, profiles, watch_config=False)
    router = await RouterProcess(path).start()
    router_processes.append(router)
    entry = await reload_with(router, path, profiles, max_waiting=1)
    assert entry["event"] == "config_reloaded", entry
    body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(base_url=router.url) as session:
        first = asyncio.ensure_future(session.post("/v1/chat/completions", json=body))

        async def waiting() -> bool:
            _, rows = await get_status(router.url, "/running")
            return bool(rows["running"]) and rows["running"][0]["waiting"] == 1

        await wait_until(waiting, what="the first request to wait for the load")
        async with session.post("/v1/chat/completions", json=body) as refused:
            assert refused.status == 429, await refused.text()
            assert refused.headers["Retry-After"] == "1"
            error = assert_openai_error(await refused.json(), status=refused.status)
            assert error["code"] == "too_many_waiting" and "max_waiting" in error["message"], error
        async with await asyncio.wait_for(first, 20) as answered:
            assert answered.status == 200, await answered.text()
