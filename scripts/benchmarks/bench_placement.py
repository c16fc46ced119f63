#!/usr/bin/env python3
"""Placement against hand pinning: the same scripted workload on simulated multi-GPU machines, three ways.

Machines: two 24 GB GPUs with six models of 4 to 18 GB (60 GB in all), and four 24 GB GPUs with eight
models of 4 to 20 GB (92 GB in all). A few hundred requests whose model follows a fixed seed (a skewed
choice, as real use is: a few models are asked for most), arriving at random (exponential gaps) and
each served for a random while. Run three ways on the same requests:

- `gpu0`: every profile pinned to GPU 0 by hand (`CUDA_VISIBLE_DEVICES: "0"`), as people do today;
- `round_robin`: profiles pinned by hand to GPU 0, 1, 2, ... in turn, in the order they are listed;
- `auto`: `placement: auto`, the router choosing at each start.

Drives the router's own scheduler (llama_router/core/scheduler.py) with a simulated clock: the
budgets are what the router makes of NVML's 24564 MiB cards (less the 512 MiB headroom), a load
takes 1 s plus its bytes at 2 GB/s, a stop 0.5 s. What it measures is the decision rule, not
processes: swaps (models stopped to make room), bytes loaded onto GPUs, and the total time requests
waited for their model (queue and load). Prints one JSON object, with each way's ratio to `auto`.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llama_router.core.placement import Placement
from llama_router.core.scheduler import Dispatch, Fail, ProfileSpec, Rules, Scheduler, Start, State, Stop

MIB = 1024 * 1024
GB = 1000 * MIB
GPU_BUDGET = (24564 - 512) * MIB
LOAD_FIXED = 1.0  # seconds a load takes besides reading its bytes
LOAD_RATE = 2 * GB  # bytes per second onto a GPU
STOP_SECONDS = 0.5
SPLIT_EXTRA = 384 * MIB  # what each further GPU of a split holds besides its share

MACHINES: dict[str, tuple[int, dict[str, int]]] = {
    "two_24gb_gpus": (2, {"m4": 4, "m6": 6, "m8": 8, "m10": 10, "m14": 14, "m18": 18}),
    "four_24gb_gpus": (4, {"m4": 4, "m6": 6, "m8": 8, "m10": 10, "m12": 12, "m14": 14, "m18": 18, "m20": 20}),
}


@dataclass(order=True)
class _Event:
    time: float
    seq: int
    kind: str = field(compare=False)
    payload: Any = field(compare=False, default=None)


def workload(names: list[str], requests: int, seed: int) -> list[tuple[float, str, float]]:
    """(arrival, model, service seconds) for each request: a skewed choice of model (weights 1/k,
    shuffled by the seed), exponential gaps of 1.5 s on average, 1 to 6 s of service each."""
    rng = random.Random(seed)
    order = names[:]
    rng.shuffle(order)
    weights = [1 / (rank + 1) for rank in range(len(order))]
    now, out = 0.0, []
    for _ in range(requests):
        now += rng.expovariate(1 / 1.5)
        out.append((now, rng.choices(order, weights)[0], rng.uniform(1.0, 6.0)))
    return out


def specs(way: str, gpus: int, sizes: dict[str, int]) -> list[ProfileSpec]:
    devices = tuple(f"gpu{index}" for index in range(gpus))
    out = []
    for index, (name, size) in enumerate(sizes.items()):
        need = size * GB
        if way == "auto":
            placement = Placement(devices, need, split_extra=SPLIT_EXTRA)
            out.append(ProfileSpec(name, {}, 600.0, placement=placement))
        else:
            gpu = devices[0] if way == "gpu0" else devices[index % gpus]
            out.append(ProfileSpec(name, {gpu: need}, 600.0))
    return out


def simulate(
    way: str, gpus: int, sizes: dict[str, int], load: list[tuple[float, str, float]]
) -> dict[str, Any]:
    budget = {f"gpu{index}": GPU_BUDGET for index in range(gpus)}
    s = Scheduler(specs(way, gpus, sizes), budget, Rules(drain_timeout=60.0, swap_delay=2.0))
    heap: list[_Event] = []
    seq = iter(range(10**9))

    def push(time: float, kind: str, payload: Any = None) -> None:
        heapq.heappush(heap, _Event(time, next(seq), kind, payload))

    for request_id, (arrival, model, service) in enumerate(load):
        push(arrival, "arrive", (request_id, model, service))
    arrived: dict[int, float] = {}
    service_of: dict[int, float] = {}
    waits: list[float] = []
    swaps = 0
    loaded_bytes = 0
    failed = 0
    placements: dict[str, int] = {}

    def apply(now: float, decisions: list[Any]) -> None:
        nonlocal swaps, loaded_bytes, failed
        for decision in decisions:
            if isinstance(decision, Dispatch):
                waits.append(now - arrived[decision.request_id])
                push(now + service_of[decision.request_id], "finish", decision.request_id)
            elif isinstance(decision, Start):
                footprint = s.view(decision.profile).footprint
                on_gpus = sum(amount for device, amount in footprint.items() if device.startswith("gpu"))
                loaded_bytes += on_gpus
                if decision.placed is not None:
                    placements[decision.placed.how] = placements.get(decision.placed.how, 0) + 1
                push(now + LOAD_FIXED + on_gpus / LOAD_RATE, "ready", decision.profile)
            elif isinstance(decision, Stop):
                swaps += decision.cause.makes_room
                push(now + STOP_SECONDS, "exited", decision.profile)
            elif isinstance(decision, Fail):
                failed += 1
        wake = s.next_wakeup()
        if wake is not None:
            push(max(wake, now), "tick")

    handlers: dict[str, Callable[[float, Any], list[Any]]] = {
        "finish": lambda now, rid: s.request_finished(rid, now),
        "ready": lambda now, name: s.process_ready(name, now),
        "exited": lambda now, name: s.process_exited(name, now, "stopped"),
        "tick": lambda now, _: s.tick(now),
    }
    end = 0.0
    while heap:
        event = heapq.heappop(heap)
        end = event.time
        if event.kind == "arrive":
            request_id, model, service = event.payload
            arrived[request_id], service_of[request_id] = event.time, service
            decisions = s.request_arrived(request_id, model, event.time, event.time + 3600.0)
        else:
            decisions = handlers[event.kind](event.time, event.payload)
        apply(event.time, decisions)
    return {
        "swaps": swaps,
        "gb_loaded": round(loaded_bytes / GB, 1),
        "total_wait_s": round(sum(waits), 1),
        "median_wait_s": round(statistics.median(waits), 3),
        "p90_wait_s": round(statistics.quantiles(waits, n=10)[-1], 2),
        "served": len(waits),
        "failed": failed,
        "simulated_s": round(end, 1),
        **({"placements": placements} if placements else {}),
        # what `/running` shows as each loaded model's `placement` once the last request ended
        **({"running_at_end": running_at_end(s)} if way == "auto" else {}),
    }


def running_at_end(s: Scheduler) -> dict[str, Any]:
    return {
        view.name: view.placed.describe()
        for view in s.views()
        if view.state is State.READY and view.placed is not None
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    args = parser.parse_args()
    result: dict[str, Any] = {"requests": args.requests, "seeds": args.seeds, "machines": {}}
    for machine, (gpus, sizes) in MACHINES.items():
        per_seed = []
        for seed in args.seeds:
            load = workload(list(sizes), args.requests, seed)
            per_seed.append(
                {way: simulate(way, gpus, sizes, load) for way in ("gpu0", "round_robin", "auto")}
            )
        ways: dict[str, Any] = {}
        for way in ("gpu0", "round_robin", "auto"):
            runs = [run[way] for run in per_seed]
            ways[way] = {
                "swaps_median": statistics.median(run["swaps"] for run in runs),
                "gb_loaded_median": statistics.median(run["gb_loaded"] for run in runs),
                "total_wait_s_median": statistics.median(run["total_wait_s"] for run in runs),
                "runs": runs,
            }
        for way in ("gpu0", "round_robin"):
            auto = ways["auto"]
            pairs = list(zip(ways[way]["runs"], auto["runs"], strict=True))
            ways[way]["vs_auto"] = {
                "swaps": round(ways[way]["swaps_median"] / max(1, auto["swaps_median"]), 2),
                # per seed: in how many runs auto stopped fewer models, as many, more
                "auto_fewer_swaps_seeds": sum(a["swaps"] < w["swaps"] for w, a in pairs),
                "auto_same_swaps_seeds": sum(a["swaps"] == w["swaps"] for w, a in pairs),
                "auto_more_swaps_seeds": sum(a["swaps"] > w["swaps"] for w, a in pairs),
                "gb_loaded": round(ways[way]["gb_loaded_median"] / max(0.1, auto["gb_loaded_median"]), 2),
                "total_wait": round(
                    ways[way]["total_wait_s_median"] / max(0.1, auto["total_wait_s_median"]), 2
                ),
            }
        result["machines"][machine] = {"gpus": gpus, "models_gb": sizes, "ways": ways}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
