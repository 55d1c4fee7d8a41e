"""Whatever a relay sends, the gateway's tunnel never stays half-dead: it closes and reconnects (D7).

The relay is a scripted in-memory WebSocket server (tests/gateway/test_tunnel.py's), so a test can
answer the registration with anything and then speak broken HTTP/2 into the tunnel.
"""

from __future__ import annotations

import json
import types
from typing import Any

import h2.config
import h2.connection
import txaio
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.test.iosim import ConnectionCompleter, IOPump
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from mcpr.common.protocol import CloseCode
from mcpr.gateway.tunnel import Backoff, TunnelClient, TunnelProtocol
from tests.gateway.test_tunnel import PORT, Events, MemoryRelay, MemoryRelayFactory


def answer_with(payload: bytes) -> Any:
    return lambda relay, message: relay.sendMessage(payload, isBinary=False)


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        return b"hello"


class BrokenRequests(Site):
    """A site whose requests cannot even be built: an exception inside the HTTP/2 machinery."""

    def requestFactory(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        raise RuntimeError("cannot build a request")


class TunnelFailureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.patch(txaio.config, "loop", self.clock)  # Autobahn's timers
        self.relay = MemoryRelayFactory(self.clock)
        self.clock.listenTCP(PORT, self.relay)
        self.tcp = ConnectionCompleter(self.clock)
        self.events = Events()

    def start(self, site: Site | None = None) -> TunnelClient:
        client = TunnelClient(self.clock, f"http://127.0.0.1:{PORT}", "token", None, site or Site(Hello()),
                              self.events, lambda url: None, backoff=Backoff(initial=1, factor=2, cap=8, jitter=0))
        client.startService()
        self.addCleanup(client.stopService)
        return client

    def accept_tcp(self) -> IOPump:
        pump = self.tcp.succeedOnce()
        assert pump is not None, "no connection attempt to accept"
        pump.flush()
        return pump

    def h2_client(self) -> h2.connection.H2Connection:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        return client

    def assert_reconnects(self, client: TunnelClient) -> None:
        self.assertEqual(self.events.states()[-1], "reconnecting")
        self.assertTrue(client.running)
        self.clock.advance(1)
        self.accept_tcp()
        self.assertEqual(client.state, "connected")
        self.assertEqual(len(self.relay.connections), 2)

    def test_broken_http2_from_the_relay_closes_and_reconnects(self) -> None:
        client = self.start()
        pump = self.accept_tcp()
        relay: MemoryRelay = self.relay.connections[-1]
        relay.sendMessage(b"this is not an HTTP/2 preface" * 3, isBinary=True)
        pump.flush()
        self.assertEqual(self.relay.closes, [1000])  # after a GOAWAY
        self.assertEqual(self.events.of("disconnected", "code"), [1000])
        self.assert_reconnects(client)

    def test_a_failure_inside_the_http2_server_closes_with_1011_and_reconnects(self) -> None:
        client = self.start(BrokenRequests(Hello()))
        pump = self.accept_tcp()
        relay: MemoryRelay = self.relay.connections[-1]
        h2_relay = self.h2_client()
        h2_relay.send_headers(1, [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"),
                                  (b":authority", b"a")], end_stream=True)
        relay.sendMessage(h2_relay.data_to_send(), isBinary=True)
        pump.flush()
        self.clock.advance(0)
        self.assertEqual(self.relay.closes, [CloseCode.INTERNAL_ERROR])
        self.assertEqual(self.events.of("disconnected", "code"), [CloseCode.INTERNAL_ERROR])
        self.assertIn("cannot build a request", self.events.of("disconnected", "reason")[0])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assert_reconnects(client)

    def test_a_relay_that_stops_answering_the_close_is_dropped(self) -> None:
        client = self.start(BrokenRequests(Hello()))
        pump = self.accept_tcp()
        h2_relay = self.h2_client()
        h2_relay.send_headers(1, [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"),
                                  (b":authority", b"a")], end_stream=True)
        self.relay.connections[-1].sendMessage(h2_relay.data_to_send(), isBinary=True)
        pump.pump()  # the gateway answers with its close frame...
        pump.clientIO.getOutBuffer()  # ... which is lost: the relay hears nothing
        self.clock.advance(6)  # closeHandshakeTimeout (5 s)
        pump.flush()
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(self.events.states()[-2:], ["disconnected", "reconnecting"])
        self.assert_reconnects(client)

    def test_malformed_registration_answers_are_retried(self) -> None:
        """A relay that answers with odd types (an honest but buggy one) raised out of onMessage."""
        for answer in (b'{"url": 5}', b'{"url": "https://a", "subdomain": ["a"]}', b'{"subdomains": 7}',
                       b'{"subdomains": [1, 2]}', b'[]'):
            self.relay.answer = answer_with(answer)
            client = self.start()
            self.accept_tcp()
            self.assertEqual(client.state, "reconnecting", answer)
            self.assertTrue(client.running)
            self.assertEqual(self.flushLoggedErrors(), [])
            client.stopService()
        self.assertEqual(self.events.states().count("connected"), 0)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=8)


class Owner:
    def __init__(self) -> None:
        self.registered: list = []
        self.closed: list = []

    def tunnel_made(self, tunnel: Any) -> None:
        pass

    def tunnel_registered(self, url: Any) -> None:
        self.registered.append(url)

    def tunnel_closed(self, code: Any, reason: str, *, registered: bool, final: bool) -> None:
        self.closed.append(code)


class Unconnected(TunnelProtocol):
    """A TunnelProtocol with no socket under it, recording what it would send or do."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list = []
        self.ended: list = []
        self.state = self.STATE_OPEN

    def sendMessage(self, payload: bytes, isBinary: bool = False, *args: Any, **kwargs: Any) -> None:
        self.sent.append(payload)

    def sendClose(self, code: Any = None, reason: Any = None) -> None:
        self.ended.append(code)

    def sendCloseFrame(self, code: Any = None, reasonUtf8: Any = None, isReply: bool = False) -> None:
        self.ended.append(code)

    def dropConnection(self, abort: bool = False) -> None:
        self.ended.append("drop")


class RegistrationAnswerFuzzTests(SynchronousTestCase):
    @given(st.one_of(
        st.fixed_dictionaries({"url": json_values}, optional={"subdomain": json_values}),
        st.fixed_dictionaries({"subdomains": json_values}),
        json_values,
        st.binary(max_size=20)))
    def test_no_registration_answer_raises(self, answer: Any) -> None:
        """Whatever the relay answers, onMessage does not raise: the tunnel starts, or the socket
        is ended (and the client then retries), or the message waits for a real answer."""
        tunnel = Unconnected()
        owner = Owner()
        tunnel.factory = types.SimpleNamespace(  # type: ignore[assignment]
            subdomain="a", site=Site(Hello()), reactor=MemoryReactorClock(), owner=owner,
            choose=lambda patterns: Deferred())
        payload = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        tunnel.onMessage(payload, False)
        if owner.registered:
            self.assertEqual(tunnel.ended, [])
            self.assertIsInstance(owner.registered[0], str)
        self.assertEqual(self.flushLoggedErrors(), [])
