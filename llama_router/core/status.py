"""A model's status in words: ours (the dashboard, `/running`, `/overview`, the metrics) and those of
llama-server's router mode, which the lists clients read (`/v1/models`, `/models`) speak.

Our words say more than router mode has words for: `standby` (loaded ahead of demand, not yet used),
`unloading` and `failed`. Open WebUI reads `status.value` and knows only `loaded`, `sleeping`,
`loading` and `unloaded`: any other word gets no badge and no Eject button. So the lists map ours
onto those (`client_status`) and keep ours in `status.detail`. docs/design.md has the table.
"""

from __future__ import annotations

from typing import Any

from llama_router.core.scheduler import ProfileView, State

# Our word for each scheduler state (`standby` and a waited-for `loading` are read from the view).
OUR_WORDS = {
    State.COLD: "unloaded",
    State.STARTING: "loading",
    State.READY: "loaded",
    State.STOPPING: "unloading",
    State.FAILED: "failed",
}
# Our words that router mode lacks, as the nearest of its own: a standby model is loaded; one being
# stopped takes no more requests; a failed one is unloaded (`failed: true`, as router mode reports an
# instance that exited with an error).
ROUTER_MODE_WORDS = {"standby": "loaded", "unloading": "unloaded", "failed": "unloaded"}
ERROR_LINES = 12  # the last lines of a failed model's output that its status keeps


def our_word(state: State, standby: bool = False) -> str:
    """Our word for a scheduler state: what the dashboard, `/running` and the metrics show."""
    if standby and state is State.READY:
        return "standby"
    return OUR_WORDS[state]


def view_word(view: ProfileView) -> str:
    """Our word for a model as clients should see it: a cold model that requests wait for is loading
    (its load is decided; it starts as soon as memory is free)."""
    if view.state is State.COLD and view.waiting > 0:
        return "loading"
    return our_word(view.state, view.standby)


def client_status(ours: str, error: str = "") -> dict[str, Any]:
    """The `status` object of a model list entry (`/v1/models`, `/models`): `value` in router mode's
    words, `detail` in ours; a failed model has `failed: true` and `error`, the reason and the last
    lines of its output."""
    status: dict[str, Any] = {"value": ROUTER_MODE_WORDS.get(ours, ours), "detail": ours}
    if ours == "failed":
        status["failed"] = True
        if error:
            status["error"] = last_lines(error)
    return status


def last_lines(text: str, count: int = ERROR_LINES) -> str:
    """The first line of `text` (the reason) and its last `count` lines (the output that led to it)."""
    lines = text.rstrip().splitlines()
    if len(lines) <= count + 1:
        return "\n".join(lines)
    return "\n".join([lines[0], "…", *lines[-count:]])
