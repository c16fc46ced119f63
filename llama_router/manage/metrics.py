"""Prometheus metrics: per model requests, errors, loads, swaps, waits, memory and tokens.

Each router has a registry of its own (never prometheus_client's global one), so several routers in
one process, as in the tests, keep separate figures. Counters are fed by each request's record as it
ends (requests, errors, waits, tokens from `usage`) and by the controller's lifecycle events (loads,
swaps, crashes); gauges are read from the scheduler and the processes at scrape time, so they cost
nothing between scrapes.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import psutil
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from llama_router.core.events import (
    ContextEvent,
    Event,
    Failed,
    FallbackServed,
    Loading,
    Ready,
    Stopping,
    Unhealthy,
)
from llama_router.core.scheduler import State
from llama_router.core.status import our_word
from llama_router.relay.request_rules import RequestRecord
from llama_router.upstream.controller import Controller

log = logging.getLogger("llama_router.metrics")

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

UNKNOWN_MODEL = "unknown"  # label for requests naming no known model (keeps label values bounded)

LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
CONTEXT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)

# ---------------------------------------------------------------------------------------------- metrics


class _LiveState(Collector):
    """Gauges read at scrape time from the controller's views and the upstream processes."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def collect(self) -> Iterator[Metric]:
        controller = self.controller
        views = controller.views()
        yield GaugeMetricFamily(
            "llama_router_queue_depth",
            "Requests waiting for their model to load or to free up",
            value=controller.queue_depth,
        )
        yield GaugeMetricFamily(
            "llama_router_upstream_processes",
            "llama-server processes the router runs now",
            value=len(controller.upstreams),
        )
        state = GaugeMetricFamily(
            "llama_router_model_state", "1 for each model's current status", labels=["model", "status"]
        )
        in_flight = GaugeMetricFamily(
            "llama_router_in_flight_requests", "Requests being answered by the model", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "llama_router_waiting_requests", "Requests waiting for the model", labels=["model"]
        )
        resident = GaugeMetricFamily(
            "llama_router_resident_bytes",
            "Memory a loaded model holds per device (measured once loaded, estimated before)",
            labels=["model", "device"],
        )
        rss = GaugeMetricFamily(
            "llama_router_upstream_rss_bytes", "Resident set size of the model's process", labels=["model"]
        )
        for view in views:
            state.add_metric([view.name, our_word(view.state, view.standby)], 1)
            in_flight.add_metric([view.name], view.in_flight)
            waiting.add_metric([view.name], view.waiting)
            if view.state in (State.STARTING, State.READY, State.STOPPING):
                for device, amount in view.footprint.items():
                    if device != "slots":
                        resident.add_metric([view.name, device], amount)
            upstream = controller.upstreams.get(view.name)
            if upstream is not None and upstream.pid is not None:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    rss.add_metric([view.name], psutil.Process(upstream.pid).memory_info().rss)
        yield from (state, in_flight, waiting, resident, rss)
        yield from _peer_gauges(controller)


def _peer_gauges(controller: Controller) -> Iterator[Metric]:
    """Each peer's health: up or not, its last latency and success, its requests in flight."""
    up = GaugeMetricFamily(
        "llama_router_peer_up", "1 while the peer answers, 0 once it failed", labels=["peer"]
    )
    latency = GaugeMetricFamily(
        "llama_router_peer_latency_seconds", "Seconds the peer's last answer took to begin", labels=["peer"]
    )
    success = GaugeMetricFamily(
        "llama_router_peer_last_success_timestamp_seconds", "When the peer last answered", labels=["peer"]
    )
    in_flight = GaugeMetricFamily(
        "llama_router_peer_in_flight_requests", "Requests being answered by the peer", labels=["peer"]
    )
    models = GaugeMetricFamily("llama_router_peer_models", "Models the peer lists", labels=["peer"])
    for peer in controller.peers:
        name = [peer.config.name]
        up.add_metric(name, 1 if peer.state == "up" else 0)
        in_flight.add_metric(name, peer.in_flight)
        models.add_metric(name, len(peer.models or ()))
        if peer.latency is not None:
            latency.add_metric(name, peer.latency)
        if peer.last_success is not None:
            success.add_metric(name, peer.last_success)
    yield from (up, latency, success, in_flight, models)


class _RequestFigures(Collector):
    """What each request for a model adds up to: requests by status, errors by code, tokens, and the
    wait histogram. Plain numbers, bumped without a lock on the request path (all of it runs on the
    event loop, as scrapes do) and turned into metric families when scraped."""

    def __init__(self) -> None:
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.errors: collections.Counter[tuple[str, str]] = collections.Counter()
        self.tokens: collections.Counter[tuple[str, str]] = collections.Counter()
        self.waits: dict[str, list[float]] = {}  # per model: a count per bucket (+Inf last), then the sum

    def waited(self, model: str, seconds: float) -> None:
        row = self.waits.get(model)
        if row is None:
            row = self.waits[model] = [0] * (len(WAIT_BUCKETS) + 2)
        row[bisect.bisect_left(WAIT_BUCKETS, seconds)] += 1
        row[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        yield _counter(
            "llama_router_requests",
            "Requests answered, by model and HTTP status",
            ["model", "status"],
            self.requests,
        )
        yield _counter(
            "llama_router_errors",
            "Failed requests by model and error code (including streams that failed after their start)",
            ["model", "code"],
            self.errors,
        )
        yield _counter(
            "llama_router_tokens",
            "Tokens reported in answers' usage, by kind (prompt or completion)",
            ["model", "kind"],
            self.tokens,
        )
        waits = HistogramMetricFamily(
            "llama_router_wait_seconds",
            "Seconds a request waited for its model (queue and load) before it was sent or failed",
            labels=["model"],
        )
        bounds = [*(str(float(bound)) for bound in WAIT_BUCKETS), "+Inf"]
        for model, row in self.waits.items():
            cumulative = itertools.accumulate(row[:-1])
            waits.add_metric([model], list(zip(bounds, cumulative, strict=True)), sum_value=row[-1])
        yield waits


def _counter(
    name: str, documentation: str, labels: list[str], counts: collections.Counter[Any]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, count in counts.items():
        family.add_metric([str(part) for part in key], count)
    return family


class Metrics:
    """The router's metrics; `render()` gives the Prometheus text exposition."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.registry = CollectorRegistry()
        registry = self.registry
        self.loads = Counter("llama_router_loads", "Loads started", ["model"], registry=registry)
        self.load_seconds = Histogram(
            "llama_router_load_seconds",
            "Seconds from spawn to ready, for loads that succeeded",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        self.load_failures = Counter(
            "llama_router_load_failures", "Loads that failed or timed out", ["model"], registry=registry
        )
        self.crashes = Counter(
            "llama_router_upstream_crashes",
            "Loaded upstreams that exited without being asked to",
            ["model"],
            registry=registry,
        )
        self.swaps = Counter(
            "llama_router_swaps",
            "Times the model was stopped to make room for another",
            ["model"],
            registry=registry,
        )
        self.context_operations = Counter(
            "llama_router_context_operations",
            "Prompt-cache saves (before a stop) and restores (after a start) that succeeded",
            ["model", "action"],
            registry=registry,
        )
        self.context_failures = Counter(
            "llama_router_context_failures",
            "Prompt-cache saves and restores that failed or timed out (the model went on without them)",
            ["model", "action"],
            registry=registry,
        )
        self.context_bytes = Counter(
            "llama_router_context_bytes",
            "Bytes of prompt cache written by saves and read by restores",
            ["model", "action"],
            registry=registry,
        )
        self.context_seconds = Histogram(
            "llama_router_context_seconds",
            "Seconds a prompt-cache save or restore took, failures included",
            ["model", "action"],
            buckets=CONTEXT_BUCKETS,
            registry=registry,
        )
        self.unhealthy = Counter(
            "llama_router_unhealthy",
            "Times a live upstream was restarted for stalling or failing its health probes",
            ["model"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "llama_router_fallbacks",
            "Requests a fallback profile answered because the model asked for was failed",
            ["model", "served_by"],
            registry=registry,
        )
        registry.register(_LiveState(controller))
        self._figures = _RequestFigures()
        registry.register(self._figures)
        self._loading: set[str] = set()
        self._unsubscribe = controller.events.subscribe(self._on_event)

    def close(self) -> None:
        self._unsubscribe()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------------------------------------ feeds

    def request_ended(self, request: web.Request, record: RequestRecord) -> None:
        """Count a request for a model as it ends: its status, error, wait and tokens."""
        if not record.for_model:
            return
        figures = self._figures
        model = record.profile or UNKNOWN_MODEL
        figures.requests[model, record.status] += 1
        if record.error is not None:
            figures.errors[model, record.error] += 1
        if record.waited is not None:
            figures.waited(model, record.waited)
        if record.usage is not None:
            served_by = record.served_by or model
            prompt, completion = record.usage
            figures.tokens[served_by, "prompt"] += prompt
            figures.tokens[served_by, "completion"] += completion

    def _on_event(self, event: Event) -> None:
        match event:
            case Loading(model=model):
                self.loads.labels(model).inc()
                self._loading.add(model)
            case Ready(model=model, load_seconds=seconds):
                self._loading.discard(model)
                self.load_seconds.labels(model).observe(seconds)
            case Failed(model=model):
                if model in self._loading:
                    self._loading.discard(model)
                    self.load_failures.labels(model).inc()
                else:
                    self.crashes.labels(model).inc()
            case Unhealthy(model=model):
                self.unhealthy.labels(model).inc()
            case FallbackServed(model=model, served_by=served_by):
                self.fallbacks.labels(model, served_by).inc()
            case Stopping(model=model, cause=cause):
                if model in self._loading:
                    self._loading.discard(model)
                    if cause.fails_a_load:
                        self.load_failures.labels(model).inc()
                elif cause.makes_room:
                    self.swaps.labels(model).inc()
            case ContextEvent(model=model):
                self._context(model, event)

    def _context(self, model: str, event: ContextEvent) -> None:
        action = event.action
        (self.context_operations if event.ok else self.context_failures).labels(model, action).inc()
        if event.bytes > 0:
            self.context_bytes.labels(model, action).inc(event.bytes)
        self.context_seconds.labels(model, action).observe(event.ms / 1000)
