"""Models added and removed through the API: llama-server router mode's `POST /models` and
`DELETE /models?model=…`, which Open WebUI's llama.cpp connection sends from its admin panel.

`POST /models {"model": "<org>/<repo>[:<quant>]"}` answers at once, downloads the GGUF into the
Hugging Face cache (huggingface_hub, as `llama-router pull` does) with its progress as events, then
writes a profile of that name to `profiles.d/<name>.yaml` beside `profiles.yaml` and reloads the
config. The user's own file, and its comments, are never rewritten: a profile the router created
lives in a file of its own marked `created_by: llama-router`, and `DELETE /models` removes only such
profiles (and, when asked, their files in the cache), never a hand-written one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llama_router.config import hub
from llama_router.config.allowed_args import profile_problems
from llama_router.config.schema import (
    CREATED_BY_ROUTER,
    NAME,
    NAME_RULE,
    Profile,
    ProfilesFile,
    ResolvedProfile,
    profiles_dir,
)
from llama_router.core.errors import RouterError, printable
from llama_router.core.events import DownloadFailed, DownloadFinished, DownloadProgress, ModelRemoved
from llama_router.manage.model_files import files_to_keep, profile_files
from llama_router.upstream.controller import Controller
from llama_router.upstream.downloads import PendingModel

log = logging.getLogger("llama_router.models")

Reload = Callable[[str], Awaitable[bool]]
PROGRESS_INTERVAL = 0.25  # seconds between two progress events of one file (its last one always goes)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
REFERENCE_ID = re.compile(r"[!-~]{1,256}")  # the `<org>/<repo>:<quant>` id: visible ASCII, no space
# The keys of a POST /models body that go into the profile; `model` and `name` say what and as what.
PROFILE_KEYS = ("hf_file", "hf_revision", "mmproj", "args", "aliases", "description")


@dataclass
class Download:
    """A POST /models download under way."""

    name: str
    ref: hub.HfRef
    profile: dict[str, Any]
    cancelled: bool = False
    # Its bytes so far and its end, where requests for it wait (kept by the controller).
    pending: PendingModel = field(init=False)
    task: asyncio.Task[None] | None = None


class ModelManager:
    """Downloads that become profiles, and the removal of the profiles it created."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.downloads: dict[str, Download] = {}

    # ------------------------------------------------------------------------------------------ add

    async def add(self, payload: dict[str, Any], reload: Reload) -> str:
        """Start downloading the model `payload` names; returns the new profile's name once the Hub
        has listed the files it needs (as router mode checks the repo before it answers).

        `model` is a Hugging Face reference (`<org>/<repo>[:<quant>]`, as llama-server's `-hf` takes
        it) and names the profile unless `name` is given; `args`, `hf_file` and `mmproj` go into it."""
        model = payload.get("model")
        if not isinstance(model, str) or not model.strip():
            raise RouterError(
                400, "give 'model': a Hugging Face repo '<org>/<repo>[:<quant>]'", code="missing_model"
            )
        model = model.strip()
        if refused := sorted(key for key in ("binary", "env", "model_path") if key in payload):
            raise RouterError(
                400,
                f"{refused[0]!r} cannot be set over HTTP: a model added this way runs the configured "
                "llama-server with model-serving 'args' only",
                code="invalid_request",
            )
        name = payload.get("name", model)
        if not isinstance(name, str) or not name.strip():
            raise RouterError(400, "'name' must be a non-empty string", code="invalid_request")
        name = name.strip()
        profile: dict[str, Any] = {"hf": model}
        for key in PROFILE_KEYS:
            if key in payload:
                profile[key] = payload[key]
        profile.setdefault("description", f"downloaded from Hugging Face: {model}")
        try:
            checked = Profile.model_validate(profile)
        except ValueError as exc:
            raise RouterError(
                400, f"cannot make a profile of {printable(model)!r}: {exc}", code="invalid_request"
            ) from None
        config = self.controller.config
        if problems := profile_problems(checked, config.server.allowed_args):
            raise RouterError(400, problems[0], code="not_allowed")
        self._check_ids(name, list(checked.aliases), free_name=name != model)
        folder = profiles_dir(config.path)
        if not os.access(folder if folder.exists() else folder.parent, os.W_OK):
            raise RouterError(
                503,
                f"{folder} is not writable by the router: the new profile could not be saved",
                code="unavailable",
            )
        ref = hub.HfRef.parse(checked.hf or "", checked.hf_file, checked.hf_revision, checked.mmproj)
        download = Download(name, ref, profile)
        download.pending = PendingModel(name)
        self.downloads[name] = download  # taken while the Hub is asked
        try:
            await asyncio.to_thread(hub.remote_files, ref)
        except hub.HubError as exc:
            self.downloads.pop(name, None)
            raise RouterError(400, str(exc), code="model_not_downloadable") from None
        # Listed, and waited for by requests, from now on: before this answers.
        self.controller.downloads[name] = download.pending
        download.task = asyncio.create_task(self._download(download, reload), name=f"download {name}")
        log.info("downloading %s as model %r", ref.describe(), name)
        return name

    def _check_ids(self, name: str, aliases: list[str], *, free_name: bool) -> None:
        """The new model's ids: a free-form one (a `name` given, `aliases`) follows NAME_RULE, while
        the router's own `<org>/<repo>:<quant>` stays as it is; none may equal, or differ only by
        case from, an id in use or being downloaded (a person could not tell them apart)."""
        if not free_name and not REFERENCE_ID.fullmatch(name):
            raise RouterError(
                400,
                f"model '{printable(name, 64)}' cannot be an id: a Hugging Face reference is visible "
                "ASCII without spaces, at most 256 characters",
                code="invalid_name",
            )
        for value in [name, *aliases] if free_name else aliases:
            if not NAME.fullmatch(value):
                raise RouterError(
                    400,
                    f"model name '{printable(value, 64)}' is not allowed: use {NAME_RULE}",
                    code="invalid_name",
                )
        taken = {known.casefold(): known for known in [*self.controller.config.names, *self.downloads]}
        for value in [name, *aliases]:
            other = taken.get(value.casefold())
            taken[value.casefold()] = value
            if other is not None:
                same = "exists" if other == value else f"differs only by case from {other!r}"
                raise RouterError(400, f"model '{printable(value, 64)}' {same}", code="model_exists")

    async def _download(self, download: Download, reload: Reload) -> None:
        name = download.name
        reason: str | None = None
        try:
            found = await asyncio.to_thread(
                hub.pull, download.ref, progress_bars=False, progress=self._reporter(download)
            )
            files = [*found.model_paths, *([found.mmproj_path] if found.mmproj_path is not None else [])]
            path = await asyncio.to_thread(self._write_profile, download, files)
            if not await reload(f"POST /models {name}"):
                path.unlink(missing_ok=True)
                reason = "downloaded, but the config could not be reloaded with it (see /health)"
        except hub.Cancelled:
            reason = "cancelled by DELETE /models"
        except (hub.HubError, OSError) as exc:
            reason = str(exc) if isinstance(exc, hub.HubError) else f"cannot write its profile: {exc}"
        finally:
            self.downloads.pop(name, None)
            if self.controller.downloads.get(name) is download.pending:
                del self.controller.downloads[name]
            download.pending.end(reason)
        if reason is not None:
            log.warning("download of %r failed: %s", name, reason)
            self.controller.events.emit(DownloadFailed(name, reason))
            return
        log.info("model %r downloaded; its profile is %s", name, path)
        self.controller.events.emit(DownloadFinished(name, [str(file) for file in files], str(path)))

    def _reporter(self, download: Download) -> hub.ByteProgress:
        """The progress callback of a download's thread: records bytes, sends at most one event per
        `PROGRESS_INTERVAL` per file (and each file's last), stops the download once cancelled."""
        loop = asyncio.get_running_loop()
        sent: dict[str, float] = {}

        def report(file: str, done: int, total: int | None) -> None:
            if download.cancelled:
                raise hub.Cancelled(download.name)
            download.pending.progress[file] = (done, total)
            now = time.monotonic()
            if done != total and now - sent.get(file, float("-inf")) < PROGRESS_INTERVAL:
                return
            sent[file] = now
            event = DownloadProgress(download.name, file, done, total)
            loop.call_soon_threadsafe(self.controller.events.emit, event)

        return report

    def _write_profile(self, download: Download, files: list[Path]) -> Path:
        """`profiles.d/<name>.yaml` with the new profile and the files downloaded for it (what
        DELETE /models deletes), written whole or not at all."""
        folder = profiles_dir(self.controller.config.path)
        folder.mkdir(parents=True, exist_ok=True)
        stem = _UNSAFE.sub("-", download.name).strip("-.") or "model"
        path = folder / f"{stem}.yaml"
        counter = 1
        while path.exists():
            counter += 1
            path = folder / f"{stem}-{counter}.yaml"
        document = {
            "created_by": CREATED_BY_ROUTER,
            "profiles": {download.name: download.profile},
            "downloaded": {download.name: [str(file) for file in files]},
        }
        ProfilesFile.model_validate(document)
        header = (
            f"# Created by llama-router for POST /models on {time.strftime('%Y-%m-%d %H:%M:%S')}.\n"
            "# DELETE /models?model=<name> removes it, and the files it downloaded that no other profile\n"
            "# uses (?delete_files=0 keeps them). Edit it freely; move the profile into profiles.yaml\n"
            "# (and delete this file) to make it a hand-written one.\n"
        )
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(header + yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
        temporary.replace(path)
        return path

    # ------------------------------------------------------------------------------------------ remove

    async def remove(self, model: str, reload: Reload, *, delete_files: bool) -> dict[str, Any]:
        """Remove a profile POST /models created (cancelling its download if still under way), and
        with `delete_files` the files downloaded for it that no other profile uses (compared as files
        on disk: files_to_keep); a profile written before downloads were recorded gives its own files."""
        download = self.downloads.get(model)
        if download is not None:
            download.cancelled = True
            if download.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(download.task)
            self.controller.events.emit(ModelRemoved(model, []))
            return {"success": True, "model": model, "deleted_files": []}
        config = self.controller.config
        name = config.resolve_name(model)
        if name is None:
            known = ", ".join(sorted(config.names))
            raise RouterError(
                404, f"model {model!r} not found; known models: {known}", code="model_not_found"
            )
        profile = config.profiles[name]
        if profile.origin in ("models_dir", "cache"):
            where = "a models_dir folder" if profile.origin == "models_dir" else "the Hugging Face cache"
            raise RouterError(
                403,
                f"model {name!r} is the file {profile.model_path} in {where}; remove the file to remove it",
                code="model_not_removable",
            )
        if not profile.removable:
            raise RouterError(
                403,
                f"model {name!r} is defined in {profile.source}, which llama-router did not write; only "
                "models added with POST /models can be removed this way: edit that file to remove it",
                code="model_not_removable",
            )
        recorded = await asyncio.to_thread(_drop_profile, profile)
        if not await reload(f"DELETE /models {name}"):
            raise RouterError(
                503,
                f"{profile.source} was changed, but the config could not be reloaded; see /health",
                code="reload_failed",
            )
        deleted: list[str] = []
        if delete_files:
            files = recorded if recorded is not None else profile_files(profile)
            shared = files_to_keep(files, self.controller.config.profiles.values())
            unshared = [file for file in files if file not in shared]
            deleted = [str(blob) for blob in await asyncio.to_thread(hub.remove_cached, unshared)]
        log.info("model %r removed%s", name, f" with {len(deleted)} cached file(s)" if delete_files else "")
        self.controller.events.emit(ModelRemoved(name, deleted))
        return {"success": True, "model": name, "deleted_files": deleted}

    def pending(self, name: str | None = None) -> list[dict[str, Any]]:
        """Downloads under way (only `name`'s, if given), as `/models` and `/v1/models` list them."""
        return [
            {
                "id": download.name,
                "object": "model",
                "owned_by": "llamacpp",
                "created": int(self.controller.started_at),
                "aliases": [],
                "status": {
                    # Loading as far as a client can tell (a request for it waits for it): Open
                    # WebUI shows it as such, and keeps it in its list.
                    "value": "loading",
                    "detail": "downloading",
                    "progress": {
                        file: {"done": done, "total": total}
                        for file, (done, total) in download.pending.progress.items()
                    },
                },
                "can_remove": True,
            }
            for download in self.downloads.values()
            if name is None or download.name == name
        ]

    async def close(self) -> None:
        """Stop downloads under way (their threads end at their next progress report)."""
        for download in list(self.downloads.values()):
            download.cancelled = True
        tasks = [download.task for download in self.downloads.values() if download.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)


def _drop_profile(profile: ResolvedProfile) -> list[Path] | None:
    """Take `profile` out of the router-written file that holds it (the file goes with its last one);
    returns the files recorded as downloaded for it (None: the file records none)."""
    source = profile.source
    assert source is not None
    document = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    profiles = document.get("profiles") or {}
    profiles.pop(profile.name, None)
    downloads = document.get("downloaded") or {}
    listed = downloads.pop(profile.name, None)
    recorded = [Path(file) for file in listed] if isinstance(listed, list) else None
    if not profiles:
        source.unlink()
        return recorded
    header = "".join(
        line for line in source.read_text(encoding="utf-8").splitlines(True) if line.startswith("#")
    )
    temporary = source.with_name(f".{source.name}.tmp")
    temporary.write_text(header + yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    temporary.replace(source)
    return recorded
