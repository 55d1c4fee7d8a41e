"""A gateway that speaks the HTTP/2 tunnel protocol by hand, for tests that need a peer the real
gateway would never be: one that stalls, floods, lies about its status or its windows.

It registers over `/_tunnel/register` with the `mcpr-tunnel.h2` subprotocol,
then runs the `h2` library's server side over the socket's binary messages.
Tests take each public request from `requests`, answer with `respond`/`send`,
and may write anything at all with `send_raw`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from autobahn.twisted.websocket import WebSocketClientProtocol
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, DataReceived, RequestReceived, StreamEnded, StreamReset, WindowUpdated
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint

from tests.support.public import RawClient, raw
from tests.support.ws_client import client_factory, close_cleanly

from mcpr.common.protocol import split

SUBPROTOCOL = "mcpr-tunnel.h2"


@dataclass
class Stream:
    """One public request as the gateway saw it."""

    id: int
    headers: dict[bytes, bytes]
    body: bytearray = field(default_factory=bytearray)
    ended: Deferred = field(default_factory=Deferred)
    reset: Deferred = field(default_factory=Deferred)

    @property
    def method(self) -> bytes:
        return self.headers[b":method"]

    @property
    def path(self) -> bytes:
        return self.headers[b":path"]


class _Protocol(WebSocketClientProtocol):
    def onConnect(self, response) -> None:
        self.factory.gateway.subprotocol = response.protocol

    def onOpen(self) -> None:
        self.factory.gateway._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.gateway._message(payload, isBinary)

    def onClose(self, wasClean: bool, code, reason) -> None:
        self.factory.gateway._closed_with(code, reason)


class H2Gateway:
    """Register `subdomain` with `token`, then serve public requests by hand."""

    def __init__(self, port: int, token: str, subdomain: str, *, max_streams: int = 1024,
                 window: int = 1 << 20, auto_ack: bool = True, pool: int = 0) -> None:
        """`pool`: pooled sockets to ask for (the ack's "pool" then holds the key; `pooled_socket`)."""
        self.port = port
        self.pool = pool
        self.token = token
        self.subdomain = subdomain
        self.auto_ack = auto_ack
        self.requests: DeferredQueue = DeferredQueue()
        self.streams: dict[int, Stream] = {}
        self.closed: Deferred = Deferred()
        self.close_code: int | None = None
        self.ack: dict | None = None
        self.subprotocol: str | None = None
        self.terminated: list[ConnectionTerminated] = []
        self._registered: Deferred = Deferred()
        self.proto: _Protocol | None = None
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self._settings = {0x3: max_streams, 0x4: window}
        self._pending: dict[int, list] = {}  # stream id -> [bytes waiting for window, end?]
        self._window_waiters: list[tuple[int, Deferred]] = []

    async def connect(self) -> dict:
        factory = client_factory(f"ws://127.0.0.1:{self.port}/_tunnel/register",
                                 protocols=[SUBPROTOCOL])
        factory.protocol = _Protocol
        factory.gateway = self
        factory.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(factory)
        return await self._registered

    def _opened(self, proto: _Protocol) -> None:
        self.proto = proto
        hello = {"token": self.token, "subdomain": self.subdomain}
        if self.pool:
            hello["pool"] = self.pool
        proto.sendMessage(json.dumps(hello).encode())

    def _message(self, payload: bytes, binary: bool) -> None:
        if self.ack is None:
            self.ack = json.loads(payload)
            self.conn.initiate_connection()
            self.conn.update_settings(self._settings)
            self.flush()
            self._registered.callback(self.ack)
            return
        for event in self.conn.receive_data(payload):
            self._event(event)
        self.flush()

    def _event(self, event) -> None:
        if isinstance(event, RequestReceived):
            stream = Stream(event.stream_id, dict(event.headers))
            self.streams[event.stream_id] = stream
            self.requests.put(stream)
        elif isinstance(event, DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.body += event.data
            if self.auto_ack and event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.ended.called:
                stream.ended.callback(stream)
        elif isinstance(event, StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.reset.called:
                stream.reset.callback(event.error_code)
        elif isinstance(event, WindowUpdated):
            for stream_id in list(self._pending) if event.stream_id == 0 else [event.stream_id]:
                self._push(stream_id)
            for wanted, d in list(self._window_waiters):
                if self.conn.outbound_flow_control_window >= wanted:
                    self._window_waiters.remove((wanted, d))
                    d.callback(self.conn.outbound_flow_control_window)
        elif isinstance(event, ConnectionTerminated):
            self.terminated.append(event)

    def _closed_with(self, code, reason) -> None:
        self.close_code = code
        if not self._registered.called:
            self._registered.errback(ConnectionError(f"closed {code} {reason}"))
        if not self.closed.called:
            self.closed.callback((code, reason))

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.proto is not None and self.proto.state == self.proto.STATE_OPEN:
            for part in split(data):  # as the real gateway does: messages of at most MAX_MESSAGE
                self.proto.sendMessage(part, isBinary=True)

    def send_raw(self, data: bytes) -> None:
        """Bytes on the tunnel's HTTP/2 stream, bypassing the h2 state machine."""
        self.proto.sendMessage(data, isBinary=True)

    def respond(self, stream: Stream | int, status: int | bytes = 200, body: bytes = b"",
                headers: list[tuple[bytes, bytes]] = (), end: bool = True) -> None:
        stream_id = stream if isinstance(stream, int) else stream.id
        head = [(b":status", status if isinstance(status, bytes) else str(status).encode()), *headers]
        self.conn.send_headers(stream_id, head, end_stream=end and not body)
        if body:
            self.send(stream_id, body, end=end)
        self.flush()

    def send(self, stream: Stream | int, data: bytes, end: bool = False) -> None:
        """`data` on a stream, as fast as the relay's windows allow (the rest waits for WINDOW_UPDATE)."""
        stream_id = stream if isinstance(stream, int) else stream.id
        pending = self._pending.setdefault(stream_id, [bytearray(), False])
        pending[0] += data
        pending[1] = pending[1] or end
        self._push(stream_id)
        self.flush()

    def queued(self, stream: Stream | int) -> int:
        """Bytes of a stream still waiting for the relay to open its window."""
        pending = self._pending.get(stream if isinstance(stream, int) else stream.id)
        return len(pending[0]) if pending else 0

    def _push(self, stream_id: int) -> None:
        pending = self._pending.get(stream_id)
        if pending is None:
            return
        buffer, end = pending
        try:
            while buffer:
                size = min(len(buffer), self.conn.local_flow_control_window(stream_id),
                           self.conn.max_outbound_frame_size)
                if size <= 0:
                    return
                self.conn.send_data(stream_id, bytes(buffer[:size]))
                del buffer[:size]
            if end:
                self.conn.end_stream(stream_id)
        except Exception:  # the stream was reset meanwhile: drop what it had left
            pass
        del self._pending[stream_id]

    def window_at_least(self, size: int) -> Deferred:
        """Fires once the relay has granted this much connection window for our responses."""
        d: Deferred = Deferred()
        if self.conn.outbound_flow_control_window >= size:
            d.callback(self.conn.outbound_flow_control_window)
        else:
            self._window_waiters.append((size, d))
        return d

    async def close(self) -> None:
        if self.proto is not None and not self.closed.called:
            await close_cleanly(self.proto, self.closed)


def pool_upgrade(subdomain: str, key: str, *, host: str = "relay.test") -> bytes:
    return (f"GET /_tunnel/pool HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: mcpr-pool\r\n"
            f"x-mcpr-pool: {subdomain} {key}\r\n\r\n").encode()


async def pooled_socket(gateway: H2Gateway) -> RawClient:
    """One of `gateway`'s pooled sockets, upgraded: what the relay writes into it arrives in `received`
    (the 101 cleared), and the test answers as it likes."""
    assert gateway.ack is not None and "pool" in gateway.ack, "the relay offered no pool"
    client = await raw(gateway.port, pool_upgrade(gateway.subdomain, gateway.ack["pool"]["key"]))
    answer = await client.until(b"\r\n\r\n")
    if not answer.startswith(b"HTTP/1.1 101 "):
        raise AssertionError(f"pooled socket refused: {answer[:200]!r}")
    del client.received[:answer.index(b"\r\n\r\n") + 4]
    return client
