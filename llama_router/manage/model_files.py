"""Which files on disk a profile's process reads, and which of them other profiles read too.

Files are compared as the file system knows them (device and inode), never by path: a symlink, a hard
link and a Hugging Face snapshot link all reach the same blob under different names. Anything that
deletes model files asks `files_in_use` first, so that nothing another profile runs from is removed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from llama_router.config.schema import MMPROJ_ARGS, ResolvedProfile
from llama_router.sizing.context_window import flag_value

# llama-server's flags (and their variables) that name a projector or a draft model.
MMPROJ_ENV = "LLAMA_ARG_MMPROJ"
DRAFT_ARGS = ("-md", "--model-draft")
DRAFT_ENV = "LLAMA_ARG_MODEL_DRAFT"


def profile_files(profile: ResolvedProfile) -> list[Path]:
    """Every model file the profile's process reads: its model (each shard), its projector, and a
    projector or draft model named in its `args` or `env`, as llama-server reads them."""
    files = [*profile.model_files, *([profile.mmproj_path] if profile.mmproj_path else [])]
    for flags, variable in ((MMPROJ_ARGS, MMPROJ_ENV), (DRAFT_ARGS, DRAFT_ENV)):
        named = flag_value(profile.args, *flags) or profile.env.get(variable)
        if named:
            files.append(Path(named).expanduser())
    return files


def file_identity(path: Path) -> tuple[int, int] | None:
    """The file `path` reaches once links are followed, as (device, inode); None if there is none."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def files_in_use(files: Iterable[Path], profiles: Iterable[ResolvedProfile]) -> set[Path]:
    """Those of `files` that one of `profiles` reads as its model, projector or draft model: the same
    file on disk, whatever path reaches it (a symlink, a hard link, a Hugging Face snapshot link to
    the blob another revision or repository links to as well). The one check before any deletion."""
    used = {
        identity
        for profile in profiles
        for file in profile_files(profile)
        if (identity := file_identity(file)) is not None
    }
    return {file for file in files if file_identity(file) in used}


def files_to_keep(files: Iterable[Path], profiles: Iterable[ResolvedProfile]) -> set[Path]:
    """Those of `files` a deletion must keep: the ones a profile runs from. A model listed only
    because its file sits in a `models_dir` folder or the Hugging Face cache (`server.hf_cache`) is
    the file, not a user of it: it never keeps one."""
    listed = ("cache", "models_dir")
    return files_in_use(files, [profile for profile in profiles if profile.origin not in listed])
