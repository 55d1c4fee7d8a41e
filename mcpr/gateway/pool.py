"""The gateway's pooled sockets: plain HTTP/1.1 connections to the relay, beside the tunnel.

The registration answer names a key and a size; the gateway opens that many
sockets to the relay's address (TLS when the tunnel has it), each upgraded with
`GET /_tunnel/pool` and `Upgrade: mcpr-pool`.  Once the relay answers 101, a
socket is an ordinary connection of the tunnel's site: the relay writes a
request into it and the site answers as it would a direct client, so a request
that takes a pooled socket costs the gateway what a direct one does, with no
HTTP/2 or WebSocket framing (docs/protocol.md, "Pooled sockets").

The pool lives as long as the registration that handed out its key: a closed
tunnel closes its pooled sockets.  A socket that closes is opened again; one
the relay refuses, or that cannot be opened, is tried again after a backoff,
and the tunnel's HTTP/2 streams carry every request meanwhile.

A socket that carried a request may close at any age, and nothing is wrong:
the relay closes one whose public client left, whose response came too late
or broke its framing rules, or was not to be kept (`Connection: close`), and
this side closes one whose upstream broke off.  Under load that is routine,
so such a socket is replaced at once and quietly.  Only a socket closed
before it carried anything, refused, or not connected is a failure; the
backoff and the warning last until a socket proves itself (carries a request
or lives `SHORT_LIVED`), not merely until the next 101, or a relay that
accepts and drops every socket would be reconnected to, and warned about,
every half second.  The first failure of a run is logged at info: one that a
retry cures (the tunnel closing at the relay while a socket opens, a pool
found full while the relay has yet to see a socket close) needs nobody; the
warning comes when the retry fails too, once for each reason.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from mcpr.common import protocol as wire
from mcpr.common.failures import describe
from mcpr.common.web import no_delay

log = Logger()

MAX_ANSWER = 8 << 10
"""The relay's answer to an upgrade is a short head; a longer one is not the relay's."""
RETRY_FIRST, RETRY_CAP = 0.5, 30.0
SHORT_LIVED = 1.0
"""A pooled socket closed this soon after it opened, before it carried a request, counts as a
failure, so that a relay that closes them at once is not reconnected to in a loop."""


class _PooledSocket(Protocol):
    """One pooled socket: the upgrade, then the site's HTTP/1.1 channel over the same transport."""

    def __init__(self, pool: LanePool) -> None:
        self._pool = pool
        self._answer = b""
        self._channel: Protocol | None = None
        self.opened_at: float | None = None
        self.refused = False
        self.asked = False
        """Whether the relay sent a request on it: a close is then that exchange's, not a failure."""

    def connectionMade(self) -> None:
        no_delay(self.transport)  # a response's head and body are separate writes
        assert self.transport is not None
        self.transport.write(self._pool.upgrade)

    def dataReceived(self, data: bytes) -> None:
        channel = self._channel
        if channel is not None:
            if not self.asked:
                self._asked()
            channel.dataReceived(data)
            return
        answer = self._answer + data
        end = answer.find(b"\r\n\r\n")
        if end < 0:
            if len(answer) > MAX_ANSWER:
                self._refused(f"an answer over {MAX_ANSWER >> 10} KiB")
            else:
                self._answer = answer
            return
        self._answer = b""
        status = answer[:answer.find(b"\r\n")]
        if not status.startswith(b"HTTP/1.1 101 "):
            self._refused(status[:80].decode("latin-1"))
            return
        assert self.transport is not None
        channel = self._pool.site.buildProtocol(self.transport.getPeer())
        channel.timeOut = None  # liveness is the tunnel pings' job
        channel.makeConnection(self.transport)
        self._channel = channel
        self.opened_at = self._pool.reactor.seconds()
        self._pool.opened(self)
        rest = answer[end + 4:]
        if rest:
            self._asked()
            channel.dataReceived(rest)

    def _asked(self) -> None:
        self.asked = True
        self._pool.proved()

    def _refused(self, why: str) -> None:
        self.refused = True
        self._pool.refused(why)
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._channel is not None:
            self._channel.connectionLost(reason)
        self._pool.lost(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class LanePool:
    """Keeps `size` pooled sockets open to the relay for one registration."""

    def __init__(self, reactor: Any, endpoint: IStreamClientEndpoint, *, host: str, path: str, subdomain: str,
                 key: str, size: int, site: Site, limit: int | None = None) -> None:
        """`endpoint` reaches the relay as the tunnel's WebSocket does; `host` and `path` are the
        upgrade request's Host and target; `size` sockets are kept open, `limit` at most when the
        relay asks for more (`grow`)."""
        self.reactor: IReactorTime = reactor
        self.site = site
        self.size = size
        self.limit = size if limit is None else limit
        self.upgrade = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n"
                        f"Upgrade: {wire.POOL_UPGRADE.decode()}\r\n"
                        f"{wire.POOL_HEADER.decode()}: {subdomain} {key}\r\n\r\n").encode("ascii")
        self._endpoint = endpoint
        self._factory = Factory.forProtocol(lambda: _PooledSocket(self))
        self._factory.noisy = False
        self._sockets: set[_PooledSocket] = set()
        self._connecting: set[Deferred[Any]] = set()
        self._failures = 0
        self._retry: IDelayedCall | None = None
        self._told: str | None = None  # the last failure warned about, so that a retry loop warns once
        self._proof: IDelayedCall | None = None  # after failures: when a socket opened since has lived
        self._stopped = False

    def start(self) -> None:
        self._fill()

    def grow(self, wanted: int) -> None:
        """The relay asks for `wanted` sockets: as many as it says, up to `limit`."""
        wanted = min(wanted, self.limit)
        if wanted > self.size and not self._stopped:
            self.size = wanted
            if self._retry is None:
                self._fill()

    def _fill(self) -> None:
        self._retry = None
        for _ in range(self.size - len(self._sockets) - len(self._connecting)):
            if self._stopped or self._retry is not None:
                return  # a connection failed at once: the retry fills the rest
            connecting = self._endpoint.connect(self._factory)
            self._connecting.add(connecting)
            connecting.addBoth(self._connected, connecting)

    def _connected(self, result: Any, connecting: Deferred[Any]) -> None:
        self._connecting.discard(connecting)
        if isinstance(result, Failure):
            if not self._stopped:
                self._failed(describe(result.value))
            return
        if self._stopped:
            result.close()
        else:
            self._sockets.add(result)

    def opened(self, socket: _PooledSocket) -> None:
        """A 101 is no proof that the relay keeps the socket: the failures are forgotten once it
        has lived `SHORT_LIVED` (or carried a request first)."""
        if self._failures and self._proof is None:
            self._proof = self.reactor.callLater(SHORT_LIVED, self._proved)

    def proved(self) -> None:
        """A socket carried a request: the relay uses the pool."""
        if self._failures:
            self._proved()

    def _proved(self) -> None:
        proof, self._proof = self._proof, None
        if proof is not None and proof.active():
            proof.cancel()
        if self._told is not None:
            log.info("tunnel: pooled sockets open again")
        self._failures, self._told = 0, None

    def refused(self, why: str) -> None:
        self._failed(f"the relay refused it: {why}")

    def lost(self, socket: _PooledSocket) -> None:
        self._sockets.discard(socket)
        if self._stopped:
            return
        opened = socket.opened_at
        if opened is None:
            if not socket.refused:
                self._failed("the relay closed it before answering")
        elif not socket.asked and self.reactor.seconds() - opened < SHORT_LIVED:
            self._failed("the relay accepted it, then closed it before sending a request")
        else:
            if socket.asked:
                log.debug("tunnel: a pooled socket closed after a request; opening another")
            if self._retry is None:
                self._fill()

    def _failed(self, why: str) -> None:
        """One retry for however many sockets failed together, later after each round that failed."""
        proof, self._proof = self._proof, None
        if proof is not None and proof.active():
            proof.cancel()
        if self._stopped or self._retry is not None:
            return  # this round has failed already: its retry opens this socket again too
        if not self._failures:
            # Maybe the tunnel ending at the relay while this socket opened, or a pool the relay
            # counts full until it sees a closed socket go: the retry tells.
            log.info("tunnel: cannot open a pooled socket ({why}); retrying", why=why)
        elif self._told != why:
            self._told = why
            log.warn("tunnel: cannot open a pooled socket ({why}); requests take the tunnel meanwhile", why=why)
        self._failures += 1
        delay = min(RETRY_CAP, RETRY_FIRST * 2 ** (self._failures - 1))
        self._retry = self.reactor.callLater(delay, self._fill)

    def stop(self) -> None:
        """The registration is over: its pooled sockets close, their requests see their client leave."""
        self._stopped = True
        for call in (self._retry, self._proof):
            if call is not None and call.active():
                call.cancel()
        self._retry = self._proof = None
        for connecting in list(self._connecting):
            connecting.cancel()
        for socket in list(self._sockets):
            socket.close()
