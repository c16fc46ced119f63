"""Keeps conversations' prompt caches across swaps (profiles with `keep_context`).

Before the router stops such a model it asks llama-server to save every slot that holds a context
(`POST /slots/<id>?action=save`); after the model starts again, the saved slots are restored before the
first request is dispatched, so a returning conversation hits the cache instead of reprocessing its
whole history.

A saved cache is only meaningful to the exact model file and the settings that shaped it (context
size, slots, cache types, ...), so every file name carries an identity key of those; a file whose key
differs from the running process's is never restored. Saving and restoring are best effort: any failure
or timeout is logged and reported, and the swap or request goes on without the cache.

Behaviour of llama-server worth knowing (checked against the bundled build): with its default unified
KV cache (`--parallel` left at auto) and `--cache-idle-slots` (the default, with `--cache-ram` > 0), a
new task moves the other idle slots' contexts into a host-RAM prompt cache and clears them from their
slots. That RAM cache cannot be exported, so only slots still holding a context are saved: typically
the last conversation. With an explicit `--parallel N` (separate KV per slot) or
`--no-cache-idle-slots`, every slot keeps its conversation and all of them are saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import weakref
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from llama_router.config.schema import ResolvedProfile, RouterConfig
from llama_router.upstream.supervisor import Upstream

log = logging.getLogger("llama_router.context")
_GERUND = {"saved": "saving", "restored": "restoring"}

MIB = 1024 * 1024
SLOT_SAVE_FLAG = "--slot-save-path"
# `<key>-slot<id>.bin`, and `.part` while llama-server is still writing it (renamed once complete, so
# a save cut short by the timeout never leaves a file that looks whole).
_FILE = re.compile(r"^(?P<key>[0-9a-f]{16})-slot(?P<slot>\d+)\.bin(?P<part>\.part)?$")
# Environment variables llama-server reads as settings (`LLAMA_ARG_CTX_SIZE`, ...) or that change its
# backends; they shape the cache as much as command-line flags do.
_ENV_PREFIXES = ("LLAMA_ARG_", "GGML_", "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


def _stat_identity(path: Path) -> list[object]:
    """Path, size and mtime of a file: enough to tell a replaced or re-downloaded file apart."""
    try:
        stat = path.stat()
    except OSError:
        return [str(path), None, None]
    return [str(path), stat.st_size, stat.st_mtime_ns]


def identity_key(profile: ResolvedProfile, environ: dict[str, str] | None = None) -> str:
    """A 16-hex-digit key of everything that decides whether a saved cache fits a process: the model
    files, the binary and the whole command line (with fixed host and port) and cache-relevant env."""
    env = {**(os.environ if environ is None else environ), **profile.env}
    files = [profile.binary, *(profile.model_files or (profile.model_path,))]
    if profile.mmproj_path is not None:
        files.append(profile.mmproj_path)
    material = {
        "files": [_stat_identity(path) for path in files],
        "command": _without_slot_save_path(profile.command("127.0.0.1", 0)),
        "env": sorted(
            (key, value) for key, value in env.items() if key in profile.env or key.startswith(_ENV_PREFIXES)
        ),
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _without_slot_save_path(args: list[str]) -> list[str]:
    """Where caches are written does not change what they mean."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == SLOT_SAVE_FLAG:
            skip = True
        elif not arg.startswith(SLOT_SAVE_FLAG + "="):
            out.append(arg)
    return out


def user_slot_save_path(profile: ResolvedProfile) -> Path | None:
    """The `--slot-save-path` a profile's own args set, if any (relative to the router's cwd, as
    llama-server sees it)."""
    for index, arg in enumerate(profile.args):
        flag, eq, value = arg.partition("=")
        if flag != SLOT_SAVE_FLAG:
            continue
        if not eq:
            value = profile.args[index + 1] if index + 1 < len(profile.args) else ""
        if value:
            return Path(os.path.abspath(os.path.expanduser(value)))
    return None


def profile_dir_name(name: str) -> str:
    """A profile's directory under the root: its name when that is a plain file name, else a slug
    plus a hash (names with `/` or a leading dot must not escape or hide in the root)."""
    if _SAFE_NAME.match(name):
        return name
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


@dataclass
class _Progress:
    """What an operation achieved so far; kept outside the coroutine so a timeout can report it."""

    slots: int = 0
    tokens: int = 0
    bytes: int = 0
    errors: int = 0
    last_error: str = ""

    def fail(self, message: str) -> None:
        self.errors += 1
        self.last_error = message


class ContextError(Exception):
    """llama-server refused or could not be asked; the message says which call and why."""


class ContextKeeper:
    """Saves and restores llama-server slot caches under `<state_dir>/slots/<profile>/`.

    `save` and `restore` return None when there was nothing to do, else a dict for the controller's
    event: `slots`, `tokens`, `bytes`, `ms`, plus `error` (and the event is a failure) when anything
    went wrong.
    """

    def __init__(self, config: RouterConfig, root: Path) -> None:
        self.config = config
        self.root = root
        # The identity of each running process, fixed when it was spawned: a model file replaced
        # while it runs must not give its old cache the new file's key.
        self._spawn_keys: dict[str, str] = {}
        self._keys: weakref.WeakKeyDictionary[Upstream, str] = weakref.WeakKeyDictionary()
        self._user_dirs: set[Path] = set()  # profiles' own --slot-save-path dirs, under the disk cap too
        self._prune_lock = asyncio.Lock()

    # ------------------------------------------------------------------------------------------ paths

    def profile_dir(self, profile: ResolvedProfile) -> Path:
        """Where this profile's caches live: its own `--slot-save-path`, else one under the root."""
        return user_slot_save_path(profile) or self.root / profile_dir_name(profile.name)

    def extra_args(self, profile: ResolvedProfile) -> list[str]:
        """Arguments the upstream needs for saving and restoring (none without keep_context)."""
        if not profile.keep_context:
            return []
        self._spawn_keys[profile.name] = identity_key(profile)
        if "--no-slots" in profile.args:
            log.warning("%s: keep_context needs llama-server's /slots; remove --no-slots", profile.name)
        directory = self.profile_dir(profile)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("%s: cannot create %s for prompt caches: %s", profile.name, directory, exc)
        user_dir = user_slot_save_path(profile)
        if user_dir is not None:
            self._user_dirs.add(user_dir)
            return []
        return [SLOT_SAVE_FLAG, str(directory)]

    def _key(self, upstream: Upstream, *, bind: bool = False) -> str:
        key = self._keys.get(upstream)
        if key is None:
            name = upstream.profile.name
            key = self._spawn_keys.get(name) or identity_key(upstream.profile)
            if bind:
                self._spawn_keys.pop(name, None)
                self._keys[upstream] = key
        return key

    # ------------------------------------------------------------------------------------------ save

    async def save(self, upstream: Upstream, session: aiohttp.ClientSession) -> dict[str, Any] | None:
        """Save the slots of a model about to stop; never raises, bounded in time."""
        profile = upstream.profile
        if not profile.keep_context or profile.name not in self.config.profiles:
            return None  # a removed profile's directory is gone: nothing to keep it for
        progress = _Progress()
        # Never let a cache problem hold up a stop.
        return await self._bounded(profile.name, "saved", progress, self._save(upstream, session, progress))

    async def _bounded(
        self, name: str, done: str, progress: _Progress, work: Coroutine[Any, Any, bool]
    ) -> dict[str, Any] | None:
        """Run a save or restore within `context_save_timeout`; any failure is reported, not raised."""
        started = time.perf_counter()
        timeout = self.config.server.context_save_timeout
        try:
            attempted = await asyncio.wait_for(work, timeout)
        except TimeoutError:
            progress.fail(f"timed out after {timeout:g}s")
            attempted = True
        except Exception as exc:
            progress.fail(_describe(exc))
            attempted = True
        if not attempted:
            return None
        result = self._result(progress, started)
        if "error" in result:
            log.warning("%s: %s prompt caches failed: %s", name, _GERUND[done], progress.last_error)
        else:
            log.info("%s: %s %d slot(s), %d bytes in %s ms", name, done, *_figures(result))
        return result

    async def _save(self, upstream: Upstream, session: aiohttp.ClientSession, progress: _Progress) -> bool:
        slots = await _get_slots(upstream, session)
        # A slot still processing (only a forced stop gets here with a request running) holds a
        # half-written answer: not worth keeping, and saving it would wait for the request.
        targets = [slot for slot in slots if _holds_context(slot) and not slot.get("is_processing")]
        if not targets:
            return False
        key = self._key(upstream)
        directory = self.profile_dir(upstream.profile)
        for slot in targets:
            slot_id = int(slot["id"])
            name = f"{key}-slot{slot_id}.bin"
            try:
                answer = await _slot_action(upstream, session, slot_id, "save", name + ".part")
                os.replace(directory / (name + ".part"), directory / name)
            except (ContextError, OSError) as exc:
                progress.fail(f"slot {slot_id}: {_describe(exc)}")
                continue
            progress.slots += 1
            progress.tokens += int(answer.get("n_saved") or 0)
            progress.bytes += int(answer.get("n_written") or 0)
        if progress.slots:
            await self._prune()  # within the time limit too: a slow disk must not hold up the stop
        return True

    # ------------------------------------------------------------------------------------------ restore

    async def restore(self, upstream: Upstream, session: aiohttp.ClientSession) -> dict[str, Any] | None:
        """Restore saved slots into a model that just started; never raises, bounded in time."""
        profile = upstream.profile
        if not profile.keep_context:
            return None
        key = self._key(upstream, bind=True)
        progress = _Progress()
        # A request waits on this: on any failure it goes on without the cache.
        work = self._restore(upstream, session, key, progress)
        return await self._bounded(profile.name, "restored", progress, work)

    async def _restore(
        self, upstream: Upstream, session: aiohttp.ClientSession, key: str, progress: _Progress
    ) -> bool:
        directory = self.profile_dir(upstream.profile)
        saved = await asyncio.to_thread(_saved_files, directory, key)
        if not saved:
            return False
        slot_ids = {int(slot["id"]) for slot in await _get_slots(upstream, session) if "id" in slot}
        wanted = {slot_id: path for slot_id, path in saved.items() if slot_id in slot_ids}
        if not wanted:
            return False
        for slot_id, path in sorted(wanted.items()):
            try:
                answer = await _slot_action(upstream, session, slot_id, "restore", path.name)
            except ContextError as exc:
                progress.fail(f"slot {slot_id}: {exc}")
                continue
            progress.slots += 1
            progress.tokens += int(answer.get("n_restored") or 0)
            progress.bytes += int(answer.get("n_read") or 0)
            with contextlib.suppress(OSError):
                os.utime(path)  # used again: the disk cap drops least recently used caches first
        return True

    @staticmethod
    def _result(progress: _Progress, started: float) -> dict[str, Any]:
        result: dict[str, Any] = {
            "slots": progress.slots,
            "tokens": progress.tokens,
            "bytes": progress.bytes,
            "ms": round((time.perf_counter() - started) * 1000, 1),
        }
        if progress.errors:
            result["error"] = progress.last_error
            result["failed_slots"] = progress.errors
        return result

    # ------------------------------------------------------------------------------------------ disk

    async def _prune(self) -> None:
        """Keep the caches of all profiles within `context_cache_mib`, oldest dropped first."""
        cap = self.config.server.context_cache_mib * MIB
        directories = [self.root, *sorted(self._user_dirs)]
        async with self._prune_lock:
            try:
                removed = await asyncio.to_thread(prune, directories, cap)
            except Exception as exc:  # the next save tries again
                log.warning("pruning saved prompt caches failed: %s", exc)
                return
        if removed:
            log.info("dropped %d saved prompt cache file(s) to stay under %d MiB", removed, cap // MIB)

    def forget_removed(self, config: RouterConfig) -> None:
        """Delete saved caches of profiles no longer in the config."""
        self.config = config
        keep = {profile_dir_name(name) for name in config.profiles}
        try:
            entries = list(self.root.iterdir())
        except OSError:
            return
        for entry in entries:
            if entry.name in keep:
                continue
            try:
                if entry.is_symlink() or not entry.is_dir():
                    continue  # only directories this keeper made; never follow a link out of the root
                shutil.rmtree(entry)
                log.info("deleted saved prompt caches of removed profile %r", entry.name)
            except OSError as exc:
                log.warning("cannot delete %s: %s", entry, exc)


# ---------------------------------------------------------------------------------------------- helpers


def _holds_context(slot: dict[str, Any]) -> bool:
    """Whether a `/slots` entry has tokens cached (a slot that never ran a task has no count)."""
    try:
        return "id" in slot and int(slot.get("n_prompt_tokens") or 0) > 0
    except (TypeError, ValueError):
        return False


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _figures(result: dict[str, Any]) -> tuple[int, int, float]:
    return result["slots"], result["bytes"], result["ms"]


async def _get_slots(upstream: Upstream, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
    try:
        async with session.get(f"{upstream.base_url}/slots") as response:
            if response.status != 200:
                raise ContextError(f"GET /slots answered {response.status}")
            slots = await response.json(content_type=None)
    except (aiohttp.ClientError, ValueError) as exc:
        raise ContextError(f"GET /slots: {_describe(exc)}") from None
    if not isinstance(slots, list):
        raise ContextError("GET /slots: not a list")
    return [slot for slot in slots if isinstance(slot, dict)]


async def _slot_action(
    upstream: Upstream, session: aiohttp.ClientSession, slot_id: int, action: str, filename: str
) -> dict[str, Any]:
    url = f"{upstream.base_url}/slots/{slot_id}"
    try:
        async with session.post(url, params={"action": action}, json={"filename": filename}) as response:
            text = await response.text()
    except aiohttp.ClientError as exc:
        raise ContextError(f"{action}: {_describe(exc)}") from None
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if response.status != 200 or not isinstance(answer, dict):
        message = text[:200]
        if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
            message = str(answer["error"].get("message", message))
        raise ContextError(f"{action} answered {response.status}: {message}")
    return answer


def _saved_files(directory: Path, key: str) -> dict[int, Path]:
    """The complete cache files of this key by slot id; leftovers of a save cut short are deleted
    (one process per profile runs at a time, so no save of this key can still be writing)."""
    found: dict[int, Path] = {}
    try:
        entries = list(directory.iterdir())
    except OSError:
        return found
    for entry in entries:
        match = _FILE.match(entry.name)
        if match is None or match["key"] != key:
            continue
        if match["part"]:
            with contextlib.suppress(OSError):
                entry.unlink()
        elif entry.is_file():
            found[int(match["slot"])] = entry
    return found


def prune(directories: list[Path], cap_bytes: int) -> int:
    """Delete the least recently written cache files (ours only, by name) in `directories` and their
    subdirectories until they total at most `cap_bytes`; returns how many were deleted."""
    files: dict[Path, tuple[int, int]] = {}
    for directory in directories:
        try:
            walk = list(os.walk(directory))  # does not follow links to directories
        except OSError:
            continue
        for folder, _dirs, names in walk:
            for name in names:
                if _FILE.match(name) is None:
                    continue
                path = Path(folder) / name
                try:
                    stat = path.lstat()
                except OSError:
                    continue
                if not path.is_symlink():
                    files[path] = (stat.st_mtime_ns, stat.st_size)
    total = sum(size for _mtime, size in files.values())
    removed = 0
    for path, (_mtime, size) in sorted(files.items(), key=lambda item: item[1][0]):
        if total <= cap_bytes:
            break
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
        total -= size
    return removed
