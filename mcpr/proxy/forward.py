"""Sending a request upstream and streaming its answer back.

The upstream call is `mcpr.proxy.upstream_client`'s; this module gives it a
time limit and the gateway's error statuses, and pipes the answer's body into
the downstream request with the upstream connection registered as that
request's producer, so a slow client slows the upstream read instead of
filling our memory.
"""

from __future__ import annotations

from typing import IO, Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from mcpr.common.failures import cancelled, describe
from mcpr.common.headers import FieldLines
from mcpr.proxy.upstream_client import Body, UpstreamClient, UpstreamResponse


class UpstreamError(Exception):
    status = 502

    def __init__(self, url: bytes, reason: str) -> None:
        super().__init__(reason)
        self.url = url
        self.reason = reason


class UpstreamUnavailable(UpstreamError):
    status = 502


class UpstreamTimeout(UpstreamError):
    status = 504


def request_body(data: bytes | None, content: IO[bytes] | None) -> Body:
    """The upstream body: bytes already in memory, sent with the head, or the spool file,
    streamed from its start with backpressure."""
    if data:
        return data
    if content is not None:
        content.seek(0)
        return content
    return None


class Forwarder:
    """The upstream client, with a time limit on the response headers and its failures in the
    gateway's terms."""

    def __init__(
        self,
        reactor: Any,  # IReactorTCP and IReactorTime (zope interfaces cannot be intersected in a type)
        *,
        headers_timeout: float,
        connect_timeout: float = 10.0,
        max_idle_per_host: int = 64,
        idle_timeout: float = 4.0,
    ) -> None:
        self._reactor = reactor
        self._timeout = headers_timeout
        self.client = UpstreamClient(reactor, connect_timeout=connect_timeout, max_idle_per_origin=max_idle_per_host,
                                     idle_timeout=idle_timeout)

    def send(self, method: bytes, url: bytes, headers: FieldLines, body: Body) -> Deferred[UpstreamResponse]:
        """The upstream response once its headers arrived; the body is still to be read.

        It fails with `UpstreamTimeout`, `UpstreamUnavailable`, or
        `CancelledError` when cancelled.  A Deferred with one callback rather
        than a coroutine: on every request, the coroutine's own Deferred and
        its resumption cost more than the mapping of its outcome.
        """
        d = self.client.request(method, url, headers, body)
        timer = self._reactor.callLater(self._timeout, d.cancel)

        def settle(result: UpstreamResponse | Failure) -> UpstreamResponse:
            if timer.active():
                timer.cancel()
            elif isinstance(result, Failure):  # the timer went off and cancelled the request
                raise UpstreamTimeout(url, f"no response headers within {self._timeout:g} s")
            if isinstance(result, Failure):
                if cancelled(result.value):
                    raise CancelledError()
                raise UpstreamUnavailable(url, describe(result.value))
            return result

        return d.addBoth(settle)

    def close(self) -> Deferred[None]:
        return self.client.close()


class BodyPipe(Protocol):
    """Streams an upstream response body into a downstream request.

    `write` gets each chunk (after any inspection) and `done` fires with None
    on a clean end or fails if the upstream broke off mid-body.
    """

    def __init__(self, write: Callable[[bytes], None], register: Callable[[IPushProducer], None],
                 unregister: Callable[[], None], done: Deferred[None]) -> None:
        self._write = write
        self._register = register
        self._unregister = unregister
        self._done = done
        self._stopped = False

    def connectionMade(self) -> None:
        # deliverBody's transport is the upstream connection's: it is an IPushProducer.
        self._register(self.transport)  # type: ignore[arg-type]

    def dataReceived(self, data: bytes) -> None:
        if not self._stopped:
            self._write(data)

    def stop(self) -> None:
        """The downstream client left: drop the upstream connection."""
        self._stopped = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]  # a producer, as above

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        if not self._stopped:
            self._unregister()
        # isinstance rather than `reason.check`, which names every class it is given (reflect.qual)
        # and looks the names up: 1 % of a small request's CPU, for the same answer.
        if self._stopped or isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            self._done.callback(None)
        else:
            self._done.errback(reason)
