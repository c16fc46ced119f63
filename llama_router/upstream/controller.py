"""The effects around the scheduler: feeds it events, carries out its decisions.

Requests become futures that a `Dispatch` resolves with a running upstream or a `Fail` rejects;
`Start` and `Stop` become supervisor tasks whose outcomes come back as events. All scheduler calls
happen on the event loop thread, so the scheduler itself needs no locking.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from llama_router.config.schema import ResolvedProfile, RouterConfig, ServerConfig
from llama_router.config.state import state_dir
from llama_router.core.errors import RouterError
from llama_router.core.events import (
    EventBus,
    Failed,
    FallbackServed,
    FootprintLearned,
    Loading,
    LoadingProgress,
    Ready,
    Reloaded,
    Stopped,
    Stopping,
    Unhealthy,
    context_event,
)
from llama_router.core.placement import Placed
from llama_router.core.scheduler import (
    Decision,
    Dispatch,
    Fail,
    FailReason,
    ProfileSpec,
    ProfileView,
    Rules,
    Scheduler,
    Start,
    State,
    Stop,
)
from llama_router.sizing.budgets import Sizing
from llama_router.sizing.buffer_log import BufferTally
from llama_router.sizing.fit import Claim, fit_args
from llama_router.sizing.memory import MIB, is_gpu, nvml_usage_by_pid, page_in
from llama_router.sizing.placement import device_order, dry_run, launch_settings
from llama_router.upstream.child_protocol import LoadProgress
from llama_router.upstream.context_cache import ContextKeeper
from llama_router.upstream.downloads import PendingModel
from llama_router.upstream.logs import LogBuffers
from llama_router.upstream.peers import Peers
from llama_router.upstream.release import MemoryRelease
from llama_router.upstream.rpc import probe_all, unanswered
from llama_router.upstream.slots import SlotReader, Work, slot_work
from llama_router.upstream.supervisor import LoadError, StoppedBeforeSpawn, Upstream
from llama_router.upstream.target import Target
from llama_router.upstream.upstream_http import UpstreamPool

log = logging.getLogger("llama_router")

# Failures a fallback profile may answer for; a plain queue timeout is not one.
FALLBACK_CODES = frozenset(
    {
        FailReason.MODEL_LOAD_FAILED,
        FailReason.MODEL_FAILED,
        FailReason.MODEL_LOAD_TIMEOUT,
        FailReason.MODEL_TOO_LARGE,
    }
)
# The HTTP status a client gets for each of the scheduler's refusals.
FAIL_STATUS: dict[FailReason, int] = {
    FailReason.SHUTTING_DOWN: 503,
    FailReason.TOO_MANY_WAITING: 429,
    FailReason.MODEL_LOAD_FAILED: 503,
    FailReason.MODEL_FAILED: 503,
    FailReason.MODEL_LOAD_TIMEOUT: 503,
    FailReason.MODEL_WAIT_TIMEOUT: 503,
    FailReason.MODEL_TOO_LARGE: 503,
    FailReason.MODEL_REMOVED: 503,
    FailReason.MODEL_UNLOADED: 503,
}
# llama.cpp's ways of saying an allocation failed (CUDA, Metal, Vulkan, ggml's allocators).
OUT_OF_MEMORY = re.compile(
    r"out of memory|failed to allocate|unable to allocate|ErrorOutOfDeviceMemory|cudaMalloc failed", re.I
)


@dataclass
class Lease:
    """A request's hold on a running upstream, or on a peer; release it when the answer has been sent."""

    request_id: int
    profile: str  # the profile, or for a peer the route `<peer>/<model>`
    target: Target
    waited: float
    released: bool = field(default=False)
    fallback_for: str | None = None  # the profile asked for, when a fallback serves instead
    served_name: str = ""  # what the upstream calls the model in its answers
    ask_as: str | None = None  # the `model` the request is sent with, when not the client's


class LocalTarget:
    """A lease's target on a llama-server process of ours: the scheduler hears when it is done."""

    __slots__ = ("authority", "controller", "request_id", "upstream")
    credentials = b""
    takes_client_key = True  # unless the router has keys of its own (the proxy's header filter)
    quiet_loads = False  # a local load is seen by the scheduler: the wait happens before sending
    listed_as = None
    after_stall = "it is being restarted"

    def __init__(self, controller: Controller, upstream: Upstream, request_id: int) -> None:
        self.controller, self.upstream, self.request_id = controller, upstream, request_id
        self.authority = upstream.authority

    @property
    def address(self) -> tuple[str, int] | str:
        return self.upstream.address

    @property
    def pool(self) -> UpstreamPool:
        return self.controller.pool

    def request_target(self, target: str, ask_as: str | None, has_body: bool) -> str:
        return target

    def patience(self) -> Callable[[float], Awaitable[bool]]:
        return functools.partial(self.controller.slots.still_working, self.upstream)

    def serving(self) -> bool:
        upstream = self.upstream
        return not upstream.stopping and not upstream.gone.is_set() and upstream.is_alive()

    def answered(self, seconds: float) -> None:
        pass

    def failed(self, reason: str) -> str:
        return ""

    def unhealthy(self, reason: str) -> None:
        self.controller.upstream_unhealthy(self.upstream, reason)

    async def died(self, grace: float) -> bool:
        """Whether the process has died, allowing it a moment: the kernel resets its connections
        while it exits, just before the exit can be seen."""
        if await self.controller.upstream_refused(self.upstream):
            return True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.upstream.gone.wait(), grace)
        return await self.controller.upstream_refused(self.upstream)

    def release(self) -> None:
        self.controller.request_finished(self.request_id, self.upstream.profile.name)


class Controller:
    """Owns the scheduler, the upstream processes and the requests waiting for them."""

    def __init__(self, config: RouterConfig, events: EventBus | None = None) -> None:
        self.config = config
        self.events = events if events is not None else EventBus()
        server = config.server
        self.sizing = Sizing(config)
        self.started_at = time.time()
        self.pool = UpstreamPool()  # the connections to the processes, shared by their requests
        self.peers = Peers(config.peers, self.events.emit, local=config.names, created=int(self.started_at))
        self.scheduler = Scheduler(
            (self._spec(profile) for profile in config.profiles.values()),
            self.sizing.budget(),
            _rules(server),
        )
        self._tallies: dict[str, BufferTally] = {}
        self._closed = False
        self._prober: asyncio.Future[None] | None = None
        self.contexts = ContextKeeper(config, state_dir(config) / "slots")
        self.logs = LogBuffers(config)
        self.upstreams: dict[str, Upstream] = {}
        self.downloads: dict[str, PendingModel] = {}  # models on their way in (POST /models)
        self.owner_tag = f"{os.getpid()}"
        self._ids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future[Upstream]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._socket_dir: Path | None = None  # upstreams' Unix sockets, private to the router
        self.slots = SlotReader(self._read_slots, self.now)
        self.driver_memory = MemoryRelease(self.sizing.devices, server.memory.release_wait)

    def _spec(self, profile: ResolvedProfile) -> ProfileSpec:
        return self.sizing.spec(profile)

    async def reload(self, config: RouterConfig) -> dict[str, list[str]]:
        """Adopt a new config. Profiles whose process would run the same command keep running and
        serving; changed ones restart once idle; removed ones drain and stop; new ones are added."""
        old = self.config
        summary: dict[str, list[str]] = {"kept": [], "restarted": [], "added": [], "removed": []}
        for name, profile in config.profiles.items():
            before = old.profiles.get(name)
            if before is None:
                summary["added"].append(name)
            elif _launch_identity(before) == _launch_identity(profile):
                summary["kept"].append(name)
            else:
                summary["restarted"].append(name)
        summary["removed"] = [name for name in old.profiles if name not in config.profiles]
        self.config = config
        self.sizing.reconfigure(config)
        self.peers.reconfigure(config.peers, config.names)
        self.contexts.forget_removed(config)
        self.logs.reconfigure(config)
        now = self.now()
        specs = []
        for profile in config.profiles.values():
            spec = self._spec(profile)
            if profile.name in summary["kept"] and profile.footprint_mib is None and spec.placement is None:
                # Same process, same use: keep what was learned from it.
                spec = dataclasses.replace(spec, footprint=self.view(profile.name).footprint)
            specs.append(spec)
        self.scheduler.retune(_rules(config.server))
        decisions = self.scheduler.reconfigure(specs, self.sizing.budget(), now)
        for name in summary["restarted"]:
            decisions.extend(self.scheduler.restart_when_idle(name, now))
        self._apply(decisions)
        log.debug("config reloaded: %s", {key: value for key, value in summary.items() if value})
        self.events.emit(
            Reloaded(summary["kept"], summary["restarted"], summary["added"], summary["removed"])
        )
        return summary

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for profile in self.config.profiles.values():
            if profile.problem:
                log.error("%s cannot run and is served as failed: %s", profile.name, profile.problem)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True), trust_env=False
        )
        if self.config.server.upstream_sockets:
            self._socket_dir = private_dir()
        for profile in self.config.profiles.values():
            if profile.standby:
                self._read_ahead(profile)
        if self.config.server.health_check_interval > 0:
            self._prober = asyncio.ensure_future(self._probe_idle_upstreams())
        await self.peers.start()
        self._apply(self.scheduler.tick(self.now()))  # preloads for standby profiles

    async def close(self, grace: float | None = None) -> None:
        """Fail waiting requests, stop every upstream and wait for them to exit."""
        self._closed = True
        if self._prober is not None:
            self._prober.cancel()
        self._apply(self.scheduler.shutdown(self.now()))
        pending = [task for task in self._tasks if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=grace)
        for upstream in list(self.upstreams.values()):
            upstream.kill_now()
        if self._timer is not None:
            self._timer.cancel()
        if self._session is not None:
            await self._session.close()
        await self.peers.close()
        await self.pool.close()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    # The clock the scheduler decides by; read several times per request, so the C function itself
    # rather than a method calling it.
    now = staticmethod(time.monotonic)

    # ------------------------------------------------------------------------------------------ requests

    def take(
        self,
        profile: str,
        *,
        fallback: bool = True,
        client: Hashable | None = None,
        arrived: float | None = None,
    ) -> Lease | Awaitable[Lease]:
        """`acquire` without a coroutine where none is needed: the lease itself when `profile`'s
        model is ready and takes requests (the usual request, dispatched as it arrives), else what
        to await for it. The request path takes; everything else acquires."""
        if profile in self.config.profiles and self.scheduler.accepting(profile):
            return self._arrive(profile, client, arrived)
        return self._acquire(profile, fallback, client, arrived)

    async def acquire(
        self,
        profile: str,
        *,
        fallback: bool = True,
        client: Hashable | None = None,
        arrived: float | None = None,
    ) -> Lease:
        """Wait until `profile` runs and may take this request; raises RouterError otherwise. A
        peer's route (`<peer>/<model>`, no profile's name) is taken at once: the peer loads its own.

        When the profile's model is failed or cannot be loaded, its `fallback` profiles (or peer
        models) are tried in order; the lease then says which profile it was asked for. `client`
        (the client's connection) lets the scheduler see a client move on from one model to another;
        `arrived` (on `now`'s clock) is when the request reached the router, if before now."""
        got = self.take(profile, fallback=fallback, client=client, arrived=arrived)
        return got if isinstance(got, Lease) else await got

    async def _acquire(
        self, profile: str, fallback: bool, client: Hashable | None, arrived: float | None
    ) -> Lease:
        """`acquire`'s way through `profile`'s fallbacks."""
        config = self.config.profiles.get(profile)
        if config is None:
            if self.peers.target(profile) is not None:
                return self._take_peer(profile)
            # resolved just before a reload removed it
            raise RouterError(404, f"model {profile!r} was removed from the config", code="model_not_found")
        chain = [profile, *config.fallback] if fallback else [profile]
        error: RouterError | None = None
        for index, name in enumerate(chain):
            last = index == len(chain) - 1
            local = name in self.config.profiles
            if not last and local and self.view(name).failed:
                continue  # known broken: go straight to the fallback
            try:
                if local:
                    got = self._arrive(name, client, arrived)
                    lease = got if isinstance(got, Lease) else await got
                else:
                    lease = self._take_peer(name)
            except RouterError as exc:
                if last or exc.code not in FALLBACK_CODES:
                    raise
                error = exc
                continue
            if name != profile:
                lease.fallback_for = profile
                if lease.ask_as is None:
                    lease.ask_as = name  # a fallback is asked under its own name
                log.warning(
                    "serving %r with fallback %r: %s", profile, name, error.message if error else "failed"
                )
                self.events.emit(FallbackServed(profile, name))
            return lease
        raise AssertionError("unreachable: the last profile in the chain returns or raises")

    def _arrive(
        self, profile: str, client: Hashable | None, arrived: float | None
    ) -> Lease | Awaitable[Lease]:
        """Tell the scheduler of a request for the local `profile`: its lease where it is dispatched
        at once, else what waits for the dispatch."""
        request_id = next(self._ids)
        now = self.now()
        decisions = self.scheduler.request_arrived(
            request_id, profile, now, now + self.config.server.wait_timeout, client, arrived
        )
        if len(decisions) == 1:
            # The common case, a model that is ready: dispatched at once, no future to wait on.
            decision = decisions[0]
            if type(decision) is Dispatch and decision.request_id == request_id:
                ready = self.upstreams.get(decision.profile)
                if ready is not None:
                    # No timer to re-arm: a dispatch only makes its model busy, which moves no
                    # deadline earlier (a timer that fires early finds nothing due and re-arms).
                    target = LocalTarget(self, ready, request_id)
                    return Lease(request_id, profile, target, self.now() - now, served_name=ready.served_name)
        future: asyncio.Future[Upstream] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = future
        self._apply(decisions)
        return self._dispatched(request_id, profile, future, now)

    async def _dispatched(
        self, request_id: int, profile: str, future: asyncio.Future[Upstream], since: float
    ) -> Lease:
        try:
            upstream = await future
        except asyncio.CancelledError:
            # The client went away while waiting: its place in the queue is given up.
            # If it had just been dispatched, this also gives its upstream slot back.
            self._waiters.pop(request_id, None)
            self._apply(self.scheduler.request_finished(request_id, self.now()))
            raise
        target = LocalTarget(self, upstream, request_id)
        return Lease(request_id, profile, target, self.now() - since, served_name=upstream.served_name)

    def _take_peer(self, route: str) -> Lease:
        target, model = self.peers.take(route)
        return Lease(next(self._ids), route, target, 0.0, served_name=model, ask_as=model)

    def release(self, lease: Lease) -> None:
        if not lease.released:
            lease.released = True
            lease.target.release()

    async def load(self, profile: str) -> None:
        """Load `profile` as a request would (making room if needed) and return once it is ready."""
        self.release(await self.acquire(profile, fallback=False))

    def unload(self, profile: str, *, force: bool = False) -> None:
        """Unload `profile` (see `Scheduler.unload`). Forced, the process is signalled now, whatever
        its stop was doing (saving prompt caches, waiting for requests), and SIGKILLed once
        `stop_timeout` has passed; one not spawned yet is never started."""
        self._apply(self.scheduler.unload(profile, self.now(), force=force))
        upstream = self.upstreams.get(profile)
        if force and upstream is not None and self.view(profile).state is State.STOPPING:
            self._spawn(upstream.stop(upstream.profile.stop_timeout))

    # ------------------------------------------------------------------------------------------ decisions

    def _apply(self, decisions: Iterable[Decision]) -> None:
        for decision in decisions:
            if isinstance(decision, Dispatch):
                self._resolve(decision)
            elif isinstance(decision, Fail):
                waiter = self._waiters.pop(decision.request_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(refusal(decision))
            elif isinstance(decision, Start):
                self._spawn(self._start(decision.profile, self._launch(decision.profile, decision.placed)))
            elif isinstance(decision, Stop):
                # The process stopped is the one running when the stop is decided, not a later one;
                # told now, so that no `stopped` (a spawn that never happened) is reported before.
                upstream = self.upstreams.get(decision.profile)
                if upstream is not None:
                    upstream.mark_stopping()
                log.info("stopping %s: %s", decision.profile, decision.reason)
                self.events.emit(Stopping(decision.profile, decision.reason, decision.cause))
                self._spawn(self._stop(decision.profile, upstream))
        self._arm_timer()

    def _resolve(self, decision: Dispatch) -> None:
        future = self._waiters.pop(decision.request_id, None)
        upstream = self.upstreams.get(decision.profile)
        if future is None or future.done():
            return
        if upstream is None:  # cannot happen while the scheduler and supervisor agree
            future.set_exception(RouterError(502, f"model {decision.profile!r} is not running"))
            return
        future.set_result(upstream)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal task failed", exc_info=task.exception())

    def _arm_timer(self, sooner: float | None = None) -> None:
        """Have `tick` run at the scheduler's next wakeup; given `sooner` (one profile's), only
        brought forward to it if it comes first (a timer that fires early finds nothing due and
        re-arms for the next)."""
        if self._loop is None:
            return
        if sooner is not None:
            if self._timer is not None and self._timer.when() <= sooner + 0.001:
                return
            wake: float | None = sooner
        else:
            wake = self.scheduler.next_wakeup()
        # loop.time() and time.monotonic() share a clock in asyncio's default loops and uvloop.
        at = max(wake, self._loop.time()) + 0.001 if wake is not None else None
        if self._timer is not None:
            if at is not None and abs(self._timer.when() - at) < 1e-6:
                return
            self._timer.cancel()
            self._timer = None
        if at is not None:
            self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._apply(self.scheduler.tick(self.now()))

    # ------------------------------------------------------------------------------------------ processes

    def _record_output(self, profile: str, line: str) -> None:
        self.logs[profile].append(line)
        tally = self._tallies.get(profile)
        if tally is not None:
            tally.feed(line)
            upstream = self.upstreams.get(profile)
            if tally.loaded and upstream and self.scheduler.view(profile).state is State.READY:
                self._learn_footprint(upstream)

    def _record_progress(self, profile: str, progress: LoadProgress) -> None:
        if self.load_progress(profile) is progress:
            self.events.emit(LoadingProgress(profile, progress.payload, progress.percent))

    def load_progress(self, profile: str) -> LoadProgress | None:
        """How far `profile`'s load has come, where its llama-server reports it (None once it is
        ready: a report read after that is not news)."""
        upstream = self.upstreams.get(profile)
        if upstream is None or self.scheduler.view(profile).state is not State.STARTING:
            return None
        return upstream.progress

    def _read_ahead(self, profile: ResolvedProfile) -> None:
        """Keep a likely-next model's file in the page cache while host RAM is free."""
        if self.config.server.readahead and self._loop is not None:
            keep_free = self.config.server.memory.ram_headroom * MIB
            self._loop.run_in_executor(None, page_in, str(profile.model_path), keep_free)

    def _learn_footprint(self, upstream: Upstream) -> None:
        """Replace the estimate with what the loaded llama-server reports using."""
        name = upstream.profile.name
        tally = self._tallies.get(name)
        if tally is None or not tally.loaded:
            return  # _record_output learns once the output says the model is loaded
        del self._tallies[name]
        if upstream.profile.footprint_mib is not None:
            return
        if tally.shrunk():
            placed, layers = tally.offloaded or (0, 0)
            log.warning(
                "%s: --fit put %d of %d layers on the GPUs for lack of free memory; this load's "
                "buffers are not learned as its footprint",
                name,
                placed,
                layers,
            )
            return
        measured, sources = tally.measured()
        by_driver = nvml_usage_by_pid().get(upstream.pid or -1, {})
        by_driver = {device: used for device, used in by_driver.items() if device in self.sizing.budget()}
        if by_driver:
            measured = {**measured, **by_driver}
            why = f"NVML: what the driver says process {upstream.pid} uses (wins over the log)"
            sources |= {device: [{"line": why, "bytes": used}] for device, used in by_driver.items()}
        if not measured:
            return
        if not self.sizing.learn(upstream.profile, measured, sources, self.scheduler.view(name).placed):
            log.info("%s: partly in RAM: this load's GPU part is not kept as what it needs", name)
        self.events.emit(FootprintLearned(name, measured))
        self._apply(
            self.scheduler.footprint_measured(
                name,
                self.sizing.with_claims(upstream.profile, measured),
                self.now(),
                placeable=self.sizing.spec(upstream.profile),
            )
        )

    def _launch(self, name: str, placed: Placed | None = None) -> Upstream | None:
        """The upstream a `Start` decided, registered (and its load told) at once: a `Stop` decided
        before its process exists finds it there and marks it, and the spawn carries the stop out.
        A placed model sees only its GPUs (and a split gets its `--tensor-split`); one whose profile
        fixes them by `CUDA_VISIBLE_DEVICES` numbers them in NVML's order."""
        profile = self.config.profiles.get(name)
        if profile is None:  # a reload removed it between the decision and now
            return None
        server = self.config.server
        env, args = (
            launch_settings(placed, profile, self.sizing.devices)
            if placed
            else (device_order(profile.env), [])
        )
        # --fit reads the GPUs this process will see: a placed one's (footprints stay keyed by the profile)
        seen = profile.model_copy(update={"env": {**profile.env, **env}}) if env else profile
        upstream = Upstream(
            profile,
            log_lines=server.log_lines,
            health_interval=server.health_interval,
            owner_tag=self.owner_tag,
            on_output=self._record_output,
            on_progress=self._record_progress,
            extra_args=[*self.contexts.extra_args(profile), *args, *self._fit_args(seen)],
            extra_env=env,
            socket_dir=self._socket_dir,
        )
        self.upstreams[name] = upstream
        self._tallies[name] = BufferTally(
            self.sizing.devices, [*profile.args, *args], {**profile.env, **env}, f"llama-server for {name!r}"
        )
        self.events.emit(Loading(name, placed.describe() if placed else None))
        shown = " ".join([*(f"{key}={value}" for key, value in env.items()), *profile.shown_command(), *args])
        self.logs[name].append(f"[llama-router] starting: {shown}")
        if placed is not None:
            log.info("placing %s: %s", name, placed.why)
        return upstream

    def _fit_args(self, profile: ResolvedProfile) -> list[str]:
        """An explicit context and the `--fit-target` that keeps free what the other resident models
        were promised and have not taken (sizing/fit.py)."""
        others = [
            view
            for view in self.views()
            if view.name != profile.name and view.state in (State.STARTING, State.READY)
        ]
        by_driver = nvml_usage_by_pid() if others else {}
        claims = []
        for view in others:
            upstream = self.upstreams.get(view.name)
            held = by_driver.get(upstream.pid) if upstream is not None and upstream.pid else None
            claims.append(Claim(view.footprint, held, loaded=view.state is State.READY))
        headroom = self.config.server.memory.gpu_headroom * MIB
        return fit_args(profile, self.sizing.devices, headroom, claims)

    def _gpus(self, name: str) -> list[str]:
        """The GPUs a profile's footprint takes memory on."""
        return [device for device, amount in self.view(name).footprint.items() if is_gpu(device) and amount]

    def _not_started(self, upstream: Upstream, reason: str) -> None:
        """The upstream never got a process (a stop came first, or the spawn failed): let go of it
        and tell the scheduler, which counts a failure unless it had decided to stop it."""
        name = upstream.profile.name
        if self.upstreams.get(name) is upstream:
            del self.upstreams[name]
        self._tallies.pop(name, None)
        upstream.gone.set()
        if upstream.stopping:
            log.info("%s stopped before its process was started", name)
            self.events.emit(Stopped(name))
        else:
            self.logs[name].append(f"[llama-router] {reason}")
            self.events.emit(Failed(name, reason))
        self._apply(self.scheduler.process_exited(name, self.now(), reason))

    async def _start(self, name: str, upstream: Upstream | None) -> None:
        if upstream is None:
            self._apply(self.scheduler.process_exited(name, self.now(), "removed from the config"))
            return
        profile = upstream.profile
        if profile.rpc and (problem := unanswered(await probe_all(profile.rpc))):
            reason = f"cannot load {name!r}: {problem}"
            log.warning("%s", reason)
            self._not_started(upstream, reason)
            return
        await self.driver_memory.settled(self._gpus(name), name)
        try:
            await upstream.spawn()
        except StoppedBeforeSpawn:
            self._not_started(upstream, f"{name!r} was stopped before its process was started")
            return
        except OSError as exc:
            self._not_started(
                upstream, f"could not start {profile.binary} for {name!r}: {exc.strerror or exc}"
            )
            return
        self._spawn(self._watch_exit(upstream))
        assert self._session is not None
        try:
            await upstream.wait_ready(self._session)
        except LoadError:
            return  # the exit watcher reports it
        if profile.keep_context and not upstream.stopping:
            restored = await self.contexts.restore(upstream, upstream.client(self._session))
            if restored:  # a dict with `error` reports a failure; the load goes on without the cache
                self.events.emit(context_event(name, "restore", restored))
        if self.upstreams.get(name) is upstream and not upstream.stopping:
            load_seconds = upstream.ready_at - upstream.spawned_at
            log.info("%s ready in %.3fs on %s", name, load_seconds, upstream.authority)
            self.events.emit(Ready(name, round(load_seconds, 4), upstream.port))
            self._apply(self.scheduler.process_ready(name, self.now()))
            self._learn_footprint(upstream)

    async def _watch_exit(self, upstream: Upstream) -> None:
        name = upstream.profile.name
        await upstream.wait_exit()
        state = self.view(name).state
        when = {State.STARTING: "during load", State.STOPPING: "after stop"}.get(state, "while serving")
        reason = upstream.exit_reason(when)
        if self.upstreams.get(name) is upstream:
            del self.upstreams[name]
        self.slots.forget(upstream)
        self.driver_memory.exited(upstream.pid, self._gpus(name))
        out_of_memory = state is State.STARTING and any(OUT_OF_MEMORY.search(line) for line in upstream.log)
        if state is State.STOPPING:
            log.info("%s stopped", name)
            self.events.emit(Stopped(name))
            self._read_ahead(upstream.profile)  # it was just in use: keep its file warm
        else:
            log.warning("%s", reason)
            self.events.emit(Failed(name, reason))
        self._apply(self.scheduler.process_exited(name, self.now(), reason, out_of_memory=out_of_memory))
        upstream.gone.set()

    def request_finished(self, request_id: int, profile: str) -> None:
        """A dispatched request for `profile` has ended."""
        decisions = self.scheduler.request_finished(request_id, self.now())
        if decisions:
            self._apply(decisions)
        elif (wake := self.scheduler.next_wakeup_of(profile)) is not None:
            # Only `profile`'s own state changed (it may be idle now, its `ttl` running): the one
            # time that may have come earlier, looked up without a pass over every profile.
            self._arm_timer(wake)

    def upstream_unhealthy(self, upstream: Upstream, reason: str) -> None:
        """Restart an upstream that lives but does not work; its requests in flight end with an error."""
        name = upstream.profile.name
        if self.upstreams.get(name) is not upstream:
            return
        log.warning("%s is unhealthy: %s", name, reason)
        self.events.emit(Unhealthy(name, reason))
        self._apply(self.scheduler.upstream_unhealthy(name, self.now(), reason))

    async def _probe_idle_upstreams(self) -> None:
        """Every `health_check_interval`, ask idle models' `/health`; several failures in a row mean
        the process is wedged and is restarted."""
        server = self.config.server
        misses: dict[Upstream, int] = {}
        timeout = aiohttp.ClientTimeout(total=min(5.0, server.health_check_interval))
        while not self._closed:
            await asyncio.sleep(server.health_check_interval)
            assert self._session is not None
            for view in self.views():
                upstream = self.upstreams.get(view.name)
                if upstream is None or view.state is not State.READY or view.in_flight:
                    continue
                try:
                    session = upstream.client(self._session)
                    async with session.get(f"{upstream.base_url}/health", timeout=timeout) as response:
                        healthy = response.status == 200
                except (TimeoutError, aiohttp.ClientError):
                    healthy = False
                misses[upstream] = 0 if healthy else misses.get(upstream, 0) + 1
                if misses[upstream] >= server.health_check_failures:
                    del misses[upstream]
                    self.upstream_unhealthy(
                        upstream, f"/health failed {server.health_check_failures} times in a row while idle"
                    )
            for gone in [upstream for upstream in misses if upstream.gone.is_set()]:
                del misses[gone]

    async def _read_slots(self, upstream: Upstream, timeout: float) -> Work | None:
        """The upstream's `/slots` as work in progress; no answer within `timeout` reads as none."""
        assert self._session is not None
        work = None
        try:
            session = upstream.client(self._session)
            limit = aiohttp.ClientTimeout(total=timeout)
            async with session.get(f"{upstream.base_url}/slots", timeout=limit) as response:
                if response.status == 200:
                    work = slot_work(await response.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("no /slots from %s: %s", upstream.profile.name, exc)
        return work

    async def upstream_refused(self, upstream: Upstream, patience: float = 2.0) -> bool:
        """A connection to `upstream` was refused. If its process has died, wait until the router has
        taken note (so a retry starts a fresh one) and return True; False if it still lives."""
        if not upstream.gone.is_set() and upstream.is_alive():
            return False
        try:
            await asyncio.wait_for(upstream.gone.wait(), patience)
        except TimeoutError:
            return False
        return True

    async def _stop(self, name: str, upstream: Upstream | None) -> None:
        if upstream is None or upstream.process is None:
            return  # its spawn, still under way, starts no process or ends the one it started
        if upstream.profile.keep_context and upstream.ready_at and upstream.is_alive():
            assert self._session is not None
            saved = await self.contexts.save(upstream, upstream.client(self._session))
            if saved:  # a dict with `error` reports a failure; the stop goes on regardless
                self.events.emit(context_event(name, "save", saved))
        await upstream.stop(upstream.profile.stop_timeout)

    # ------------------------------------------------------------------------------------------ views

    def view(self, profile: str) -> ProfileView:
        """What the scheduler knows of one profile (KeyError if it is not configured)."""
        return self.scheduler.view(profile)

    def views(self) -> list[ProfileView]:
        """Every configured profile, in config order."""
        return self.scheduler.views()

    def accepting(self, profile: str) -> bool:
        """Whether a request for `profile` arriving now would be sent to its upstream at once (a
        peer's route always is: the peer loads its models itself)."""
        if profile not in self.config.profiles and self.peers.target(profile) is not None:
            return True
        return self.scheduler.accepting(profile)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for their model to load or to free up."""
        return self.scheduler.queue_depth

    def describe(self) -> list[dict[str, Any]]:
        """The state of every profile, for `/running` and the models list."""
        rows = []
        for view in self.views():
            upstream = self.upstreams.get(view.name)
            rows.append(
                {
                    "model": view.name,
                    "state": view.state.value,
                    "in_flight": view.in_flight,
                    "waiting": view.waiting,
                    "draining": view.draining,
                    "pid": upstream.pid if upstream else None,
                    "port": upstream.port if upstream and not upstream.socket_path else None,
                    "socket": upstream.socket_path if upstream else None,
                    "last_error": view.last_error or None,
                    "standby": view.standby,
                    "footprint": {k: v for k, v in view.footprint.items() if k != "slots"},
                    "footprint_why": self.sizing.footprint_why(self.config.profiles.get(view.name)),
                    "placement": view.placed.describe() if view.placed else None,
                }
            )
        return rows

    def where(self, name: str) -> dict[str, object]:
        """The dry run: where a start of this profile would go now and what it would stop."""
        answer = dry_run(self.scheduler.where(name), self.config.profiles[name])
        return {**answer, "state": self.scheduler.view(name).state.value}

    def budgets(self) -> dict[str, dict[str, Any]]:
        """Each device's budget and what resident models use of it, in bytes, and where the
        budget came from."""
        used = self.scheduler.used()
        return {
            device.name: {
                "total": device.total,
                "budget": device.budget,
                "used": used.get(device.name, 0),
                **device.describe(),
            }
            for device in self.sizing.devices
        }


def refusal(fail: Fail) -> RouterError:
    """The error a client gets for a request the scheduler refused."""
    return RouterError(
        FAIL_STATUS[fail.code], fail.message, code=fail.code.value, retry_after=fail.retry_after
    )


def _rules(server: ServerConfig) -> Rules:
    """The scheduler's settings from the config's `server` section."""
    return Rules(
        drain_timeout=server.drain_timeout,
        swap_delay=server.swap_delay,
        max_failures=server.max_failures,
        failure_window=server.failure_window,
        backoff=server.restart_backoff,
        backoff_max=server.restart_backoff_max,
        max_waiting=server.max_waiting,
    )


def private_dir() -> Path:
    """A new directory only this user may enter (0700), for the upstreams' Unix sockets: under
    `$XDG_RUNTIME_DIR` when set and short enough, else the system's temporary directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    usable = runtime if runtime and len(runtime) < 64 and os.path.isdir(runtime) else None
    return Path(tempfile.mkdtemp(prefix="llama-router-", dir=usable))


def _launch_identity(profile: ResolvedProfile) -> tuple[object, ...]:
    """What decides whether a running process still matches its profile."""
    return (profile.command("127.0.0.1", 0), sorted(profile.env.items()), profile.keep_context)
