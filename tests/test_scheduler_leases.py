"""RPC workers as leased devices, in the pure scheduler: one model per worker at a time.

An rpc-server serves one llama-server at a time, so a device named `rpc:<host:port>` holds one model
at most whatever its budget; a swap stops the old user before the next one starts on the worker."""

from __future__ import annotations

import random

import pytest

from llama_router.core.scheduler import (
    Dispatch,
    Fail,
    FailReason,
    ProfileSpec,
    Rules,
    Scheduler,
    Start,
    State,
    Stop,
    fits,
    leased,
)
from tests.test_scheduler import WAIT, Driver

GIB = 1 << 30
W1, W2 = "rpc:10.0.0.2:50052", "rpc:10.0.0.3:50052"
BUDGET = {"ram": 64 * GIB, "gpu0": 24 * GIB, W1: 22 * GIB, W2: 22 * GIB}


def make(footprints: dict[str, dict[str, int]], swap_delay: float = 0.0) -> Driver:
    specs = [ProfileSpec(name, footprint, load_timeout=10.0) for name, footprint in footprints.items()]
    return Driver(Scheduler(specs, BUDGET, Rules(drain_timeout=30.0, swap_delay=swap_delay)))


def test_only_rpc_devices_are_leased() -> None:
    assert leased(W1)
    assert not any(leased(device) for device in ("ram", "gpu0", "slots"))


def test_a_worker_with_room_to_spare_still_takes_no_second_model() -> None:
    used = {W1: 1 * GIB}
    assert not fits({W1: 1 * GIB}, used, BUDGET)  # 2 GiB of 22 would fit a GPU, not a worker
    assert fits({W2: 1 * GIB}, used, BUDGET)  # another worker is free
    assert fits({"ram": 1 * GIB}, used, BUDGET)
    assert fits({W1: 0}, used, BUDGET)  # nothing on the worker: no lease


def test_two_models_on_one_worker_never_run_at_once_a_swap_stops_the_old_user_first() -> None:
    d = make({"big": {"ram": GIB, W1: 10 * GIB}, "other": {"ram": GIB, W1: 5 * GIB}})
    first, decisions = d.arrive("big")
    assert decisions == [Start("big")]
    d.ready("big")
    d.finish(first)

    _, decisions = d.arrive("other")
    # The worker is held by an idle model: it is stopped, and `other` is not started beside it.
    assert decisions == [Stop("big", "making room for 'other'")]
    assert d.state("other") is State.COLD
    # Only once the old user's process is gone does the new one start on the worker.
    assert d.exited("big") == [Start("other")]


def test_a_model_busy_on_the_worker_is_drained_not_cut() -> None:
    d = make({"big": {W1: 10 * GIB}, "other": {W1: 5 * GIB}})
    first, _ = d.arrive("big")
    d.ready("big")
    _, decisions = d.arrive("other")
    assert decisions == []  # `big` answers a request: it drains first
    assert d.s.view("big").draining
    assert d.finish(first) == [Stop("big", "drained for a swap")]
    assert d.exited("big") == [Start("other")]


def test_models_on_different_workers_run_side_by_side() -> None:
    d = make({"left": {W1: 10 * GIB}, "right": {W2: 10 * GIB}, "both": {W1: GIB, W2: GIB}})
    left, _ = d.arrive("left")
    right, _ = d.arrive("right")
    assert d.log == [Start("left"), Start("right")]
    d.ready("left")
    d.ready("right")
    d.finish(left)
    d.finish(right)
    # A model split over both workers needs both leases: both holders make way.
    _, decisions = d.arrive("both")
    assert sorted(stop.profile for stop in decisions if isinstance(stop, Stop)) == ["left", "right"]
    d.exited("left")
    assert d.state("both") is State.COLD  # one worker is still held
    assert d.exited("right") == [Start("both")]


def test_a_pinned_model_keeps_its_worker_and_the_other_is_refused() -> None:
    specs = [
        ProfileSpec("pinned", {W1: GIB}, 10.0, pinned=True),
        ProfileSpec("other", {W1: GIB}, 10.0),
    ]
    d = Driver(Scheduler(specs, BUDGET, Rules(drain_timeout=30.0)))
    d.arrive("pinned")
    d.ready("pinned")
    request, decisions = d.arrive("other")
    assert len(decisions) == 1 and isinstance(decisions[0], Fail)
    assert decisions[0].request_id == request
    assert decisions[0].code is FailReason.MODEL_TOO_LARGE


def test_a_model_larger_than_its_worker_fails_at_once() -> None:
    d = make({"huge": {W1: 30 * GIB}})
    _, decisions = d.arrive("huge")
    assert len(decisions) == 1 and isinstance(decisions[0], Fail)
    assert decisions[0].code is FailReason.MODEL_TOO_LARGE


def test_a_measured_footprint_keeps_the_lease() -> None:
    d = make({"big": {"ram": GIB, W1: GIB}, "other": {W1: GIB}})
    d.arrive("big")
    d.ready("big")
    d.s.footprint_measured("big", {"ram": 2 * GIB, W1: 8 * GIB}, d.now)
    _, decisions = d.arrive("other")
    assert not any(isinstance(decision, Start) for decision in decisions)
    assert d.s.used()[W1] == 8 * GIB


@pytest.mark.parametrize("seed", range(20))
def test_no_worker_ever_holds_two_models(seed: int) -> None:
    """Random arrivals, finishes, readiness and exits: at no step do two models hold one worker."""
    rng = random.Random(seed)
    names = ["a", "b", "c", "d"]
    footprints = {
        "a": {W1: 4 * GIB},
        "b": {W1: 2 * GIB, W2: 2 * GIB},
        "c": {W2: 6 * GIB},
        "d": {"ram": GIB},
    }
    d = make(footprints, swap_delay=1.0)
    in_flight: list[int] = []
    for _ in range(300):
        action = rng.random()
        d.now += rng.random()
        if action < 0.4:
            _, decisions = d.arrive(rng.choice(names), wait=WAIT)
        elif action < 0.6 and in_flight:
            decisions = d.finish(in_flight.pop(rng.randrange(len(in_flight))))
        elif action < 0.8:
            starting = [n for n in names if d.state(n) is State.STARTING]
            decisions = d.ready(rng.choice(starting)) if starting else []
        elif action < 0.9:
            stopping = [n for n in names if d.state(n) is State.STOPPING]
            decisions = d.exited(rng.choice(stopping)) if stopping else []
        else:
            decisions = d.tick(d.now)
        in_flight.extend(decision.request_id for decision in decisions if isinstance(decision, Dispatch))
        for worker in (W1, W2):
            holders = [
                n
                for n in names
                if d.state(n) in (State.STARTING, State.READY, State.STOPPING) and footprints[n].get(worker)
            ]
            assert len(holders) <= 1, f"{worker} held by {holders}"
