"""Live reload of `profiles.yaml`: on SIGHUP, and when the file changes on disk.

A new file is loaded and validated completely before anything changes; if it fails, the running config
stays and the reason is kept (`status()`, shown by `/health`), logged, and sent as a `config_error`
event. A valid one goes to `Controller.reload`, which keeps profiles whose command did not change,
restarts changed ones when idle, drains and stops removed ones, and sends the `reloaded` event. The API
and admin keys are resolved with the rest (a named key variable that is unset fails the reload) and put
in force once the new config is applied.

The watcher polls (no extra dependency): each second it compares the files' stats (`profiles.yaml` and
those in `profiles.d/` beside it) and, if one moved, their content hash, so an editor that rewrites
the same bytes, or a `touch`, reloads nothing. The GGUF files of `server.models_dir` (and of the
Hugging Face cache with `server.hf_cache`) count as part of the config by their names and stats: a
model file added or removed reloads it, once it has stopped changing from one look to the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from llama_router.config.schema import ConfigError, RouterConfig, config_files
from llama_router.config.tls import load_certificate
from llama_router.core.events import ReloadFailed
from llama_router.front.auth import KeyRing, resolve_keys, warn_if_open
from llama_router.manage.model_folders import load, on_disk
from llama_router.manage.sdnotify import Notifier
from llama_router.upstream.controller import Controller

log = logging.getLogger("llama_router.reload")

WATCH_INTERVAL = 1.0  # seconds between two looks at the config file

Loader = Callable[[], RouterConfig]
# Per file of the config (profiles.yaml, then profiles.d/*.yaml): its name and (device, inode,
# mtime_ns, size), None if unreadable.
_Signature = tuple[tuple[str, tuple[int, int, int, int] | None], ...]
# The GGUF files of the models_dir folders (and the cache): (path, size, mtime_ns) each.
Folders = tuple[tuple[str, int, int], ...]


def _signature(path: Path, folders: Folders) -> _Signature:
    found: list[tuple[str, tuple[int, int, int, int] | None]] = [
        (name, (0, 0, mtime, size)) for name, size, mtime in folders
    ]
    for file in config_files(path):
        try:
            st = file.stat()
        except OSError:
            found.append((str(file), None))
            continue
        found.append((str(file), (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)))
    return tuple(found)


def _digest(path: Path, folders: Folders) -> str | None:
    digest = hashlib.sha256(repr(folders).encode())
    for file in config_files(path):
        try:
            content = file.read_bytes()
        except FileNotFoundError:  # no profiles.yaml: the folders alone are the config, till one comes
            content = b"\0absent"
        except OSError:
            return None
        digest.update(str(file).encode() + b"\0" + content)
    return digest.hexdigest()


class ConfigReloader:
    """Owns the running config's source: reloads it, remembers the outcome, watches the file."""

    def __init__(
        self,
        controller: Controller,
        config: RouterConfig,
        *,
        loader: Loader | None = None,
        notifier: Notifier | None = None,
        keys: KeyRing | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.controller = controller
        self.tls = tls  # the context the port serves HTTPS with; None: plain HTTP
        self.keys = keys  # what requests are checked against; None: new keys are validated, not applied
        self.config = config
        self.path = config.path
        self._loader: Loader = loader or (lambda: load(self.path)[0])
        self._notifier = notifier or Notifier(None)
        self._lock = asyncio.Lock()
        self.generation = 0  # successful reloads so far
        self.last_reload: dict[str, Any] | None = None
        self.last_error: dict[str, Any] | None = None
        # Told of each reload as it ends (trigger, error or None, what changed, seconds): audit rows.
        self.audit: Callable[[str, str | None, str, float], None] | None = None
        self._seen_files()

    def status(self) -> dict[str, Any]:
        """What `/health` shows: the file, reload count, last reload and the error that blocks one."""
        return {
            "config": str(self.path),
            "generation": self.generation,
            "watching": self.config.server.watch_config,
            "last_reload": self.last_reload,
            "last_error": self.last_error,
        }

    async def reload(self, trigger: str) -> bool:
        """Load the file again and apply it; False (old config kept, reason recorded) if it is invalid."""
        async with self._lock:
            self._notifier.reloading()
            try:
                started = time.perf_counter()
                ok = await self._reload(trigger)
                if self.audit is not None:
                    error = None if ok else self._error_message()
                    self.audit(trigger, error, self._changes(), time.perf_counter() - started)
                return ok
            finally:
                self._notifier.ready(self._status_line())

    async def _reload(self, trigger: str) -> bool:
        self._seen_files()
        started = time.monotonic()
        try:
            new = await asyncio.to_thread(self._loader)
        except ConfigError as exc:
            self._fail(trigger, str(exc))
            return False
        except Exception as exc:  # a bug must not take the running config down with it
            log.exception("reading %s failed", self.path)
            self._fail(trigger, f"{self.path}: could not be read: {type(exc).__name__}: {exc}")
            return False
        if (new.server.host, new.server.port) != (self.config.server.host, self.config.server.port):
            log.warning(
                "server.host/server.port changed in %s: the router keeps listening on %s:%s until restarted",
                self.path,
                self.config.server.host,
                self.config.server.port,
            )
            new = new.model_copy(
                update={
                    "server": new.server.model_copy(
                        update={"host": self.config.server.host, "port": self.config.server.port}
                    )
                }
            )
        new = self._same_tls(new)
        try:
            keys = resolve_keys(new.server)
            if self.tls is not None:  # a renewed certificate is served from now on
                load_certificate(self.tls, new.server)
        except ConfigError as exc:
            self._fail(trigger, f"{self.path}: {exc}")
            return False
        try:
            summary = await self.controller.reload(new)
        except Exception as exc:
            log.exception("applying the reloaded config failed")
            self._fail(trigger, f"{self.path}: could not apply the new config: {exc}")
            return False
        self.config = new
        if self.keys is not None and self.keys.replace(keys):
            log.info(
                "keys changed (%s): now %s",
                trigger,
                keys.describe(),
                extra={
                    "fields": {
                        "event": "keys_changed",
                        "trigger": trigger,
                        "api_keys": len(keys.api),
                        "admin_keys": len(keys.admin),
                    }
                },
            )
            warn_if_open(keys, new.server.host)
        self.generation += 1
        self.last_error = None
        summary = {key: list(value) for key, value in dict(summary or {}).items()}
        self.last_reload = {
            "time": time.time(),
            "trigger": trigger,
            "seconds": round(time.monotonic() - started, 3),
            **summary,
        }
        described = ", ".join(f"{key}: {', '.join(names)}" for key, names in summary.items() if names)
        # The controller sends the `reloaded` event itself; this line adds what triggered it.
        log.info(
            "config reloaded (%s): %s",
            trigger,
            described or "nothing changed",
            extra={"fields": {"event": "config_reloaded", "trigger": trigger, **summary}},
        )
        return True

    def _error_message(self) -> str:
        return str((self.last_error or {}).get("message", "failed"))

    def _changes(self) -> str:
        """The last reload's changes in words (`added: a; removed: b`), or `nothing changed`."""
        last = self.last_reload or {}
        parts = [
            f"{key}: {', '.join(last[key])}" for key in ("added", "removed", "restarted") if last.get(key)
        ]
        return "; ".join(parts) or "nothing changed"

    def _same_tls(self, new: RouterConfig) -> RouterConfig:
        """`new`, with TLS left as the port serves it: turning it on or off needs a restart."""
        if (new.server.tls_cert is not None) == (self.tls is not None):
            return new
        log.warning(
            "server.tls_cert/server.tls_key %s in %s: the port keeps speaking %s until restarted",
            "added" if self.tls is None else "removed",
            self.path,
            "HTTPS" if self.tls is not None else "plain HTTP",
        )
        kept = {"tls_cert": self.config.server.tls_cert, "tls_key": self.config.server.tls_key}
        return new.model_copy(update={"server": new.server.model_copy(update=kept)})

    def _fail(self, trigger: str, message: str) -> None:
        self.last_error = {"time": time.time(), "trigger": trigger, "message": message}
        log.error(
            "config reload (%s) failed; keeping the running config: %s",
            trigger,
            message,
            extra={"fields": {"event": "config_error", "trigger": trigger}},
        )
        self.controller.events.emit(ReloadFailed(trigger, message))

    def _status_line(self) -> str:
        profiles = len(self.config.profiles)
        line = f"serving {profiles} profile(s) on {self.config.server.host}:{self.config.server.port}"
        if self.last_error is not None:
            line += "; last reload failed: " + str(self.last_error["message"]).splitlines()[0][:200]
        return line

    def _seen_files(self) -> None:
        """What is read now is what was seen: the watcher must not reload the same content again."""
        self._last_folders = on_disk(self.config.server)
        self._seen_signature = _signature(self.path, self._last_folders)
        self._seen_digest = _digest(self.path, self._last_folders)

    def changed_on_disk(self) -> bool:
        """Whether the files' content differs from what was last loaded (cheap when it did not). A
        model file that changed since the last look is still being written (a copy, a download): it
        is looked at again until it holds still, so a long copy reloads once, when it is whole."""
        folders = on_disk(self.config.server)
        if folders != self._last_folders:
            self._last_folders = folders
            return False
        signature = _signature(self.path, folders)
        if signature == self._seen_signature:
            return False
        self._seen_signature = signature
        digest = _digest(self.path, folders)
        if digest == self._seen_digest:
            return False
        self._seen_digest = digest
        return True

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """Reload whenever the file's content changes (while `server.watch_config` is on)."""
        while True:
            await asyncio.sleep(interval)
            if not self.config.server.watch_config or self._lock.locked():
                continue
            try:
                if self.changed_on_disk():
                    await self.reload("file changed")
            except Exception:  # keep watching whatever happened to one reload
                log.exception("config watcher: reload failed")


RELOADER: web.AppKey[ConfigReloader] = web.AppKey("reloader", ConfigReloader)


def reload_status(app: web.Application) -> dict[str, Any] | None:
    """The reloader's status for `/health`, or None when the app runs without one (tests)."""
    reloader = app.get(RELOADER)
    return reloader.status() if reloader is not None else None


@contextlib.asynccontextmanager
async def watching(reloader: ConfigReloader, interval: float = WATCH_INTERVAL) -> Any:
    """Run the file watcher for the length of the block."""
    task = asyncio.create_task(reloader.watch(interval), name="config-watcher")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
