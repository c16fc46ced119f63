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

Three more hold the idle grace to its promise (no idle model keeps another waiting past its swap),
each with `max_resident: 1`, a few rounds, every round's worst wait reported:
- sequence_then_burst: requests for a, b, a one after the other (b's is a swap on its own), then 20
  for b at once while a sits idle: the slowest of the 20 beside the lone swap;
- idle_burst: a request brings a back (loaded, then idle), then 10 for a and 10 for b at once: the
  slowest a and the slowest b;
- eager_burst: the interleaved burst of `burst` with `swap_delay: 0`: the slowest of each model.
`--tree PATH` runs another checkout's router (an older commit's) on the same models, to compare.
Prints one JSON object. Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.benchmarks.benchlib import ROOT, chat, latency_summary, ms, router_process
from tests.make_tiny_models import make_model

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
    session: aiohttp.ClientSession,
    workdir: Path,
    models: list[Path],
    seconds: float,
    tree: Path,
    **server: Any,
) -> dict[str, Any]:
    async with router_process(session, workdir, profiles_of(models), tree, **server) as url:
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


def wide_profiles(models: list[Path], size: int) -> dict[str, Any]:
    """The profiles, with enough HTTP threads for a burst of `size` per model: llama-server serves
    each connection on one of its `--threads-http` threads (one per core by default) and keeps it a
    while after its answer, and a burst wider than that would wait seconds for a free thread, which
    would hide what the router does."""
    profiles = profiles_of(models)
    for profile in profiles.values():
        profile["args"] = [*ARGS, "--threads-http", str(2 * size)]
    return profiles


async def burst(
    session: aiohttp.ClientSession, workdir: Path, models: list[Path], rounds: int, tree: Path, size: int = 10
) -> dict[str, Any]:
    """Each round sends `size` requests for the loaded model and `size` for the other, interleaved, all
    at once, and waits for every answer; the other model is the loaded one in the next round."""
    loaded_latency: list[float] = []
    other_latency: list[float] = []
    round_seconds: list[float] = []
    async with router_process(session, workdir, wide_profiles(models, size), tree, max_resident=1) as url:
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


@contextlib.asynccontextmanager
async def clients_per_model() -> AsyncIterator[dict[str, aiohttp.ClientSession]]:
    """A client (its own connections) for each model: the clients of one model are not those of the
    other, as with two applications on two models (one connection moving from a model to the other
    is a client switching, which the router serves differently)."""
    timeout = aiohttp.ClientTimeout(total=120)
    async with (
        aiohttp.ClientSession(timeout=timeout) as for_a,
        aiohttp.ClientSession(timeout=timeout) as for_b,
    ):
        yield {"a": for_a, "b": for_b}


async def at_once(clients: dict[str, aiohttp.ClientSession], url: str, models: list[str]) -> list[float]:
    """One request per entry of `models`, each from its model's client, all sent at once: each
    one's time to its answer."""
    return list(await asyncio.gather(*(timed(clients[model], url, model) for model in models)))


def worst(values: list[float]) -> float:
    return ms(max(values))


async def sequence_then_burst(
    session: aiohttp.ClientSession, workdir: Path, models: list[Path], rounds: int, tree: Path, size: int = 20
) -> dict[str, Any]:
    """Each round: a, b, a one after the other, then `size` requests for b at once while a is idle."""
    swap: list[float] = []
    slowest_b: list[float] = []
    async with (
        router_process(session, workdir, wide_profiles(models, size), tree, max_resident=1) as url,
        clients_per_model() as clients,
    ):
        for _ in range(rounds):
            await timed(clients["a"], url, "a")
            swap.append(ms(await timed(clients["b"], url, "b")))
            await timed(clients["a"], url, "a")
            slowest_b.append(worst(await at_once(clients, url, ["b"] * size)))
    return {"rounds": rounds, "lone_swap_ms": swap, "slowest_b_ms": slowest_b}


async def idle_burst(
    session: aiohttp.ClientSession, workdir: Path, models: list[Path], rounds: int, tree: Path, size: int = 10
) -> dict[str, Any]:
    """Each round: a request brings a back and leaves it idle; then `size` for a and `size` for b at
    once (interleaved)."""
    slowest_a: list[float] = []
    slowest_b: list[float] = []
    async with (
        router_process(session, workdir, wide_profiles(models, size), tree, max_resident=1) as url,
        clients_per_model() as clients,
    ):
        for _ in range(rounds):
            await timed(clients["a"], url, "a")
            latencies = await at_once(clients, url, ["a", "b"] * size)
            slowest_a.append(worst(latencies[0::2]))
            slowest_b.append(worst(latencies[1::2]))
    return {"rounds": rounds, "slowest_a_ms": slowest_a, "slowest_b_ms": slowest_b}


async def eager_burst(
    session: aiohttp.ClientSession, workdir: Path, models: list[Path], rounds: int, tree: Path, size: int = 10
) -> dict[str, Any]:
    """Each round, with `swap_delay: 0`: a request brings a back; then `size` for a and `size` for b
    at once, interleaved."""
    slowest_a: list[float] = []
    slowest_b: list[float] = []
    profiles = wide_profiles(models, size)
    async with (
        router_process(session, workdir, profiles, tree, max_resident=1, swap_delay=0) as url,
        clients_per_model() as clients,
    ):
        for _ in range(rounds):
            await timed(clients["a"], url, "a")
            latencies = await at_once(clients, url, ["a", "b"] * size)
            slowest_a.append(worst(latencies[0::2]))
            slowest_b.append(worst(latencies[1::2]))
    return {"rounds": rounds, "slowest_a_ms": slowest_a, "slowest_b_ms": slowest_b}


SCENARIOS = (
    "one_at_a_time",
    "budget_for_one",
    "budget_for_both",
    "burst",
    "sequence_then_burst",
    "idle_burst",
    "eager_burst",
)


async def run(seconds: float, rounds: int, only: list[str], tree: Path) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-thrash-"))
    models = [make_model(workdir / "a.gguf", seed=1), make_model(workdir / "b.gguf", seed=2)]
    results: dict[str, Any] = {"seconds": seconds, "tree": str(tree)}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        if "one_at_a_time" in only:
            results["one_at_a_time"] = await scenario(
                session, workdir, models, seconds, tree, max_resident=1, swap_delay=0
            )
        if "budget_for_one" in only:
            results["budget_for_one"] = await scenario(
                session, workdir, models, seconds, tree, memory={"ram": SIZE_MIB + SIZE_MIB // 2}
            )
        if "budget_for_both" in only:
            results["budget_for_both"] = await scenario(
                session, workdir, models, seconds, tree, memory={"ram": 3 * SIZE_MIB}
            )
        rounds_of = {
            "burst": burst,
            "sequence_then_burst": sequence_then_burst,
            "idle_burst": idle_burst,
            "eager_burst": eager_burst,
        }
        for name, measure in rounds_of.items():
            if name in only:
                results[name] = await measure(session, workdir, models, rounds, tree)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each closed-loop scenario")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the burst scenarios")
    parser.add_argument(
        "--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS), help="scenarios to run"
    )
    parser.add_argument(
        "--tree", type=Path, default=ROOT, help="the checkout whose router runs (default: this)"
    )
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.seconds, args.rounds, args.only, args.tree.resolve())), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
