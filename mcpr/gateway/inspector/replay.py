"""Replay: a captured request sent again to the upstream, through the proxy core.

The request goes to a listener of the gateway's own, on loopback, whose site
serves the same `ProxyResource` as the direct and tunnel ones with
`via="replay"`: it is routed, forwarded, rewritten and recorded exactly as a
client's request would be, and the store (so the live page) shows it as a
replay.  The answer comes back whole, as the client of the gateway would have
read it, up to `MAX_ANSWER` bytes.

What the store kept is what can be replayed: the headers the store redacted
(credentials, cookies) cannot be sent again as they were; they are left out,
and the page may send edited headers and body instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from mcpr.common.headers import HOP_BY_HOP
from mcpr.gateway.store.queries import Body, RequestDetail
from mcpr.gateway.store.redact import REDACTED
from mcpr.common.bodies import BytesProducer

MAX_BODY = 1 << 20  # an edited request body, and so the inspector's request body cap
MAX_ANSWER = 1 << 20  # of the answer, kept for the page
MAX_HEADERS = 100
TIMEOUT = 120.0  # for the whole answer: a POST's SSE stream ends with its answer, well before

# Headers not sent again: those of the old connection, those the Agent sets, and compression
# (the answer is shown as text).
NOT_REPLAYED = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"accept-encoding", b"forwarded", b"via",
                             b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto"}


class ReplayError(Exception):
    """This request cannot be replayed as asked, or got no answer; the message says why, `status`
    is the inspector's answer (400: as asked; 503: no replay listener; 504: no answer in time)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Replay:
    """A request as it is sent again."""

    method: str
    target: str
    headers: list[list[str]]
    body: bytes
    left_out: list[str]  # headers the store redacted, not sent

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "target": self.target, "headers": self.headers,
                "body": self.body.decode("utf-8", "replace"), "left_out": self.left_out}


def prepare(detail: RequestDetail, *, body: str | None = None,
            headers: list[list[str]] | None = None) -> Replay:
    """The request to send: the captured one, with `body` and `headers` instead if given."""
    request = detail.request
    if request.method != "POST" or request.route != "mcp":
        raise ReplayError(f"only JSON-RPC POSTs to the MCP endpoint can be replayed, not {request.method} "
                          f"{request.path} ({request.route})")
    if body is None:
        if detail.request_body.truncated:
            raise ReplayError(f"only the first {len(detail.request_body.data)} of {detail.request_body.size} bytes "
                              "of this request's body were kept: send the whole body edited to replay it")
        data = detail.request_body.data
    else:
        data = body.encode("utf-8")
    if len(data) > MAX_BODY:
        raise ReplayError(f"the body is {len(data)} bytes; a replay sends at most {MAX_BODY}")
    source = detail.request_headers if headers is None else headers
    if len(source) > MAX_HEADERS:
        raise ReplayError(f"{len(source)} headers; a replay sends at most {MAX_HEADERS}")
    kept, left_out = [], []
    for name, value in source:
        lowered = name.strip().lower()
        if not _token(lowered) or any(c in value for c in "\r\n\0"):
            raise ReplayError(f"header {name!r}: not a header name and value")
        if lowered.encode("latin-1") in NOT_REPLAYED:
            continue
        if REDACTED in value:
            left_out.append(lowered)
            continue
        kept.append([lowered, value])
    return Replay("POST", detail.target, kept, data, left_out)


def _token(name: str) -> bool:
    return bool(name) and len(name) <= 200 and all(c.isascii() and (c.isalnum() or c in "!#$%&'*+-.^_`|~")
                                                   for c in name)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: list[list[str]]
    body: Body

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "headers": self.headers, "body": self.body.as_dict()}


class _Collect(Protocol):
    """The answer's body, its first `MAX_ANSWER` bytes kept; the connection is cut past them."""

    def __init__(self, done: Deferred[tuple[bytes, int]]) -> None:
        self._done = done
        self._chunks: list[bytes] = []
        self._kept = 0
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        room = MAX_ANSWER - self._kept
        if room > 0:
            piece = data[:room]
            self._chunks.append(piece)
            self._kept += len(piece)
        if self._size > MAX_ANSWER:
            self.stop()

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]  # deliverBody's transport is a producer

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if self._done.called:  # cancelled: the timeout
            return
        if reason.check(ResponseDone, PotentialDataLoss) or self._size > MAX_ANSWER:
            self._done.callback((b"".join(self._chunks), self._size))
        else:
            self._done.errback(reason)


class Replayer:
    """Sends replays to the gateway's replay listener, at `origin()` (`http://127.0.0.1:PORT`)."""

    def __init__(self, reactor: Any, origin: Callable[[], str | None], *, timeout: float = TIMEOUT) -> None:
        self._reactor = reactor
        self._origin = origin
        self._timeout = timeout
        self._agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

    async def send(self, replay: Replay) -> Answer:
        origin = self._origin()
        if origin is None:
            raise ReplayError("the gateway's replay listener is not listening", 503)
        headers = Headers()
        for name, value in replay.headers:
            headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1", "replace"))
        sending: Deferred[IResponse] = self._agent.request(replay.method.encode(),
                                                           (origin + replay.target).encode("latin-1"),
                                                           headers, BytesProducer(replay.body))
        timed_out: list[bool] = []

        def time_out(d: Deferred[Any]) -> None:
            timed_out.append(True)
            d.cancel()

        timer = self._reactor.callLater(self._timeout, time_out, sending)
        try:
            response = await sending
            collect: list[_Collect] = []
            done: Deferred[tuple[bytes, int]] = Deferred(lambda _: collect[0].stop())
            collect.append(_Collect(done))
            response.deliverBody(collect[0])
            timer.cancel()
            timer = self._reactor.callLater(self._timeout, time_out, done)
            data, size = await done
        except Exception:
            if timed_out:
                raise ReplayError(f"no whole answer within {self._timeout:g} s", 504) from None
            raise
        finally:
            if timer.active():
                timer.cancel()
        answer_headers = [[name.decode("latin-1").lower(), value.decode("latin-1")]
                          for name, values in response.headers.getAllRawHeaders() for value in values]
        content_type = response.headers.getRawHeaders(b"content-type", [None])[0]
        return Answer(response.code, answer_headers,
                      Body(data, size, content_type.decode("latin-1") if content_type else None))
