"""WebSocket clients for tests that leave the reactor clean.

Autobahn schedules its handshake timeouts on txaio's batched timers: cancelling such a call leaves
the bucket's DelayedCall pending until it fires, so a test that closes a connection less than a
second before it ends was failed by trial as a dirty reactor whenever the close raced the peer's
(flaky under load). These clients schedule none (the timeouts are 0) and bound the close with a
plain Deferred timeout instead.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError

CLOSE_TIMEOUT = 10.0


def client_factory(url: str, **kwargs: Any) -> WebSocketClientFactory:
    factory = WebSocketClientFactory(url, reactor=reactor, **kwargs)
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    return factory


async def close_cleanly(proto: WebSocketClientProtocol, closed: Deferred, code: int = 1000) -> None:
    """A closing handshake, or the socket aborted if the peer does not answer in CLOSE_TIMEOUT."""
    proto.sendClose(code)
    closed.addTimeout(CLOSE_TIMEOUT, reactor)
    try:
        await closed
    except TimeoutError:
        proto.transport.abortConnection()
