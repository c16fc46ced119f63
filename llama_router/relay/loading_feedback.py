"""What a streamed request hears while its model loads: SSE comments, or "thinking" that people see.

A stream that waits for its model gets its `200 text/event-stream` answer early. By default it then
hears SSE comment lines (`: loading <model> … 3s`): proxies and clients with idle timeouts keep the
connection, and no client shows them. With `loading_feedback: reasoning` (per profile or under
`server:`), a streamed chat completion instead hears the progress as `reasoning_content` deltas,
which Open WebUI and other chat UIs show as the model "thinking" and leave out of the answer: the
model's name, the requests ahead of this one and the seconds waited. Where the model's
llama-server reports how far its load has come, or while the model is still being downloaded, the
messages say so: `Loading qwen3-8b… 42 %`, `Downloading qwen3-8b… 7 %`. Nothing is ever put in
`content`, and other endpoints (completions, responses, messages) always get comments.

Each of those lines starts with `MARK`. Chat UIs keep the reasoning and may send it back with the
next request (Open WebUI's llama.cpp connection replays it as the assistant's `reasoning_content`),
so before a parsed chat request goes on, `strip_loading_lines` takes the lines so marked out of its
assistant messages' `reasoning_content`: the model never reads the router's progress. Nothing else
in a conversation is touched.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from llama_router.core.scheduler import ProfileView, State

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
MARK = "[llama-router] "  # the start of each loading line the router writes as reasoning
_MARKED_LINE = re.compile(r"^" + re.escape(MARK) + r".*(?:\n+|$)", re.MULTILINE)


def comment(text: str) -> bytes:
    return f": {text}\n\n".encode()


@dataclass(frozen=True)
class Progress:
    """How far a waiting request's model has come: `verb` what it is doing (Loading, Downloading),
    `percent` how far (None: not known)."""

    verb: str
    percent: int | None

    def words(self, model: str, *, lower: bool = False) -> str:
        shown = f" {self.percent} %" if self.percent is not None else ""
        return f"{self.verb.lower() if lower else self.verb} {model}…{shown}"


@dataclass
class LoadingFeedback:
    """The progress messages of one waiting stream, as SSE bytes to write."""

    model: str  # the id the client asked for
    reasoning: bool  # reasoning_content deltas (a chat completion with `loading_feedback: reasoning`)
    position: int = 1  # the request's place in its model's queue when it joined it (1: first)
    _id: str = field(default_factory=lambda: "chatcmpl-loading-" + secrets.token_hex(8))
    _first: bool = True

    def begin(self) -> bytes:
        """The first message, sent with the answer's headers."""
        if not self.reasoning:
            return comment(f"loading {self.model} …")
        return self._delta(f"{MARK}Loading {self.model}…\n")

    def loading(self, elapsed: float, view: ProfileView | None, progress: Progress | None = None) -> bytes:
        """A message while the model is not ready yet (`view`: its state now, when known;
        `progress`: how far its download or load has come, where known)."""
        if progress is not None:
            if not self.reasoning:
                return comment(f"{progress.words(self.model, lower=True)} ({elapsed:.0f}s)")
            where = f"{self._ahead(view)}, " if view is not None else ""
            return self._delta(f"{MARK}{progress.words(self.model)} ({where}{elapsed:.0f} s)\n")
        if not self.reasoning:
            return comment(f"loading {self.model} … {elapsed:.0f}s")
        return self._delta(f"{MARK}{self._state(view)} {self.model} ({self._ahead(view)})… {elapsed:.0f} s\n")

    def waiting(self, elapsed: float) -> bytes:
        """A keep-alive while the loaded model works on the prompt, before its first chunk."""
        return comment(f"waiting for {self.model} … {elapsed:.0f}s")

    def ready(self, elapsed: float) -> bytes:
        """The last message, when the model took the request (nothing for comments)."""
        if not self.reasoning:
            return b""
        return self._delta(f"{MARK}{self.model} is loaded after {elapsed:.0f} s.\n\n")

    def _state(self, view: ProfileView | None) -> str:
        if view is None or view.state is State.STARTING:
            return "Loading"
        if view.state is State.FAILED:
            return "Restarting after a failure:"
        if view.state is State.STOPPING:
            return "Waiting for the previous run to stop:"
        return "Waiting for memory to load"  # cold, while other models drain for it

    def _ahead(self, view: ProfileView | None) -> str:
        """The requests ahead of this one: those that waited when it joined, fewer as the queue
        empties (never more than the others waiting now)."""
        others = max((view.waiting if view is not None else 1) - 1, 0)
        ahead = min(self.position - 1, others)
        if ahead <= 0:
            return "next in line"
        return f"{ahead} request{'s' if ahead > 1 else ''} ahead"

    def _delta(self, text: str) -> bytes:
        delta = (
            {"role": "assistant", "reasoning_content": text} if self._first else {"reasoning_content": text}
        )
        self._first = False
        chunk = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        }
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def strip_loading_lines(payload: dict[str, Any]) -> bool:
    """Take the router's loading lines out of the assistant messages' `reasoning_content` of a chat
    request (a `reasoning_content` left empty goes); True when something was taken out."""
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return False
    changed = False
    for message in messages:
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        reasoning = message.get("reasoning_content")
        if not isinstance(reasoning, str) or MARK not in reasoning:
            continue
        kept = _MARKED_LINE.sub("", reasoning)
        if kept.strip():
            message["reasoning_content"] = kept
        else:
            del message["reasoning_content"]
        changed = True
    return changed
