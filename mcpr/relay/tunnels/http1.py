"""One request sent with twisted.web's HTTP/1.1 client, its response passed into a `ResponseSink`.

The relay's node-to-node forwarding in a cluster (`mcpr.relay.cluster.peers`)
sends through an `Agent`; a tunnel's pooled sockets (`mcpr.relay.tunnels.pool`)
read their responses themselves and share only the spool reader (`Kept`).  Each
exchange has a connection to itself while it runs, so TCP's own flow control
is per stream: the sink is
given the socket as its producer, and a slow public reader pauses that socket
only.  A cancelled exchange closes its connection instead of leaving it half
read.  What differs between the hops (accounting, what a failure is called and
logged as) is the `ExchangeOwner`'s.
"""

from __future__ import annotations

import io
from typing import IO, Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http import NO_BODY_CODES, PotentialDataLoss
from twisted.web.iweb import IBodyProducer, IResponse

from mcpr.common.bodies import BytesProducer
from mcpr.relay.tunnels.contract import ResponseSink, TunnelRequest

log = Logger()


class ExchangeOwner(Protocol):
    """What the hop does at each turn of one exchange."""

    def released(self) -> None:
        """The exchange is over, however it ended: called once."""

    def head_received(self) -> None:
        """The response's head is in (before the sink hears of it)."""

    def failed(self, error: BaseException) -> str:
        """No head came: log what the hop must, and say what the sink is told."""

    def broke_off(self, reason: Failure) -> str:
        """The response broke off after its head: log what the hop must, and say what the sink is told."""


class Kept(io.RawIOBase):
    """The request's body as FileBodyProducer reads it, without its closing the file when done: a
    request may be sent again from the same spool (a cluster node that no longer holds the
    tunnel), and twisted.web closes the spool with its request."""

    def __init__(self, body: IO[bytes]) -> None:
        super().__init__()
        self._file = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        # Straight into FileBodyProducer's buffer: the spools (twisted.web's temporary file or
        # BytesIO) read into one without a copy.
        return self._file.readinto(buffer)  # type: ignore[attr-defined]

    def seekable(self) -> bool:
        return True  # FileBodyProducer learns the length by seeking: Content-Length, not chunked

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()


WHOLE_BODY = 64 << 10
"""A body up to this size is written at once, with its head; a larger one is streamed from its spool."""


def body_producer(request: TunnelRequest) -> IBodyProducer | None:
    """The spooled body, from its start, with its length; None for none."""
    body = request.body
    if body is None or not request.body_length:
        return None
    body.seek(0)
    if request.body_length <= WHOLE_BODY:
        data = body.read(request.body_length)
        body.seek(0)  # for a second send (see Kept)
        return BytesProducer(data)
    return FileBodyProducer(Kept(body))


class _Finished:
    """A stream that ended before it began: nothing to cancel."""

    def cancel(self) -> None:
        pass


FINISHED = _Finished()


class Exchange(TwistedProtocol):
    """One request: the `Stream` its caller may cancel, and the protocol its response body is
    delivered to.  Every outcome releases it once, and the sink hears nothing more once it was
    cancelled."""

    def __init__(self, method: bytes, sink: ResponseSink, owner: ExchangeOwner) -> None:
        self._method = method
        self._sink = sink
        self._owner = owner
        self._pending: Deferred[IResponse] | None = None
        self._cancelled = False
        self._over = False

    def send(self, response: Deferred[IResponse]) -> None:
        self._pending = response
        response.addCallbacks(self._head, self._failed).addErrback(self._bug)

    def cancel(self) -> None:
        if self._over:
            return
        self._cancelled = True
        self._release()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()  # connecting or waiting for the head: the connection is dropped
        elif self.transport is not None:
            self._producer.stopProducing()
        # Otherwise the sink is handling the head: connectionMade drops the body.

    def _release(self) -> None:
        if not self._over:
            self._over = True
            self._owner.released()

    def _head(self, response: IResponse) -> None:
        self._pending = None
        self._owner.head_received()
        headers = [(name.lower(), value) for name, values in response.headers.getAllRawHeaders()
                   for value in values]
        # twisted.web's client keeps a body's framing fields to itself (a HEAD's Content-Length, which
        # describes the GET, stays among the headers); the length it read is the hop's own.
        length = response.length
        if isinstance(length, int) and self._method != b"HEAD" and response.code not in NO_BODY_CODES:
            headers.append((b"content-length", b"%d" % length))
        self._sink.head(response.code, headers)
        response.deliverBody(self)
        # Registered now, not in connectionMade: deliverBody resumes the socket once its protocol is
        # connected, which would undo a pause the sink makes as it registers.
        if not self._over:
            self._sink.register(self._producer)

    def _failed(self, failure: Failure) -> None:
        self._pending = None
        if self._cancelled:
            return
        self._release()
        self._sink.fail(self._owner.failed(failure.value))

    def _bug(self, failure: Failure) -> None:
        log.failure("an HTTP/1.1 exchange behind the relay failed", failure)

    # -- the response body

    @property
    def _producer(self) -> IPushProducer:
        """deliverBody's transport: a push producer over the exchange's socket."""
        return self.transport  # type: ignore[return-value]

    def connectionMade(self) -> None:
        if self._cancelled:  # while the sink had the head
            self._producer.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if not self._cancelled:
            self._sink.data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._cancelled:
            return
        self._release()
        if reason.check(ResponseDone, PotentialDataLoss):
            self._sink.end()
            return
        self._sink.fail(self._owner.broke_off(reason))
