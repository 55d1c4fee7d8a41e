"""The gateway's HTTP/2 server end, driven in memory by an h2 client as the relay would."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
from h2.settings import SettingCodes
from priority import DeadlockError, DuplicateStreamError, MissingStreamError, TooManyStreamsError
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from mcpr.common import protocol as wire
from mcpr.gateway.h2_server import _SendableStreams, serve_streams


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

    def fail_tunnel(self, reason: str) -> None:
        self.ended.append(f"fail {reason}")

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


class Many(Resource):
    """Answers /hang only when told (so streams pile up), /big with more than a stream window,
    /odd-headers with fields HTTP/2 cannot carry, and anything else at once."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hanging: list = []

    def render_GET(self, request) -> bytes | int:
        if request.path == b"/hang":
            self.hanging.append(request)
            return NOT_DONE_YET
        if request.path == b"/big":
            return b"x" * (3 * 65535)
        if request.path == b"/window":  # the relay's initial window, but 4 bytes
            request.write(b"x" * (65535 - 4))
            self.hanging.append(request)
            return NOT_DONE_YET
        if request.path == b"/odd-headers":
            request.responseHeaders.setRawHeaders(b"te", [b"gzip"])
            request.responseHeaders.setRawHeaders(b"x-kept", [b"yes"])
        return b"hello " + request.path

    def release(self) -> None:
        for request in self.hanging:
            request.write(b"done")
            request.finish()
        self.hanging = []


def get(path: bytes) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"GET"), (b":path", path), (b":scheme", b"https"), (b":authority", b"a.example")]


class TunnelConnectionTests(SynchronousTestCase):
    """What the tunnel needs beyond Twisted's H2Connection (S6, D7)."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.websocket = FakeWebSocket()
        self.resource = Many()
        self.server = serve_streams(self.websocket, Site(self.resource), self.clock)
        self.relay = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.relay.initiate_connection()
        self.exchange()

    def exchange(self) -> list:
        self.server.dataReceived(self.relay.data_to_send())
        for _ in range(5):
            self.clock.advance(0)
        return self.relay.receive_data(self.websocket.take())

    def statuses(self, events: list) -> dict[int, bytes]:
        return {e.stream_id: dict(e.headers)[b":status"] for e in events if isinstance(e, h2.events.ResponseReceived)}

    def body(self, events: list, stream_id: int) -> bytes:
        return b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id)

    def test_as_many_concurrent_streams_as_advertised(self) -> None:
        """Twisted's priority tree refused the 1,000th stream (TooManyStreamsError) and the tunnel
        died; every advertised slot now holds a stream, and all are answered."""
        ids = []
        for _ in range(wire.MAX_STREAMS):
            ids.append(self.relay.get_next_available_stream_id())
            self.relay.send_headers(ids[-1], get(b"/hang"), end_stream=True)
        self.exchange()
        self.assertEqual(len(self.resource.hanging), wire.MAX_STREAMS)
        self.resource.release()
        events = self.exchange()
        self.assertEqual(set(self.statuses(events).values()), {b"200"})
        self.assertEqual(len(self.statuses(events)), wire.MAX_STREAMS)
        self.assertEqual(self.websocket.ended, [])
        # ... and the slots are free again.
        follow_up = self.relay.get_next_available_stream_id()
        self.relay.send_headers(follow_up, get(b"/next"), end_stream=True)
        self.assertEqual(self.statuses(self.exchange()), {follow_up: b"200"})

    def test_public_clients_leaving_en_masse_do_not_end_the_tunnel(self) -> None:
        """The relay resets a stream per public client that leaves; Twisted's Rapid Reset budget
        (1,000 at once, then 33 a second) sent GOAWAY, cutting every other stream."""
        lost: list = []
        for _ in range(3):
            ids = []
            for _ in range(wire.MAX_STREAMS):
                ids.append(self.relay.get_next_available_stream_id())
                self.relay.send_headers(ids[-1], get(b"/hang"), end_stream=True)
            self.exchange()
            for request in self.resource.hanging:
                request.notifyFinish().addErrback(lost.append)
            self.resource.hanging = []
            for stream_id in ids:
                self.relay.reset_stream(stream_id)
            events = self.exchange()
            self.assertFalse(any(isinstance(e, h2.events.ConnectionTerminated) for e in events))
        self.assertEqual(len(lost), 3 * wire.MAX_STREAMS, "each request saw its client leave")
        follow_up = self.relay.get_next_available_stream_id()
        self.relay.send_headers(follow_up, get(b"/next"), end_stream=True)
        self.assertEqual(self.statuses(self.exchange()), {follow_up: b"200"})
        self.assertEqual(self.websocket.ended, [])

    def test_priority_signals_are_ignored(self) -> None:
        """PRIORITY frames for streams that never open no longer fill the tree until it overflows."""
        for stream_id in range(1, 2 * wire.MAX_STREAMS, 2):
            self.relay.prioritize(stream_id, weight=200, depends_on=stream_id + 2)
        self.exchange()
        self.relay.send_headers(1, get(b"/after"), end_stream=True)
        events = self.exchange()
        self.assertEqual(self.statuses(events), {1: b"200"})
        self.assertEqual(self.websocket.ended, [])

    def test_connect_is_answered_501_and_the_tunnel_lives(self) -> None:
        """A CONNECT (no :path) made Twisted raise AttributeError and the whole tunnel dropped."""
        self.relay.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"a.example:443")])
        self.relay.send_data(1, b"tunnelled bytes")
        events = self.exchange()
        self.assertEqual(self.statuses(events), {1: b"501"})
        self.assertTrue(any(isinstance(e, h2.events.StreamReset) and e.stream_id == 1 for e in events))
        self.relay.send_headers(3, get(b"/after"), end_stream=True)
        self.assertEqual(self.statuses(self.exchange()), {3: b"200"})
        self.assertEqual(self.websocket.ended, [])

    def test_data_of_an_answered_connect_goes_back_to_the_connection_window(self) -> None:
        """Bytes that came with a refused CONNECT are not lost from the tunnel's window."""
        chunk = b"x" * self.relay.max_outbound_frame_size
        for _ in range(6):
            stream_id = self.relay.get_next_available_stream_id()
            self.relay.send_headers(stream_id, [(b":method", b"CONNECT"), (b":authority", b"a.example:443")])
            for _ in range(wire.STREAM_WINDOW // len(chunk)):
                self.relay.send_data(stream_id, chunk)
            self.exchange()
        # h2 acknowledges in batches, so up to half the window may still wait for an update.
        self.assertGreaterEqual(self.relay.outbound_flow_control_window, wire.CONNECTION_WINDOW // 2)
        self.assertEqual(self.websocket.ended, [])

    def test_a_stream_out_of_window_waits_without_spinning(self) -> None:
        """Twisted's send loop spun through callLater(0) while a stream had data but no window,
        that is for as long as a public client did not read; now the stream waits for its window."""
        turns = []
        send = self.server._sendPrioritisedData

        def counted(*args) -> None:
            turns.append(1)
            if len(turns) > 1000:
                raise AssertionError("the send loop spins")
            send(*args)

        self.server._sendPrioritisedData = counted
        self.relay.send_headers(1, get(b"/big"), end_stream=True)
        events = self.exchange()
        self.assertEqual(len(self.body(events, 1)), 65535)  # the relay's initial stream window
        turns.clear()
        for _ in range(10):
            self.clock.advance(1)
        self.assertLess(len(turns), 5)
        # The relay's WINDOW_UPDATE wakes it.
        for _ in range(2):
            self.relay.acknowledge_received_data(65535, 1)
            self.relay.increment_flow_control_window(65535)
            events += self.exchange()
        self.assertEqual(len(self.body(events, 1)), 3 * 65535)
        self.assertTrue(any(isinstance(e, h2.events.StreamEnded) for e in events))

    def test_a_write_that_fills_the_window_exactly(self) -> None:
        """The data went out at once and left the window at 0 with nothing queued: such a stream
        was taken for one waiting on its window, woken by the WINDOW_UPDATE, and the send loop
        popped its empty queue, ending the tunnel (a 100 MiB download did it every time)."""
        self.relay.send_headers(1, get(b"/window"), end_stream=True)
        self.assertEqual(len(self.body(self.exchange(), 1)), 65535 - 4)
        [request] = self.resource.hanging
        request.write(b"last")  # sent at once: the window is 0 and nothing waits
        self.assertEqual(self.body(self.exchange(), 1), b"last")
        self.relay.acknowledge_received_data(65535, 1)
        self.relay.increment_flow_control_window(65535)
        self.exchange()
        self.assertEqual(self.websocket.ended, [])
        request.finish()
        self.assertTrue(any(isinstance(e, h2.events.StreamEnded) for e in self.exchange()))

    def test_new_settings_reopen_a_waiting_stream(self) -> None:
        self.relay.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})
        self.exchange()
        self.relay.send_headers(1, get(b"/there"), end_stream=True)
        self.assertEqual(self.body(self.exchange(), 1), b"")
        self.relay.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 65535})
        self.assertEqual(self.body(self.exchange(), 1), b"hello /there")

    def test_headers_http2_cannot_carry_are_dropped(self) -> None:
        """h2 raised on `TE: gzip` while HPACK-encoding, after earlier fields had entered the
        encoder's table: the relay's decoder was out of step and the next response broke."""
        self.relay.send_headers(1, get(b"/odd-headers"), end_stream=True)
        events = self.exchange()
        headers = dict(next(e for e in events if isinstance(e, h2.events.ResponseReceived)).headers)
        self.assertEqual((headers[b":status"], headers[b"x-kept"], b"te" in headers), (b"200", b"yes", False))
        self.flushLoggedErrors()
        self.relay.send_headers(3, get(b"/next"), end_stream=True)
        self.assertEqual(self.body(self.exchange(), 3), b"hello /next")

    def test_relay_input_that_breaks_http2_ends_the_connection_cleanly(self) -> None:
        self.server.dataReceived(b"\x00\x00\x08\x06\x00\x00\x00\x00\x01" + b"\x00" * 8)  # PING on stream 1
        self.assertEqual(self.websocket.ended, ["close 1000"])
        goaway = [e for e in self.relay.receive_data(self.websocket.take()) if isinstance(e, h2.events.ConnectionTerminated)]
        self.assertEqual(len(goaway), 1)

    def test_a_failure_inside_closes_the_tunnel_instead_of_raising(self) -> None:
        """Any exception in input handling left the socket open around a broken connection."""
        self.relay.send_headers(1, get(b"/hang"), end_stream=True)
        self.exchange()
        lost = []
        self.resource.hanging[0].notifyFinish().addErrback(lost.append)
        self.patch(self.server, "_requestReceived", lambda event: 1 / 0)
        self.relay.send_headers(3, get(b"/boom"), end_stream=True)
        self.exchange()  # does not raise
        self.assertEqual(self.websocket.ended, ["fail gateway HTTP/2 failure: division by zero"])
        self.clock.advance(0)
        self.assertEqual(len(lost), 1, "the other streams' requests saw their client leave")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.server.dataReceived(self.relay.data_to_send())  # later input is ignored
        self.server.connectionLost(Failure(ConnectionLost()))  # and the socket's close is harmless

    def test_a_failure_in_the_send_loop_closes_the_tunnel(self) -> None:
        """The send loop runs from the reactor: a failure there stopped every response for good."""
        self.patch(self.server.conn, "send_data", lambda *args, **kwargs: 1 / 0)
        self.relay.send_headers(1, get(b"/there"), end_stream=True)
        self.exchange()
        self.assertEqual(self.websocket.ended, ["fail gateway HTTP/2 failure: division by zero"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class _Sendable:
    """The one thing the scheduler asks of its connection: which streams have window."""

    def __init__(self) -> None:
        self.no_window: set[int] = set()

    def can_send(self, stream_id: int) -> bool:
        return stream_id not in self.no_window


class SendableStreamsTests(SynchronousTestCase):
    """The send loop's round-robin scheduler, in place of Twisted's priority tree."""

    def setUp(self) -> None:
        self.connection = _Sendable()
        self.streams = _SendableStreams(self.connection, maximum_streams=3)  # type: ignore[arg-type]

    def take(self, n: int) -> list[int]:
        return [next(self.streams) for _ in range(n)]

    def test_ready_streams_take_turns(self) -> None:
        for stream_id in (1, 3, 5):
            self.streams.insert_stream(stream_id)
        self.assertEqual(self.take(6), [1, 3, 5, 1, 3, 5])

    def test_blocked_streams_are_skipped_and_an_unblocked_one_goes_to_the_end(self) -> None:
        for stream_id in (1, 3, 5):
            self.streams.insert_stream(stream_id)
        self.streams.block(1)
        self.streams.block(3)
        self.assertEqual(self.take(2), [5, 5])
        self.streams.unblock(1)
        self.streams.unblock(5)  # already in line: keeps its place
        self.assertEqual(self.take(3), [5, 1, 5])

    def test_nothing_ready_is_a_deadlock_for_the_send_loop(self) -> None:
        self.assertRaises(DeadlockError, next, self.streams)
        self.streams.insert_stream(1)
        self.streams.block(1)
        self.assertRaises(DeadlockError, next, self.streams)

    def test_a_stream_without_window_is_parked(self) -> None:
        self.streams.insert_stream(1)
        self.streams.insert_stream(3)
        self.connection.no_window.add(1)
        self.assertEqual(self.take(2), [3, 3])
        self.assertEqual(self.streams.parked, {1})
        self.connection.no_window.clear()
        self.streams.unblock(1)  # what the connection's _unpark does once the window opens
        self.assertEqual(self.take(2), [3, 1])

    def test_the_tree_errors_twisted_expects(self) -> None:
        self.streams.insert_stream(1)
        self.assertRaises(DuplicateStreamError, self.streams.insert_stream, 1)
        self.assertRaises(MissingStreamError, self.streams.block, 7)
        self.assertRaises(MissingStreamError, self.streams.unblock, 7)
        self.streams.insert_stream(3)
        self.streams.insert_stream(5)
        self.assertRaises(TooManyStreamsError, self.streams.insert_stream, 7)
        self.streams.remove_stream(3)
        self.assertRaises(MissingStreamError, self.streams.remove_stream, 3)
        self.streams.insert_stream(7)
        self.assertEqual(self.streams.scheduled, {1, 5, 7})

    def test_a_removed_stream_is_never_returned(self) -> None:
        self.streams.insert_stream(1)
        self.streams.insert_stream(3)
        self.connection.no_window.add(3)
        next(self.streams)
        self.streams.remove_stream(1)
        self.streams.remove_stream(3)
        self.assertEqual(self.streams.parked, set())
        self.assertRaises(DeadlockError, next, self.streams)
