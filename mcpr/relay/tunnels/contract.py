"""The contract between the relay's public HTTP front and a tunnel.

The front knows HTTP (statuses, limits, timeouts, the access log); a tunnel
knows its wire protocol (legacy JSON or HTTP/2, docs/protocol.md).  Between
them a request is a stream: the tunnel reports the response through a
`ResponseSink` and the front can cancel the `Stream`.  The registry and the
registration socket see a tunnel only as a `Tunnel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Callable, Protocol

from twisted.internet.interfaces import IPushProducer

from mcpr.common import protocol as wire
from mcpr.common.protocol import CloseCode


@dataclass
class TunnelRequest:
    """A public request as it enters a tunnel; the body is a spool file or bytes."""

    method: bytes
    path: bytes
    headers: list[tuple[bytes, bytes]]
    body: IO[bytes] | None = None
    body_length: int = 0


class ResponseSink(Protocol):
    """Where a tunnel delivers one response; calls come in this order: head, data*, end|fail."""

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...

    def data(self, chunk: bytes) -> None: ...

    def end(self) -> None: ...

    def fail(self, reason: str) -> None: ...

    def register(self, producer: IPushProducer) -> None:
        """Let the public client's backpressure pause the tunnel's source of this stream."""


class Stream(Protocol):
    def cancel(self) -> None:
        """The public client left or timed out: stop the stream on the gateway's side too."""


class Tunnel(Protocol):
    """One registered gateway socket, whatever its wire protocol."""

    subdomain: str
    owner: str
    """The `owner_id` of its token: only the same owner may take its subdomain over."""

    @property
    def in_flight(self) -> int:
        """Streams open or waiting to open."""

    def open_stream(self, request: TunnelRequest, sink: ResponseSink) -> Stream: ...

    def message(self, payload: bytes, is_binary: bool) -> None:
        """A WebSocket message from the gateway."""

    def evict(self) -> None:
        """Close this tunnel because the same owner registered its subdomain again (4002)."""

    def close(self, code: int, reason: str) -> None: ...

    def closed(self) -> None:
        """The socket is gone: every open stream fails (aborted, or 502 if it had no head yet)."""


class SocketTunnel:
    """What both wire protocols share: a name, an owner, and a way to close the socket."""

    def __init__(self, subdomain: str, owner: str, close: Callable[[int, str], None]) -> None:
        self.subdomain = subdomain
        self.owner = owner
        self._close = close

    def evict(self) -> None:
        self._close(CloseCode.EVICTED, wire.EVICTED_REASON)

    def close(self, code: int, reason: str) -> None:
        self._close(code, reason)
