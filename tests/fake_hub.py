"""A Hugging Face Hub stand-in for tests: a cache laid out as huggingface_hub lays it out, and a
loopback HTTP server speaking the few Hub API calls `llama-router pull` makes (tree listing, file
HEAD/GET with the `X-Repo-Commit`/`ETag` headers huggingface_hub checks, its error codes)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web


def commit_of(files: dict[str, bytes]) -> str:
    """A deterministic 40-hex 'commit' for a set of files."""
    digest = hashlib.sha1()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name])
    return digest.hexdigest()


def make_cache(
    cache: Path, repo: str, files: dict[str, bytes], *, revision: str = "main", commit: str | None = None
) -> str:
    """Put `files` of `repo` into a Hugging Face cache at `cache` (blobs, snapshot links, ref)."""
    commit = commit or commit_of(files)
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    snapshot = folder / "snapshots" / commit
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    if not revision.startswith(commit):
        (folder / "refs" / revision).write_text(commit)
    return commit


def gguf_bytes(label: str) -> bytes:
    """Small distinct file contents (the router never parses these)."""
    return b"GGUF" + label.encode() * 8


@dataclass
class Repo:
    files: dict[str, bytes]
    token: str | None = None  # when set, requests must carry `Authorization: Bearer <token>`
    commit: str = ""
    delay: float = 0.0  # seconds a file download takes (sent in pieces): a slow link
    broken: bool = False  # its files are listed, but each download ends, after `delay`, in a 404

    def __post_init__(self) -> None:
        self.commit = self.commit or commit_of(self.files)


@dataclass
class FakeHub:
    """The Hub API on 127.0.0.1; `requests` records (method, path) of every call."""

    repos: dict[str, Repo]
    requests: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> FakeHub:
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}/tree/{revision}", self.tree)
        app.router.add_get("/{org}/{name}/resolve/{revision}/{path:.+}", self.resolve)  # and HEAD
        app.router.add_route("*", "/{tail:.*}", self.unknown)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _repo(self, request: web.Request) -> tuple[str, Repo]:
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        repo = self.repos.get(repo_id)
        authorised = repo is not None and (
            repo.token is None or request.headers.get("Authorization") == f"Bearer {repo.token}"
        )
        if repo is None or not authorised:
            raise web.HTTPUnauthorized(
                headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
            )
        if request.match_info["revision"] not in ("main", repo.commit):
            raise web.HTTPNotFound(headers={"X-Error-Code": "RevisionNotFound"})
        return repo_id, repo

    async def tree(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path))
        _, repo = self._repo(request)
        entries = [
            {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for path, data in sorted(repo.files.items())
        ]
        return web.json_response(entries)

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        _, repo = self._repo(request)
        path = request.match_info["path"]
        if path not in repo.files:
            raise web.HTTPNotFound(
                headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit},
                text="Entry not found",
            )
        data = repo.files[path]
        headers = {
            "X-Repo-Commit": repo.commit,
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Content-Length": str(len(data)),
        }
        if request.method == "HEAD":
            return web.Response(headers=headers)
        if repo.broken:
            await asyncio.sleep(repo.delay)
            raise web.HTTPNotFound(
                headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit}, text="gone"
            )
        if not repo.delay:
            return web.Response(
                body=data, headers={k: v for k, v in headers.items() if k != "Content-Length"}
            )
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        pieces = 10
        step = -(-len(data) // pieces)
        for start in range(0, len(data), step):
            await asyncio.sleep(repo.delay / pieces)
            await response.write(data[start : start + step])
        await response.write_eof()
        return response

    async def unknown(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path))
        return web.Response(status=404, text=f"fake hub: no route for {request.method} {request.path}")


def _without_length(headers: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in headers.items() if key != "Content-Length"}


def hub_env(home: Path, hub_url: str, root: Path, **extra: str) -> dict[str, str]:
    """The environment of a router or `llama-router pull` process that only talks to the fake Hub,
    with its Hugging Face cache under `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_HOME=str(home / "hf"),
        HF_HUB_CACHE=str(home / "hf" / "hub"),
        HF_ENDPOINT=hub_url,
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=str(root),
        **extra,
    )
    return env
