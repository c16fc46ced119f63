"""Models on their way in: downloads (POST /models) that requests may already name.

The model manager (manage/model_manager.py) downloads a model and then adds its profile; until then
the model is listed as loading, and a request for it waits here for the download's end, then for its
load as any request does. One `PendingModel` per download under way, kept by the controller so that
the relay, below the manager, can see it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from llama_router.core.errors import RouterError


@dataclass
class PendingModel:
    """A model being downloaded: its bytes so far, and its end (an error message if it failed)."""

    name: str
    progress: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # file -> (done, total)
    ended: asyncio.Future[str | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def fraction(self) -> float | None:
        """Bytes done over bytes to do, once the size of every file seen is known."""
        files = list(self.progress.values())  # one step: the download's thread may add a file
        if not files or any(total is None for _, total in files):
            return None
        whole = sum(total or 0 for _, total in files)
        return sum(done for done, _ in files) / whole if whole else None

    def end(self, error: str | None) -> None:
        if not self.ended.done():
            self.ended.set_result(error)

    async def arrived(self) -> None:
        """Wait for the download to end; a RouterError that says why if it failed."""
        error = await asyncio.shield(self.ended)
        if error is not None:
            raise RouterError(
                502, f"the download of model {self.name!r} failed: {error}", code="download_failed"
            )
