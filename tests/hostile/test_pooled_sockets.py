"""Hostile parties at a tunnel's pooled sockets: strangers who try to open one, a gateway whose
pooled sockets lie or flood, a public client that stops reading.  The offender is refused or closed;
the relay's memory stays bounded; another user's tunnel (the bystander) is untouched, measured
against its own quiet baseline in the same test.

The relay is a real process; the hostile gateway is `H2Gateway` with raw pooled sockets, so the test
writes exactly the bytes a malicious gateway would."""

from __future__ import annotations

import socket

from twisted.trial.unittest import TestCase

from tests.support.bystander import Bystander
from tests.support.h2_gateway import H2Gateway, pool_upgrade, pooled_socket
from tests.support.loopback import sleep
from tests.support.processes import PeakRSS, start_relay
from tests.support.public import exchange, raw

DOMAIN = "tunnel.test"
MiB = 1 << 20


def get(host: str, path: str = "/x") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


class PooledSocketTests(TestCase):
    timeout = 60

    async def setUp(self) -> None:
        self.relay, self.port = start_relay(self, DOMAIN, "--tunnel-pool", "2")
        self.gateway = H2Gateway(self.port, "tok-hostile", "victim", pool=8)
        self.addCleanup(self.gateway.close)
        await self.gateway.connect()
        self.host = f"victim.{DOMAIN}"
        self.key = self.gateway.ack["pool"]["key"]

    async def test_the_offer_is_capped_by_the_relay(self) -> None:
        self.assertEqual(self.gateway.ack["pool"]["size"], 2)
        self.assertRegex(self.key, r"^[A-Za-z0-9_-]{43}$")

    async def test_strangers_cannot_open_a_pooled_socket(self) -> None:
        def status(answer: bytes) -> bytes:
            return answer.split(b"\r\n", 1)[0]

        wrong = await exchange(self.port, pool_upgrade("victim", "x" * 43))
        self.assertEqual(status(wrong), b"HTTP/1.1 403 Forbidden")
        other = await exchange(self.port, pool_upgrade("nobody", self.key))
        self.assertEqual(status(other), b"HTTP/1.1 403 Forbidden", "an unknown name is told apart from nothing")
        plain = await exchange(self.port, b"GET /_tunnel/pool HTTP/1.1\r\nHost: relay.test\r\n"
                                          b"x-mcpr-pool: victim " + self.key.encode() + b"\r\n\r\n")
        self.assertEqual(status(plain), b"HTTP/1.1 426 Upgrade Required")
        posted = await exchange(self.port, pool_upgrade("victim", self.key).replace(b"GET", b"POST", 1))
        self.assertEqual(status(posted), b"HTTP/1.1 405 Method Not Allowed")
        self.assertNotIn(self.key.encode(), self.relay.output().encode(), "the key is never logged")

    async def test_the_pool_holds_its_size_and_closes_with_its_tunnel(self) -> None:
        first, second = await pooled_socket(self.gateway), await pooled_socket(self.gateway)
        third = await exchange(self.port, pool_upgrade("victim", self.key))
        self.assertTrue(third.startswith(b"HTTP/1.1 429 "), third[:100])
        await self.gateway.close()
        await first.closed
        await second.closed

    async def test_an_endless_head_costs_one_request_and_bounded_memory(self) -> None:
        bystander = await Bystander(self.port, DOMAIN).start(self)
        spare = await pooled_socket(self.gateway)  # stays idle, for the next request
        hostile = await pooled_socket(self.gateway)  # the most recently idle: taken first
        memory = PeakRSS(self.relay.popen.pid)
        public = await raw(self.port, get(self.host))
        await hostile.until(b"\r\n\r\n")
        hostile.transport.write(b"HTTP/1.1 200 OK\r\n")
        line = b"x-filler: " + b"a" * 8000 + b"\r\n"
        for _ in range(64 * MiB // len(line)):  # 64 MiB of header lines, none over a line limit
            if hostile.closed.called:
                break
            hostile.transport.write(line)
            await sleep(0)
        await hostile.closed
        answer = await public.closed
        self.assertTrue(answer.startswith(b"HTTP/1.1 502 "), answer[:200])
        self.assertLess(memory.stop(), 16, "the relay did not keep the head")
        self.assertIn("closing a pooled socket: a response head over 128 KiB", self.relay.output())
        await bystander.unaffected()
        # The tunnel itself still serves: the next request takes its other pooled socket.
        public = await raw(self.port, get(self.host))
        await spare.until(b"\r\n\r\n")
        spare.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue((await public.closed).endswith(b"ok"))
        self.assertFalse(self.gateway.closed.called)

    async def test_bytes_on_an_idle_socket_close_it_and_requests_take_a_stream(self) -> None:
        first, second = await pooled_socket(self.gateway), await pooled_socket(self.gateway)
        first.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforged")
        second.transport.write(b"\r\n")
        await first.closed
        await second.closed
        public = await raw(self.port, get(self.host))
        stream = await self.gateway.requests.get()
        self.gateway.respond(stream, 200, b"by stream", headers=[(b"content-length", b"9")])
        self.assertTrue((await public.closed).endswith(b"by stream"))
        self.assertIn("bytes while no request was asked", self.relay.output())

    async def test_a_reader_that_stops_holds_one_socket_and_bounded_memory(self) -> None:
        """A public client that never reads a large download: the relay stops reading that pooled
        socket (TCP's flow control, end to end), and every other request is served meanwhile."""
        bystander = await Bystander(self.port, DOMAIN).start(self)
        spare = await pooled_socket(self.gateway)
        hostile = await pooled_socket(self.gateway)  # the most recently idle: taken first
        memory = PeakRSS(self.relay.popen.pid)
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(("127.0.0.1", self.port))
        reader.sendall(get(self.host, "/download"))
        await hostile.until(b"\r\n\r\n")
        total = 64 * MiB
        hostile.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        chunk = b"z" * (256 << 10)
        for _ in range(total // len(chunk)):
            hostile.transport.write(chunk)
            await sleep(0)
        await sleep(1.0)
        self.assertLess(memory.stop(), 24, "the relay did not take the whole body in")
        # The other pooled socket serves the next request while the download is stuck.
        public = await raw(self.port, get(self.host))
        await spare.until(b"\r\n\r\n")
        spare.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue((await public.closed).endswith(b"ok"))
        await bystander.unaffected()
        reader.close()
        await hostile.closed  # the abandoned download's socket is closed, not returned half read
