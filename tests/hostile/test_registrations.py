"""How many registrations a stranger can make (D4), and what one that hangs up costs (D11).

A flood of registrations from one address is refused (4008) after a burst, without slowing the
bystander and with the relay's file descriptors and memory bounded; the per-address and global
tunnel caps hold, while another address and a gateway taking over its own name go on; a
registration that hangs up while the auth provider is being asked cancels that request.
"""

from __future__ import annotations

import json
import os

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mcpr.relay.registration import RATE_LIMITED
from tests.support.bystander import Bystander
from tests.support.legacy_gateway import Closed, LegacyGateway, refused
from tests.support.loopback import TrackingSite, listen, sleep
from tests.support.processes import ROOT, PeakRSS, Process, python, start_relay

DOMAIN = "tunnel.test"
FLOOD = str(ROOT / "tests" / "support" / "registration_flood.py")
ATTEMPTS = 400


def open_fds(process: Process) -> int:
    return len(os.listdir(f"/proc/{process.popen.pid}/fd"))


class FloodTests(TestCase):
    timeout = 60

    async def register(self, port: int, token: str, subdomain: str, source: str = "127.0.0.1") -> LegacyGateway:
        gateway = LegacyGateway(port, token, subdomain, source=source)
        self.addCleanup(gateway.close)
        await gateway.connect()
        return gateway

    async def test_a_flood_from_one_address_is_refused(self) -> None:
        relay, port = start_relay(self, DOMAIN)
        bystander = await Bystander(port, DOMAIN).start(self)
        fds = open_fds(relay)
        memory = PeakRSS(relay.popen.pid)
        flood = Process(self, python(FLOOD, str(port), str(ATTEMPTS), "--concurrency", "64"), name="flood")
        while RATE_LIMITED not in relay.output():
            await sleep(0.02)
        await bystander.unaffected()
        self.assertIsNone(flood.popen.poll(), "the bystander was measured while the flood went on")
        while flood.popen.poll() is None:
            await sleep(0.05)
        result = json.loads(flood.output().strip().splitlines()[-1])
        growth = memory.stop()
        # The default burst (30, one of which the bystander used) and what refilled meanwhile (30 a
        # minute) got through the rate limit; the default cap of 32 tunnels from one address (the
        # bystander's included) refused what came after.
        refused = result["refused"]
        at_cap = refused.pop("4008 too many tunnels from this address", 0)
        admitted = result["registered"] + at_cap
        self.assertGreaterEqual(result["registered"], 29)
        self.assertLessEqual(result["registered"], 31)
        self.assertLess(admitted, 29 + 10)
        self.assertEqual(list(refused), [f"4008 {RATE_LIMITED}"])
        self.assertEqual(refused[f"4008 {RATE_LIMITED}"], ATTEMPTS - admitted)
        # One log line per run of refusals, not one per refusal.
        self.assertLessEqual(relay.output().count(RATE_LIMITED), 1 + admitted - 29)
        self.assertLess(growth, 30, "relay memory grew by MiB")
        # Another address registers as usual.
        await self.register(port, "tok-neighbour", "neighbour", source="127.0.0.2")
        while open_fds(relay) > fds + 1:  # the neighbour's socket
            await sleep(0.05)
        await bystander.unaffected()

    async def test_tunnel_caps_per_address_and_in_all(self) -> None:
        relay, port = start_relay(self, DOMAIN, "--max-tunnels-per-ip", "3", "--max-tunnels", "6")
        bystander = await Bystander(port, DOMAIN).start(self)  # from 127.0.0.1
        await self.register(port, "tok-a", "a1")
        old = await self.register(port, "tok-a", "a2")
        e = await refused(port, "tok-b", "b1")
        self.assertEqual((e.code, e.reason), (4008, "too many tunnels from this address"))
        for name in ("c1", "c2", "c3"):
            await self.register(port, f"tok-{name}", name, source="127.0.0.2")
        e = await refused(port, "tok-d", "d1", source="127.0.0.3")
        self.assertEqual((e.code, e.reason), (4008, "relay full: too many tunnels"))
        # A gateway taking over its own name (its old socket went stale) is not refused by a cap.
        new = await self.register(port, "tok-a", "a2")
        self.assertEqual((await old.closed)[0], 4002)
        self.assertFalse(new.closed.called)
        await bystander.unaffected()


class Provider(Resource):
    """An auth provider that allows the bystander at once and leaves everyone else waiting; it
    records when each waiting request ends (the relay hung up on it)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Deferred] = []

    def render_POST(self, request: Request) -> bytes | int:
        token = json.loads(request.content.read())["token"]
        if token == "tok-bystander":
            return json.dumps({"subdomains": ["bystander"]}).encode()
        ended: Deferred = Deferred()
        request.notifyFinish().addBoth(lambda _: ended.callback(None))
        self.waiting.append(ended)
        return NOT_DONE_YET


class HangUpTests(TestCase):
    timeout = 60

    async def test_a_registration_that_hangs_up_cancels_its_provider_call(self) -> None:
        provider = Provider()
        provider_port = await listen(self, TrackingSite(provider))
        relay, port = start_relay(self, DOMAIN, "--auth-provider", f"http://127.0.0.1:{provider_port}")
        bystander = await Bystander(port, DOMAIN).start(self)
        gateways = [LegacyGateway(port, f"tok-{i}", f"name-{i}") for i in range(20)]
        attempts = [Deferred.fromCoroutine(gateway.connect()) for gateway in gateways]
        while len(provider.waiting) < len(gateways):
            await sleep(0.02)
        for gateway in gateways:
            gateway.proto.transport.abortConnection()
        for attempt in attempts:
            attempt.addErrback(lambda f: f.trap(Closed))
        await gatherResults(provider.waiting)  # without the fix: only at the relay's 5 s provider timeout
        self.assertNotIn("auth provider unavailable", relay.output())
        await bystander.unaffected()
