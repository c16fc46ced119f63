#!/usr/bin/env python3
"""Two closed-loop clients, one per model, for a fixed time: how many swaps, how fast each answer.

Scenarios, each on the real llama-server with two generated tiny models:
- one_at_a_time: the core behaviour (one model resident, swap as soon as another model waits);
- budget_for_one: a memory budget that holds one model, with the default `swap_delay` batching;
- budget_for_both: a memory budget that holds both.
Prints one JSON object. Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.benchlib import chat, latency_summary, router_process
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


async def scenario(
    session: aiohttp.ClientSession, workdir: Path, models: list[Path], seconds: float, **server: Any
) -> dict[str, Any]:
    profiles = {
        name: {"model": str(path), "args": ARGS, "footprint": {"ram": SIZE_MIB}}
        for name, path in zip(("a", "b"), models, strict=True)
    }
    async with router_process(session, workdir, profiles, **server) as url:
        until = time.perf_counter() + seconds
        a, b = await asyncio.gather(client(session, url, "a", until), client(session, url, "b", until))
        async with session.get(url + "/metrics") as response:
            metrics = await response.text() if response.status == 200 else ""
    loads = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("llama_router_loads_total{")
    )
    return {
        "loads": int(loads),
        "swaps": max(0, int(loads) - 2),
        "requests": {"a": len(a), "b": len(b), "total": len(a) + len(b)},
        "latency": latency_summary(a + b),
        "latency_a": latency_summary(a),
        "latency_b": latency_summary(b),
    }


async def run(seconds: float) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-thrash-"))
    models = [make_model(workdir / "a.gguf", seed=1), make_model(workdir / "b.gguf", seed=2)]
    results: dict[str, Any] = {"seconds": seconds}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        results["one_at_a_time"] = await scenario(
            session, workdir, models, seconds, max_resident=1, swap_delay=0
        )
        results["budget_for_one"] = await scenario(
            session, workdir, models, seconds, memory={"ram": SIZE_MIB + SIZE_MIB // 2}
        )
        results["budget_for_both"] = await scenario(
            session, workdir, models, seconds, memory={"ram": 3 * SIZE_MIB}
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each scenario")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.seconds)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
