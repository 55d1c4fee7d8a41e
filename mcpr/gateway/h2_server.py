"""The gateway's end of an HTTP/2 tunnel: Twisted's own HTTP/2 server over WebSocket messages.

Tunnel streams are served by twisted.web's `H2Connection` and the same
`ProxyResource` as direct mode, so routing, sessions, events and CSP are
identical and there is no loopback HTTP hop.  All it needs is a transport
whose writes become binary WebSocket messages.

Twisted's connection is adapted for holding a whole tunnel (`TunnelConnection`),
and the relay may be honest but buggy, so nothing it sends may leave the tunnel
half-dead: input that breaks HTTP/2's rules ends the connection (GOAWAY, then
the socket closes with 1000), any other failure inside the HTTP/2 machinery
closes the socket with 1011; either way the tunnel client reconnects and gets
a fresh connection.
"""

from __future__ import annotations

import typing
from collections import OrderedDict
from typing import Any, Iterable

from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings
from priority import DeadlockError, DuplicateStreamError, MissingStreamError, TooManyStreamsError
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IProducer,
    IProtocol,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._http2 import _END_STREAM_SENTINEL, H2Connection  # private: see TunnelConnection
from twisted.web.server import Site
from zope.interface import implementer

from mcpr.common import h2_frames  # noqa: F401  (frames' cheap repr: see there)
from mcpr.common import protocol as wire

log = Logger()

# Bytes of DATA the send loop frames per reactor turn before it lets the reactor run (fairness
# towards the relay's input and the upstream sockets).
SEND_TURN = 256 * 1024


class TunnelSocket(typing.Protocol):
    """The WebSocket the HTTP/2 byte stream travels in (`TunnelProtocol`, or a test's fake)."""

    transport: Any

    def sendMessage(self, payload: bytes, isBinary: bool) -> None: ...

    def sendClose(self, code: int) -> None: ...

    def dropConnection(self, abort: bool) -> None: ...

    def fail_tunnel(self, reason: str) -> None:
        """Close the socket with 1011: the HTTP/2 connection broke, so reconnect for a fresh one."""


@implementer(ITransport, IConsumer)
class MessageTransport:
    """An ITransport over a WebSocket: the HTTP/2 byte stream, cut into binary messages.

    No producer is registered on the socket: the relay's HTTP/2 windows
    already bound what the gateway may send (CONNECTION_WINDOW), and a paused
    H2Connection buffers its WINDOW_UPDATEs and aborts the whole tunnel once
    17 KiB of them pile up, which a large upload in the other direction does.
    """

    disconnecting = False

    def __init__(self, websocket: TunnelSocket, clock: IReactorTime) -> None:
        self._ws = websocket
        self._clock = clock
        self._pending: list[bytes] = []
        self._size = 0
        self._flush_call: IDelayedCall | None = None

    def write(self, data: bytes) -> None:
        """Buffer `data` until `flush`: what one reactor turn writes (headers, data, acknowledgements
        of several streams) goes out as one message, not one message (and one mask) per frame."""
        if data and not self.disconnecting:
            self._pending.append(data)
            self._size += len(data)
            if self._size >= wire.MAX_MESSAGE:
                self.flush()
            elif self._flush_call is None:
                self._flush_call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Send what is buffered; the connection calls it at the end of each input and send turn."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if not self._pending:
            return
        data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._size = [], 0
        if not self.disconnecting:
            for part in wire.split(data):
                self._ws.sendMessage(part, isBinary=True)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.flush()  # a GOAWAY may be waiting in the buffer
            self.disconnecting = True
            self._ws.sendClose(1000)

    def abortConnection(self) -> None:
        self.disconnecting = True
        self._ws.dropConnection(abort=True)

    def fail(self, reason: str) -> None:
        """End the socket after a failure: nothing more is written, and the tunnel reconnects."""
        if not self.disconnecting:
            self.disconnecting = True
            self._ws.fail_tunnel(reason)

    def getPeer(self) -> IAddress:
        assert self._ws.transport is not None
        return self._ws.transport.getPeer()

    def getHost(self) -> IAddress:
        assert self._ws.transport is not None
        return self._ws.transport.getHost()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


# Response headers HTTP/2 cannot carry and h2 raises on *while* HPACK-encoding,
# after earlier fields went into the encoder's table, desynchronising the
# relay's decoder: an empty name, a pseudo-header (Twisted adds `:status`),
# and TE (h2 allows only `TE: trailers`, and TE means nothing in a response).
def _unsendable(name: bytes) -> bool:
    return not name or name[0] == 0x3A or (len(name) == 2 and name.lower() == b"te")


class _SendableStreams:
    """The send loop's scheduler, in place of Twisted's `priority.PriorityTree`: the streams that
    can send now, served round robin, each in O(1).

    The tree's `__next__` pops every blocked stream on its way to an active
    one, so with a thousand streams waiting for their upstreams each frame
    cost a thousand heap operations (under locks: the tree uses
    `queue.PriorityQueue`), and 1,000 simultaneous requests through one
    tunnel took 15 s instead of 6.5.  Priorities are ignored anyway (see
    `TunnelConnection`), so only the order of the ready streams is kept.

    It also parks a stream that has data but no window left.  Twisted's loop
    would pick such a stream again and again, send nothing and reschedule
    itself with `callLater(0)`, a busy loop for as long as a public client
    does not read; the connection unparks it when a WINDOW_UPDATE or new
    SETTINGS open its window.

    The interface is the part of the tree's that Twisted's connection uses,
    with its errors: `insert_stream`, `remove_stream`, `block`, `unblock` and
    `next()`, which raises `DeadlockError` when no stream can send.
    """

    def __init__(self, connection: "TunnelConnection", maximum_streams: int) -> None:
        self._connection = connection
        self._maximum = maximum_streams
        self._known: set[int] = set()
        self._ready: OrderedDict[int, None] = OrderedDict()  # the round-robin line
        self.parked: set[int] = set()

    def insert_stream(self, stream_id: int, depends_on: int | None = None, weight: int = 16,
                      exclusive: bool = False) -> None:
        if stream_id in self._known:
            raise DuplicateStreamError(f"stream {stream_id} is already scheduled")
        if len(self._known) >= self._maximum:
            raise TooManyStreamsError(f"at most {self._maximum} streams")
        self._known.add(stream_id)
        self._ready[stream_id] = None  # new streams are active, as in the tree (Twisted blocks them at once)

    def remove_stream(self, stream_id: int) -> None:
        self._check(stream_id)
        self._known.discard(stream_id)
        self._ready.pop(stream_id, None)
        self.parked.discard(stream_id)

    def block(self, stream_id: int) -> None:
        self._check(stream_id)
        self._ready.pop(stream_id, None)

    def unblock(self, stream_id: int) -> None:
        self._check(stream_id)
        self._ready.setdefault(stream_id, None)  # a stream already in line keeps its place

    @property
    def scheduled(self) -> frozenset[int]:
        """Every stream in the scheduler, ready, blocked or parked (tests check it matches Twisted's)."""
        return frozenset(self._known)

    def _check(self, stream_id: int) -> None:
        if stream_id not in self._known:
            raise MissingStreamError(f"stream {stream_id} is not scheduled")

    def __iter__(self) -> "_SendableStreams":
        return self

    def __next__(self) -> int:
        while self._ready:
            stream_id, _ = self._ready.popitem(last=False)
            if self._connection.can_send(stream_id):
                self._ready[stream_id] = None  # to the end of the line
                return stream_id
            self.parked.add(stream_id)
        raise DeadlockError("no stream can send")


class TunnelConnection(H2Connection):
    """Twisted's HTTP/2 server connection, made safe to hold a whole tunnel.

    Private Twisted API, on purpose and only here (checked against Twisted 26.10):
    twisted.web has no public HTTP/2 server connection.  Its only public road
    to `twisted.web._http2.H2Connection` is the channel `Site.buildProtocol`
    makes, on a transport whose `negotiatedProtocol` (ALPN) is h2: that channel
    swaps in an H2Connection, wires it to the site with the same attributes
    as `serve_streams` does (twisted/web/http.py,
    `_GenericHTTPChannelProtocol.dataReceived`) and connects it at once, so
    h2's default settings (100 streams, 64 KiB windows) go out before anyone
    can change them.  So the connection is built here, its settings are put on
    its h2 state machine (`conn`, driven through the `h2` library's public API)
    before `makeConnection` sends the preface, and these methods are changed:

    - `priority`: a round-robin scheduler of the streams that can send
      (`_SendableStreams`) instead of Twisted's `priority.PriorityTree`, which
      costs a heap operation per blocked stream per frame and holds at most
      1,000 entries, the root included (it raised `TooManyStreamsError` beyond,
      after registering the stream elsewhere, so that closing then raised
      `MissingStreamError`).  Ours holds what we advertise, `MAX_STREAMS`, so
      the relay, which queues beyond our MAX_CONCURRENT_STREAMS, can use every
      slot and 1,000 simultaneous requests run at once.  It parks streams
      whose window is spent, which Twisted's send loop would otherwise spin
      on; `_handleWindowUpdate` and new SETTINGS unpark them and wake the loop.
    - `_handlePriorityUpdate`: PRIORITY signals are ignored (RFC 9113 §5.3.2
      deprecates them; the relay sends none).  Honouring them would put idle or
      already-closed streams into the tree, where Twisted never removes them,
      until it overflows; so every stream is served round-robin at one weight,
      and the tree holds exactly the streams Twisted serves, which h2 bounds by
      MAX_CONCURRENT_STREAMS.
    - `CONNECT` (the one request without `:path`, which Twisted cannot
      represent and crashed on) is answered 501 and its stream reset; the
      frames of it that h2 had already read are dropped, not a `KeyError`.
    - `_requestAborted`: no Rapid Reset budget (see there): a thousand public
      clients leaving at once no longer end the tunnel.
    - Any other exception out of input handling, the send loop (run from the
      reactor, where a failure would stop all sending for good) or a header
      write ends the tunnel (`MessageTransport.fail`, close 1011): the
      connection's state can no longer be trusted, and a reconnect is cheap.
    """

    transport: MessageTransport | None

    def __init__(self, reactor: IReactorTime) -> None:
        super().__init__(reactor)
        self.priority = self._tree = _SendableStreams(self, wire.MAX_STREAMS)
        self._failed = False
        self._initial_window = self.conn.remote_settings.initial_window_size

    def can_send(self, stream_id: int) -> bool:
        """Whether the send loop can make progress on a stream: its next chunk is empty (or the
        end of the stream), or its window has room."""
        queue = self._outboundStreamQueues[stream_id]
        head = queue[0] if queue else None
        return not (isinstance(head, bytes) and head) or self.conn.local_flow_control_window(stream_id) > 0

    def _unpark(self, stream_id: int) -> None:
        """Unblock parked streams (`stream_id`, or all for 0) that have window again, and wake the
        send loop if it sleeps: Twisted's own WINDOW_UPDATE handling unblocks streams but never
        wakes it, which only its busy loop made harmless."""
        parked = self._tree.parked
        candidates = list(parked) if not stream_id else [stream_id] if stream_id in parked else []
        for candidate in candidates:
            if self.conn.local_flow_control_window(candidate) > 0:
                parked.discard(candidate)
                if self._outboundStreamQueues[candidate]:  # the send loop pops from an unblocked stream
                    self.priority.unblock(candidate)
        if self._sendingDeferred is not None:
            wake, self._sendingDeferred = self._sendingDeferred, None
            wake.callback(None)

    def _fail(self, failure: Failure, where: str) -> None:
        """Log, stop, and close the tunnel: the HTTP/2 state is no longer trustworthy."""
        if self._failed:
            return
        self._failed = True
        log.failure("tunnel: the gateway's HTTP/2 server failed in {where}; closing the tunnel to reconnect",
                    failure, where=where)
        if self.transport is not None:
            self.transport.fail(f"gateway HTTP/2 failure: {failure.getErrorMessage()}")
        # The streams end on the next turn: this may run inside a stream's own write, which
        # expects the stream's state to outlive the call.
        self._reactor.callLater(0, self.connectionLost, Failure(ConnectionLost("tunnel HTTP/2 failure")))

    # -- entry points: from the relay, from the reactor, at the end

    def dataReceived(self, data: bytes) -> None:
        if self._failed:
            return
        try:
            super().dataReceived(data)
            if self.transport is not None:
                self.transport.flush()  # the answers (acknowledgements, SETTINGS ACK, PING ACK) at once
            # Twisted ignores SETTINGS; a new initial window size changes every stream's window.
            initial_window = self.conn.remote_settings.initial_window_size
            if initial_window != self._initial_window:
                self._initial_window = initial_window
                self._unpark(0)
        except Exception:
            self._fail(Failure(), "input from the relay")

    def _sendPrioritisedData(self, *args: Any) -> None:
        if self._failed:
            return
        try:
            self._send_turn()
        except Exception:
            self._fail(Failure(), "the send loop")

    def _send_turn(self) -> None:
        """Twisted's send loop, but draining: Twisted sends one frame per reactor turn and then
        reschedules itself with `callLater(0)`, so with N busy streams every response waited N
        turns, each a whole epoll round with everything else the reactor had to do (at 16
        concurrent requests, most of a tunnelled request's latency).  This sends frames round
        robin, as Twisted's does, until every stream is blocked or `SEND_TURN` bytes went out
        (other streams and the relay's input get their turn too), and writes them as one message."""
        if not self._stillProducing:
            return
        sent = 0
        while sent < SEND_TURN:
            if self._consumerBlocked is not None:
                self._consumerBlocked.addCallback(self._sendPrioritisedData)
                break
            try:
                stream = next(self.priority)
            except DeadlockError:  # every stream is blocked: wait until one has data again
                assert self._sendingDeferred is None
                self._sendingDeferred = Deferred()
                self._sendingDeferred.addCallback(self._sendPrioritisedData)
                break
            sent += self._send_one(stream)
        else:
            self._reactor.callLater(0, self._sendPrioritisedData)
        if self.transport is not None:
            self.transport.flush()

    def _send_one(self, stream: int) -> int:
        """One chunk of `stream`'s queue, as Twisted's loop body does; the bytes it framed."""
        queue = self._outboundStreamQueues[stream]
        frame_data = queue.popleft()
        if frame_data is _END_STREAM_SENTINEL:
            self.conn.end_stream(stream)
            assert self.transport is not None
            self.transport.write(self.conn.data_to_send())
            self._requestDone(stream)
            return 9
        max_frame = min(self.conn.max_outbound_frame_size, self.conn.local_flow_control_window(stream))
        if len(frame_data) > max_frame:
            queue.appendleft(frame_data[max_frame:])
            frame_data = frame_data[:max_frame]
        if frame_data:
            self.conn.send_data(stream, frame_data)
            assert self.transport is not None
            self.transport.write(self.conn.data_to_send())
        if not queue:
            self.priority.block(stream)
        if self.remainingOutboundWindow(stream) <= 0:
            self.streams[stream].flowControlBlocked()
        return len(frame_data) + 9

    def connectionLost(self, reason: Failure = connectionDone, _cancelTimeouts: bool = True) -> None:
        try:
            super().connectionLost(reason, _cancelTimeouts)
        except Exception:
            log.failure("tunnel: error while ending the HTTP/2 connection's streams")

    # -- relay input

    def _requestReceived(self, event: Any) -> None:
        if any(name == b":path" for name, _ in event.headers):
            super()._requestReceived(event)
            return
        # h2 allows only CONNECT without :path; nothing behind the gateway could serve it.
        self.conn.send_headers(event.stream_id, [(b":status", b"501"), (b"content-length", b"0")],
                               end_stream=True)
        if event.stream_ended is None:
            self.conn.reset_stream(event.stream_id, ErrorCodes.NO_ERROR)  # no body is wanted

    # Frames of a stream answered above that came in the same read as its HEADERS: the stream is
    # unknown to Twisted, which would raise KeyError.  Its data goes back to the connection window.
    # (A reset of it is ignored below.)

    def _requestDataReceived(self, event: Any) -> None:
        if self._streamIsActive(event.stream_id):
            super()._requestDataReceived(event)
        else:
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)

    def _requestEnded(self, event: Any) -> None:
        if self._streamIsActive(event.stream_id):
            super()._requestEnded(event)

    def _requestAborted(self, event: Any) -> None:
        """Twisted's, without its Rapid Reset budget (CVE-2023-44487: 1,000 resets, then 33 a
        second, then GOAWAY): the relay resets a stream for every public client that leaves, so a
        thousand clients leaving at once ended the tunnel, and every other user's streams with it.
        Rapid Reset is the edge's to counter, where the clients are; the relay's public side is
        HTTP/1.1, whose clients can only leave, one connection each, under the relay's limits."""
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.connectionLost(Failure(ConnectionLost(f"Stream reset with code {event.error_code}")))
            self._requestDone(event.stream_id)

    def _handlePriorityUpdate(self, event: Any) -> None:
        pass

    def _handleWindowUpdate(self, event: Any) -> None:
        super()._handleWindowUpdate(event)
        self._unpark(event.stream_id)

    # -- from a stream's request

    def writeDataToStream(self, streamID: int, data: bytes) -> None:
        super().writeDataToStream(streamID, data)  # may send it at once, window permitting
        if self._outboundStreamQueues.get(streamID) and self.conn.local_flow_control_window(streamID) <= 0:
            self._tree.parked.add(streamID)  # Twisted left it blocked: new SETTINGS may unblock it too

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: list[tuple[bytes, bytes]],
                     streamID: int) -> None:
        if any(_unsendable(name) for name, _ in headers):
            dropped = sorted({name for name, _ in headers if _unsendable(name)})
            log.warn("tunnel: response headers HTTP/2 cannot carry were dropped: {names}",
                     names=", ".join(repr(n) for n in dropped))
            headers = [(name, value) for name, value in headers if not _unsendable(name)]
        try:
            super().writeHeaders(version, code, reason, headers, streamID)
        except Exception:
            self._fail(Failure(), "a response's headers")


def serve_streams(websocket: TunnelSocket, site: Site, reactor: IReactorTime) -> IProtocol:
    """An HTTP/2 server connection for `site`, writing into `websocket`.

    Feed it with `dataReceived`; `connectionLost` ends every stream, whose
    requests then see their client leave.
    """
    connection = TunnelConnection(reactor)
    # The relay multiplexes every public request of this gateway onto one
    # connection: allow more concurrent streams than h2's default 100 (the
    # relay's per-tunnel in-flight cap is 256 by default and queues beyond this).
    # Larger windows for request bodies too, as the relay grants for responses.
    connection.conn.local_settings = Settings(client=False, initial_values={
        SettingCodes.MAX_CONCURRENT_STREAMS: wire.MAX_STREAMS,
        SettingCodes.INITIAL_WINDOW_SIZE: wire.STREAM_WINDOW,
    })
    connection.requestFactory = site.requestFactory  # type: ignore[attr-defined]
    connection.site = site  # type: ignore[assignment]
    connection.factory = site  # type: ignore[assignment]
    connection.timeOut = None  # liveness is the WebSocket pings' job; SSE streams may idle for hours
    transport = MessageTransport(websocket, reactor)
    connection.makeConnection(transport)
    connection.conn.increment_flow_control_window(wire.CONNECTION_WINDOW - 65535)  # from h2's default
    transport.write(connection.conn.data_to_send())
    transport.flush()
    return connection
