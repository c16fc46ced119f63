"""The effects around the scheduler: feeds it events, carries out its decisions.

Requests become futures that a `Dispatch` resolves with a running upstream or a `Fail` rejects;
`Start` and `Stop` become supervisor tasks whose outcomes come back as events. All scheduler calls
happen on the event loop thread, so the scheduler itself needs no locking.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .config import RouterConfig
from .errors import RouterError
from .scheduler import Decision, Dispatch, Fail, ProfileSpec, Scheduler, Start, State, Stop
from .supervisor import LoadError, Upstream

log = logging.getLogger("llama_router")

EventListener = Callable[[dict[str, Any]], None]


@dataclass
class Lease:
    """A request's hold on a running upstream; release it when the answer has been sent."""

    request_id: int
    profile: str
    upstream: Upstream
    waited: float
    released: bool = field(default=False)


class Controller:
    """Owns the scheduler, the upstream processes and the requests waiting for them."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        server = config.server
        self.scheduler = Scheduler(
            (
                ProfileSpec(name, {"slots": 1}, profile.load_timeout)
                for name, profile in config.profiles.items()
            ),
            {"slots": server.max_resident},
            drain_timeout=server.drain_timeout,
            swap_delay=server.swap_delay,
        )
        self.logs: dict[str, deque[str]] = {name: deque(maxlen=server.log_lines) for name in config.profiles}
        self.upstreams: dict[str, Upstream] = {}
        self.owner_tag = f"{os.getpid()}"
        self.started_at = time.time()
        self._ids = itertools.count(1)
        self._waiters: dict[int, tuple[asyncio.Future[Upstream], float]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._listeners: list[EventListener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True), trust_env=False
        )

    async def close(self, grace: float | None = None) -> None:
        """Fail waiting requests, stop every upstream and wait for them to exit."""
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

    def now(self) -> float:
        return time.monotonic()

    def subscribe(self, listener: EventListener) -> Callable[[], None]:
        """Receive lifecycle events (dicts); returns the function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _emit(self, kind: str, **fields: Any) -> None:
        event = {"event": kind, "time": time.time(), **fields}
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not break scheduling
                log.exception("event listener failed")

    # ------------------------------------------------------------------------------------------ requests

    async def acquire(self, profile: str) -> Lease:
        """Wait until `profile` runs and may take this request; raises RouterError otherwise."""
        request_id = next(self._ids)
        now = self.now()
        future: asyncio.Future[Upstream] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = (future, now)
        self._apply(
            self.scheduler.request_arrived(request_id, profile, now, now + self.config.server.wait_timeout)
        )
        try:
            upstream = await future
        except asyncio.CancelledError:
            # The client went away while waiting: its place in the queue is given up.
            # If it had just been dispatched, this also gives its upstream slot back.
            self._waiters.pop(request_id, None)
            self._apply(self.scheduler.request_finished(request_id, self.now()))
            raise
        return Lease(request_id, profile, upstream, waited=self.now() - now)

    def release(self, lease: Lease) -> None:
        if not lease.released:
            lease.released = True
            self._apply(self.scheduler.request_finished(lease.request_id, self.now()))

    def unload(self, profile: str, *, force: bool = False) -> None:
        self._apply(self.scheduler.unload(profile, self.now(), force=force))

    # ------------------------------------------------------------------------------------------ decisions

    def _apply(self, decisions: Iterable[Decision]) -> None:
        for decision in decisions:
            if isinstance(decision, Dispatch):
                self._resolve(decision)
            elif isinstance(decision, Fail):
                waiter = self._waiters.pop(decision.request_id, None)
                if waiter is not None and not waiter[0].done():
                    waiter[0].set_exception(
                        RouterError(decision.status, decision.message, code=decision.code)
                    )
            elif isinstance(decision, Start):
                self._spawn(self._start(decision.profile))
            elif isinstance(decision, Stop):
                self._spawn(self._stop(decision.profile, decision.reason))
        self._arm_timer()

    def _resolve(self, decision: Dispatch) -> None:
        waiter = self._waiters.pop(decision.request_id, None)
        upstream = self.upstreams.get(decision.profile)
        if waiter is None:
            return
        future = waiter[0]
        if future.done():
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

    def _arm_timer(self) -> None:
        if self._loop is None:
            return
        wake = self.scheduler.next_wakeup()
        if self._timer is not None:
            if wake is not None and abs(self._timer.when() - wake) < 1e-6:
                return
            self._timer.cancel()
            self._timer = None
        if wake is not None:
            # loop.time() and time.monotonic() share a clock in asyncio's default loops and uvloop.
            self._timer = self._loop.call_at(max(wake, self._loop.time()) + 0.001, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._apply(self.scheduler.tick(self.now()))

    # ------------------------------------------------------------------------------------------ processes

    def _record_output(self, profile: str, line: str) -> None:
        self.logs[profile].append(line)

    async def _start(self, name: str) -> None:
        profile = self.config.profiles[name]
        server = self.config.server
        upstream = Upstream(
            profile,
            log_lines=server.log_lines,
            health_interval=server.health_interval,
            owner_tag=self.owner_tag,
            on_output=self._record_output,
        )
        self.upstreams[name] = upstream
        self._emit("loading", model=name)
        self.logs[name].append(f"[llama-router] starting: {' '.join(profile.command('127.0.0.1', 0))}")
        try:
            await upstream.spawn()
        except OSError as exc:
            self.upstreams.pop(name, None)
            reason = f"could not start {profile.binary} for {name!r}: {exc.strerror or exc}"
            self.logs[name].append(f"[llama-router] {reason}")
            self._emit("failed", model=name, reason=reason)
            self._apply(self.scheduler.process_exited(name, self.now(), reason))
            return
        self._spawn(self._watch_exit(upstream))
        assert self._session is not None
        try:
            await upstream.wait_ready(self._session)
        except LoadError:
            return  # the exit watcher reports it
        if self.upstreams.get(name) is upstream and not upstream.stopping:
            load_seconds = upstream.ready_at - upstream.spawned_at
            log.info("%s ready in %.3fs on port %s", name, load_seconds, upstream.port)
            self._emit("ready", model=name, load_seconds=round(load_seconds, 4), port=upstream.port)
            self._apply(self.scheduler.process_ready(name, self.now()))

    async def _watch_exit(self, upstream: Upstream) -> None:
        name = upstream.profile.name
        await upstream.wait_exit()
        state = self.scheduler.view(name).state
        when = {State.STARTING: "during load", State.STOPPING: "after stop"}.get(state, "while serving")
        reason = upstream.exit_reason(when)
        if self.upstreams.get(name) is upstream:
            del self.upstreams[name]
        if state is State.STOPPING:
            log.info("%s stopped", name)
            self._emit("stopped", model=name)
        else:
            log.warning("%s", reason)
            self._emit("failed", model=name, reason=reason)
        self._apply(self.scheduler.process_exited(name, self.now(), reason))

    async def _stop(self, name: str, reason: str) -> None:
        upstream = self.upstreams.get(name)
        log.info("stopping %s: %s", name, reason)
        self._emit("stopping", model=name, reason=reason)
        if upstream is None or upstream.process is None:
            return
        await upstream.stop(self.config.profiles[name].stop_timeout)

    # ------------------------------------------------------------------------------------------ views

    def describe(self) -> list[dict[str, Any]]:
        """The state of every profile, for `/running` and the models list."""
        rows = []
        for view in self.scheduler.views():
            upstream = self.upstreams.get(view.name)
            rows.append(
                {
                    "model": view.name,
                    "state": view.state.value,
                    "in_flight": view.in_flight,
                    "waiting": view.waiting,
                    "draining": view.draining,
                    "pid": upstream.pid if upstream else None,
                    "port": upstream.port if upstream else None,
                    "last_error": view.last_error or None,
                }
            )
        return rows

    def log_tail(self, name: str, lines: int = 20) -> str:
        return "\n".join(list(self.logs[name])[-lines:])
