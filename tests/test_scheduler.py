"""The decision core, driven by plain function calls: no processes, sockets or sleeps."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import pytest

from llama_router.core.placement import Placement
from llama_router.core.scheduler import (
    GRACE_MIN,
    Decision,
    Dispatch,
    Fail,
    FailReason,
    ProfileSpec,
    Rules,
    Scheduler,
    Start,
    State,
    Stop,
    choose_victims,
)
from llama_router.upstream.controller import refusal

WAIT = 100.0


def make(
    names: Sequence[str] = ("a", "b", "c"),
    *,
    slots: int = 1,
    drain_timeout: float = 30.0,
    swap_delay: float = 0.0,
    load_timeout: float = 10.0,
    footprints: dict[str, dict[str, int]] | None = None,
    budget: dict[str, int] | None = None,
) -> Scheduler:
    specs = [ProfileSpec(name, (footprints or {}).get(name, {"slots": 1}), load_timeout) for name in names]
    return Scheduler(
        specs, budget or {"slots": slots}, Rules(drain_timeout=drain_timeout, swap_delay=swap_delay)
    )


class Driver:
    """Feeds events and plays the supervisor's part: remembers what was started and stopped."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler
        self.now = 0.0
        self.next_id = 0
        self.log: list[Decision] = []

    def _take(self, decisions: list[Decision]) -> list[Decision]:
        self.log.extend(decisions)
        return decisions

    def arrive(
        self, profile: str, *, wait: float = WAIT, client: str | None = None, arrived: float | None = None
    ) -> tuple[int, list[Decision]]:
        self.next_id += 1
        return self.next_id, self._take(
            self.s.request_arrived(self.next_id, profile, self.now, self.now + wait, client, arrived)
        )

    def finish(self, request_id: int) -> list[Decision]:
        return self._take(self.s.request_finished(request_id, self.now))

    def ready(self, profile: str) -> list[Decision]:
        return self._take(self.s.process_ready(profile, self.now))

    def exited(self, profile: str, reason: str = "exited") -> list[Decision]:
        return self._take(self.s.process_exited(profile, self.now, reason))

    def tick(self, at: float) -> list[Decision]:
        self.now = at
        return self._take(self.s.tick(at))

    def state(self, profile: str) -> State:
        return self.s.view(profile).state


def test_request_to_a_loaded_model_is_dispatched_at_once() -> None:
    d = Driver(make())
    first, decisions = d.arrive("a")
    assert decisions == [Start("a")]
    assert d.ready("a") == [Dispatch(first, "a")]
    second, decisions = d.arrive("a")
    assert decisions == [Dispatch(second, "a")]


def test_concurrent_requests_for_a_cold_model_cause_exactly_one_start() -> None:
    d = Driver(make())
    ids = [d.arrive("a")[0] for _ in range(5)]
    assert [x for x in d.log if isinstance(x, Start)] == [Start("a")]
    assert d.ready("a") == [Dispatch(i, "a") for i in ids]
    assert d.s.view("a").in_flight == 5


def test_swap_stops_the_idle_model_and_starts_the_new_one_once_memory_is_free() -> None:
    d = Driver(make())
    first, _ = d.arrive("a")
    d.ready("a")
    d.finish(first)
    second, decisions = d.arrive("b")
    assert decisions == [Stop("a", "making room for 'b'")]
    assert d.state("b") is State.COLD  # not started while 'a' still holds the slot
    assert d.exited("a") == [Start("b")]
    assert d.ready("b") == [Dispatch(second, "b")]


def test_a_swap_never_cuts_a_request_in_flight() -> None:
    d = Driver(make())
    running, _ = d.arrive("a")
    d.ready("a")
    waiting, decisions = d.arrive("b")
    assert decisions == []  # 'a' is busy: it drains first
    assert d.s.view("a").draining
    assert d.tick(10.0) == []
    late, decisions = d.arrive("a")
    assert decisions == []  # a draining model takes no new work; it queues
    assert d.finish(running) == [Stop("a", "drained for a swap")]
    assert d.exited("a") == [Start("b")]
    assert d.ready("b") == [Dispatch(waiting, "b")]
    # 'a' waits its turn behind 'b' and comes back once 'b' is idle.
    assert d.s.view("b").draining
    assert d.finish(waiting) == [Stop("b", "drained for a swap")]
    assert d.exited("b") == [Start("a")]
    assert d.ready("a") == [Dispatch(late, "a")]


def test_drain_timeout_bounds_the_wait_for_requests_in_flight() -> None:
    d = Driver(make(drain_timeout=5.0))
    d.arrive("a")
    d.ready("a")
    d.arrive("b")
    assert d.s.next_wakeup() == pytest.approx(5.0)
    assert d.tick(4.9) == []
    assert d.tick(5.0) == [Stop("a", "drain timeout (5s) with requests in flight")]


def test_requests_waiting_for_a_load_are_batched_into_one_swap() -> None:
    d = Driver(make())
    busy, _ = d.arrive("a")
    d.ready("a")
    waiting = [d.arrive("b")[0] for _ in range(4)]
    d.finish(busy)
    d.exited("a")
    assert d.ready("b") == [Dispatch(i, "b") for i in waiting]
    assert [x for x in d.log if isinstance(x, Start)] == [Start("a"), Start("b")]


def test_a_waiting_request_fails_with_a_reason_when_its_deadline_passes() -> None:
    d = Driver(make(load_timeout=1000.0))
    request, _ = d.arrive("a", wait=3.0)
    assert d.s.next_wakeup() == pytest.approx(3.0)
    (fail,) = d.tick(3.0)
    assert isinstance(fail, Fail)
    assert (fail.request_id, fail.code) == (request, FailReason.MODEL_WAIT_TIMEOUT)
    assert "'a'" in fail.message and "starting" in fail.message
    assert fail.retry_after == 1.0


def test_a_load_that_times_out_fails_its_waiters_and_stops_the_process() -> None:
    d = Driver(make(load_timeout=2.0))
    request, _ = d.arrive("a")
    decisions = d.tick(2.0)
    assert decisions[0] == Fail(
        request, FailReason.MODEL_LOAD_TIMEOUT, "model 'a' did not become ready within 2s"
    )
    assert isinstance(decisions[1], Stop)
    assert d.state("a") is State.STOPPING
    d.exited("a")
    assert d.state("a") is State.FAILED
    assert "did not become ready" in d.s.view("a").last_error


def test_an_exit_during_load_fails_waiters_with_the_reason_and_a_later_request_retries() -> None:
    d = Driver(make())
    ids = [d.arrive("a")[0] for _ in range(2)]
    decisions = d.exited("a", "llama-server exited with code 1 during load; last output:\nboom")
    assert [x.request_id for x in decisions if isinstance(x, Fail)] == ids
    assert all(
        isinstance(x, Fail) and x.code == FailReason.MODEL_LOAD_FAILED and "boom" in x.message
        for x in decisions
    )
    assert d.state("a") is State.FAILED
    _, decisions = d.arrive("a")
    assert decisions == [Start("a")]


def test_a_failed_load_frees_the_slot_for_the_next_waiter() -> None:
    d = Driver(make())
    d.arrive("a")
    other, _ = d.arrive("b")
    assert d.exited("a", "crash")[-1] == Start("b")
    assert d.ready("b") == [Dispatch(other, "b")]


def test_a_crash_while_serving_frees_the_model_and_the_next_request_restarts_it() -> None:
    d = Driver(make())
    request, _ = d.arrive("a")
    d.ready("a")
    d.exited("a", "killed by signal SIGSEGV while serving")
    assert d.state("a") is State.FAILED
    assert d.s.used() == {"slots": 0}
    d.finish(request)  # the proxy reports the broken request as finished
    _, decisions = d.arrive("a")
    assert decisions == [Start("a")]


def test_oldest_waiter_is_served_first() -> None:
    d = Driver(make())
    first, _ = d.arrive("a")
    d.ready("a")
    c_request, _ = d.arrive("c")
    _b_request, _ = d.arrive("b")
    d.finish(first)
    assert d.exited("a") == [Start("c")]
    assert d.ready("c") == [Dispatch(c_request, "c")]
    d.finish(c_request)
    assert d.exited("c") == [Start("b")]


def test_no_starvation_a_busy_model_drains_at_once_without_swap_delay() -> None:
    d = Driver(make())
    busy, _ = d.arrive("a")
    d.ready("a")
    other, _ = d.arrive("b")
    # More work for 'a' keeps coming, but it queues: 'b' is next.
    more = [d.arrive("a")[0] for _ in range(3)]
    d.finish(busy)
    d.exited("a")
    assert d.ready("b") == [Dispatch(other, "b")]
    assert all(d.s.view("a").waiting == len(more) for _ in more)


def test_swap_delay_lets_a_busy_model_batch_its_own_requests_for_a_bounded_time() -> None:
    d = Driver(make(swap_delay=2.0))
    busy, _ = d.arrive("a")
    d.ready("a")
    d.arrive("b")
    assert not d.s.view("a").draining
    extra, decisions = d.arrive("a")
    assert decisions == [Dispatch(extra, "a")]  # still within the swap delay: batched
    assert d.s.next_wakeup() == pytest.approx(2.0)
    d.tick(2.0)
    assert d.s.view("a").draining
    _late, decisions = d.arrive("a")
    assert decisions == []
    d.finish(busy)
    assert d.finish(extra) == [Stop("a", "drained for a swap")]


def test_a_cancelled_waiter_ends_the_drain_it_caused() -> None:
    d = Driver(make())
    busy, _ = d.arrive("a")
    d.ready("a")
    waiting, _ = d.arrive("b")
    queued, _ = d.arrive("a")
    assert d.s.view("a").draining
    # The only request for 'b' goes away: 'a' takes its queued work again.
    assert d.finish(waiting) == [Dispatch(queued, "a")]
    assert not d.s.view("a").draining
    assert d.finish(busy) == []


def test_several_models_stay_resident_when_the_budget_allows() -> None:
    d = Driver(make(slots=2))
    a, _ = d.arrive("a")
    b, _ = d.arrive("b")
    assert d.log == [Start("a"), Start("b")]
    d.ready("a")
    d.ready("b")
    d.finish(a)
    d.finish(b)
    _c, decisions = d.arrive("c")
    assert decisions == [Stop("a", "making room for 'c'")]  # least recently used goes first


def test_a_model_larger_than_the_budget_fails_at_once() -> None:
    d = Driver(make(footprints={"a": {"gpu0": 90}}, budget={"gpu0": 80}))
    request, decisions = d.arrive("a")
    assert len(decisions) == 1 and isinstance(decisions[0], Fail)
    assert decisions[0].code == "model_too_large" and decisions[0].request_id == request


def test_shutdown_fails_waiters_stops_everything_and_refuses_new_work() -> None:
    d = Driver(make(slots=2))
    _a, _ = d.arrive("a")
    d.ready("a")
    b, _ = d.arrive("b")
    decisions = d.s.shutdown(d.now)
    assert Fail(b, FailReason.SHUTTING_DOWN, "the router is shutting down") in decisions
    assert {x.profile for x in decisions if isinstance(x, Stop)} == {"a", "b"}
    _, decisions = d.arrive("c")
    assert isinstance(decisions[0], Fail) and decisions[0].code == FailReason.SHUTTING_DOWN


def test_unload_waits_for_requests_in_flight_unless_forced() -> None:
    d = Driver(make())
    request, _ = d.arrive("a")
    d.ready("a")
    assert d.s.unload("a", d.now) == []
    assert d.finish(request) == [Stop("a", "unloaded once idle")]
    d.exited("a")
    request, _ = d.arrive("a")
    d.ready("a")
    assert d.s.unload("a", d.now, force=True) == [Stop("a", "unloaded")]


@pytest.mark.parametrize("placed", [False, True], ids=["fixed", "placed"])
@pytest.mark.parametrize("seed", range(60))
def test_invariants_hold_under_random_event_sequences(seed: int, placed: bool) -> None:
    """Budget never exceeded, busy models never stopped unasked, every request ends, one start per
    load, and the state always matches the processes, whatever management calls come when: load,
    unload, forced unload, reload, delete (and adding back), TTL, shutdown, and a load that completes
    after its stop was decided. Once the processes have done what they were told, nothing is left
    starting or stopping. `placed`: the profiles are placed over two GPUs (one needs both, split), and
    no device goes over its budget whatever the placements."""
    rng = random.Random(seed)
    names = ["a", "b", "c", "d"]
    footprints = {"a": {"gpu": 40}, "b": {"gpu": 30}, "c": {"gpu": 50}, "d": {"gpu": 20}}
    ttls = {"b": 4.0, "d": 1.5}
    budget = {"gpu0": 45, "gpu1": 45, "ram": 10} if placed else {"gpu": 80}

    def specs(present: Sequence[str]) -> list[ProfileSpec]:
        if placed:
            return [
                ProfileSpec(
                    name,
                    {"ram": 1},
                    10.0,
                    ttl=ttls.get(name),
                    placement=Placement(("gpu0", "gpu1"), footprints[name]["gpu"], split_extra=2),
                )
                for name in present
            ]
        return [ProfileSpec(name, footprints[name], 10.0, ttl=ttls.get(name)) for name in present]

    rules = Rules(drain_timeout=50.0, swap_delay=rng.choice([0, 3]))
    s = Scheduler(specs(names), budget, rules)
    d = Driver(s)
    dispatched: dict[int, str] = {}
    open_requests: set[int] = set()
    ended: set[int] = set()
    running: set[str] = set()  # processes alive (started, not yet exited)
    stopping: set[str] = set()
    configured = set(names)
    forced: set[str] = set()  # an operator forced these to stop, busy or not
    stale: set[int] = set()  # requests open on a process that has since been replaced
    shutdown_at = rng.choice([None, rng.randrange(100, 400)])
    events: dict[str, int] = {}

    def event(kind: str) -> None:
        events[kind] = events.get(kind, 0) + 1

    def apply(decisions: list[Decision]) -> None:
        for x in decisions:
            if isinstance(x, Dispatch):
                assert x.request_id in open_requests and x.request_id not in dispatched
                assert x.profile in running and x.profile not in stopping
                dispatched[x.request_id] = x.profile
            elif isinstance(x, Fail):
                assert x.request_id in open_requests and x.request_id not in dispatched
                open_requests.discard(x.request_id)
                ended.add(x.request_id)
            elif isinstance(x, Start):
                assert x.profile not in running, "a second start for a model already starting or running"
                assert (x.placed is not None) == placed
                if x.placed is not None:
                    event(f"placed: {x.placed.how}")
                running.add(x.profile)
                # Requests still open on its previous process (cut by a stop) are not this one's.
                stale.update(r for r, p in dispatched.items() if p == x.profile and r in open_requests)
            elif isinstance(x, Stop):
                assert x.profile in running and x.profile not in stopping, "a stop for no process"
                in_flight = [
                    r
                    for r, p in dispatched.items()
                    if p == x.profile and r in open_requests and r not in stale
                ]
                if in_flight and x.profile not in forced and x.reason != "shutdown":
                    assert "drain timeout" in x.reason, "a busy model was stopped without a timeout"
                stopping.add(x.profile)
                event(f"stop: {x.cause.value}")
        forced.clear()
        assert all(s.used()[device] <= amount for device, amount in budget.items()), s.used()
        consistent()

    def consistent() -> None:
        """Each model's state says what its process does: none (cold, failed), loading or serving
        (starting, ready), or told to stop and not yet gone (stopping)."""
        for view in s.views():
            if view.state is State.STOPPING:
                assert view.name in stopping, f"{view.name} stopping with no stop under way"
            elif view.state in (State.STARTING, State.READY):
                assert view.name in running and view.name not in stopping, (view.name, view.state)
            else:
                assert view.name not in running, f"{view.name} {view.state} while its process lives"

    def end_in_flight(profile: str) -> None:
        for rid, prof in dispatched.items():
            if prof == profile and rid in open_requests:
                open_requests.discard(rid)
                ended.add(rid)
                apply(d.finish(rid))

    for step in range(400):
        d.now += rng.choice([0.0, 0.1, 0.5, 2.0])
        apply(d.s.tick(d.now))
        if step == shutdown_at:
            event("shutdown")
            apply(d.s.shutdown(d.now))
        roll = rng.random()
        live = sorted(configured)
        if roll < 0.3:
            # Some requests reached the router a moment before the scheduler hears of them.
            early = rng.choice([0.0, 0.0, 0.05, 0.3])
            rid, decisions = d.arrive(rng.choice(live), wait=rng.choice([5.0, 60.0]), arrived=d.now - early)
            open_requests.add(rid)
            apply(decisions)
        elif roll < 0.5 and dispatched:
            candidates = [r for r in dispatched if r in open_requests]
            if candidates:
                rid = rng.choice(candidates)
                open_requests.discard(rid)
                ended.add(rid)
                apply(d.finish(rid))
        elif roll < 0.65:
            starting = [p for p in sorted(running) if p not in stopping and s.view(p).state is State.STARTING]
            if starting:
                apply(d.ready(rng.choice(starting)))
        elif roll < 0.75:
            if stopping:
                profile = rng.choice(sorted(stopping))
                stopping.discard(profile)
                running.discard(profile)
                apply(d.exited(profile))
                end_in_flight(profile)  # requests cut by a drain timeout or a forced stop end too
        elif roll < 0.78:
            starting = [p for p in sorted(running) if p not in stopping and s.view(p).state is State.STARTING]
            if starting:
                profile = rng.choice(starting)
                running.discard(profile)
                apply(d.exited(profile, "crashed during load"))
        elif roll < 0.84:
            # Unload, or forced unload, at any moment: queued, spawning, loading, serving, stopping.
            profile = rng.choice(live)
            force = rng.random() < 0.5
            event(f"unload {s.view(profile).state.value}{' forced' if force else ''}")
            if force:
                forced.add(profile)
            apply(d.s.unload(profile, d.now, force=force))
        elif roll < 0.88:
            # A load that completes after its stop was decided (the stop came while it spawned or
            # loaded): the process still has to go, and the model is not served from it.
            late = [p for p in stopping if p in configured]
            if late:
                profile = rng.choice(sorted(late))
                event("ready after stop")
                assert d.ready(profile) == []
                assert s.view(profile).state is State.STOPPING
        elif roll < 0.91:
            # Reload with a changed command: the model restarts once idle.
            profile = rng.choice(live)
            event(f"reload {s.view(profile).state.value}")
            apply(d.s.reconfigure(specs(live), budget, d.now))
            apply(d.s.restart_when_idle(profile, d.now))
        elif roll < 0.95:
            # Delete a model (its requests are told, its process drains and stops), or add it back.
            absent = [name for name in names if name not in configured]
            if absent and rng.random() < 0.5:
                configured.add(rng.choice(absent))
                event("add back")
            elif len(configured) > 1:
                gone = rng.choice(live)
                configured.discard(gone)
                event(f"delete {s.view(gone).state.value}")
            apply(d.s.reconfigure(specs(sorted(configured)), budget, d.now))
        if step % 50 == 0:
            for p in sorted(running):  # a crash of something running now and then
                if p not in stopping and rng.random() < 0.1 and s.view(p).state is State.READY:
                    running.discard(p)
                    apply(d.exited(p, "crashed"))
                    end_in_flight(p)

    # Let everything finish: no request may be left waiting forever, no model starting or stopping.
    for _ in range(200):
        d.now += 5.0
        apply(d.s.tick(d.now))
        for rid in [r for r in dispatched if r in open_requests]:
            open_requests.discard(rid)
            ended.add(rid)
            apply(d.finish(rid))
        for p in [p for p in sorted(running) if p not in stopping and s.view(p).state is State.STARTING]:
            apply(d.ready(p))
        for p in sorted(stopping):
            stopping.discard(p)
            running.discard(p)
            apply(d.exited(p))
            end_in_flight(p)
        if not open_requests and not stopping and State.STARTING not in {v.state for v in s.views()}:
            break
    assert not open_requests, f"requests never answered: {sorted(open_requests)}"
    assert s.queue_depth == 0
    assert not stopping
    assert {view.name for view in s.views()} == configured, "a deleted model lingers or an added one is lost"
    assert all(view.state in (State.COLD, State.READY, State.FAILED) for view in s.views()), s.views()
    if shutdown_at is not None:
        assert not running, "shutdown left a process behind"
    assert events  # the management calls were really made (their mix is in `events`)
    if placed:
        assert any(kind.startswith("placed") for kind in events)


# ---------------------------------------------------------------------------------------------- memory


def gib(n: float) -> dict[str, int]:
    return {"gpu0": int(n * 1024)}


def memory_scheduler(sizes: dict[str, float], budget: float, **options: object) -> tuple[Scheduler, Driver]:
    pinned = set(options.pop("pinned", ()))  # type: ignore[call-overload]
    standby = set(options.pop("standby", ()))  # type: ignore[call-overload]
    priority: dict[str, int] = options.pop("priority", {})  # type: ignore[assignment]
    ttl: dict[str, float] = options.pop("ttl", {})  # type: ignore[assignment]
    specs = [
        ProfileSpec(
            name,
            gib(size),
            10.0,
            pinned=name in pinned,
            standby=name in standby,
            priority=priority.get(name, 0),
            ttl=ttl.get(name),
        )
        for name, size in sizes.items()
    ]
    scheduler = Scheduler(specs, gib(budget), Rules(drain_timeout=30.0, **options))  # type: ignore[arg-type]
    return scheduler, Driver(scheduler)


def load(d: Driver, profile: str) -> None:
    """Serve one request on `profile` to completion, playing the supervisor for any swap."""
    request, decisions = d.arrive(profile)
    for _ in range(10):
        stops = [x.profile for x in decisions if isinstance(x, Stop)]
        starts = [x.profile for x in decisions if isinstance(x, Start)]
        if any(isinstance(x, Dispatch) and x.request_id == request for x in decisions):
            break
        decisions = []
        for name in stops:
            decisions += d.exited(name)
        for name in starts:
            decisions += d.ready(name)
        if not stops and not starts:
            decisions += d.ready(profile) if d.state(profile) is State.STARTING else []
    d.finish(request)


def resident(s: Scheduler) -> set[str]:
    return {v.name for v in s.views() if v.state in (State.STARTING, State.READY)}


def test_every_model_that_fits_stays_resident() -> None:
    s, d = memory_scheduler({"a": 30, "b": 30, "c": 30}, budget=100)
    for name in ("a", "b", "c", "a", "b"):
        load(d, name)
    assert resident(s) == {"a", "b", "c"}
    assert [x for x in d.log if isinstance(x, Stop)] == []
    assert sum(v.starts for v in s.views()) == 3


def test_only_as_many_idle_models_as_needed_are_evicted_least_recently_used_first() -> None:
    s, d = memory_scheduler({"a": 40, "b": 30, "c": 20, "big": 35}, budget=100)
    for name in ("a", "b", "c", "b", "c"):
        load(d, name)
    # 90 used; 'big' needs 35: evicting 'a' (least recently used) alone is enough.
    _, decisions = d.arrive("big")
    assert decisions == [Stop("a", "making room for 'big'")]
    assert d.exited("a") == [Start("big")]
    assert resident(s) == {"b", "c", "big"}


def test_the_new_model_starts_as_soon_as_its_memory_is_free() -> None:
    _s, d = memory_scheduler({"a": 40, "b": 40, "big": 70}, budget=100)
    load(d, "a")
    load(d, "b")
    _, decisions = d.arrive("big")
    assert {x.profile for x in decisions if isinstance(x, Stop)} == {"a", "b"}
    assert d.exited("a") == []  # 60 free: not enough yet
    assert d.exited("b") == [Start("big")]


def test_pinned_models_are_never_evicted_and_priority_orders_eviction() -> None:
    _s, d = memory_scheduler(
        {"pin": 30, "low": 30, "high": 30, "new": 30}, budget=100, pinned={"pin"}, priority={"high": 5}
    )
    for name in ("high", "low", "pin"):  # 'high' is least recently used
        load(d, name)
    _, decisions = d.arrive("new")
    assert decisions == [Stop("low", "making room for 'new'")]


def test_a_model_that_cannot_fit_beside_pinned_models_fails_with_a_reason() -> None:
    s, d = memory_scheduler({"pin": 60, "big": 50}, budget=100, pinned={"pin"})
    load(d, "pin")
    _request, decisions = d.arrive("big")
    assert len(decisions) == 1 and isinstance(decisions[0], Fail)
    assert decisions[0].code == "model_too_large"
    message = decisions[0].message
    assert message.startswith("model 'big' needs gpu0 ") and "more than the budget (gpu0 " in message
    assert message.endswith("leaves beside pinned models; resident now: 'pin' (pinned) gpu0 0 MiB")
    assert resident(s) == {"pin"}


def test_the_previous_model_stays_warm_after_a_swap_when_it_still_fits() -> None:
    s, d = memory_scheduler({"a": 40, "b": 40, "c": 40}, budget=100)
    load(d, "a")
    load(d, "b")
    load(d, "c")  # evicts 'a' (least recently used); 'b' stays warm
    assert resident(s) == {"b", "c"}
    load(d, "b")
    assert sum(1 for x in d.log if isinstance(x, Start) and x.profile == "b") == 1


def test_standby_profiles_are_preloaded_into_free_memory() -> None:
    s, d = memory_scheduler({"a": 40, "warm": 40}, budget=100, standby={"warm"})
    _, decisions = d.arrive("a")
    assert decisions == [Start("a"), Start("warm")]
    d.ready("warm")
    assert s.view("warm").standby


def test_a_preload_gives_way_at_once_to_real_demand() -> None:
    s, d = memory_scheduler({"a": 60, "warm": 60}, budget=100, standby={"warm"})
    assert s.tick(0.0) == [Start("warm")]
    _, decisions = d.arrive("a")
    assert decisions == [Stop("warm", "preload gave way to 'a'")]
    assert d.exited("warm") == [Start("a")]  # and it is not preloaded again while 'a' needs the room
    assert resident(s) == {"a"}


def test_preloads_never_take_memory_someone_is_waiting_for() -> None:
    s, d = memory_scheduler({"a": 50, "b": 80, "warm": 30}, budget=100, standby={"warm"})
    busy, decisions = d.arrive("a")
    assert decisions == [Start("a"), Start("warm")]
    d.ready("a")
    d.ready("warm")
    _, decisions = d.arrive("b")  # needs 80: the idle standby goes, busy 'a' drains
    assert decisions == [Stop("warm", "making room for 'b'")]
    assert d.exited("warm") == []  # 'b' still waits for 'a': no preload takes the room meanwhile
    assert d.finish(busy) == [Stop("a", "drained for a swap")]
    assert d.exited("a") == [Start("b")]
    assert resident(s) == {"b"}


def test_a_smaller_idle_model_is_not_stopped_when_a_larger_victim_already_makes_room() -> None:
    s, d = memory_scheduler({"small": 30, "large": 50, "new": 60}, budget=100)
    load(d, "small")
    d.now = 1.0
    busy, _ = d.arrive("large")
    d.ready("large")
    d.now = 2.0
    # 'small' comes first in the eviction order, yet 'large' must go whatever happens, and its
    # room alone is enough (30 + 60 fits): 'small' stays and keeps serving.
    _, decisions = d.arrive("new")
    assert decisions == []
    assert d.s.view("large").draining and d.s.view("small").state is State.READY
    assert d.finish(busy) == [Stop("large", "drained for a swap")]
    assert d.exited("large") == [Start("new")]
    assert resident(s) == {"small", "new"}
    request, decisions = d.arrive("small")
    assert decisions == [Dispatch(request, "small")]


def test_ttl_unloads_an_idle_model_but_never_a_busy_one() -> None:
    s, d = memory_scheduler({"a": 10}, budget=100, ttl={"a": 60.0})
    request, _ = d.arrive("a")
    d.ready("a")
    assert d.tick(100.0) == []  # busy: no ttl
    d.finish(request)
    assert s.next_wakeup() == pytest.approx(160.0)
    assert d.tick(159.0) == []
    assert d.tick(160.0) == [Stop("a", "idle for its ttl (60s)")]


def test_a_measured_footprint_replaces_the_estimate_and_restores_the_budget() -> None:
    s, d = memory_scheduler({"a": 30, "b": 30, "c": 30}, budget=100)
    for name in ("a", "b", "c"):
        load(d, name)
    decisions = s.footprint_measured("c", gib(60), d.now)
    assert decisions == [Stop("a", "over budget once 'c' measured its use")]
    assert s.view("c").footprint == gib(60)


def test_an_over_budget_measurement_stops_only_models_that_free_the_short_device() -> None:
    specs = [
        ProfileSpec("cpu", {"ram": 30}, 10.0),  # least recently used, but holds no GPU memory
        ProfileSpec("gpu", {"gpu0": 30}, 10.0),
        ProfileSpec("new", {"gpu0": 30}, 10.0),
    ]
    s = Scheduler(specs, {"gpu0": 100, "ram": 100}, Rules(drain_timeout=30.0))
    d = Driver(s)
    for name in ("cpu", "gpu", "new"):
        load(d, name)
    decisions = s.footprint_measured("new", {"gpu0": 80}, d.now)
    assert decisions == [Stop("gpu", "over budget once 'new' measured its use")]
    assert s.view("cpu").state is State.READY


def test_the_eviction_rule_is_the_same_for_every_need() -> None:
    """Preloads, then idle models by priority and age, then busy ones only when draining is allowed;
    pinned never, and nobody once the need fits."""
    s, d = memory_scheduler(
        {"old": 20, "low": 20, "busy": 20, "pin": 20, "warm": 10},
        budget=100,
        pinned={"pin"},
        priority={"old": 1},
        standby={"warm"},
    )
    first, decisions = d.arrive("old")
    assert decisions == [Start("old"), Start("warm")]  # a preload into the memory left over
    d.ready("old")
    d.finish(first)
    for name in ("low", "pin"):
        load(d, name)
    d.arrive("busy")
    d.ready("busy")
    assert s.view("warm").state is State.STARTING
    slots = {slot.spec.name: slot for slot in s._slots.values()}
    everyone = list(slots.values())
    order = ["warm", "low", "old", "busy"]
    assert [
        v.spec.name for v in choose_victims(everyone, gib(100), s.used(), gib(100), drain_busy=True)
    ] == order
    assert [
        v.spec.name for v in choose_victims(everyone, gib(100), s.used(), gib(100), drain_busy=False)
    ] == order[:3]
    assert [v.spec.name for v in choose_victims(everyone, gib(20), s.used(), gib(100), drain_busy=True)] == [
        "warm"
    ]
    assert choose_victims(everyone, gib(10), s.used(), gib(100), drain_busy=True) == []


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        (FailReason.SHUTTING_DOWN, 503),
        (FailReason.TOO_MANY_WAITING, 429),
        (FailReason.MODEL_LOAD_FAILED, 503),
        (FailReason.MODEL_FAILED, 503),
        (FailReason.MODEL_LOAD_TIMEOUT, 503),
        (FailReason.MODEL_WAIT_TIMEOUT, 503),
        (FailReason.MODEL_TOO_LARGE, 503),
        (FailReason.MODEL_REMOVED, 503),
        (FailReason.MODEL_UNLOADED, 503),
    ],
)
def test_each_refusal_reaches_clients_with_its_status_and_code(reason: FailReason, status: int) -> None:
    error = refusal(Fail(7, reason, "why", retry_after=3.0))
    assert (error.status, error.code, error.message, error.retry_after) == (status, reason.value, "why", 3.0)
    assert error.body()["error"]["code"] == reason.value


@dataclasses.dataclass
class Loop:
    starts: int
    served: int
    longest_wait: float  # from a request's arrival to its dispatch


def closed_loop_swaps(
    budget: float, swap_delay: float, duration: float = 10.0, gap: float = 0.0, service: float = 0.05
) -> Loop:
    """Two clients, one per model, each sending its next request `gap` seconds after the last one
    ended; each request takes `service` seconds, each load 0.05 s and each stop 0.01 s."""
    s, _ = memory_scheduler({"a": 60, "b": 60}, budget=budget, swap_delay=swap_delay)
    now, next_id, served, longest = 0.0, 0, 0, 0.0
    arrived: dict[int, float] = {}
    events: list[tuple[float, str, str, int]] = []  # (time, kind, profile, request)

    def act(decisions: list[Decision]) -> None:
        nonlocal longest
        for x in decisions:
            if isinstance(x, Dispatch):
                longest = max(longest, now - arrived[x.request_id])
                events.append((now + service, "finish", x.profile, x.request_id))
            elif isinstance(x, Start):
                events.append((now + 0.05, "ready", x.profile, 0))
            elif isinstance(x, Stop):
                events.append((now + 0.01, "exit", x.profile, 0))

    def send(profile: str) -> None:
        nonlocal next_id
        next_id += 1
        arrived[next_id] = now
        act(s.request_arrived(next_id, profile, now, now + 600))

    send("a")
    send("b")
    while events:
        events.sort()
        wake = s.next_wakeup()
        if wake is not None and wake < events[0][0]:
            now = wake
            act(s.tick(now))
            continue
        now, kind, profile, request = events.pop(0)
        if now > duration:
            break
        if kind == "finish":
            served += 1
            act(s.request_finished(request, now))
            if gap:
                events.append((now + gap, "send", profile, 0))
            else:
                send(profile)
        elif kind == "send":
            send(profile)
        elif kind == "ready":
            act(s.process_ready(profile, now))
        else:
            act(s.process_exited(profile, now, "stopped"))
    return Loop(sum(v.starts for v in s.views()), served, longest)


def test_no_swaps_after_warm_up_when_both_models_fit() -> None:
    loop = closed_loop_swaps(budget=130, swap_delay=0.0)
    assert loop.starts == 2
    assert loop.served > 300


def test_swap_delay_batches_requests_instead_of_swapping_on_each_one() -> None:
    eager = closed_loop_swaps(budget=100, swap_delay=0.0)
    batched = closed_loop_swaps(budget=100, swap_delay=2.0)
    assert eager.starts > 50  # one swap per request
    assert batched.starts <= 7  # about one swap per swap_delay
    assert batched.served > 2 * eager.served


@pytest.mark.parametrize("gap", [0.002, 0.03])
def test_closed_loop_clients_stay_batched(gap: float) -> None:
    """A client that comes back within the minimum grace keeps its model, and its gap, measured while
    its model stays loaded, becomes its rhythm: swaps stay about one per `swap_delay`."""
    eager = closed_loop_swaps(budget=100, swap_delay=0.0, gap=gap)
    batched = closed_loop_swaps(budget=100, swap_delay=2.0, gap=gap)
    assert eager.starts > 50 and batched.starts <= 8


def test_fast_closed_loop_clients_on_two_models_batch_a_thousand_requests_per_swap() -> None:
    """Two clients in a tight loop on two models that do not fit together (answers of 1 ms), at the
    default `swap_delay`: each swap carries on the order of thousands of requests, not a handful."""
    loop = closed_loop_swaps(budget=100, swap_delay=2.0, service=0.001)
    swaps = loop.starts - 2
    assert swaps > 0 and loop.served / swaps >= 1000


@pytest.mark.parametrize("gap", [0.002, 0.03, 0.2])
def test_the_waiting_closed_loop_client_is_served_within_swap_delay(gap: float) -> None:
    """Whatever the other client's rhythm, the client waiting for the other model never waits longer
    than `swap_delay`, a drain beside its swaps."""
    batched = closed_loop_swaps(budget=100, swap_delay=2.0, gap=gap)
    # swap_delay, one request's drain, and at worst two swaps (its own model was stopping as it came).
    assert batched.longest_wait <= 2.0 + 0.05 + 2 * (0.01 + 0.05) + 1e-9


def test_a_pause_that_spans_the_model_being_swapped_out_is_not_its_clients_rhythm() -> None:
    """Requests for a, b, a one after the other, then a burst for b while a sits idle: the time a was
    away (unloaded, b served, a loading again) is not a pause of a's client, so a keeps only the
    minimum grace and b waits for its swap alone, not for a grace grown toward `swap_delay`."""
    d = Driver(make(swap_delay=2.0))
    first, _ = d.arrive("a")
    d.now += 0.1
    d.ready("a")
    d.now += 0.01
    d.finish(first)
    for model, other in (("b", "a"), ("a", "b")):
        d.now += 0.001
        request, _ = d.arrive(model)
        wake = d.s.next_wakeup()
        assert wake is not None
        assert d.tick(wake) == [Stop(other, f"making room for {model!r}")]
        d.now += 0.01
        assert d.exited(other) == [Start(model)]
        d.now += 0.1
        assert d.ready(model) == [Dispatch(request, model)]
        d.now += 0.01
        d.finish(request)
    d.now += 0.001
    burst = [d.arrive("b")[0] for _ in range(20)]
    wake = d.s.next_wakeup()
    assert wake is not None and wake - d.now <= GRACE_MIN + 1e-9
    assert d.tick(wake) == [Stop("a", "making room for 'b'")]
    assert d.exited("a") == [Start("b")]
    assert d.ready("b") == [Dispatch(request, "b") for request in burst]


def test_an_idle_model_whose_clients_have_no_measured_rhythm_gets_the_minimum_grace() -> None:
    """Rounds of: one request brings a back (b goes), then 10 requests for a and 10 for b at once. a's
    clients last asked before a was swapped out, which measures no rhythm, so in every round b's
    requests wait for a's answers, the minimum grace and the swap, never for a grace grown from the
    time a was away."""
    d = Driver(make(swap_delay=2.0))
    warm, _ = d.arrive("a")
    d.ready("a")
    for round_ in range(3):
        if round_:
            d.now += 0.001
            warm, _ = d.arrive("a")
            wake = d.s.next_wakeup()
            assert wake is not None and wake - d.now <= GRACE_MIN + 1e-9
            assert d.tick(wake) == [Stop("b", "making room for 'a'")]
            d.now += 0.05
            d.exited("b")
            d.now += 0.1
            assert d.ready("a") == [Dispatch(warm, "a")]
        d.now += 0.01
        d.finish(warm)
        d.now += 0.001
        for_a = [d.arrive("a")[0] for _ in range(10)]
        for_b = [d.arrive("b")[0] for _ in range(10)]
        for request in for_a:
            d.now += 0.01
            d.finish(request)
        wake = d.s.next_wakeup()
        assert wake is not None and wake - d.now <= GRACE_MIN + 1e-9
        assert d.tick(wake) == [Stop("a", "making room for 'b'")]
        d.now += 0.05
        assert d.exited("a") == [Start("b")]
        d.now += 0.1
        assert d.ready("b") == [Dispatch(request, "b") for request in for_b]
        for request in for_b:
            d.now += 0.01
            d.finish(request)


@pytest.mark.parametrize("swap_delay", [0.0, 2.0])
def test_requests_for_the_loaded_model_that_came_before_the_other_models_first_are_served_before_it_drains(
    swap_delay: float,
) -> None:
    """An interleaved burst reaches the scheduler a little after the router: the requests for the
    loaded model that reached the router before the first one for the other model are dispatched to
    it even once it drains (with `swap_delay: 0` at once); those that came after wait for the swap
    back, and the drain ends as soon as the ones it serves are answered."""
    d = Driver(make(swap_delay=swap_delay))
    warm, _ = d.arrive("a")
    d.ready("a")
    d.finish(warm)
    d.now = 10.0
    first, decisions = d.arrive("a", arrived=9.990)
    assert decisions == [Dispatch(first, "a")]
    for_b, _ = d.arrive("b", arrived=9.991)
    d.tick(10.0 + swap_delay)  # a drains: it is busy, and b has waited its swap_delay
    assert d.s.view("a").draining
    d.now += 0.001
    earlier = []
    for i in range(1, 5):
        request, decisions = d.arrive("a", arrived=9.990 + i * 0.0002)
        assert decisions == [Dispatch(request, "a")]
        earlier.append(request)
    later, decisions = d.arrive("a", arrived=9.992)
    assert decisions == []  # came after b's: waits for the swap back
    for request in (first, *earlier):
        d.finish(request)
    assert d.state("a") is State.STOPPING
    assert d.exited("a") == [Start("b")]
    assert d.ready("b") == [Dispatch(for_b, "b")]
    d.finish(for_b)  # b's lone request answered: a comes back for the one that came after
    d.tick(d.now + GRACE_MIN)
    assert d.state("b") is State.STOPPING
    assert d.exited("b") == [Start("a")]
    assert d.ready("a") == [Dispatch(later, "a")]


def test_an_interleaved_burst_swaps_as_soon_as_the_loaded_models_burst_is_done() -> None:
    d = Driver(make(swap_delay=2.0))
    first, _ = d.arrive("a")
    d.ready("a")
    d.finish(first)
    d.now = 60.0  # much later, a burst for the loaded model and another, interleaved
    burst_a: list[int] = []
    burst_b: list[int] = []
    for _ in range(10):
        request, decisions = d.arrive("a")
        assert decisions == [Dispatch(request, "a")]
        burst_a.append(request)
        burst_b.append(d.arrive("b")[0])
    for request in burst_a:  # 'a' answers them one after another
        d.now += 0.01
        d.finish(request)
    wake = d.s.next_wakeup()
    assert wake is not None and wake - d.now <= GRACE_MIN  # not the whole swap_delay
    assert d.tick(wake) == [Stop("a", "making room for 'b'")]
    assert d.exited("a") == [Start("b")]
    assert d.ready("b") == [Dispatch(request, "b") for request in burst_b]


def test_one_client_switching_models_is_not_kept_waiting_for_its_own_turnaround() -> None:
    """A chat that moves from one model to another on the same connection: the first model has
    answered and its client went elsewhere, so the swap starts at once, even after a closed loop
    taught the scheduler to wait for that client's next request."""
    d = Driver(make(swap_delay=2.0))
    first, _ = d.arrive("a", client="conn-1")
    d.ready("a")
    for _ in range(3):  # a closed loop on 'a': its rhythm is learned
        d.now += 0.001
        d.finish(first)
        d.now += 0.001
        first, _ = d.arrive("a", client="conn-1")
    d.now += 0.05
    d.finish(first)
    d.now += 0.001
    switched, decisions = d.arrive("b", client="conn-1")
    assert decisions == [Stop("a", "making room for 'b'")]
    assert d.exited("a") == [Start("b")]
    assert d.ready("b") == [Dispatch(switched, "b")]


def test_another_clients_request_leaves_the_loaded_model_its_grace() -> None:
    """The same shape from a different connection is the other client of a closed loop: the loaded
    model keeps its short grace for its own client's next request."""
    d = Driver(make(swap_delay=2.0))
    first, _ = d.arrive("a", client="conn-1")
    d.ready("a")
    d.now += 0.05
    d.finish(first)
    d.now += 0.001
    _, decisions = d.arrive("b", client="conn-2")
    assert decisions == []
    wake = d.s.next_wakeup()
    assert wake is not None and 0 < wake - d.now <= GRACE_MIN


def test_a_client_counts_as_moving_on_only_from_the_model_that_served_it_last() -> None:
    """'a' served conn-1, then conn-2: conn-1 asking for another model is not 'a''s client moving on
    ('a' keeps its grace for conn-2), while conn-2 doing so is."""
    d = Driver(make(swap_delay=2.0))
    first, _ = d.arrive("a", client="conn-1")
    d.ready("a")
    d.now += 0.05
    d.finish(first)
    second, _ = d.arrive("a", client="conn-2")
    d.now += 0.05
    d.finish(second)
    d.now += 0.001
    _, decisions = d.arrive("b", client="conn-1")
    assert decisions == []
    wake = d.s.next_wakeup()
    assert wake is not None and 0 < wake - d.now <= GRACE_MIN
    _, decisions = d.arrive("c", client="conn-2")
    assert decisions == [Stop("a", "making room for 'b'")], "its last client went elsewhere"


def test_a_model_held_for_its_client_goes_at_once_when_that_client_turns_to_a_loaded_model() -> None:
    """'b' is held for its closed-loop client while 'c' waits for its memory; that client then asks
    for 'a', which is loaded and answers at once: 'b' stops in the same step, not when the grace it
    was held for would have ended (no timer was set for the earlier time)."""
    d = Driver(make(("a", "b", "c"), swap_delay=2.0, slots=2))
    d.arrive("a", client="conn-9")  # 'a' stays busy: 'b' is the one to make way
    d.ready("a")
    loop, _ = d.arrive("b", client="conn-1")
    d.ready("b")
    for _ in range(3):  # a closed loop with 0.2 s between requests: 'b' is held a while for it
        d.now += 0.01
        d.finish(loop)
        d.now += 0.2
        loop, _ = d.arrive("b", client="conn-1")
    d.now += 0.01
    d.finish(loop)
    d.now += 0.01
    _, decisions = d.arrive("c", client="conn-2")
    assert decisions == []
    d.now += 0.01
    switched, decisions = d.arrive("a", client="conn-1")
    assert decisions == [Dispatch(switched, "a"), Stop("b", "making room for 'c'")]


# ---------------------------------------------------------------------------------------------- reload


def test_reload_keeps_unchanged_models_adds_new_ones_and_drains_removed_ones() -> None:
    s, d = memory_scheduler({"keep": 10, "gone": 10}, budget=100)
    load(d, "keep")
    busy, _ = d.arrive("gone")
    d.ready("gone")
    specs = [ProfileSpec("keep", gib(10), 10.0), ProfileSpec("new", gib(10), 10.0)]
    assert s.reconfigure(specs, gib(100), d.now) == []  # 'gone' is busy: it drains first
    assert [v.name for v in s.views()] == ["keep", "new"]
    assert s.view("keep").state is State.READY
    assert d.finish(busy) == [Stop("gone", "unloaded once idle")]
    d.exited("gone")
    with pytest.raises(KeyError):
        s.view("gone")


def test_reload_fails_requests_waiting_for_a_removed_model() -> None:
    s, d = memory_scheduler({"a": 10}, budget=100)
    request, _ = d.arrive("a")
    decisions = s.reconfigure([], gib(100), d.now)
    assert Fail(request, FailReason.MODEL_REMOVED, "model 'a' was removed from the config") in decisions


def test_a_changed_model_restarts_once_its_requests_are_done() -> None:
    s, d = memory_scheduler({"a": 10}, budget=100)
    busy, _ = d.arrive("a")
    d.ready("a")
    assert s.restart_when_idle("a", d.now) == []
    queued, _ = d.arrive("a")  # waits for the new process
    assert d.finish(busy) == [Stop("a", "unloaded once idle")]
    assert d.exited("a") == [Start("a")]
    assert d.ready("a") == [Dispatch(queued, "a")]


# ---------------------------------------------------------------------------------------------- failures


def failing(max_failures: int = 3) -> Driver:
    return Driver(
        Scheduler(
            [ProfileSpec("a", {"slots": 1}, 10.0), ProfileSpec("b", {"slots": 1}, 10.0)],
            {"slots": 2},
            Rules(drain_timeout=30.0, max_failures=max_failures, failure_window=60.0, backoff=1.0),
        )
    )


def test_a_crash_loop_backs_off_then_fails_with_the_reason() -> None:
    d = failing(max_failures=3)
    request, _ = d.arrive("a")
    assert d.exited("a", "exit 1: bad magic") == []  # the request keeps waiting: back off, retry
    assert d.s.view("a").retry_at == pytest.approx(1.0)
    assert d.tick(0.9) == []
    assert d.tick(1.0) == [Start("a")]
    assert d.exited("a", "exit 1: bad magic") == []
    assert d.s.view("a").retry_at == pytest.approx(3.0)  # doubled
    assert d.tick(3.0) == [Start("a")]
    (fail,) = d.exited("a", "exit 1: bad magic")
    assert isinstance(fail, Fail) and fail.request_id == request and fail.code == FailReason.MODEL_LOAD_FAILED
    assert "3 times" in fail.message and "bad magic" in fail.message
    assert d.s.view("a").failed
    # A later request tries once more, at once.
    _, decisions = d.arrive("a")
    assert decisions == [Start("a")]
    (fail,) = d.exited("a", "exit 1: bad magic")
    assert isinstance(fail, Fail)


def test_requests_beyond_max_waiting_are_refused_and_a_loaded_model_still_serves() -> None:
    d = Driver(
        Scheduler([ProfileSpec(n, {"slots": 1}, 10.0) for n in "ab"], {"slots": 2}, Rules(drain_timeout=30.0))
    )
    d.s.retune(dataclasses.replace(d.s.rules, max_waiting=2))
    first, _ = d.arrive("a")
    second, _ = d.arrive("a")
    third, decisions = d.arrive("a")
    (fail,) = decisions
    assert isinstance(fail, Fail) and (fail.request_id, fail.code) == (third, FailReason.TOO_MANY_WAITING)
    assert fail.retry_after == 1.0 and "max_waiting" in fail.message
    assert d.s.queue_depth == 2, "the refused request is not queued"
    assert d.ready("a") == [Dispatch(first, "a"), Dispatch(second, "a")]
    for _ in range(3):  # a model that takes requests at once is not held to the limit
        request, decisions = d.arrive("a")
        assert decisions == [Dispatch(request, "a")]


def test_a_request_giving_up_during_a_back_off_is_told_when_the_retry_comes() -> None:
    d = Driver(
        Scheduler(
            [ProfileSpec("a", {"slots": 1}, 10.0)],
            {"slots": 1},
            Rules(drain_timeout=30.0, max_failures=3, backoff=10.0),
        )
    )
    request, _ = d.arrive("a", wait=3.0)
    d.exited("a", "exit 1: crash")
    assert d.s.view("a").retry_at == pytest.approx(10.0)
    (fail,) = d.tick(3.0)
    assert isinstance(fail, Fail) and (fail.request_id, fail.code) == (request, "model_wait_timeout")
    assert fail.retry_after == pytest.approx(7.0)


def test_failures_outside_the_window_are_forgotten() -> None:
    d = failing(max_failures=2)
    d.arrive("a")
    d.exited("a", "crash")
    d.tick(1.0)
    d.ready("a")
    d.now = 100.0  # long after: the first failure no longer counts
    d.exited("a", "crash")
    assert not d.s.view("a").failed
    assert d.s.view("a").retry_at == pytest.approx(101.0)


def test_an_out_of_memory_load_evicts_idle_models_and_retries_once() -> None:
    s, d = memory_scheduler({"a": 40, "b": 30, "c": 30}, budget=100)
    load(d, "a")
    load(d, "b")
    request, decisions = d.arrive("c")
    assert decisions == [Start("c")]
    decisions = d._take(s.process_exited("c", d.now, "cudaMalloc failed: out of memory", out_of_memory=True))
    assert {x.profile for x in decisions if isinstance(x, Stop)} == {"a", "b"}
    assert not [x for x in decisions if isinstance(x, Start)]  # not before their memory is free
    d.exited("a")
    assert d.exited("b") == [Start("c")]
    decisions = d._take(s.process_exited("c", d.now, "cudaMalloc failed: out of memory", out_of_memory=True))
    assert [x.request_id for x in decisions if isinstance(x, Fail)] == [request]  # never retried twice


def test_a_request_outliving_its_removed_profile_finishes_quietly() -> None:
    s, d = memory_scheduler({"a": 10, "b": 10}, budget=100, max_failures=1)
    request, _ = d.arrive("a")
    d.ready("a")
    d.exited("a", "crashed while serving")  # the request is still being answered with an error
    s.reconfigure([ProfileSpec("b", gib(10), 10.0)], gib(100), d.now)
    assert d.finish(request) == []
    assert [v.name for v in s.views()] == ["b"]
