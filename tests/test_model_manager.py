"""Open WebUI's llama.cpp connection manages models: `POST /models` downloads a Hugging Face GGUF (from
a fake Hub on loopback) into the cache and makes it a profile in `profiles.d/`, with its progress on
`/events` and `/models/sse`; `DELETE /models?model=…` removes only such profiles. The router is the
real `llama-router serve` process, so huggingface_hub reads the environment as it would in service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from llama_router.relay.loading_feedback import MARK
from tests.conftest import assert_openai_error, wait_until
from tests.fake_hub import FakeHub, Repo, hub_env
from tests.make_tiny_models import make_model
from tests.router_process import ROOT, RouterProcess

REPO = "acme/tiny-GGUF"
MODEL = f"{REPO}:Q8_0"
ADMIN = {"Authorization": "Bearer admin-key"}
USER = {"Authorization": "Bearer user-key"}
ARGS = ["-c", "512", "--parallel", "1", "--threads", "1"]
USER_YAML = """# My models. This comment must survive anything the router does.
server:
  api_keys: [user-key]
  admin_keys: [admin-key]
  host: 127.0.0.1
  state_dir: {state}
  loading_comment_interval: 0.2
  loading_feedback: reasoning
profiles:
  mine:               # hand-written
    model: {model}
    binary: {binary}
    args: {args}
"""


class EventStream:
    """An SSE stream read in the background: its `data:` events, in order."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read(session, url))

    async def _read(self, session: aiohttp.ClientSession, url: str) -> None:
        async with session.get(url, headers=USER, timeout=aiohttp.ClientTimeout(total=None)) as response:
            assert response.status == 200
            async for raw in response.content:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    self.events.append(json.loads(line[len("data: ") :]))
                    self._changed.set()

    async def wait_for(self, match: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                found = next((event for event in self.events if match(event)), None)
                if found is not None:
                    return found
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model of about 40 MB: huggingface_hub reports bytes every 10 MB, so its download, sent
    slowly, is seen part of the way."""
    return make_model(
        tmp_path_factory.mktemp("slow") / "slow.gguf", seed=4, n_embd=512, n_layer=2, vocab=2000
    )


@pytest.fixture
async def fake_hub(tiny_models: tuple[Path, Path], slow_model: Path) -> AsyncIterator[FakeHub]:
    files = {
        "tiny-Q8_0.gguf": tiny_models[0].read_bytes(),
        "tiny-Q4_K_M.gguf": tiny_models[1].read_bytes(),
        "README.md": b"# tiny",
    }
    hub = await FakeHub(
        {
            REPO: Repo(files),
            "acme/slow-GGUF": Repo({"slow-Q8_0.gguf": slow_model.read_bytes()}, delay=1.5),
            "acme/broken-GGUF": Repo(files, delay=1.0, broken=True),
        }
    ).start()
    yield hub
    await hub.close()


@pytest.fixture
async def router(
    tmp_path: Path,
    fake_hub: FakeHub,
    tiny_models: tuple[Path, Path],
    llama_server: Path,
    router_processes: list[RouterProcess],
) -> RouterProcess:
    config = tmp_path / "etc" / "profiles.yaml"
    config.parent.mkdir()
    config.write_text(
        USER_YAML.format(
            state=tmp_path / "state", model=tiny_models[0], binary=llama_server, args=json.dumps(ARGS)
        )
    )
    process = RouterProcess(config, env=hub_env(tmp_path, fake_hub.url, ROOT))
    router_processes.append(process)
    return await process.start()


async def models(session: aiohttp.ClientSession, url: str) -> dict[str, dict[str, Any]]:
    async with session.get(f"{url}/models", headers=USER) as response:
        assert response.status == 200
        return {entry["id"]: entry for entry in (await response.json())["data"]}


async def test_download_becomes_a_profile_that_serves_and_can_be_removed(
    router: RouterProcess, fake_hub: FakeHub, tmp_path: Path
) -> None:
    user_yaml = router.config.read_text()
    cache = tmp_path / "hf" / "hub"
    async with aiohttp.ClientSession() as session:
        events = EventStream(session, f"{router.url}/events")
        native = EventStream(session, f"{router.url}/models/sse")
        await events.wait_for(lambda e: e["event"] == "snapshot")
        body = {"model": MODEL, "args": ARGS}

        async with session.post(f"{router.url}/models", json=body) as response:
            assert response.status == 401, "no key"
        async with session.post(f"{router.url}/models", json=body, headers=USER) as response:
            assert response.status == 403, "an API key is not an admin key"
        async with session.post(f"{router.url}/models", json=body, headers=ADMIN) as response:
            assert response.status == 200, await response.text()
            assert await response.json() == {
                "success": True,
                "model": MODEL,
                "status": {"value": "downloading"},
            }

        finished = await events.wait_for(lambda e: e["event"] in ("download_finished", "download_failed"))
        assert finished["event"] == "download_finished", finished
        size = len(fake_hub.repos[REPO].files["tiny-Q8_0.gguf"])
        progress = [e for e in events.events if e["event"] == "download_progress"]
        assert progress and progress[-1] == {**progress[-1], "model": MODEL, "file": "tiny-Q8_0.gguf"}
        assert (progress[-1]["done"], progress[-1]["total"]) == (size, size)
        assert progress.index(progress[-1]) < events.events.index(finished)
        await native.wait_for(lambda e: e["event"] == "download_finished" and e["model"] == MODEL)
        [last] = [e for e in native.events if e["event"] == "download_progress"][-1:]
        assert last["data"]["progress"]["tiny-Q8_0.gguf"] == {"done": size, "total": size}

        profile_file = Path(finished["profile_file"])
        assert profile_file.parent == router.config.parent / "profiles.d"
        written = yaml.safe_load(profile_file.read_text())
        assert written["created_by"] == "llama-router"
        assert written["profiles"][MODEL]["hf"] == MODEL
        assert written["downloaded"] == {MODEL: finished["files"]}, "recorded when downloaded"
        assert router.config.read_text() == user_yaml, "the user's file and its comments are untouched"
        assert finished["files"][0].startswith(str(cache)), "downloaded into the Hugging Face cache"

        listed = await models(session, router.url)
        assert (listed[MODEL]["can_remove"], listed["mine"]["can_remove"]) == (True, False)
        assert (listed[MODEL]["source"], listed["mine"]["source"]) == ("api", "profile")
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        async with session.post(f"{router.url}/v1/chat/completions", json=chat, headers=USER) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["model"] == MODEL

        async with session.post(f"{router.url}/models", json=body, headers=ADMIN) as response:
            assert response.status == 400
            assert_openai_error(await response.json(), "model_exists", status=response.status)

        delete = f"{router.url}/models"
        async with session.delete(delete, params={"model": "mine"}, headers=ADMIN) as response:
            assert response.status == 403
            error = assert_openai_error(await response.json(), status=response.status)
            assert error["code"] == "model_not_removable" and str(router.config) in error["message"]
        async with session.delete(delete, params={"model": MODEL}, headers=USER) as response:
            assert response.status == 403, "removing needs the admin key too"
        # Open WebUI's "Delete Model" sends no delete_files: the files go by default.
        async with session.delete(delete, params={"model": MODEL}, headers=ADMIN) as response:
            assert response.status == 200, await response.text()
            answer = await response.json()
        assert answer["success"] is True and len(answer["deleted_files"]) == 1
        assert not Path(answer["deleted_files"][0]).exists()
        assert not profile_file.exists()
        assert MODEL not in await models(session, router.url)
        assert "mine" in await models(session, router.url)
        assert router.config.read_text() == user_yaml
        await events.wait_for(lambda e: e["event"] == "model_removed" and e["model"] == MODEL)
        await native.wait_for(lambda e: e["event"] == "model_remove" and e["model"] == MODEL)
        await events.close()
        await native.close()


async def download(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST /models, then its `download_finished` event."""
    events = EventStream(session, f"{url}/events")
    try:
        await events.wait_for(lambda e: e["event"] == "snapshot")
        async with session.post(f"{url}/models", json=body, headers=ADMIN) as response:
            assert response.status == 200, await response.text()
            name = (await response.json())["model"]
        return await events.wait_for(lambda e: e["event"] == "download_finished" and e["model"] == name)
    finally:
        await events.close()


async def test_deleting_a_model_frees_its_files_unless_another_profile_uses_them(
    router: RouterProcess, fake_hub: FakeHub
) -> None:
    """The same GGUF downloaded as two models (one file in the cache): removing one keeps it, removing
    the other deletes it; `delete_files=0` keeps a model's files."""
    async with aiohttp.ClientSession() as session:
        first = await download(session, router.url, {"model": MODEL, "args": ARGS})
        second = await download(session, router.url, {"model": MODEL, "name": "twin", "args": ARGS})
        assert first["files"] == second["files"]
        [gguf] = [Path(file) for file in first["files"]]
        blob = gguf.resolve()
        delete = f"{router.url}/models"
        async with session.delete(delete, params={"model": "twin"}, headers=ADMIN) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["deleted_files"] == [], "the other model reads that file"
        assert gguf.exists() and blob.exists()
        async with session.delete(delete, params={"model": MODEL}, headers=ADMIN) as response:
            assert (await response.json())["deleted_files"] == [str(blob)]
        assert not gguf.exists() and not blob.exists()

        kept = await download(session, router.url, {"model": MODEL, "name": "kept", "args": ARGS})
        params = {"model": "kept", "delete_files": "0"}
        async with session.delete(delete, params=params, headers=ADMIN) as response:
            assert (await response.json())["deleted_files"] == []
        assert all(Path(file).exists() for file in kept["files"])
        assert set(await models(session, router.url)) == {"mine"}


async def test_downloads_that_cannot_happen_are_refused_and_one_under_way_can_be_cancelled(
    router: RouterProcess,
) -> None:
    async with aiohttp.ClientSession() as session:
        for body, code in (
            ({"model": "acme/missing-GGUF"}, "model_not_downloadable"),
            ({"model": f"{REPO}:IQ1_S"}, "model_not_downloadable"),
            ({"model": "not a repo"}, "invalid_request"),
            ({"model": "mine"}, "invalid_request"),
        ):
            async with session.post(f"{router.url}/models", json=body, headers=ADMIN) as response:
                assert response.status == 400, body
                error = assert_openai_error(await response.json(), status=response.status)
                assert error["code"] == code, (body, error)
        assert list(await models(session, router.url)) == ["mine"]

        events = EventStream(session, f"{router.url}/events")
        await events.wait_for(lambda e: e["event"] == "snapshot")
        slow = "acme/slow-GGUF:Q8_0"
        async with session.post(f"{router.url}/models", json={"model": slow}, headers=ADMIN) as response:
            assert response.status == 200
        listed = await models(session, router.url)
        assert listed[slow]["status"]["value"] == "loading"
        async with session.delete(f"{router.url}/models", params={"model": slow}, headers=ADMIN) as response:
            assert response.status == 200, await response.text()
        failed = await events.wait_for(lambda e: e["event"] == "download_failed")
        assert failed["model"] == slow and "cancelled" in failed["reason"]
        assert list(await models(session, router.url)) == ["mine"]
        assert not (router.config.parent / "profiles.d").exists() or not any(
            (router.config.parent / "profiles.d").iterdir()
        )
        await events.close()


async def test_a_model_added_over_http_cannot_run_code_or_touch_files(
    router: RouterProcess, fake_hub: FakeHub
) -> None:
    """The requests that once ran a shell tool, overwrote a file and served `/etc/shadow` are refused
    before the Hub is even asked; so are names a person could not type or tell apart."""
    hostile: list[tuple[dict[str, Any], str, str]] = [
        ({"name": "pwn", "args": ["--tools", "exec_shell_command"]}, "not_allowed", "'--tools'"),
        ({"name": "logf", "args": ["--log-file", "/any/file"]}, "not_allowed", "'--log-file'"),
        ({"name": "rootp", "args": ["--path", "/"]}, "not_allowed", "'--path'"),
        ({"args": ["-c", "512", "--chat-template-file=/etc/passwd"]}, "not_allowed", "--chat-template-file"),
        ({"binary": "/bin/sh"}, "invalid_request", "'binary'"),
        ({"env": {"LLAMA_ARG_TOOLS": "all"}}, "invalid_request", "'env'"),
        ({"name": "org/pwn"}, "invalid_name", "org/pwn"),
        ({"name": "x" * 129}, "invalid_name", "x" * 20),
        ({"name": "evil\u202eledom"}, "invalid_name", "\\u202e"),
        ({"name": "bell\x07\r\nFAKE LOG LINE"}, "invalid_name", "\\x07\\r\\n"),
        ({"name": "-rf"}, "invalid_name", "-rf"),
        ({"name": "Mine"}, "model_exists", "differs only by case from 'mine'"),
        ({"name": "fine", "aliases": ["MINE"]}, "model_exists", "'mine'"),
        ({"name": "n" * 1_000_000}, "invalid_name", "characters"),
        ({"model": f"{MODEL}\u202e\r\nX"}, "invalid_name", "\\u202e\\r\\nX"),
    ]
    async with aiohttp.ClientSession() as session:
        for extra, code, named in hostile:
            body = {"model": MODEL, **extra}
            async with session.post(f"{router.url}/models", json=body, headers=ADMIN) as response:
                answer = await response.json()
                assert response.status == 400, (extra, answer)
            error = answer["error"]
            assert error["code"] == code and named in error["message"], (str(extra)[:80], error)
            assert len(error["message"]) < 600, "a long value is echoed cut"
        huge = json.dumps({"model": MODEL, "name": "big", "args": ["-c", "512"] * 3_000_000}).encode()
        assert len(huge) > 33 << 20
        async with session.post(f"{router.url}/models", data=huge, headers=ADMIN) as response:
            assert response.status == 413, "a body over max_body_mb is refused before it is read"
        assert fake_hub.requests == [], "nothing was asked of the Hub, let alone downloaded"
        assert list(await models(session, router.url)) == ["mine"]
        assert not (router.config.parent / "profiles.d").exists()

        async with session.get(
            f"{router.url}/etc/shadow", params={"model": "mine"}, headers=USER
        ) as response:
            assert response.status == 404, "no static file of an upstream is served through the router"
        load = {"model": "mine"}
        async with session.post(f"{router.url}/models/load", json=load, headers=USER) as response:
            assert response.status == 403, "an inference key never changes what runs"
            assert_openai_error(await response.json(), "admin_key_required", status=response.status)
    assert not any(line.startswith("FAKE LOG LINE") for line in router.raw), "no forged log line"


async def test_a_router_written_profile_made_before_the_allow_list_fails_to_load_with_the_reason(
    router: RouterProcess,
) -> None:
    async with aiohttp.ClientSession() as session:
        events = EventStream(session, f"{router.url}/events")
        await events.wait_for(lambda e: e["event"] == "snapshot")
        body = {
            "model": MODEL,
            "name": "tiny:q8_0-v1.0",
            "args": [*ARGS, "--no-context-shift", "--temp", "0.5"],
        }
        async with session.post(f"{router.url}/models", json=body, headers=ADMIN) as response:
            assert response.status == 200, await response.text()
        finished = await events.wait_for(lambda e: e["event"] in ("download_finished", "download_failed"))
        assert finished["event"] == "download_finished", finished

        # What an older router let through, as it wrote it (the model is in the cache by now).
        old = {"hf": MODEL, "args": [*ARGS, "--tools", "exec_shell_command"]}
        folder = router.config.parent / "profiles.d"
        seen = len(events.events)
        (folder / "old.yaml").write_text(
            yaml.safe_dump({"created_by": "llama-router", "profiles": {"old": old}})
        )
        await events.wait_for(lambda e: e["event"] == "reloaded" and e in events.events[seen:], timeout=30)
        listed = await models(session, router.url)
        assert listed["old"]["status"]["value"] == "unloaded" and listed["old"]["status"].get("failed")
        load = {"model": "old"}
        async with session.post(f"{router.url}/models/load?wait=1", json=load, headers=ADMIN) as response:
            answer = await response.json()
            assert response.status == 503, answer
        assert "'--tools'" in answer["error"]["message"] and "old.yaml" in answer["error"]["message"]
        chat = {"model": "old", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        async with session.post(f"{router.url}/v1/chat/completions", json=chat, headers=USER) as response:
            answer = await response.json()
            assert response.status == 503, answer
            assert_openai_error(answer, "model_load_failed", status=response.status)
        assert "'--tools'" in answer["error"]["message"]
        chat["model"] = "tiny:q8_0-v1.0"
        async with session.post(f"{router.url}/v1/chat/completions", json=chat, headers=USER) as response:
            assert response.status == 200, await response.text()
        await events.close()


async def stream_chat(
    session: aiohttp.ClientSession, url: str, model: str
) -> tuple[list[str], str, list[Any]]:
    """A streamed chat: its reasoning lines, its content and the errors it carried."""
    chat = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    reasoning, content, errors = [], [], []
    async with session.post(f"{url}/v1/chat/completions", json=chat, headers=USER) as response:
        assert response.status == 200, await response.text()
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                errors.append(chunk["error"])
                continue
            delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
            reasoning.append(delta.get("reasoning_content") or "")
            content.append(delta.get("content") or "")
    lines = [line for line in "".join(reasoning).splitlines() if line]
    assert all(line.startswith(MARK) for line in lines), lines
    return [line.removeprefix(MARK) for line in lines], "".join(content), errors


async def test_a_model_being_downloaded_is_listed_at_once_and_a_chat_for_it_waits_for_it(
    router: RouterProcess,
) -> None:
    slow = "acme/slow-GGUF:Q8_0"
    async with aiohttp.ClientSession() as session:
        body = {"model": slow, "args": ARGS}
        async with session.post(f"{router.url}/models", json=body, headers=ADMIN) as response:
            assert response.status == 200, await response.text()
        # What Open WebUI reads right after "Download": the model is there, loading.
        for path in ("/models", "/v1/models"):
            async with session.get(f"{router.url}{path}", headers=USER) as response:
                listed = {entry["id"]: entry for entry in (await response.json())["data"]}
            status = listed[slow]["status"]
            assert (status["value"], status["detail"]) == ("loading", "downloading"), path
            assert isinstance(status["progress"], dict), "its bytes so far, file by file"
        async with session.get(f"{router.url}/v1/models/{slow}", headers=USER) as response:
            assert (await response.json())["status"]["detail"] == "downloading"

        plain = {"model": slow, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        waiting = asyncio.ensure_future(
            session.post(f"{router.url}/v1/chat/completions", json=plain, headers=USER)
        )
        lines, content, errors = await stream_chat(session, router.url, slow)
        assert not errors and content, (errors, lines)
        assert lines[0] == f"Loading {slow}…"
        downloading = [
            int(p) for line in lines for p in re.findall(rf"^Downloading {re.escape(slow)}… (\d+) %", line)
        ]
        assert downloading and downloading == sorted(downloading), lines
        assert any(0 < p < 100 for p in downloading), lines
        assert lines[-1].startswith(f"{slow} is loaded after "), lines
        async with await waiting as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["model"] == slow


async def test_a_failed_download_is_a_clear_error_to_every_request_waiting_for_it(
    router: RouterProcess,
) -> None:
    broken = "acme/broken-GGUF:Q8_0"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{router.url}/models", json={"model": broken}, headers=ADMIN) as response:
            assert response.status == 200, await response.text()
        plain = {"model": broken, "messages": [{"role": "user", "content": "hi"}]}

        async def ask() -> tuple[int, Any]:
            async with session.post(
                f"{router.url}/v1/chat/completions", json=plain, headers=USER
            ) as response:
                return response.status, await response.json()

        (status, answer), (lines, content, errors) = await asyncio.gather(
            ask(), stream_chat(session, router.url, broken)
        )
        assert status == 502 and answer["error"]["code"] == "download_failed", answer
        assert f"the download of model {broken!r} failed" in answer["error"]["message"]
        assert errors == [answer["error"]] and not content
        assert lines[0] == f"Loading {broken}…"
        assert broken not in await models(session, router.url), "no longer listed"
        status, answer = await ask()
        assert status == 404 and answer["error"]["code"] == "model_not_found"


async def test_management_calls_are_kept_with_the_key_label_and_client_across_a_restart(
    router: RouterProcess, tmp_path: Path, router_processes: list[RouterProcess]
) -> None:
    """Who loaded, unloaded and downloaded what, from where, and how it ended: one activity row per
    call (a refused one too), with the key's label and never the key, still there after a restart."""

    async def audit(url: str) -> list[dict[str, Any]]:
        params = {"kind": "management"}
        async with session.get(f"{url}/activity", params=params, headers=USER) as response:
            assert response.status == 200
            return list(reversed((await response.json())["activity"]))  # oldest first

    async with aiohttp.ClientSession() as session:
        events = EventStream(session, f"{router.url}/events")
        await events.wait_for(lambda e: e["event"] == "snapshot")
        calls = [
            ("/models/load?wait=1", {"model": "mine"}, ADMIN, 200),
            ("/models/unload?wait=1", {"model": "mine"}, ADMIN, 200),
            ("/models/unload", {"model": "mine"}, USER, 403),
            ("/models", {"model": MODEL, "args": ARGS}, ADMIN, 200),
        ]
        for path, body, headers, status in calls:
            async with session.post(f"{router.url}{path}", json=body, headers=headers) as response:
                assert response.status == status, await response.text()
        await events.wait_for(lambda e: e["event"] == "download_finished")
        await events.close()
        await wait_until(lambda: _rows(audit, router.url, 5), what="five audit rows")
        rows = await audit(router.url)
        shown = [(r["action"], r["model"], r["status"], r["key"], r["client"]) for r in rows]
        assert shown == [
            ("load", "mine", 200, "admin-1", "127.0.0.1"),
            ("unload", "mine", 200, "admin-1", "127.0.0.1"),
            ("unload", "", 403, "api-1", "127.0.0.1"),
            ("download", MODEL, 200, "admin-1", "127.0.0.1"),
            ("reload", "", 200, None, None),
        ]
        assert rows[-1]["detail"] == f"POST /models {MODEL}: added: {MODEL}", "what the download added"
        assert all(r["duration_ms"] > 0 for r in rows)
        async with session.get(f"{router.url}/activity.csv", headers=USER) as response:
            exported = await response.text()
        for key in ("admin-key", "user-key"):
            assert key not in json.dumps(rows) and key not in exported, "labels, never keys"
        async with session.get(
            f"{router.url}/activity", params={"kind": "request"}, headers=USER
        ) as response:
            assert (await response.json())["activity"] == [], "no request for a model was made"
        async with session.get(f"{router.url}/activity", params={"kind": "x"}, headers=USER) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "invalid_filter"

        router.signal(signal.SIGTERM)
        assert await router.wait_exit() == 0
        again = RouterProcess(router.config, env=router.env)
        router_processes.append(again)
        await again.start()
        assert await audit(again.url) == rows, "the audit rows survive a restart"


async def _rows(read: Callable[[str], Any], url: str, wanted: int) -> bool:
    return len(await read(url)) >= wanted
