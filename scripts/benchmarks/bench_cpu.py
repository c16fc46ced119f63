#!/usr/bin/env python3
"""The router's own CPU per request, and the latency it adds, for one or more trees side by side.

Each tree's router is started by its own command line (`python -m llama_router serve` in that tree, its
package on PYTHONPATH) in front of its own scripts/benchmarks/fast_upstream.py (this tree's copy for all, so
only the router differs), at the log level given (INFO: every request's access line is written, to
a file). Then, in alternating rounds (the order turns each round, so a noisy neighbour on the
machine hits every tree alike):

- cpu: concurrency-32 closed-loop load on one router for `--seconds`; the router process's CPU time
  (utime + stime from /proc/<pid>/stat) over the round divided by the requests it served: µs per
  request, and requests/s; also its event-loop thread's alone (the rest is its helper threads');
- c1: concurrency-1 load on the direct upstream and each router (scripts/benchmarks/loadgen.py alternates
  them): the median latency the router adds.

The same rounds measure a reference (unless `--no-floor`): scripts/benchmarks/aiohttp_floor.py, aiohttp's
server and the router's upstream pool relaying to the first tree's upstream with nothing else, as
`aiohttp_floor`: what a router built on these parts cannot go below. What a tree costs above it is
the tree's own per-request work.

With `--idle-profiles N`, each router's config has N more profiles that are never asked for: what a
request costs should not grow with the number of models a router knows.

With `--pin`, the measured processes run on the last CPU and everything else on the others, which
steadies the figures where the machine has few cores.

Prints one JSON object: per tree the median, min and max over the rounds, and every round's figure.
Linux only (it reads /proc). Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.benchmarks.bench import SMALL_CHAT, fast_profiles, port_of, run_loadgen, upstream_of  # noqa: E402
from scripts.benchmarks.benchlib import chat, running_router  # noqa: E402
from scripts.benchmarks.reference_proxies import aiohttp_floor_in_front  # noqa: E402

FLOOR = "aiohttp_floor"
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int, task: int | None = None) -> float:
    """utime + stime of process `pid` so far (or of its thread `task`), in seconds."""
    where = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
    fields = Path(where).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14 and 15 of stat(5)


def main_thread_seconds(pid: int) -> float:
    """The CPU time of the router's event-loop thread (the process's first): the rest of the
    process's is its helper threads' (the activity log's SQLite writes, file reads)."""
    return cpu_seconds(pid, pid)


@contextlib.asynccontextmanager
async def tree_router(
    session: aiohttp.ClientSession, tree: Path, workdir: Path, log_level: str, idle_profiles: int = 0
) -> AsyncIterator[tuple[str, int]]:
    """The router of `tree`, started by its own command line, its log to a file; yields (url, pid).
    `idle_profiles` more profiles are configured beside `a` and `b` and never asked for (a router
    with many models: the work per request should not grow with their number)."""
    state = workdir / f"state-{len(list(workdir.glob('state-*')))}"
    profiles = fast_profiles(workdir)
    for index in range(1, idle_profiles + 1):
        profiles[f"idle-{index}"] = dict(profiles["b"])
    async with running_router(
        session,
        workdir,
        profiles,
        log_level=log_level,
        log_file=state.with_suffix(".log"),
        tree=tree,
        state_dir=str(state),
        max_resident=1,
    ) as router:
        yield router.url, router.process.pid


def pin_apart(measured: list[int]) -> None:
    """The measured processes (every thread) on the last CPU; this process, the load generators it
    starts and the upstreams on the others. Sharing a core with the client and the upstream, a
    router's CPU per request varies by a third from round to round with what runs beside it."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return
    own, rest = {cpus[-1]}, set(cpus[:-1])
    os.sched_setaffinity(0, rest)
    for pid in measured:
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.cpu_affinity(sorted(rest))
        for task in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(task), own)


def spread(values: list[float]) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "by_round": [round(value, 3) for value in values],
    }


async def run(trees: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    async with aiohttp.ClientSession() as session, contextlib.AsyncExitStack() as stack:
        # What is measured: each tree's router and, where asked, the aiohttp floor; (port, pid) each.
        measured: dict[str, tuple[int, int]] = {}
        for name, tree in trees.items():
            url, pid = await stack.enter_async_context(
                tree_router(session, tree, workdir, args.log_level, args.idle_profiles)
            )
            await chat(session, url, "a")
            measured[name] = (port_of(url), pid)
        first = next(iter(trees))
        direct_port, _ = await upstream_of(session, f"http://127.0.0.1:{measured[first][0]}", "a")
        if args.floor:
            measured[FLOOR] = await stack.enter_async_context(aiohttp_floor_in_front(direct_port))
        if args.pin:
            pin_apart([pid for _, pid in measured.values()])
        cpu: dict[str, list[float]] = {name: [] for name in measured}
        loop_cpu: dict[str, list[float]] = {name: [] for name in measured}
        rps: dict[str, list[float]] = {name: [] for name in measured}
        added: dict[str, list[float]] = {name: [] for name in measured}
        names = list(measured)
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                port, pid = measured[name]
                before, loop_before = cpu_seconds(pid), main_thread_seconds(pid)
                data = await run_loadgen(
                    "load", {name: port}, SMALL_CHAT, concurrency=32, rounds=1, seconds=args.seconds, warmup=0
                )
                used = cpu_seconds(pid) - before
                on_loop = main_thread_seconds(pid) - loop_before
                served = data[name]["rounds"][0]["requests"]
                cpu[name].append(used / served * 1e6)
                loop_cpu[name].append(on_loop / served * 1e6)
                rps[name].append(data[name]["requests_per_s"])
            # Concurrency 1: the direct upstream of the first tree and each of them, alternating.
            targets = {"direct": direct_port, **{name: measured[name][0] for name in order}}
            data = await run_loadgen(
                "load", targets, SMALL_CHAT, concurrency=1, rounds=1, seconds=args.c1_seconds, warmup=0.2
            )
            for name in names:
                added[name].append(data[name]["median_ms"] - data["direct"]["median_ms"])
    return {
        "log_level": args.log_level,
        "idle_profiles": args.idle_profiles,
        "rounds": args.rounds,
        "pinned": args.pin,
        "seconds": args.seconds,
        "trees": {name: str(tree) for name, tree in trees.items()},
        "references": {FLOOR: "scripts/benchmarks/aiohttp_floor.py"} if args.floor else {},
        "cpu_us_per_request_c32": {name: spread(values) for name, values in cpu.items()},
        "event_loop_thread_us_per_request_c32": {name: spread(values) for name, values in loop_cpu.items()},
        "requests_per_s_c32": {name: spread(values) for name, values in rps.items()},
        "added_median_ms_c1": {name: spread(values) for name, values in added.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a tree to measure (default: this one)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of c32 load per round")
    parser.add_argument(
        "--c1-seconds", type=float, default=2.0, help="seconds of concurrency-1 load per target"
    )
    parser.add_argument("--log-level", default="INFO", help="the routers' --log-level (default INFO)")
    parser.add_argument(
        "--idle-profiles",
        type=int,
        default=0,
        metavar="N",
        help="N more profiles in each router's config, never asked for (default 0)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the measured routers on the last CPU, load generators and upstreams on the others",
    )
    parser.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip the reference: scripts/benchmarks/aiohttp_floor.py, aiohttp and the router's upstream "
        "pool relaying with nothing else (what the router costs above it is its own)",
    )
    args = parser.parse_args()
    trees = dict(item.split("=", 1) for item in args.tree) if args.tree else {"here": str(ROOT)}
    result = asyncio.run(run({name: Path(path).resolve() for name, path in trees.items()}, args))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
