"""Which requests are management calls, for the audit rows of the activity log.

A management call changes what runs or what is installed; each one is kept as an activity row with
the key's label and the client's address, whatever its outcome (a refused call is kept too: that is
when someone wants to know who tried). Config reloads, which no HTTP call makes, are kept the same way
by the dashboard.
"""

from __future__ import annotations

import re

from aiohttp import web

# (method, path) of each management call, and the name its rows carry.
ACTIONS: dict[tuple[str, str], str] = {
    ("POST", "/models/load"): "load",
    ("POST", "/models/unload"): "unload",
    ("POST", "/unload"): "unload_all",
    ("POST", "/models"): "download",
    ("DELETE", "/models"): "delete",
}
_CANCEL = re.compile(r"/requests/[^/]+/cancel")

# What a handler may add to its call's row: the names it unloaded, the request it cancelled.
DETAIL: web.RequestKey[str] = web.RequestKey("llama_router.audit_detail", str)


def action_of(method: str, path: str) -> str | None:
    """The management action a request is (None: it is none)."""
    action = ACTIONS.get((method, path))
    if action is None and method == "POST" and _CANCEL.fullmatch(path):
        return "cancel"
    return action
