"""The real gateway under more concurrent streams than it can hold, and under a crowd of public
clients leaving at once: the excess waits at the relay, nothing ends the tunnel (S6)."""

from __future__ import annotations

import os
import re

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from tests.support.bystander import Bystander
from tests.support.loopback import sleep
from tests.support.processes import ROOT, Process, python, start_relay, twist
from tests.support.public import raw

DOMAIN = "localhost"


class ManyStreamsTests(TestCase):
    timeout = 90

    async def setUp(self) -> None:
        self.relay, self.port = start_relay(self, DOMAIN, "--max-in-flight", "2000", "--max-connections-per-ip", "4000")
        self.bystander = await Bystander(self.port, DOMAIN).start(self)
        bulk = Process(self, python(str(ROOT / "tests" / "support" / "bulk_server.py")), name="bulk")
        upstream = int(bulk.wait_for("LISTENING").split()[-1])
        cwd = self.mktemp()
        os.makedirs(cwd)
        self.gateway = Process(self, twist("mcpr", "--mcp", f"http://127.0.0.1:{upstream}/mcp", "--listen",
                                           "tcp:0:interface=127.0.0.1", "--relay-url",
                                           f"http://127.0.0.1:{self.port}", "--subdomain", "many"),
                               name="gateway", cwd=cwd)
        self.gateway.wait_for("Tunnel: ")
        self.host = f"many.{DOMAIN}"

    def assert_one_registration(self) -> None:
        """The tunnel never dropped: one registration in the relay's log."""
        self.assertEqual(len(re.findall(r"tunnel many registered", self.relay.output())), 1,
                         self.gateway.output()[-3000:])

    async def test_more_streams_than_the_gateway_advertises(self) -> None:
        """1,100 concurrent requests: 1,024 streams at once (Twisted's priority tree held 999 and
        the tunnel died), the rest queued at the relay."""

        async def one(i: int) -> bytes:
            client = await raw(self.port, f"GET /slow?ms=1000&i={i} HTTP/1.1\r\nHost: {self.host}\r\n"
                                          "Connection: close\r\n\r\n".encode())
            return await client.closed

        answers = await gatherResults([Deferred.fromCoroutine(one(i)) for i in range(1100)])
        statuses = sorted({a.split(b"\r\n", 1)[0] for a in answers})
        failed = [a[:200] for a in answers if b" 200 " not in a[:20]][:3]
        self.assertEqual(statuses, [b"HTTP/1.1 200 OK"], f"{failed}\n{self.gateway.output()[-3000:]}")
        # The relay streams the body, chunked, or sends it whole with a length.
        short = [a[-300:] for a in answers if not a.endswith((b"\r\n\r\nslow", b"\r\n4\r\nslow\r\n0\r\n\r\n"))][:3]
        self.assertEqual(short, [], self.gateway.output()[-3000:])
        self.assert_one_registration()
        await self.bystander.unaffected()

    async def test_a_thousand_public_clients_leaving_at_once(self) -> None:
        """Each leaving client makes the relay reset its stream; Twisted's Rapid Reset budget
        (1,000, then 33 a second) made the gateway end the whole tunnel."""
        clients = await gatherResults([Deferred.fromCoroutine(raw(self.port, (
            f"GET /slow?ms=5000&i={i} HTTP/1.1\r\nHost: {self.host}\r\n\r\n").encode())) for i in range(1100)])
        await sleep(1.0)  # every request is a stream at the gateway (or queued at the relay)
        for client in clients:
            client.transport.abortConnection()
        await gatherResults([client.closed for client in clients])
        await sleep(0.5)
        answer = await (await raw(self.port, f"GET /slow?ms=1 HTTP/1.1\r\nHost: {self.host}\r\n"
                                             "Connection: close\r\n\r\n".encode())).closed
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:300])
        self.assert_one_registration()
        await self.bystander.unaffected()
