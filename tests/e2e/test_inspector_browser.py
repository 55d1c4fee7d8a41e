"""The inspector page in a real headless Chromium: a gateway under `twist` in front of the example
MCP server, a call made with the MCP SDK, and the page watched over the DevTools protocol.

The request must appear without a reload, its detail must show the tool's
arguments, replay must get a new answer from the server (through the proxy
core: the replay is recorded, and appears too), and a screenshot is taken.
`MCPR_SCREENSHOT=PATH` keeps the screenshot there (how docs/inspector.png is made).
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from mcpr.common.bodies import BytesProducer
from tests.support.browser import Browser, find_chromium, when
from tests.support.processes import ROOT, start_gateway, start_upstream

HELD = str(ROOT / "tests" / "support" / "held_session.py")


class HeldSession(ProcessProtocol):
    """`held_session.py` as a child: its JSON line once the call is answered; closing its standard
    input ends the session."""

    def __init__(self) -> None:
        self.called: Deferred[dict] = Deferred()
        self.ended: Deferred[int] = Deferred()
        self._out = b""
        self._err = b""

    def outReceived(self, data: bytes) -> None:
        self._out += data
        if b"\n" in self._out and not self.called.called:
            self.called.callback(json.loads(self._out.split(b"\n", 1)[0]))

    def errReceived(self, data: bytes) -> None:
        self._err += data

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        if not self.called.called:
            self.called.errback(AssertionError(f"the SDK client exited ({code}): {self._err.decode(errors='replace')}"))
        self.ended.callback(code)

    def end(self) -> Deferred[int]:
        if not self.ended.called:
            self.transport.closeStdin()
        return self.ended


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; AssertionError if `data` is no PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise AssertionError(f"not a PNG: {data[:16]!r}")
    return struct.unpack(">II", data[16:24])


class InspectorBrowserTests(TestCase):
    timeout = 120

    async def test_live_request_detail_replay_and_screenshot(self) -> None:
        find_chromium()  # skips, saying how to install it, when there is none
        _, mcp = start_upstream(self)
        gateway, base = start_gateway(self, mcp, "--inspector", "tcp:0:interface=127.0.0.1")
        inspector = re.search(r"inspector: (http://\S+/)", gateway.wait_for("inspector: http")).group(1)
        browser, page = await Browser.start(self)

        await page.goto(inspector)
        await page.evaluate(when("document.querySelector('#live.on')", "the live feed open"))
        await page.evaluate("window.notReloaded = true")

        held = HeldSession()
        reactor.spawnProcess(held, sys.executable, [sys.executable, HELD, f"{base}/mcp", "add", '{"a": 20, "b": 22}'],
                             env=dict(os.environ))
        self.addCleanup(held.end)
        called = await held.called
        self.assertEqual(called["result"], ["42"])

        # The call appears, pushed: the page was not reloaded (its marker survives).
        row = await page.evaluate(when(
            "[...document.querySelectorAll('#requests tbody tr')].find(tr => tr.querySelector('.target')"
            ".textContent === 'add') && [...document.querySelectorAll('#requests tbody tr')].find(tr => "
            "tr.querySelector('.target').textContent === 'add').dataset.id", "the tools/call add row"))
        self.assertTrue(await page.evaluate("window.notReloaded === true"))

        # Grouped by session: the session's client in the sessions pane; picking it filters the list.
        session = called["session_id"]
        client = await page.evaluate(when(f"document.querySelector('#sessions li[data-session=\"{session}\"] strong')"
                                          f" && document.querySelector('#sessions li[data-session=\"{session}\"] "
                                          "strong').textContent", "the session in the sessions pane"))
        self.assertEqual(client, "mcp 0.1.0")
        await page.evaluate(f"document.querySelector('#sessions li[data-session=\"{session}\"]').click()")
        await page.evaluate(when("!document.querySelector('#session-filter').hidden && document.querySelector("
                                 f"'#requests tr[data-id=\"{row}\"]')", "the list of the session"))
        sessions = await page.evaluate("[...document.querySelectorAll('#requests tbody tr td:nth-child(7)')]"
                                       ".map(td => td.title)")
        self.assertEqual(set(sessions), {session})

        # Its detail: the JSON-RPC request with the tool's arguments, and the answer's SSE event.
        await page.evaluate(f"document.querySelector('#requests tr[data-id=\"{row}\"]').click()")
        sent = await page.evaluate(when("document.querySelector('#request-body pre')"
                                        " && document.querySelector('#request-body pre').textContent",
                                        "the request's body"))
        request = json.loads(sent)
        self.assertEqual((request["method"], request["params"]["name"], request["params"]["arguments"]),
                         ("tools/call", "add", {"a": 20, "b": 22}))
        self.assertIn('"a": 20', sent, "pretty-printed")
        answer = await page.evaluate(when("document.querySelector('#response-body .event pre')"
                                          " && document.querySelector('#response-body .event pre').textContent",
                                          "the response's SSE event"))
        self.assertEqual(json.loads(answer)["result"]["content"][0]["text"], "42")

        # Replay: a new answer from the server, and the replay recorded as one.
        await page.evaluate("document.querySelector('#replay').click()")
        heading = await page.evaluate(when("document.querySelector('#replay-answer h3')"
                                           " && document.querySelector('#replay-answer h3').textContent",
                                           "the replay's answer"))
        self.assertEqual(heading, "Replay answer: HTTP 200")
        replayed = await page.evaluate("document.querySelector('#replay-body .event pre').textContent")
        self.assertEqual(json.loads(replayed)["result"]["content"][0]["text"], "42")
        via = await page.evaluate(when("document.querySelector('#requests tbody tr .badge.replay')"
                                       " && document.querySelector('#requests tbody tr .badge.replay').textContent",
                                       "the replay's row"))
        self.assertEqual(via, "replay")
        await page.evaluate("Promise.all(document.getAnimations().map(a => a.finished)).then(() => true)")
        png = await page.screenshot()
        self.assertEqual(png_size(png), (1400, 900))
        self.assertGreater(len(png), 20_000, "a page with content, not a blank one")
        if os.environ.get("MCPR_SCREENSHOT"):
            Path(os.environ["MCPR_SCREENSHOT"]).write_bytes(png)

        # The click handler fills the command in before it awaits the clipboard.
        curl = await page.evaluate("document.querySelector('#copy-curl').click(), "
                                   "document.querySelector('#curl').value")
        self.assertIn(f"curl -sS -N -X POST '{base}/mcp'", curl)
        self.assertIn("\"arguments\":{\"a\":20,\"b\":22}", curl)

        # Captured text is the caller's: markup in a tool's name stays text, in the list and the detail.
        hostile = '<img src=x onerror="window.pwned=1">'
        response = await Agent(reactor).request(
            b"POST", f"{base}/mcp".encode(),
            Headers({b"content-type": [b"application/json"], b"accept": [b"application/json, text/event-stream"],
                     b"mcp-session-id": [called["session_id"].encode()]}),
            BytesProducer(json.dumps({"jsonrpc": "2.0", "id": 99, "method": "tools/call",
                                      "params": {"name": hostile, "arguments": {}}}).encode()))
        await readBody(response)
        shown = await page.evaluate(when(
            f"[...document.querySelectorAll('#requests .target')].find(td => td.textContent === {json.dumps(hostile)})"
            " && 'shown'", "the hostile row"))
        self.assertEqual(shown, "shown")
        await page.evaluate("[...document.querySelectorAll('#requests .target')].find(td => td.textContent !== 'add'"
                            " && td.textContent !== '').closest('tr').click()")
        await page.evaluate(when("document.querySelector('#request-body pre') && document.querySelector("
                                 "'#request-body pre').textContent.includes('onerror')", "the hostile detail"))
        self.assertEqual(await page.evaluate("[document.querySelectorAll('img').length, typeof window.pwned]"),
                         [0, "undefined"])
        self.assertEqual(await held.end(), 0)
