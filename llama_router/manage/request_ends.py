"""What follows a request's end, done for all the requests that ended in one turn of the event loop.

A request's metrics, its activity row and its access line need nothing the client still waits for:
the router's one middleware hands each ended request here, and all that ended in one turn of the
event loop are counted, recorded and logged together just after it. Done request by request, in
between the requests' own work, this bookkeeping ran with cold caches and cost about twice as much
under load (scripts/benchmarks/bench_cpu.py); in one pass it is cheaper, and it never runs between
a request's arrival and its answer.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from llama_router.front.access_log import log_request
from llama_router.manage.board import RequestBoard
from llama_router.manage.metrics import Metrics
from llama_router.relay.request_rules import RequestRecord

log = logging.getLogger("llama_router")


class RequestEnds:
    """Ended requests waiting for their bookkeeping: at most one turn of the event loop."""

    def __init__(self, metrics: Metrics, board: RequestBoard) -> None:
        self.metrics = metrics
        self.board = board
        self._ended: list[tuple[web.Request, RequestRecord]] = []

    def add(self, request: web.Request, record: RequestRecord) -> None:
        """`request` has ended: its last byte is out, or its client left."""
        record.ended = time.perf_counter()
        if not self._ended:
            asyncio.get_running_loop().call_soon(self.flush)
        self._ended.append((request, record))

    def flush(self) -> None:
        """Count, record and log every request that has ended (also what a shutdown does last)."""
        ended, self._ended = self._ended, []
        metrics, board = self.metrics, self.board
        for request, record in ended:
            try:
                if record.for_model:
                    metrics.request_done(record)
                board.request_ended(request, record)
                log_request(record, request)
            except Exception:  # one request's bookkeeping failing must not lose the others'
                log.exception("could not record the end of %s %s", record.method, record.path)
