#!/usr/bin/env python3
"""Hermes Agent's requests per start against the router with API keys: how many, how many errors,
and whether reading metadata loaded a model. The requests are Hermes' own, in its order
(tests/hermes_replay.py, read from its `agent/model_metadata.py`).

Runs `llama-router serve` from this checkout and, with `--baseline TREE`, from another tree (an
older commit's worktree) on the same config: two tiny models served by the fake upstream, `api_keys`
set. Starts replayed: a first start (no saved context), 0.19's (detection rounds without the key
first, as it sent them), and a later start (a saved context: `/props?model=<id>` first). Prints one
JSON object. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.benchmarks.benchlib import ROOT, router_process
from tests.hermes_replay import Replay
from tests.make_tiny_models import make_model

FAKE_UPSTREAM = ROOT / "tests" / "fake_upstream.py"
KEY = "hermes-key"
STARTS = {
    "first start (0.21)": {},
    "first start (0.19: keyless detection first)": {"keyless_rounds": 2},
    "later start (0.21: saved context, /props?model= first)": {"cached": 65536},
}


async def measure(tree: Path, workdir: Path, model: Path) -> dict[str, Any]:
    fake = {"model": str(model), "binary": sys.executable, "args": [str(FAKE_UPSTREAM)]}
    profiles = {
        "agent": {**fake, "args": [*fake["args"], "--ctx-size", "65536"]},
        "small": {**fake, "args": [*fake["args"], "--ctx-size", "8192"]},
    }
    results: dict[str, Any] = {}
    async with aiohttp.ClientSession() as plain:
        for name, options in STARTS.items():
            async with router_process(plain, workdir, profiles, tree=tree, api_keys=[KEY]) as url:
                async with aiohttp.ClientSession(base_url=url) as session:
                    replay = Replay(session, KEY)
                    context = await replay.start("agent", **options)
                    async with session.get(
                        "/running", headers={"Authorization": f"Bearer {KEY}"}
                    ) as response:
                        running = [row["model"] for row in (await response.json())["running"]]
                results[name] = {
                    "requests": len(replay.calls),
                    "errors": replay.errors,
                    "unauthorized": sum(call.status == 401 for call in replay.calls),
                    "context_length": context,
                    "server_type": replay.server_type,
                    "loaded_by_probing": running,
                    "calls": [
                        f"{c.method} {c.path} {'key' if c.keyed else 'no key'} -> {c.status}"
                        for c in replay.calls
                    ],
                }
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another tree to measure the same way (before)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        model = make_model(workdir / "tiny.gguf", seed=1, n_ctx_train=131072)
        report: dict[str, Any] = {"tree": await measure(ROOT, workdir, model)}
        if args.baseline is not None:
            report["baseline"] = await measure(args.baseline.resolve(), workdir, model)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
