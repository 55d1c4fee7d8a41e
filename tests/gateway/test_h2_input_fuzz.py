"""Hypothesis against the gateway's HTTP/2 server end: whatever a relay sends, nothing raises and the
tunnel is either still serving or closed cleanly (so the tunnel client reconnects).

The server runs in memory (`serve_streams` over a fake WebSocket, a MemoryReactorClock for the send
loop), fed by three generators: random bytes after a valid preface; random frames, structured or
not; and requests from a real h2 client with its header validation off, so that odd headers and
pseudo-headers reach the gateway with a consistent HPACK state and a follow-up request can check
that a surviving tunnel still serves.
"""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from hpack import Encoder
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mcpr.common.web import CappedSite
from mcpr.gateway.h2_server import serve_streams
from tests.gateway.test_h2_server import FakeWebSocket

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STREAM_IDS = st.sampled_from([0, 1, 2, 3, 5, 7, 9, 0x7FFFFFFF, 0xFFFFFFFF])


class Boom(Exception):
    pass


class Odd(Resource):
    """What a proxied upstream might do: answer, fail, hang, echo, send headers h2 cannot carry."""

    isLeaf = True

    def render(self, request) -> bytes | int:
        path = request.path
        if path.startswith(b"/fail"):
            raise Boom()
        if path.startswith(b"/hang"):
            return NOT_DONE_YET
        if path.startswith(b"/big"):  # more than the relay's initial window: the stream waits for it
            return b"x" * 100_000
        if path.startswith(b"/headers"):
            request.responseHeaders.setRawHeaders(b"te", [b"gzip"])
            request.responseHeaders.setRawHeaders(b"x-ok", [b"1"])
        return b"ok " + (request.content.read() if request.content is not None else b"")


@st.composite
def requests(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """A request's header block: mostly well-formed, with odd targets, values and one mutation."""
    method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"CONNECT", b"get", b"M-SEARCH"]))
    if draw(st.integers(0, 4)) == 0:
        headers = [(b":method", b"CONNECT"), (b":authority", b"a:443")]
    else:
        headers = [
            (b":method", method),
            (b":scheme", draw(st.sampled_from([b"https", b"http", b"x"]))),
            (b":path", draw(st.sampled_from([b"/", b"/fail", b"/hang", b"/headers", b"/big", b"*", b"http://x/y",
                                              b"noslash", b"/a?b=c&&=&%zz", b"//x", b"/\xff"]))),
            (b":authority", draw(st.sampled_from([b"a", b"", b"a:1", b"[::1]:8", b"a b"]))),
        ]
    field = st.one_of(  # each name with values it may get; h2 refusing one (whitespace, NUL) ends the tunnel
        st.tuples(st.just(b"content-length"), st.sampled_from([b"0", b"5", b"64", b"65", b"-1", b"abc", b"+5"])),
        st.tuples(st.just(b"content-type"), st.sampled_from([
            b"application/json", b"multipart/form-data; boundary=x", b"application/x-www-form-urlencoded", b""])),
        st.tuples(st.just(b"expect"), st.sampled_from([b"100-continue", b"nope"])),
        st.tuples(st.just(b"cookie"), st.sampled_from([b"a=1; b", b"", b"=;="])),
        st.tuples(st.just(b"te"), st.sampled_from([b"trailers", b"gzip"])),
        st.tuples(st.sampled_from([b"x-odd", b"accept", b"mcp-session-id", b"x-forwarded-for", b"host"]),
                  st.sampled_from([b"", b"x" * 300, b"\xff\xfe", b"a,b", b" padded", b"\x00"])),
    )
    extra = draw(st.lists(field, max_size=4))
    headers += extra
    mutation = draw(st.sampled_from([None] * 6 + ["drop", "duplicate", "unknown pseudo", "pseudo last",
                                                  "uppercase", "connection"]))
    position = draw(st.integers(0, len(headers) - 1))
    if mutation == "drop":
        del headers[position]
    elif mutation == "duplicate":
        headers.insert(position, headers[position])
    elif mutation == "unknown pseudo":
        headers.insert(position, (b":foo", b"bar"))
    elif mutation == "pseudo last":
        headers.append((b":path", b"/late"))
    elif mutation == "uppercase":
        headers.append((b"X-Upper", b"1"))
    elif mutation == "connection":
        headers.append((b"connection", b"keep-alive"))
    return headers


def raw_frame(kind: int, flags: int, stream_id: int, payload: bytes, declared: int | None = None) -> bytes:
    length = len(payload) if declared is None else declared
    return struct.pack(">I", length)[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One frame: a known type with a plausible payload, or anything at all."""
    kind = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0xFF]))
    flags = draw(st.sampled_from([0, 0x1, 0x4, 0x5, 0x8, 0x20, 0x25, 0xFF]))
    stream_id = draw(STREAM_IDS)
    if kind == 1 and draw(st.booleans()):  # HEADERS with a real header block
        payload = Encoder().encode(draw(requests()))
    elif kind == 4:  # SETTINGS: (id, value) pairs
        pairs = draw(st.lists(st.tuples(st.integers(0, 10), st.integers(0, 2**32 - 1)), max_size=4))
        payload = b"".join(struct.pack(">HI", k, v) for k, v in pairs)
    elif kind == 8:  # WINDOW_UPDATE
        payload = struct.pack(">I", draw(st.integers(0, 2**32 - 1)))
    else:
        payload = draw(st.binary(max_size=40))
    declared = draw(st.one_of(st.none(), st.integers(0, 2**24 - 1)))
    return raw_frame(kind, flags, stream_id, payload, declared)


class Harness:
    """A fresh gateway end, fed as the relay would, with every send-loop turn run."""

    def __init__(self) -> None:
        self.clock = MemoryReactorClock()
        self.websocket = FakeWebSocket()
        self.server = serve_streams(self.websocket, CappedSite(Odd(), max_request_body=64), self.clock)

    def feed(self, data: bytes, cuts: list[int]) -> None:
        """`data` as WebSocket messages cut at `cuts` (HTTP/2 is a byte stream), then the reactor."""
        start = 0
        for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
            if cut > start:
                self.server.dataReceived(data[start:cut])
                start = cut
        self.run()

    def run(self) -> None:
        for _ in range(20):
            self.clock.advance(0)

    def check(self, testcase: SynchronousTestCase) -> bool:
        """Closed cleanly, or alive with consistent state; True if alive."""
        ended = self.websocket.ended
        if ended:
            testcase.assertIn(ended[0].split()[0], ("close", "drop"), ended)
            return False
        server = self.server
        # The scheduler holds exactly the streams Twisted serves, so it never overflows (S6).
        testcase.assertEqual(server.priority.scheduled, set(server.streams))
        testcase.assertEqual(set(server._outboundStreamQueues), set(server.streams))
        return True

    def close(self, testcase: SynchronousTestCase) -> None:
        """The socket closes: every stream ends, nothing raises."""
        self.server.connectionLost(Failure(ConnectionLost("tunnel closed")))
        self.run()
        testcase.flushLoggedErrors(Boom)  # twisted.web logs a failed render (/fail) and answers 500


class H2InputFuzzTests(SynchronousTestCase):
    @given(st.lists(st.binary(max_size=64), max_size=6), st.lists(st.integers(0, 400), max_size=4))
    def test_random_bytes_after_the_preface(self, chunks: list[bytes], cuts: list[int]) -> None:
        harness = Harness()
        harness.feed(PREFACE + b"".join(chunks), cuts)
        harness.check(self)
        harness.close(self)

    @given(st.lists(frames(), max_size=12), st.lists(st.integers(0, 400), max_size=4))
    def test_random_frames(self, sent: list[bytes], cuts: list[int]) -> None:
        harness = Harness()
        harness.feed(PREFACE + raw_frame(4, 0, 0, b"") + b"".join(sent), cuts)
        harness.check(self)
        harness.close(self)

    @given(st.lists(st.tuples(
        st.sampled_from(["request"] * 4 + ["data", "end", "reset", "priority", "window", "ping", "settings"]),
        st.integers(0, 3), requests(), st.binary(max_size=100), st.booleans()), max_size=12),
        st.lists(st.integers(0, 2000), max_size=4))
    def test_requests_with_odd_headers(self, actions: list, cuts: list[int]) -> None:
        """A real client (HPACK stays in step) with its validation off, so anything goes out."""
        harness = Harness()
        relay = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=False))
        relay.initiate_connection()
        opened: list[int] = []
        confused = False
        for action, index, headers, body, flag in actions:
            stream_id = opened[index % len(opened)] if opened and action != "request" else 0
            try:
                if action == "request":
                    stream_id = relay.get_next_available_stream_id()
                    relay.send_headers(stream_id, headers, end_stream=flag)
                    opened.append(stream_id)
                elif not stream_id:
                    continue
                elif action == "data":
                    relay.send_data(stream_id, body, end_stream=flag)
                elif action == "end":
                    relay.end_stream(stream_id)
                elif action == "reset":
                    relay.reset_stream(stream_id)
                elif action == "priority":
                    relay.prioritize(stream_id, weight=index + 1, depends_on=opened[0] if flag else None,
                                     exclusive=flag)
                elif action == "window":
                    relay.increment_flow_control_window(len(body) * 1000 + 1, stream_id if flag else None)
                elif action == "ping":
                    relay.ping(body[:8].ljust(8, b"\0"))
                elif action == "settings":
                    relay.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: len(body) * 2000})
            except h2.exceptions.H2Error:
                continue  # the client's own state machine refused: nothing was sent
            except Exception:  # h2 breaks on input its validation would have refused
                confused = True
            # Each action is answered before the next, as the relay would see it.
            harness.feed(relay.data_to_send(), cuts)
            if not harness.check(self):
                break
        if harness.check(self) and not confused:
            # Still up: it must still serve a plain request.
            try:
                relay.receive_data(harness.websocket.take())
            except h2.exceptions.ProtocolError:
                return  # the fuzzed client itself is confused by what it provoked
            follow_up = relay.get_next_available_stream_id()
            relay.send_headers(follow_up, [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/next"),
                                           (b":authority", b"a")], end_stream=True)
            harness.feed(relay.data_to_send(), [])
            self.assertTrue(harness.check(self))
            events = relay.receive_data(harness.websocket.take())
            answers = [e for e in events if isinstance(e, h2.events.ResponseReceived) and e.stream_id == follow_up]
            self.assertEqual([dict(e.headers)[b":status"] for e in answers], [b"200"])
        harness.close(self)
