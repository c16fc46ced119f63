#!/usr/bin/env python3
"""The dashboard with hundreds of models: time to first paint, time until every model is on the page,
and the page's CPU while requests flow, in headless Chromium (its `Performance.getMetrics` over CDP).

Runs `llama-router serve` as its own process on `--profiles` profiles (tests/many_models.py: a few
tiny model files under many names, served by the fast fake upstream; `--loaded` of them are loaded),
opens `/ui/#<panel>` in a fresh headless Chromium page, then sends `--rate` chat requests a second
to the loaded models for `--seconds` and reads how much of that time the page's main thread was busy
(TaskDuration), and how much of it was script, style and layout. With `--baseline-tree` (another
checkout, e.g. `git archive main | tar -x -C /tmp/base`) the same is measured for that tree's page in
the same run, and the ratios are given. Medians over `--rounds`. Prints one JSON object.
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

from scripts.benchmarks.benchlib import ROOT, running_router
from tests.cdp import chromium
from tests.make_tiny_models import make_model
from tests.many_models import many_profiles

FAST_UPSTREAM = ROOT / "scripts" / "benchmarks" / "fast_upstream.py"
METRICS = ("TaskDuration", "ScriptDuration", "LayoutDuration", "RecalcStyleDuration")
COUNTS = ("LayoutCount", "RecalcStyleCount", "Nodes")


async def metrics(page: Any) -> dict[str, float]:
    answer = await page.send("Performance.getMetrics")
    return {entry["name"]: entry["value"] for entry in answer["metrics"]}


async def flow(
    session: aiohttp.ClientSession, url: str, models: list[str], rate: float, seconds: float
) -> int:
    """`rate` chat requests a second, spread over `models`, for `seconds`; how many were answered."""
    answered = 0

    async def one(model: str) -> None:
        nonlocal answered
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            await response.read()
            answered += response.status == 200

    tasks = []
    started = time.perf_counter()
    for index in range(int(rate * seconds)):
        delay = started + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(models[index % len(models)])))
    await asyncio.gather(*tasks)
    return answered


async def one_round(
    browser: Any, session: aiohttp.ClientSession, url: str, args: argparse.Namespace, loaded: list[str]
) -> dict[str, Any]:
    page = await browser.new_page()
    await page.send("Performance.enable", timeMode="threadTicks")
    await page.send("Page.bringToFront")  # a tab in the background may not record its paints
    navigated = time.perf_counter()
    await page.goto(f"{url}/ui/#{args.panel}", timeout=60)
    # Every model on the page, as a card or a table row (whichever the page draws).
    everyone = (
        "new Set([...document.querySelectorAll('#panel-models [data-model]')].map(e => e.dataset.model)).size"
        f" >= {args.profiles}"
    )
    await page.wait_for(everyone, 60, what="every model on the page")
    drawn = time.perf_counter() - navigated
    paint = await page.evaluate(
        """new Promise(resolve => {
            new PerformanceObserver(list => resolve(list.getEntries()
                .find(e => e.name === 'first-contentful-paint')?.startTime ?? null))
                .observe({type: 'paint', buffered: true});
            setTimeout(() => resolve(null), 3000);
        })"""
    )
    await asyncio.sleep(1.0)  # the first overview's work is done
    before = await metrics(page)
    wall = time.perf_counter()
    answered = await flow(session, url, loaded, args.rate, args.seconds)
    await asyncio.sleep(1.0)  # the last `requests` events reach the page
    elapsed = time.perf_counter() - wall
    after = await metrics(page)
    await page.close()
    browser.pages.remove(page)
    figures: dict[str, Any] = {
        "first_contentful_paint_ms": round(paint, 1) if paint is not None else None,
        "all_models_drawn_ms": round(drawn * 1000, 1),
        "answered": answered,
        "page_cpu_percent": round(100 * (after["TaskDuration"] - before["TaskDuration"]) / elapsed, 2),
    }
    for name in METRICS[1:]:
        figures[f"{name}_ms"] = round(1000 * (after[name] - before[name]), 1)
    for name in COUNTS:
        figures[name] = int(after[name] - (before[name] if name != "Nodes" else 0))
    return figures


async def measure_tree(
    tree: Path, args: argparse.Namespace, workdir: Path, files: list[Path]
) -> dict[str, Any]:
    command = {"binary": sys.executable, "args": [str(FAST_UPSTREAM)]}
    profiles = many_profiles(files, args.profiles, command)
    loaded = list(profiles)[: args.loaded]
    timeout = aiohttp.ClientTimeout(total=60)
    rounds = []
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        running_router(session, workdir, profiles, tree=tree, memory={"ram": 1_000_000}) as router,
    ):
        for name in loaded:
            async with session.post(router.url + "/models/load?wait=1", json={"model": name}) as answer:
                if answer.status != 200:
                    raise RuntimeError(f"loading {name}: {answer.status} {await answer.text()}")
        async with chromium() as browser:
            for _ in range(args.rounds):
                rounds.append(await one_round(browser, session, router.url, args, loaded))
    medians = {
        name: statistics.median(r[name] for r in rounds)
        for name in rounds[0]
        if all(r[name] is not None for r in rounds)
    }
    return {"tree": str(tree), "median": medians, "rounds": rounds}


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profiles", type=int, default=300)
    parser.add_argument("--loaded", type=int, default=3, help="profiles loaded (the requests go to them)")
    parser.add_argument("--rate", type=float, default=50.0, help="chat requests a second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--panel", default="models", help="the panel on screen (models, activity, ...)")
    parser.add_argument("--tree", type=Path, default=ROOT)
    parser.add_argument("--baseline-tree", type=Path, help="another checkout, measured the same way")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as folder:
        workdir = Path(folder)
        files = [make_model(workdir / "tiny-a.gguf", seed=1), make_model(workdir / "tiny-b.gguf", seed=2)]
        result: dict[str, Any] = {
            "benchmark": "dashboard",
            "profiles": args.profiles,
            "loaded": args.loaded,
            "rate_per_s": args.rate,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "panel": args.panel,
            "python": platform.python_version(),
        }
        if args.baseline_tree is not None:
            result["baseline"] = await measure_tree(args.baseline_tree.resolve(), args, workdir, files)
        result["this_tree"] = await measure_tree(args.tree.resolve(), args, workdir, files)
        if args.baseline_tree is not None:
            base, this = result["baseline"]["median"], result["this_tree"]["median"]
            result["ratio_this_to_baseline"] = {
                name: round(this[name] / base[name], 3)
                for name in this
                if name in base and base[name] and name != "answered"
            }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
