"""A real headless Chromium for tests, driven over its DevTools protocol (a WebSocket) with
Autobahn, which the project already depends on: no Playwright, no driver binary.

`Browser.start` runs `chromium --headless=new --remote-debugging-port=0`, reads
the `DevTools listening on ws://...` line it prints, connects, and opens one
page target in flattened-session mode, so that every command of the page goes
over the one socket.  `Page.evaluate` runs an expression in the page and
awaits its promise, which is how a test waits for something to happen in the
page (a MutationObserver inside the promise) without polling it.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.trial.unittest import SkipTest

from tests.support.processes import Process
from tests.support.ws_client import client_factory

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL = ("no headless browser found (looked for chromium, chromium-browser, google-chrome): install Debian's "
           "chromium (`sudo apt-get install -y chromium`) to run the inspector's browser test")


def find_chromium() -> str:
    """The browser's path; `SkipTest` saying how to install one when there is none."""
    explicit = os.environ.get("MCPR_CHROMIUM")
    if explicit:
        return explicit
    for name in CANDIDATES:
        path = shutil.which(name)
        if path is not None:
            return path
    raise SkipTest(INSTALL)


class CDPError(Exception):
    """A DevTools command answered with an error, or a script in the page threw."""


class _Protocol(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.client._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.client._message(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.client._closed(reason or f"closed ({code})")


class DevTools:
    """One DevTools WebSocket: commands with their answers, events to whoever waits for them."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._answers: dict[int, Deferred[dict]] = {}
        self._waiters: list[tuple[str, str | None, Deferred[dict]]] = []
        self._open: Deferred[None] = Deferred()
        self._gone: Deferred[None] = Deferred()
        self._protocol: _Protocol | None = None

    async def connect(self, url: str) -> None:
        parts = urlsplit(url)
        factory = client_factory(url)
        factory.protocol = _Protocol
        factory.client = self
        factory.setProtocolOptions(maxMessagePayloadSize=64 << 20, maxFramePayloadSize=64 << 20)
        await HostnameEndpoint(reactor, parts.hostname, parts.port).connect(factory)
        await self._open

    def _opened(self, protocol: _Protocol) -> None:
        self._protocol = protocol
        self._open.callback(None)

    def _message(self, message: dict) -> None:
        if "id" in message:
            answer = self._answers.pop(message["id"])
            if "error" in message:
                answer.errback(CDPError(f"{message['error'].get('message')}: {message['error'].get('data', '')}"))
            else:
                answer.callback(message.get("result", {}))
            return
        for waiter in list(self._waiters):
            method, session, d = waiter
            if message.get("method") == method and (session is None or message.get("sessionId") == session):
                self._waiters.remove(waiter)
                d.callback(message.get("params", {}))

    def _closed(self, reason: str) -> None:
        if not self._open.called:
            self._open.errback(CDPError(f"the browser's DevTools socket did not open: {reason}"))
        if not self._gone.called:
            self._gone.callback(None)
        for d in [*self._answers.values(), *(w[2] for w in self._waiters)]:
            d.errback(CDPError(f"the browser's DevTools socket closed: {reason}"))
        self._answers.clear()
        self._waiters.clear()

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> Deferred[dict]:
        assert self._protocol is not None, "not connected"
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self._answers[message_id] = d = Deferred()
        self._protocol.sendMessage(json.dumps(message).encode())
        return d

    def event(self, method: str, session: str | None = None) -> Deferred[dict]:
        """The next event `method` (of `session`), once it comes: ask before causing it."""
        d: Deferred[dict] = Deferred()
        self._waiters.append((method, session, d))
        return d

    def close(self) -> Deferred[None]:
        """Close the socket; fires once it is closed (the client schedules no Autobahn timers: ws_client)."""
        if self._protocol is not None and not self._gone.called:
            self._protocol.sendClose()
        return self._gone


class Page:
    """One tab, over its flattened DevTools session."""

    def __init__(self, devtools: DevTools, session: str) -> None:
        self.devtools = devtools
        self.session = session

    def send(self, method: str, params: dict | None = None) -> Deferred[dict]:
        return self.devtools.send(method, params, self.session)

    async def goto(self, url: str) -> None:
        loaded = self.devtools.event("Page.loadEventFired", self.session)
        answer = await self.send("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise CDPError(f"cannot open {url}: {answer['errorText']}")
        await loaded

    async def evaluate(self, expression: str, timeout_ms: int = 20_000) -> Any:
        """The value of `expression` in the page, its promise awaited; a rejection or a throw fails."""
        answer = await self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                      "returnByValue": True, "timeout": timeout_ms})
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            raise CDPError(details.get("exception", {}).get("description") or details.get("text"))
        return answer["result"].get("value")

    async def screenshot(self) -> bytes:
        answer = await self.send("Page.captureScreenshot", {"format": "png"})
        return base64.b64decode(answer["data"])


# A promise that settles when `check()` (an expression) is truthy: at once, or at the DOM change
# that makes it so; rejected after `ms`.  The page's own events do the waiting.
WHEN = """new Promise((resolve, reject) => {{
  const check = () => {{ try {{ return ({check}); }} catch (e) {{ return null; }} }};
  const now = check();
  if (now) {{ resolve(now); return; }}
  const observer = new MutationObserver(() => {{
    const value = check();
    if (value) {{ observer.disconnect(); clearTimeout(timer); resolve(value); }}
  }});
  observer.observe(document, {{ subtree: true, childList: true, attributes: true, characterData: true }});
  const timer = setTimeout(() => {{
    observer.disconnect();
    reject(new Error({what!r} + ": not seen in {ms} ms"));
  }}, {ms});
}})"""


def when(check: str, what: str, ms: int = 15_000) -> str:
    """The expression of a promise of `check` becoming truthy (see `WHEN`)."""
    return WHEN.format(check=check, what=what, ms=ms)


class Browser:
    """A headless Chromium process with its DevTools connection, stopped at the test's cleanup."""

    def __init__(self, process: Process, devtools: DevTools) -> None:
        self.process = process
        self.devtools = devtools

    @classmethod
    async def start(cls, testcase: Any, width: int = 1400, height: int = 900) -> tuple[Browser, Page]:
        chromium = find_chromium()
        profile = testcase.mktemp()
        os.makedirs(profile)
        args = [chromium, "--headless=new", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
                f"--user-data-dir={os.path.abspath(profile)}", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--password-store=basic", "--use-mock-keychain",
                f"--window-size={width},{height}", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        process = Process(testcase, args, name="chromium")
        line = process.wait_for("DevTools listening on ", timeout=30)
        devtools = DevTools()
        await devtools.connect(line.split("DevTools listening on ", 1)[1].strip())
        testcase.addCleanup(devtools.close)
        target = await devtools.send("Target.createTarget", {"url": "about:blank"})
        attached = await devtools.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(devtools, attached["sessionId"])
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        await page.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                                "deviceScaleFactor": 1, "mobile": False})
        return cls(process, devtools), page
