"""Open mode: a name stays its owner's (S4).

A stranger may not take a subdomain the moment its owner's gateway drops (a
crash, a relay restart), nor the token-derived default name of another token;
the owner, refused meanwhile, keeps retrying and gets its URL back.
"""

from __future__ import annotations

import signal

from twisted.trial.unittest import TestCase

from mcpr.relay.identity import open_subdomain
from tests.support.legacy_gateway import Closed, LegacyGateway
from tests.support.processes import start_relay

DOMAIN = "tunnel.test"


class SquattingTests(TestCase):
    timeout = 30

    async def register(self, port: int, token: str, subdomain: str | None) -> LegacyGateway:
        gateway = LegacyGateway(port, token, subdomain)
        self.addCleanup(gateway.close)
        await gateway.connect()
        return gateway

    async def refused(self, port: int, token: str, subdomain: str | None) -> int:
        gateway = LegacyGateway(port, token, subdomain)
        try:
            await gateway.connect()
        except Closed as e:
            return e.code
        await gateway.close()
        raise AssertionError(f"{subdomain} was given to {token}")

    async def test_a_dropped_owner_keeps_its_name(self) -> None:
        relay, port = start_relay(self, DOMAIN, "--state-dir", self.mktemp())
        owner = await self.register(port, "tok-owner", "mine")
        owner.proto.transport.abortConnection()  # the owner's gateway crashed
        await owner.closed
        self.assertEqual(await self.refused(port, "tok-stranger", "mine"), 4003)
        back = await self.register(port, "tok-owner", "mine")
        self.assertEqual(back.ack["subdomain"], "mine")

    async def test_the_reservation_survives_a_relay_restart(self) -> None:
        state = self.mktemp()
        relay, port = start_relay(self, DOMAIN, "--state-dir", state)
        owner = await self.register(port, "tok-owner", "mine")
        relay.popen.send_signal(signal.SIGKILL)
        relay.popen.wait()
        await owner.closed
        relay, port = start_relay(self, DOMAIN, "--state-dir", state)
        self.assertEqual(await self.refused(port, "tok-stranger", "mine"), 4003)
        self.assertEqual((await self.register(port, "tok-owner", "mine")).ack["subdomain"], "mine")

    async def test_a_token_derived_name_is_only_its_tokens(self) -> None:
        relay, port = start_relay(self, DOMAIN, "--state-dir", self.mktemp())
        victim_default = open_subdomain("tok-victim")
        self.assertEqual(await self.refused(port, "tok-stranger", victim_default), 4003)
        self.assertEqual((await self.register(port, "tok-victim", None)).ack["subdomain"], victim_default)
