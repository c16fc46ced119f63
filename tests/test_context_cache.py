"""`keep_context`: prompt caches saved before a stop and restored after a start.

Unit tests drive `ContextKeeper` against a loopback stub of llama-server's slots API and files on disk;
the end-to-end test runs the real llama-server on a model big enough that prompt processing shows.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from llama_router.config.schema import RouterConfig, load_config
from llama_router.upstream.context_cache import ContextKeeper, identity_key, profile_dir_name, prune
from llama_router.upstream.supervisor import Upstream
from tests.make_tiny_models import make_model

from .conftest import RouterFactory, fake_profile

MIB = 1024 * 1024


def make_config(tmp_path: Path, profiles: dict[str, Any], **server: Any) -> RouterConfig:
    path = tmp_path / "profiles.yaml"
    server.setdefault("state_dir", str(tmp_path / "state"))
    path.write_text(yaml.safe_dump({"server": server, "profiles": profiles}))
    return load_config(path)


def keeper_for(config: RouterConfig) -> ContextKeeper:
    assert config.server.state_dir is not None
    return ContextKeeper(config, config.server.state_dir / "slots")


# ---------------------------------------------------------------------------------------------- identity


def test_identity_follows_the_model_file_and_the_args_that_shape_the_cache(
    tmp_path: Path, dummy_model: Path
) -> None:
    base = fake_profile(dummy_model, "--ctx-size", "512", keep_context=True)
    profile = make_config(tmp_path, {"m": base}).profiles["m"]
    key = identity_key(profile, environ={})
    assert len(key) == 16 and key == identity_key(profile, environ={})
    assert identity_key(profile, environ={"HOME": "/elsewhere"}) == key, "unrelated env is ignored"
    assert identity_key(profile, environ={"LLAMA_ARG_CACHE_TYPE_K": "q8_0"}) != key

    other_args = {**base, "args": [*base["args"][:-1], "1024"]}
    assert identity_key(make_config(tmp_path, {"m": other_args}).profiles["m"], environ={}) != key
    with_env = {**base, "env": {"OMP_NUM_THREADS": "3"}}
    assert identity_key(make_config(tmp_path, {"m": with_env}).profiles["m"], environ={}) != key
    elsewhere = {**base, "args": [*base["args"], "--slot-save-path", str(tmp_path)]}
    assert identity_key(make_config(tmp_path, {"m": elsewhere}).profiles["m"], environ={}) == key

    stat = dummy_model.stat()
    os.utime(dummy_model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert identity_key(profile, environ={}) != key, "a replaced model file gets a new key"
    os.utime(dummy_model, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert identity_key(profile, environ={}) == key


def test_extra_args_give_each_profile_a_directory_unless_it_set_its_own(
    tmp_path: Path, dummy_model: Path
) -> None:
    own = tmp_path / "mine"
    config = make_config(
        tmp_path,
        {
            "on": fake_profile(dummy_model, keep_context=True),
            "off": fake_profile(dummy_model),
            "own": fake_profile(dummy_model, f"--slot-save-path={own}", keep_context=True),
            "odd/name": fake_profile(dummy_model, keep_context=True),
        },
    )
    keeper = keeper_for(config)
    args = keeper.extra_args(config.profiles["on"])
    assert args == ["--slot-save-path", str(keeper.root / "on")]
    assert (keeper.root / "on").is_dir()
    assert keeper.extra_args(config.profiles["off"]) == []
    assert keeper.extra_args(config.profiles["own"]) == [] and own.is_dir()
    odd = keeper.extra_args(config.profiles["odd/name"])[1]
    assert Path(odd).parent == keeper.root and "/" not in profile_dir_name("odd/name")


# ---------------------------------------------------------------------------------------------- stub


class SlotsStub:
    """llama-server's slots API on loopback, writing and reading files in the save directory."""

    def __init__(self, directory: Path, slots: list[dict[str, Any]]) -> None:
        self.directory = directory
        self.slots = slots
        self.calls: list[tuple[str, int, str]] = []
        self.hang = False
        self.released = asyncio.Event()  # never set while a test runs: a hung save waits on it
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def slots_list(self, request: web.Request) -> web.Response:
        return web.json_response(self.slots)

    async def slot_action(self, request: web.Request) -> web.Response:
        slot_id, action = int(request.match_info["id"]), request.query["action"]
        filename = (await request.json())["filename"]
        self.calls.append((action, slot_id, filename))
        path = self.directory / filename
        if action == "save":
            if self.hang:
                await self.released.wait()
            data = b"k" * (1000 + slot_id)
            path.write_bytes(data)
            return web.json_response(
                {"id_slot": slot_id, "filename": filename, "n_saved": 10, "n_written": len(data)}
            )
        if not path.is_file():
            return web.json_response(
                {"error": {"code": 400, "message": "invalid slot save file"}}, status=400
            )
        size = path.stat().st_size
        return web.json_response({"id_slot": slot_id, "filename": filename, "n_restored": 10, "n_read": size})

    async def __aenter__(self) -> SlotsStub:
        app = web.Application()
        app.router.add_get("/slots", self.slots_list)
        app.router.add_post("/slots/{id}", self.slot_action)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.released.set()
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def upstream_on(config: RouterConfig, name: str, port: int) -> Upstream:
    """An `Upstream` object (no process) whose base URL is the stub's."""
    upstream = Upstream(config.profiles[name], log_lines=10, health_interval=0.01)
    upstream.port = port
    return upstream


async def test_save_writes_slots_with_context_and_restore_takes_only_matching_files(
    tmp_path: Path, dummy_model: Path, session: aiohttp.ClientSession
) -> None:
    config = make_config(tmp_path, {"m": fake_profile(dummy_model, keep_context=True)})
    keeper = keeper_for(config)
    keeper.extra_args(config.profiles["m"])
    directory = keeper.root / "m"
    slots = [
        {"id": 0, "n_ctx": 512, "is_processing": False, "n_prompt_tokens": 300},
        {"id": 1, "n_ctx": 512, "is_processing": False, "n_prompt_tokens": 0},  # ran a task, nothing kept
        {"id": 2, "n_ctx": 512, "is_processing": True, "n_prompt_tokens": 40},  # forced stop mid-request
        {"id": 3, "n_ctx": 512, "is_processing": False},  # never used
    ]
    async with SlotsStub(directory, slots) as stub:
        first = upstream_on(config, "m", stub.port)
        assert await keeper.restore(first, session) is None, "nothing saved yet: nothing to do"
        saved = await keeper.save(first, session)
        assert saved is not None and "error" not in saved, saved
        assert (saved["slots"], saved["bytes"], saved["tokens"]) == (1, 1000, 10)
        key = identity_key(config.profiles["m"])
        assert sorted(path.name for path in directory.iterdir()) == [f"{key}-slot0.bin"]
        assert stub.calls == [("save", 0, f"{key}-slot0.bin.part")], "written under a temporary name"

        # Files another process identity wrote, a slot this process lacks, a save cut short.
        (directory / f"{'f' * 16}-slot1.bin").write_bytes(b"other model")
        (directory / f"{key}-slot7.bin").write_bytes(b"slot gone")
        (directory / f"{key}-slot1.bin.part").write_bytes(b"partial")
        stub.calls.clear()
        second = upstream_on(config, "m", stub.port)
        keeper.extra_args(config.profiles["m"])
        restored = await keeper.restore(second, session)
        assert restored is not None and "error" not in restored, restored
        assert (restored["slots"], restored["bytes"]) == (1, 1000)
        assert stub.calls == [("restore", 0, f"{key}-slot0.bin")]
        assert not (directory / f"{key}-slot1.bin.part").exists(), "leftover of a cut-short save deleted"
        assert (directory / f"{'f' * 16}-slot1.bin").exists() and (directory / f"{key}-slot7.bin").exists()

        stub.slots = [{"id": 0, "n_ctx": 512, "is_processing": False}]
        assert await keeper.save(second, session) is None, "no slot holds a context: nothing to save"


async def test_a_slow_save_is_cut_off_at_the_time_limit(
    tmp_path: Path, dummy_model: Path, session: aiohttp.ClientSession
) -> None:
    config = make_config(
        tmp_path, {"m": fake_profile(dummy_model, keep_context=True)}, context_save_timeout=0.3
    )
    keeper = keeper_for(config)
    keeper.extra_args(config.profiles["m"])
    slots = [{"id": 0, "n_ctx": 512, "is_processing": False, "n_prompt_tokens": 5}]
    async with SlotsStub(keeper.root / "m", slots) as stub:
        stub.hang = True
        started = time.monotonic()
        result = await keeper.save(upstream_on(config, "m", stub.port), session)
        elapsed = time.monotonic() - started
        assert not [path for path in (keeper.root / "m").iterdir() if path.suffix == ".bin"]
    assert result is not None and "timed out" in result["error"] and result["slots"] == 0
    assert elapsed < 2.0


async def test_an_upstream_without_the_slots_api_is_a_reported_failure(
    tmp_path: Path, dummy_model: Path, session: aiohttp.ClientSession
) -> None:
    config = make_config(tmp_path, {"m": fake_profile(dummy_model, keep_context=True)})
    keeper = keeper_for(config)
    upstream = upstream_on(config, "m", 1)  # nothing listens on port 1
    result = await keeper.save(upstream, session)
    assert result is not None and "GET /slots" in result["error"]


# ---------------------------------------------------------------------------------------------- disk


def write_cache(path: Path, size: int, age: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"c" * size)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_the_disk_cap_drops_the_oldest_files_across_profiles(tmp_path: Path) -> None:
    root = tmp_path / "slots"
    key = "0123456789abcdef"
    oldest = write_cache(root / "a" / f"{key}-slot0.bin", MIB, age=300)
    old = write_cache(root / "b" / f"{key}-slot0.bin", MIB, age=200)
    newer = write_cache(root / "a" / f"{key}-slot1.bin", MIB, age=100)
    newest = write_cache(root / "b" / f"{key}-slot1.bin", MIB, age=0)
    foreign = write_cache(root / "a" / "notes.txt", 5 * MIB, age=999)  # not ours: neither counted nor deleted
    own_dir = write_cache(tmp_path / "mine" / f"{key}-slot0.bin", MIB, age=50)

    assert prune([root, tmp_path / "mine"], 3 * MIB) == 2
    assert not oldest.exists() and not old.exists()
    assert newer.exists() and newest.exists() and own_dir.exists() and foreign.exists()
    assert prune([root], 10 * MIB) == 0
    assert prune([root], 0) == 2 and not newer.exists() and not newest.exists()


def test_forget_removed_deletes_only_removed_profiles_directories_inside_the_root(
    tmp_path: Path, dummy_model: Path
) -> None:
    config = make_config(
        tmp_path,
        {"a": fake_profile(dummy_model, keep_context=True), "b/c": fake_profile(dummy_model)},
    )
    keeper = keeper_for(config)
    key = "0123456789abcdef"
    kept = write_cache(keeper.root / "a" / f"{key}-slot0.bin", 10, age=0)
    kept_odd = write_cache(keeper.root / profile_dir_name("b/c") / f"{key}-slot0.bin", 10, age=0)
    gone = write_cache(keeper.root / "removed" / f"{key}-slot0.bin", 10, age=0)
    outside = write_cache(tmp_path / "outside" / f"{key}-slot0.bin", 10, age=0)
    (keeper.root / "link").symlink_to(tmp_path / "outside")

    smaller = make_config(tmp_path, {"a": fake_profile(dummy_model, keep_context=True)})
    keeper.forget_removed(config)
    assert kept.exists() and kept_odd.exists() and not gone.parent.exists()
    keeper.forget_removed(smaller)
    assert keeper.config is smaller
    assert kept.exists() and not kept_odd.parent.exists()
    assert outside.exists(), "a link out of the root is never followed"


# ---------------------------------------------------------------------------------------------- router


async def scrape_value(router: Any, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    async with router.session.get("/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def test_a_failing_save_or_restore_neither_blocks_the_swap_nor_the_request(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    """The fake upstream has no slots API (404): every save and restore fails, everything else works."""
    router = await start_router(
        {"a": fake_profile(dummy_model, keep_context=True), "b": fake_profile(dummy_model)}, max_resident=1
    )
    events: list[dict[str, Any]] = []
    router.controller.events.subscribe(lambda event: events.append(event.json()))
    profile = router.config.profiles["a"]
    directory = router.controller.contexts.profile_dir(profile)
    for model in ("a", "b"):
        status, body = await router.chat(model)
        assert status == 200, body
    failed = [event for event in events if event["event"] == "context_save_failed"]
    assert [event["model"] for event in failed] == ["a"]
    assert "404" in failed[0]["error"]
    assert not [event for event in events if event["event"] == "context_saved"]

    # A cache file that fits the next process: the restore is tried, fails, and the request is served.
    (directory / f"{identity_key(profile)}-slot0.bin").write_bytes(b"cache")
    status, body = await router.chat("a")
    assert status == 200, body
    assert [event["model"] for event in events if event["event"] == "context_restore_failed"] == ["a"]
    kinds = [event["event"] for event in events if event.get("model") == "a"]
    assert kinds[-3:] == ["loading", "context_restore_failed", "ready"], "tried before the first dispatch"
    assert await scrape_value(router, "llama_router_context_failures_total", model="a", action="save") == 1
    assert await scrape_value(router, "llama_router_context_failures_total", model="a", action="restore") == 1


@pytest.fixture(scope="session")
def context_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model big enough that a few hundred prompt tokens take visible time (~0.1 s on one thread)."""
    return make_model(tmp_path_factory.mktemp("ctx-models") / "ctx-a.gguf", n_embd=256, n_layer=4, seed=7)


def long_prompt(words: int = 40) -> str:
    """About 15 tokens a word group with the generated models' tiny vocabulary: ~600 tokens."""
    return " ".join(f"word{i % 37} lorem ipsum" for i in range(words))


@pytest.mark.parametrize("keep_context", [True, False])
async def test_a_conversation_survives_a_swap_with_keep_context(
    start_router: RouterFactory,
    tiny_models: tuple[Path, Path],
    context_model: Path,
    llama_server: Path,
    keep_context: bool,
) -> None:
    # An explicit --parallel gives each slot its own KV cache, so idle slots keep their contexts.
    args = ["--ctx-size", "4096", "--parallel", "2", "--threads", "1"]
    router = await start_router(
        {
            "big": {"model": str(context_model), "binary": str(llama_server), "args": args},
            "small": {"model": str(tiny_models[1]), "binary": str(llama_server), "args": args},
        },
        max_resident=1,
        keep_context=keep_context,
    )
    events: list[dict[str, Any]] = []
    router.controller.events.subscribe(lambda event: events.append(event.json()))
    messages = [{"role": "user", "content": long_prompt()}]
    status, first = await router.chat("big", messages=messages, max_tokens=4, temperature=0)
    assert status == 200, first
    assert first["timings"]["cache_n"] == 0 and first["timings"]["prompt_n"] > 400

    status, body = await router.chat("small", max_tokens=2)  # evicts big
    assert status == 200, body

    messages += [first["choices"][0]["message"], {"role": "user", "content": "and then?"}]
    status, second = await router.chat("big", messages=messages, max_tokens=4, temperature=0)
    assert status == 200, second
    cached = second["timings"]["cache_n"]
    assert cached == second["usage"]["prompt_tokens_details"]["cached_tokens"]
    kinds = [event["event"] for event in events]
    if not keep_context:
        assert cached == 0
        assert not [kind for kind in kinds if kind.startswith("context_")]
        return
    assert cached >= first["timings"]["prompt_n"] - 8, (first["timings"], second["timings"])
    assert second["timings"]["prompt_n"] < 100
    saved = [event for event in events if event["event"] == "context_saved" and event["model"] == "big"]
    restored = [event for event in events if event["event"] == "context_restored"]
    assert len(saved) == 1 and saved[0]["slots"] == 1
    assert saved[0]["bytes"] > 100_000 and saved[0]["tokens"] >= first["timings"]["prompt_n"]
    assert len(restored) == 1 and restored[0]["bytes"] == saved[0]["bytes"]
    assert "context_save_failed" not in kinds and "context_restore_failed" not in kinds
    lifecycle = ("loading", "ready", "stopping", "context_saved", "stopped", "context_restored")
    big = [event["event"] for event in events if event.get("model") == "big" and event["event"] in lifecycle]
    assert big == [
        *("loading", "ready", "stopping", "context_saved", "stopped"),
        *("loading", "context_restored", "ready"),
    ], "saved before the stop; restored before the model took its first request"
    files = [path.name for path in (router.controller.contexts.root / "big").iterdir()]
    assert len(files) == 1 and files[0].endswith(("-slot0.bin", "-slot1.bin")), files
    operations = "llama_router_context_operations_total"
    assert await scrape_value(router, operations, model="big", action="save") == 1
    assert await scrape_value(router, operations, model="big", action="restore") == 1
