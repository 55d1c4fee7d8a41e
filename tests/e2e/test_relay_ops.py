"""The relay process in operation: TLS with SNI, metrics, draining on SIGTERM, reloading on SIGHUP.

The relay's log is a file, so the only signal of a reload it gives is a line
there: `Process.line` waits for it.  Everything else is awaited on the sockets,
or on the process's exit.
"""

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
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from tests.support.certificates import TRUST, escape, full_chain, leaf, write
from tests.support.legacy_gateway import Closed, LegacyGateway
from tests.support.loopback import client_agent, sleep
from tests.support.processes import Process, start_relay, twist

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


def relay_toml(*tokens: str) -> str:
    """A relay config file with one static token `t` for subdomain `t[0]` per token."""
    text = f'mode = "relay"\n[relay]\ndomain = "{DOMAIN}"\ndrain_timeout = 10\n'
    return text + "".join(f'[[relay.tokens]]\ntoken = "{t}"\nsubdomains = ["{t[0]}"]\n' for t in tokens)


class RelayOperationsTests(TestCase):
    """The relay process under operation: TLS with SNI, SIGHUP, metrics, SIGTERM."""

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

    async def test_tls_sni_wildcard_and_renewal_on_sighup(self) -> None:
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
        await relay.line(f"serial {renewed[1].serial_number:x}", 10)
        serial = await self._peer_serial(tls_port, f"x.{DOMAIN}")
        self.assertEqual(serial, renewed[1].serial_number)
        self.assertIsNone(relay.popen.poll(), "SIGHUP must not kill the relay")

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

    def static_relay(self, *tokens: str, metrics: bool = False) -> tuple[Process, Path, int]:
        """A relay with static `tokens` from its config file: (process, config file, public port)."""
        folder = Path(self.mktemp()).resolve()
        folder.mkdir()
        config = folder / "relay.toml"
        config.write_text(relay_toml(*tokens))
        extra = ("--metrics", "tcp:0:interface=127.0.0.1") if metrics else ()
        relay, port = start_relay(self, DOMAIN, "--config", str(config), *extra)
        return relay, config, port

    async def gateway(self, port: int, token: str) -> LegacyGateway:
        gw = LegacyGateway(port, token, token[0])
        self.addCleanup(lambda: Deferred.fromCoroutine(gw.close()))
        await gw.connect()
        return gw

    async def test_revocation_on_sighup(self) -> None:
        """Drop token "bdrop" from the file and SIGHUP: its tunnel is closed, the other stays."""
        relay, config, port = self.static_relay("akeep", "bdrop")
        keep, drop = await self.gateway(port, "akeep"), await self.gateway(port, "bdrop")

        config.write_text(relay_toml("akeep"))
        relay.popen.send_signal(signal.SIGHUP)

        self.assertEqual(await drop.closed, (4001, "token revoked"))
        self.assertFalse(keep.closed.called)
        pending = client_agent(self).request(b"GET", f"http://127.0.0.1:{port}/x".encode(),
                                             Headers({b"host": [f"a.{DOMAIN}".encode()]}))
        keep.respond(await keep.requests.get(), 200, b"still here")
        self.assertEqual(await readBody(await pending), b"still here")

    async def test_metrics(self) -> None:
        """After one registration, one refusal and one request, the counters say so."""
        relay, _, port = self.static_relay("akeep", metrics=True)
        metrics_port = port_after(relay, "metrics on")
        gw = await self.gateway(port, "akeep")
        refused = LegacyGateway(port, "wrong", "a")
        await self.assertFailure(Deferred.fromCoroutine(refused.connect()), Closed)
        agent = client_agent(self)

        pending = agent.request(b"GET", f"http://127.0.0.1:{port}/x".encode(),
                                Headers({b"host": [f"a.{DOMAIN}".encode()]}))
        gw.respond(await gw.requests.get(), 200, b"ok")
        await readBody(await pending)

        response = await agent.request(b"GET", f"http://127.0.0.1:{metrics_port}/metrics".encode())
        text = (await readBody(response)).decode()
        self.assertIn("mcpr_relay_tunnels_connected 1.0", text)
        self.assertIn('mcpr_relay_registrations_total{result="ok"} 1.0', text)
        self.assertIn('mcpr_relay_registrations_total{result="auth_failed"} 1.0', text)
        self.assertIn('mcpr_relay_requests_total{status_class="2xx"} 1.0', text)
        self.assertIn("mcpr_relay_in_flight 0.0", text)
        self.assertRegex(text, r'mcpr_relay_bytes_total\{direction="out"\} 2\.0')

    async def test_drain_on_sigterm(self) -> None:
        """A request in flight when SIGTERM arrives still completes; then tunnels get 1001 and the relay exits."""
        relay, _, port = self.static_relay("akeep")
        gw = await self.gateway(port, "akeep")
        in_flight = client_agent(self).request(b"GET", f"http://127.0.0.1:{port}/slow".encode(),
                                               Headers({b"host": [f"a.{DOMAIN}".encode()]}))
        request = await gw.requests.get()

        relay.popen.send_signal(signal.SIGTERM)
        await relay.line("draining: 1 request(s) in flight", 10)
        await sleep(0.5)  # the thing under test: the relay does not exit, nor close the tunnel, meanwhile
        self.assertIsNone(relay.popen.poll(), "the relay waits for in-flight requests")
        self.assertFalse(gw.closed.called)
        gw.respond(request, 200, b"finished during drain")

        response = await in_flight
        self.assertEqual(await readBody(response), b"finished during drain")
        code, _ = await gw.closed
        self.assertEqual(code, 1001)
        returncode = await deferToThread(relay.popen.wait, 10)
        self.assertIn(returncode, (0, -signal.SIGTERM))
