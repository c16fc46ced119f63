#!/usr/bin/env python3
"""Measure what `keep_context` buys a conversation that comes back after its model was swapped out.

Each round, on a generated model big enough that prompt processing takes visible time: a first turn
with a long, new prompt on `big`; a request to `small` (with `max_resident: 1` this swaps `big` out);
then the second turn of the same conversation on `big`, streamed, timing its first token. The second
turn pays for reloading `big` either way; with `keep_context` its history comes from the restored slot
instead of being processed again. Rounds alternate between a router with and one without
`keep_context`, so both see the same machine state. Save and restore figures come from the router's
`/events`. Prints one JSON object. Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.benchmarks.benchlib import ms, router_process  # noqa: E402
from tests.make_tiny_models import make_model  # noqa: E402


def prompt(round_no: int, words: int) -> str:
    """A new conversation each round (its own first words), ~15 tokens a word group."""
    return f"conversation {round_no}: " + " ".join(f"word{i % 37} lorem ipsum" for i in range(words))


async def collect_events(session: aiohttp.ClientSession, url: str, into: list[dict[str, Any]]) -> None:
    """Append the router's `/events` (SSE) to `into` until cancelled."""
    async with session.get(url + "/events", timeout=aiohttp.ClientTimeout(total=None)) as response:
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                into.append(json.loads(line[len("data: ") :]))


async def turn(
    session: aiohttp.ClientSession, url: str, model: str, messages: list[dict[str, Any]]
) -> dict[str, Any]:
    """One streamed chat turn: seconds to the first content token, the reply and llama-server's timings."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first: float | None = None
    text, timings = "", dict[str, Any]()
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{model}: {response.status} {(await response.read())[:300]!r}")
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first if first is not None else time.perf_counter() - started
                    text += piece
            timings = chunk.get("timings") or timings
    if first is None:
        first = time.perf_counter() - started
    return {"ttft": first, "reply": text, "timings": timings}


async def one_round(
    session: aiohttp.ClientSession, url: str, round_no: int, words: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    messages = [{"role": "user", "content": prompt(round_no, words)}]
    first = await turn(session, url, "big", messages)
    await turn(session, url, "small", [{"role": "user", "content": "hi"}])  # swaps big out
    messages += [{"role": "assistant", "content": first["reply"]}, {"role": "user", "content": "go on"}]
    return first, await turn(session, url, "big", messages)


def summary(values: list[float]) -> dict[str, float]:
    return {"median_ms": ms(statistics.median(values)), "min_ms": ms(min(values)), "max_ms": ms(max(values))}


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    big = make_model(workdir / "big.gguf", n_embd=args.n_embd, n_layer=args.n_layer, seed=3)
    small = make_model(workdir / "small.gguf", seed=4)
    common = {"args": ["--ctx-size", str(args.ctx_size), "--parallel", "2", "--threads", str(args.threads)]}
    if args.binary:
        common["binary"] = args.binary
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": {"n_embd": args.n_embd, "n_layer": args.n_layer, "mb": round(big.stat().st_size / 1e6, 1)},
        "rounds": args.rounds,
    }
    timeout = aiohttp.ClientTimeout(total=300)
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
        routers: dict[str, tuple[str, list[dict[str, Any]]]] = {}
        for variant, keep in (("keep_context", True), ("without", False)):
            profiles = {
                "big": {"model": str(big), "keep_context": keep, **common},
                "small": {"model": str(small), **common},
            }
            folder = workdir / variant
            folder.mkdir()
            url = await stack.enter_async_context(router_process(session, folder, profiles, max_resident=1))
            events: list[dict[str, Any]] = []
            task = asyncio.create_task(collect_events(session, url, events))
            stack.callback(task.cancel)
            routers[variant] = (url, events)
        rows: dict[str, dict[str, list[float]]] = {variant: {} for variant in routers}
        for round_no in range(args.rounds):
            for variant, (url, _events) in routers.items():
                first, second = await one_round(session, url, round_no, args.words)
                row = rows[variant]
                row.setdefault("ttft", []).append(second["ttft"])
                row.setdefault("first_turn_ttft", []).append(first["ttft"])
                row.setdefault("prompt_ms", []).append(second["timings"].get("prompt_ms", 0.0) / 1000)
                row.setdefault("cache_n", []).append(second["timings"].get("cache_n", 0))
                row.setdefault("prompt_n", []).append(second["timings"].get("prompt_n", 0))
        for variant, (_url, events) in routers.items():
            row = rows[variant]
            out: dict[str, Any] = {
                "second_turn_ttft": summary(row["ttft"]),
                "second_turn_prompt_eval": summary(row["prompt_ms"]),
                "second_turn_cached_tokens": row["cache_n"],
                "second_turn_processed_tokens": row["prompt_n"],
                "first_turn_ttft": summary(row["first_turn_ttft"]),
            }
            for kind in ("context_saved", "context_restored"):
                found = [event for event in events if event["event"] == kind and event["model"] == "big"]
                if found:
                    out[kind] = {
                        "count": len(found),
                        "median_ms": statistics.median(event["ms"] for event in found),
                        "max_ms": max(event["ms"] for event in found),
                        "median_bytes": statistics.median(event["bytes"] for event in found),
                        "slots": [event["slots"] for event in found],
                    }
            failures = [event for event in events if event["event"].endswith("_failed")]
            out["failures"] = len(failures)
            results[variant] = out
    keep, without = (results[v]["second_turn_ttft"]["median_ms"] for v in ("keep_context", "without"))
    results["ttft_saved_ms"] = round(without - keep, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--words", type=int, default=100, help="word groups in the first turn (~15 tokens)")
    parser.add_argument("--n-embd", type=int, default=512)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--ctx-size", type=int, default=8192, help="split between 2 slots")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--binary", help="llama-server to run (default: found as the router finds it)")
    with tempfile.TemporaryDirectory(prefix="bench-context-") as workdir:
        results = asyncio.run(run(parser.parse_args(), Path(workdir)))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
