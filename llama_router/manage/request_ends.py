"""What follows a request's end, done for all the requests that ended in one turn of the event loop.

A request's metrics, its activity row and its access line need nothing the client still waits for:
the router's one middleware hands each ended request here, and all that ended in one turn of the
event loop are counted, recorded and logged together just after it. Done request by request, in
between the requests' own work, this bookkeeping ran with cold caches and cost about a third more
under load (scripts/benchmarks/bench_cpu.py); in one pass it is cheaper, and it never runs between
a request's arrival and its answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from aiohttp import web

from llama_router.relay.request_rules import RequestRecord

log = logging.getLogger("llama_router")

# One kind of bookkeeping of an ended request (the metrics', the activity log's, the access log's).
EndHandler = Callable[[web.Request, RequestRecord], None]


class RequestEnds:
    """Ended requests waiting for their bookkeeping: at most one turn of the event loop."""

    def __init__(self, handlers: Sequence[EndHandler]) -> None:
        self.handlers = tuple(handlers)
        self._ended: list[tuple[web.Request, RequestRecord]] = []

    def add(self, request: web.Request, record: RequestRecord) -> None:
        """`request` has ended: its last byte is out, or its client left."""
        record.ended = time.perf_counter()
        if not self._ended:
            asyncio.get_running_loop().call_soon(self.flush)
        self._ended.append((request, record))

    def flush(self) -> None:
        """Hand every request that has ended to each handler, in the order they ended (also what a
        shutdown does last)."""
        ended, self._ended = self._ended, []
        for request, record in ended:
            for handler in self.handlers:
                try:
                    handler(request, record)
                except Exception:  # one failing must not cost the others their turn, nor other requests
                    log.exception("could not record the end of %s %s", record.method, record.path)
