"""The relay end of the original mcpr's JSON tunnel protocol (docs/protocol.md, "Legacy JSON protocol").

Existing mcpr gateways speak it, so our relay keeps serving them: requests go
out as one JSON text message each (body base64), responses come back either
whole (v0.1, untagged) or as a head and chunks (v0.2).  The protocol has no
per-stream flow control, so a slow public client pauses reading the whole
socket; a peer that breaks the protocol is disconnected, alone.

What the gateway sends fails at most the request it is about: a status that
is not a final HTTP status (200-599; the protocol has no informational
responses) is a 502 for that request, and a bug while handling a message
fails its request only.  Messages that carry no data (empty chunks, messages
for finished requests) draw on the socket's control budget; while the socket
towards the gateway is backed up, requests wait in order instead of piling
up in memory (`guard.Outbound`).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import os
from collections import deque
from typing import Any, Callable

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from mcpr.common.protocol import CloseCode, fit_reason
from mcpr.relay.tunnels.contract import ResponseSink, SocketTunnel, TunnelRequest
from mcpr.relay.tunnels.guard import ControlBudget, Outbound

log = Logger()

# Messages for cancelled requests tolerated in a row before the tunnel counts as flooding.
STALE_LIMIT = 1000


class ProtocolViolation(Exception):
    """The gateway sent something the protocol does not allow."""


def _headers_out(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Request headers as the legacy protocol's flat object; repeats are joined as HTTP allows."""
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        if key in out:
            out[key] = out[key] + ("; " if key == "cookie" else ", ") + text
        else:
            out[key] = text
    return out


def _headers_in(value: Any) -> list[tuple[bytes, bytes]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        raise ProtocolViolation("headers must be an object")
    out = []
    for name, v in value.items():
        values = v if isinstance(v, list) else [v]
        for item in values:
            if not isinstance(item, str):
                raise ProtocolViolation("header values must be strings")
            out.append((name.encode("latin-1", "replace"), item.encode("latin-1", "replace")))
    return out


def _decode(data: Any) -> bytes:
    if data is None:
        return b""
    if not isinstance(data, str):
        raise ProtocolViolation("body must be base64 text")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolViolation("body is not valid base64") from None


@implementer(IPushProducer)
class _SocketPause:
    """Pauses the whole tunnel socket while any public client of it is not reading."""

    def __init__(self, tunnel: "LegacyTunnel") -> None:
        self._tunnel = tunnel
        self._paused = False

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            self._tunnel.pause()

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            self._tunnel.resume()

    def stopProducing(self) -> None:
        self.resumeProducing()


class _LegacyStream:
    def __init__(self, tunnel: "LegacyTunnel", stream_id: str, request: TunnelRequest, sink: ResponseSink) -> None:
        self.tunnel = tunnel
        self.id = stream_id
        self.request: TunnelRequest | None = request  # until it is sent
        self.sink = sink
        self.started = False
        self.pause = _SocketPause(tunnel)

    def cancel(self) -> None:
        if self.tunnel.forget(self.id):
            self.pause.stopProducing()
            if self.request is None:  # the gateway has it: tell it to stop
                self.tunnel.send({"kind": "cancel", "id": self.id})


class LegacyTunnel(SocketTunnel):
    """One registered legacy-protocol gateway; `send` writes a JSON text message on its socket."""

    def __init__(self, subdomain: str, owner: str, send_text: Callable[[bytes], None],
                 close: Callable[[int, str], None], transport_pause: Callable[[], None],
                 transport_resume: Callable[[], None], *, budget: ControlBudget, outbound: Outbound) -> None:
        super().__init__(subdomain, owner, close)
        self._send_text = send_text
        self._budget = budget
        self._outbound = outbound
        outbound.drained = self._drained
        self._queue: deque[_LegacyStream] = deque()  # requests waiting for the socket to drain
        self._pause_transport = transport_pause
        self._resume_transport = transport_resume
        self._streams: dict[str, _LegacyStream] = {}
        self._prefix = os.urandom(4).hex()
        self._ids = itertools.count(1)
        self._issued = 0
        self._paused = 0
        self._stale = 0

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def send(self, message: dict) -> None:
        self._send_text(json.dumps(message, separators=(",", ":")).encode())

    def open_stream(self, request: TunnelRequest, sink: ResponseSink) -> _LegacyStream:
        number = next(self._ids)
        self._issued = number
        stream_id = f"{self._prefix}-{number}"
        stream = _LegacyStream(self, stream_id, request, sink)
        self._streams[stream_id] = stream
        if self._queue or self._outbound.full:
            self._queue.append(stream)
        else:
            self._send_request(stream)
        return stream

    def _send_request(self, stream: _LegacyStream) -> None:
        """The whole request in one message (the body is in it, base64)."""
        request, stream.request = stream.request, None
        assert request is not None
        body = request.body.read() if request.body is not None and request.body_length else None
        self.send({
            "kind": "request",
            "id": stream.id,
            "method": request.method.decode("latin-1"),
            "path": request.path.decode("latin-1"),
            "headers": _headers_out(request.headers),
            "body": base64.b64encode(body).decode("ascii") if body else None,
        })

    def _drained(self) -> None:
        """The socket has written out a full buffer: send what waited, until it is full again."""
        while self._queue and not self._outbound.full:
            stream = self._queue.popleft()
            if stream.id in self._streams:  # not cancelled while it waited
                self._send_request(stream)

    def forget(self, stream_id: str) -> bool:
        return self._streams.pop(stream_id, None) is not None

    def pause(self) -> None:
        self._paused += 1
        if self._paused == 1:
            self._pause_transport()

    def resume(self) -> None:
        self._paused -= 1
        if self._paused == 0:
            self._resume_transport()

    def message(self, payload: bytes, is_binary: bool) -> None:
        try:
            self._dispatch(payload, is_binary)
        except ProtocolViolation as e:
            log.warn("tunnel {subdomain}: protocol violation ({why}); closing it", subdomain=self.subdomain,
                     why=str(e))
            self._close(CloseCode.POLICY, fit_reason(f"protocol violation: {e}"))

    def _dispatch(self, payload: bytes, is_binary: bool) -> None:
        if is_binary:
            raise ProtocolViolation("binary message on a JSON tunnel")
        try:
            message = json.loads(payload)
        except (ValueError, RecursionError):
            raise ProtocolViolation("message is not JSON") from None
        if not isinstance(message, dict) or "id" not in message:
            raise ProtocolViolation("message has no id")
        stream = self._stream_for(message["id"])
        if stream is None:
            return
        try:
            self._apply(stream, message)
        except ProtocolViolation:
            raise
        except Exception:
            log.failure("tunnel {subdomain}: handling a gateway message failed", subdomain=self.subdomain)
            self._fail(stream, "tunnel error")

    def _apply(self, stream: _LegacyStream, message: dict) -> None:
        kind = message.get("kind")
        sink = stream.sink
        if kind == "response_head":
            self._head(stream, message)
        elif kind == "response_chunk":
            if not stream.started:
                raise ProtocolViolation("chunk before head")
            data = _decode(message.get("data"))
            last = message.get("last")
            if data:
                sink.data(data)
            elif not last:
                self._idle()
            if last:
                self._end(stream)
        elif kind == "response_error":
            self.forget(stream.id)
            stream.pause.stopProducing()
            text = message.get("message")
            sink.fail(text[:200] if isinstance(text, str) else "gateway error")
        elif kind is None and "status" in message:
            if not self._head(stream, message):
                return
            body = _decode(message.get("body"))
            if body:
                sink.data(body)
            self._end(stream)
        else:
            raise ProtocolViolation(f"unknown message kind {kind!r}"[:80])

    def _idle(self) -> None:
        """A message that carried nothing: the socket's control budget pays for it."""
        if not self._budget.spend():
            raise ProtocolViolation("flood of messages without data")

    def _stream_for(self, raw_id: Any) -> _LegacyStream | None:
        """The stream a message is for; None for one we cancelled; a violation for ids never issued."""
        stream_id = str(raw_id)
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._stale = 0
            return stream
        prefix, _, number = stream_id.rpartition("-")
        if prefix == self._prefix and number.isdigit() and 0 < int(number) <= self._issued:
            # A few chunks may race a cancel; an endless stream of them is a flood.
            self._stale += 1
            if self._stale > STALE_LIMIT:
                raise ProtocolViolation("flood of messages for finished requests")
            self._idle()
            return None
        raise ProtocolViolation("response to an unknown request id")

    def _head(self, stream: _LegacyStream, message: dict) -> bool:
        """Deliver a response head; False if its status failed the request instead."""
        if stream.started:
            raise ProtocolViolation("second response head")
        status = message.get("status")
        if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
            self._fail(stream, "the gateway sent an invalid status")
            return False
        headers = _headers_in(message.get("headers"))
        stream.started = True
        stream.sink.head(status, headers)
        stream.sink.register(stream.pause)
        return True

    def _fail(self, stream: _LegacyStream, reason: str) -> None:
        """Fail one request: the gateway is told to stop, the public client gets `fail` (502)."""
        stream.cancel()
        stream.sink.fail(reason)

    def _end(self, stream: _LegacyStream) -> None:
        self.forget(stream.id)
        stream.pause.stopProducing()
        stream.sink.end()

    def closed(self) -> None:
        """The socket is gone: every open stream fails (aborted, or 502 if it had no head yet)."""
        streams, self._streams = self._streams, {}
        self._queue.clear()
        self._outbound.drained = None
        for stream in streams.values():
            stream.pause.stopProducing()
            stream.sink.fail("tunnel closed")
