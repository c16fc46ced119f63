"""The dashboard in a real browser: headless Chromium (tests/cdp.py) against a running router with real
tiny llama-servers. Each test clicks and reads what a person would, and saves a screenshot of its panel
(to `$LLAMA_ROUTER_SCREENSHOTS` when set, else a pytest temporary folder, printed at the end).

Without Chromium (Debian's `chromium` package; `scripts/install/setup.sh` installs it as root) these tests
skip."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.cdp import Browser, Page, chromium, find_chromium
from tests.many_models import many_profiles

from .conftest import FAKE_UPSTREAM, RouterFactory, RunningRouter, fake_profile, wait_until
from .test_api import CHAT, chat_body, post_json
from .test_dashboard import demo_profiles

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium to drive: install Debian's `chromium` package "
    "(scripts/install/setup.sh does, as root) or set $CHROMIUM",
)


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wanted = os.environ.get("LLAMA_ROUTER_SCREENSHOTS")
    folder = Path(wanted) if wanted else tmp_path_factory.mktemp("dashboard-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium(CHROMIUM) as running:
        yield running


@pytest.fixture
def demo(tiny_models: tuple[Path, Path], llama_server: Path) -> dict[str, Any]:
    return demo_profiles(tiny_models, llama_server)


async def open_panel(browser: Browser, router: RunningRouter, panel: str, key: str | None = None) -> Page:
    """The dashboard on `panel` (a hash: `models?q=qwen`), once it follows the router's events and
    has read the models."""
    page = await browser.new_page()
    await page.goto(f"{router.url}/ui/#{panel}")
    if key is not None:
        await enter_key(page, key)
    await page.wait_for("document.querySelector('#live:not(.off)')", what="the live event stream")
    # The model lists are filled from the first overview, whichever panel is on screen.
    await page.wait_for("document.querySelectorAll('#chat-model option').length > 0", what="the models")
    return page


async def enter_key(page: Page, key: str) -> None:
    await page.wait_for("document.querySelector('#key-dialog[open]')", what="the key prompt")
    await page.evaluate(f"document.querySelector('#key-input').value = {json.dumps(key)}")
    await page.click("#key-form button[type=submit]")


async def status_on_screen(page: Page, model: str, status: str, timeout: float = 20.0) -> None:
    await page.wait_for(
        f'document.querySelector(\'.card.model[data-model="{model}"] .badge[data-status="{status}"]\')',
        timeout,
        what=f"{model} shown as {status}",
    )


async def each(page: Page, selector: str, what: str = "e.textContent") -> list[Any]:
    """`what` (a JavaScript expression of `e`) for each element `selector` finds, in page order."""
    return list(
        await page.evaluate(f"[...document.querySelectorAll({json.dumps(selector)})].map(e => {what})")
    )


async def choose(page: Page, select: str, value: str) -> None:
    """Pick `value` in a <select>, as a person would (its change handler runs)."""
    await page.evaluate(
        f"(() => {{ const s = document.querySelector({json.dumps(select)}); s.value = {json.dumps(value)};"
        " s.dispatchEvent(new Event('change')); })()"
    )


def no_cors_post(url: str, body: dict[str, Any]) -> str:
    """A page script POSTing `body` as any page may: no preflight, its answer unread."""
    return (
        f"fetch({json.dumps(url)}, {{method: 'POST', mode: 'no-cors', body: {json.dumps(json.dumps(body))}}})"
    )


async def shoot(page: Page, folder: Path, name: str, max_height: int = 4000) -> None:
    path = await page.screenshot(folder / f"{name}.png", max_height)
    assert path.stat().st_size > 10_000, "a screenshot of a drawn page"
    print(f"screenshot: {path}")
    assert page.errors == [], f"the page reported errors: {page.errors}"


# ---------------------------------------------------------------------------------------------- panels


async def test_devices_and_models_panels_show_both_demo_profiles(
    start_router: RouterFactory, demo: dict[str, Any], browser: Browser, screenshots: Path
) -> None:
    router = await start_router(demo, memory={"ram": 320})  # a budget the tiny models show up in
    for model in ("demo-a", "demo-b"):
        assert (await post_json(router, "/models/load?wait=1", {"model": model}))[0] == 200
    page = await open_panel(browser, router, "devices")
    await page.wait_for(
        "document.querySelectorAll('.device[data-device=ram] tr[data-model] .source-learned').length === 2",
        what="both models stacked in the RAM budget with their learned footprints",
    )
    segments = await each(page, ".device .segment")
    assert sorted(segment.split()[0] for segment in segments) == ["demo-a", "demo-b"]
    cached = await each(page, "#readahead tr", "e.children[1].textContent")
    assert cached == ["demo-a", "demo-b"], "both profiles' files in the page-cache list"
    await shoot(page, screenshots, "devices")

    await post_json(router, "/models/unload?wait=1", {"model": "demo-b"})
    await page.evaluate("location.hash = '#models'")
    await status_on_screen(page, "demo-a", "loaded")
    await status_on_screen(page, "demo-b", "unloaded")
    names = await each(page, ".card.model", "e.dataset.model")
    assert names == ["demo-a", "demo-b"]
    footprint = await page.evaluate(
        "document.querySelector('.card.model[data-model=demo-b] [class*=source-]').textContent"
    )
    assert footprint == "learned", "its footprint is what llama-server said it used"
    why = await each(page, ".card.model[data-model=demo-b] .why-device[data-device=ram] li")
    assert any("model buffer size" in line for line in why), "the log lines behind the figure"
    await shoot(page, screenshots, "models")


async def test_clicking_load_and_unload_changes_the_state_on_screen(
    start_router: RouterFactory,
    tiny_models: tuple[Path, Path],
    llama_server: Path,
    browser: Browser,
    screenshots: Path,
) -> None:
    router = await start_router(demo_profiles(tiny_models, llama_server, ttl=600))  # demo-a's ttl
    page = await open_panel(browser, router, "models")
    for model in ("demo-a", "demo-b"):
        await status_on_screen(page, model, "unloaded")
        await page.click(f'.card.model[data-model="{model}"] button.load')
        await status_on_screen(page, model, "loaded")
        assert router.controller.view(model).state.value == "ready"
    figures = await page.evaluate(
        "Object.fromEntries([...document.querySelectorAll('.card.model[data-model=demo-a] dt')]"
        ".map(dt => [dt.textContent, dt.nextElementSibling.textContent]))"
    )
    assert figures["load time"] != "–" and figures["loads · restarts"] == "1 · 0", figures
    assert figures["ttl"].startswith("unloads in "), figures
    await shoot(page, screenshots, "models-loaded")

    await page.click('.card.model[data-model="demo-b"] button.unload')
    await status_on_screen(page, "demo-b", "unloaded")
    assert router.controller.view("demo-b").state.value == "cold"
    await page.click("#unload-all")
    await status_on_screen(page, "demo-a", "unloaded")
    assert router.controller.view("demo-a").state.value == "cold"


async def test_a_playground_chat_streams_text_and_shows_the_model_loading(
    start_router: RouterFactory, demo: dict[str, Any], browser: Browser, screenshots: Path
) -> None:
    # Loading comments from the first 10 ms on, so the swap-in shows even for a tiny model.
    router = await start_router(demo, loading_comment_interval=0.01)
    page = await open_panel(browser, router, "playground")
    await choose(page, "#chat-model", "demo-b")
    await page.evaluate(
        """(() => {
            const state = document.querySelector('#chat-state');
            window.chatStates = [];
            new MutationObserver(() => {
                const text = state.textContent;
                if (text && window.chatStates.at(-1) !== text) window.chatStates.push(text);
            }).observe(state, {childList: true, characterData: true, subtree: true});
            document.querySelector('#chat-max').value = '24';
            document.querySelector('#chat-input').value = 'Tell me a story';
        })()"""
    )
    await page.click("#chat-send")
    await page.wait_for("document.querySelector('.msg.assistant.done')", 60, what="the answer to end")
    reply = await page.evaluate(
        """(() => {
            const reply = document.querySelector('.msg.assistant.done');
            return {error: reply.classList.contains('error'), text: reply.querySelector('.text').textContent,
                    chunks: Number(reply.dataset.chunks), stats: reply.querySelector('.stats').textContent};
        })()"""
    )
    assert not reply["error"], reply
    assert reply["text"], "the model's words are on the page"
    assert reply["chunks"] > 1, "the answer arrived as a stream of pieces"
    assert "generated" in reply["stats"]
    states = await page.evaluate("window.chatStates")
    assert any(state.startswith("loading demo-b") for state in states), states
    assert router.controller.view("demo-b").state.value == "ready"
    await shoot(page, screenshots, "playground")


async def test_an_activity_row_appears_with_token_counts(
    start_router: RouterFactory, demo: dict[str, Any], browser: Browser, screenshots: Path
) -> None:
    router = await start_router(demo)
    page = await open_panel(browser, router, "activity")
    await page.wait_for("!document.querySelector('#activity-empty').hidden", what="the empty activity log")
    status, answer = await router.chat("demo", max_tokens=6)
    assert status == 200
    usage = answer["usage"]
    row = await page.wait_for(
        """(() => {
            const row = document.querySelector('#activity-table tr[data-model=demo]');
            return row && {prompt: row.querySelector('.prompt').textContent,
                           generated: row.querySelector('.generated').textContent,
                           cells: [...row.children].map(c => c.textContent)};
        })()""",
        what="the request's row",
    )
    assert row["prompt"] == str(usage["prompt_tokens"])
    assert row["generated"] == str(usage["completion_tokens"])
    assert row["cells"][1] == "demo → demo-a" and row["cells"][3] == "200"
    await router.chat("nope")
    await page.wait_for("document.querySelector('#activity-table tr[data-model=nope]')", what="the 404's row")
    await choose(page, "#activity-status", "error")
    await page.wait_for("!document.querySelector('#activity-table tr[data-model=demo]')", what="the filter")
    assert await each(page, "#activity-table tbody tr", "e.dataset.model") == ["nope"]
    await choose(page, "#activity-status", "")
    await page.wait_for(
        "document.querySelector('#activity-table tr[data-model=demo]')", what="all rows again"
    )
    await shoot(page, screenshots, "activity")


async def test_the_queue_lists_a_waiting_request_and_cancel_ends_it(
    start_router: RouterFactory, demo: dict[str, Any], dummy_model: Path, browser: Browser, screenshots: Path
) -> None:
    slow = fake_profile(
        dummy_model, "--load-delay", "60", footprint={"ram": 16}, description="loads for a minute"
    )
    router = await start_router({**demo, "slow": slow})
    page = await open_panel(browser, router, "queue")
    client = asyncio.ensure_future(router.session.post(CHAT, json=chat_body("slow")))
    await page.wait_for(
        "document.querySelector('#queue-table tr[data-model=slow] .state').textContent === 'waiting'",
        what="the waiting request",
    )
    assert await page.evaluate("document.querySelector('#queue-count').textContent") == "1/1"
    await shoot(page, screenshots, "queue")
    await page.click("#queue-table tr[data-model=slow] button.cancel")
    with pytest.raises(aiohttp.ClientError):
        response = await asyncio.wait_for(client, 10)
        await response.read()
    await page.wait_for("!document.querySelector('#queue-table tr[data-model=slow]')", what="the row to go")
    await wait_until(lambda: router.controller.queue_depth == 0, what="the queue to empty")


async def test_timeline_logs_and_config_panels(
    start_router: RouterFactory,
    demo: dict[str, Any],
    browser: Browser,
    screenshots: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="llama_router")  # as `serve` logs by default
    router = await start_router(demo, max_resident=1)  # one model at a time: demo-b swaps demo-a out
    assert (await post_json(router, "/models/load?wait=1", {"model": "demo-a"}))[0] == 200
    assert (await router.chat("demo-b"))[0] == 200
    assert (await post_json(router, "/models/unload?wait=1", {"model": "demo-b"}))[0] == 200
    assert (await router.chat("demo-b"))[0] == 200
    page = await open_panel(browser, router, "timeline")
    await page.wait_for(
        "[...document.querySelectorAll('#timeline-strip .mark text')].map(t => t.textContent).join()"
        " === 'swap,unload'",
        what="the swap and the unload written on the strip",
    )
    phases = await each(page, "#timeline-strip rect.phase", "e.dataset.model + ':' + e.classList[1]")
    assert {"demo-a:loaded", "demo-b:loaded"} <= set(phases), phases
    causes = await each(page, "#timeline-table tbody tr", "e.children[3].textContent")
    assert [cause for cause in causes if cause] == ["unload", "swap"], "newest first"
    await shoot(page, screenshots, "timeline")

    await page.evaluate("location.hash = '#logs'")
    await page.wait_for(
        "document.querySelector('#log').textContent.includes('demo-b ready in')", what="router log"
    )
    await choose(page, "#log-source", "demo-b")
    released = "(document.querySelector('#log').textContent.match(/slot +release/g) || []).length"
    before = await page.wait_for(released, what="demo-b's log with its requests so far")
    await router.chat("demo-b")
    await page.wait_for(
        f"{released} === {before + 1}",
        what="the new request's lines, followed live",
    )
    await shoot(page, screenshots, "logs")

    await page.evaluate("location.hash = '#config'")
    await page.wait_for(
        "document.querySelectorAll('#config-profiles .card').length === 2", what="the profiles"
    )
    text = await page.evaluate("document.querySelector('#panel-config').textContent")
    assert str(router.config.path) in text and "--ctx-size 2048" in text
    await shoot(page, screenshots, "config")


# ---------------------------------------------------------------------------------------------- many models

QWEN_LOADED = "qwen3-14b-q4_k_m-8k"
LLAMA_LOADED = "llama-3.1-8b-instruct-q8_0-4k"
ROWS = "#models-table tbody tr"


@pytest.fixture
def three_hundred(tmp_path: Path) -> dict[str, Any]:
    """300 profiles on two model files, as a model folder makes them (they run the fake upstream)."""
    files = []
    for name in ("weights-a.gguf", "weights-b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF" + bytes(4096))
        files.append(tmp_path / name)
    return many_profiles(files, 300, {"binary": sys.executable, "args": [str(FAKE_UPSTREAM)]})


async def start_many(start_router: RouterFactory, profiles: dict[str, Any]) -> RunningRouter:
    router = await start_router(profiles, memory={"ram": 100_000})
    for model in (QWEN_LOADED, LLAMA_LOADED):
        assert (await post_json(router, "/models/load?wait=1", {"model": model}))[0] == 200
    return router


async def table_rows(page: Page) -> list[str]:
    return await each(page, ROWS, "e.dataset.model")


async def test_three_hundred_models_in_a_table_filtered_and_sorted_as_the_url_says(
    start_router: RouterFactory, three_hundred: dict[str, Any], browser: Browser, screenshots: Path
) -> None:
    router = await start_many(start_router, three_hundred)
    page = await open_panel(browser, router, "models")
    await page.wait_for(f"document.querySelectorAll({json.dumps(ROWS)}).length === 300", what="300 rows")
    assert await page.evaluate("document.querySelectorAll('.card.model').length") == 0, "the table, not cards"
    cells = await each(page, f'{ROWS}[data-model="{QWEN_LOADED}"] td', "e.textContent")
    assert cells[0] == QWEN_LOADED and cells[1] == "loaded", cells
    assert cells[7] in ("configured", "learned", "estimated"), cells
    await page.click('#models-table th[data-sort="state"]')  # the loaded ones first
    assert (await table_rows(page))[:2] == sorted([LLAMA_LOADED, QWEN_LOADED])
    await shoot(page, screenshots, "models-table", max_height=1100)

    # Typing in the filter box: the rows follow, and the URL holds the filter.
    await page.evaluate(
        "(() => { const q = document.querySelector('#models-q'); q.value = 'qwen3 loaded';"
        " q.dispatchEvent(new Event('input')); })()"
    )
    assert await table_rows(page) == [QWEN_LOADED]
    assert await page.evaluate("location.hash") == "#models?sort=state&q=qwen3+loaded"

    # A link with a filter and a sort opens on the same view.
    link = f"{router.url}/ui/#models?q=qwen&state=unloaded&sort=name&dir=desc"
    other = await browser.new_page()
    await other.goto(link)
    await other.wait_for(
        f"document.querySelectorAll({json.dumps(ROWS)}).length > 0", what="the filtered rows"
    )
    shown = await table_rows(other)
    qwen = {name for name in three_hundred if "qwen" in name} - {QWEN_LOADED}
    assert shown == sorted(qwen, reverse=True), "every unloaded qwen, Z to A"
    assert await other.evaluate(
        "[document.querySelector('#models-q').value, document.querySelector('#models-state').value]"
    ) == ["qwen", "unloaded"]
    assert (
        await other.evaluate("document.querySelector('#models-count').textContent")
        == f"{len(qwen)} of 300 models"
    )
    await shoot(other, screenshots, "models-filtered", max_height=1100)

    # Sorting by a column: a click sorts A to Z, a second Z to A; both are written in the URL.
    await other.click('#models-table th[data-sort="name"]')
    assert await table_rows(other) == sorted(shown)
    assert "sort=name" in await other.evaluate("location.hash")
    await other.click("#view-cards")
    assert await each(other, ".card.model", "e.dataset.model") == sorted(shown)
    assert "view=cards" in await other.evaluate("location.hash")
    assert other.errors == []

    # The page cache lists each file once, with the profiles that use it.
    await page.evaluate("location.hash = '#devices'")
    await page.wait_for("document.querySelectorAll('#readahead tr').length === 2", what="two files")
    files = await each(page, "#readahead tr", "[e.dataset.path, Number(e.dataset.profiles)]")
    assert sorted(count for _, count in files) == [100, 200], files
    assert {Path(path).name for path, _ in files} == {"weights-a.gguf", "weights-b.gguf"}
    await shoot(page, screenshots, "devices-300-profiles", max_height=900)
    assert page.errors == []


async def test_an_update_redraws_what_changed_not_every_panel(
    start_router: RouterFactory, three_hundred: dict[str, Any], browser: Browser
) -> None:
    router = await start_many(start_router, three_hundred)
    page = await open_panel(browser, router, "models")
    await page.wait_for(f"document.querySelectorAll({json.dumps(ROWS)}).length === 300", what="300 rows")
    assert await page.evaluate("document.querySelector('#devices').children.length") == 0, (
        "a panel not on screen is not drawn"
    )
    # Each row is marked, and every row added from now on is noted.
    await page.evaluate(
        f"""(() => {{
            document.querySelectorAll({json.dumps(ROWS)}).forEach(row => {{ row.kept = true; }});
            window.added = [];
            new MutationObserver(changes => changes.forEach(c => c.addedNodes.forEach(
                n => window.added.push(n.dataset.model)))).observe(
                document.querySelector('#models-table tbody'), {{childList: true}});
        }})()"""
    )
    target = "gemma-2-9b-it-q4_k_m-4k"
    assert (await post_json(router, "/models/load?wait=1", {"model": target}))[0] == 200
    await page.wait_for(
        f"document.querySelector('{ROWS}[data-model=\"{target}\"] [data-status=loaded]')",
        what=f"{target} shown as loaded",
    )
    added = await page.evaluate("window.added")
    assert added and set(added) == {target}, f"only {target}'s row was rebuilt: {added}"
    kept = await page.evaluate(
        f"[...document.querySelectorAll({json.dumps(ROWS)})].filter(r => r.kept).length"
    )
    assert kept == 299, "every other row is the same element as before"

    # Finished requests are added to the activity table; the rows already there stay.
    await page.evaluate("location.hash = '#activity?kind=request'")  # not the load calls
    assert (await router.chat(target))[0] == 200
    await page.wait_for("document.querySelectorAll('#activity-table tbody tr').length === 1", what="a row")
    await page.evaluate("document.querySelector('#activity-table tbody tr').kept = true")
    assert (await router.chat(target))[0] == 200
    await page.wait_for(
        "document.querySelectorAll('#activity-table tbody tr').length === 2", what="a 2nd row"
    )
    assert await each(page, "#activity-table tbody tr", "Boolean(e.kept)") == [False, True]
    assert page.errors == []


async def test_activity_timeline_and_logs_filter_by_model_and_show_who_managed_what(
    start_router: RouterFactory, demo: dict[str, Any], browser: Browser, screenshots: Path
) -> None:
    router = await start_router(demo, api_keys=["user-key"], admin_keys=["root-key", "ops-key"])
    ops = {"Authorization": "Bearer ops-key"}
    assert (await post_json(router, "/models/load?wait=1", {"model": "demo-a"}, headers=ops))[0] == 200
    for model in ("demo-a", "demo-b"):
        async with router.session.post(CHAT, json=chat_body(model), headers=ops) as response:
            assert response.status == 200
    assert (await post_json(router, "/models/unload?wait=1", {"model": "demo-a"}, headers=ops))[0] == 200

    page = await open_panel(browser, router, "timeline?model=demo-a", key="user-key")
    await page.wait_for(
        "document.querySelectorAll('#timeline-table tr.manage').length === 2", 60, what="the two calls"
    )
    assert set(await each(page, "#timeline-table tbody tr", "e.dataset.model")) == {"demo-a"}
    calls = await each(page, "#timeline-table tr.manage", "[e.dataset.action, e.children[4].textContent]")
    assert [action for action, _ in calls] == ["unload", "load"], "newest first"
    # A `requests` event may carry rows the page's own read returned just before: shown once only.
    held = await page.evaluate("state.activity.length")
    await page.evaluate("addActivity(state.audit.concat(state.activity), 0)")
    assert len(await each(page, "#timeline-table tr.manage", "e.dataset.action")) == 2
    assert await page.evaluate("state.activity.length") == held
    assert all("admin-2" in text and "127.0.0.1" in text for _, text in calls), calls
    assert all("ops-key" not in text for _, text in calls)
    assert await each(page, "#timeline-strip g.audit", "e.dataset.action") == ["load", "unload"]
    assert await each(page, "#timeline-strip .lane-label") == ["demo-a"], "one lane: the filter's model"
    await choose(page, "#timeline-kind", "management")
    await page.wait_for("location.hash === '#timeline?model=demo-a&kind=management'", what="the URL")
    assert set(await each(page, "#timeline-table tbody tr", "e.className")) == {"manage"}
    await shoot(page, screenshots, "timeline-audit")

    await page.evaluate("location.hash = '#activity?model=demo-b'")
    await page.wait_for(
        "document.querySelector('#activity-table tbody tr') && [...document.querySelectorAll("
        "'#activity-table tbody tr')].every(r => r.dataset.model === 'demo-b')",
        60,
        what="demo-b's rows only",
    )
    assert await page.evaluate("document.querySelector('#activity-model').value") == "demo-b"
    await page.evaluate("location.hash = '#activity?kind=management'")
    await page.wait_for(
        "document.querySelectorAll('#activity-table tbody tr[data-action]').length === 2 &&"
        " document.querySelectorAll('#activity-table tbody tr').length === 2",
        60,
        what="the management calls only",
    )
    keys = await each(
        page, "#activity-table tbody tr", "e.lastElementChild.previousElementSibling.textContent"
    )
    assert keys == ["admin-2", "admin-2"]

    await page.evaluate("location.hash = '#logs?model=demo-b'")
    await page.wait_for(
        "document.querySelector('#log').textContent.includes('slot')", 60, what="demo-b's log"
    )
    assert await page.evaluate("document.querySelector('#log-source').value") == "demo-b"
    await choose(page, "#log-source", "")
    await page.wait_for("location.hash === '#logs'", what="the router's log in the URL")
    assert page.errors == []


# ---------------------------------------------------------------------------------------------- security


async def test_a_cross_origin_post_is_refused(
    start_router: RouterFactory, demo: dict[str, Any], browser: Browser, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llama_router.access")
    router = await start_router(demo)

    async def evil_page(_: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>another site</title>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/", evil_page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        page = await browser.new_page()
        await page.goto(f"http://localhost:{port}/")
        attacks = {
            "/models/load": {"model": "demo-b"},
            CHAT: chat_body("demo-b", max_tokens=4),
        }
        for path, body in attacks.items():
            kind = await page.evaluate(no_cors_post(router.url + path, body) + ".then(r => r.type)")
            assert kind == "opaque", "the request went out"
        router.recorded()
        access = [record.fields for record in caplog.records if record.name == "llama_router.access"]  # type: ignore[attr-defined]
        refused = [fields for fields in access if fields["path"] in attacks]
        assert [(entry["path"], entry["status"]) for entry in refused] == [("/models/load", 403), (CHAT, 403)]
        assert router.controller.view("demo-b").state.value == "cold", "nothing was loaded"
        assert page.errors == []
    finally:
        await runner.cleanup()

    # The same request from the dashboard's own page is served: the origin made the difference.
    own = await open_panel(browser, router, "models")
    await own.evaluate(no_cors_post("/models/load?wait=1", attacks["/models/load"]))
    assert router.controller.view("demo-b").state.value == "ready"


async def test_with_keys_the_page_asks_for_one_and_load_needs_the_admin_key(
    start_router: RouterFactory, demo: dict[str, Any], browser: Browser
) -> None:
    router = await start_router(demo, api_keys=["user-key"], admin_keys=["admin-key"])
    page = await open_panel(browser, router, "models", key="user-key")
    assert await page.evaluate("sessionStorage.getItem('llama-router-key')") == "user-key"
    await page.click('.card.model[data-model="demo-b"] button.load')
    toast = await page.wait_for("document.querySelector('.toast.bad')?.textContent", what="the refusal")
    assert "admin key" in toast
    assert router.controller.view("demo-b").state.value == "cold"

    await page.click("#forget-key")
    await enter_key(page, "admin-key")
    await page.wait_for("document.querySelector('#live:not(.off)')", what="the stream with the admin key")
    await page.click('.card.model[data-model="demo-b"] button.load')
    await status_on_screen(page, "demo-b", "loaded")
    assert page.errors == []


async def test_a_load_shows_its_progress_on_the_model_and_in_its_device_share(
    start_router: RouterFactory, dummy_model: Path, browser: Browser, screenshots: Path
) -> None:
    flags = ("--child-protocol", "llama", "--load-delay", "3.2")  # reports 0, 25, 50, 75 %, 0.8 s apart
    profile = fake_profile(dummy_model, *flags, footprint={"ram": 100})
    router = await start_router({"slow": profile}, memory={"ram": 320})
    page = await open_panel(browser, router, "models")
    await post_json(router, "/models/load", {"model": "slow"})
    card = '.card.model[data-model="slow"] .loadbar .pct'
    await page.wait_for(f"document.querySelector('{card}')", what="a bar on the loading model's card")
    first = await page.evaluate(f"document.querySelector('{card}').textContent")
    assert first in ("0 %", "25 %", "50 %"), first

    await page.evaluate("location.hash = '#devices'")
    share = '.device[data-device=ram] .segment .loadbar[data-progress="slow"]'
    fill = f"(e => e && e.style.getPropertyValue('--p'))(document.querySelector('{share}'))"
    await page.wait_for(fill, what="the loading model's share of RAM")
    before = await page.evaluate(fill)
    await page.wait_for(f"{fill} !== {json.dumps(before)}", what="the share to fill further as it loads")
    after = await page.evaluate(fill)
    assert before in ("0%", "25%", "50%") and after in ("25%", "50%", "75%", None), (before, after)
    await shoot(page, screenshots, "devices-loading")

    await page.evaluate("location.hash = '#models'")
    await status_on_screen(page, "slow", "loaded")
    assert await each(page, "#panel-models .loadbar") == [], "no bar on the model once loaded"
    await page.evaluate("location.hash = '#devices'")  # a panel is drawn when it is shown
    await page.wait_for(
        "document.querySelector('.device[data-device=ram] .segment') && "
        "!document.querySelector('#panel-devices .loadbar')",
        what="the model's share of RAM, without a bar, once loaded",
    )
