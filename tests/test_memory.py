"""Memory-aware residency end to end: fake upstreams that declare sizes against a configured budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil

from router.memory import MIB

from .conftest import RouterFactory, RunningRouter, fake_profile, upstream_processes, wait_until


def sized(model: Path, mib: int, **extra: Any) -> dict[str, Any]:
    return fake_profile(model, footprint={"ram": mib}, **extra)


async def running(router: RunningRouter) -> dict[str, dict[str, Any]]:
    async with router.session.get("/running") as response:
        assert response.status == 200
        return {row["model"]: row for row in (await response.json())["running"]}


async def test_models_that_fit_stay_resident_and_only_the_lru_one_is_evicted(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {name: sized(dummy_model, 400) for name in ("a", "b", "c")}, memory={"ram": 1000}
    )
    for name in ("a", "b", "a"):
        assert (await router.chat(name))[0] == 200
    rows = await running(router)
    assert set(rows) == {"a", "b"}
    assert rows["a"]["footprint"] == {"ram": 400 * MIB}
    pids = {name: row["pid"] for name, row in rows.items()}
    assert (await router.chat("c"))[0] == 200
    rows = await running(router)
    assert set(rows) == {"a", "c"}, "the least recently used model ('b') made room"
    assert rows["a"]["pid"] == pids["a"], "the model that still fits kept running"
    assert not psutil.pid_exists(pids["b"]) or psutil.Process(pids["b"]).status() == psutil.STATUS_ZOMBIE


async def test_pinned_model_stays_and_an_oversized_model_is_refused_with_a_reason(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"pin": sized(dummy_model, 600, pinned=True), "big": sized(dummy_model, 500)},
        memory={"ram": 1000},
    )
    assert (await router.chat("pin"))[0] == 200
    status, body = await router.chat("big")
    assert status == 503
    assert body["error"]["code"] == "model_too_large"
    assert "pinned" in body["error"]["message"]
    assert set(await running(router)) == {"pin"}


async def test_learned_footprint_replaces_the_estimate_and_survives_a_restart(
    start_router: RouterFactory, dummy_model: Path, tmp_path: Path
) -> None:
    profiles = {"m": fake_profile(dummy_model, "--memory-mib", "300")}
    state = tmp_path / "learned"
    router = await start_router(profiles, state_dir=str(state))
    estimate = router.controller.scheduler.view("m").footprint["ram"]
    assert (await router.chat("m"))[0] == 200
    await wait_until(lambda: (state / "footprints.json").exists(), what="the learned footprint to be saved")
    learned = router.controller.scheduler.view("m").footprint["ram"]
    assert learned != estimate
    assert 300 * MIB <= learned < 400 * MIB
    saved = json.loads((state / "footprints.json").read_text())
    assert saved["m"]["footprint"]["ram"] == learned
    await router.close()
    again = await start_router(profiles, state_dir=str(state))
    assert again.controller.scheduler.view("m").footprint["ram"] == learned


async def test_standby_profile_is_preloaded_and_yields_to_real_demand(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"warm": sized(dummy_model, 600, standby=True), "other": sized(dummy_model, 600)},
        memory={"ram": 1000},
    )
    await wait_until(lambda: router.controller.scheduler.view("warm").standby, what="the standby preload")
    async with router.session.get("/v1/models") as response:
        states = {entry["id"]: entry["status"]["value"] for entry in (await response.json())["data"]}
    assert states["warm"] == "standby"
    assert (await router.chat("other"))[0] == 200  # the standby model gives way
    assert set(await running(router)) == {"other"}
    assert len(upstream_processes()) == 1


async def test_ttl_unloads_an_idle_model(start_router: RouterFactory, dummy_model: Path) -> None:
    router = await start_router({"short": fake_profile(dummy_model, ttl=0.3)})
    events: list[dict[str, Any]] = []
    router.controller.subscribe(events.append)
    assert (await router.chat("short"))[0] == 200
    view = router.controller.scheduler.view
    await wait_until(lambda: view("short").state.value == "cold", what="the ttl to unload the model")
    assert await running(router) == {}
    assert not upstream_processes()
    ready = next(event for event in events if event["event"] == "ready")
    stopping = next(event for event in events if event["event"] == "stopping")
    assert stopping["cause"] == "ttl"
    assert stopping["time"] - ready["time"] >= 0.3, "not before it had been idle for its ttl"
