"""The router's state directory (learned footprints, the activity log, saved prompt caches): where it
is, that it can be used, and what happens to a state file that cannot be read.

State is a cache of what the router learned, never a reason not to serve: a file that cannot be read
is moved aside (for a person to look at) and started afresh. A directory that cannot be created or
written is a setup fault, reported before the router starts, with the directory and the reason.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from llama_router.config.schema import ConfigError, RouterConfig

log = logging.getLogger("llama_router.state")


class StateDirError(ConfigError):
    """The state directory cannot be created or written; the message names it and says why."""


def state_dir(config: RouterConfig) -> Path:
    """Where the router keeps what it learns: `server.state_dir`, else the XDG state directory."""
    if config.server.state_dir is not None:
        return config.server.state_dir.expanduser()
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "llama-router"


def prepare_state_dir(config: RouterConfig) -> Path:
    """Create the state directory if needed and check that the router may write there; raise
    StateDirError naming the directory, where it was configured, and the reason otherwise."""
    path = state_dir(config)
    if config.server.state_dir is not None:
        where = f"{config.path}: server.state_dir"
    else:
        where = "the default state directory (server.state_dir is not set; $XDG_STATE_HOME or ~/.local/state)"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateDirError(f"{where}: cannot create {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StateDirError(f"{where}: {path} is not writable by this user (uid {os.getuid()})")
    return path


def move_aside(path: Path, why: str, afresh: str) -> Path | None:
    """Rename an unreadable state file to `<name>.corrupt-<time>` beside it and say so in the log
    (`why` it was unreadable, what starts `afresh`); the file moved to, or None if it could not be."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    try:
        path.replace(aside)
    except OSError as exc:
        log.warning("%s is %s and cannot be moved aside (%s); it will be overwritten", path, why, exc)
        return None
    log.warning("%s is %s: moved to %s; %s", path, why, aside.name, afresh)
    return aside
