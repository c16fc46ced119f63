"""When a model goes wrong: crash loops back off and end in `failed`; a load out of memory evicts and
retries once."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .conftest import RouterFactory, RunningRouter, assert_openai_error, fake_profile, wait_until


async def model_status(router: RunningRouter, name: str) -> str:
    async with router.session.get("/v1/models") as response:
        entries = {entry["id"]: entry for entry in (await response.json())["data"]}
    return str(entries[name]["status"]["detail"])


async def test_a_crash_loop_backs_off_between_tries_and_ends_failed_with_the_reason(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    events: list[dict[str, Any]] = []
    router = await start_router(
        {"broken": fake_profile(dummy_model, "--crash-during-load")},
        max_failures=3,
        restart_backoff=0.2,
    )
    router.controller.events.subscribe(lambda event: events.append(event.json()))
    started = time.monotonic()
    status, body = await router.chat("broken")
    elapsed = time.monotonic() - started
    assert status == 503
    assert_openai_error(body, "model_load_failed")
    assert "failed 3 times" in body["error"]["message"]
    assert "failed to load model" in body["error"]["message"]  # the log tail
    assert elapsed >= 0.2 + 0.4, "the retries backed off: 0.2 s, then 0.4 s"
    loads = [event["time"] for event in events if event["event"] == "loading"]
    assert len(loads) == 3
    # Each try waited at least its back-off (the spawns themselves take longer on a busy machine).
    assert loads[1] - loads[0] >= 0.2 - 0.02 and loads[2] - loads[1] >= 0.4 - 0.02, loads
    assert await model_status(router, "broken") == "failed"
    # A later request tries once more at once, and fails fast.
    started = time.monotonic()
    status, body = await router.chat("broken")
    assert status == 503 and time.monotonic() - started < 2.0
    assert router.controller.view("broken").starts == 4


async def test_an_out_of_memory_load_evicts_idle_models_and_succeeds_on_retry(
    start_router: RouterFactory, dummy_model: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "oom-once"
    sized = {"footprint": {"ram": 400}}
    router = await start_router(
        {
            "a": fake_profile(dummy_model, **sized),
            "b": fake_profile(dummy_model, **sized),
            "big": fake_profile(dummy_model, "--oom-once", str(marker), **sized),
        },
        memory={"ram": 1300},
    )
    assert (await router.chat("a"))[0] == 200
    assert (await router.chat("b"))[0] == 200
    status, body = await router.chat("big")
    assert status == 200, body
    assert marker.exists(), "the first load really ran out of memory"
    running = {row["model"] for row in router.controller.describe() if row["state"] == "ready"}
    assert running == {"big"}, "the idle models made room for the retry"
    assert router.controller.view("big").starts == 2
    await wait_until(lambda: router.controller.view("a").state.value == "cold", what="a stopped")


async def test_an_idle_model_failing_its_health_probes_is_restarted(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    events: list[dict[str, Any]] = []
    router = await start_router(
        {"wedge": fake_profile(dummy_model, "--health-fail-after", "0.2")},
        health_check_interval=0.1,
        health_check_failures=3,
        restart_backoff=0,
    )
    router.controller.events.subscribe(lambda event: events.append(event.json()))
    assert (await router.chat("wedge"))[0] == 200
    first = router.controller.upstreams["wedge"].pid
    await wait_until(
        lambda: any(event["event"] == "unhealthy" for event in events), timeout=10, what="the wedge noticed"
    )
    unhealthy = next(event for event in events if event["event"] == "unhealthy")
    assert "3 times in a row" in unhealthy["reason"]
    await wait_until(lambda: "wedge" not in router.controller.upstreams, what="the wedged process stopped")
    status, body = await router.chat("wedge")
    assert status == 200, body
    assert router.controller.upstreams["wedge"].pid != first


async def test_a_flapping_health_check_is_not_a_wedge(start_router: RouterFactory, dummy_model: Path) -> None:
    """Every other probe fails: never three in a row, so the model keeps running."""
    router = await start_router(
        {"flap": fake_profile(dummy_model, "--health-flap")},
        health_check_interval=0.05,
        health_check_failures=2,
    )
    events: list[dict[str, Any]] = []
    router.controller.events.subscribe(lambda event: events.append(event.json()))
    assert (await router.chat("flap"))[0] == 200
    upstream = router.controller.upstreams["flap"]
    probes = await fake_health_calls(router, upstream.base_url, at_least=12)
    assert probes >= 12
    assert not [event for event in events if event["event"] == "unhealthy"]
    assert router.controller.upstreams["flap"] is upstream


async def fake_health_calls(router: RunningRouter, base_url: str, at_least: int) -> int:
    """How many /health calls the fake has answered, once it has answered `at_least`."""
    calls = 0

    async def enough() -> bool:
        nonlocal calls
        async with router.session.get(f"{base_url}/fake/last") as response:
            calls = int((await response.json()).get("health_calls", 0))
        return calls >= at_least

    await wait_until(enough, timeout=10, what=f"{at_least} health probes")
    return calls


async def test_a_stall_mid_stream_ends_with_an_error_event_and_the_model_is_restarted(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    stall = 0.5
    router = await start_router(
        {"wedge": fake_profile(dummy_model, "--stall-mid-stream", "2")},
        stall_timeout=stall,
        restart_backoff=0,
    )
    assert (await router.chat("wedge"))[0] == 200  # non-streamed answers are fine
    first = router.controller.upstreams["wedge"].pid
    started = time.monotonic()
    payload = {"model": "wedge", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with router.session.post("/v1/chat/completions", json=payload) as response:
        assert response.status == 200
        raw = await response.read()
    elapsed = time.monotonic() - started
    assert elapsed < stall + 1.0, "the error came within the stall time plus one second"
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert len(events) == 4  # the role chunk, two content chunks, then the error
    error = json.loads(events[-1])["error"]
    assert error["code"] == "upstream_stalled" and "stalled" in error["message"]
    await wait_until(lambda: router.controller.upstreams.get("wedge") is None, what="the wedged one stopped")
    status, body = await router.chat("wedge")
    assert status == 200, body
    assert router.controller.upstreams["wedge"].pid != first
    async with router.session.get("/metrics") as response:
        assert 'llama_router_unhealthy_total{model="wedge"} 1.0' in await response.text()


async def test_a_fallback_answers_when_the_primary_cannot_load(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {
            "primary": fake_profile(dummy_model, "--crash-during-load", fallback=["backup"]),
            "backup": fake_profile(dummy_model),
        },
        max_failures=1,
    )
    payload = {"model": "primary", "messages": [{"role": "user", "content": "hi"}]}
    async with router.session.post("/v1/chat/completions", json=payload) as response:
        assert response.status == 200
        assert response.headers["X-Llama-Router-Fallback"] == "primary -> backup"
        body = await response.json()
    assert body["model"] == "backup", "the answer names the model that gave it"
    assert router.controller.view("primary").failed
    # Known to be failed now: the next request goes straight to the fallback.
    async with router.session.post("/v1/chat/completions", json=payload) as response:
        assert response.status == 200
    assert router.controller.view("primary").starts == 1
    async with router.session.get("/metrics") as response:
        metrics = await response.text()
    assert 'llama_router_fallbacks_total{model="primary",served_by="backup"} 2.0' in metrics
