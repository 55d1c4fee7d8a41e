"""Request bodies for twisted.web's HTTP client, shared by the gateway's upstream calls and replays
and the relay's HTTP/1.1 hops (pooled sockets, the cluster)."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
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
