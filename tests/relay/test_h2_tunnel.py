"""The relay's end of an HTTP/2 tunnel in memory: `H2Tunnel` against an h2 server connection the
test drives as the gateway, no sockets.  What a hostile or unlucky gateway does here fails one
stream or closes this tunnel, never anything else."""

from __future__ import annotations

from io import BytesIO
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingAckReceived,
    RequestReceived,
    SettingsAcknowledged,
    StreamEnded,
    StreamReset,
)
from h2.settings import SettingCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mcpr.common import protocol as wire
from mcpr.relay.tunnels.contract import TunnelRequest
from mcpr.relay.tunnels.guard import ControlBudget, Outbound
from mcpr.relay.tunnels.h2 import H2Tunnel

MiB = 1 << 20


class Sink:
    """A public response as the front would see it."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.ended = False
        self.failed: str | None = None
        self.producer: Any = None

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        assert self.status is None, "second head"
        self.status, self.headers = status, headers

    def data(self, chunk: bytes) -> None:
        self.body += chunk

    def end(self) -> None:
        self.ended = True

    def fail(self, reason: str) -> None:
        self.failed = reason

    def register(self, producer: Any) -> None:
        self.producer = producer


# A Twisted transport pauses its producer past this many buffered bytes.
BUFFER_SIZE = 64 * 1024


class Gateway:
    """An h2 server connection wired to an `H2Tunnel`; `pump` moves bytes both ways until quiet.

    The relay's socket is modelled as Twisted's transport is: writes are buffered, the socket's
    producer (`Outbound`) is paused past BUFFER_SIZE and resumed once the buffer is empty,
    which happens when the gateway reads (`pump`, unless `reading` is off)."""

    def __init__(self, *, max_streams: int = 1024, control_rate: int = 1000, backlog: int = MiB) -> None:
        self.clock = Clock()
        self.to_gateway: list[bytes] = []
        self.buffered = 0
        self.reading = True
        self.closes: list[tuple[int, str]] = []
        self.outbound = Outbound(backlog)
        self.tunnel = H2Tunnel("victim", "owner", self._write, lambda c, r: self.closes.append((c, r)),
                               budget=ControlBudget(control_rate, self.clock), outbound=self.outbound)
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.conn.initiate_connection()
        self.conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
                                   SettingCodes.INITIAL_WINDOW_SIZE: MiB})
        self.events: list[Event] = []
        self.requests: list[RequestReceived] = []
        self.auto_ack = True
        self.tunnel.start()
        self.pump()

    def _write(self, data: bytes) -> None:
        self.to_gateway.append(data)
        self.buffered += len(data)
        if self.buffered > BUFFER_SIZE and not self.outbound.full:
            self.outbound.pauseProducing()

    def pump(self) -> None:
        while True:
            moved = False
            if self.to_gateway and self.reading:
                data = b"".join(self.to_gateway)
                self.to_gateway.clear()
                self.buffered = 0
                if self.outbound.full:
                    self.outbound.resumeProducing()
                for event in self.conn.receive_data(data):
                    self.events.append(event)
                    if isinstance(event, RequestReceived):
                        self.requests.append(event)
                    elif isinstance(event, DataReceived) and self.auto_ack and event.flow_controlled_length:
                        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                moved = True
            out = self.conn.data_to_send()
            if out:
                self.tunnel.message(out, True)
                moved = True
            if not moved:
                return

    def raw(self, data: bytes) -> None:
        """Bytes on the tunnel that the gateway's h2 state machine never saw."""
        self.tunnel.message(data, True)
        self.pump()

    def request(self, path: bytes = b"/", headers: list[tuple[bytes, bytes]] | None = None, body: bytes = b"",
                method: bytes = b"GET") -> Sink:
        sink = Sink()
        request = TunnelRequest(method, path, [(b"host", b"victim.tunnel.test")] + (headers or []),
                                BytesIO(body) if body else None, len(body))
        sink.stream = self.tunnel.open_stream(request, sink)  # type: ignore[attr-defined]
        self.pump()
        return sink

    def respond(self, stream_id: int, status: bytes = b"200", body: bytes = b"", end: bool = True) -> None:
        self.conn.send_headers(stream_id, [(b":status", status)], end_stream=end and not body)
        if body:
            self.conn.send_data(stream_id, body, end_stream=end)
        self.pump()

    def send(self, stream_id: int, size: int, end: bool = False) -> int:
        """Up to `size` bytes of response data, as the windows allow; returns what was sent."""
        sent = 0
        while sent < size:
            chunk = min(size - sent, self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if chunk <= 0:
                break
            self.conn.send_data(stream_id, b"x" * chunk)
            sent += chunk
        if end and sent == size:
            self.conn.end_stream(stream_id)
        self.pump()
        return sent

    def resets(self) -> dict[int, int]:
        return {e.stream_id: e.error_code for e in self.events if isinstance(e, StreamReset)}

    def goaway(self) -> int | None:
        codes = [e.error_code for e in self.events if isinstance(e, ConnectionTerminated)]
        return codes[-1] if codes else None


def spy_acknowledged(tunnel: H2Tunnel) -> list[int]:
    """Every size the relay hands back to h2's flow control."""
    sizes: list[int] = []
    real = tunnel.conn.acknowledge_received_data

    def acknowledge(size: int, stream_id: int) -> None:
        sizes.append(size)
        real(size, stream_id)

    tunnel.conn.acknowledge_received_data = acknowledge  # type: ignore[method-assign]
    return sizes


class WindowTests(SynchronousTestCase):
    """S1: whatever way a stream ends, what it received is handed back to the connection window."""

    def setUp(self) -> None:
        self.gw = Gateway()
        self.acked = spy_acknowledged(self.gw.tunnel)

    def paused_download(self) -> tuple[Sink, int, int]:
        """A stream whose public client stopped reading after its head: the gateway fills its window."""
        sink = self.gw.request(b"/big")
        stream_id = self.gw.requests[-1].stream_id
        self.gw.respond(stream_id, end=False)
        sink.producer.pauseProducing()
        sent = self.gw.send(stream_id, 2 * MiB)
        self.assertEqual(sent, wire.STREAM_WINDOW)
        return sink, stream_id, sent

    def test_abandoned_stream_gives_its_window_back(self) -> None:
        sink, stream_id, sent = self.paused_download()
        self.assertEqual(sum(self.acked), 0)
        sink.stream.cancel()
        self.gw.pump()
        self.assertEqual(self.gw.resets()[stream_id], ErrorCodes.CANCEL)
        self.assertEqual(sum(self.acked), sent)

    def test_stream_ended_while_paused_gives_its_window_back(self) -> None:
        sink, stream_id, sent = self.paused_download()
        self.gw.conn.end_stream(stream_id)
        self.gw.pump()
        self.assertTrue(sink.ended)
        self.assertEqual(sum(self.acked), sent)
        sink.producer.resumeProducing()  # the public client reads the tail later: nothing twice
        self.assertEqual(sum(self.acked), sent)

    def test_stream_reset_by_the_gateway_gives_its_window_back(self) -> None:
        sink, stream_id, sent = self.paused_download()
        self.gw.conn.reset_stream(stream_id, ErrorCodes.INTERNAL_ERROR)
        self.gw.pump()
        self.assertEqual(sink.failed, "the gateway reset the stream")
        self.assertEqual(sum(self.acked), sent)

    def test_fifty_abandoned_downloads_then_a_whole_body(self) -> None:
        total = 0
        for _ in range(50):
            sink, _, sent = self.paused_download()
            total += sent
            sink.stream.cancel()
            self.gw.pump()
        self.assertEqual(sum(self.acked), total)
        self.assertGreater(self.gw.conn.outbound_flow_control_window, wire.CONNECTION_WINDOW // 2)
        sink = self.gw.request(b"/normal")
        stream_id = self.gw.requests[-1].stream_id
        self.gw.respond(stream_id, end=False)
        left = 3 * wire.CONNECTION_WINDOW
        while left:
            sent = self.gw.send(stream_id, left, end=True)
            self.assertGreater(sent, 0, "the window stalled")
            left -= sent
        self.assertTrue(sink.ended)
        self.assertEqual(len(sink.body), 3 * wire.CONNECTION_WINDOW)

    def test_readers_that_stall_and_stay_cannot_starve_the_tunnel(self) -> None:
        """Public clients that stop reading but keep their connection hold their streams' bytes;
        together they may hold no more than half the connection window, so a normal response
        still gets through.  A few slow readers are left alone."""
        sinks = [self.paused_download()[0] for _ in range(4)]
        self.assertEqual([s.failed for s in sinks], [None] * 4, "four slow readers are not cut")
        sinks += [self.paused_download()[0] for _ in range(8)]
        cut = [s for s in sinks if s.failed]
        self.assertEqual({s.failed for s in cut}, {"the public client stopped reading"})
        self.assertGreaterEqual(len(cut), 8)
        self.gw.pump()
        self.assertGreaterEqual(self.gw.conn.outbound_flow_control_window, wire.CONNECTION_WINDOW // 2 - MiB)
        sink = self.gw.request(b"/normal")
        stream_id = self.gw.requests[-1].stream_id
        self.gw.respond(stream_id, end=False)
        left = 2 * wire.CONNECTION_WINDOW
        while left:
            sent = self.gw.send(stream_id, left, end=True)
            self.assertGreater(sent, 0, "the window stalled")
            left -= sent
        self.assertTrue(sink.ended)
        self.assertEqual(len(sink.body), 2 * wire.CONNECTION_WINDOW)


def decoded_ok(test: SynchronousTestCase, gw: Gateway) -> None:
    """The tunnel is intact: a plain request still decodes at the gateway and is answered."""
    before = len(gw.requests)
    sink = gw.request(b"/after", [(b"x-check", b"1")])
    test.assertEqual(len(gw.requests), before + 1)
    headers = dict(gw.requests[-1].headers)
    test.assertEqual((headers[b":path"], headers[b"x-check"]), (b"/after", b"1"))
    gw.respond(gw.requests[-1].stream_id, body=b"ok")
    test.assertEqual((sink.status, bytes(sink.body), sink.ended), (200, b"ok", True))
    test.assertEqual(gw.closes, [])


class RequestHeaderTests(SynchronousTestCase):
    """S2: a header list h2 (ours, or the gateway's on receipt) would refuse fails its own request
    before anything touches the HTTP/2 connection."""

    def test_unsendable_headers_fail_only_their_request(self) -> None:
        gw = Gateway()
        cases: list[tuple[bytes, bytes, list[tuple[bytes, bytes]]]] = [
            (b"GET", b"/", [(b"x-bad", b"a\nb")]),
            (b"GET", b"/", [(b"x-bad", b"a\rb")]),
            (b"GET", b"/", [(b"x-bad", b"a\x00b")]),
            (b"GET", b"/", [(b"bad name", b"v")]),
            (b"GET", b"/", [(b"bad:name", b"v")]),
            (b"GET", b"/", [(b"", b"v")]),
            (b"GET", b"/", [(b"caf\xe9", b"v")]),
            (b"CONNECT", b"example.com:443", []),
            (b"GET", b"/a\nb", []),
        ]
        for method, path, headers in cases:
            sink = gw.request(path, headers, method=method)
            self.assertIsNotNone(sink.failed, (method, path, headers))
            self.assertTrue(sink.failed.startswith("cannot forward this request"), sink.failed)
        self.assertEqual(gw.requests, [])
        decoded_ok(self, gw)

    def test_headers_over_the_gateways_list_size(self) -> None:
        gw = Gateway()
        gw.conn.update_settings({SettingCodes.MAX_HEADER_LIST_SIZE: 4096})
        gw.pump()
        sink = gw.request(b"/", [(b"x-big", b"v" * 5000)])
        self.assertIn("the gateway takes 4096", sink.failed or "")
        decoded_ok(self, gw)

    def test_blanks_and_case_are_normalised_not_refused(self) -> None:
        gw = Gateway()
        gw.request(b"/", [(b"x-pad", b" padded\t")])
        self.assertEqual(dict(gw.requests[-1].headers)[b"x-pad"], b"padded")

    def test_h2_failing_after_validation_closes_the_tunnel(self) -> None:
        """If h2 still raises in send_headers, its HPACK state may differ from the gateway's: the
        tunnel closes (1011, GOAWAY INTERNAL_ERROR) rather than go on desynchronised."""
        gw = Gateway()
        other = gw.request(b"/long")
        conn = gw.tunnel.conn
        real = conn.send_headers

        def broken(stream_id: int, headers: Any, **kwargs: Any) -> None:
            conn.encoder.encode([(b"x-half", b"sent")])  # the table changed for a frame never sent
            raise RuntimeError("h2 bug")

        conn.send_headers = broken  # type: ignore[method-assign]
        sink = gw.request(b"/boom")
        conn.send_headers = real  # type: ignore[method-assign]
        self.assertEqual(sink.failed, "tunnel error")
        self.assertEqual(gw.closes, [(1011, "internal error")])
        self.assertEqual(gw.goaway(), ErrorCodes.INTERNAL_ERROR)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        late = gw.request(b"/late")
        self.assertEqual(late.failed, "tunnel closed")
        gw.tunnel.closed()
        self.assertEqual(other.failed, "tunnel closed")

    @given(method=st.sampled_from([b"GET", b"POST", b"CONNECT", b"OPTIONS", b"G:T", b"get", b""]),
           path=st.binary(max_size=30),
           headers=st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=20)), max_size=6))
    def test_any_request_fails_alone_or_arrives_intact(self, method: bytes, path: bytes,
                                                       headers: list[tuple[bytes, bytes]]) -> None:
        """Fuzzing the request-to-stream translation: whatever the front lets through, either the
        request fails on its own or the gateway decodes it, and the tunnel goes on."""
        gw = Gateway()
        headers = [(n.lower(), v) for n, v in headers]
        sink = gw.request(path, headers, method=method)
        if sink.failed is None:
            received = gw.requests[-1]
            self.assertEqual(dict(received.headers)[b":method"], method)
            gw.respond(received.stream_id)
        decoded_ok(self, gw)


class StatusTests(SynchronousTestCase):
    """D6: only a final status (200-599) becomes a head; anything else is a 502 for that request."""

    def test_bad_statuses(self) -> None:
        gw = Gateway()
        odd = (b"0", b"999", b"-1", b"abc", b"20", b"2000", b"", b"600", b"20x", b"+20", "٢٠٠".encode())
        for status in odd:
            for end in (True, False):
                sink = gw.request(b"/s")
                stream_id = gw.requests[-1].stream_id
                gw.respond(stream_id, status, end=end)
                self.assertEqual((sink.status, sink.failed), (None, "the gateway sent an invalid :status"), status)
                if not end:  # the gateway is told, if it still has the stream
                    self.assertEqual(gw.resets()[stream_id], ErrorCodes.PROTOCOL_ERROR)
        decoded_ok(self, gw)

    def test_informational_heads_are_skipped(self) -> None:
        gw = Gateway()
        sink = gw.request(b"/early")
        stream_id = gw.requests[-1].stream_id
        gw.conn.send_headers(stream_id, [(b":status", b"103"), (b"link", b"</a>")])
        gw.respond(stream_id, b"204")
        self.assertEqual((sink.status, sink.ended, sink.failed), (204, True, None))


class EventFailureTests(SynchronousTestCase):
    """D7: an exception while handling one event fails that event's stream, logged; the others go on."""

    def test_a_sink_that_raises_fails_its_stream_only(self) -> None:
        gw = Gateway()
        good = gw.request(b"/good")
        good_id = gw.requests[-1].stream_id
        bad = gw.request(b"/bad")
        bad_id = gw.requests[-1].stream_id

        def explode(chunk: bytes) -> None:
            raise ValueError("sink bug")

        bad.data = explode  # type: ignore[method-assign]
        gw.respond(bad_id, end=False)
        gw.respond(good_id, end=False)
        gw.conn.send_data(bad_id, b"boom")
        gw.conn.send_data(good_id, b"fine", end_stream=True)
        gw.pump()
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(bad.failed, "tunnel error")
        self.assertEqual(gw.resets()[bad_id], ErrorCodes.INTERNAL_ERROR)
        self.assertEqual((bytes(good.body), good.ended), (b"fine", True))
        decoded_ok(self, gw)

    def test_protocol_error_closes_with_goaway(self) -> None:
        gw = Gateway()
        sink = gw.request(b"/x")
        gw.raw(DataFrame(99, data=b"no such stream").serialize())  # DATA on an idle stream
        self.assertEqual(gw.closes, [(1008, "HTTP/2 protocol error")])
        self.assertEqual(gw.goaway(), ErrorCodes.PROTOCOL_ERROR)
        gw.tunnel.closed()
        self.assertEqual(sink.failed, "tunnel closed")


class FloodTests(SynchronousTestCase):
    """S5: frames that carry no response data draw on a per-second budget; past it the gateway gets
    GOAWAY ENHANCE_YOUR_CALM and the socket closes, before h2 processes the flood."""

    def flooded(self, gw: Gateway, frame: bytes, count: int) -> None:
        gw.raw(frame * count)

    def assert_calmed(self, gw: Gateway) -> None:
        self.assertEqual(gw.closes, [(1008, "flood of HTTP/2 control frames")])
        self.assertEqual(gw.goaway(), ErrorCodes.ENHANCE_YOUR_CALM)

    def test_each_kind_of_control_frame(self) -> None:
        def open_stream(gw: Gateway) -> int:
            gw.request(b"/open")
            return gw.requests[-1].stream_id

        def closed_stream(gw: Gateway) -> int:
            gw.request(b"/done")
            stream_id = gw.requests[-1].stream_id
            gw.respond(stream_id)
            return stream_id

        kinds = {
            "PING": lambda gw: PingFrame(0, opaque_data=b"12345678").serialize(),
            "SETTINGS": lambda gw: SettingsFrame(0).serialize(),
            "WINDOW_UPDATE": lambda gw: WindowUpdateFrame(0, window_increment=1).serialize(),
            "PRIORITY": lambda gw: PriorityFrame(open_stream(gw), depends_on=0, stream_weight=16).serialize(),
            "RST_STREAM": lambda gw: RstStreamFrame(closed_stream(gw), error_code=0).serialize(),
            "empty DATA": lambda gw: DataFrame(self.opened(gw), data=b"").serialize(),
            "HEADERS on a closed stream": lambda gw: HeadersFrame(
                closed_stream(gw), data=b"\x88", flags=["END_HEADERS"]).serialize(),
            "unknown type": lambda gw: b"\x00\x00\x01\x42\x00\x00\x00\x00\x00z",
        }
        for name, make in kinds.items():
            gw = Gateway()
            frame = make(gw)
            self.flooded(gw, frame, 5000)
            self.assert_calmed(gw)
            self.assertEqual(len([e for e in gw.events if isinstance(e, ConnectionTerminated)]), 1, name)

    def opened(self, gw: Gateway) -> int:
        gw.request(b"/open")
        stream_id = gw.requests[-1].stream_id
        gw.respond(stream_id, end=False)
        return stream_id

    def test_continuation_flood(self) -> None:
        gw = Gateway()
        gw.request(b"/open")
        stream_id = gw.requests[-1].stream_id
        fragment = ContinuationFrame(stream_id, data=b"").serialize()
        flood = HeadersFrame(stream_id, data=b"").serialize() + fragment * 5000
        gw.raw(flood)
        self.assertEqual(len(gw.closes), 1)
        self.assertIn(gw.goaway(), (ErrorCodes.ENHANCE_YOUR_CALM, ErrorCodes.PROTOCOL_ERROR))

    def test_tiny_messages(self) -> None:
        gw = Gateway()
        ping = PingFrame(0, opaque_data=b"12345678").serialize()
        for _ in range(300):
            for byte in ping:  # each message a byte: no frame until the ninth
                gw.tunnel.message(bytes([byte]), True)
            if gw.closes:
                break
        self.assertEqual(gw.closes, [(1008, "flood of HTTP/2 control frames")])

    def test_within_budget_over_time(self) -> None:
        """A busy but honest rate never trips it: 900 control frames a second for ten seconds."""
        gw = Gateway()
        ping = PingFrame(0, opaque_data=b"12345678").serialize()
        for _ in range(10):
            gw.raw(ping * 900)
            gw.clock.advance(1)
        self.assertEqual(gw.closes, [])
        decoded_ok(self, gw)

    def test_data_and_response_heads_are_not_control_frames(self) -> None:
        gw = Gateway(control_rate=10)
        for _ in range(50):
            sink = gw.request(b"/r")
            gw.respond(gw.requests[-1].stream_id, body=b"x" * 100)
            self.assertTrue(sink.ended)
        self.assertEqual(gw.closes, [])


class BacklogTests(SynchronousTestCase):
    """D3: whatever windows the gateway grants, the relay writes request bodies (and opens
    streams) only while the socket towards it is not backed up."""

    def test_bodies_wait_for_the_socket(self) -> None:
        gw = Gateway()
        gw.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        gw.conn.increment_flow_control_window(2**31 - 1 - 65535)
        gw.pump()
        gw.reading = False
        body = b"u" * (4 * MiB)
        sinks = [gw.request(b"/up", body=body, method=b"POST") for _ in range(4)]
        # One flush past the buffer size at most, whatever the windows.
        self.assertLess(gw.buffered, BUFFER_SIZE + 300 * 1024)
        self.assertTrue(gw.outbound.full)
        more = gw.request(b"/later")
        self.assertLess(gw.buffered, BUFFER_SIZE + 300 * 1024, "a stream opened on a full socket")
        gw.reading = True
        gw.pump()
        self.assertEqual(more.failed, None)
        received = {e.stream_id: 0 for e in gw.requests}
        for e in gw.events:
            if isinstance(e, DataReceived):
                received[e.stream_id] += len(e.data)
        self.assertEqual(list(received.values()), [len(body)] * 4 + [0])
        self.assertEqual(len([e for e in gw.events if isinstance(e, StreamEnded)]), 5)
        for sink in sinks:
            self.assertIsNone(sink.failed)

    def test_writes_while_full_are_bounded_by_the_caller(self) -> None:
        outbound = Outbound(100)
        self.assertTrue(outbound.wrote(10_000))  # not full: the transport takes it
        outbound.pauseProducing()
        self.assertTrue(outbound.wrote(60))
        self.assertFalse(outbound.wrote(60))
        outbound.resumeProducing()
        self.assertTrue(outbound.wrote(60))


class ConcurrencyTests(SynchronousTestCase):
    """S6: the gateway's MAX_CONCURRENT_STREAMS queues requests; REFUSED_STREAM sends a request again
    once the gateway has room, or answers a clean 503; the tunnel never fails."""

    def test_queued_past_the_gateways_limit_and_opened_when_it_grows(self) -> None:
        gw = Gateway(max_streams=2)
        sinks = [gw.request(b"/q") for _ in range(5)]
        self.assertEqual(len(gw.requests), 2)
        self.assertEqual(gw.tunnel.in_flight, 5)
        gw.respond(gw.requests[0].stream_id)
        self.assertEqual(len(gw.requests), 3)
        gw.conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 10})
        gw.pump()
        self.assertEqual(len(gw.requests), 5)
        for request in gw.requests[1:]:
            gw.respond(request.stream_id)
        self.assertTrue(all(s.status == 200 and s.ended for s in sinks))

    def test_refused_stream_goes_again_when_another_ends(self) -> None:
        gw = Gateway()
        first = gw.request(b"/first")
        first_id = gw.requests[-1].stream_id
        second = gw.request(b"/second", body=b"payload", method=b"POST")
        second_id = gw.requests[-1].stream_id
        gw.conn.reset_stream(second_id, ErrorCodes.REFUSED_STREAM)
        gw.pump()
        self.assertIsNone(second.failed)
        self.assertEqual(len(gw.requests), 2, "sent again before the gateway had room")
        gw.respond(first_id)
        self.assertTrue(first.ended)
        retried = gw.requests[-1]
        self.assertEqual(dict(retried.headers)[b":path"], b"/second")
        body = b"".join(e.data for e in gw.events if isinstance(e, DataReceived) and e.stream_id == retried.stream_id)
        self.assertEqual(body, b"payload")
        gw.respond(retried.stream_id)
        self.assertTrue(second.ended)
        decoded_ok(self, gw)

    def test_refused_again_and_again_is_a_503(self) -> None:
        gw = Gateway()
        sink = gw.request(b"/never")
        for _ in range(10):
            if sink.status is not None:
                break
            gw.conn.reset_stream(gw.requests[-1].stream_id, ErrorCodes.REFUSED_STREAM)
            gw.pump()
        self.assertEqual((sink.status, sink.ended), (503, True))
        self.assertIn(b"refused", bytes(sink.body))
        self.assertEqual(len(gw.requests), 4)
        decoded_ok(self, gw)


class IdleTunnelTests(SynchronousTestCase):
    """Until its first request a tunnel holds no h2 state (14 KiB each, most of an idle tunnel's
    memory): the gateway's preface, its window updates and its PINGs are answered as h2 would
    answer them, and h2, built at the first request, takes up exactly where they left off."""

    def test_an_idle_tunnel_never_builds_h2(self) -> None:
        gw = Gateway(max_streams=7)
        gw.raw(PingFrame(0, opaque_data=b"12345678").serialize())
        self.assertIsNone(gw.tunnel._conn)
        self.assertTrue([e for e in gw.events if isinstance(e, SettingsAcknowledged)])
        self.assertEqual(gw.conn.local_settings.max_concurrent_streams, 7, "the gateway's SETTINGS were acknowledged")
        pongs = [e.ping_data for e in gw.events if isinstance(e, PingAckReceived)]
        self.assertEqual(pongs, [b"12345678"])
        self.assertEqual(gw.closes, [])

    def test_the_preface_is_what_h2_sends(self) -> None:
        out: list[bytes] = []
        tunnel = H2Tunnel("a", "owner", out.append, lambda code, reason: None,
                          budget=ControlBudget(1000, Clock()), outbound=Outbound(MiB))
        tunnel.start()
        tunnel._started = False  # an h2 built now keeps its own preface: compare it
        self.assertEqual(out, [tunnel.conn.data_to_send()])

    def test_the_first_request_builds_h2_where_the_preface_left_off(self) -> None:
        gw = Gateway(max_streams=1)
        gw.raw(WindowUpdateFrame(0, window_increment=1000).serialize())  # unseen by the gateway's h2
        first = gw.request(b"/first")
        second = gw.request(b"/second")
        conn = gw.tunnel._conn
        assert conn is not None
        self.assertEqual(conn.remote_settings.max_concurrent_streams, 1, "the gateway's SETTINGS apply")
        self.assertEqual(conn.outbound_flow_control_window, 65535 + 1000, "its window updates too")
        self.assertEqual([dict(r.headers)[b":path"] for r in gw.requests], [b"/first"], "one at a time, as it said")
        gw.respond(gw.requests[-1].stream_id, body=b"one")
        self.assertEqual(len(gw.requests), 2)
        gw.respond(gw.requests[-1].stream_id, body=b"two")
        self.assertEqual((bytes(first.body), bytes(second.body)), (b"one", b"two"))
        self.assertEqual(gw.closes, [])

    def test_frames_only_h2_may_judge_build_it(self) -> None:
        """A SETTINGS value h2 refuses gets h2's GOAWAY at once, as before; so does a GOAWAY."""
        gw = Gateway()
        bad = SettingsFrame(0, settings={SettingCodes.MAX_FRAME_SIZE: 1}).serialize()
        gw.raw(bad)
        self.assertIsNotNone(gw.tunnel._conn)
        self.assertEqual(gw.closes, [(1008, "HTTP/2 protocol error")])
        self.assertEqual(gw.goaway(), ErrorCodes.PROTOCOL_ERROR)
        gw = Gateway()
        gw.conn.close_connection()
        gw.pump()
        self.assertEqual(gw.closes, [(1008, "gateway ended the HTTP/2 connection")])

    def test_a_control_frame_flood_before_any_request(self) -> None:
        gw = Gateway(control_rate=100)
        gw.raw(PingFrame(0, opaque_data=b"12345678").serialize() * 500)
        self.assertEqual(gw.closes, [(1008, "flood of HTTP/2 control frames")])
        self.assertEqual(gw.goaway(), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertEqual([e for e in gw.events if isinstance(e, PingAckReceived)], [], "no answer to the flood")
