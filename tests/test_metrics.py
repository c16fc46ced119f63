"""`/metrics`: Prometheus text from a per-router registry, fed by requests, loads and usage."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from llama_router.relay.request_rules import UsageTail, parse_usage

from .conftest import RouterFactory, RunningRouter, fake_profile

CHAT = "/v1/chat/completions"


async def scrape(router: RunningRouter) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of `/metrics` as {(name, sorted labels): value}."""
    async with router.session.get("/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "one two three"}], **extra}


# ---------------------------------------------------------------------------------------------- usage


def test_usage_is_found_in_the_last_bytes_of_answers() -> None:
    chat = json.dumps({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5}}).encode()
    assert parse_usage(chat) == (12, 5)
    details = (
        b'{"usage":{"completion_tokens":7,"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":2}}}'
    )
    assert parse_usage(details) == (3, 7)
    anthropic = b'{"content":[],"usage":{"input_tokens":9,"output_tokens":4}}'
    assert parse_usage(anthropic) == (9, 4)
    native = b'{"content":"hi","stop":true,"tokens_evaluated":6,"tokens_predicted":2}'
    assert parse_usage(native) == (6, 2)
    embeddings = b'{"data":[{"embedding":[0.1]}],"usage":{"prompt_tokens":4,"total_tokens":4}}'
    assert parse_usage(embeddings) == (4, 0)
    assert parse_usage(b'{"choices":[{"message":{"content":"no usage here"}}]}') is None


def test_a_stream_tail_keeps_whole_chunks_until_it_holds_enough() -> None:
    tail = UsageTail(limit=64)
    tail.feed(b'data: {"choices":[{"delta":{"content":"' + b"x" * 500 + b'"}}]}\n\n')
    tail.feed(b'data: {"choices":[],"usa')  # a usage chunk split across two reads
    tail.feed(b'ge":{"prompt_tokens":21,"completion_tokens":8}}\n\ndata: [DONE]\n\n')
    assert tail.usage() == (21, 8)
    assert UsageTail().usage() is None


# ---------------------------------------------------------------------------------------------- scrape


async def test_requests_loads_swaps_waits_and_tokens_are_counted(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"a": fake_profile(dummy_model, "--chunks", "3"), "b": fake_profile(dummy_model)}, max_resident=1
    )
    status, body = await router.chat("a")
    assert status == 200
    usage = body["usage"]
    stream = chat_body("a", stream=True, stream_options={"include_usage": True})
    async with router.session.post(CHAT, json=stream) as response:
        assert response.status == 200
        await response.read()
    status, _ = await router.chat("nope")
    assert status == 404
    status, _ = await router.chat("b")  # swaps a out
    assert status == 200

    samples = await scrape(router)
    assert value(samples, "llama_router_requests_total", model="a", status="200") == 2
    assert value(samples, "llama_router_requests_total", model="b", status="200") == 1
    assert value(samples, "llama_router_requests_total", model="unknown", status="404") == 1
    assert value(samples, "llama_router_errors_total", model="unknown", code="model_not_found") == 1
    assert value(samples, "llama_router_loads_total", model="a") == 1
    assert value(samples, "llama_router_load_seconds_count", model="a") == 1
    assert 0 < value(samples, "llama_router_load_seconds_sum", model="a") < 30
    assert value(samples, "llama_router_load_seconds_count", model="b") == 1
    assert value(samples, "llama_router_swaps_total", model="a") == 1
    assert value(samples, "llama_router_swaps_total", model="b") == 0
    assert value(samples, "llama_router_wait_seconds_count", model="a") == 2
    assert value(samples, "llama_router_wait_seconds_count", model="b") == 1
    assert value(samples, "llama_router_wait_seconds_sum", model="b") > 0, "b waited for a swap and a load"
    # The fake counts words as tokens: "hi" then "one two three"; 3 chunks each time.
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (1, 3)
    prompt, completion = 1 + 3, 3 + 3
    assert value(samples, "llama_router_tokens_total", model="a", kind="prompt") == prompt
    assert value(samples, "llama_router_tokens_total", model="a", kind="completion") == completion
    assert value(samples, "llama_router_model_state", model="b", status="loaded") == 1
    assert value(samples, "llama_router_model_state", model="a", status="unloaded") == 1
    assert value(samples, "llama_router_upstream_processes") == 1
    assert value(samples, "llama_router_queue_depth") == 0
    assert value(samples, "llama_router_upstream_rss_bytes", model="b") > 1_000_000
    assert not [
        key for key in samples if key[0] == "llama_router_upstream_rss_bytes" and ("model", "a") in key[1]
    ]


async def test_queue_depth_and_loading_state_while_a_model_loads(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"slow": fake_profile(dummy_model, "--load-delay", "0.8")})
    tasks = [asyncio.create_task(router.chat("slow")) for _ in range(3)]
    deadline = time.monotonic() + 10
    while router.controller.queue_depth < 3:
        assert time.monotonic() < deadline, "the requests did not queue"
        await asyncio.sleep(0.01)
    samples = await scrape(router)
    assert value(samples, "llama_router_queue_depth") == 3
    assert value(samples, "llama_router_waiting_requests", model="slow") == 3
    assert value(samples, "llama_router_model_state", model="slow", status="loading") == 1
    assert all(status == 200 for status, _ in await asyncio.gather(*tasks))
    samples = await scrape(router)
    assert value(samples, "llama_router_queue_depth") == 0
    assert value(samples, "llama_router_wait_seconds_count", model="slow") == 3
    assert value(samples, "llama_router_wait_seconds_sum", model="slow") >= 3 * 0.7


async def test_failed_loads_crashes_and_mid_stream_failures_are_counted(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {
            "broken": fake_profile(dummy_model, "--crash-during-load"),
            "crashy": fake_profile(dummy_model, "--crash-mid-stream", "1"),
        },
        max_resident=2,
    )
    status, _ = await router.chat("broken")
    assert status == 503
    async with router.session.post(CHAT, json=chat_body("crashy", stream=True)) as response:
        assert response.status == 200
        await response.read()
    deadline = time.monotonic() + 10
    while "crashy" in router.controller.upstreams:
        assert time.monotonic() < deadline, "the crash was not noticed"
        await asyncio.sleep(0.01)
    samples = await scrape(router)
    starts = value(samples, "llama_router_loads_total", model="broken")
    assert starts >= 1
    assert value(samples, "llama_router_load_failures_total", model="broken") == starts, "every start failed"
    assert value(samples, "llama_router_requests_total", model="broken", status="503") == 1
    assert value(samples, "llama_router_errors_total", model="broken", code="model_load_failed") == 1
    assert value(samples, "llama_router_errors_total", model="crashy", code="upstream_failed") == 1
    assert value(samples, "llama_router_upstream_crashes_total", model="crashy") == 1
    assert value(samples, "llama_router_load_seconds_count", model="broken") == 0


async def test_two_routers_in_one_process_keep_separate_metrics(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    first = await start_router({"m": fake_profile(dummy_model)})
    second = await start_router({"m": fake_profile(dummy_model)})
    assert (await first.chat("m"))[0] == 200
    assert value(await scrape(first), "llama_router_requests_total", model="m", status="200") == 1
    assert value(await scrape(second), "llama_router_requests_total", model="m", status="200") == 0
