"""Hugging Face model references: which files a profile's `hf:` names, from the cache or the Hub.

Serving resolves offline only, from the Hugging Face cache (never the network), so start-up and
reloads never wait on a download and behave the same with `HF_HUB_OFFLINE=1`; `llama-router pull`
is the one place that downloads. Both go through the same file selection:

- `hf_file: model-Q4_K_M.gguf` names a file (any path in the repo);
- a quantisation tag (`hf_file: Q4_K_M`, or `hf: org/repo:Q4_K_M` as llama.cpp's `-hf` takes it)
  picks the GGUF whose name carries that tag;
- neither: the repo's only GGUF, else its `Q4_K_M` one (llama.cpp's default);
- a sharded model (`name-00001-of-00003.gguf`) brings all its shards; the first one is passed to
  llama-server, which finds the others beside it;
- `mmproj: true` adds the repo's multimodal projector (`*mmproj*.gguf`), `mmproj: F16` or a file name
  picks one of several.

Cache location, endpoint and token come from the usual places (`HF_HUB_CACHE`, `HF_HOME`,
`HF_ENDPOINT`, `HF_TOKEN`, the token file of `hf auth login`), read when used rather than at import.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
DEFAULT_REVISION = "main"
DEFAULT_QUANT = "Q4_K_M"  # what llama.cpp's `-hf org/repo` picks when no tag is given
# Projector precisions in order of preference when a repo offers several and none is named.
MMPROJ_PREFERENCE = ("F16", "BF16", "F32", "Q8_0")


class HubError(Exception):
    """A Hugging Face reference that cannot be resolved; the message names the repo and file."""


class Cancelled(Exception):
    """A download that was asked to stop (raised from its progress callback)."""


@dataclass(frozen=True)
class HfRef:
    """A profile's Hugging Face reference, as written: repo, file or tag, revision, projector."""

    repo: str
    file: str | None = None
    tag: str | None = None
    revision: str = DEFAULT_REVISION
    mmproj: bool | str = False

    @classmethod
    def parse(
        cls,
        hf: str,
        hf_file: str | None = None,
        revision: str | None = None,
        mmproj: bool | str = False,
    ) -> HfRef:
        """Build a reference from profile fields; ValueError says what is wrong."""
        repo, _, tag = hf.strip().partition(":")
        check_repo_id(repo)
        if tag and hf_file:
            raise ValueError(f"give the file either as {hf!r} or as hf_file, not both")
        spec = (hf_file or tag or "").strip() or None
        is_file = spec is not None and spec.lower().endswith(".gguf")
        return cls(
            repo=repo,
            file=spec if is_file else None,
            tag=None if is_file else spec,
            revision=(revision or DEFAULT_REVISION).strip() or DEFAULT_REVISION,
            mmproj=mmproj,
        )

    def describe(self) -> str:
        what = self.file or (f"quant {self.tag}" if self.tag else "default file")
        return f"{self.repo} ({what}, revision {self.revision})"


def check_repo_id(repo: str) -> str:
    """`org/repo`, or a ValueError that shows the expected shape."""
    if not _REPO_RE.match(repo) or ".." in repo:
        raise ValueError(f"{repo!r} is not a Hugging Face repo id; expected '<org>/<repo>'")
    return repo


@dataclass(frozen=True)
class HfFiles:
    """The repo files a reference needs: the model (every shard, first one first) and the projector."""

    repo: str
    revision: str
    model: tuple[str, ...]
    mmproj: str | None = None

    def all(self) -> list[str]:
        return [*self.model, *([self.mmproj] if self.mmproj else [])]


@dataclass(frozen=True)
class ResolvedHf:
    """Local paths of a reference's files in the Hugging Face cache."""

    files: HfFiles
    commit: str
    model_paths: tuple[Path, ...]
    mmproj_path: Path | None

    @property
    def model_path(self) -> Path:
        """The file llama-server is given (the first shard of a sharded model)."""
        return self.model_paths[0]


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _tag_pattern(tag: str) -> re.Pattern[str]:
    # The tag as a whole word of the file name: Q4_K must not match Q4_K_M, F16 not BF16 (`_` joins
    # a tag's parts, so it may come before a tag but not after it).
    return re.compile(rf"(?:^|[-._/]){re.escape(tag)}(?:$|[-./])", re.IGNORECASE)


def _is_mmproj(path: str) -> bool:
    return "mmproj" in _name(path).lower()


def _groups(models: Iterable[str]) -> dict[str, list[str]]:
    """Model files grouped so that a sharded model is one entry (key: its path without the shard suffix)."""
    groups: dict[str, list[str]] = {}
    for path in sorted(models):
        shard = _SHARD_RE.match(path)
        # A shard group's key cannot collide with a real file name (`*` is not in Hub file names).
        key = f"{shard['stem']}-*-of-{shard['count']}.gguf" if shard else path
        groups.setdefault(key, []).append(path)
    return groups


def shard_names(name: str) -> list[str]:
    """The file names of every shard of the split model whose first shard is `name` (`name` alone
    for a file that is not the first shard of a split)."""
    shard = _SHARD_RE.match(name)
    if shard is None or int(shard["index"]) != 1:
        return [name]
    count = int(shard["count"])
    return [f"{shard['stem']}-{index:05d}-of-{count:05d}.gguf" for index in range(1, count + 1)]


def _complete(key: str, files: list[str], repo: str, where: str) -> tuple[str, ...]:
    """The shards of one model in order, or HubError naming the missing ones."""
    first = _SHARD_RE.match(files[0])
    if first is None:
        return (files[0],)
    count = int(first["count"])
    stem = first["stem"]
    expected = [f"{stem}-{index:05d}-of-{count:05d}.gguf" for index in range(1, count + 1)]
    present = {path.lower(): path for path in files}
    missing = [path for path in expected if path.lower() not in present]
    if missing:
        raise HubError(f"{repo}: sharded model {key!r} is incomplete {where}: missing {', '.join(missing)}")
    return tuple(present[path.lower()] for path in expected)


def _choose_mmproj(ref: HfRef, projectors: list[str], where: str) -> str | None:
    if ref.mmproj is False:
        return None
    if not projectors:
        raise HubError(f"{ref.repo}: no multimodal projector (*mmproj*.gguf) {where}")
    if isinstance(ref.mmproj, str) and ref.mmproj.lower().endswith(".gguf"):
        if ref.mmproj in projectors:
            return ref.mmproj
        by_name = [path for path in projectors if _name(path) == ref.mmproj]
        if len(by_name) == 1:
            return by_name[0]
        raise HubError(
            f"{ref.repo}: no projector file {ref.mmproj!r} {where}; found: {', '.join(projectors)}"
        )
    if isinstance(ref.mmproj, str):
        matching = [path for path in projectors if _tag_pattern(ref.mmproj).search(path)]
        if len(matching) == 1:
            return matching[0]
        what = "no" if not matching else "several"
        raise HubError(
            f"{ref.repo}: {what} projector files match {ref.mmproj!r} {where}; found: {', '.join(projectors)}"
        )
    if len(projectors) == 1:
        return projectors[0]
    for precision in MMPROJ_PREFERENCE:
        matching = [path for path in projectors if _tag_pattern(precision).search(path)]
        if matching:
            return matching[0]
    return sorted(projectors)[0]


def select_files(ref: HfRef, listing: Iterable[str], *, where: str) -> HfFiles:
    """Pick the files `ref` needs from a repo's file list; HubError names repo and file if it cannot.

    `where` completes messages: "in the local Hugging Face cache (...)" or "in the repo at revision main".
    """
    ggufs = sorted({path for path in listing if path.lower().endswith(".gguf")})
    projectors = [path for path in ggufs if _is_mmproj(path)]
    groups = _groups(path for path in ggufs if not _is_mmproj(path))

    if ref.file is not None:
        wanted = ref.file.lstrip("/")
        key = next((k for k, files in groups.items() if wanted in files), None)
        if key is None:
            by_name = [k for k, files in groups.items() if any(_name(f) == wanted for f in files)]
            key = by_name[0] if len(by_name) == 1 else None
        if key is None:
            raise HubError(f"{ref.repo}: file {wanted!r} not found {where}{_listing_hint(groups)}")
    else:
        tag = ref.tag or DEFAULT_QUANT
        matching = [k for k in groups if _tag_pattern(tag).search(k)]
        if ref.tag is None and len(groups) == 1:
            matching = list(groups)
        if not matching:
            if ref.tag is None and not groups:
                raise HubError(f"{ref.repo}: no GGUF model file {where}")
            if ref.tag is None:
                raise HubError(
                    f"{ref.repo}: several GGUF files and none is {DEFAULT_QUANT} {where}; "
                    f"set hf_file to a file or quant tag{_listing_hint(groups)}"
                )
            raise HubError(f"{ref.repo}: no GGUF file for quant {tag!r} {where}{_listing_hint(groups)}")
        if len(matching) > 1:
            raise HubError(
                f"{ref.repo}: quant {tag!r} matches several files {where}: {', '.join(matching)}; "
                "set hf_file to one of them"
            )
        key = matching[0]
    model = _complete(key, groups[key], ref.repo, where)
    return HfFiles(ref.repo, ref.revision, model, _choose_mmproj(ref, projectors, where))


def _listing_hint(groups: dict[str, list[str]]) -> str:
    if not groups:
        return " (no GGUF files there)"
    names = list(groups)
    shown = ", ".join(names[:12]) + (f", ... ({len(names) - 12} more)" if len(names) > 12 else "")
    return f"; GGUF files there: {shown}"


# --------------------------------------------------------------------------------------- the cache


def cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment as huggingface_hub reads it."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if value := os.environ.get(variable):
            return Path(os.path.expandvars(os.path.expanduser(value)))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def offline() -> bool:
    """`HF_HUB_OFFLINE` (or the older `TRANSFORMERS_OFFLINE`) asks for no network at all."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _repo_folder(repo: str, cache: Path) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


def _cached_commit(ref: HfRef, cache: Path) -> str | None:
    folder = _repo_folder(ref.repo, cache)
    ref_file = folder / "refs" / ref.revision
    if ref_file.is_file():
        return ref_file.read_text(encoding="utf-8").strip() or None
    if _COMMIT_RE.match(ref.revision) and (folder / "snapshots" / ref.revision).is_dir():
        return ref.revision
    return None


def _snapshot_listing(snapshot: Path) -> list[str]:
    """Files present in a cached snapshot (a link whose blob is missing does not count)."""
    found = []
    for root, _dirs, files in os.walk(snapshot):
        for name in files:
            path = Path(root, name)
            if path.is_file():
                found.append(path.relative_to(snapshot).as_posix())
    return found


def resolve_cached(ref: HfRef) -> ResolvedHf:
    """The local files of `ref` in the Hugging Face cache, without any network access."""
    from huggingface_hub import try_to_load_from_cache

    cache = cache_dir()
    where = f"in the local Hugging Face cache ({cache})"
    commit = _cached_commit(ref, cache)
    if commit is None:
        wanted = f" file {ref.file!r}" if ref.file else ""
        raise HubError(f"{ref.repo}:{wanted} revision {ref.revision!r} is not {where}")
    snapshot = _repo_folder(ref.repo, cache) / "snapshots" / commit
    files = select_files(ref, _snapshot_listing(snapshot), where=where)
    paths: list[Path] = []
    for name in files.all():
        found = try_to_load_from_cache(ref.repo, name, cache_dir=str(cache), revision=commit)
        if not isinstance(found, str):
            raise HubError(f"{ref.repo}: file {name!r} is not {where}")
        paths.append(Path(found))
    count = len(files.model)
    return ResolvedHf(files, commit, tuple(paths[:count]), paths[count] if files.mmproj else None)


# A quant tag at the end of a file's stem, as llama.cpp names its cache entries (`<org>/<repo>:<tag>`).
_QUANT_RE = re.compile(
    r"(?:^|[-._])(?P<tag>(?:UD-)?(?:I?Q\d+(?:_[A-Z0-9]+)*|[BF]F?16|F32|MXFP4(?:_MOE)?|TQ\d_\d))$", re.I
)


def quant_tag(file: str) -> str:
    """The tag naming a model file of a repo: its quant (`Q4_K_M`), else its stem."""
    stem = _name(file)
    shard = _SHARD_RE.match(stem)
    stem = shard["stem"] if shard else stem.removesuffix(".gguf").removesuffix(".GGUF")
    found = _QUANT_RE.search(stem)
    return found["tag"].upper() if found else stem


def cached_models() -> Iterator[tuple[str, ResolvedHf | HubError]]:
    """Every GGUF model of the Hugging Face cache, as `(<org>/<repo>:<tag>, its files)` (or why its
    files do not make a model), at each repo's `main` revision; reads only the disk."""
    cache = cache_dir()
    try:
        folders = sorted(folder for folder in cache.iterdir() if folder.name.startswith("models--"))
    except OSError:
        return
    for folder in folders:
        repo = folder.name.removeprefix("models--").replace("--", "/", 1)
        if not _REPO_RE.match(repo):
            continue
        commit = _cached_commit(HfRef(repo), cache)
        if commit is None:
            continue
        ggufs = [f for f in _snapshot_listing(folder / "snapshots" / commit) if f.lower().endswith(".gguf")]
        projectors = any(_is_mmproj(file) for file in ggufs)
        for files in _groups(file for file in ggufs if not _is_mmproj(file)).values():
            ref = HfRef(repo, file=files[0], revision=DEFAULT_REVISION, mmproj=projectors)
            try:
                yield f"{repo}:{quant_tag(files[0])}", resolve_cached(ref)
            except HubError as exc:
                yield f"{repo}:{quant_tag(files[0])}", exc


# --------------------------------------------------------------------------------------- the Hub

Progress = Callable[[str], None]
# Bytes of one file: (file in the repo, bytes so far, total bytes or None); may raise to cancel.
ByteProgress = Callable[[str, int, int | None], None]


def endpoint() -> str | None:
    """`HF_ENDPOINT` as set now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT") or None


def remote_files(ref: HfRef) -> HfFiles:
    """The files `ref` needs, chosen from the repo's listing on the Hub (nothing is downloaded)."""
    if offline():
        raise HubError(f"{ref.repo}: cannot download with HF_HUB_OFFLINE set; unset it to pull")
    from huggingface_hub import HfApi

    hub = endpoint()
    try:
        listing = HfApi(endpoint=hub).list_repo_files(ref.repo, revision=ref.revision)
    except Exception as exc:
        raise HubError(_explain(exc, ref, hub or "https://huggingface.co")) from None
    return select_files(ref, listing, where=f"in the repo at revision {ref.revision!r}")


def _byte_counter(name: str, report: ByteProgress) -> type[Any]:
    """A tqdm class that reports a file's bytes to `report` instead of drawing a bar (huggingface_hub
    takes progress only as a tqdm class); an exception from `report` ends the download."""
    from tqdm import tqdm

    class Counter(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            super().__init__(*args, **{**kwargs, "disable": True})
            self.done = int(kwargs.get("initial") or 0)
            report(name, self.done, self.total)

        def update(self, n: float | None = 1) -> bool | None:
            self.done += int(n or 0)
            report(name, self.done, self.total)
            return None

    return Counter


def pull(
    ref: HfRef,
    *,
    progress_bars: bool = True,
    say: Progress | None = None,
    progress: ByteProgress | None = None,
) -> ResolvedHf:
    """Download what `ref` needs into the cache (files already there are not fetched again);
    `progress` hears of each file's bytes as they arrive, instead of the progress bars."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    cache = cache_dir()
    hub = endpoint()
    if progress_bars:
        enable_progress_bars()
    else:
        disable_progress_bars()
    files = remote_files(ref)
    try:
        for name in files.all():
            if say is not None:
                say(f"{ref.repo}: {name}")
            counter = _byte_counter(name, progress) if progress is not None else None
            hf_hub_download(
                ref.repo, name, revision=ref.revision, cache_dir=str(cache), endpoint=hub, tqdm_class=counter
            )
    except (HubError, Cancelled):
        raise
    except Exception as exc:
        raise HubError(_explain(exc, ref, hub or "https://huggingface.co")) from None
    return resolve_cached(ref)


def _explain(exc: Exception, ref: HfRef, hub: str) -> str:
    """A one-line reason for a failed download that names the repo and, where known, the file."""
    from huggingface_hub import errors

    def kind(*names: str) -> tuple[type[BaseException], ...]:
        # Error class names moved between huggingface_hub versions; take those this one has.
        return tuple(getattr(errors, name) for name in names if hasattr(errors, name))

    gated = kind("GatedRepoError")
    repo_missing = kind("RepositoryNotFoundError")
    revision_missing = kind("RevisionNotFoundError")
    entry_missing = kind("RemoteEntryNotFoundError", "EntryNotFoundError")
    offline_errors = kind("OfflineModeIsEnabled", "LocalEntryNotFoundError")

    if isinstance(exc, gated):
        return (
            f"{ref.repo}: gated repo; accept its terms at {hub}/{ref.repo} and provide a token "
            "(HF_TOKEN or `hf auth login`)"
        )
    if isinstance(exc, repo_missing):
        return (
            f"{ref.repo}: repository not found on {hub} (for a private repo, provide a token: "
            "HF_TOKEN or `hf auth login`)"
        )
    if isinstance(exc, revision_missing):
        return f"{ref.repo}: revision {ref.revision!r} not found on {hub}"
    if isinstance(exc, entry_missing):
        return f"{ref.repo}: file not found on {hub}: {_first_line(exc)}"
    if isinstance(exc, offline_errors):
        return f"{ref.repo}: cannot reach {hub} ({_first_line(exc)})"
    return f"{ref.repo}: download from {hub} failed: {type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------- removal


def remove_cached(paths: Iterable[Path]) -> list[Path]:
    """Delete files of the Hugging Face cache: each snapshot link given, and its blob once no other
    snapshot of the repo links to it; empty snapshot folders go too. The files deleted are returned
    (links whose blob another revision still uses free nothing, and are not listed)."""
    deleted: list[Path] = []
    for link in paths:
        link = Path(link)
        snapshots = next((parent for parent in link.parents if parent.name == "snapshots"), None)
        if snapshots is None or not link.is_symlink():
            continue  # not a file of the cache's layout: never touched
        blob = link.resolve()
        link.unlink()
        others = [other for other in snapshots.rglob("*") if other.is_symlink() and other.resolve() == blob]
        if not others and blob.is_file():
            blob.unlink()
            deleted.append(blob)
        for folder in [link.parent, *link.parent.parents]:
            if folder == snapshots:
                break
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break
    return deleted
