"""Each profile's last log lines: llama-server's output and the router's notes about its process.

Bounded per profile (`server.log_lines`) and followable from the start, so `/logs/<model>` and the
dashboard read them as they are and nobody swaps a buffer in place.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable, Iterator

from llama_router.config.schema import RouterConfig


class FollowableLog(deque[str]):
    """A bounded log buffer that counts the lines ever appended and wakes followers on each one.

    `/logs/<model>?follow=1` streams new lines without polling; `total` tells a follower how many
    lines it missed when the buffer wrapped around.
    """

    def __init__(self, lines: Iterable[str] = (), maxlen: int | None = None) -> None:
        super().__init__(lines, maxlen)
        self.total = len(self)
        self.followers: set[asyncio.Event] = set()

    def append(self, line: str) -> None:
        super().append(line)
        self.total += 1
        for follower in self.followers:
            follower.set()

    def extend(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.append(line)


class LogBuffers:
    """One `FollowableLog` per profile of the config, kept across reloads."""

    def __init__(self, config: RouterConfig) -> None:
        self._buffers: dict[str, FollowableLog] = {}
        self.reconfigure(config)

    def reconfigure(self, config: RouterConfig) -> None:
        """A reloaded config: new profiles get a buffer; a removed one keeps its lines."""
        for name in config.profiles:
            if name not in self._buffers:
                self._buffers[name] = FollowableLog((), config.server.log_lines)

    def __getitem__(self, name: str) -> FollowableLog:
        return self._buffers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._buffers

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)
