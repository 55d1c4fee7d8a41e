"""SIGHUP rereads `[csp]`; other changed settings are reported as needing a restart."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import TestCase

from mcpr.gateway.reload import ReloadService, changed_keys
from mcpr.gateway.settings import load_gateway

BASE = 'mcp = "http://localhost:9000/mcp"\n'


class HandOver:
    """The reactor as the service's signal handler sees it: `ran` fires once the work the
    handler handed over (the whole reload) has run."""

    def __init__(self) -> None:
        self.ran: Deferred[None] = Deferred()

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        def run() -> None:
            f(*args, **kwargs)
            self.ran.callback(None)

        reactor.callFromThread(run)


class ReloadTests(TestCase):
    """The gateway's ReloadService: which settings a SIGHUP applies, and what it leaves to a restart."""

    timeout = 10

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.path = self.dir / "mcpr.toml"
        self.path.write_text(BASE + '[csp]\ndomains = ["https://old.example.com"]\n')
        self.running = self.read()
        self.original = self.running.csp
        self.resource = SimpleNamespace(csp=self.original)
        self.reactor = HandOver()
        self.service = ReloadService(self.reactor, self.resource, self.running, self.read)

    def read(self):
        return load_gateway({"csp_mode": None}, env={}, cwd=self.dir)

    def test_changed_keys(self) -> None:
        self.path.write_text('mcp = "http://localhost:9001/mcp"\nport = 4000\nno_tunnel = true\n'
                             '[csp]\nmode = "override"\n[tunnel]\ntoken = "mcpr_generated"\n')
        self.assertEqual(changed_keys(self.running, self.read()), ["mcp", "listen"])

    async def test_sighup_applies_csp_and_reports_the_rest(self) -> None:
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.path.write_text('mcp = "http://localhost:9001/mcp"\n[csp]\nmode = "override"\n'
                             'domain = "https://new.example.com"\n'
                             '[[csp.widget]]\nmatch = "*"\nframe_domains = ["https://f.example.com"]\n')
        with capturedLogs() as events:
            os.kill(os.getpid(), signal.SIGHUP)
            await self.reactor.ran
        csp = self.resource.csp
        self.assertEqual((csp.mode, csp.domain, csp.domains), ("override", "https://new.example.com", ()))
        self.assertEqual(csp.widgets[0].frame, ("https://f.example.com",))
        lines = [formatEvent(e) for e in events]
        self.assertTrue(any("need a restart" in line and "mcp" in line for line in lines), lines)

    async def test_broken_file_keeps_the_running_policy(self) -> None:
        self.path.write_text(BASE + '[csp]\nmode = "strict"\n')
        with capturedLogs() as events:
            self.service.reload()
        self.assertIs(self.resource.csp, self.original)
        self.assertTrue(any("csp.mode" in formatEvent(e) for e in events))

    def test_handler_restored_on_stop(self) -> None:
        before = signal.getsignal(signal.SIGHUP)
        self.service.startService()
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), before)
        self.service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)
