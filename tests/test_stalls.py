"""A busy model is not a wedged model: a request queued inside llama-server (beyond its slots) gets no
byte for as long as the requests before it take, and is not a stall while the slots make progress.
A server whose slots do not move, or whose `/slots` does not answer, is restarted as before."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from llama_router.upstream.slots import SlotWatch, slot_work
from tests.conftest import RouterFactory, RunningRouter, assert_openai_error, fake_profile

# The shape of llama-server's `GET /slots` (tools/server/server-context.cpp, `to_json(only_metrics)`).
SLOTS = [
    {
        "id": 0,
        "n_ctx": 512,
        "speculative": False,
        "is_processing": True,
        "id_task": 41,
        "n_prompt_tokens": 12,
        "n_prompt_tokens_processed": 12,
        "n_prompt_tokens_cache": 0,
        "params": {"n_predict": 2000},
        "next_token": [{"has_next_token": True, "has_new_line": False, "n_remain": 1900, "n_decoded": 100}],
    },
    {"id": 1, "n_ctx": 512, "speculative": False, "is_processing": False},
]


def test_slot_work_is_what_the_busy_slots_have_done() -> None:
    assert slot_work(SLOTS) == ((41, 112),)
    assert slot_work([SLOTS[1]]) == ()
    assert slot_work({"error": "This server does not support slots endpoint."}) is None
    assert slot_work(["x"]) is None


def test_a_watch_calls_moving_slots_work_and_still_or_idle_ones_not() -> None:
    watch = SlotWatch()
    assert watch.due(0.0, silent=5)
    watch.read(((1, 10),), now=0.0)
    assert watch.working(now=0.0, silent=5)  # a first reading: looked at again 5 s later
    assert not watch.due(0.1, silent=5)
    watch.read(((1, 10),), now=5.0)
    assert not watch.working(now=5.0, silent=5)  # nothing moved for 5 s: wedged
    watch.read(((1, 30),), now=6.0)
    assert watch.working(now=6.0, silent=5)
    watch.read(((2, 3),), now=12.0)  # another task: the first one finished
    assert watch.working(now=12.0, silent=5)
    watch.read((), now=13.0)  # no slot processing, yet a request waits: lost
    assert not watch.working(now=13.0, silent=5)
    watch.read(None, now=14.0)  # no answer (wedged loop, or no /slots page)
    assert not watch.working(now=14.0, silent=5)


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


async def _post(router: RunningRouter, model: str, **body: Any) -> tuple[int, bytes]:
    async with router.session.post("/v1/chat/completions", json={"model": model, **CHAT, **body}) as response:
        return response.status, await response.read()


async def _unhealthy(router: RunningRouter, model: str) -> float:
    async with router.session.get("/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith(f'llama_router_unhealthy_total{{model="{model}"}}'):
                return float(line.split()[-1])
    return 0.0


async def test_requests_queued_behind_a_busy_slot_are_not_stalled(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"busy": fake_profile(dummy_model, "--slots", "--parallel", "1")}, stall_timeout_prompt=0.4
    )
    assert (await _post(router, "busy"))[0] == 200
    pid = router.controller.upstreams["busy"].pid
    # Each takes 0.6 s in the one slot; the last waits 1.8 s without a byte, four times the limit.
    plain = [_post(router, "busy", fake_delay=0.6) for _ in range(3)]
    streamed = [_post(router, "busy", stream=True, fake_delay=0.3, fake_chunk_delay=0.1) for _ in range(2)]
    results = await asyncio.gather(*plain, *streamed)
    assert [status for status, _ in results] == [200] * 5, results
    for _, body in results[3:]:
        assert body.rstrip().endswith(b"data: [DONE]") and b"upstream_stalled" not in body
    assert router.controller.upstreams["busy"].pid == pid
    assert await _unhealthy(router, "busy") == 0


async def test_a_wedged_server_is_still_restarted(start_router: RouterFactory, dummy_model: Path) -> None:
    router = await start_router(
        {"wedge": fake_profile(dummy_model, "--slots", "--parallel", "2")},
        stall_timeout_prompt=0.4,
        restart_backoff=0,
    )
    assert (await _post(router, "wedge"))[0] == 200
    pid = router.controller.upstreams["wedge"].pid
    status, body = await _post(router, "wedge", fake_wedge=True)
    assert status == 502, body
    assert_openai_error(body, "upstream_stalled", status=status)
    assert await _unhealthy(router, "wedge") == 1
    assert (await _post(router, "wedge"))[0] == 200
    assert router.controller.upstreams["wedge"].pid != pid


async def test_a_stream_behind_a_wedged_one_ends_with_the_stall_error(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"wedge": fake_profile(dummy_model, "--slots", "--parallel", "1", "--stall-mid-stream", "2")},
        stall_timeout=0.4,
        stall_timeout_prompt=0.4,
    )
    first, second = await asyncio.gather(
        _post(router, "wedge", stream=True), _post(router, "wedge", stream=True, fake_delay=0.05)
    )
    for status, body in (first, second):
        assert status in (200, 502)
        assert b"upstream_stalled" in body  # the one behind is not kept waiting on a wedged server


async def test_the_real_llama_server_with_one_slot_serves_a_queue_of_long_generations(
    start_router: RouterFactory, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    args = ["--ctx-size", "4096", "--parallel", "1", "--threads", "1"]
    router = await start_router(
        {"one": {"model": str(tiny_models[0]), "binary": str(llama_server), "args": args}},
        stall_timeout_prompt=0.5,
        stall_timeout=0.5,
    )
    long = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}
    assert (await _post(router, "one", max_tokens=1))[0] == 200
    pid = router.controller.upstreams["one"].pid
    results = await asyncio.gather(
        *(_post(router, "one", **long) for _ in range(3)),
        *(_post(router, "one", stream=True, **long) for _ in range(2)),
    )
    assert [status for status, _ in results] == [200] * 5, [body[-300:] for _, body in results]
    for _, body in results[:3]:
        assert json.loads(body)["usage"]["completion_tokens"] == 1500
    for _, body in results[3:]:
        assert body.rstrip().endswith(b"data: [DONE]") and b"upstream_stalled" not in body
    assert router.controller.upstreams["one"].pid == pid
    assert await _unhealthy(router, "one") == 0
