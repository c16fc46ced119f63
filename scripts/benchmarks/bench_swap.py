#!/usr/bin/env python3
"""Measure what the router adds on top of llama-server: on a cold start, a swap, and a loaded model.

All figures come from one run on this machine, each beside its own baseline:
- cold: request for a model nothing has loaded -> answer, through the router, against the same
  llama-server spawned by hand and polled until healthy (spawn -> healthy, and spawn -> answer);
- swap: the same with the other model loaded (so the router must stop it first);
- loaded: latency of a small chat request to a loaded model, through the router versus direct,
  concurrency 1, interleaved so both see the same machine state.
Prints one JSON object. Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
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
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from llama_router.config.schema import load_config  # noqa: E402
from scripts.benchmarks.benchlib import chat, ms, percentile, router_process, swap_figures  # noqa: E402
from tests.make_tiny_models import make_model  # noqa: E402

ARGS = ["--ctx-size", "512", "--parallel", "1", "--threads", "1"]


async def _swap_figures(workdir: Path, profiles: dict[str, Any], rounds: int) -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        return await swap_figures(session, workdir, profiles, rounds, workdir / "router.log", "WARNING")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    models = [make_model(workdir / "a.gguf", seed=1), make_model(workdir / "b.gguf", seed=2)]
    profiles = {
        "a": {"model": str(models[0]), "args": ARGS},
        "b": {"model": str(models[1]), "args": ARGS},
    }
    if args.binary:
        for profile in profiles.values():
            profile["binary"] = args.binary
    config_path = workdir / "profiles.yaml"
    config_path.write_text(yaml.safe_dump({"profiles": profiles}))
    config = load_config(config_path)
    figures = await _swap_figures(workdir, profiles, args.rounds)
    results: dict[str, Any] = {"cold_start": figures["cold_start"], "swap": figures["swap"]}
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session,
        router_process(session, workdir, profiles, max_resident=1) as router_url,
    ):
        # loaded: interleaved direct/router requests to the same running upstream
        await chat(session, router_url, "a")
        async with session.get(router_url + "/running") as response:
            upstream_port = (await response.json())["running"][0]["port"]
        direct_url = f"http://127.0.0.1:{upstream_port}"
        for _ in range(20):  # warm both paths' connections
            await chat(session, direct_url, "a")
            await chat(session, router_url, "a")
        direct, routed = [], []
        for _ in range(args.requests):
            started = time.perf_counter()
            await chat(session, direct_url, "a")
            direct.append(time.perf_counter() - started)
            started = time.perf_counter()
            await chat(session, router_url, "a")
            routed.append(time.perf_counter() - started)
        results["loaded_request"] = {
            "requests": args.requests,
            "direct_median_ms": ms(statistics.median(direct)),
            "router_median_ms": ms(statistics.median(routed)),
            "added_median_ms": ms(statistics.median(routed) - statistics.median(direct)),
            "direct_p99_ms": ms(percentile(direct, 99)),
            "router_p99_ms": ms(percentile(routed, 99)),
        }
    results["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "binary": str(config.profiles["a"].binary),
    }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=15, help="cold starts and swaps to time")
    parser.add_argument("--requests", type=int, default=300, help="requests per path for the loaded figure")
    parser.add_argument("--binary", help="llama-server to use (default: found as the router finds it)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
