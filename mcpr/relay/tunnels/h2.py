"""The relay's end of an HTTP/2 tunnel: public requests become h2 streams.

The relay is the h2 client.  Each public request is one stream; response
data is acknowledged only once it was handed to the public client and that
client is reading, so one slow reader stalls only its own stream (after
STREAM_WINDOW bytes) and the tunnel's memory stays bounded.  Request bodies
are read from twisted.web's spool file as the gateway's window allows.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from mcpr.common import protocol as wire
from mcpr.common.protocol import CloseCode
from mcpr.relay.tunnels.contract import ResponseSink, SocketTunnel, TunnelRequest

log = Logger()

# Headers HTTP/2 forbids (RFC 9113 §8.2.2), beyond the hop-by-hop ones the front already dropped.
_FORBIDDEN = {b"host", b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}


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
                 close: Callable[[int, str], None]) -> None:
        super().__init__(subdomain, owner, close)
        self._send = send_binary
        self._streams: dict[int, _RelayStream] = {}
        self._blocked: dict[int, _RelayStream] = {}
        self._waiting: deque[_RelayStream] = deque()
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))

    def start(self) -> None:
        """Send the connection preface, after the registration ack has gone out."""
        self.conn.initiate_connection()
        self.conn.update_settings({
            SettingCodes.INITIAL_WINDOW_SIZE: wire.STREAM_WINDOW,
            SettingCodes.MAX_FRAME_SIZE: wire.MAX_FRAME,
            SettingCodes.ENABLE_PUSH: 0,
        })
        self.conn.increment_flow_control_window(wire.CONNECTION_WINDOW - 65535)
        self._flush()

    @property
    def in_flight(self) -> int:
        return len(self._streams) + len(self._waiting)

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            for part in wire.split(data):
                self._send(part)

    # -- requests out

    def open_stream(self, request: TunnelRequest, sink: ResponseSink) -> _RelayStream:
        stream = _RelayStream(self, request, sink)
        self._waiting.append(stream)
        self._start_waiting()
        return stream

    def _start_waiting(self) -> None:
        """Open queued streams while the gateway's MAX_CONCURRENT_STREAMS allows."""
        while self._waiting and (self.conn.open_outbound_streams
                                 < self.conn.remote_settings.max_concurrent_streams):
            self._open(self._waiting.popleft())
        self._flush()

    def _open(self, stream: _RelayStream) -> None:
        request = stream.request
        stream.id = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", request.method),
            (b":scheme", b"https"),
            (b":authority", _authority(request.headers)),
            (b":path", request.path or b"/"),
        ]
        headers += [(n, v) for n, v in request.headers if n not in _FORBIDDEN and not n.startswith(b":")]
        if stream.body is not None:
            # With a length, the gateway keeps a small body in memory instead of a spool file.
            headers.append((b"content-length", b"%d" % request.body_length))
        self._streams[stream.id] = stream
        try:
            self.conn.send_headers(stream.id, headers, end_stream=stream.body is None)
        except H2Error as e:
            self._finish(stream)
            stream.sink.fail(f"cannot open a tunnel stream: {e}")
            return
        if stream.body is not None:
            self._send_body(stream)

    def _send_body(self, stream: _RelayStream) -> None:
        """Send as much of the body as the gateway's windows allow; WindowUpdated resumes it."""
        while stream.body is not None and not stream.done:
            window = self.conn.local_flow_control_window(stream.id)
            if window <= 0:
                self._blocked[stream.id] = stream
                return
            chunk = stream.body.read(min(window, self.conn.max_outbound_frame_size))
            if not chunk:
                stream.body = None
                self.conn.end_stream(stream.id)
                break
            self.conn.send_data(stream.id, chunk)
        self._blocked.pop(stream.id, None)

    def reset(self, stream: _RelayStream) -> None:
        if stream.id == 0:
            if stream in self._waiting:
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
            pass
        self._start_waiting()

    def acknowledge(self, stream: _RelayStream) -> None:
        """Open the window by what the public client has taken, once it is reading again."""
        if stream.unacked and not stream.paused and not stream.done:
            size, stream.unacked = stream.unacked, 0
            try:
                self.conn.acknowledge_received_data(size, stream.id)
            except H2Error:
                return
            self._flush()

    # -- the gateway's answers in

    def message(self, payload: bytes, is_binary: bool) -> None:
        if not is_binary:
            self._close(CloseCode.POLICY, "text message on an h2 tunnel")
            return
        try:
            events = self.conn.receive_data(payload)
        except H2Error as e:
            log.warn("tunnel {subdomain}: HTTP/2 protocol error ({why}); closing it", subdomain=self.subdomain,
                     why=str(e))
            self._flush()
            self._close(CloseCode.POLICY, "HTTP/2 protocol error")
            return
        for event in events:
            self._handle(event)
        self._flush()

    def _handle(self, event: Event) -> None:
        if isinstance(event, WindowUpdated):
            targets = list(self._blocked.values()) if event.stream_id == 0 else (
                [self._blocked[event.stream_id]] if event.stream_id in self._blocked else [])
            for target in targets:
                self._send_body(target)
            return
        if isinstance(event, ConnectionTerminated):
            self._close(CloseCode.POLICY, "gateway ended the HTTP/2 connection")
            return
        stream = self._streams.get(getattr(event, "stream_id", 0) or 0)
        if stream is None:
            return  # a stream we reset, or one the gateway never had
        if isinstance(event, ResponseReceived):
            status, headers = _response_head(event.headers)
            stream.sink.head(status, headers)
            stream.sink.register(stream)
        elif isinstance(event, DataReceived):
            if event.data:
                stream.sink.data(event.data)
            stream.unacked += event.flow_controlled_length
            self.acknowledge(stream)
        elif isinstance(event, StreamEnded):
            self._finish(stream)
            stream.sink.end()
        elif isinstance(event, StreamReset):
            self._finish(stream)
            stream.sink.fail("the gateway reset the stream")
        elif isinstance(event, TrailersReceived):
            pass

    def _finish(self, stream: _RelayStream) -> None:
        stream.done = True
        self._streams.pop(stream.id, None)
        self._blocked.pop(stream.id, None)
        if self._waiting:
            self._start_waiting()

    def closed(self) -> None:
        """The socket is gone: every open stream fails (aborted, or 502 if it had no head yet)."""
        streams = [*self._streams.values(), *self._waiting]
        self._streams, self._waiting = {}, deque()
        self._blocked.clear()
        for stream in streams:
            stream.done = True
            stream.sink.fail("tunnel closed")


def _authority(headers: list[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name == b"host":
            return value
    return b"localhost"


def _response_head(headers: list[tuple[bytes, bytes]]) -> tuple[int, list[tuple[bytes, bytes]]]:
    status = 502
    out = []
    for name, value in headers:
        if name == b":status":
            status = int(value)
        elif not name.startswith(b":"):
            out.append((name, value))
    return status, out
