"""The decision core: which model to start, stop, or send a request to.

Pure and synchronous on purpose: no asyncio, no I/O and no clock of its own (every event carries
`now`), so each rule can be tested with plain function calls. Events go in, decisions come out; the
controller turns decisions into processes and HTTP.

Resources are generic: each profile has a footprint (units per device) and each device a budget.
With no memory information the core runs in "slots" mode: every profile takes one slot and the budget
is `max_resident` slots.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

Resources = Mapping[str, int]


class State(str, enum.Enum):
    COLD = "cold"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


# ---------------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Dispatch:
    """Send request `request_id` to the running upstream of `profile`."""

    request_id: int
    profile: str


@dataclass(frozen=True)
class Start:
    """Spawn the upstream of `profile`."""

    profile: str


@dataclass(frozen=True)
class Stop:
    """Stop the upstream of `profile`; `reason` is for logs and events."""

    profile: str
    reason: str


@dataclass(frozen=True)
class Fail:
    """Answer request `request_id` with an error instead of an upstream."""

    request_id: int
    status: int
    code: str
    message: str


Decision = Dispatch | Start | Stop | Fail


# ---------------------------------------------------------------------------------------------- state


@dataclass(frozen=True)
class ProfileSpec:
    """What the scheduler needs to know of a profile."""

    name: str
    footprint: Resources
    load_timeout: float


@dataclass
class _Request:
    request_id: int
    profile: str
    arrived: float
    deadline: float
    dispatched: bool = False


@dataclass
class _Slot:
    spec: ProfileSpec
    state: State = State.COLD
    in_flight: set[int] = field(default_factory=set)
    waiting: deque[int] = field(default_factory=deque)
    last_used: float = float("-inf")
    load_deadline: float | None = None
    wanted_since: float | None = None  # another profile waits for this one's resources
    draining_since: float | None = None  # takes no new requests; stops once idle
    stop_is_failure: bool = False
    last_error: str = ""
    starts: int = 0

    @property
    def holds_resources(self) -> bool:
        return self.state in (State.STARTING, State.READY, State.STOPPING)

    @property
    def accepting(self) -> bool:
        return self.state is State.READY and self.draining_since is None


@dataclass(frozen=True)
class ProfileView:
    """A read-only summary of one profile, for `/running`, `/v1/models` and tests."""

    name: str
    state: State
    in_flight: int
    waiting: int
    draining: bool
    last_used: float
    last_error: str
    starts: int


class Scheduler:
    """Keeps per-profile state and answers every event with the decisions it implies."""

    def __init__(
        self,
        profiles: Iterable[ProfileSpec],
        budget: Resources,
        *,
        drain_timeout: float,
        swap_delay: float = 0.0,
    ) -> None:
        self._slots: dict[str, _Slot] = {spec.name: _Slot(spec) for spec in profiles}
        self._budget = dict(budget)
        self._drain_timeout = drain_timeout
        self._swap_delay = swap_delay
        self._requests: dict[int, _Request] = {}
        self._closing = False

    # ------------------------------------------------------------------------------------------ queries

    def view(self, profile: str) -> ProfileView:
        slot = self._slots[profile]
        return ProfileView(
            name=profile,
            state=slot.state,
            in_flight=len(slot.in_flight),
            waiting=len(slot.waiting),
            draining=slot.draining_since is not None,
            last_used=slot.last_used,
            last_error=slot.last_error,
            starts=slot.starts,
        )

    def views(self) -> list[ProfileView]:
        return [self.view(name) for name in self._slots]

    def used(self) -> dict[str, int]:
        """Resources held by starting, ready and stopping profiles, per device."""
        used = dict.fromkeys(self._budget, 0)
        for slot in self._slots.values():
            if slot.holds_resources:
                for device, amount in slot.spec.footprint.items():
                    used[device] = used.get(device, 0) + amount
        return used

    @property
    def budget(self) -> dict[str, int]:
        return dict(self._budget)

    @property
    def queue_depth(self) -> int:
        return sum(len(slot.waiting) for slot in self._slots.values())

    def next_wakeup(self) -> float | None:
        """The earliest time at which `tick` would decide something new, or None."""
        times: list[float] = []
        for slot in self._slots.values():
            if slot.load_deadline is not None and slot.state is State.STARTING:
                times.append(slot.load_deadline)
            if slot.draining_since is not None and slot.state is State.READY:
                times.append(slot.draining_since + self._drain_timeout)
            if slot.wanted_since is not None and slot.draining_since is None and slot.state is State.READY:
                times.append(slot.wanted_since + self._swap_delay)
            times.extend(self._requests[rid].deadline for rid in slot.waiting)
        return min(times) if times else None

    # ------------------------------------------------------------------------------------------ events

    def request_arrived(self, request_id: int, profile: str, now: float, deadline: float) -> list[Decision]:
        """A client asked for `profile`; serve it now, or queue it and make room."""
        if self._closing:
            return [Fail(request_id, 503, "shutting_down", "the router is shutting down")]
        slot = self._slots[profile]
        request = _Request(request_id, profile, now, deadline)
        self._requests[request_id] = request
        if slot.accepting:
            return [self._dispatch(request, slot, now)]
        slot.waiting.append(request_id)
        return self._place(now)

    def request_finished(self, request_id: int, now: float) -> list[Decision]:
        """A dispatched request ended (answered, failed or cancelled by its client)."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return []
        slot = self._slots[request.profile]
        if not request.dispatched:
            # Cancelled while waiting: it no longer needs its model.
            if request_id in slot.waiting:
                slot.waiting.remove(request_id)
            return self._place(now)
        slot.in_flight.discard(request_id)
        slot.last_used = now
        decisions: list[Decision] = []
        if slot.state is State.READY and slot.draining_since is not None and not slot.in_flight:
            decisions.append(self._stop(slot, "drained for a swap"))
        decisions.extend(self._place(now))
        return decisions

    def process_ready(self, profile: str, now: float) -> list[Decision]:
        """The upstream of `profile` answers `/health`; hand it its queue."""
        slot = self._slots[profile]
        if slot.state is not State.STARTING:
            return []
        slot.state = State.READY
        slot.load_deadline = None
        slot.last_error = ""
        slot.last_used = now
        decisions: list[Decision] = []
        while slot.waiting:
            request = self._requests[slot.waiting.popleft()]
            decisions.append(self._dispatch(request, slot, now))
        decisions.extend(self._place(now))
        return decisions

    def process_exited(self, profile: str, now: float, reason: str) -> list[Decision]:
        """The upstream of `profile` is gone: a failed load, a crash, or the end of a stop."""
        slot = self._slots[profile]
        previous = slot.state
        decisions: list[Decision] = []
        slot.load_deadline = None
        slot.wanted_since = None
        slot.draining_since = None
        if previous is State.STARTING:
            slot.state = State.FAILED
            slot.last_error = reason
            decisions.extend(self._fail_waiting(slot, 503, "model_load_failed", reason))
        elif previous is State.STOPPING:
            slot.state = State.FAILED if slot.stop_is_failure else State.COLD
        elif previous is State.READY:
            slot.state = State.COLD
            slot.last_error = reason
        slot.stop_is_failure = False
        decisions.extend(self._place(now))
        return decisions

    def tick(self, now: float) -> list[Decision]:
        """Time passed: expire waits, loads and drains that ran out of time."""
        decisions: list[Decision] = []
        for slot in self._slots.values():
            for request_id in list(slot.waiting):
                request = self._requests[request_id]
                if request.deadline <= now:
                    slot.waiting.remove(request_id)
                    del self._requests[request_id]
                    waited = now - request.arrived
                    decisions.append(
                        Fail(
                            request_id,
                            503,
                            "model_wait_timeout",
                            f"gave up after {waited:.1f}s waiting for model {slot.spec.name!r} "
                            f"(state: {slot.state.value})",
                        )
                    )
            if slot.state is State.STARTING and slot.load_deadline is not None and slot.load_deadline <= now:
                reason = f"model {slot.spec.name!r} did not become ready within {slot.spec.load_timeout:g}s"
                slot.last_error = reason
                slot.stop_is_failure = True
                decisions.extend(self._fail_waiting(slot, 503, "model_load_timeout", reason))
                decisions.append(self._stop(slot, reason))
            elif (
                slot.state is State.READY
                and slot.draining_since is not None
                and slot.draining_since + self._drain_timeout <= now
            ):
                decisions.append(
                    self._stop(slot, f"drain timeout ({self._drain_timeout:g}s) with requests in flight")
                )
        decisions.extend(self._place(now))
        return decisions

    def unload(self, profile: str, now: float, *, force: bool = False) -> list[Decision]:
        """An operator asked to unload `profile`; requests in flight finish first unless `force`."""
        slot = self._slots[profile]
        if slot.state is State.STARTING:
            slot.stop_is_failure = False
            decisions = self._fail_waiting(slot, 503, "model_unloaded", f"model {profile!r} was unloaded")
            return [*decisions, self._stop(slot, "unloaded while starting")]
        if slot.state is not State.READY:
            return []
        if slot.in_flight and not force:
            slot.draining_since = slot.draining_since or now
            return []
        return [self._stop(slot, "unloaded")]

    def shutdown(self, now: float) -> list[Decision]:
        """Stop taking work: fail every waiting request and stop every upstream."""
        self._closing = True
        decisions: list[Decision] = []
        for slot in self._slots.values():
            decisions.extend(self._fail_waiting(slot, 503, "shutting_down", "the router is shutting down"))
            if slot.state in (State.STARTING, State.READY):
                decisions.append(self._stop(slot, "shutdown"))
        return decisions

    # ------------------------------------------------------------------------------------------ rules

    def _dispatch(self, request: _Request, slot: _Slot, now: float) -> Dispatch:
        request.dispatched = True
        slot.in_flight.add(request.request_id)
        slot.last_used = now
        return Dispatch(request.request_id, slot.spec.name)

    def _stop(self, slot: _Slot, reason: str) -> Stop:
        slot.state = State.STOPPING
        slot.load_deadline = None
        slot.wanted_since = None
        slot.draining_since = None
        return Stop(slot.spec.name, reason)

    def _fail_waiting(self, slot: _Slot, status: int, code: str, message: str) -> list[Decision]:
        decisions: list[Decision] = []
        while slot.waiting:
            request_id = slot.waiting.popleft()
            self._requests.pop(request_id, None)
            decisions.append(Fail(request_id, status, code, message))
        return decisions

    def _fits(self, footprint: Resources, used: Mapping[str, int]) -> bool:
        return all(
            used.get(device, 0) + amount <= self._budget.get(device, 0)
            for device, amount in footprint.items()
        )

    def _candidates(self) -> list[_Slot]:
        """Cold or failed profiles with waiting requests, oldest waiter first (fair order)."""
        waiting = [
            slot for slot in self._slots.values() if slot.waiting and slot.state in (State.COLD, State.FAILED)
        ]
        return sorted(waiting, key=lambda slot: (self._requests[slot.waiting[0]].arrived, slot.waiting[0]))

    def _place(self, now: float) -> list[Decision]:
        """Start what fits for the oldest waiters; make room for the first that does not."""
        if self._closing:
            return []
        decisions: list[Decision] = []
        for slot in self._slots.values():
            # A drain that nobody needs any more ends; its queue goes straight to it.
            while slot.accepting and slot.waiting:
                decisions.append(self._dispatch(self._requests[slot.waiting.popleft()], slot, now))
        wanted_victims: set[str] = set()
        for slot in self._candidates():
            used = self.used()
            if self._fits(slot.spec.footprint, used):
                slot.state = State.STARTING
                slot.starts += 1
                slot.load_deadline = now + slot.spec.load_timeout
                decisions.append(Start(slot.spec.name))
                continue
            if not self._fits(slot.spec.footprint, {}):
                message = f"model {slot.spec.name!r} needs more than the whole budget ({dict(self._budget)})"
                decisions.extend(self._fail_waiting(slot, 503, "model_too_large", message))
                continue
            decisions.extend(self._make_room(slot, used, now, wanted_victims))
            break  # head of line: later waiters do not take the memory this one is waiting for
        for slot in self._slots.values():
            if slot.spec.name not in wanted_victims and slot.state is State.READY:
                slot.wanted_since = None
                if slot.draining_since is not None:
                    slot.draining_since = None
                    while slot.waiting:
                        decisions.append(self._dispatch(self._requests[slot.waiting.popleft()], slot, now))
        return decisions

    def _make_room(
        self, wanted: _Slot, used: Mapping[str, int], now: float, victims: set[str]
    ) -> list[Decision]:
        """Stop idle models (least recently used first), then drain busy ones, until `wanted` fits."""
        projected = dict(used)
        for slot in self._slots.values():
            if slot.state is State.STOPPING:
                for device, amount in slot.spec.footprint.items():
                    projected[device] -= amount
        if self._fits(wanted.spec.footprint, projected):
            return []  # what is already stopping will make room
        ready = [slot for slot in self._slots.values() if slot.state is State.READY and slot is not wanted]
        # Idle before busy; among busy ones, those already draining first, so choices stay stable.
        ready.sort(key=lambda slot: (bool(slot.in_flight), slot.draining_since is None, slot.last_used))
        decisions: list[Decision] = []
        for victim in ready:
            if self._fits(wanted.spec.footprint, projected):
                break
            for device, amount in victim.spec.footprint.items():
                projected[device] -= amount
            if not victim.in_flight:
                decisions.append(self._stop(victim, f"making room for {wanted.spec.name!r}"))
                continue
            victims.add(victim.spec.name)
            if victim.draining_since is not None:
                continue
            victim.wanted_since = victim.wanted_since if victim.wanted_since is not None else now
            if now - victim.wanted_since >= self._swap_delay:
                victim.draining_since = now
        return decisions
