"""Uploads into a gateway that grants huge windows and stops reading (D3): the relay must not buffer
the bodies in memory, whatever the gateway's windows say; bodies wait in their spool files until
the socket drains, and a gateway that lets the relay's other writes pile up unread is dropped.
"""

from __future__ import annotations

import socket
from pathlib import Path

from hyperframe.frame import PingFrame
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from tests.support.bystander import Bystander
from tests.support.h2_gateway import H2Gateway
from tests.support.loopback import sleep
from tests.support.processes import PeakRSS, start_relay

DOMAIN = "tunnel.test"
MiB = 1 << 20
BODY = 16 * MiB - 4096  # under the default 16 MiB body cap
UPLOADS = 16
HUGE = 2**31 - 1


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


async def settled(pid: int, quiet: float = 0.3) -> None:
    """Until the process has used no CPU for `quiet` seconds: it has done what it would do."""
    last = cpu_ticks(pid)
    while True:
        await sleep(quiet)
        now = cpu_ticks(pid)
        if now == last:
            return
        last = now


def upload(port: int, host: str) -> socket.socket:
    """A whole POST written from a thread (blocking until the relay has taken it)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {BODY}\r\nConnection: close\r\n"
                 "Content-Type: application/octet-stream\r\n\r\n".encode())
    sock.sendall(memoryview(b"u" * BODY))
    return sock


def response(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    sock.close()
    return bytes(out)


class StalledGatewayTests(TestCase):
    timeout = 90
    relay_args: tuple[str, ...] = ()

    async def setUp(self) -> None:
        self.relay, self.port = start_relay(self, DOMAIN, *self.relay_args)
        self.bystander = await Bystander(self.port, DOMAIN).start(self)
        self.gateway = H2Gateway(self.port, "tok-sink", "sink", window=HUGE)
        self.addCleanup(self.gateway.close)
        await self.gateway.connect()
        # Whatever the relay may send, the gateway says: its window is as large as HTTP/2 allows.
        self.gateway.conn.increment_flow_control_window(HUGE - 65535)
        self.gateway.flush()
        await sleep(0.2)
        self.gateway.proto.transport.pauseProducing()  # and then it reads nothing
        self.host = f"sink.{DOMAIN}"

    async def uploads(self, n: int) -> list[socket.socket]:
        return await gatherResults([threads.deferToThread(upload, self.port, self.host) for _ in range(n)])


class HugeWindowTests(StalledGatewayTests):
    async def test_uploads_into_a_gateway_that_does_not_read(self) -> None:
        """16 uploads of 16 MiB: the relay's memory grows by a small bound, not by the bodies."""
        memory = PeakRSS(self.relay.popen.pid)
        self.addCleanup(memory.stop)
        sockets = await self.uploads(UPLOADS)
        await settled(self.relay.popen.pid)
        growth = memory.stop()
        self.assertLess(growth, 24, f"relay memory grew {growth} MiB for {UPLOADS} x 16 MiB uploads")
        await self.bystander.unaffected()
        # The gateway goes away: every upload gets an answer, none is lost silently.
        self.gateway.proto.transport.abortConnection()
        answers = await gatherResults([threads.deferToThread(response, s) for s in sockets])
        self.assertEqual({a.split(b"\r\n", 1)[0] for a in answers}, {b"HTTP/1.1 502 Bad Gateway"})


class BacklogTests(StalledGatewayTests):
    relay_args = ("--gateway-backlog", "16KiB")

    async def test_a_gateway_that_lets_answers_pile_up_is_dropped(self) -> None:
        """Once its socket is full (an upload filled it), the gateway keeps sending PINGs within the
        control budget; their ACKs would pile up unread: past the backlog the relay drops it."""
        memory = PeakRSS(self.relay.popen.pid)
        self.addCleanup(memory.stop)
        [sock] = await self.uploads(1)
        await settled(self.relay.popen.pid)
        ping = PingFrame(0, opaque_data=b"12345678").serialize()
        dropped = Deferred.fromCoroutine(self._answered(sock))
        for _ in range(40):  # 500 a second, half the budget; 16 KiB of ACKs take about two seconds
            if self.gateway.proto.state != self.gateway.proto.STATE_OPEN:
                break
            self.gateway.send_raw(ping * 50)
            await sleep(0.1)
        answer = await dropped.addTimeout(10, reactor)
        self.assertTrue(answer.startswith(b"HTTP/1.1 502"), answer[:100])
        self.assertIn("the gateway does not read", self.relay.output())
        self.assertLess(memory.stop(), 24)
        await self.bystander.unaffected()

    async def _answered(self, sock: socket.socket) -> bytes:
        return await threads.deferToThread(response, sock)
