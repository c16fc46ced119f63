"""Management clicks racing a model's start: Load then Unload at once, while the process is being
spawned, and while it loads, on the real llama-server and on a fake upstream that spawns and loads
slowly. Whatever the moment, the model ends unloaded with no process, and the next request is served."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from llama_router.core.errors import RouterError

from .conftest import RouterFactory, RunningRouter, fake_profile, upstream_processes, wait_until
from .test_api import post_json
from .test_real_llama_server import real_profiles

# Seconds between the Load click and the Unload click: the same event-loop turn, the spawn, the load.
GAPS = (0.0, 0.02, 0.1)
STOP_TIMEOUT = 2.0


def slow_fake(model: Path) -> dict[str, Any]:
    """A fake upstream that listens on a Unix socket (so its spawn first asks `--help`, a second
    Python start) and then loads for a second before `/health` answers 200."""
    return {"m": fake_profile(model, "--accepts-unix-socket", "--load-delay", "1.0")}


async def click_load_then_unload(router: RunningRouter, name: str, gap: float, *, force: bool) -> str:
    """Load then Unload `name`, `gap` seconds apart, as a person clicking in a UI would; returns the
    phase the unload met (`spawning`: no process yet, `loading`: a process, not ready)."""
    status, body = await post_json(router, "/models/load", {"model": name})
    assert status == 200, body
    if gap:
        await asyncio.sleep(gap)  # the gap between the clicks is the scenario itself
    [row] = [row for row in router.controller.describe() if row["model"] == name]
    phase = {"starting": "loading" if row["pid"] else "spawning"}.get(row["state"], row["state"])
    status, body = await post_json(router, "/models/unload", {"model": name, "force": force})
    assert status == 200, body
    return phase


def record_events(router: RunningRouter, name: str) -> list[str]:
    """The names of `name`'s lifecycle events (`loading`, `stopping`, `stopped`...), as they come."""
    seen: list[str] = []
    router.controller.events.subscribe(
        lambda event: seen.append(event.json()["event"]) if event.json().get("model") == name else None
    )
    return seen


async def assert_unloaded_then_served(router: RunningRouter, name: str, events: list[str]) -> None:
    await wait_until(
        lambda: router.controller.view(name).state.value == "cold" and not upstream_processes(),
        timeout=STOP_TIMEOUT + 10,
        what=f"{name} to end unloaded with no process",
    )
    async with router.session.get("/running") as response:
        running = await response.json()
    assert running["running"] == [], running
    assert events[-2:] == ["stopping", "stopped"], f"clients last heard {events}"
    status, body = await router.chat(name)
    assert status == 200, body


@pytest.mark.parametrize("force", [False, True], ids=["unload", "forced"])
@pytest.mark.parametrize("gap", GAPS, ids=[f"{int(gap * 1000)}ms" for gap in GAPS])
async def test_load_then_unload_on_the_fake_upstream_ends_unloaded(
    start_router: RouterFactory, dummy_model: Path, gap: float, force: bool
) -> None:
    router = await start_router(slow_fake(dummy_model), stop_timeout=STOP_TIMEOUT)
    events = record_events(router, "m")
    phase = await click_load_then_unload(router, "m", gap, force=force)
    print(f"fake upstream, gap {gap * 1000:g} ms, force={force}: unload met {phase}")
    await assert_unloaded_then_served(router, "m", events)


@pytest.mark.parametrize("force", [False, True], ids=["unload", "forced"])
@pytest.mark.parametrize("gap", GAPS, ids=[f"{int(gap * 1000)}ms" for gap in GAPS])
async def test_load_then_unload_on_the_real_llama_server_ends_unloaded(
    start_router: RouterFactory, tiny_models: tuple[Path, Path], llama_server: Path, gap: float, force: bool
) -> None:
    router = await start_router(real_profiles(tiny_models, llama_server), stop_timeout=STOP_TIMEOUT)
    events = record_events(router, "tiny-a")
    phase = await click_load_then_unload(router, "tiny-a", gap, force=force)
    print(f"llama-server, gap {gap * 1000:g} ms, force={force}: unload met {phase}")
    await assert_unloaded_then_served(router, "tiny-a", events)


async def test_an_unload_in_the_same_turn_as_the_load_starts_no_process(
    start_router: RouterFactory, dummy_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The unload comes before the start's own task has run: no process is spawned at all, and the
    events tell the story in order."""
    router = await start_router({"m": fake_profile(dummy_model)})
    events = record_events(router, "m")
    load = asyncio.ensure_future(router.controller.load("m"))
    await asyncio.sleep(0)  # the load's request arrives and its start is decided
    assert events == ["loading"]
    with caplog.at_level(logging.INFO, logger="llama_router"):
        router.controller.unload("m")
        with pytest.raises(RouterError, match="was unloaded"):
            await load
    await wait_until(lambda: router.controller.view("m").state.value == "cold", what="m to be cold")
    assert events == ["loading", "stopping", "stopped"]
    assert "m stopped before its process was started" in caplog.text
    assert "spawned m" not in caplog.text
    assert (await router.chat("m"))[0] == 200


async def test_a_forced_unload_of_a_loading_model_ends_within_stop_timeout(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    """Even a process that ignores SIGTERM while it loads is gone once `stop_timeout` has passed."""
    router = await start_router(
        {"m": fake_profile(dummy_model, "--ignore-sigterm", "--load-delay", "30")}, stop_timeout=1.0
    )
    await post_json(router, "/models/load", {"model": "m"})
    await wait_until(lambda: router.controller.describe()[0]["pid"], what="the process to be spawned")
    started = time.monotonic()
    status, body = await post_json(router, "/models/unload", {"model": "m", "force": True, "wait": True})
    assert (status, body["status"]["value"]) == (200, "unloaded"), body
    assert time.monotonic() - started < 1.0 + 2.0, "SIGKILL came at stop_timeout"
    assert upstream_processes() == []


async def test_a_forced_unload_does_not_wait_for_a_wedged_prompt_cache_save(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    """A model keeping its context is wedged (its `/slots` never answers, so a save would wait the
    whole `context_save_timeout`): a forced unload still ends it within `stop_timeout`."""
    router = await start_router(
        {"m": fake_profile(dummy_model, "--slots", keep_context=True)},
        stop_timeout=1.0,
        context_save_timeout=60,
    )
    assert (await router.chat("m"))[0] == 200
    wedged = asyncio.ensure_future(router.chat("m", fake_wedge=True))
    await wait_until(lambda: router.controller.view("m").in_flight == 1, what="the wedged request")
    started = time.monotonic()
    status, body = await post_json(router, "/models/unload", {"model": "m", "force": True, "wait": True})
    assert (status, body["status"]["value"]) == (200, "unloaded"), body
    assert time.monotonic() - started < 1.0 + 2.0, "no wait for the save"
    assert upstream_processes() == []
    status, body = await wedged
    assert status >= 500 and "error" in body, "the wedged request was told"


@pytest.mark.parametrize("gap", GAPS, ids=[f"{int(gap * 1000)}ms" for gap in GAPS])
async def test_a_shutdown_right_after_a_load_leaves_no_process(
    start_router: RouterFactory, dummy_model: Path, gap: float
) -> None:
    router = await start_router(slow_fake(dummy_model))
    status, _ = await post_json(router, "/models/load", {"model": "m"})
    assert status == 200
    if gap:
        await asyncio.sleep(gap)
    await router.close()
    assert upstream_processes() == []
