"""Deleting a model's files never removes a file another profile runs from: files are compared as the
file system knows them (symlinks, hard links, the Hugging Face cache's blobs), not by their paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

from llama_router.config.schema import CREATED_BY_ROUTER, RouterConfig, load_config
from llama_router.manage.model_files import files_in_use, profile_files
from tests.conftest import RouterFactory
from tests.fake_hub import gguf_bytes, make_cache

REPO = "acme/tiny-GGUF"


def config_of(tmp_path: Path, profiles: dict[str, Any]) -> RouterConfig:
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump({"server": {"port": 0}, "profiles": profiles}))
    return load_config(path)


def local(model: Path, *args: str) -> dict[str, Any]:
    return {"model": str(model), "binary": sys.executable, "args": list(args)}


def model_file(path: Path, label: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gguf_bytes(label))
    return path


def test_a_symlink_or_a_hard_link_to_a_model_is_the_same_file(tmp_path: Path) -> None:
    model = model_file(tmp_path / "models" / "a.gguf", "a")
    alone = model_file(tmp_path / "models" / "alone.gguf", "alone")
    symlinked = tmp_path / "elsewhere" / "a-link.gguf"
    symlinked.parent.mkdir()
    symlinked.symlink_to(model)
    hard = tmp_path / "elsewhere" / "a-hard.gguf"
    os.link(model, hard)
    config = config_of(
        tmp_path, {"by-symlink": local(symlinked), "by-hard-link": local(hard), "alone": local(alone)}
    )
    profiles = config.profiles
    assert files_in_use([model, alone], [profiles["by-symlink"]]) == {model}
    assert files_in_use([model, alone], [profiles["by-hard-link"]]) == {model}
    assert files_in_use([symlinked], [profiles["by-hard-link"]]) == {symlinked}
    assert files_in_use([model], [profiles["alone"]]) == set()
    assert files_in_use([tmp_path / "missing.gguf"], profiles.values()) == set()


def test_projectors_and_draft_models_count_as_used(tmp_path: Path) -> None:
    model = model_file(tmp_path / "m.gguf", "m")
    projector = model_file(tmp_path / "mmproj.gguf", "mm")
    draft = model_file(tmp_path / "draft.gguf", "draft")
    draft_link = tmp_path / "draft-link.gguf"
    draft_link.symlink_to(draft)
    config = config_of(
        tmp_path,
        {
            "vision": {**local(model), "mmproj": str(projector)},
            "spaced": local(model, "--model-draft", str(draft_link)),
            "equals": local(model, f"-md={draft}"),
            "projector-in-args": local(model, "-mm", str(projector)),
            "draft-in-env": {**local(model), "env": {"LLAMA_ARG_MODEL_DRAFT": str(draft)}},
        },
    )
    profiles = config.profiles
    assert profile_files(profiles["vision"]) == [model, projector]
    assert files_in_use([projector, draft], [profiles["vision"]]) == {projector}
    assert files_in_use([projector, draft], [profiles["spaced"]]) == {draft}
    assert files_in_use([projector, draft], [profiles["equals"]]) == {draft}
    assert files_in_use([projector, draft], [profiles["projector-in-args"]]) == {projector}
    assert files_in_use([projector, draft], [profiles["draft-in-env"]]) == {draft}


def test_hugging_face_snapshots_of_one_blob_are_one_file(hf_cache: Path, tmp_path: Path) -> None:
    """Two revisions whose snapshots link to one blob, and a profile naming the blob directly: each
    uses what the others use, whatever the snapshot path."""
    data = gguf_bytes("shared-q8")
    old = make_cache(hf_cache, REPO, {"tiny-Q8_0.gguf": data}, revision="v1", commit="1" * 40)
    new = make_cache(
        hf_cache, REPO, {"tiny-Q8_0.gguf": data, "tiny-Q4_K.gguf": gguf_bytes("q4")}, commit="2" * 40
    )
    assert old != new
    blob = (hf_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / old / "tiny-Q8_0.gguf").resolve()
    config = config_of(
        tmp_path,
        {
            "old": {"hf": f"{REPO}:Q8_0", "hf_revision": "v1", "binary": sys.executable},
            "new-q8": {"hf": f"{REPO}:Q8_0", "binary": sys.executable},
            "new-q4": {"hf": f"{REPO}:Q4_K", "binary": sys.executable},
            "blob": local(blob),
        },
    )
    profiles = config.profiles
    old_files = profile_files(profiles["old"])
    assert old_files != profile_files(profiles["new-q8"]), "different snapshot paths"
    for other in ("new-q8", "blob"):
        assert files_in_use(old_files, [profiles[other]]) == set(old_files), other
    assert files_in_use(old_files, [profiles["new-q4"]]) == set()


async def test_delete_files_keeps_a_blob_another_profile_runs_from(
    start_router: RouterFactory, hf_cache: Path, tmp_path: Path
) -> None:
    """DELETE /models with delete_files removes the model's own blob, never one that a hand-written
    profile reaches through a symlink."""
    shared, own = gguf_bytes("shared"), gguf_bytes("own")
    make_cache(hf_cache, REPO, {"tiny-Q8_0.gguf": shared, "tiny-Q4_K.gguf": own})
    snapshots = hf_cache / f"models--{REPO.replace('/', '--')}" / "snapshots"
    [snapshot] = snapshots.iterdir()
    shared_blob = (snapshot / "tiny-Q8_0.gguf").resolve()
    own_blob = (snapshot / "tiny-Q4_K.gguf").resolve()
    linked = tmp_path / "mine.gguf"
    linked.symlink_to(shared_blob)
    (tmp_path / "profiles.d").mkdir()
    for name, quant in (("q8", "Q8_0"), ("q4", "Q4_K")):
        document = {"created_by": CREATED_BY_ROUTER, "profiles": {name: {"hf": f"{REPO}:{quant}"}}}
        (tmp_path / "profiles.d" / f"{name}.yaml").write_text(yaml.safe_dump(document))
    router = await start_router({"mine": local(linked)}, watch_config=False)

    async with router.session.delete("/models", params={"model": "q8", "delete_files": "1"}) as response:
        assert response.status == 200, await response.text()
        answer = await response.json()
    assert answer["deleted_files"] == [], "the blob is the hand-written profile's file too"
    assert shared_blob.is_file() and linked.read_bytes() == shared

    async with router.session.delete("/models", params={"model": "q4", "delete_files": "1"}) as response:
        assert response.status == 200, await response.text()
        answer = await response.json()
    assert answer["deleted_files"] == [str(own_blob)]
    assert not own_blob.exists()
    assert shared_blob.is_file()
