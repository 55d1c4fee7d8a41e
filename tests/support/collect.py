"""A body-reading protocol that lets a test await each chunk, and the end."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol


class Collect(Protocol):
    """Records each chunk as it arrives, and how the body ended."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.arrived: Deferred | None = None
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.arrived is not None:
            d, self.arrived = self.arrived, None
            d.callback(data)

    def next_chunk(self) -> Deferred:
        self.arrived = Deferred()
        return self.arrived

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.done.callback(None)

