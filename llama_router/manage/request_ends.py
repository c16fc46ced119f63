"""What follows a request's end, done for all the requests that ended within a few milliseconds.

A request's metrics, its activity row and its access line need nothing the client still waits for:
the router's one middleware hands each ended request here, and those that ended within `END_BATCH`
seconds of the first of them are counted, recorded and logged together. Done request by request, in
between the requests' own work, this bookkeeping ran with cold caches and cost about a third more
under load; once per event-loop turn, a turn under load held one or two ended requests and each pass
also cost a log write of its own. Gathered over a few milliseconds, a pass holds dozens and writes
their access lines at once (scripts/benchmarks/bench_cpu.py). It never runs between a request's
arrival and its answer. Readers that must count the latest requests (the metrics page) call `flush`
first; the requests board leaves out requests that have ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from aiohttp import web

from llama_router.relay.request_rules import RequestRecord

log = logging.getLogger("llama_router")

# Seconds ended requests wait for their bookkeeping, gathering with others: short beside anything a
# person or a scraper sees, long beside a request under load (a hundred end in 20 ms at 5 000/s).
END_BATCH = 0.02

# One kind of bookkeeping of an ended request (the metrics', the activity log's, the access log's).
EndHandler = Callable[[web.Request, RequestRecord], None]


class RequestEnds:
    """Ended requests waiting for their bookkeeping: at most `END_BATCH` seconds."""

    def __init__(self, handlers: Sequence[EndHandler]) -> None:
        self.handlers = tuple(handlers)
        self._ended: list[tuple[web.Request, RequestRecord]] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, request: web.Request, record: RequestRecord) -> None:
        """`request` has ended: its last byte is out, or its client left."""
        record.ended = time.perf_counter()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(END_BATCH, self.flush)
        self._ended.append((request, record))

    def flush(self) -> None:
        """Hand every request that has ended to each handler, in the order they ended (what the
        timer does; also what a reader of their figures and a shutdown do first)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ended, self._ended = self._ended, []
        for request, record in ended:
            for handler in self.handlers:
                try:
                    handler(request, record)
                except Exception:  # one failing must not cost the others their turn, nor other requests
                    log.exception("could not record the end of %s %s", record.method, record.path)
