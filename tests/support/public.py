"""Public clients for hostile tests: raw sockets that send exactly the bytes a test writes, and
read (or refuse to read) as the test says, which no well-behaved HTTP client library would do."""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol


class RawClient(Protocol):
    """Writes what it is told and records everything the server sends, until the server closes."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: Deferred = Deferred()
        self._waiting: list[tuple[bytes, Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for needle, d in list(self._waiting):
            if needle in self.received:
                self._waiting.remove((needle, d))
                d.callback(bytes(self.received))

    def connectionLost(self, reason) -> None:
        for _, d in self._waiting:
            d.callback(bytes(self.received))
        self._waiting = []
        self.closed.callback(bytes(self.received))

    def until(self, needle: bytes) -> Deferred:
        """Fires with everything received once `needle` has arrived (or the connection closed)."""
        d: Deferred = Deferred()
        if needle in self.received or self.closed.called:
            d.callback(bytes(self.received))
        else:
            self._waiting.append((needle, d))
        return d


async def raw(port: int, data: bytes = b"", source: str | None = None) -> RawClient:
    """A connection to the relay on loopback; `source` (e.g. 127.0.0.2) is the address it comes
    from, for tests that need several peers."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0) if source else None)
    client = await connectProtocol(endpoint, RawClient())
    if data:
        client.transport.write(data)
    return client


async def exchange(port: int, data: bytes, source: str | None = None) -> bytes:
    """Send `data` on a fresh connection and return everything until the server closes it."""
    client = await raw(port, data, source)
    return await client.closed


def stalled_get(port: int, host: str, path: str) -> socket.socket:
    """A GET whose client never reads: a 4 KiB receive buffer, set before connecting, so the
    server's writes back up after a few KiB.  Close it to abandon the download."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return sock
