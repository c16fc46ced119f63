"""What `GET /props?model=` and `GET /slots?model=` answer for a model that is not loaded.

No GET loads a model: a client reading metadata (Hermes Agent asks `/props?model=<id>` for every
model it may use, and assumes that is cheap) must not start one, nor swap out the model someone is
chatting with. So a model that is neither loaded nor loading is answered from what the router
knows: the `/props` its llama-server gave when it last loaded with the same profile, else the
config and the estimate, in llama-server's own shape, with `loaded: false` and the model's status.
`/metrics` and `/lora-adapters` exist only while it runs: a 409 says so. Only a request that needs
the model (inference, `POST /models/load`) loads it.
"""

from __future__ import annotations

from typing import Any

from llama_router import __version__
from llama_router.config.schema import ResolvedProfile
from llama_router.core.errors import RouterError
from llama_router.sizing.context_window import Window


def props_from_memory(
    profile: ResolvedProfile, window: Window | None, last: dict[str, Any] | None, status: dict[str, Any]
) -> dict[str, Any]:
    """`/props` of a model that is not running: the last one it gave (same profile), else one built
    from the config and the estimate; `default_generation_settings.n_ctx` is a request's window."""
    answer: dict[str, Any] = dict(last) if last is not None else {}
    settings = dict(answer.get("default_generation_settings") or {"params": {}})
    if window is not None:
        settings["n_ctx"] = window.per_request
        answer.setdefault("total_slots", window.slots)
    settings.setdefault("n_ctx", 0)
    answer.update(
        default_generation_settings=settings,
        model_alias=profile.name,
        model_path=str(profile.model_path),
        loaded=False,
        status=status,
        source="last /props of this model" if last is not None else "config and estimate",
    )
    answer.setdefault("build_info", f"llama-router {__version__}")
    return answer


def slots_from_memory(window: Window | None) -> list[dict[str, Any]]:
    """`/slots` of a model that is not running: its slots, idle, each with a request's window."""
    if window is None:
        return []
    return [
        {"id": slot, "id_task": -1, "n_ctx": window.per_request, "is_processing": False}
        for slot in range(window.slots)
    ]


def not_running(name: str, path: str) -> RouterError:
    """The answer to a read that only a running model has."""
    return RouterError(
        409,
        f"model {name!r} is not loaded: its {path} exists only while it runs, and a GET never loads "
        "a model (a request to it, or POST /models/load, does)",
        code="model_not_loaded",
    )
