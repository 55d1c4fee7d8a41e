"""The contract between the relay's public HTTP front and a tunnel.

The front knows HTTP (statuses, limits, timeouts, the access log); a tunnel
knows its wire protocol (legacy JSON or HTTP/2).  Between them a request is a
stream: the tunnel reports the response through a `ResponseSink` and the
front can cancel it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO, Protocol

from twisted.internet.interfaces import IPushProducer


@dataclass
class TunnelRequest:
    """A public request as it enters a tunnel; the body is a spool file or bytes."""

    method: bytes
    path: bytes
    headers: list[tuple[bytes, bytes]]
    body: IO[bytes] | None = None
    body_length: int = 0
    extra: dict = field(default_factory=dict)


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


class TunnelGone(Exception):
    """The tunnel closed before or while serving a stream."""


class Tunnel(Protocol):
    subdomain: str
    owner: str
    in_flight: int

    def open_stream(self, request: TunnelRequest, sink: ResponseSink) -> Stream: ...

    def evict(self) -> None: ...

    def close(self, code: int, reason: str) -> None: ...
