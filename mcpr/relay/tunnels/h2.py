"""The relay's end of an HTTP/2 tunnel: public requests become h2 streams.

The relay is the h2 client.  Each public request is one stream; response
data is acknowledged only once it was handed to the public client and that
client is reading, so one slow reader stalls only its own stream (after
STREAM_WINDOW bytes) and the tunnel's memory stays bounded.  A stream that
ends, is reset or is abandoned gives what it had not acknowledged back to
the connection window, or the tunnel would starve.  Request bodies are read
from twisted.web's spool file as the gateway's window allows, and only while
the socket towards the gateway is not backed up (`guard.Outbound`), whatever
window the gateway grants.

Whatever the gateway sends only ever fails the stream it is about, or closes
this tunnel: a bad `:status` is a 502 for its request, an exception while
handling an event fails that event's stream, control frames beyond the
budget (`guard.ControlBudget`) get GOAWAY ENHANCE_YOUR_CALM, and an HTTP/2
protocol error gets the GOAWAY h2 prepares.  Request headers are validated
before h2 sees them, because h2 validates lazily while HPACK-encoding: an
error raised half-way has already changed the encoder's table, and the
gateway could not decode the next request.
"""

from __future__ import annotations

import functools
import re
from collections import deque
from typing import Any, Callable

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes
from h2.utilities import HeaderValidationFlags, normalize_outbound_headers, validate_outbound_headers
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from mcpr.common import h2_frames  # noqa: F401  (frames' cheap repr: see there)
from mcpr.common import protocol as wire
from mcpr.common.protocol import CloseCode
from mcpr.relay.tunnels.contract import ResponseSink, SocketTunnel, Stream, TunnelRequest
from mcpr.relay.tunnels.guard import ControlBudget, Outbound
from mcpr.relay.tunnels.pool import SocketPool

log = Logger()

# Headers HTTP/2 forbids (RFC 9113 §8.2.2), beyond the hop-by-hop ones the front already dropped.
_FORBIDDEN = {b"host", b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}

_REQUEST = HeaderValidationFlags(is_client=True, is_trailer=False, is_response_header=False, is_push_promise=False)

# What the gateway's h2 refuses on receipt (RFC 9113 §8.2.1), as a connection error that would end
# the whole tunnel: names of visible lower-case ASCII without ':', values with NUL, CR or LF (h2's
# normalisation has stripped surrounding blanks).  Regular expressions keep the checks in C.
_NAME = re.compile(rb"[\x21-\x39\x3b-\x40\x5b-\x7e]+")
_BAD_VALUE = re.compile(rb"[\x00\n\r]")

# Frame types that carry no response data (RFC 9113 §6): each costs h2 some work and some of
# them an answer (PING and SETTINGS are acknowledged), so they draw on the control budget.
_DATA, _HEADERS = 0x0, 0x1
_END_STREAM = 0x1
_FRAME_HEADER = 9
# A message that completes no frame header and is this short brings nothing but its own cost.
_TINY_MESSAGE = 1024

# Body bytes sent between flushes: the socket's producer can only pause us when we write.
_FLUSH_EVERY = 256 * 1024

# A refused stream (REFUSED_STREAM: the gateway did not process it) is sent again this often.
_MAX_REFUSALS = 3

# Public clients that stop reading but stay connected keep their stream's received bytes
# unacknowledged (up to STREAM_WINDOW each), and those count against the tunnel's one connection
# window: eight of them would stall every other response on the tunnel.  Stalled streams may
# hold at most this share of it together; past it, or when what is left of the window is less
# than a stream window while they hold at least one (h2 hands acknowledged bytes back to the
# gateway only in batches of half the window), the stream holding most is cut, its public
# connection aborted.  A lone slow reader is never cut.
_STALLED_SHARE = wire.CONNECTION_WINDOW // 2

# Until the gateway's SETTINGS arrive, h2 assumes it takes any number of streams; a burst in the
# first round trip could then open more than it holds.  RFC 9113 §6.5.2 suggests at least 100.
_STREAMS_BEFORE_SETTINGS = 100

# One configuration for every tunnel's h2 (h2 only reads it).  The encoder gets a list validated
# beforehand (_request_headers), never a lazy one.
_CONFIG = H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False,
                          normalize_outbound_headers=False)

# Until a tunnel's first request, the gateway only ever sends the frames below, and the relay's h2
# state would be 14 KiB per tunnel for nothing (most of it `h2.settings.Settings`, a deque per
# setting per side): they are answered here, and the frames that change h2's state are kept to be
# replayed into it when it is built (`H2Tunnel.conn`).  Anything else, or more of them than this
# many bytes, builds it at once, so that h2 judges every frame it would have judged before.
_SETTINGS, _PING, _WINDOW_UPDATE = 0x4, 0x6, 0x8
_ACK = 0x1
_SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"
_PING_ACK_HEAD = b"\x00\x00\x08\x06\x01\x00\x00\x00\x00"
_MAX_EARLY = 1024
_MAX_WINDOW = 2**31 - 1
# SETTINGS values h2 accepts whatever the state (RFC 9113 §6.5.2); any other setting or value
# builds h2, whose answer may be a GOAWAY.
_SETTING_OK: dict[int, Callable[[int], bool]] = {
    SettingCodes.HEADER_TABLE_SIZE: lambda v: True,
    SettingCodes.ENABLE_PUSH: lambda v: v == 0,
    SettingCodes.MAX_CONCURRENT_STREAMS: lambda v: True,
    SettingCodes.INITIAL_WINDOW_SIZE: lambda v: v <= _MAX_WINDOW,
    SettingCodes.MAX_FRAME_SIZE: lambda v: 16384 <= v <= 16777215,
    SettingCodes.MAX_HEADER_LIST_SIZE: lambda v: True,
    SettingCodes.ENABLE_CONNECT_PROTOCOL: lambda v: v in (0, 1),
}


def _prepare(conn: H2Connection) -> None:
    """What the relay's end says first: its settings and its connection window."""
    conn.initiate_connection()
    conn.update_settings({
        SettingCodes.INITIAL_WINDOW_SIZE: wire.STREAM_WINDOW,
        SettingCodes.MAX_FRAME_SIZE: wire.MAX_FRAME,
        SettingCodes.ENABLE_PUSH: 0,
    })
    conn.increment_flow_control_window(wire.CONNECTION_WINDOW - 65535)


@functools.cache
def _preface() -> bytes:
    """The relay's connection preface: the same bytes for every tunnel."""
    conn = H2Connection(_CONFIG)
    _prepare(conn)
    return conn.data_to_send()


class _Unforwardable(Exception):
    """A request whose headers cannot go on the tunnel as they are."""


@implementer(IPushProducer)
class _RelayStream:
    """One public request in flight; the public request's backpressure pauses it."""

    def __init__(self, tunnel: "H2Tunnel", request: TunnelRequest, sink: ResponseSink) -> None:
        self.tunnel = tunnel
        self.id = 0  # assigned when the stream opens; 0 while it waits for a free stream slot
        self.request = request
        self.sink = sink
        self.body = request.body if request.body_length else None
        self.paused = False
        self.unacked = 0
        self.started = False  # a response head went to the sink
        self.refusals = 0
        self.done = False

    # IPushProducer, driven by the public client's transport
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self.tunnel.acknowledge(self)

    def stopProducing(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        """The public client left (or timed out): reset the stream so the gateway stops too."""
        self.tunnel.reset(self)


class H2Tunnel(SocketTunnel):
    """One registered gateway speaking `mcpr-tunnel.h2`."""

    def __init__(self, subdomain: str, owner: str, send_binary: Callable[[bytes], None],
                 close: Callable[[int, str], None], *, budget: ControlBudget, outbound: Outbound) -> None:
        super().__init__(subdomain, owner, close)
        self._send = send_binary
        self._streams: dict[int, _RelayStream] = {}
        self._blocked: dict[int, _RelayStream] = {}
        self._waiting: deque[_RelayStream] | None = None  # made at the first request (a deque is 760 bytes)
        self._budget = budget
        self._outbound = outbound
        outbound.drained = self._drained
        self._ceiling: int | None = None  # streams the gateway showed it holds, below its SETTINGS
        self._settings_seen = False  # the gateway's first SETTINGS have arrived
        self._unacked = 0  # bytes received on all streams and not yet acknowledged (stalled readers)
        self._dead = False  # closing: nothing more is read or written
        # Where the inbound byte stream is, to count frames: payload bytes left of the current
        # frame, and the start of a frame header cut by a message boundary.
        self._skip = 0
        self._partial = bytearray()
        self._conn: H2Connection | None = None
        self._started = False
        # Before h2 is built: the gateway's frames it must replay, and its connection window so far.
        self._early = b""
        self._early_window = 65535
        self.pool: SocketPool | None = None
        """Its gateway's pooled sockets, if it asked for them: requests take an idle one first."""

    @property
    def conn(self) -> H2Connection:
        """h2's state of this tunnel, built when first needed: at the first request, or for a
        gateway frame that only h2 may judge (an idle tunnel never needs it)."""
        conn = self._conn
        if conn is None:
            conn = self._conn = H2Connection(_CONFIG)
            _prepare(conn)
            if self._started:
                conn.data_to_send()  # the preface went out at start()
            early, self._early = self._early, b""
            if early:
                self._replay(conn, early)
        return conn

    def _replay(self, conn: H2Connection, early: bytes) -> None:
        """Feed h2 the gateway's frames that were answered before it existed (`_early_frames`
        only keeps frames h2 accepts, so this never fails unless h2 changes)."""
        try:
            conn.receive_data(early)
        except H2Error as e:
            log.warn("tunnel {subdomain}: h2 refused the gateway's first frames ({why}); closing it",
                     subdomain=self.subdomain, why=str(e))
            self._dead = True
            self._close(CloseCode.POLICY, "HTTP/2 protocol error")
        conn.data_to_send()  # their answers went out when they came

    def start(self) -> None:
        """Send the connection preface, after the registration ack has gone out."""
        self._started = True
        if self._conn is None:
            self._send(_preface())
        else:
            self._flush()

    @property
    def in_flight(self) -> int:
        pooled = self.pool.busy if self.pool is not None else 0
        return len(self._streams) + (len(self._waiting) if self._waiting else 0) + pooled

    def _flush(self) -> None:
        if self._conn is None:
            return
        data = self._conn.data_to_send()
        if data:
            for part in wire.split(data):
                self._send(part)

    # -- requests out

    def open_stream(self, request: TunnelRequest, sink: ResponseSink) -> Stream:
        if self.pool is not None and not self._dead:
            pooled = self.pool.open_stream(request, sink)
            if pooled is not None:
                return pooled
        stream = _RelayStream(self, request, sink)
        if self._dead:
            stream.done = True
            sink.fail("tunnel closed")
            return stream
        if self._waiting is None:
            self._waiting = deque()
        self._waiting.append(stream)
        self._start_waiting()
        return stream

    def _start_waiting(self) -> None:
        """Open queued streams while the gateway's MAX_CONCURRENT_STREAMS (and what it showed it
        holds) allows and the socket is not backed up."""
        limit = self.conn.remote_settings.max_concurrent_streams
        if not self._settings_seen:
            limit = min(limit, _STREAMS_BEFORE_SETTINGS)
        if self._ceiling is not None:
            limit = min(limit, self._ceiling)
        while self._waiting and not self._dead and not self._outbound.full \
                and self.conn.open_outbound_streams < limit:
            self._open(self._waiting.popleft())
        self._flush()

    def _open(self, stream: _RelayStream) -> None:
        try:
            headers = self._request_headers(stream)
        except (ProtocolError, _Unforwardable) as e:
            stream.done = True
            stream.sink.fail(f"cannot forward this request: {e}")
            return
        try:
            stream.id = self.conn.get_next_available_stream_id()
        except H2Error:
            log.info("tunnel {subdomain}: HTTP/2 stream ids exhausted; closing it for a fresh connection",
                     subdomain=self.subdomain)
            stream.done = True
            stream.sink.fail("tunnel closed")
            self._end(CloseCode.GOING_AWAY, "HTTP/2 stream ids exhausted", ErrorCodes.NO_ERROR)
            return
        self._streams[stream.id] = stream
        try:
            self.conn.send_headers(stream.id, headers, end_stream=stream.body is None)
        except Exception:
            # The headers were valid, so h2 failed inside; its HPACK table or stream states may no
            # longer match the gateway's, and every later request could be misread: start afresh.
            log.failure("tunnel {subdomain}: h2 failed to send a request's HEADERS; closing the tunnel",
                        subdomain=self.subdomain)
            self._streams.pop(stream.id, None)
            stream.done = True
            stream.sink.fail("tunnel error")
            self._end(CloseCode.INTERNAL_ERROR, "internal error", ErrorCodes.INTERNAL_ERROR)
            return
        if stream.body is not None:
            self._send_body(stream)

    def _request_headers(self, stream: _RelayStream) -> list[Any]:
        """The request's HTTP/2 header list, normalised and validated completely, in h2's own terms
        and in those the gateway's h2 applies on receipt; raises if it cannot be sent."""
        request = stream.request
        raw = [
            (b":method", request.method),
            (b":scheme", b"https"),
            (b":authority", _authority(request.headers)),
            (b":path", request.path or b"/"),
        ]
        raw += [(n, v) for n, v in request.headers if n not in _FORBIDDEN and not n.startswith(b":")]
        if stream.body is not None:
            # With a length, the gateway keeps a small body in memory instead of a spool file.
            raw.append((b"content-length", b"%d" % request.body_length))
        headers = list(normalize_outbound_headers(raw, _REQUEST))
        size = 0
        for name, value in headers:
            if name[:1] != b":" and not _NAME.fullmatch(name):
                raise _Unforwardable(f"header name {name[:40]!r} is not allowed in HTTP/2")
            if _BAD_VALUE.search(value):
                raise _Unforwardable(f"header {name[:40]!r} has a value HTTP/2 does not allow")
            size += len(name) + len(value) + 32
        cap = self.conn.remote_settings.max_header_list_size
        if cap is not None and size > cap:
            raise _Unforwardable(f"headers of {size} bytes, the gateway takes {cap}")
        try:
            return list(validate_outbound_headers(headers, _REQUEST))
        except ProtocolError:
            raise
        except Exception as e:  # h2's checks assume what ours ensured; any slip is still this request's
            raise _Unforwardable(f"h2 refused the headers ({type(e).__name__})") from e

    def _send_body(self, stream: _RelayStream) -> None:
        """Send as much of the body as the gateway's windows and the socket allow; a
        WindowUpdated or the socket draining resumes it."""
        sent = 0
        try:
            while stream.body is not None and not stream.done:
                window = self.conn.local_flow_control_window(stream.id)
                if window <= 0 or self._outbound.full:
                    self._blocked[stream.id] = stream
                    return
                chunk = stream.body.read(min(window, self.conn.max_outbound_frame_size))
                if not chunk:
                    stream.body = None
                    self.conn.end_stream(stream.id)
                    break
                self.conn.send_data(stream.id, chunk)
                sent += len(chunk)
                if sent >= _FLUSH_EVERY:
                    sent = 0
                    self._flush()
        except Exception:
            log.failure("tunnel {subdomain}: sending a request body failed", subdomain=self.subdomain)
            self._fail(stream, "tunnel error", ErrorCodes.INTERNAL_ERROR)
            return
        self._blocked.pop(stream.id, None)

    def _send_blocked(self) -> None:
        # Each body goes to the end of the line once served, so none starves the others.
        for stream in list(self._blocked.values()):
            if self._outbound.full:
                return
            self._blocked.pop(stream.id, None)
            self._send_body(stream)

    def _drained(self) -> None:
        """The socket has written out a full buffer: new streams first, then bodies (there are none
        before h2 is built)."""
        if not self._dead and self._conn is not None:
            self._start_waiting()
            self._send_blocked()
            self._flush()

    def reset(self, stream: _RelayStream) -> None:
        if stream.id == 0:
            if self._waiting and stream in self._waiting:
                self._waiting.remove(stream)
            stream.done = True
            return
        if self._streams.pop(stream.id, None) is None:
            return
        stream.done = True
        self._blocked.pop(stream.id, None)
        try:
            self.conn.reset_stream(stream.id, ErrorCodes.CANCEL)
        except H2Error:
            pass  # the gateway ended or reset it meanwhile
        self._give_back(stream)
        self._start_waiting()

    def acknowledge(self, stream: _RelayStream) -> None:
        """Open the window by what the public client has taken, once it is reading again."""
        if stream.unacked and not stream.paused and not stream.done:
            size, stream.unacked = stream.unacked, 0
            self._unacked -= size
            try:
                self.conn.acknowledge_received_data(size, stream.id)
            except H2Error:
                return
            self._flush()

    def _give_back(self, stream: _RelayStream) -> None:
        """A stream that ended, was reset or abandoned hands back what it never acknowledged;
        h2 takes a closed stream's bytes and credits the connection window only."""
        if stream.unacked:
            size, stream.unacked = stream.unacked, 0
            self._unacked -= size
            try:
                self.conn.acknowledge_received_data(size, stream.id)
            except H2Error:
                pass

    # -- the gateway's answers in

    def message(self, payload: bytes, is_binary: bool) -> None:
        if self._dead:
            return
        if not is_binary:
            self._dead = True
            self._close(CloseCode.POLICY, "text message on an h2 tunnel")
            return
        glitches = self._control_frames(payload)
        if glitches and not self._budget.spend(glitches):
            log.warn("tunnel {subdomain}: flood of HTTP/2 control frames; closing it (GOAWAY ENHANCE_YOUR_CALM)",
                     subdomain=self.subdomain)
            self._end(CloseCode.POLICY, "flood of HTTP/2 control frames", ErrorCodes.ENHANCE_YOUR_CALM)
            return
        if self._conn is None and self._early_frames(payload):
            return
        try:
            events = self.conn.receive_data(payload)
        except H2Error as e:
            # h2 has prepared a GOAWAY with the error's code; it goes out before the close.
            log.warn("tunnel {subdomain}: HTTP/2 protocol error ({why}); closing it", subdomain=self.subdomain,
                     why=str(e))
            self._dead = True
            self._flush()
            self._close(CloseCode.POLICY, "HTTP/2 protocol error")
            return
        except Exception:
            log.failure("tunnel {subdomain}: h2 failed on the gateway's input; closing the tunnel",
                        subdomain=self.subdomain)
            self._end(CloseCode.INTERNAL_ERROR, "internal error", ErrorCodes.INTERNAL_ERROR)
            return
        for event in events:
            if self._dead:
                return
            try:
                self._handle(event)
            except Exception:
                self._event_failed(event)
        self._flush()

    def _control_frames(self, data: bytes) -> int:
        """How many frames in `data` carry no response data: everything but DATA with a payload
        or END_STREAM, and HEADERS of a stream we have open.  Only frame headers are read."""
        count = 0
        pos, end = 0, len(data)
        skip, partial = self._skip, self._partial
        completed = False
        while True:
            if skip:
                step = min(skip, end - pos)
                pos += step
                skip -= step
                if skip:
                    break
            if pos >= end:
                break
            if partial or end - pos < _FRAME_HEADER:
                take = _FRAME_HEADER - len(partial)
                partial += data[pos:pos + take]
                pos += take
                if len(partial) < _FRAME_HEADER:
                    break
                header, at = bytes(partial), 0
                partial.clear()
            else:
                header, at = data, pos
                pos += _FRAME_HEADER
            completed = True
            skip = int.from_bytes(header[at:at + 3], "big")
            kind, flags = header[at + 3], header[at + 4]
            if kind == _DATA:
                count += skip == 0 and not flags & _END_STREAM
            elif kind == _HEADERS:
                count += (int.from_bytes(header[at + 5:at + 9], "big") & 0x7FFFFFFF) not in self._streams
            else:
                count += 1
        self._skip = skip
        if not completed and end < _TINY_MESSAGE:
            count += 1
        return count

    def _early_frames(self, data: bytes) -> bool:
        """Answer a message of the gateway's before h2 is built, if it holds only whole SETTINGS,
        WINDOW_UPDATE (the connection's) and PING frames that h2 would accept, SETTINGS first
        (the gateway's preface); False if h2 must see it, and then nothing of it was answered."""
        early, window, settings_seen = self._early, self._early_window, self._settings_seen
        answers = []
        pos, end = 0, len(data)
        while pos < end:
            if end - pos < _FRAME_HEADER:
                return False
            size = int.from_bytes(data[pos:pos + 3], "big")
            kind, flags = data[pos + 3], data[pos + 4]
            stream_id = int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            payload = data[pos + _FRAME_HEADER:pos + _FRAME_HEADER + size]
            frame = data[pos:pos + _FRAME_HEADER + size]
            pos += _FRAME_HEADER + size
            if stream_id or len(payload) < size or (not settings_seen and (kind != _SETTINGS or flags & _ACK)):
                return False
            if kind == _SETTINGS:
                if flags & _ACK:
                    if size:
                        return False
                else:
                    if size % 6 or not all(
                            _SETTING_OK.get(int.from_bytes(payload[i:i + 2], "big"), _never)(
                                int.from_bytes(payload[i + 2:i + 6], "big")) for i in range(0, size, 6)):
                        return False
                    settings_seen = True
                    answers.append(_SETTINGS_ACK)
                early += frame
            elif kind == _WINDOW_UPDATE:
                increment = int.from_bytes(payload, "big") & 0x7FFFFFFF if size == 4 else 0
                window += increment
                if not increment or window > _MAX_WINDOW:
                    return False
                early += frame
            elif kind == _PING and size == 8:
                if not flags & _ACK:
                    answers.append(_PING_ACK_HEAD + payload)
            else:
                return False
            if len(early) > _MAX_EARLY:
                return False
        self._early, self._early_window, self._settings_seen = early, window, settings_seen
        if answers:
            self._send(b"".join(answers))
        return True

    def _handle(self, event: Event) -> None:
        if isinstance(event, RemoteSettingsChanged):
            self._settings_seen = True
            self._start_waiting()  # MAX_CONCURRENT_STREAMS may have grown
            return
        if isinstance(event, ConnectionTerminated):
            self._dead = True
            self._close(CloseCode.POLICY, "gateway ended the HTTP/2 connection")
            return
        if isinstance(event, WindowUpdated):
            if event.stream_id == 0:
                self._send_blocked()
            elif event.stream_id in self._blocked:
                self._send_body(self._blocked.pop(event.stream_id))
            return
        stream_id = getattr(event, "stream_id", 0) or 0
        stream = self._streams.get(stream_id)
        if stream is None:
            if isinstance(event, DataReceived) and event.flow_controlled_length:
                # h2 counted it in the connection window; nobody will read it.
                self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
            return  # a stream we reset, or one the gateway never had
        if isinstance(event, ResponseReceived):
            status, headers = _response_head(event.headers)
            if status is None:
                self._fail(stream, "the gateway sent an invalid :status", ErrorCodes.PROTOCOL_ERROR)
                return
            stream.started = True
            stream.sink.head(status, headers)
            stream.sink.register(stream)
        elif isinstance(event, DataReceived):
            stream.unacked += event.flow_controlled_length
            self._unacked += event.flow_controlled_length
            if event.data:
                stream.sink.data(event.data)
            self.acknowledge(stream)
            if self._starving():
                self._cut_stalled()
        elif isinstance(event, StreamEnded):
            if self._ceiling is not None:
                self._ceiling += 1  # it held one more than it had refused at
            self._finish(stream)
            stream.sink.end()
        elif isinstance(event, StreamReset):
            if event.error_code == ErrorCodes.REFUSED_STREAM and self._retry(stream):
                return
            self._finish(stream)
            stream.sink.fail("the gateway reset the stream")
        # Informational (1xx) heads and trailers are not forwarded.

    def _starving(self) -> bool:
        """Whether stalled readers hold so much of the connection window that others may stall."""
        return self._unacked > _STALLED_SHARE or (
            self._unacked > wire.STREAM_WINDOW and self.conn.inbound_flow_control_window < wire.STREAM_WINDOW)

    def _cut_stalled(self) -> None:
        """Stalled readers hold too much of the connection window: cut the greediest until they
        no longer do, so every other response on the tunnel keeps flowing."""
        while self._starving():
            stalled = max(self._streams.values(), key=lambda s: s.unacked, default=None)
            if stalled is None or not stalled.unacked:
                return
            log.info("tunnel {subdomain}: cut a download whose client stopped reading ({held} bytes held)",
                     subdomain=self.subdomain, held=stalled.unacked)
            self._fail(stalled, "the public client stopped reading", ErrorCodes.CANCEL)

    def _retry(self, stream: _RelayStream) -> bool:
        """REFUSED_STREAM means the gateway did not process the request (RFC 9113 §8.7), so it may
        go again, once a stream of those the gateway holds has ended.  After a few refusals the
        public client gets a clean 503."""
        if stream.started:
            return False
        self._finish(stream, start_waiting=False)
        if stream.refusals >= _MAX_REFUSALS or not _rewind(stream.request):
            stream.sink.head(503, [(b"content-type", b"text/plain; charset=utf-8"),
                                   (b"cache-control", b"no-store"), (b"retry-after", b"1")])
            stream.sink.data(b"tunnel overloaded: the gateway refused the request\n")
            stream.sink.end()
            return True
        stream.refusals += 1
        stream.id, stream.done = 0, False
        stream.body = stream.request.body if stream.request.body_length else None
        self._ceiling = max(1, self.conn.open_outbound_streams)
        assert self._waiting is not None  # every stream was queued there first
        self._waiting.appendleft(stream)
        self._start_waiting()
        return True

    def _event_failed(self, event: Event) -> None:
        """A bug (ours or the sink's) while handling one event fails only the stream it was for."""
        log.failure("tunnel {subdomain}: handling {event} failed", subdomain=self.subdomain,
                    event=type(event).__name__)
        stream = self._streams.get(getattr(event, "stream_id", 0) or 0)
        if stream is not None:
            try:
                self._fail(stream, "tunnel error", ErrorCodes.INTERNAL_ERROR)
            except Exception:
                log.failure("tunnel {subdomain}: failing a stream failed too", subdomain=self.subdomain)

    def _fail(self, stream: _RelayStream, reason: str, code: ErrorCodes) -> None:
        """End one stream on both sides: RST_STREAM to the gateway, `fail` to the public client."""
        if self._streams.get(stream.id) is stream:
            try:
                self.conn.reset_stream(stream.id, code)
            except H2Error:
                pass
        self._finish(stream)
        stream.sink.fail(reason)

    def _finish(self, stream: _RelayStream, start_waiting: bool = True) -> None:
        stream.done = True
        self._streams.pop(stream.id, None)
        self._blocked.pop(stream.id, None)
        self._give_back(stream)
        if start_waiting and self._waiting:
            self._start_waiting()

    def _end(self, code: CloseCode, reason: str, error: ErrorCodes) -> None:
        """Close this tunnel: a GOAWAY with `error` (the gateway learns why), then the socket;
        the streams fail when the socket is gone (`closed`)."""
        self._dead = True
        try:
            self.conn.close_connection(error, additional_data=reason.encode())
        except H2Error:
            pass
        self._flush()
        self._close(code, reason)

    def closed(self) -> None:
        """The socket is gone: every open stream fails (aborted, or 502 if it had no head yet)."""
        self._dead = True
        self._outbound.drained = None
        if self.pool is not None:
            self.pool.close()
        streams = [*self._streams.values(), *(self._waiting or ())]
        self._streams, self._waiting = {}, None
        self._blocked.clear()
        for stream in streams:
            stream.done = True
            stream.sink.fail("tunnel closed")


def _never(value: int) -> bool:
    return False


def _rewind(request: TunnelRequest) -> bool:
    """Start a request body over, for a resend; False if its spool file cannot seek."""
    if request.body is None or not request.body_length:
        return True
    try:
        request.body.seek(0)
    except (OSError, ValueError):
        return False
    return True


def _authority(headers: list[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name == b"host":
            return value
    return b"localhost"


def _response_head(headers: list[tuple[bytes, bytes]]) -> tuple[int | None, list[tuple[bytes, bytes]]]:
    """The final status (200-599, three digits) and the regular headers; None for any other
    `:status` (h2 sends informational heads, 1xx, as events of their own, which are skipped)."""
    status = None
    out = []
    for name, value in headers:
        if name == b":status":
            if len(value) == 3 and value.isdigit() and b"200" <= value <= b"599":
                status = int(value)
        elif not name.startswith(b":"):
            out.append((name, value))
    return status, out
