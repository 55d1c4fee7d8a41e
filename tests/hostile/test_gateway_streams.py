"""The real gateway under more concurrent streams than it can hold: the excess waits or is refused,
and nothing ends the tunnel (S6)."""

from __future__ import annotations

import os
import re

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from tests.support.bystander import Bystander
from tests.support.processes import ROOT, Process, python, start_relay, twist
from tests.support.public import raw

DOMAIN = "localhost"


class ManyStreamsTests(TestCase):
    timeout = 90

    async def test_more_streams_than_the_gateway_advertises(self) -> None:
        relay, port = start_relay(self, DOMAIN, "--max-in-flight", "2000")
        bystander = await Bystander(port, DOMAIN).start(self)
        bulk = Process(self, python(str(ROOT / "tests" / "support" / "bulk_server.py")), name="bulk")
        upstream = int(bulk.wait_for("LISTENING").split()[-1])
        cwd = self.mktemp()
        os.makedirs(cwd)
        gateway = Process(self, twist("mcpr", "--mcp", f"http://127.0.0.1:{upstream}/mcp", "--listen",
                                      "tcp:0:interface=127.0.0.1", "--relay-url", f"http://127.0.0.1:{port}",
                                      "--subdomain", "many"), name="gateway", cwd=cwd)
        gateway.wait_for("Tunnel: ")
        host = f"many.{DOMAIN}"

        async def one(i: int) -> bytes:
            client = await raw(port, f"GET /slow?ms=1000&i={i} HTTP/1.1\r\nHost: {host}\r\n"
                                     "Connection: close\r\n\r\n".encode())
            return await client.closed

        answers = await gatherResults([Deferred.fromCoroutine(one(i)) for i in range(1100)])
        statuses = sorted({a.split(b"\r\n", 1)[0] for a in answers})
        failed = [a[:200] for a in answers if b" 200 " not in a[:20]][:3]
        self.assertEqual(statuses, [b"HTTP/1.1 200 OK"], f"{failed}\n{gateway.output()[-3000:]}")
        # The relay streams the body, chunked, or sends it whole with a length.
        short = [a[-300:] for a in answers if not a.endswith((b"\r\n\r\nslow", b"\r\n4\r\nslow\r\n0\r\n\r\n"))][:3]
        self.assertEqual(short, [], gateway.output()[-3000:])
        # The tunnel never dropped: one registration in the relay's log.
        self.assertEqual(len(re.findall(r"tunnel many registered", relay.output())), 1, relay.output()[-3000:])
        await bystander.unaffected()
