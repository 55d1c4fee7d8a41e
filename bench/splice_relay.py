"""A measuring prototype, not product code: the relay design docs/PERFORMANCE.md proposes, reduced
to what costs CPU per request, so the benchmark can show what that design would cost before anyone
builds it.

The proposed design carries each public connection over a raw socket of a pool the gateway keeps
open to the relay (as localtunnel does), HTTP/1.1 inside, instead of an HTTP/2 stream inside a
WebSocket message. The relay reads and checks each request's head (the Host names a tunnel; the
framing is Content-Length or chunked) and then only moves bytes; the gateway hands the socket to
its ordinary HTTP/1.1 site, so it costs what direct mode costs.

This prototype does the relay's part over TCP: it keeps a pool of idle connections open to the
gateway's own listener (standing in for the tunnel sockets, which the gateway would open to the
relay instead), parses every request head on a public connection, refuses a Host that is not
`<name>.<domain>` with 421, and splices the bytes both ways with Twisted's producer/consumer flow
control. What it leaves out costs nothing per request on a kept-alive connection: registration, the
reverse direction of the pool's connect, limits, logging.

    python bench/splice_relay.py --port 0 --gateway 127.0.0.1:PORT --domain localhost

It prints `splice relay listening on PORT` once it listens.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol

POOL = 64
MAX_HEAD = 16 << 10


class GatewaySide(Protocol):
    """One pooled connection to the gateway; while paired, the gateway's bytes go to the public side."""

    public: PublicSide | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.public is not None:
            self.public.transport.write(data)

    def connectionLost(self, reason: object = None) -> None:
        if self.public is not None:
            self.public.transport.loseConnection()
        elif self in pool.idle:
            pool.idle.remove(self)
            pool.fill()


class Pool:
    def __init__(self, endpoint: TCP4ClientEndpoint) -> None:
        self.endpoint = endpoint
        self.idle: deque[GatewaySide] = deque()
        self.pending = 0

    def fill(self) -> None:
        while len(self.idle) + self.pending < POOL:
            self.pending += 1
            self.endpoint.connect(Factory.forProtocol(GatewaySide)).addBoth(self._made)

    def _made(self, proto: object) -> None:
        self.pending -= 1
        if isinstance(proto, GatewaySide):
            self.idle.append(proto)

    def take(self) -> GatewaySide | None:
        side = self.idle.popleft() if self.idle else None
        self.fill()
        return side


class PublicSide(Protocol):
    """A public connection: each request head is parsed and checked, then bytes are spliced."""

    def __init__(self, domain: str) -> None:
        self.suffix = "." + domain
        self.buffer = b""
        self.body_left = 0  # bytes of the current request's body still to pass through unparsed
        self.gateway: GatewaySide | None = None

    def connectionMade(self) -> None:
        self.gateway = pool.take()
        if self.gateway is None:
            self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.loseConnection()
            return
        self.gateway.public = self
        # Backpressure both ways: a slow reader pauses the other side's socket.
        self.transport.registerProducer(self.gateway.transport, True)
        self.gateway.transport.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while self.buffer:
            if self.body_left:
                part, self.buffer = self.buffer[:self.body_left], self.buffer[self.body_left:]
                self.body_left -= len(part)
                self.gateway.transport.write(part)
                continue
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self.refuse(b"431 Request Header Fields Too Large")
                return
            head, self.buffer = self.buffer[:end + 4], self.buffer[end + 4:]
            host, length = self.parse(head)
            name = host.split(":", 1)[0].lower() if host else ""
            if not name.endswith(self.suffix) or not name[:-len(self.suffix)].isalnum():
                self.refuse(b"421 Misdirected Request")
                return
            if length is None:
                self.refuse(b"411 Length Required")  # the real relay would also splice chunked bodies
                return
            self.body_left = length
            self.gateway.transport.write(head)

    @staticmethod
    def parse(head: bytes) -> tuple[str | None, int | None]:
        host, length = None, 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"host":
                host = value.strip().decode("latin-1")
            elif name == b"content-length":
                length = int(value) if value.strip().isdigit() else None
            elif name == b"transfer-encoding":
                length = None
        return host, length

    def refuse(self, status: bytes) -> None:
        self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        if self.gateway is not None:
            self.gateway.public = None
            self.gateway.transport.loseConnection()


def main() -> int:
    global pool
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--gateway", required=True, help="HOST:PORT of the gateway's HTTP/1.1 listener")
    parser.add_argument("--domain", default="localhost")
    args = parser.parse_args()
    host, _, port = args.gateway.rpartition(":")
    pool = Pool(TCP4ClientEndpoint(reactor, host, int(port)))
    pool.fill()
    factory = Factory.forProtocol(lambda: PublicSide(args.domain))

    def listening(p: object) -> None:
        print(f"splice relay listening on {p.getHost().port}", flush=True)  # type: ignore[attr-defined]

    TCP4ServerEndpoint(reactor, args.port, interface="127.0.0.1").listen(factory).addCallback(listening)
    reactor.run()
    return 0


pool: Pool

if __name__ == "__main__":
    sys.exit(main())
