"""The gateway's HTTP/2 server end, driven in memory by an h2 client as the relay would."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
from h2.settings import SettingCodes
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from mcpr.common import protocol as wire
from mcpr.gateway.h2_server import serve_streams


class FakeWebSocket:
    """What serve_streams writes into: binary messages, and how the socket was ended."""

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.messages: list[bytes] = []
        self.ended: list[str] = []

    def sendMessage(self, payload: bytes, isBinary: bool) -> None:
        assert isBinary
        self.messages.append(payload)

    def sendClose(self, code: int) -> None:
        self.ended.append(f"close {code}")

    def dropConnection(self, abort: bool) -> None:
        self.ended.append("drop")

    def take(self) -> bytes:
        data, self.messages = b"".join(self.messages), []
        return data


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        return b"hello " + request.path


class ServeStreamsTests(SynchronousTestCase):
    """serve_streams: the gateway's HTTP/2 settings, a request served by its Site, no idle timeout."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.websocket = FakeWebSocket()
        self.server = serve_streams(self.websocket, Site(Hello()), self.clock)
        self.relay = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.relay.initiate_connection()
        self.events = self.exchange()

    def exchange(self) -> list:
        self.server.dataReceived(self.relay.data_to_send())
        self.clock.advance(0)
        return self.relay.receive_data(self.websocket.take())

    def test_settings_and_connection_window(self) -> None:
        settings = next(e for e in self.events if isinstance(e, h2.events.RemoteSettingsChanged))
        self.assertEqual(settings.changed_settings[SettingCodes.MAX_CONCURRENT_STREAMS].new_value, wire.MAX_STREAMS)
        self.assertEqual(settings.changed_settings[SettingCodes.INITIAL_WINDOW_SIZE].new_value, wire.STREAM_WINDOW)
        self.assertEqual(self.relay.outbound_flow_control_window,
                         wire.CONNECTION_WINDOW)

    def test_a_request_is_served_by_the_site(self) -> None:
        self.relay.send_headers(1, [(":method", "GET"), (":path", "/there"), (":scheme", "https"),
                                    (":authority", "a.example")], end_stream=True)
        events = self.exchange()
        for _ in range(5):  # twisted.web sends the body from a reactor call
            self.clock.advance(0)
            events += self.relay.receive_data(self.websocket.take())
        headers = dict(next(e for e in events if isinstance(e, h2.events.ResponseReceived)).headers)
        self.assertEqual(headers[b":status"], b"200")
        self.assertEqual(b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived)), b"hello /there")

    def test_no_idle_timeout(self) -> None:
        """Liveness is the WebSocket pings' job: an idle tunnel (or an SSE stream) is not closed.
        (TimeoutMixin would time it out on the global reactor, so the setting itself is checked.)"""
        self.assertIsNone(self.server.timeOut)
