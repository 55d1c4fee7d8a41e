"""D1: slow and greedy public clients cannot keep the relay from serving anyone else.

The relay runs as a real process with small explicit deadlines and caps; the
offenders are raw sockets from their own loopback addresses (127.0.0.2 and
up), the `Bystander` (another user's tunnel and SSE stream) comes from
127.0.0.1.  File descriptors are counted in /proc/<pid>/fd.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ConnectError
from twisted.trial.unittest import TestCase

from mcpr.gateway.settings import GATEWAY_SETTINGS
from mcpr.relay.settings import RELAY_SETTINGS
from tests.support.bystander import Bystander
from tests.support.loopback import sleep
from tests.support.processes import ROOT, Process, python, twist
from tests.support.public import RawClient, raw

DOMAIN = "tunnel.test"


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class FdPeak:
    """Samples a process's open file descriptors every 20 ms, while it lives."""

    def __init__(self, testcase: TestCase, pid: int) -> None:
        self.pid = pid
        self.peak = open_fds(pid)
        self._call = reactor.callLater(0.02, self._sample)
        testcase.addCleanup(self.stop)

    def _sample(self) -> None:
        try:
            self.peak = max(self.peak, open_fds(self.pid))
        except FileNotFoundError:
            return
        self._call = reactor.callLater(0.02, self._sample)

    def stop(self) -> int:
        if self._call.active():
            self._call.cancel()
        return self.peak


def start_relay(testcase: TestCase, *args: str, nofile: int | None = None) -> tuple[Process, int]:
    """The relay, optionally under `prlimit` (which execs it: the pid is the relay's)."""
    command = twist("mcpr-relay", "--domain", DOMAIN, "--listen", "tcp:0:interface=127.0.0.1", *args)
    if nofile is not None:
        command = ["prlimit", f"--nofile={nofile}:{nofile}", *command]
    relay = Process(testcase, command, name="relay")
    line = relay.wait_for("listening on 127.0.0.1:")
    return relay, int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))


async def attempt(port: int, source: str, data: bytes = b"") -> RawClient | None:
    """A connection that the relay may drop at once (over a cap): None if it was reset while opening."""
    try:
        return await raw(port, data, source=source)
    except ConnectError:
        return None


def held(clients: list[RawClient | None]) -> list[RawClient]:
    return [c for c in clients if c is not None and not c.closed.called]


async def trickle(client: RawClient, data: bytes, interval: float) -> None:
    """Send `data` a byte at a time until it is all sent or the relay closes the connection."""
    for byte in data:
        if client.closed.called:
            return
        client.transport.write(bytes([byte]))
        await sleep(interval)


class SlowClientTests(TestCase):
    timeout = 60

    async def setUp(self) -> None:
        self.relay, self.port = start_relay(self, "--client-header-timeout", "1", "--client-body-timeout", "1",
                                            "--min-body-rate", "2KiB")
        self.bystander = await Bystander(self.port, DOMAIN).start(self)

    async def test_a_trickled_head_is_cut_though_it_never_pauses(self) -> None:
        """Bytes every 50 ms (far more often than any idle timeout) do not extend the head's deadline."""
        client = await raw(self.port, source="127.0.0.2")
        head = f"GET / HTTP/1.1\r\nHost: {self.bystander.host}\r\nX-Slow: {'s' * 2000}\r\n\r\n".encode()
        sending = Deferred.fromCoroutine(trickle(client, head, 0.05))
        received = await client.closed
        await sending
        self.assertTrue(received.startswith(b"HTTP/1.1 408 Request Timeout"), received[:100])
        self.assertIn(b"Connection: close", received)
        await self.bystander.unaffected()

    async def test_an_idle_connection_is_closed_silently(self) -> None:
        client = await raw(self.port, source="127.0.0.2")
        self.assertEqual(await client.closed, b"")
        await self.bystander.unaffected()

    async def test_a_trickled_body_is_cut(self) -> None:
        """A body that never pauses for long but stays below --min-body-rate gets 408."""
        client = await raw(self.port, f"POST /up HTTP/1.1\r\nHost: {self.bystander.host}\r\n"
                                      f"Content-Length: 1000000\r\n\r\n".encode(), source="127.0.0.2")
        sending = Deferred.fromCoroutine(trickle(client, b"b" * 1000000, 0.01))  # ~100 B/s
        received = await client.closed
        await sending
        self.assertTrue(received.startswith(b"HTTP/1.1 408 Request Timeout"), received[:100])
        await self.bystander.unaffected()

    async def test_many_slow_clients_at_once(self) -> None:
        """Fifty tricklers from one address (within its cap) are all cut; others are served meanwhile."""
        clients = [await raw(self.port, source="127.0.0.2") for _ in range(50)]
        sending = [Deferred.fromCoroutine(trickle(c, b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 500, 0.05))
                   for c in clients]
        await self.bystander.unaffected()
        received = await DeferredList([c.closed for c in clients])
        await DeferredList(sending)
        self.assertTrue(all(data.startswith(b"HTTP/1.1 408") for _, data in received))


class ConnectionCapTests(TestCase):
    timeout = 60

    async def test_one_address_cannot_hold_more_than_its_cap(self) -> None:
        relay, port = start_relay(self, "--max-connections-per-ip", "10", "--trusted-proxy", "127.0.0.3")
        bystander = await Bystander(port, DOMAIN).start(self)
        baseline = open_fds(relay.popen.pid)
        clients = [await attempt(port, "127.0.0.2") for _ in range(50)]
        await sleep(0.3)
        kept = held(clients)
        self.assertEqual(len(kept), 10)
        dropped = [c for c in clients if c is not None and c.closed.called]
        self.assertEqual({bytes(c.received) for c in dropped}, {b""} if dropped else set())  # unanswered
        self.assertLessEqual(open_fds(relay.popen.pid), baseline + 10 + 2)
        await bystander.unaffected()  # 127.0.0.1 is another address

        # A trusted front proxy speaks for many clients: not capped.
        proxied = [await raw(port, f"GET /ping HTTP/1.1\r\nHost: {bystander.host}\r\n\r\n".encode(),
                             source="127.0.0.3") for _ in range(30)]
        answers = await DeferredList([c.until(b"\r\n\r\nok") for c in proxied])
        self.assertTrue(all(b"HTTP/1.1 200" in data for _, data in answers))
        for client in kept + proxied:
            client.transport.loseConnection()
        await DeferredList([c.closed for c in kept + proxied])

    async def test_at_the_file_limit_the_relay_keeps_answering(self) -> None:
        """Under a 256-file limit (so 128 public connections, a reserve of 128), 40 addresses open 8
        idle connections each: more than the process could hold.  The relay never runs out of
        descriptors, and new clients are served, each taking the place of the oldest idle one."""
        relay, port = start_relay(self, "--max-connections-per-ip", "8", nofile=256)
        bystander = await Bystander(port, DOMAIN).start(self)
        peak = FdPeak(self, relay.popen.pid)
        attackers = [await attempt(port, f"127.0.0.{10 + i % 40}") for i in range(320)]
        await sleep(0.3)
        self.assertLessEqual(len(held(attackers)), 128)
        second_wave = Deferred.fromCoroutine(self._wave(port, 100))
        await bystander.unaffected()
        await second_wave
        self.assertLess(peak.stop(), 256)
        self.assertNotIn("EMFILE", relay.output())
        self.assertIn("new ones replace the oldest idle one", relay.output())
        for client in held(attackers):
            client.transport.abortConnection()

    async def _wave(self, port: int, n: int) -> None:
        clients = [await attempt(port, f"127.0.1.{1 + i % 50}") for i in range(n)]
        await sleep(0.2)
        for client in held(clients):
            client.transport.abortConnection()


def default(table, name: str):
    return next(s.default for s in table if s.name == name)


class TimeoutOrderTests(TestCase):
    """D5: the gateway's answer to a slow upstream (a JSON-RPC error) reaches the public client
    before the relay gives up on the tunnel."""

    timeout = 60

    def test_the_defaults_are_ordered(self) -> None:
        self.assertGreater(default(RELAY_SETTINGS, "headers_timeout"), default(GATEWAY_SETTINGS, "upstream_timeout"))

    async def test_a_slow_upstream_gets_the_gateways_json_rpc_error(self) -> None:
        relay, port = start_relay(self, "--headers-timeout", "3")
        bystander = await Bystander(port, DOMAIN).start(self)
        bulk = Process(self, python(str(ROOT / "tests" / "support" / "bulk_server.py")), name="bulk")
        bulk_port = int(bulk.wait_for("LISTENING").split()[-1])
        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        gateway = Process(self, twist("mcpr", "--mcp", f"http://127.0.0.1:{bulk_port}/slow?ms=60000",
                                      "--upstream-timeout", "1", "--listen", "tcp:0:interface=127.0.0.1",
                                      "--relay-url", f"http://127.0.0.1:{port}", "--subdomain", "slow"),
                          name="gateway", cwd=str(cwd))
        gateway.wait_for("Tunnel: ")
        call = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                           "params": {"name": "slow", "arguments": {}}}).encode()
        client = await raw(port, (f"POST /mcp HTTP/1.1\r\nHost: slow.{DOMAIN}\r\nContent-Type: application/json\r\n"
                                  f"Accept: application/json, text/event-stream\r\nContent-Length: {len(call)}\r\n"
                                  "Connection: close\r\n\r\n").encode() + call)
        received = await client.closed
        head, _, body = received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 504"), received[:300])
        if b"transfer-encoding: chunked" in head.lower():
            body = body.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
        answer = json.loads(body)
        self.assertEqual((answer["id"], answer["error"]["code"]), (7, -32001))
        await bystander.unaffected()
