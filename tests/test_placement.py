"""Placement: the scheduler chooses the GPUs of a placeable profile at each start. Plain function
calls, like the other rules (tests/test_scheduler.py holds the random-sequence invariants)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from llama_router.config.schema import load_config
from llama_router.core.placement import Placed, Placement, split_over, travelling_need
from llama_router.core.scheduler import (
    Decision,
    Fail,
    FailReason,
    ProfileSpec,
    Rules,
    Scheduler,
    Start,
    State,
    Stop,
)
from llama_router.sizing import memory
from llama_router.sizing.budgets import Sizing
from llama_router.sizing.memory import MIB, Host
from tests.test_scheduler import Driver

GB = 1000


def machine(
    sizes: Mapping[str, int],
    *,
    gpus: int = 2,
    budget: int = 24 * GB,
    pinned: tuple[str, ...] = (),
    priority: Mapping[str, int] | None = None,
    split: bool = True,
    ram: bool = False,
    fixed: Mapping[str, dict[str, int]] | None = None,
    standby: tuple[str, ...] = (),
) -> Driver:
    """A scheduler over `gpus` GPUs of `budget` each, one placeable profile per entry of `sizes`."""
    names = tuple(f"gpu{index}" for index in range(gpus))
    specs = [
        ProfileSpec(
            name,
            {"ram": 1},
            10.0,
            pinned=name in pinned,
            priority=(priority or {}).get(name, 0),
            standby=name in standby,
            placement=Placement(names, need, split=split, ram=ram, split_extra=500),
        )
        for name, need in sizes.items()
    ]
    specs += [ProfileSpec(name, footprint, 10.0) for name, footprint in (fixed or {}).items()]
    return Driver(
        Scheduler(specs, {**dict.fromkeys(names, budget), "ram": 64 * GB}, Rules(drain_timeout=30.0))
    )


def started(decisions: list[Decision]) -> list[Start]:
    return [decision for decision in decisions if isinstance(decision, Start)]


def load(d: Driver, name: str) -> Placed:
    """A request for `name` starts it at once; it becomes ready and the request ends. Where it went."""
    request, decisions = d.arrive(name)
    (start,) = started(decisions)
    assert start.placed is not None
    d.ready(name)
    d.finish(request)
    return start.placed


def test_a_model_goes_on_a_gpu_where_it_fits_without_stopping_anything() -> None:
    d = machine({"big": 20 * GB, "small": 8 * GB})
    assert load(d, "big").gpus == ("gpu0",)
    placed = load(d, "small")
    assert placed.gpus == ("gpu1",) and placed.stops == () and placed.how == "fits"
    assert placed.why == "fits on gpu1"
    assert d.s.used()["gpu0"] == 20 * GB and d.s.used()["gpu1"] == 8 * GB


def test_the_gpu_it_fills_best_is_chosen_so_a_big_hole_stays_for_a_big_model() -> None:
    d = machine({"a": 14 * GB, "b": 8 * GB, "c": 8 * GB, "d": 14 * GB})
    assert [load(d, name).gpus for name in "abcd"] == [("gpu0",), ("gpu0",), ("gpu1",), ("gpu1",)]
    assert not any(isinstance(decision, Stop) for decision in d.log), "all four fit: nothing stopped"


def test_making_room_happens_on_the_gpu_whose_victim_ranks_lowest_in_the_eviction_order() -> None:
    d = machine({"keep": 20 * GB, "cheap": 20 * GB, "new": 20 * GB}, priority={"keep": 5})
    load(d, "keep")
    d.now = 1.0
    load(d, "cheap")  # used more recently, but of lower priority
    d.now = 2.0
    _, decisions = d.arrive("new")
    assert decisions == [Stop("cheap", "making room for 'new'")]
    (start,) = started(d.exited("cheap"))
    assert start.placed is not None and start.placed.gpus == d.s.view("cheap").placed.gpus  # type: ignore[union-attr]
    assert start.placed.stops == ("cheap",)
    assert start.placed.why.startswith("made room on gpu") and "by stopping 'cheap'" in start.placed.why


def test_among_equals_the_least_recently_used_gpu_makes_way() -> None:
    d = machine({"old": 20 * GB, "recent": 20 * GB, "new": 20 * GB})
    load(d, "old")
    d.now = 5.0
    load(d, "recent")
    d.now = 6.0
    _, decisions = d.arrive("new")
    assert decisions == [Stop("old", "making room for 'new'")]


def test_an_idle_model_makes_way_before_a_busy_one_which_is_never_cut() -> None:
    d = machine({"busy": 20 * GB, "idle": 20 * GB, "new": 20 * GB})
    d.arrive("busy")
    d.ready("busy")
    d.now = 1.0
    load(d, "idle")  # more recently used than busy's start, yet idle: it goes
    d.now = 2.0
    _, decisions = d.arrive("new")
    assert decisions == [Stop("idle", "making room for 'new'")]
    assert d.s.view("busy").in_flight == 1 and not d.s.view("busy").draining


def test_making_room_stops_the_fewest_models_though_they_were_used_more_recently() -> None:
    d = machine({"s1": 10 * GB, "s2": 10 * GB, "big": 20 * GB, "new": 20 * GB})
    assert load(d, "s1").gpus == load(d, "s2").gpus == ("gpu0",)
    d.now = 5.0
    assert load(d, "big").gpus == ("gpu1",)  # the most recently used
    d.now = 6.0
    # gpu0 would stop two models used longer ago, gpu1 one: one model to load again, not two.
    _, decisions = d.arrive("new")
    assert decisions == [Stop("big", "making room for 'new'")]
    (start,) = started(d.exited("big"))
    assert start.placed is not None and start.placed.gpus == ("gpu1",) and start.placed.stops == ("big",)
    assert {view.name for view in d.s.views() if view.state is State.READY} == {"s1", "s2"}


def test_of_gpus_that_stop_as_many_models_the_one_stopping_fewer_bytes_makes_way() -> None:
    d = machine({"large": 18 * GB, "medium": 14 * GB, "new": 12 * GB})
    assert load(d, "large").gpus == ("gpu0",)
    d.now = 5.0
    assert load(d, "medium").gpus == ("gpu1",)  # the most recently used, yet the smaller reload
    d.now = 6.0
    _, decisions = d.arrive("new")
    assert decisions == [Stop("medium", "making room for 'new'")]


def test_a_gpu_where_only_idle_models_stop_wins_over_draining_a_busy_one() -> None:
    # 45 GB for 48: every model fits at once, so demand does not decide (see the tests below).
    d = machine({"s1": 10 * GB, "s2": 10 * GB, "busy": 10 * GB, "new": 15 * GB})
    assert load(d, "s1").gpus == load(d, "s2").gpus == ("gpu0",)
    d.now = 5.0
    d.arrive("busy")
    assert d.s.view("busy").placed.gpus == ("gpu1",)  # type: ignore[union-attr]
    d.ready("busy")
    d.now = 6.0
    _, decisions = d.arrive("new")  # two idle models stop rather than one in use is drained
    assert decisions == [Stop("s1", "making room for 'new'"), Stop("s2", "making room for 'new'")]
    assert not d.s.view("busy").draining


def asked(d: Driver, name: str, times: int) -> None:
    """`times` requests for `name`, one after the other, a second apart (it loads for the first)."""
    for _ in range(times):
        request, _ = d.arrive(name)
        if d.s.view(name).state is State.STARTING:
            d.ready(name)
        d.finish(request)
        d.now += 1.0


def test_where_not_every_model_fits_at_once_the_least_asked_for_makes_way() -> None:
    # 60 GB for 48: two of the three models take turns whatever the placement.
    d = machine({"often": 20 * GB, "once": 20 * GB, "new": 20 * GB})
    asked(d, "often", 3)
    d.now = 10.0
    asked(d, "once", 1)  # the most recently used, yet asked for once against three times
    _, decisions = d.arrive("new")
    assert decisions == [Stop("once", "making room for 'new'")]
    (start,) = started(d.exited("once"))
    assert start.placed is not None
    gpu = start.placed.gpus[0]
    assert start.placed.why == (
        f"made room on {gpu} by stopping 'once', the least asked-for lately (not every model fits at once)"
    )
    assert d.s.view("often").state is State.READY


def test_where_not_every_model_fits_priority_outweighs_demand() -> None:
    d = machine({"kept": 20 * GB, "often": 20 * GB, "new": 20 * GB}, priority={"kept": 5})
    asked(d, "kept", 1)
    asked(d, "often", 3)  # asked for more, but of lower priority
    _, decisions = d.arrive("new")
    assert decisions == [Stop("often", "making room for 'new'")]


def test_demand_fades_so_a_change_of_habits_is_followed_within_minutes() -> None:
    d = machine({"often": 20 * GB, "once": 20 * GB, "new": 20 * GB})
    asked(d, "often", 3)
    d.now = 20 * 60.0  # twenty minutes on, those three requests count for less than one
    asked(d, "once", 2)
    asked(d, "often", 1)  # the most recently used, but asked for less than 'once' lately
    _, decisions = d.arrive("new")
    assert decisions == [Stop("often", "making room for 'new'")]


def test_where_every_model_fits_at_once_demand_does_not_decide() -> None:
    # 46 GB for 48: the room is made for a model that fits beside the others once they are moved
    # around, and the least recently used goes, as before (no model need take turns).
    d = machine({"often": 14 * GB, "once": 14 * GB, "new": 18 * GB})
    asked(d, "often", 3)
    d.now = 10.0
    asked(d, "once", 1)
    assert d.s.view("often").placed.gpus != d.s.view("once").placed.gpus  # type: ignore[union-attr]
    _, decisions = d.arrive("new")
    assert decisions == [Stop("often", "making room for 'new'")]


def test_a_model_kept_after_all_is_not_named_among_those_stopped_for_a_placement() -> None:
    d = machine({"a": 10 * GB, "b": 10 * GB, "pin": 20 * GB, "new": 14 * GB}, pinned=("pin",))
    pinned_on = load(d, "pin").gpus  # the other GPU is where the room is made
    a_request, _ = d.arrive("a")
    d.ready("a")
    d.now = 1.0
    b_request, _ = d.arrive("b")
    d.ready("b")
    (gpu,) = d.s.view("a").placed.gpus  # type: ignore[union-attr]
    assert d.s.view("b").placed.gpus == (gpu,) and (gpu,) != pinned_on  # type: ignore[union-attr]
    d.now = 2.0
    d.arrive("new")  # both busy: 'a', used longer ago, is chosen and drains
    assert d.s.view("a").draining
    decisions = d.finish(b_request)  # 'b' is idle now: it goes at once, and 'a' serves on
    assert decisions == [Stop("b", "making room for 'new'")]
    assert not d.s.view("a").draining and d.s.view("a").state is State.READY
    (start,) = started(d.exited("b"))
    assert start.placed is not None and start.placed.stops == ("b",)
    assert start.placed.why == f"made room on {gpu} by stopping 'b'"
    d.finish(a_request)


def test_a_pinned_model_is_never_stopped_for_a_placement() -> None:
    d = machine({"pin": 20 * GB, "other": 20 * GB, "new": 20 * GB}, pinned=("pin",))
    load(d, "pin")
    d.now = 5.0
    load(d, "other")
    d.now = 6.0
    _, decisions = d.arrive("new")
    assert decisions == [Stop("other", "making room for 'new'")]  # though 'pin' was used less recently


def test_a_model_no_single_gpu_can_hold_is_split_in_proportion_to_the_room_on_each() -> None:
    d = machine({"huge": 30 * GB, "small": 4 * GB})
    load(d, "small")  # gpu0 now has 20 GB of room, gpu1 24 GB
    placed = load(d, "huge")
    assert placed.gpus == ("gpu0", "gpu1") and placed.how == "split"
    used = d.s.used()
    assert used["gpu0"] <= 24 * GB and used["gpu1"] <= 24 * GB
    # The shares follow the room: more on the emptier GPU, and the tensor split says the same.
    assert used["gpu1"] > used["gpu0"] - 4 * GB
    assert placed.shares[1] > placed.shares[0]
    assert "split over gpu0, gpu1 (--tensor-split" in placed.why


def test_a_split_stops_what_it_must_when_the_room_is_taken() -> None:
    d = machine({"huge": 40 * GB, "a": 10 * GB, "b": 10 * GB})
    load(d, "a")
    load(d, "b")
    d.now = 1.0
    _, decisions = d.arrive("huge")
    assert {decision.profile for decision in decisions if isinstance(decision, Stop)} <= {"a", "b"}
    for stop in [decision for decision in decisions if isinstance(decision, Stop)]:
        decisions = d.exited(stop.profile)
    (start,) = started(decisions)
    assert start.placed is not None and start.placed.how == "split"
    assert all(amount <= 24 * GB for device, amount in d.s.used().items() if device.startswith("gpu"))


def test_split_false_refuses_a_model_no_single_gpu_can_hold() -> None:
    d = machine({"huge": 30 * GB}, split=False)
    _, decisions = d.arrive("huge")
    assert len(decisions) == 1 and isinstance(decisions[0], Fail)
    assert decisions[0].code is FailReason.MODEL_TOO_LARGE
    assert "(placement: {split: false}: on one of them)" in decisions[0].message


def test_ram_true_keeps_in_ram_what_no_gpu_nor_split_can_hold() -> None:
    d = machine({"huge": 30 * GB}, split=False, ram=True)
    placed = load(d, "huge")
    assert placed.how == "ram" and placed.gpus == ("gpu0",) and placed.ram == 6 * GB
    assert d.s.used()["gpu0"] == 24 * GB and d.s.used()["ram"] == 1 + 6 * GB
    assert "the rest (" in placed.why


def test_partial_offload_is_the_last_resort_a_split_comes_first() -> None:
    d = machine({"huge": 30 * GB}, ram=True)
    assert load(d, "huge").how == "split"


def test_a_learned_footprint_travels_to_another_gpu() -> None:
    d = machine({"a": 10 * GB, "blocker": 20 * GB})
    request, _ = d.arrive("a")
    d.ready("a")
    assert d.s.view("a").placed.gpus == ("gpu0",)  # type: ignore[union-attr]
    d.s.footprint_measured("a", {"gpu0": 16 * GB, "ram": 1}, d.now)  # larger than estimated
    d.finish(request)
    d.s.unload("a", d.now)
    d.exited("a")
    load(d, "blocker")  # on gpu0 now (the best fit), gpu1 is free
    placed = load(d, "a")
    assert placed.gpus == ("gpu1",)
    assert d.s.used()["gpu1"] == 16 * GB, "the next start on another GPU takes what was learned"


def test_the_need_learned_on_a_split_counts_its_extra_per_gpu_once() -> None:
    placed = Placed(("gpu0", "gpu1"), (10, 20), need=30)
    assert travelling_need({"gpu0": 11_000, "gpu1": 20_500, "ram": 5}, placed, 500) == 31_000
    assert travelling_need({"gpu0": 9_000, "ram": 5}, Placed(("gpu0",), ram=3_000), 500) is None


def test_a_footprint_measured_partly_in_ram_does_not_shrink_the_need_learned_for_next_time(
    tmp_path: Path, tiny_models: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "THIS_MACHINE", Host(platform="linux", sysfs=tmp_path / "none"))
    path = tmp_path / "profiles.yaml"
    server = {"state_dir": str(tmp_path / "state"), "memory": {"gpus": [24000, 24000], "nvml": False}}
    profile = {"model": str(tiny_models[0]), "placement": {"ram": True}}
    path.write_text(yaml.safe_dump({"server": server, "profiles": {"m": profile}}))
    sizing = Sizing(load_config(path))
    m = sizing.config.profiles["m"]
    whole = {"gpu0": 30_000 * MIB, "ram": 2_000 * MIB}
    assert sizing.learn(m, whole, {}, Placed(("gpu0",), need=30_000 * MIB))
    assert sizing.spec(m).placement.need == 30_000 * MIB  # type: ignore[union-attr]
    # Next time it was partly in RAM: its GPU held 20 GB, the rest went to RAM. That is not what
    # it needs on a GPU: the next placement still looks for 30 GB.
    partly = {"gpu1": 20_000 * MIB, "ram": 12_000 * MIB}
    kept = sizing.learn(m, partly, {}, Placed(("gpu1",), ram=10_000 * MIB, need=30_000 * MIB))
    assert sizing.spec(m).placement.need == 30_000 * MIB  # type: ignore[union-attr]
    assert not kept
    assert Sizing(load_config(path)).spec(m).placement.need == 30_000 * MIB  # type: ignore[union-attr]


def test_split_over_takes_the_fewest_gpus_with_room() -> None:
    placement = Placement(("gpu0", "gpu1", "gpu2", "gpu3"), 30 * GB, split_extra=500)
    split = split_over(placement, {"gpu0": 5 * GB, "gpu1": 24 * GB, "gpu2": 20 * GB, "gpu3": 1})
    assert split is not None
    amounts, shares = split
    assert set(amounts) == {"gpu1", "gpu2"} and len(shares) == 2
    assert split_over(placement, {"gpu0": 5 * GB, "gpu1": 5 * GB}) is None


def test_the_dry_run_says_where_and_what_it_would_stop_and_decides_nothing() -> None:
    d = machine({"a": 20 * GB, "b": 20 * GB, "new": 20 * GB})
    load(d, "a")
    d.now = 1.0
    load(d, "b")
    plan = d.s.where("new")
    assert plan is not None and plan.placed is not None
    assert plan.placed.gpus == d.s.view("a").placed.gpus  # type: ignore[union-attr]
    assert [victim.spec.name for victim in plan.victims] == ["a"]
    assert d.s.view("a").state is State.READY and d.s.view("new").state is State.COLD
    running = d.s.where("b")
    assert running is not None and running.now and running.placed == d.s.view("b").placed, "where it is"


def test_a_preload_is_placed_only_where_it_fits_and_stops_nothing() -> None:
    d = machine({"a": 20 * GB, "b": 20 * GB, "warm": 10 * GB}, standby=("warm",))
    _, decisions = d.arrive("a")
    assert [start.profile for start in started(decisions)] == ["a", "warm"]
    assert d.s.view("warm").placed.gpus == ("gpu1",)  # type: ignore[union-attr]


def test_the_gpu_a_model_waits_on_stays_chosen_while_its_victim_drains() -> None:
    d = machine({"x": 20 * GB, "y": 20 * GB, "new": 20 * GB})
    x_request, _ = d.arrive("x")
    d.ready("x")
    d.now = 1.0
    y_request, _ = d.arrive("y")
    d.ready("y")  # both busy: whichever is chosen drains
    d.now = 2.0
    d.arrive("new")
    (drained,) = [name for name in "xy" if d.s.view(name).draining]
    other = "y" if drained == "x" else "x"
    d.finish(y_request if other == "y" else x_request)  # the other one is idle now, yet kept
    assert not d.s.view(other).draining and d.s.view(other).state is State.READY
    decisions = d.finish(x_request if drained == "x" else y_request)
    assert decisions == [Stop(drained, "drained for a swap")]


def test_where_not_every_model_fits_a_drain_ends_once_its_model_is_the_more_asked_for() -> None:
    d = machine({"x": 20 * GB, "y": 20 * GB, "new": 20 * GB})
    d.arrive("x")
    d.ready("x")
    d.now = 1.0
    asked(d, "y", 2)
    y_request, _ = d.arrive("y")  # both busy; 'x', asked for once, drains for 'new'
    d.arrive("new")
    assert d.s.view("x").draining and not d.s.view("y").draining
    d.now = 10.0
    for _ in range(3):  # its clients come back: now 'y' is the less asked-for, and drains instead
        d.arrive("x")
    assert not d.s.view("x").draining and d.s.view("x").in_flight == 4
    assert d.s.view("y").draining and d.s.view("y").in_flight == 1
    assert d.finish(y_request) == [Stop("y", "drained for a swap")]


def test_where_not_every_model_fits_what_already_stopped_for_a_model_counts_against_leaving() -> None:
    # 60 GB for 48. 'new' waits on the GPU of 'idle' (stopped at once) and 'busy' (draining); then
    # 'late', loaded meanwhile on the other GPU and asked for less than 'busy', falls idle. Leaving
    # for its GPU would stop 'late' and have stopped 'idle' for nothing, asked for more together
    # than 'busy': 'new' stays.
    d = machine({"busy": 12 * GB, "idle": 8 * GB, "late": 20 * GB, "new": 20 * GB})
    asked(d, "busy", 3)
    busy_request, _ = d.arrive("busy")
    asked(d, "idle", 4)
    gpu = d.s.view("busy").placed.gpus  # type: ignore[union-attr]
    assert d.s.view("idle").placed.gpus == gpu  # type: ignore[union-attr]
    late_request, decisions = d.arrive("late")
    (start,) = started(decisions)
    assert start.placed is not None and start.placed.gpus != gpu
    _, decisions = d.arrive("new")
    assert decisions == [Stop("idle", "making room for 'new'")] and d.s.view("busy").draining
    d.exited("idle")
    d.ready("late")
    assert not [decision for decision in d.finish(late_request) if isinstance(decision, Stop)]
    assert d.s.view("late").state is State.READY and d.s.view("busy").draining
    assert d.finish(busy_request) == [Stop("busy", "drained for a swap")]
    (start,) = started(d.exited("busy"))
    assert start.placed is not None and start.placed.gpus == gpu
    assert start.placed.stops == ("idle", "busy")


def test_profiles_that_fix_their_devices_are_not_placed() -> None:
    d = machine({}, fixed={"fixed": {"gpu1": 10 * GB}})
    _, decisions = d.arrive("fixed")
    assert decisions == [Start("fixed")] and decisions[0].placed is None  # type: ignore[union-attr]
    assert d.s.used()["gpu1"] == 10 * GB and d.s.used()["gpu0"] == 0


@pytest.mark.parametrize("gpus", [2, 4])
def test_a_gpu_held_by_a_pinned_model_is_passed_over(gpus: int) -> None:
    d = machine({"pin": 20 * GB, "big": 20 * GB}, gpus=gpus, budget=20 * GB, pinned=("pin",), split=False)
    load(d, "pin")
    placed = load(d, "big")
    assert placed.gpus != d.s.view("pin").placed.gpus and placed.stops == ()  # type: ignore[union-attr]


def test_a_model_refused_beside_pinned_models_on_every_gpu() -> None:
    d = machine({"p0": 20 * GB, "p1": 20 * GB, "big": 20 * GB}, budget=20 * GB, pinned=("p0", "p1"))
    load(d, "p0")
    load(d, "p1")
    assert d.s.where("big") is None
    _, decisions = d.arrive("big")
    assert [decision.code for decision in decisions if isinstance(decision, Fail)] == [
        FailReason.MODEL_TOO_LARGE
    ]
