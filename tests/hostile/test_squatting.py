"""Open mode: a name stays its owner's (S4).

A stranger may not take a subdomain the moment its owner's gateway drops (a
crash, a relay restart, killed or drained), nor the token-derived default
name of another token; an owner refused because a stranger holds its name
keeps retrying and gets its URL back once the stranger is gone.  Each case
runs beside a Bystander, which must not notice.
"""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

from twisted.trial.unittest import TestCase

from mcpr.relay.identity import open_subdomain
from mcpr.relay.reservations import FILE_NAME
from tests.support.bystander import Bystander
from tests.support.legacy_gateway import LegacyGateway, refused
from tests.support.loopback import sleep
from tests.support.processes import ROOT, Process, python, start_relay, twist
from tests.support.public import exchange

DOMAIN = "tunnel.test"


class SquattingTests(TestCase):
    timeout = 60

    async def register(self, port: int, token: str, subdomain: str | None) -> LegacyGateway:
        gateway = LegacyGateway(port, token, subdomain)
        self.addCleanup(gateway.close)
        await gateway.connect()
        return gateway

    async def held_on_disk(self, state: str, subdomain: str) -> None:
        """Until the relay has written the registration of `subdomain` (it does not wait for the
        disk before answering, so a kill right after the answer could come first)."""
        path = Path(state) / FILE_NAME
        while True:
            if path.exists():
                with sqlite3.connect(path) as db:
                    if db.execute("SELECT 1 FROM reservations WHERE subdomain = ?", (subdomain,)).fetchone():
                        return
            await sleep(0.02)

    async def test_a_dropped_owner_keeps_its_name(self) -> None:
        relay, port = start_relay(self, DOMAIN, "--state-dir", self.mktemp())
        bystander = await Bystander(port, DOMAIN).start(self)
        owner = await self.register(port, "tok-owner", "mine")
        owner.proto.transport.abortConnection()  # the owner's gateway crashed
        await owner.closed
        e = await refused(port, "tok-stranger", "mine")
        self.assertEqual(e.code, 4003)
        self.assertRegex(e.reason, r"^subdomain reserved for another token for \d+ s$")
        back = await self.register(port, "tok-owner", "mine")
        self.assertEqual(back.ack["subdomain"], "mine")
        await bystander.unaffected()

    async def test_the_reservation_survives_a_relay_restart(self) -> None:
        """Killed (the relay could write nothing at the end) or drained (it closed the tunnels itself):
        either way the stranger is refused after the restart and the owner gets its name back."""
        state = self.mktemp()
        relay, port = start_relay(self, DOMAIN, "--state-dir", state)
        owner = await self.register(port, "tok-owner", "mine")
        await self.held_on_disk(state, "mine")
        relay.popen.send_signal(signal.SIGKILL)
        relay.popen.wait()
        await owner.closed
        # A short drain below: the bystander's SSE stream would hold it for the whole drain_timeout.
        relay, port = start_relay(self, DOMAIN, "--state-dir", state, "--drain-timeout", "0.5")
        bystander = await Bystander(port, DOMAIN).start(self)
        self.assertEqual((await refused(port, "tok-stranger", "mine")).code, 4003)
        owner = await self.register(port, "tok-owner", "mine")
        self.assertEqual(owner.ack["subdomain"], "mine")
        await bystander.unaffected()

        relay.popen.send_signal(signal.SIGTERM)  # a drain: the relay closes every tunnel with 1001
        self.assertEqual((await owner.closed)[0], 1001)
        relay.popen.wait()
        relay, port = start_relay(self, DOMAIN, "--state-dir", state)
        self.assertEqual((await refused(port, "tok-stranger", "mine")).code, 4003)
        self.assertEqual((await self.register(port, "tok-owner", "mine")).ack["subdomain"], "mine")

    async def test_a_token_derived_name_is_only_its_tokens(self) -> None:
        """Final (4001): that name can never be the stranger's, so retrying cannot help."""
        relay, port = start_relay(self, DOMAIN, "--state-dir", self.mktemp())
        bystander = await Bystander(port, DOMAIN).start(self)
        victim_default = open_subdomain("tok-victim")
        e = await refused(port, "tok-stranger", victim_default)
        self.assertEqual((e.code, e.reason),
                         (4001, f"subdomain '{victim_default}' is reserved for the token it is derived from"))
        self.assertEqual((await self.register(port, "tok-victim", None)).ack["subdomain"], victim_default)
        self.assertEqual((await self.register(port, "tok-victim", victim_default)).ack["subdomain"],
                         victim_default)
        await bystander.unaffected()

    async def test_the_owner_waits_out_a_squatter_and_gets_its_url_back(self) -> None:
        """The original failure: the owner got 4003, stopped for good, and its URL stayed 502 after
        the stranger left.  Now the owner's gateway says once what is going on, keeps retrying, and
        serves its URL as soon as the name is free (the stranger's own short reservation included)."""
        relay, port = start_relay(self, DOMAIN, "--state-dir", self.mktemp(), "--reservation-grace", "1")
        bystander = await Bystander(port, DOMAIN).start(self)
        squatter = await self.register(port, "tok-stranger", "mine")
        upstream = Process(self, python(str(ROOT / "tests" / "support" / "bulk_server.py")), name="bulk")
        mcp = f"http://127.0.0.1:{int(upstream.wait_for('LISTENING').split()[-1])}/mcp"
        owner = Process(self, twist("mcpr", "--mcp", mcp, "--listen", "tcp:0:interface=127.0.0.1",
                                    "--relay-url", f"http://127.0.0.1:{port}", "--subdomain", "mine"),
                        name="owner", env={"MCPR_TUNNEL_TOKEN": "tok-owner"})
        while relay.output().count("registration refused (4003") < 2:
            await sleep(0.05)
        self.assertIsNone(owner.popen.poll())
        self.assertNotIn("tunnel stopped", owner.output())
        await squatter.close()
        while "Tunnel: " not in owner.output():
            await sleep(0.05)
        response = await exchange(port, f"GET /status HTTP/1.1\r\nHost: mine.{DOMAIN}\r\nConnection: close\r\n\r\n"
                                  .encode())
        self.assertTrue(response.startswith(b"HTTP/1.1 200"), response[:200])
        said = owner.output()
        self.assertEqual(said.count("is taken on this relay"), 1, said)
        self.assertIn("subdomain in use by another token", said)
        self.assertIn("--subdomain OTHER", said)
        await bystander.unaffected()
