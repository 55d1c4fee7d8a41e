"""The relay process in operation: TLS with SNI, metrics, draining on SIGTERM, reloading on SIGHUP."""

from __future__ import annotations

import re
import signal
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from tests.support.certificates import TRUST, escape, full_chain, leaf, write
from tests.support.legacy_gateway import LegacyGateway
from tests.support.loopback import client_agent, sleep
from tests.support.processes import Process, twist

DOMAIN = "tunnel.example.test"


@implementer(IAgentEndpointFactory)
class _ToLoopback:
    """Connect every https URL to the relay on 127.0.0.1, verifying the URL's host name."""

    def __init__(self, port: int) -> None:
        self.port = port

    def endpointForURI(self, uri):
        creator = optionsForClientTLS(uri.host.decode(), trustRoot=TRUST)
        return wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", self.port))


def port_after(process: Process, needle: str) -> int:
    return int(re.search(r"127\.0\.0\.1:(\d+)", process.wait_for(needle)).group(1))


class RelayOperationsTests(TestCase):
    timeout = 60

    def start(self, *args: str, cwd: str | None = None) -> Process:
        relay = Process(self, twist("mcpr-relay", "--domain", DOMAIN, *args), name="relay", cwd=cwd)
        return relay

    def https_agent(self, port: int) -> Agent:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        return Agent.usingEndpointFactory(reactor, _ToLoopback(port), pool)

    async def served_serial(self, agent: Agent, host: str) -> tuple[int, bytes]:
        response = await agent.request(b"GET", f"https://{host}/healthz".encode())
        body = await readBody(response)
        return response.code, body

    def test_tls_sni_wildcard_and_renewal_on_sighup(self):
        async def t():
            certs = Path(self.mktemp()).resolve() / "certs"
            certs.mkdir(parents=True)
            write(certs, "wildcard.pem", full_chain(leaf(f"*.{DOMAIN}")))
            write(certs, "apex.pem", full_chain(leaf(DOMAIN)))
            relay = self.start("--listen", f"tls:{escape(certs)}:port=0:interface=127.0.0.1",
                               "--listen", "tcp:0:interface=127.0.0.1")
            relay.wait_for("listening on", 20)
            ports = [int(p) for p in re.findall(r"listening on 127\.0\.0\.1:(\d+)", relay.output())]
            tls_port, plain_port = ports[0], ports[1]
            gw = LegacyGateway(plain_port, "tok", "demo")
            self.addCleanup(lambda: Deferred.fromCoroutine(gw.close()))
            await gw.connect()
            agent = self.https_agent(tls_port)

            # Two names in one run: the apex (relay pages) and a tunnel under the wildcard.
            code, _ = await self.served_serial(agent, DOMAIN)
            self.assertEqual(code, 200)
            pending = Deferred.fromCoroutine(self._get(agent, f"https://demo.{DOMAIN}/mcp"))
            request = await gw.requests.get()
            self.assertEqual(request["headers"]["x-forwarded-proto"], "https")
            gw.respond(request, 200, b"over tls")
            self.assertEqual(await pending, (200, b"over tls"))

            # Renewal: replace the wildcard, SIGHUP, and new handshakes get the new certificate.
            renewed = leaf(f"*.{DOMAIN}", days=90)
            write(certs, "wildcard.pem", full_chain(renewed))
            relay.popen.send_signal(signal.SIGHUP)
            for _ in range(100):
                if f"serial {renewed[1].serial_number:x}" in relay.output():
                    break
                await sleep(0.05)
            serial = await self._peer_serial(tls_port, f"x.{DOMAIN}")
            self.assertEqual(serial, renewed[1].serial_number)
            self.assertIsNone(relay.popen.poll(), "SIGHUP must not kill the relay")
        return Deferred.fromCoroutine(t())

    async def _get(self, agent: Agent, url: str) -> tuple[int, bytes]:
        response = await agent.request(b"GET", url.encode())
        return response.code, await readBody(response)

    async def _peer_serial(self, port: int, name: str) -> int:
        got: Deferred = Deferred()

        @implementer(IHandshakeListener)
        class Peek(Protocol):
            def handshakeCompleted(self):
                got.callback(self.transport.getPeerCertificate().to_cryptography().serial_number)
                self.transport.loseConnection()

            def connectionLost(self, reason):
                lost.callback(None)

        lost: Deferred = Deferred()
        endpoint = wrapClientTLS(optionsForClientTLS(name, trustRoot=TRUST),
                                 TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        await endpoint.connect(Factory.forProtocol(Peek))
        serial = await got
        await lost
        return serial

    def test_metrics_drain_and_revocation(self):
        async def t():
            folder = Path(self.mktemp()).resolve()
            folder.mkdir()
            config = folder / "relay.toml"
            config.write_text('mode = "relay"\n[relay]\ndomain = "tunnel.example.test"\ndrain_timeout = 10\n'
                              '[[relay.tokens]]\ntoken = "keep"\nsubdomains = ["a"]\n'
                              '[[relay.tokens]]\ntoken = "drop"\nsubdomains = ["b"]\n')
            relay = self.start("--config", str(config), "--listen", "tcp:0:interface=127.0.0.1",
                               "--metrics", "tcp:0:interface=127.0.0.1")
            port = port_after(relay, "listening on")
            metrics_port = port_after(relay, "metrics on")
            a, b = LegacyGateway(port, "keep", "a"), LegacyGateway(port, "drop", "b")
            for gw in (a, b):
                self.addCleanup(lambda gw=gw: Deferred.fromCoroutine(gw.close()))
                await gw.connect()
            agent = client_agent(self)

            # Revocation: drop token "drop" from the file, SIGHUP; its tunnel is closed, the other stays.
            config.write_text('mode = "relay"\n[relay]\ndomain = "tunnel.example.test"\ndrain_timeout = 10\n'
                              '[[relay.tokens]]\ntoken = "keep"\nsubdomains = ["a"]\n')
            relay.popen.send_signal(signal.SIGHUP)
            self.assertEqual(await b.closed, (4001, "token revoked"))
            self.assertFalse(a.closed.called)

            # Metrics.
            pending = agent.request(b"GET", f"http://127.0.0.1:{port}/x".encode(),
                                    Headers({b"host": [f"a.{DOMAIN}".encode()]}))
            a.respond(await a.requests.get(), 200, b"ok")
            await readBody(await pending)
            response = await agent.request(b"GET", f"http://127.0.0.1:{metrics_port}/metrics".encode())
            text = (await readBody(response)).decode()
            self.assertIn("mcpr_relay_tunnels_connected 1.0", text)
            self.assertIn('mcpr_relay_registrations_total{result="ok"} 2.0', text)
            self.assertIn('mcpr_relay_requests_total{status_class="2xx"} 1.0', text)
            self.assertRegex(text, r'mcpr_relay_bytes_total\{direction="out"\} 2\.0')

            # Drain: a request in flight when SIGTERM arrives still completes; then tunnels get 1001.
            in_flight = agent.request(b"GET", f"http://127.0.0.1:{port}/slow".encode(),
                                      Headers({b"host": [f"a.{DOMAIN}".encode()]}))
            request = await a.requests.get()
            relay.popen.send_signal(signal.SIGTERM)
            await sleep(0.5)
            self.assertIsNone(relay.popen.poll(), "the relay waits for in-flight requests")
            a.respond(request, 200, b"finished during drain")
            response = await in_flight
            self.assertEqual(await readBody(response), b"finished during drain")
            code, _ = await a.closed
            self.assertEqual(code, 1001)
            for _ in range(100):
                if relay.popen.poll() is not None:
                    break
                await sleep(0.05)
            self.assertIn(relay.popen.returncode, (0, -signal.SIGTERM))
        return Deferred.fromCoroutine(t())

