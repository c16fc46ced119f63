"""Models found on disk: every GGUF in the `server.models_dir` folders, and (opt-in) in the Hugging
Face cache, served without a profile each.

One model per file; a split model's shards are one model; a projector (`mmproj*.gguf`) is attached
to the model of its folder whose file name it shares the longest start with. LoRA adapters,
vocab-only files and files still being written are skipped, each with the reason `check` prints.

Ids: the file name without `.gguf` (and without a shard suffix), lower case, every run of other
characters than `a-z 0-9 . _ -` made one `-`. Where two files (or a profile's name or alias) would
have the same id, the profile keeps it, then the file that comes first (folders in the order given,
then paths in sorted order); each other file gets `-` and the first 6 hex digits of the SHA-256 of
its absolute path added, so its id stays the same across restarts. A hand-written profile for the
same file (the same file on disk, whatever its path) replaces the found one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from llama_router.config import hub
from llama_router.config.schema import (
    NAME,
    ConfigError,
    FoundModel,
    RouterConfig,
    ServerConfig,
    load_config,
    parse_config,
    read_yaml,
    with_found,
)
from llama_router.manage.model_files import file_identity, profile_files
from llama_router.sizing.gguf import GGUFError, GGUFHeader, read_header

log = logging.getLogger("llama_router.models_dir")

# The endings of files a downloader is still writing (curl, browsers, huggingface_hub, aria2, wget).
PARTIAL = (".part", ".partial", ".incomplete", ".downloadinprogress", ".crdownload", ".tmp", ".aria2")
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_OTHER = re.compile(r"[^a-z0-9._-]+")


@dataclass(frozen=True)
class Skipped:
    """A file that is not served, and why."""

    path: Path
    reason: str


@dataclass
class Findings:
    """What the folders and the cache hold: the models to serve and the files left out."""

    models: list[FoundModel] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


@dataclass
class _Model:
    path: Path
    shards: tuple[Path, ...]
    header: GGUFHeader
    mmproj: Path | None = None


def model_id(file_name: str) -> str:
    """The id of a model file: its name without `.gguf` or a shard suffix, lower case, safe."""
    shard = _SHARD.match(file_name)
    stem = shard["stem"] if shard else re.sub(r"\.gguf$", "", file_name, flags=re.IGNORECASE)
    name = _OTHER.sub("-", stem.lower()).strip("-._")[:128].rstrip("-._")
    return name if NAME.fullmatch(name) else "model"


def _unique(name: str, path: Path, taken: set[str]) -> str:
    """`name`, or where it is taken, `name-<6 hex digits of the path's SHA-256>` (longer if needed)."""
    digest = hashlib.sha256(str(path).encode()).hexdigest()
    width = 6
    while name in taken and width <= len(digest):
        name = f"{name[: 127 - width]}-{digest[:width]}"
        width += 2
    return name


def _header(path: Path) -> GGUFHeader | str:
    """The file's header, or why it is not a whole model file."""
    try:
        header = read_header(path)
    except (OSError, GGUFError) as exc:
        return f"its header does not read whole ({exc}): not a GGUF file, or still being written"
    if missing := header.missing_bytes():
        return f"{missing} bytes of its tensor data are missing: still being written, or cut short"
    return header


def _kind(header: GGUFHeader, name: str) -> str | None:
    """Why a readable GGUF is no model of its own ('mmproj' for a projector), None for a model."""
    kind = str(header.metadata.get("general.type", "")).lower()
    if kind == "adapter":
        return "a LoRA adapter (general.type adapter): give it to a profile with --lora"
    if kind in ("mmproj", "clip") or header.architecture == "clip" or "mmproj" in name.lower():
        return "mmproj"
    if not header.tensors:
        return "vocab only (no tensors): a tokenizer file, not a model"
    return None


def _files(folder: Path) -> Iterable[Path]:
    """The files under `folder`, sorted, hidden ones (and hidden folders) left out; a linked folder
    is followed once (a link back up the tree ends there)."""
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        identity = file_identity(Path(root))
        if identity is None or identity in seen:
            dirs[:] = []
            continue
        seen.add(identity)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root, name)


def scan_folder(folder: Path, skipped: list[Skipped]) -> list[_Model]:
    """The models under one folder, projectors attached; what is left out goes to `skipped`."""
    models: list[_Model] = []
    projectors: list[Path] = []
    shards: dict[tuple[Path, str, int], dict[int, Path]] = {}
    for path in _files(folder):
        lower = path.name.lower()
        if ".gguf" in lower and lower.endswith(PARTIAL):
            skipped.append(Skipped(path, "a partial download (still being written)"))
            continue
        if not lower.endswith(".gguf"):
            continue
        if shard := _SHARD.match(path.name):
            key = (path.parent, shard["stem"], int(shard["count"]))
            shards.setdefault(key, {})[int(shard["index"])] = path
            continue
        _classify(path, (path,), models, projectors, skipped)
    for (_folder, stem, count), present in sorted(shards.items()):
        missing = [index for index in range(1, count + 1) if index not in present]
        if missing:
            first = present[min(present)]
            listed = ", ".join(f"{index:05d}" for index in missing)
            skipped.append(Skipped(first, f"split model {stem!r} lacks shard(s) {listed} of {count:05d}"))
            continue
        _classify(
            present[1], tuple(present[index] for index in range(1, count + 1)), models, projectors, skipped
        )
    models.sort(key=lambda model: model.path)
    for projector in projectors:
        owner = _owner(projector, models)
        if owner is None:
            skipped.append(
                Skipped(projector, "a multimodal projector no model in its folder matches by name")
            )
        elif owner.mmproj is not None:
            skipped.append(Skipped(projector, f"a second projector for {owner.path.name}"))
        else:
            owner.mmproj = projector
    return models


def _classify(
    path: Path, shards: tuple[Path, ...], models: list[_Model], projectors: list[Path], skipped: list[Skipped]
) -> None:
    headers = [_header(shard) for shard in shards]
    if bad := next(
        ((shard, why) for shard, why in zip(shards, headers, strict=True) if isinstance(why, str)), None
    ):
        skipped.append(Skipped(*bad))
        return
    header = headers[0]
    assert not isinstance(header, str)
    kind = _kind(header, path.name)
    if kind == "mmproj":
        projectors.append(path)
    elif kind is not None:
        skipped.append(Skipped(path, kind))
    else:
        if len(shards) > 1:  # the tensors live in the other shards; the first may hold none
            tensors = tuple(t for h in headers if not isinstance(h, str) for t in h.tensors)
            header = GGUFHeader(header.path, header.version, header.metadata, tensors, header.file_size)
            if not tensors:
                skipped.append(Skipped(path, "vocab only (no tensors): a tokenizer file, not a model"))
                return
        models.append(_Model(path, shards, header))


def _owner(projector: Path, models: list[_Model]) -> _Model | None:
    """The model of the projector's folder whose file name shares the longest start with the
    projector's (its name without `mmproj`), or the only model there."""
    beside = [model for model in models if model.path.parent == projector.parent]
    key = model_id(re.sub("mmproj", "", projector.name, flags=re.IGNORECASE)).lstrip("-._")

    def shared(model: _Model) -> int:
        name = model_id(model.path.name)
        return next(
            (i for i, (a, b) in enumerate(zip(key, name, strict=False)) if a != b), min(len(key), len(name))
        )

    ranked = sorted(beside, key=shared, reverse=True)
    if len(ranked) == 1:
        return ranked[0]
    if ranked and shared(ranked[0]) > shared(ranked[1]) and shared(ranked[0]) > 0:
        return ranked[0]
    return None


def on_disk(server: ServerConfig) -> tuple[tuple[str, int, int], ...]:
    """What the folders (and the cache, with `hf_cache`) hold, as (path, size, mtime) of each GGUF
    file: a change means models may have come or gone. Reads names and stats, never a file."""
    found: list[tuple[str, int, int]] = []
    folders = list(server.models_dir)
    if server.hf_cache:
        cache = hub.cache_dir()
        folders += [cache / name for name in _names(cache) if name.startswith("models--")]
    for folder in folders:
        for path in _files(folder):
            if path.name.lower().endswith(".gguf") or path.parent.name == "refs":
                try:
                    stat = path.stat()
                except OSError:
                    continue
                found.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(found)


def _names(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


def discover(config: RouterConfig) -> Findings:
    """The models of `server.models_dir` and (with `server.hf_cache`) of the Hugging Face cache that
    no profile of `config` already serves, with their ids."""
    findings = Findings()
    owners: dict[tuple[int, int] | None, str] = {
        identity: name
        for name, profile in config.profiles.items()
        for file in profile_files(profile)
        if (identity := file_identity(file)) is not None
    }
    taken = set(config.names)
    for folder in config.server.models_dir:
        if not folder.is_dir():
            findings.skipped.append(Skipped(folder, "server.models_dir: not a folder"))
            continue
        for model in scan_folder(folder, findings.skipped):
            if (owner := owners.get(file_identity(model.path))) is not None:
                findings.skipped.append(Skipped(model.path, f"served by profile {owner!r}"))
                continue
            name = _unique(model_id(model.path.name), model.path, taken)
            taken.add(name)
            findings.models.append(FoundModel(name, model.path, "models_dir", model.mmproj))
    if config.server.hf_cache:
        for ref, resolved in hub.cached_models():
            if isinstance(resolved, hub.HubError):
                findings.skipped.append(Skipped(hub.cache_dir(), f"{ref}: {resolved}"))
                continue
            first = resolved.model_path
            header = _header(first)
            why = header if isinstance(header, str) else _kind(header, first.name)
            if why is not None:
                findings.skipped.append(Skipped(first, f"{ref}: {why}"))
                continue
            if (owner := owners.get(file_identity(first))) is not None:
                findings.skipped.append(Skipped(first, f"{ref}: served by profile {owner!r}"))
                continue
            name = _unique(ref, first, taken)
            taken.add(name)
            findings.models.append(FoundModel(name, first, "cache", resolved.mmproj_path))
    findings.models.sort(key=lambda model: (model.origin != "models_dir", model.name))  # listed by id
    return findings


def load(
    path: str | Path,
    *,
    models_dirs: Iterable[Path] = (),
    hf_cache: bool = False,
    keep_unrunnable: bool = False,
    fresh: bool = False,
) -> tuple[RouterConfig, Findings]:
    """The config of `path` with the models found on disk added. Folders given here (`--models-dir`)
    come after those of `server.models_dir`; with any folder or the cache, `path` may be missing
    (then the router is configured by the folders alone; `fresh`: the file is not read even if it
    exists, as for `init`, which writes it)."""
    models_dirs = [folder.expanduser().resolve() for folder in models_dirs]
    if not models_dirs and not hf_cache:
        config = load_config(path, keep_unrunnable=keep_unrunnable)
    else:
        file = Path(path).expanduser().resolve()
        data, file = read_yaml(file) if file.exists() and not fresh else ({}, file)
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{file}: <top>: expected a mapping with 'server' and 'profiles' keys")
        data = dict(data or {})
        server = data.get("server")
        server = dict(server) if isinstance(server, dict) else {} if server is None else server
        if isinstance(server, dict):
            server["models_dir"] = [*(server.get("models_dir") or []), *map(str, models_dirs)]
            server["hf_cache"] = server.get("hf_cache") or hf_cache
        data["server"] = server
        config = parse_config(data, file, keep_unrunnable=keep_unrunnable)
    if not config.server.models_dir and not config.server.hf_cache:
        return config, Findings()
    absent = [folder for folder in config.server.models_dir if not folder.is_dir()]
    if absent and not keep_unrunnable:  # a router waits for it (a mount may come later); `check` does not
        raise ConfigError(f"{config.path}: server.models_dir (or --models-dir): not a folder: {absent[0]}")
    findings = discover(config)
    for skipped in findings.skipped:
        log.info("not served: %s: %s", skipped.path, skipped.reason)
    config = with_found(config, findings.models, keep_unrunnable=keep_unrunnable)
    if not config.profiles:  # a router may wait for files to arrive; `check` says there are none
        where = ", ".join(map(str, config.server.models_dir)) or "the Hugging Face cache"
        if not keep_unrunnable:
            raise ConfigError(f"{config.path}: no model to serve: no GGUF model found in {where}")
        log.warning("no model to serve yet: no GGUF model found in %s", where)
    return config, findings
