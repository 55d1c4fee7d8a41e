"""Request bodies on their way out, shared by the gateway's upstream calls and replays and the
relay's HTTP/1.1 hops (pooled sockets, the cluster)."""

from __future__ import annotations

import io
from typing import IO, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer


@implementer(IBodyProducer)
class BytesProducer:
    """A body already in memory, written at once with the request's head: FileBodyProducer would
    write it a reactor turn later, through a cooperator task, for every request (a JSON-RPC call
    is a few hundred bytes)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Upload:
    """A spooled body streamed into a connection, registered as the connection's producer while
    it runs, so the body goes no faster than the peer reads.  A hop whose answer comes before the
    body is all sent `stop`s it: that connection cannot carry another exchange."""

    def __init__(self, transport: Any, body: IO[bytes] | io.RawIOBase) -> None:  # a TCP or TLS transport: a consumer
        self._transport = transport
        self._producer = FileBodyProducer(body)
        self._running = True
        transport.registerProducer(self._producer, True)
        self._producer.startProducing(transport).addBoth(self._sent)

    def _sent(self, _: object) -> None:
        """All sent, or failed with the connection; after `stop`, nothing to do."""
        if self._running:
            self._running = False
            self._transport.unregisterProducer()

    def stop(self) -> bool:
        """Stop the body if it is still being sent; True if it was."""
        if not self._running:
            return False
        self._running = False
        self._transport.unregisterProducer()
        self._producer.stopProducing()
        return True
