"""Several listeners on one port (`SO_REUSEPORT`): real sockets on loopback, then two real relays.

The listeners are built from endpoint strings, through the `reuseport:` parser
plugin (and `sni:...:reuseport=yes`), as the relay builds them.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
    serverFromString,
    wrapClientTLS,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import readBody
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from mcpr.common.service import DEFAULT_BACKLOG, listener
from mcpr.relay.reuseport import ReusePortEndpoint
from tests.relay.test_tls import BODY, Connections, Hello, Probe, certificate_directory
from tests.support.certificates import TRUST, escape
from tests.support.loopback import client_agent
from tests.support.processes import Process, free_port, twist

DOMAIN = "tunnel.test"


class Tagged(Protocol):
    """Says which listener accepted the connection, then closes it."""

    def connectionMade(self) -> None:
        self.transport.write(self.factory.tag)
        self.transport.loseConnection()


def tagged(tag: bytes) -> Factory:
    factory = Factory.forProtocol(Tagged)
    factory.tag = tag
    factory.noisy = False
    return factory


class Reader(Protocol):
    """The client side: `done` fires with all the server sent once the server has closed."""

    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:
        self.done.callback(self.data)


async def read_one(endpoint: IStreamClientEndpoint) -> bytes:
    reader = await connectProtocol(endpoint, Reader())
    return await reader.done


def backlog_of(port: int) -> list[int]:
    """The accept-queue size of each socket listening on `port`, as the kernel reports it (`ss`'s
    Send-Q column for a listener)."""
    if shutil.which("ss") is None:
        raise SkipTest("ss (iproute2) is not installed")
    lines = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    return sorted(int(line.split()[2]) for line in lines)


class ListenTests(TestCase):
    """Real listeners on loopback."""

    timeout = 10

    async def listen(self, description: str, tag: bytes = b"") -> IListeningPort:
        port = await serverFromString(reactor, description).listen(tagged(tag))
        self.addCleanup(port.stopListening)
        return port

    async def test_two_listeners_share_a_port_that_tcp_cannot_join(self) -> None:
        first = await self.listen("reuseport:0:interface=127.0.0.1")
        number = first.getHost().port
        second = await self.listen(f"reuseport:{number}:interface=127.0.0.1")
        self.assertEqual((second.getHost().host, second.getHost().port), ("127.0.0.1", number))
        # Without the option (TCP4ServerEndpoint sets SO_REUSEADDR only), the port is in use.
        refused = await self.assertFailure(TCP4ServerEndpoint(reactor, number, interface="127.0.0.1")
                                           .listen(tagged(b"")), CannotListenError)
        self.assertEqual(refused.socketError.errno, errno.EADDRINUSE)

    async def test_a_port_held_without_the_option_cannot_be_joined(self) -> None:
        """The kernel shares a port only among sockets that all asked for it: the relay's
        address-in-use line (with its advice) then applies as for any listener."""
        plain = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(tagged(b""))
        self.addCleanup(plain.stopListening)
        endpoint = serverFromString(reactor, f"reuseport:{plain.getHost().port}:interface=127.0.0.1")
        refused = await self.assertFailure(endpoint.listen(tagged(b"")), CannotListenError)
        self.assertEqual(refused.socketError.errno, errno.EADDRINUSE)

    async def test_the_kernel_spreads_connections(self) -> None:
        """32 connections, each from its own source port: both listeners get some (the chance that
        the kernel's hash sends all of them to one is 2**-31), each is accepted and answered."""
        first = await self.listen("reuseport:0:interface=127.0.0.1", b"A")
        await self.listen(f"reuseport:{first.getHost().port}:interface=127.0.0.1", b"B")
        client = TCP4ClientEndpoint(reactor, "127.0.0.1", first.getHost().port)
        answers = await gatherResults([Deferred.fromCoroutine(read_one(client)) for _ in range(32)])
        counts = Counter(answers)
        self.assertEqual(set(counts), {b"A", b"B"}, counts)
        self.assertEqual(sum(counts.values()), 32)

    async def test_ipv6(self) -> None:
        if not socket.has_ipv6:
            raise SkipTest("no IPv6")
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            raise SkipTest("no IPv6 loopback address") from None
        first = await self.listen("reuseport:0:interface=\\:\\:1", b"six")
        number = first.getHost().port
        await self.listen(f"reuseport:{number}:interface=\\:\\:1", b"six")
        self.assertEqual((first.getHost().type, first.getHost().host), ("TCP", "::1"))
        self.assertEqual(await read_one(TCP6ClientEndpoint(reactor, "::1", number)), b"six")

    async def test_backlog_reaches_the_socket(self) -> None:
        """As given, else the relay's default, which the relay's listeners add to the string (the
        endpoint's own default is the same)."""
        given = await self.listen("reuseport:0:interface=127.0.0.1:backlog=33")
        self.assertEqual(backlog_of(given.getHost().port), [33])

        announced: list[IListeningPort] = []
        service = listener("reuseport:0:interface=127.0.0.1", tagged(b""), announced.append, reactor,
                           where="--listen")
        service.startService()
        self.addCleanup(service.stopService)
        [port] = announced  # a socket is bound at once: nothing to wait for
        expected = min(DEFAULT_BACKLOG, int(Path("/proc/sys/net/core/somaxconn").read_text()))  # the kernel's cap
        self.assertEqual(backlog_of(port.getHost().port), [expected])

        default = await ReusePortEndpoint(reactor, 0, interface="127.0.0.1").listen(tagged(b""))
        self.addCleanup(default.stopListening)
        self.assertEqual(backlog_of(default.getHost().port), [expected])


class DescriptionTests(SynchronousTestCase):
    """Endpoint strings the relay refuses, in one line, before anything listens."""

    def test_wrong_descriptions(self) -> None:
        cases = {
            "reuseport": "expected reuseport:<port>",
            "reuseport:": "expected reuseport:<port>",
            "reuseport:port=": "expected reuseport:<port>",
            "reuseport:80:81": "expected reuseport:<port>",
            "reuseport:80:port=81": "port given twice in a reuseport: listener",
            "reuseport:http": "bad port 'http' in a reuseport: listener",
            "reuseport:99999": "bad port '99999' in a reuseport: listener",
            "reuseport:80:backlog=lots": "bad backlog 'lots' in a reuseport: listener",
            "reuseport:80:reuseaddr=no:key=x": "unknown option(s) key, reuseaddr in a reuseport: listener",
        }
        memory = MemoryReactor()
        for description, expected in cases.items():
            error = self.assertRaises(ValueError, serverFromString, memory, description)
            self.assertIn(expected, str(error), description)
            self.assertNotIn("\n", str(error), description)
        self.assertEqual(memory.adoptedPorts, [])

    def test_descriptions(self) -> None:
        for description in ("reuseport:8080", "REUSEPORT:port=8080:interface=127.0.0.1:backlog=10",
                            "reuseport:443:interface=\\:\\:"):
            self.assertIsInstance(serverFromString(MemoryReactor(), description), ReusePortEndpoint)

    def test_only_where_the_kernel_spreads_connections(self) -> None:
        """macOS and the BSDs take the option but do not balance connections: refused at startup
        rather than running idle processes."""
        self.patch(sys, "platform", "darwin")
        for make in (lambda: ReusePortEndpoint(MemoryReactor(), 8080),
                     lambda: serverFromString(MemoryReactor(), "reuseport:8080")):
            error = self.assertRaises(ValueError, make)
            self.assertIn("reuseport needs Linux", str(error))
            self.assertIn("this is darwin", str(error))
            self.assertNotIn("\n", str(error))


class SNITests(TestCase):
    """`sni:...:reuseport=yes`: the relay's TLS over a shared port."""

    timeout = 10

    async def test_two_tls_listeners_share_a_port(self) -> None:
        directory = escape(certificate_directory(self))
        sites = [Connections(Site(Hello())) for _ in range(2)]
        first = await self.listen(f"sni:{directory}:0:interface=127.0.0.1:reuseport=yes", sites[0])
        number = first.getHost().port
        await self.listen(f"sni:{directory}:{number}:interface=127.0.0.1:reuseport=YES", sites[1])
        refused = serverFromString(reactor, f"sni:{directory}:{number}:interface=127.0.0.1:reuseport=no")
        await self.assertFailure(refused.listen(sites[0]), CannotListenError)

        creator = optionsForClientTLS("abc.tunnel.example.test", trustRoot=TRUST)
        probe = await connectProtocol(wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", number)),
                                      Probe())
        self.addCleanup(lambda: Deferred.fromCoroutine(self.close(probe)))
        await probe.handshake  # verified for the name: the certificate came from the directory
        self.assertTrue((await probe.get()).endswith(BODY))

    def test_wrong_reuseport_value(self) -> None:
        """Refused before the directory is read (there is no `certs` here)."""
        error = self.assertRaises(ValueError, serverFromString, MemoryReactor(), "sni:certs:443:reuseport=maybe")
        self.assertEqual(str(error), "bad reuseport 'maybe' in the sni: listener of certs: expected yes or no")

    async def listen(self, description: str, site: Connections) -> IListeningPort:
        port = await serverFromString(reactor, description).listen(site)

        async def close() -> None:
            await port.stopListening()
            await site.whenIdle()

        self.addCleanup(lambda: Deferred.fromCoroutine(close()))
        return port

    async def close(self, probe: Probe) -> None:
        probe.transport.loseConnection()
        await probe.closed


class TwoRelaysTests(TestCase):
    """Two `twist mcpr-relay` processes with `--listen reuseport:PORT` on one PORT."""

    timeout = 60

    def setUp(self) -> None:
        self.port = free_port()
        self.relays = [Process(self, twist("mcpr-relay", "--domain", DOMAIN,
                                           "--listen", f"reuseport:{self.port}:interface=127.0.0.1",
                                           "--metrics", "tcp:0:interface=127.0.0.1"), name=f"relay{i}")
                       for i in (1, 2)]
        self.metrics = []
        for relay in self.relays:
            relay.wait_for(f"listening on 127.0.0.1:{self.port}")
            line = relay.wait_for("metrics on http://")
            self.metrics.append(re.search(r"http://\S+/metrics", line).group(0))
        self.agent = client_agent(self)  # not persistent: a new connection, so a new draw, each time

    async def request(self, url: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
        response = await self.agent.request(b"GET", url.encode(), Headers({b"host": [host.encode()]}))
        return response.code, await readBody(response)

    async def failed_requests(self, metrics: str) -> float:
        """The relay's count of 5xx answers (the requests for a tunnel it does not have)."""
        _, text = await self.request(metrics)
        match = re.search(r'^mcpr_relay_requests_total\{status_class="5xx"\} (\S+)$', text.decode(), re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    async def test_both_serve_the_port_and_one_is_enough(self) -> None:
        front = f"http://127.0.0.1:{self.port}"
        for _ in range(32):
            code, body = await self.request(f"{front}/", host=f"nosuch.{DOMAIN}")
            self.assertEqual((code, body.strip()), (502, b"tunnel not found"))
        counts = [await self.failed_requests(url) for url in self.metrics]
        self.assertEqual(sum(counts), 32, counts)
        self.assertNotIn(0, counts, "one relay got every connection")

        self.relays[0].popen.send_signal(signal.SIGKILL)  # a crash: no drain, the socket just goes
        self.relays[0].popen.wait()
        for _ in range(10):
            code, body = await self.request(f"{front}/healthz")
            self.assertEqual((code, json.loads(body)["status"]), (200, "ok"))
