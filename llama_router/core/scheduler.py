"""The decision core: which model to start, stop, or send a request to.

Pure and synchronous on purpose: no asyncio, no I/O and no clock of its own (every event carries
`now`), so each rule can be tested with plain function calls. Events go in, decisions come out; the
controller turns decisions into processes and HTTP.

Resources are generic: each profile has a footprint (bytes per device: "ram", "gpu0", ...) and each
device a budget; a "slots" device with one unit per profile caps how many models are resident. A
leased device ("rpc:<host:port>", a llama.cpp rpc-server, which serves one client at a time) holds
one model at most, whatever its bytes: `fits` alone says so.
Whatever the need (a waiting request, a measured footprint, an out-of-memory load), `choose_victims`
alone decides which models make way. Refusals carry a `FailReason`; their HTTP status is the
controller's business.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field

from llama_router.core.devices import LEASED_PREFIX, describe, size_text
from llama_router.core.placement import (
    Placed,
    Placement,
    on_one,
    partly_in_ram,
    room,
    split_over,
    travelling_need,
)

Resources = Mapping[str, int]


# An idle model that another one waits for is kept for its own clients' next request only this many
# times their last gap (a request ending to the next one arriving, while the model stayed loaded), and
# at least GRACE_MIN seconds: long enough for a closed loop's turnaround, far shorter than `swap_delay`
# once its demand stopped.
GRACE_GAPS = 4.0
GRACE_MIN = 0.05

# A model's demand: its requests, each counting one when it comes and half as much every
# DEMAND_HALF_LIFE seconds after, so which models are asked for most follows a change of habits
# within minutes. Where not every model fits on the GPUs at once, placement stops the least asked-for.
DEMAND_HALF_LIFE = 300.0


class State(enum.StrEnum):
    COLD = "cold"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


class StopCause(enum.StrEnum):
    """Why a model is stopped; the values are what `/events` and the metrics' labels show."""

    SWAP = "swap"  # made room for another model (or a preload gave way to one)
    UNLOAD = "unload"  # an operator or a reload asked for it
    TTL = "ttl"
    LOAD_TIMEOUT = "load_timeout"
    DRAIN_TIMEOUT = "drain_timeout"  # made room, cutting requests that outlived `drain_timeout`
    OUT_OF_MEMORY = "out_of_memory"  # made room for a load that ran out of memory
    BUDGET = "budget"  # made room once a measured footprint exceeded the budget
    UNHEALTHY = "unhealthy"
    SHUTDOWN = "shutdown"

    @property
    def makes_room(self) -> bool:
        """Whether the model made way for another one (a swap, as counted)."""
        return self in (StopCause.SWAP, StopCause.DRAIN_TIMEOUT, StopCause.BUDGET, StopCause.OUT_OF_MEMORY)

    @property
    def fails_a_load(self) -> bool:
        """Whether stopping a model that is still loading counts against its load."""
        return self not in (StopCause.SWAP, StopCause.UNLOAD, StopCause.SHUTDOWN)


class FailReason(enum.StrEnum):
    """Why a request is refused; the values are the OpenAI error `code` clients see. The HTTP status
    belongs to the effects around the scheduler (`llama_router/upstream/controller.py`)."""

    SHUTTING_DOWN = "shutting_down"
    TOO_MANY_WAITING = "too_many_waiting"
    MODEL_LOAD_FAILED = "model_load_failed"
    MODEL_FAILED = "model_failed"
    MODEL_LOAD_TIMEOUT = "model_load_timeout"
    MODEL_WAIT_TIMEOUT = "model_wait_timeout"
    MODEL_TOO_LARGE = "model_too_large"
    MODEL_REMOVED = "model_removed"
    MODEL_UNLOADED = "model_unloaded"


# ---------------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Dispatch:
    """Send request `request_id` to the running upstream of `profile`."""

    request_id: int
    profile: str


@dataclass(frozen=True)
class Start:
    """Spawn the upstream of `profile`; `placed` says on which GPUs, for a placeable profile."""

    profile: str
    placed: Placed | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Stop:
    """Stop the upstream of `profile`; `reason` is for people, `cause` for counting."""

    profile: str
    reason: str
    cause: StopCause = field(default=StopCause.SWAP, compare=False)


@dataclass(frozen=True)
class Fail:
    """Answer request `request_id` with an error instead of an upstream."""

    request_id: int
    code: FailReason
    message: str
    retry_after: float | None = None  # seconds after which the same request may well succeed


Decision = Dispatch | Start | Stop | Fail


# ---------------------------------------------------------------------------------------------- state


@dataclass(frozen=True)
class ProfileSpec:
    """What the scheduler needs to know of a profile."""

    name: str
    footprint: Resources
    load_timeout: float
    pinned: bool = False  # never evicted to make room (only an explicit unload stops it)
    priority: int = 0  # among idle models, lower priority is evicted first
    standby: bool = False  # preloaded whenever memory is free and nobody waits
    ttl: float | None = None  # unload after this many idle seconds
    cannot_run: str | None = None  # why it cannot be started (its files are missing): failed until fixed
    # Placeable: the GPUs are chosen at each start; `footprint` is then only what is not on a GPU.
    placement: Placement | None = None


@dataclass
class _Request:
    request_id: int
    profile: str
    arrived: float
    deadline: float
    dispatched: bool = False
    client: Hashable | None = None  # who asked (a client connection), when the caller knows


@dataclass
class _Slot:
    spec: ProfileSpec
    footprint: dict[str, int] = field(default_factory=dict)
    state: State = State.COLD
    preload: bool = False  # started for standby, not yet asked for by a request
    preload_held: bool = False  # an operator unloaded it: no preload until it is asked for again
    in_flight: set[int] = field(default_factory=set)
    waiting: deque[int] = field(default_factory=deque)
    last_used: float = float("-inf")
    load_deadline: float | None = None
    wanted_since: float | None = None  # another profile waits for this one's resources
    wanted_after: float | None = None  # when the first request of that other profile reached the router
    draining_since: float | None = None  # takes no new requests; stops once idle
    stop_is_failure: bool = False
    last_error: str = ""
    starts: int = 0
    stop_when_idle: bool = False  # an unload or reload asked for it: drains, then stops
    removed: bool = False  # gone from the config: drains, stops, then is forgotten
    failures: deque[float] = field(default_factory=deque)  # times of recent failed loads and crashes
    retry_at: float | None = None  # backing off after a failure: no restart before this time
    oom_retried: bool = False  # an out-of-memory load already got its one retry with more room
    restart_after_stop: bool = False  # its command changed: start the new one once the old one is gone
    idle_since: float | None = None  # its last request ended and no other has come since
    gap: float | None = None  # its clients' last gap between a request ending and the next arriving
    last_client: Hashable | None = None  # the client of its last finished request
    client_moved_on: bool = False  # that client has since asked for another model: no turnaround due
    need: int = 0  # a placeable profile's bytes on one GPU, learned or estimated: what travels
    placed: Placed | None = None  # where its last start put it (a placeable profile)
    target: tuple[str, ...] = ()  # the GPUs it waits for room on: kept while the room is made
    room_made: tuple[str, ...] = ()  # the models chosen to make way for it since it began waiting
    by_demand: bool = False  # its GPUs were chosen for what their victims were asked for (`_asked`)
    demand: float = 0.0  # its requests, fading (see DEMAND_HALF_LIFE), as of `demand_at`
    demand_at: float = 0.0

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
    standby: bool  # loaded ahead of demand and not yet used
    footprint: dict[str, int]
    failed: bool  # failed too often: only a new request or an explicit load retries it
    retry_at: float | None  # backing off after a failure until then
    ttl_expiry: float | None  # when its `ttl` unloads it, while it sits idle
    placed: Placed | None = None  # where its last start put it and why (a placeable profile)


@dataclass
class Plan:
    """Where a start would go now and what would make way for it (the dry run shows the same)."""

    footprint: dict[str, int]
    placed: Placed | None  # None for a profile whose command line fixes its devices
    victims: list[_Slot]
    now: bool  # it fits beside what holds memory now: start at once
    enough: bool = True  # the victims free enough (busy loads cannot be stopped: it may wait longer)

    @property
    def stops(self) -> list[str]:
        """The models it would stop, in the order they go."""
        return [victim.spec.name for victim in self.victims]


@dataclass(frozen=True)
class Rules:
    """The settings decisions follow (the config's `server` section); a reload may change them."""

    drain_timeout: float
    swap_delay: float = 0.0
    max_failures: int = 1
    failure_window: float = 60.0
    backoff: float = 0.5
    backoff_max: float = 30.0
    max_waiting: int | None = None  # requests waiting for models at once; more are refused (429)


class Scheduler:
    """Keeps per-profile state and answers every event with the decisions it implies."""

    def __init__(self, profiles: Iterable[ProfileSpec], budget: Resources, rules: Rules) -> None:
        self._slots: dict[str, _Slot] = {spec.name: _new_slot(spec) for spec in profiles}
        self._budget = dict(budget)
        self.rules = rules
        self._requests: dict[int, _Request] = {}
        self._closing = False
        self._now = float("-inf")
        # Kept so that a request's arrival and end cost the same with 300 profiles as with 2:
        # the profiles each client was served by last (`last_client`), by client...
        self._served_last: dict[Hashable, set[str]] = {}
        # ...and the profiles that may have requests waiting or be wanted for one (a request queued,
        # a victim chosen: the only two ways in); `_nobody_waits` looks at these alone.
        self._attention: set[str] = set()

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
            standby=slot.preload and slot.state is State.READY,
            footprint=dict(slot.footprint),
            failed=slot.state is State.FAILED and slot.retry_at is None,
            retry_at=slot.retry_at if slot.state is State.FAILED else None,
            ttl_expiry=self._ttl_expiry(slot),
            placed=slot.placed,
        )

    def accepting(self, profile: str) -> bool:
        """Whether a request for `profile` arriving now would be dispatched at once."""
        slot = self._slots.get(profile)
        return slot is not None and not self._closing and slot.accepting

    def views(self) -> list[ProfileView]:
        """Every configured profile (profiles removed by a reload and still stopping are left out)."""
        return [self.view(name) for name, slot in self._slots.items() if not slot.removed]

    def used(self) -> dict[str, int]:
        """Resources held by starting, ready and stopping profiles, per device."""
        used = dict.fromkeys(self._budget, 0)
        for slot in self._slots.values():
            if slot.holds_resources:
                for device, amount in slot.footprint.items():
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
        earliest: float | None = None
        for slot in self._slots.values():
            wake = self._wakeup_of(slot)
            if wake is not None and (earliest is None or wake < earliest):
                earliest = wake
        return earliest

    def next_wakeup_of(self, profile: str) -> float | None:
        """`next_wakeup` for `profile` alone: after an event that changed only its state (a request
        of its own ending), the only time that may have come earlier."""
        slot = self._slots.get(profile)
        return self._wakeup_of(slot) if slot is not None else None

    def _wakeup_of(self, slot: _Slot) -> float | None:
        """The earliest time at which `tick` would decide something new for `slot`, or None."""
        times: list[float] = []
        if slot.load_deadline is not None and slot.state is State.STARTING:
            times.append(slot.load_deadline)
        if slot.draining_since is not None and slot.state is State.READY:
            times.append(slot.draining_since + self.rules.drain_timeout)
        if slot.wanted_since is not None and slot.draining_since is None and slot.state is State.READY:
            times.append(self._release_at(slot))
        if slot.waiting:
            times.extend(self._requests[rid].deadline for rid in slot.waiting)
            if slot.retry_at is not None and slot.state is State.FAILED:
                times.append(slot.retry_at)
        if not slot.in_flight and (expiry := self._ttl_expiry(slot)) is not None:
            times.append(expiry)
        return min(times) if times else None

    def _ttl_expiry(self, slot: _Slot) -> float | None:
        """When an idle model with a `ttl` is due to be unloaded, or None."""
        if (
            slot.spec.ttl is None
            or slot.spec.standby
            or slot.spec.pinned
            or slot.state is not State.READY
            or slot.in_flight
            or slot.waiting
        ):
            return None
        return slot.last_used + slot.spec.ttl

    # ------------------------------------------------------------------------------------------ events

    def request_arrived(
        self,
        request_id: int,
        profile: str,
        now: float,
        deadline: float,
        client: Hashable | None = None,
        arrived: float | None = None,
    ) -> list[Decision]:
        """A client asked for `profile`; serve it now, or queue it and make room. `client` (say, its
        connection) tells a client that moved on to another model from one coming back to its own.
        `arrived` is when the request reached the router (default `now`): one that came before the
        first request for another model is served by its loaded model even once that model drains."""
        if self._closing:
            return [Fail(request_id, FailReason.SHUTTING_DOWN, "the router is shutting down")]
        slot = self._slots[profile]
        if slot.spec.cannot_run:
            return [Fail(request_id, FailReason.MODEL_LOAD_FAILED, slot.spec.cannot_run)]
        if now > self._now:
            self._now = now  # the dry run (`where`) weighs demand as of the last event
        slot.demand, slot.demand_at = demand(slot, now) + 1.0, now
        limit = self.rules.max_waiting
        if limit is not None and not slot.accepting and (waiting := self.queue_depth) >= limit:
            message = (
                f"{waiting} requests are already waiting for their models (server.max_waiting "
                f"{limit}); try again shortly"
            )
            return [Fail(request_id, FailReason.TOO_MANY_WAITING, message, self._retry_hint(slot, now))]
        slot.preload = False
        slot.preload_held = False
        arrived = now if arrived is None else min(arrived, now)
        if slot.idle_since is not None:
            # A pause longer than `swap_delay` is no client's loop: its demand had stopped. (A pause
            # that spans the model going away is none either: `_stop` forgets where it began.)
            gap = max(0.0, arrived - slot.idle_since)
            slot.gap = gap if gap <= self.rules.swap_delay else None
            slot.idle_since = None
        slot.client_moved_on = False
        released = False  # a model held for another's waiting request, whose client went elsewhere
        if client is not None:
            for name in self._served_last.get(client, ()):
                other = self._slots.get(name)
                if other is not None and other is not slot and not other.in_flight:
                    other.client_moved_on = True
                    released = released or other.wanted_since is not None
        request = _Request(request_id, profile, arrived, deadline, client=client)
        self._requests[request_id] = request
        if slot.accepting or self._came_before_its_drain(slot, request):
            dispatched = self._dispatch(request, slot, now)
            # Such a model goes now (`_release_at`), not when the grace it was held for would end.
            return [dispatched, *self._place(now)] if released else [dispatched]
        slot.waiting.append(request_id)
        self._attention.add(profile)
        return self._place(now)

    def request_finished(self, request_id: int, now: float) -> list[Decision]:
        """A dispatched request ended (answered, failed or cancelled by its client)."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return []
        slot = self._slots.get(request.profile)
        if slot is None:  # its profile was removed by a reload while the request ran
            return self._place(now)
        if not request.dispatched:
            # Cancelled while waiting: it no longer needs its model.
            if request_id in slot.waiting:
                slot.waiting.remove(request_id)
            return self._place(now)
        slot.in_flight.discard(request_id)
        slot.last_used = now
        self._served_by(slot, request.client)
        if not slot.in_flight and not slot.waiting:
            slot.idle_since = now
        decisions: list[Decision] = []
        if slot.state is State.READY and slot.draining_since is not None and not slot.in_flight:
            decisions.append(
                self._stop(
                    slot,
                    "drained for a swap" if not slot.stop_when_idle else "unloaded once idle",
                    StopCause.UNLOAD if slot.stop_when_idle else StopCause.SWAP,
                )
            )
        if not decisions and self._nobody_waits():
            return decisions  # the common end of a request: nothing to place (it frees no memory)
        decisions.extend(self._place(now))
        return decisions

    def _nobody_waits(self) -> bool:
        """Whether no request waits and no model is held or drained for one: `_place` has nothing to
        decide until a process event (which frees or takes memory) or a new request."""
        for name in list(self._attention):
            slot = self._slots.get(name)
            if slot is not None and (slot.waiting or slot.wanted_since is not None):
                return False
            self._attention.discard(name)
        return True

    def _forget(self, slot: _Slot) -> None:
        """A removed profile's state goes (its process, if any, has stopped)."""
        self._served_by(slot, None)
        self._attention.discard(slot.spec.name)
        del self._slots[slot.spec.name]

    def _served_by(self, slot: _Slot, client: Hashable | None) -> None:
        """`slot` has just served `client` (its `last_client`), in the index by client."""
        old = slot.last_client
        if old == client:
            return
        name = slot.spec.name
        if old is not None and (names := self._served_last.get(old)) is not None:
            names.discard(name)
            if not names:
                del self._served_last[old]
        slot.last_client = client
        if client is not None:
            self._served_last.setdefault(client, set()).add(name)

    def process_ready(self, profile: str, now: float) -> list[Decision]:
        """The upstream of `profile` answers `/health`; hand it its queue."""
        slot = self._slots[profile]
        if slot.state is not State.STARTING:
            return []
        slot.state = State.READY
        slot.load_deadline = None
        slot.last_error = ""
        slot.oom_retried = False
        slot.retry_at = None
        slot.last_used = now
        decisions: list[Decision] = []
        while slot.waiting:
            request = self._requests[slot.waiting.popleft()]
            decisions.append(self._dispatch(request, slot, now))
        decisions.extend(self._place(now))
        return decisions

    def process_exited(
        self, profile: str, now: float, reason: str, *, out_of_memory: bool = False
    ) -> list[Decision]:
        """The upstream of `profile` is gone: a failed load, a crash, or the end of a stop.

        Failed loads and crashes back off before the next start; after `max_failures` within the
        failure window the profile is failed and its waiting requests get the reason. A load that ran
        out of memory first gets one retry with the idle models evicted."""
        slot = self._slots[profile]
        previous = slot.state
        decisions: list[Decision] = []
        slot.idle_since = None
        slot.load_deadline = None
        slot.wanted_since = slot.wanted_after = None
        slot.draining_since = None
        if previous is State.STARTING and out_of_memory and not slot.oom_retried:
            slot.oom_retried = True
            slot.state = State.COLD
            slot.last_error = reason
            decisions.extend(self._make_room_after_out_of_memory(slot))
        elif previous in (State.STARTING, State.READY):
            slot.state = State.FAILED
            slot.last_error = reason
            self._record_failure(slot, now)
            if slot.retry_at is None:
                code = FailReason.MODEL_LOAD_FAILED if previous is State.STARTING else FailReason.MODEL_FAILED
                decisions.extend(self._fail_waiting(slot, code, self._failure_message(slot, reason)))
        elif previous is State.STOPPING:
            slot.state = State.FAILED if slot.stop_is_failure else State.COLD
        slot.stop_is_failure = False
        if slot.removed:
            self._forget(slot)
        elif slot.restart_after_stop and slot.state is State.COLD and not self._closing:
            slot.restart_after_stop = False
            if (start := self._start_if_it_fits(slot, now, preload=True)) is not None:
                decisions.append(start)
        decisions.extend(self._place(now))
        return decisions

    def _record_failure(self, slot: _Slot, now: float) -> None:
        """Count a failure; set the back-off before the next start, or none once the profile is failed."""
        slot.failures.append(now)
        while slot.failures and slot.failures[0] <= now - self.rules.failure_window:
            slot.failures.popleft()
        if len(slot.failures) >= self.rules.max_failures:
            slot.retry_at = None  # failed: a later request or an explicit load tries once more
        else:
            delay = self.rules.backoff * 2 ** (len(slot.failures) - 1)
            slot.retry_at = now + min(delay, self.rules.backoff_max)

    @staticmethod
    def _retry_hint(slot: _Slot, now: float) -> float:
        """When a request that gave up waiting might be served: at the end of a restart back-off, or
        soon (whatever held the model up, its memory or its load, is moving)."""
        if slot.state is State.FAILED and slot.retry_at is not None:
            return max(1.0, slot.retry_at - now)
        return 1.0

    def _failure_message(self, slot: _Slot, reason: str) -> str:
        if self.rules.max_failures <= 1:
            return reason
        window = self.rules.failure_window
        return f"model {slot.spec.name!r} failed {len(slot.failures)} times in {window:g}s; last: {reason}"

    def _make_room_after_out_of_memory(self, slot: _Slot) -> list[Decision]:
        """`slot` ran out of memory although its estimate fitted, so the free memory cannot be trusted:
        every idle model on its devices makes way (the need is the whole device), and its footprint
        grows by what they held, so the retry waits until their memory is really free."""
        devices = [device for device in slot.footprint if device != "slots"]
        need = {device: self._budget.get(device, 0) for device in devices}
        decisions: list[Decision] = []
        for victim in choose_victims(
            self._others(slot), need, self._projected(), self._budget, drain_busy=False
        ):
            for device in devices:
                slot.footprint[device] = slot.footprint.get(device, 0) + victim.footprint.get(device, 0)
                if slot.placed is not None and device in slot.placed.gpus:
                    slot.need += victim.footprint.get(device, 0)  # the retry waits for as much
            decisions.append(
                self._stop(victim, f"{slot.spec.name!r} ran out of memory loading", StopCause.OUT_OF_MEMORY)
            )
        return decisions

    def retune(self, rules: Rules) -> None:
        """New settings, from a reloaded config; they apply to the next decision."""
        self.rules = rules

    def reconfigure(self, profiles: Iterable[ProfileSpec], budget: Resources, now: float) -> list[Decision]:
        """A new config: add new profiles, drain and forget removed ones, take new settings."""
        specs = {spec.name: spec for spec in profiles}
        self._budget = dict(budget)
        decisions: list[Decision] = []
        for name, slot in list(self._slots.items()):
            spec = specs.get(name)
            if spec is not None:
                slot.removed = False  # added again while its old process still stops: kept
                if slot.spec.footprint != spec.footprint:
                    slot.footprint = dict(spec.footprint)
                if spec.placement is not None and (
                    slot.spec.placement is None or slot.spec.placement.need != spec.placement.need
                ):
                    slot.need = spec.placement.need
                if spec.cannot_run and slot.state is State.COLD:
                    slot.state, slot.last_error, slot.retry_at = State.FAILED, spec.cannot_run, None
                elif slot.spec.cannot_run and not spec.cannot_run and slot.state is State.FAILED:
                    slot.state, slot.last_error = State.COLD, ""  # its files are there now
                slot.spec = spec
                continue
            slot.removed = True
            decisions.extend(
                self._fail_waiting(
                    slot, FailReason.MODEL_REMOVED, f"model {name!r} was removed from the config"
                )
            )
            if slot.state in (State.STARTING, State.READY):
                decisions.extend(self.unload(name, now))
            elif slot.state is not State.STOPPING:
                self._forget(slot)
        for name, spec in specs.items():
            if name not in self._slots:
                self._slots[name] = _new_slot(spec)
        decisions.extend(self._place(now))
        return decisions

    def restart_when_idle(self, profile: str, now: float) -> list[Decision]:
        """The profile's command changed: replace a running process once its requests are done."""
        slot = self._slots[profile]
        if slot.state not in (State.STARTING, State.READY):
            return []
        slot.restart_after_stop = True
        return self._stop_process(slot, now, force=False)

    def footprint_measured(
        self, profile: str, footprint: Resources, now: float, *, placeable: ProfileSpec | None = None
    ) -> list[Decision]:
        """The real use of a loaded model is known: replace the estimate, and if the budget is now
        exceeded, stop idle models until it holds again (busy ones are not drained for this).
        `placeable`: its spec now that its GPU part is known, for a model the router may place but
        could not before (nothing told what it needs on a GPU); its next start is placed."""
        slot = self._slots[profile]
        slot.footprint = dict(footprint)
        if placeable is not None and placeable.placement is not None and slot.spec.placement is None:
            slot.spec, slot.need = placeable, placeable.placement.need
        placement = slot.spec.placement
        if placement is not None and slot.placed is not None:
            need = travelling_need(footprint, slot.placed, placement.split_extra)
            slot.need = slot.need if need is None else need
        projected = self._projected()
        nothing_more = dict.fromkeys(projected, 0)  # within budget as it is
        decisions: list[Decision] = [
            self._stop(victim, f"over budget once {profile!r} measured its use", StopCause.BUDGET)
            for victim in choose_victims(
                self._others(slot), nothing_more, projected, self._budget, drain_busy=False
            )
        ]
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
                            FailReason.MODEL_WAIT_TIMEOUT,
                            f"gave up after {waited:.1f}s waiting for model {slot.spec.name!r} "
                            f"(state: {slot.state.value})",
                            retry_after=self._retry_hint(slot, now),
                        )
                    )
            if slot.state is State.STARTING and slot.load_deadline is not None and slot.load_deadline <= now:
                reason = f"model {slot.spec.name!r} did not become ready within {slot.spec.load_timeout:g}s"
                slot.last_error = reason
                slot.stop_is_failure = True
                self._record_failure(slot, now)
                decisions.extend(self._fail_waiting(slot, FailReason.MODEL_LOAD_TIMEOUT, reason))
                decisions.append(self._stop(slot, reason, StopCause.LOAD_TIMEOUT))
            elif (
                slot.state is State.READY
                and slot.draining_since is not None
                and slot.draining_since + self.rules.drain_timeout <= now
            ):
                decisions.append(
                    self._stop(
                        slot,
                        f"drain timeout ({self.rules.drain_timeout:g}s) with requests in flight",
                        StopCause.DRAIN_TIMEOUT,
                    )
                )
            elif (expiry := self._ttl_expiry(slot)) is not None and expiry <= now:
                decisions.append(self._stop(slot, f"idle for its ttl ({slot.spec.ttl:g}s)", StopCause.TTL))
        decisions.extend(self._place(now))
        return decisions

    def unload(self, profile: str, now: float, *, force: bool = False) -> list[Decision]:
        """An operator asked to unload `profile`; requests in flight finish first unless `force`.
        Whatever the moment, the load it cancels does not happen: requests waiting for the model
        (still queued for room, or for its process) are told it was unloaded."""
        slot = self._slots[profile]
        slot.preload_held = True
        slot.restart_after_stop = False
        unloaded = self._fail_waiting(slot, FailReason.MODEL_UNLOADED, f"model {profile!r} was unloaded")
        decisions = [*unloaded, *self._stop_process(slot, now, force=force)]
        return [*decisions, *self._place(now)] if decisions else []

    def _stop_process(self, slot: _Slot, now: float, *, force: bool) -> list[Decision]:
        """Stop the process of `slot`: at once while it loads, once idle while it serves (or at once
        if `force`); nothing to do when it has none or is already stopping."""
        if slot.state is State.STARTING:
            slot.stop_is_failure = False
            return [self._stop(slot, "unloaded while starting", StopCause.UNLOAD)]
        if slot.state is not State.READY:
            return []
        if slot.in_flight and not force:
            slot.stop_when_idle = True
            slot.draining_since = slot.draining_since or now
            return []
        return [self._stop(slot, "unloaded", StopCause.UNLOAD)]

    def upstream_unhealthy(self, profile: str, now: float, reason: str) -> list[Decision]:
        """The process lives but is of no use (stalled, not answering): stop it now, count a failure.
        Requests in flight on it end with an error; the next request starts a fresh one."""
        slot = self._slots[profile]
        if slot.state is not State.READY:
            return []
        slot.last_error = reason
        slot.stop_is_failure = True
        self._record_failure(slot, now)
        return [self._stop(slot, reason, StopCause.UNHEALTHY)]

    def shutdown(self, now: float) -> list[Decision]:
        """Stop taking work: fail every waiting request and stop every upstream."""
        self._closing = True
        decisions: list[Decision] = []
        for slot in self._slots.values():
            decisions.extend(
                self._fail_waiting(slot, FailReason.SHUTTING_DOWN, "the router is shutting down")
            )
            if slot.state in (State.STARTING, State.READY):
                decisions.append(self._stop(slot, "shutdown", StopCause.SHUTDOWN))
        return decisions

    # ------------------------------------------------------------------------------------------ rules

    def _dispatch(self, request: _Request, slot: _Slot, now: float) -> Dispatch:
        request.dispatched = True
        slot.in_flight.add(request.request_id)
        slot.last_used = now
        return Dispatch(request.request_id, slot.spec.name)

    @staticmethod
    def _came_before_its_drain(slot: _Slot, request: _Request) -> bool:
        """Whether `request` reached the router before the first request its draining model makes
        room for: it was there first, so its model serves it before it goes, whatever `swap_delay`."""
        return (
            slot.state is State.READY
            and slot.draining_since is not None
            and not slot.stop_when_idle
            and slot.wanted_after is not None
            and request.arrived < slot.wanted_after
        )

    def _stop(self, slot: _Slot, reason: str, cause: StopCause = StopCause.SWAP) -> Stop:
        slot.state = State.STOPPING
        slot.idle_since = None  # the time it is away is no pause of its clients
        slot.stop_when_idle = False
        slot.load_deadline = None
        slot.wanted_since = slot.wanted_after = None
        slot.draining_since = None
        return Stop(slot.spec.name, reason, cause)

    def _fail_waiting(self, slot: _Slot, code: FailReason, message: str) -> list[Decision]:
        decisions: list[Decision] = []
        while slot.waiting:
            request_id = slot.waiting.popleft()
            self._requests.pop(request_id, None)
            decisions.append(Fail(request_id, code, message))
        return decisions

    def _place(self, now: float) -> list[Decision]:
        """Start what fits for the oldest waiters; make room for the first that does not; preload."""
        self._now = now
        if self._closing:
            return []
        decisions: list[Decision] = []
        for slot in self._slots.values():
            # A drain that nobody needs any more ends; its queue goes straight to it.
            while slot.accepting and slot.waiting:
                decisions.append(self._dispatch(self._requests[slot.waiting.popleft()], slot, now))
        wanted_victims: set[str] = set()
        blocked = False
        for slot in self._candidates():
            if slot.spec.placement is not None:
                plan = self._plan(slot)
                if plan is None:
                    decisions.extend(
                        self._fail_waiting(slot, FailReason.MODEL_TOO_LARGE, self._too_large(slot))
                    )
                    continue
                slot.footprint = plan.footprint
                if plan.now:
                    decisions.append(self._start(slot, now, preload=False, placed=plan.placed))
                    continue
                assert plan.placed is not None
                if slot.target != plan.placed.gpus:  # what chose these GPUs is what its why says
                    slot.target, slot.room_made = plan.placed.gpus, ()
                    slot.by_demand = plan.placed.by_demand
                decisions.extend(self._make_room(slot, now, wanted_victims))
                blocked = True
                break
            if self._fits(slot.footprint, self.used()):
                decisions.append(self._start(slot, now, preload=False))
                continue
            if not self._fits(slot.footprint, self._pinned_usage(exclude=slot)):
                message = self._too_large(slot)
                decisions.extend(self._fail_waiting(slot, FailReason.MODEL_TOO_LARGE, message))
                continue
            decisions.extend(self._make_room(slot, now, wanted_victims))
            blocked = True
            break  # head of line: later waiters do not take the memory this one is waiting for
        for slot in self._slots.values():
            if slot.spec.name not in wanted_victims and slot.state is State.READY and not slot.stop_when_idle:
                slot.wanted_since = slot.wanted_after = None
                if slot.draining_since is not None:
                    slot.draining_since = None
                    while slot.waiting:
                        decisions.append(self._dispatch(self._requests[slot.waiting.popleft()], slot, now))
        if not blocked:
            decisions.extend(self._preload(now))
        return decisions

    def _start(self, slot: _Slot, now: float, *, preload: bool, placed: Placed | None = None) -> Start:
        slot.state = State.STARTING
        slot.preload = preload
        slot.starts += 1
        slot.load_deadline = now + slot.spec.load_timeout
        if placed is not None:
            # Of the models once chosen to make way, those that went: one kept after all (a later
            # choice needed it no more) was not stopped for this model.
            stopped = tuple(other.spec.name for other in self._stopped_for(slot))
            placed = dataclasses.replace(placed, stops=stopped, by_demand=slot.by_demand and bool(stopped))
            slot.placed, slot.target, slot.room_made, slot.by_demand = placed, (), (), False
        return Start(slot.spec.name, placed)

    def _start_if_it_fits(self, slot: _Slot, now: float, *, preload: bool) -> Start | None:
        """Start `slot` if it fits beside what holds memory now, stopping nothing; else None."""
        if slot.spec.placement is None:
            return (
                self._start(slot, now, preload=preload) if self._fits(slot.footprint, self.used()) else None
            )
        plan = self._plan(slot, making_room=False)
        if plan is None or not plan.now:
            return None
        slot.footprint = plan.footprint
        return self._start(slot, now, preload=preload, placed=plan.placed)

    # ------------------------------------------------------------------------------------------ placement

    def where(self, profile: str) -> Plan | None:
        """The dry run: where a start of `profile` would go now and what it would stop (None: it
        cannot be held at all beside the pinned models); for a model loading or loaded, where it is.
        Decides nothing."""
        slot = self._slots[profile]
        if slot.state in (State.STARTING, State.READY):
            return Plan(dict(slot.footprint), slot.placed, [], now=True)
        return self._plan(slot)

    def _plan(self, slot: _Slot, *, making_room: bool = True) -> Plan | None:
        """The placement rule, whole. A fixed profile goes where its command line says. A placeable
        one goes, in this order of preference: on one GPU where it fits beside what runs (the one it
        fills best); else on the one GPU where making room stops the least, as `choose_victims`
        orders what makes way (the worst model stopped decides, then how many; where not every
        model fits at once, how much the models stopped were asked for lately decides first: see
        `_cost`); else split over the fewest GPUs, in proportion to the room on each, when no single
        GPU can hold it; else, where the profile allows it, partly in RAM. None when nothing can
        hold it beside pinned models. With `making_room` false, only what fits now is considered
        (a preload stops nothing)."""
        placement = slot.spec.placement
        if placement is None:
            option = self._option(slot, dict(slot.footprint), None)
            return option if option is not None and (making_room or option.now) else None
        placement = dataclasses.replace(placement, need=slot.need)
        crowded = self._crowded(placement.gpus)
        base = dict(slot.spec.footprint)
        used = self.used()
        pinned = self._pinned_usage(exclude=slot)
        free = room(placement.gpus, used, self._budget)
        capacity = room(placement.gpus, pinned, self._budget)
        tiers: list[list[tuple[dict[str, int], Placed]]] = [
            [({**base, **on_one(placement, gpu)}, Placed((gpu,), need=slot.need)) for gpu in placement.gpus]
        ]
        if placement.split:
            split_tier = []
            for space in (free, capacity):
                split = split_over(placement, space)
                if split is not None:
                    amounts, shares = split
                    split_tier.append(({**base, **amounts}, Placed(tuple(amounts), shares, need=slot.need)))
            tiers.append(split_tier)
        if placement.ram:
            ram_tier = []
            for space in (free, capacity):
                part = partly_in_ram(placement, space)
                if part is not None:
                    gpu, on_gpu = part
                    rest = slot.need - on_gpu
                    footprint = {**base, gpu: on_gpu, "ram": base.get("ram", 0) + rest}
                    ram_tier.append((footprint, Placed((gpu,), ram=rest, need=slot.need)))
            if not ram_tier:  # no GPU has any room: all of it in RAM
                footprint = {**base, "ram": base.get("ram", 0) + slot.need}
                ram_tier.append((footprint, Placed((), ram=slot.need, need=slot.need)))
            tiers.append(ram_tier)
        for tier in tiers:
            options = [
                option
                for footprint, placed in tier
                if (option := self._option(slot, footprint, placed)) is not None
                and (making_room or option.now)
            ]
            if options:
                best = min(options, key=lambda option: self._cost(slot, option, free, crowded))
                if crowded and best.placed is not None and not best.now:
                    # Say so where what the victims were asked for set this option above another.
                    asked, valued = self._asked(slot, best), self._valued(best)
                    others = [option for option in options if not option.now and option.enough == best.enough]
                    if any(
                        self._asked(slot, option) > asked
                        for option in others
                        if self._valued(option) == valued
                    ):
                        best.placed = dataclasses.replace(best.placed, by_demand=True)
                return best
        return None

    def _asked(self, slot: _Slot, option: Plan) -> int:
        """How much the models an option stops were asked for lately, in whole requests (so models
        asked for alike count alike, and the order of `_cost` decides between them). An option off
        the GPUs `slot` waits on counts too the models already stopped for it there: they would have
        stopped for nothing, and load again."""
        victims = list(option.victims)
        if slot.target and (option.placed is None or option.placed.gpus != slot.target):
            victims += self._stopped_for(slot)
        return round(sum(demand(victim, self._now) for victim in victims))

    def _stopped_for(self, slot: _Slot) -> list[_Slot]:
        """The models chosen to make way for `slot` that have stopped or are stopping (not those
        kept after all, nor one that has since started again)."""
        return [
            self._slots[name]
            for name in slot.room_made
            if name in self._slots and self._slots[name].state not in (State.STARTING, State.READY)
        ]

    @staticmethod
    def _valued(option: Plan) -> tuple[bool, int]:
        """The highest `priority` among the models an option stops (stopping none comes first)."""
        if not option.victims:
            return (False, 0)
        return (True, max(victim.spec.priority for victim in option.victims))

    def _crowded(self, gpus: tuple[str, ...]) -> bool:
        """Whether the models that may use `gpus` need more than those GPUs hold together: then some
        must take turns whatever the placement, and which ones do is what counts."""
        on = set(gpus)
        need = 0
        for slot in self._slots.values():
            if slot.removed or slot.spec.cannot_run:
                continue
            placement = slot.spec.placement
            if placement is not None:
                need += slot.need if on.intersection(placement.gpus) else 0
            else:
                need += sum(amount for device, amount in slot.footprint.items() if device in on)
        return need > sum(self._budget.get(gpu, 0) for gpu in gpus)

    def _option(self, slot: _Slot, footprint: dict[str, int], placed: Placed | None) -> Plan | None:
        """One way to start `slot`: at once, once what is stopping is gone, or after stopping the
        models `choose_victims` picks; None if pinned models leave it no room there."""
        if self._fits(footprint, self.used()):
            return Plan(footprint, placed, [], now=True)
        if not self._fits(footprint, self._pinned_usage(exclude=slot)):
            return None
        projected = self._projected()
        if self._fits(footprint, projected):
            return Plan(footprint, placed, [], now=False)
        victims = choose_victims(self._others(slot), footprint, projected, self._budget, drain_busy=True)
        left = dict(projected)
        for victim in victims:
            _subtract(left, victim)
        return Plan(footprint, placed, victims, now=False, enough=self._fits(footprint, left))

    def _cost(self, slot: _Slot, option: Plan, free: Mapping[str, int], crowded: bool) -> tuple[object, ...]:
        """How much an option stops: nothing at all first (the one that leaves least room unused on
        its GPUs, so big holes stay for big models); then the GPUs it already waits on; then, of
        the victims `choose_victims` picks on each, the option that stops the least: no busy model
        (nor one draining) where another stops only idle ones or preloads, then the fewest models,
        then the fewest bytes, then the one whose most valued victim ranks lowest in the eviction
        order. Fewest models before recency: which of two models was used last says little about
        which is asked for next, while each model stopped is one more to load again.

        Where the GPUs cannot hold every model at once (`crowded`), some take turns whatever the
        choice, and what each stop costs is how soon its model is asked for again: the option that
        can free enough now comes first, then the one whose highest `priority` victim is lowest (an
        operator's word outweighs a count), then the one whose victims were asked for least (their
        demand in whole requests, see DEMAND_HALF_LIFE), before the GPU it waits on and the order
        above. A drain that began is given up when its model has since become the more asked-for,
        counting as stopped for nothing what already stopped on the GPUs it waited on.
        scripts/benchmarks/bench_placement.py measures both."""
        gpus = option.placed.gpus if option.placed is not None else ()
        if option.now:
            leftover = sum(free.get(gpu, 0) - option.footprint.get(gpu, 0) for gpu in gpus)
            return (0, leftover)
        worst = max((_eviction_key(victim) for victim in option.victims), default=None)
        stopped = sum(victim.footprint.get(gpu, 0) for victim in option.victims for gpu in gpus)
        least = (
            worst is not None,
            worst[:_KIND] if worst is not None else (),
            len(option.victims),
            stopped,
            worst or (),
        )
        if crowded:
            return (
                1,
                not option.enough,
                self._valued(option),
                self._asked(slot, option),
                gpus != slot.target,
                *least,
            )
        return (1, gpus != slot.target, not option.enough, *least)

    def _preload(self, now: float) -> list[Decision]:
        """Warm standby: start `standby` profiles into memory that nobody is waiting for."""
        decisions: list[Decision] = []
        for slot in sorted(self._slots.values(), key=lambda slot: -slot.spec.priority):
            if (
                slot.spec.standby
                and slot.state is State.COLD
                and not slot.preload_held
                and (start := self._start_if_it_fits(slot, now, preload=True)) is not None
            ):
                decisions.append(start)
        return decisions

    def _too_large(self, slot: _Slot) -> str:
        """Why `slot` can never load beside the pinned models, in sizes per device a person reads."""
        resident = [
            f"{other.spec.name!r}{' (pinned)' if other.spec.pinned else ''} {describe(other.footprint)}"
            for other in self._slots.values()
            if other is not slot and other.state in (State.STARTING, State.READY, State.STOPPING)
        ]
        need = describe(slot.footprint)
        placement = slot.spec.placement
        if placement is not None:  # placed: what it needs on GPUs, whole or split over its own
            need = f"{size_text(slot.need)} on {', '.join(placement.gpus) or 'no GPU'}" + (
                "" if placement.split else " (placement: {split: false}: on one of them)"
            )
            off_gpus = {device: amount for device, amount in slot.spec.footprint.items() if amount}
            if describe(off_gpus) != "nothing":
                need += f" and {describe(off_gpus)}"
        return (
            f"model {slot.spec.name!r} needs {need}: more than the budget "
            f"({describe(self._budget)}) leaves beside pinned models; resident now: "
            f"{'; '.join(resident) or 'none'}"
        )

    def _pinned_usage(self, exclude: _Slot) -> dict[str, int]:
        usage: dict[str, int] = {}
        for slot in self._slots.values():
            if slot is not exclude and slot.spec.pinned and slot.state in (State.STARTING, State.READY):
                for device, amount in slot.footprint.items():
                    usage[device] = usage.get(device, 0) + amount
        return usage

    def _fits(self, footprint: Resources, used: Mapping[str, int]) -> bool:
        return fits(footprint, used, self._budget)

    def _candidates(self) -> list[_Slot]:
        """Cold or failed profiles with waiting requests, oldest waiter first (fair order)."""
        waiting = [
            slot
            for slot in self._slots.values()
            if slot.waiting
            and slot.state in (State.COLD, State.FAILED)
            and (slot.retry_at is None or slot.retry_at <= self._now)
        ]
        return sorted(waiting, key=lambda slot: (self._requests[slot.waiting[0]].arrived, slot.waiting[0]))

    def _make_room(self, wanted: _Slot, now: float, victims: set[str]) -> list[Decision]:
        """Free just enough for `wanted`, with the victims `choose_victims` picks.

        A ready victim keeps taking its own requests until `_release_at` (then it drains if busy, or
        stops), so closed-loop clients are batched, not thrashed; one nobody uses goes at once. The
        names of those it holds on to are added to `victims`."""
        projected = self._projected()
        if self._fits(wanted.footprint, projected):
            return []  # what is already stopping will make room
        decisions: list[Decision] = []
        for victim in choose_victims(
            self._others(wanted), wanted.footprint, projected, self._budget, drain_busy=True
        ):
            if wanted.spec.placement is not None and victim.spec.name not in wanted.room_made:
                wanted.room_made += (victim.spec.name,)
            if victim.state is State.STARTING:
                decisions.append(self._stop(victim, f"preload gave way to {wanted.spec.name!r}"))
                continue
            victims.add(victim.spec.name)
            if victim.draining_since is not None:
                continue
            if victim.wanted_since is None:
                victim.wanted_since = now
                self._attention.add(victim.spec.name)
                # Requests for it that reached the router before the first one it makes way for are
                # still its own to serve (`_came_before_its_drain`).
                victim.wanted_after = self._requests[wanted.waiting[0]].arrived
            if now >= self._release_at(victim):
                if victim.in_flight:
                    victim.draining_since = now
                else:
                    decisions.append(self._stop(victim, f"making room for {wanted.spec.name!r}"))
        return decisions

    def _release_at(self, slot: _Slot) -> float:
        """When a ready model that another one waits for stops taking its own requests: busy, at the
        end of `swap_delay`; idle, once its clients' usual gap has passed with no request (its demand
        has stopped), and never later than that; at once if it has served nobody since it loaded, or
        if the client it served last has since asked for another model (one client switching models
        is not kept waiting for a turnaround of its own that will not come). `tick` runs at this time
        (`next_wakeup`)."""
        assert slot.wanted_since is not None
        bound = slot.wanted_since + self.rules.swap_delay
        if slot.in_flight:
            return bound
        if slot.idle_since is None or slot.client_moved_on:
            return slot.wanted_since
        return min(bound, slot.idle_since + idle_grace(slot.gap))

    def _projected(self) -> dict[str, int]:
        """Resources held once what is stopping now has gone (starting and ready profiles)."""
        projected = self.used()
        for slot in self._slots.values():
            if slot.state is State.STOPPING:
                _subtract(projected, slot)
        return projected

    def _others(self, slot: _Slot) -> list[_Slot]:
        return [other for other in self._slots.values() if other is not slot]


# ---------------------------------------------------------------------------------------------- policy


def choose_victims(
    candidates: Iterable[_Slot],
    need: Resources,
    projected: Mapping[str, int],
    budget: Mapping[str, int],
    *,
    drain_busy: bool,
) -> list[_Slot]:
    """The eviction rule, whole: which models make way for `need`, in the order they go.

    Preloads still starting go first, then idle ready models (lowest priority, least recently used
    first), then, where `drain_busy`, busy ones (those already draining first, so choices stay
    stable), which the caller drains rather than cuts. Pinned models are never chosen, nor one that
    frees nothing on a device where `need` is short. `projected` is what is held once the models
    already stopping are gone; the choice ends as soon as `need` fits beside what is left. Then a
    victim that a later (more valued) one made unnecessary is spared: the chosen are tried from the
    most valued down, and each without which `need` still fits stays, so no more models stop than
    the room needs (a small idle model is not stopped for room a large one's stop already made)."""
    evictable = [
        slot
        for slot in candidates
        if not slot.spec.pinned
        and (
            (slot.state is State.STARTING and slot.preload)
            or (slot.state is State.READY and (drain_busy or not slot.in_flight))
        )
    ]
    evictable.sort(key=_eviction_key)
    left = dict(projected)
    victims: list[_Slot] = []
    for slot in evictable:
        if fits(need, left, budget):
            break
        lacking = [device for device, amount in need.items() if short(device, amount, left, budget)]
        if not any(slot.footprint.get(device, 0) > 0 for device in lacking):
            continue
        _subtract(left, slot)
        victims.append(slot)
    if not fits(need, left, budget):
        return victims  # not enough even with all of them: the caller waits for busy loads
    for slot in reversed(victims[:-1]):  # the last one chosen made it fit: it is needed
        _add(left, slot)
        if fits(need, left, budget):
            victims.remove(slot)
        else:
            _subtract(left, slot)
    return victims


# How many leading fields of `_eviction_key` say what kind of model it is (a preload, idle, draining
# or busy), before its priority and recency rank it among its kind.
_KIND = 3


def _eviction_key(slot: _Slot) -> tuple[bool, bool, bool, int, float]:
    """The eviction order: the lower, the sooner a model makes way (see `choose_victims`)."""
    return (
        slot.state is not State.STARTING,
        bool(slot.in_flight),
        slot.draining_since is None,
        slot.spec.priority,
        slot.last_used,
    )


def demand(slot: _Slot, now: float) -> float:
    """How much `slot` was asked for lately, as of `now`: its requests, each halved every
    DEMAND_HALF_LIFE seconds since it came."""
    if not slot.demand:
        return 0.0
    return slot.demand * 0.5 ** (max(0.0, now - slot.demand_at) / DEMAND_HALF_LIFE)


def _new_slot(spec: ProfileSpec) -> _Slot:
    """The state of a profile the scheduler has just been told of: cold, or failed if it cannot run."""
    slot = _Slot(spec, dict(spec.footprint), need=spec.placement.need if spec.placement else 0)
    if spec.cannot_run:
        slot.state, slot.last_error = State.FAILED, spec.cannot_run
    return slot


def idle_grace(gap: float | None) -> float:
    """How long an idle model in use is kept for its own clients' next request, given their last gap."""
    return max(GRACE_MIN, GRACE_GAPS * gap) if gap is not None else GRACE_MIN


def leased(device: str) -> bool:
    """Whether a device holds one model at most (an RPC worker serves one llama-server at a time)."""
    return device.startswith(LEASED_PREFIX)


def short(device: str, amount: int, used: Mapping[str, int], budget: Mapping[str, int]) -> bool:
    """Whether `amount` more does not fit on `device` beside `used`. A leased device that anyone
    holds has no room for another model at all, so a swap stops its holder before the next starts."""
    held = used.get(device, 0)
    if amount > 0 and leased(device) and held > 0:
        return True
    return held + amount > budget.get(device, 0)


def fits(footprint: Resources, used: Mapping[str, int], budget: Mapping[str, int]) -> bool:
    return not any(short(device, amount, used, budget) for device, amount in footprint.items())


def _subtract(projected: dict[str, int], slot: _Slot) -> None:
    for device, amount in slot.footprint.items():
        projected[device] = projected.get(device, 0) - amount


def _add(projected: dict[str, int], slot: _Slot) -> None:
    for device, amount in slot.footprint.items():
        projected[device] = projected.get(device, 0) + amount
