#!/usr/bin/env python3
"""`GET /v1/models` latency while a model is loading: Open WebUI re-lists on every page load, so the
list must come from memory, not wait behind a load.

Runs `llama-router serve` as its own process on a config of tiny generated models served by the fake
upstream (tests/fake_upstream.py), one of which takes minutes to "load". Measures N sequential calls on
one keep-alive connection with nothing loading (the baseline), then N while that model loads, and
checks it was still loading at the end. Prints one JSON object. Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.benchmarks.benchlib import ROOT, latency_summary, ms, percentile, router_process
from tests.make_tiny_models import make_model

FAKE_UPSTREAM = ROOT / "tests" / "fake_upstream.py"
LOAD_DELAY = 300.0  # seconds the slow model takes to load: far longer than the measurement


async def list_models(session: aiohttp.ClientSession, url: str) -> dict[str, str]:
    async with session.get(url + "/v1/models") as response:
        body = await response.json()
        return {entry["id"]: entry["status"]["value"] for entry in body["data"]}


async def measure(session: aiohttp.ClientSession, url: str, calls: int) -> list[float]:
    timings = []
    for _ in range(calls):
        started = time.perf_counter()
        async with session.get(url + "/v1/models") as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"/v1/models answered {response.status}")
        timings.append(time.perf_counter() - started)
    return timings


def summary(timings: list[float]) -> dict[str, float]:
    return {
        **latency_summary(timings),
        "mean_ms": ms(statistics.fmean(timings)),
        "p99_ms": ms(percentile(timings, 99)),
        "min_ms": ms(min(timings)),
    }


async def run(calls: int, profiles: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="llama-router-bench-") as folder:
        workdir = Path(folder)
        model = make_model(workdir / "tiny.gguf")
        fake = {"model": str(model), "binary": sys.executable, "args": [str(FAKE_UPSTREAM)]}
        config: dict[str, Any] = {
            "slow": {**fake, "args": [str(FAKE_UPSTREAM), "--load-delay", str(LOAD_DELAY)]},
            **{f"model-{index}": fake for index in range(profiles - 1)},
        }
        async with (
            aiohttp.ClientSession() as session,
            router_process(session, workdir, config, load_timeout=LOAD_DELAY * 2) as url,
        ):
            await measure(session, url, 50)  # warm-up: connection, first-call costs
            idle = await measure(session, url, calls)
            async with session.post(url + "/models/load", json={"model": "slow"}) as response:
                if response.status != 200:
                    raise RuntimeError(f"/models/load answered {response.status}: {await response.text()}")
            before = (await list_models(session, url))["slow"]
            loading = await measure(session, url, calls)
            after = (await list_models(session, url))["slow"]
            if (before, after) != ("loading", "loading"):
                raise RuntimeError(f"the model was not loading throughout: {before} -> {after}")
    return {
        "benchmark": "GET /v1/models latency (sequential, one keep-alive connection)",
        "calls": calls,
        "profiles": profiles,
        "while_loading": summary(loading),
        "nothing_loading": summary(idle),
        "status_during_measurement": after,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=1000, help="calls per measurement (default 1000)")
    parser.add_argument("--profiles", type=int, default=8, help="profiles in the config (default 8)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.calls, max(1, args.profiles))), indent=2))


if __name__ == "__main__":
    main()
