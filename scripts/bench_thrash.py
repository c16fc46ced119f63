#!/usr/bin/env python3
"""Two models that do not fit together, under two shapes of demand: how many swaps, how long each waits.

Scenarios, each on the real llama-server with two generated tiny models:
- one_at_a_time: two closed-loop clients, one per model, one model resident, swap as soon as another
  model waits (`swap_delay: 0`);
- budget_for_one: the same clients under a memory budget that holds one model, with the default
  `swap_delay` batching;
- budget_for_both: the same clients under a memory budget that holds both;
- burst: rounds of 10 requests for the loaded model and 10 for the other, sent at once and
  interleaved (`max_resident: 1`, the default `swap_delay`): how long the loaded model's requests
  take, and how long the other model's wait beside them.
Prints one JSON object. Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.benchlib import chat, latency_summary, ms, router_process
from scripts.make_tiny_models import make_model

ARGS = ["--ctx-size", "512", "--parallel", "1", "--threads", "1"]
SIZE_MIB = 100  # each model's declared footprint, so budgets are exact


async def client(session: aiohttp.ClientSession, url: str, model: str, until: float) -> list[float]:
    latencies = []
    while time.perf_counter() < until:
        started = time.perf_counter()
        await chat(session, url, model, max_tokens=8)
        latencies.append(time.perf_counter() - started)
    return latencies


def profiles_of(models: list[Path]) -> dict[str, Any]:
    return {
        name: {"model": str(path), "args": ARGS, "footprint": {"ram": SIZE_MIB}}
        for name, path in zip(("a", "b"), models, strict=True)
    }


async def scenario(
    session: aiohttp.ClientSession, workdir: Path, models: list[Path], seconds: float, **server: Any
) -> dict[str, Any]:
    async with router_process(session, workdir, profiles_of(models), **server) as url:
        until = time.perf_counter() + seconds
        a, b = await asyncio.gather(client(session, url, "a", until), client(session, url, "b", until))
        async with session.get(url + "/metrics") as response:
            metrics = await response.text() if response.status == 200 else ""
    loads = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("llama_router_loads_total{")
    )
    swaps = max(0, int(loads) - 2)
    return {
        "loads": int(loads),
        "swaps": swaps,
        "requests_per_swap": round((len(a) + len(b)) / swaps, 1) if swaps else None,
        "requests": {"a": len(a), "b": len(b), "total": len(a) + len(b)},
        "latency": latency_summary(a + b),
        "latency_a": latency_summary(a),
        "latency_b": latency_summary(b),
    }


async def timed(session: aiohttp.ClientSession, url: str, model: str) -> float:
    started = time.perf_counter()
    await chat(session, url, model, max_tokens=8)
    return time.perf_counter() - started


async def burst(
    session: aiohttp.ClientSession, workdir: Path, models: list[Path], rounds: int, size: int = 10
) -> dict[str, Any]:
    """Each round sends `size` requests for the loaded model and `size` for the other, interleaved, all
    at once, and waits for every answer; the other model is the loaded one in the next round."""
    loaded_latency: list[float] = []
    other_latency: list[float] = []
    round_seconds: list[float] = []
    # llama-server serves each connection on one of its `--threads-http` threads (one per core by
    # default) and keeps it for a while after its answer; a burst wider than that waits seconds for
    # a free thread, which would hide what the router does. Enough threads for the whole burst:
    profiles = profiles_of(models)
    for profile in profiles.values():
        profile["args"] = [*ARGS, "--threads-http", str(2 * size)]
    async with router_process(session, workdir, profiles, max_resident=1) as url:
        await chat(session, url, "a", max_tokens=8)
        loaded, other = "a", "b"
        for _ in range(rounds):
            started = time.perf_counter()
            tasks = []
            for _ in range(size):
                tasks.append(asyncio.ensure_future(timed(session, url, loaded)))
                tasks.append(asyncio.ensure_future(timed(session, url, other)))
            latencies = await asyncio.gather(*tasks)
            round_seconds.append(time.perf_counter() - started)
            loaded_latency.extend(latencies[0::2])
            other_latency.extend(latencies[1::2])
            loaded, other = other, loaded
    return {
        "rounds": rounds,
        "round_median_ms": ms(statistics.median(round_seconds)),
        "latency_loaded": latency_summary(loaded_latency),
        "latency_other": latency_summary(other_latency),
    }


SCENARIOS = ("one_at_a_time", "budget_for_one", "budget_for_both", "burst")


async def run(seconds: float, rounds: int, only: list[str]) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-thrash-"))
    models = [make_model(workdir / "a.gguf", seed=1), make_model(workdir / "b.gguf", seed=2)]
    results: dict[str, Any] = {"seconds": seconds}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        if "one_at_a_time" in only:
            results["one_at_a_time"] = await scenario(
                session, workdir, models, seconds, max_resident=1, swap_delay=0
            )
        if "budget_for_one" in only:
            results["budget_for_one"] = await scenario(
                session, workdir, models, seconds, memory={"ram": SIZE_MIB + SIZE_MIB // 2}
            )
        if "budget_for_both" in only:
            results["budget_for_both"] = await scenario(
                session, workdir, models, seconds, memory={"ram": 3 * SIZE_MIB}
            )
        if "burst" in only:
            results["burst"] = await burst(session, workdir, models, rounds)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each closed-loop scenario")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the burst scenario")
    parser.add_argument(
        "--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS), help="scenarios to run"
    )
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.seconds, args.rounds, args.only)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
