"""What a lease holds: where its request goes, and what becomes of the target when it answers,
fails, stalls or dies.

Two implementations: a llama-server process of ours (`controller.LocalTarget`) and a peer
(`peers.PeerTarget`). The relay asks only what this protocol says; which of the two it holds, it
never asks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from llama_router.upstream.upstream_http import Address, UpstreamPool


class Target(Protocol):
    @property
    def address(self) -> Address:
        """Where to connect."""
        ...

    @property
    def authority(self) -> str:
        """The Host header."""
        ...

    @property
    def pool(self) -> UpstreamPool:
        """The connections to it."""
        ...

    @property
    def credentials(self) -> bytes:
        """An Authorization line of its own (b"": none)."""
        ...

    @property
    def takes_client_key(self) -> bool:
        """Whether the client's key may reach it (when the router has none itself)."""
        ...

    @property
    def quiet_loads(self) -> bool:
        """Whether it may load a model for long without a word (a stream then hears comments)."""
        ...

    @property
    def listed_as(self) -> str | None:
        """The name its answers carry when it serves as a fallback (None: the served name)."""
        ...

    @property
    def after_stall(self) -> str:
        """What becomes of it when it stalls, as the client's error says."""
        ...

    def request_target(self, target: str, ask_as: str | None, has_body: bool) -> str:
        """The request line's target there: its path prefix, and the model as it names it."""
        ...

    def patience(self) -> Callable[[float], Awaitable[bool]] | None:
        """What tells a silent target at work from a stalled one (None: nothing does)."""
        ...

    def serving(self) -> bool:
        """Whether it lives and is not being stopped (a request may be sent to it again)."""
        ...

    def answered(self, seconds: float) -> None:
        """Its answer began after `seconds`."""
        ...

    def failed(self, reason: str) -> str:
        """Talking to it failed; what the client's error adds to say where (may be "")."""
        ...

    def unhealthy(self, reason: str) -> None:
        """It stalled: restart it, or count it as down."""
        ...

    async def died(self, grace: float) -> bool:
        """Whether it is gone (allowing it `grace` seconds to be seen exiting)."""
        ...

    def release(self) -> None:
        """The request is over: its hold on the target is given back."""
        ...
