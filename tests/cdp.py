"""A headless Chromium driven over the DevTools protocol, for the dashboard's browser tests and the
benchmark's "page open" runs: no Selenium, no Playwright, no driver download.

Chromium is started with `--remote-debugging-port=0` and says on stderr which port it chose; pages are
opened over its HTTP endpoint and driven through their websocket (aiohttp's client) with the
protocol's own commands: `Page.navigate`, `Runtime.evaluate`, `Page.captureScreenshot`. Waiting for
something on a page is a promise inside the page that a MutationObserver resolves, not a poll.

Debian and Ubuntu's `chromium` package provides the binary (`scripts/install/setup.sh` installs it as root);
`$CHROMIUM` names another.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


def find_chromium() -> str | None:
    """The Chromium to run: `$CHROMIUM`, else the first of CANDIDATES on `$PATH`."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return shutil.which(explicit) or (explicit if os.access(explicit, os.X_OK) else None)
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class PageError(AssertionError):
    """A script on the page threw, or a wait ran out of time."""


class Page:
    """One tab: commands go out on its websocket, answers and events come back on it."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, target_id: str) -> None:
        self.ws = ws
        self.target_id = target_id
        self.errors: list[str] = []  # uncaught exceptions and console.error lines, as they happen
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._waiters: list[tuple[str, asyncio.Future[dict[str, Any]]]] = []
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
                continue
            method, params = data.get("method", ""), data.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                self.errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                words = (str(arg.get("value", arg.get("description"))) for arg in params["args"])
                self.errors.append(" ".join(words))
            for name, future in list(self._waiters):
                if name == method and not future.done():
                    future.set_result(params)
                    self._waiters.remove((name, future))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the page's DevTools connection closed"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """A DevTools command; its `result`, or PageError with the protocol's error."""
        command_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = future
        await self.ws.send_str(json.dumps({"id": command_id, "method": method, "params": params}))
        answer = await future
        if "error" in answer:
            raise PageError(f"{method}: {answer['error'].get('message')}")
        return dict(answer.get("result", {}))

    def next_event(self, method: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next `method` event (take it before doing what causes the event)."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((method, future))
        return future

    async def goto(self, url: str, timeout: float = 20.0) -> None:
        """Navigate and wait for the load event."""
        loaded = self.next_event("Page.loadEventFired")
        await self.send("Page.navigate", url=url)
        await asyncio.wait_for(loaded, timeout)

    async def evaluate(self, expression: str, timeout: float = 20.0) -> Any:
        """The value of a JavaScript expression (a promise is awaited); PageError if it throws."""
        result = await asyncio.wait_for(
            self.send(
                "Runtime.evaluate",
                expression=expression,
                awaitPromise=True,
                returnByValue=True,
                userGesture=True,
            ),
            timeout,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise PageError(details.get("exception", {}).get("description") or details.get("text"))
        return result.get("result", {}).get("value")

    async def wait_for(self, condition: str, timeout: float = 20.0, what: str | None = None) -> Any:
        """Wait until the JavaScript expression `condition` is truthy on the page, checking again
        on every change of the document; its value."""
        script = f"""new Promise((resolve, reject) => {{
            const check = () => {{ try {{ return ({condition}); }} catch (e) {{ return null; }} }};
            const first = check();
            if (first) {{ resolve(first); return; }}
            const observer = new MutationObserver(() => {{
                const value = check();
                if (value) {{ observer.disconnect(); clearTimeout(timer); resolve(value); }}
            }});
            observer.observe(document,
                             {{subtree: true, childList: true, attributes: true, characterData: true}});
            const timer = setTimeout(() => {{ observer.disconnect(); reject(new Error("timed out")); }},
                                     {int(timeout * 1000)});
        }})"""
        try:
            return await self.evaluate(script, timeout + 5)
        except (PageError, TimeoutError) as exc:
            raise PageError(f"timed out after {timeout}s waiting for {what or condition}") from exc

    async def click(self, selector: str) -> None:
        """Click the element `selector` finds (it must exist and be enabled)."""
        found = await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e || e.disabled) return false; e.click(); return true; })()"
        )
        if not found:
            raise PageError(f"nothing enabled to click at {selector}")

    async def screenshot(self, path: Path, max_height: int = 4000) -> Path:
        """A PNG of the whole page (beyond the window's height, up to `max_height`) at `path`."""
        metrics = await self.send("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        height = min(size["height"], max_height)
        clip = {"x": 0, "y": 0, "width": size["width"], "height": height, "scale": 1}
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


class Browser:
    """A headless Chromium process with its own throw-away profile."""

    def __init__(self, process: asyncio.subprocess.Process, endpoint: str, profile: str) -> None:
        self.process = process
        self.endpoint = endpoint  # http://127.0.0.1:<port>
        self.profile = profile
        self.session = aiohttp.ClientSession()
        self.pages: list[Page] = []
        self._drain: asyncio.Future[None] | None = None

    @classmethod
    async def launch(
        cls, binary: str, *, width: int = 1440, height: int = 900, timeout: float = 30.0
    ) -> Browser:
        profile = tempfile.mkdtemp(prefix="llama-router-chromium-")
        process = await asyncio.create_subprocess_exec(
            binary,
            "--headless=new",
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "--no-sandbox",  # as root (containers, CI) Chromium refuses to start with its sandbox
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--hide-scrollbars",
            "--mute-audio",
            "about:blank",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        lines: list[str] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    raw = await process.stderr.readline()
                    if not raw:
                        raise RuntimeError("chromium exited at start:\n" + "".join(lines[-20:]))
                    line = raw.decode(errors="replace")
                    lines.append(line)
                    found = _LISTENING.search(line)
                    if found:
                        break
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            shutil.rmtree(profile, ignore_errors=True)
            raise
        endpoint = "http://" + found.group(1).split("/")[2]
        browser = cls(process, endpoint, profile)
        # Keep reading its stderr so that a chatty Chromium never blocks on a full pipe.
        browser._drain = asyncio.ensure_future(_drain(process.stderr))
        return browser

    async def new_page(self) -> Page:
        async with self.session.put(f"{self.endpoint}/json/new?about:blank") as response:
            target = await response.json()
        ws = await self.session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        page = Page(ws, target["id"])
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        self.pages.append(page)
        return page

    async def close(self) -> None:
        for page in self.pages:
            await page.close()
        await self.session.close()
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._drain is not None:
            await self._drain
        shutil.rmtree(self.profile, ignore_errors=True)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


@contextlib.asynccontextmanager
async def chromium(binary: str | None = None, **options: Any) -> AsyncIterator[Browser]:
    """A running headless Chromium, closed (and its profile removed) at the end."""
    found = binary or find_chromium()
    if found is None:
        raise RuntimeError("no Chromium found: install Debian's `chromium` package or set $CHROMIUM")
    browser = await Browser.launch(found, **options)
    try:
        yield browser
    finally:
        await browser.close()


PAGE_MODES = ("none", "events", "browser")


@contextlib.asynccontextmanager
async def page_open(url: str, mode: str) -> AsyncIterator[dict[str, Any]]:
    """For the length of the block, follow the router at `url` as the dashboard does: `events`, an
    SSE client on `/events?requests=1`; `browser`, the page itself in a headless Chromium; `none`,
    nothing. Yields what it saw (events read), filled in as it goes."""
    seen: dict[str, Any] = {"mode": mode, "events": 0}
    if mode == "none":
        yield seen
        return
    ready = asyncio.Event()
    if mode == "events":
        task = asyncio.ensure_future(_follow_events(url, ready, seen))
    elif mode == "browser":
        task = asyncio.ensure_future(_follow_in_browser(url, ready, seen))
    else:
        raise ValueError(f"page mode {mode!r}: use one of {', '.join(PAGE_MODES)}")
    waiting = asyncio.ensure_future(ready.wait())
    await asyncio.wait({task, waiting}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if not ready.is_set():
        waiting.cancel()
        task.cancel()
        why = task.exception() if task.done() and not task.cancelled() else "nothing within 60 s"
        raise RuntimeError(f"the {mode} follower did not start: {why}")
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _follow_events(url: str, ready: asyncio.Event, seen: dict[str, Any]) -> None:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url.rstrip("/") + "/events", params={"requests": "1"}) as response,
    ):
        async for line in response.content:
            if line.startswith(b"data: "):
                seen["events"] += 1
                json.loads(line[6:])
                ready.set()


async def _follow_in_browser(url: str, ready: asyncio.Event, seen: dict[str, Any]) -> None:
    async with chromium() as browser:
        page = await browser.new_page()
        await page.goto(url.rstrip("/") + "/ui/#activity")
        await page.wait_for("document.querySelector('#live:not(.off)')", what="the live event stream")
        ready.set()
        try:
            await asyncio.Event().wait()
        finally:
            seen["activity_rows_on_page"] = await page.evaluate(
                "document.querySelectorAll('#activity-table tbody tr').length"
            )
            seen["page_errors"] = page.errors
