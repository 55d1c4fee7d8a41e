"""An upstream for tunnel tests that need what an MCP SDK server does not give: bulk bodies and an
SSE stream whose client disconnect is observable.

    GET  /bulk?size=N   N bytes, streamed with backpressure
    PUT  /sink          reads the body, answers its size and sha256
    GET  /mcp           (Accept: text/event-stream) an event every 50 ms until the client leaves
    GET  /status        {"sse_open": n, "sse_closed": n}; with ?closed=N, once N streams have closed
    GET  /broken        some bytes, then the connection is cut
    GET  /slow?ms=N     "slow" after N milliseconds (POST too: an MCP endpoint that is slow to answer)
    GET  /headers       the request's headers, as JSON
    GET  /cookies       two Set-Cookie headers, and the request's hop-by-hop headers echoed

Run: python tests/support/bulk_server.py  -> prints "LISTENING <port>".
"""

from __future__ import annotations

import hashlib
import json
import sys

from twisted.internet import reactor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

CHUNK = b"x" * 65536


@implementer(IPushProducer)
class _Bulk:
    def __init__(self, request, size: int) -> None:
        self.request = request
        self.left = size
        self.paused = False
        request.registerProducer(self, True)
        request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.left > 0:
            piece = CHUNK[: min(len(CHUNK), self.left)]
            self.left -= len(piece)
            self.request.write(piece)
        if self.left == 0:
            self.left = -1
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:
        self.paused = True
        self.left = -1


class Upstream(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.sse_open = 0
        self.sse_closed = 0
        self.waiting: list[tuple[int, Request]] = []  # /status?closed=N requests, until N streams closed

    def render_GET(self, request):
        if request.path == b"/bulk":
            size = int(request.args[b"size"][0])
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-length", str(size).encode())
            _Bulk(request, size)
            return NOT_DONE_YET
        if request.path == b"/slow":
            call = reactor.callLater(int(request.args[b"ms"][0]) / 1000, lambda: (request.write(b"slow"),
                                                                                 request.finish()))
            request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
            return NOT_DONE_YET
        if request.path == b"/broken":
            request.setHeader(b"content-type", b"text/plain")
            request.write(b"partial body")
            reactor.callLater(0.1, request.channel.transport.abortConnection)
            return NOT_DONE_YET
        if request.path == b"/cookies":
            request.responseHeaders.setRawHeaders(b"set-cookie", [b"a=1; Path=/", b"b=2; Path=/"])
            request.setHeader(b"x-echo-connection", b",".join(request.requestHeaders.getRawHeaders(b"connection", [])))
            request.setHeader(b"x-echo-te", b",".join(request.requestHeaders.getRawHeaders(b"te", [])))
            request.setHeader(b"x-echo-custom", b",".join(request.requestHeaders.getRawHeaders(b"x-custom", [])))
            return b"ok"
        if request.path == b"/headers":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({k.decode().lower(): [v.decode() for v in vs]
                               for k, vs in request.requestHeaders.getAllRawHeaders()}).encode()
        if request.path == b"/status":
            closed = int(request.args.get(b"closed", [b"0"])[0])
            if self.sse_closed >= closed:
                return self.status(request)
            entry = (closed, request)
            self.waiting.append(entry)
            request.notifyFinish().addErrback(lambda _: entry in self.waiting and self.waiting.remove(entry))
            return NOT_DONE_YET
        if request.path == b"/mcp":
            request.setHeader(b"content-type", b"text/event-stream")
            self.sse_open += 1
            count = iter(range(10**9))
            beat = LoopingCall(lambda: request.write(f"id: {next(count)}\ndata: tick\n\n".encode()))
            beat.start(0.05)

            def gone(_):
                beat.stop()
                self.sse_open -= 1
                self.sse_closed += 1
                ready = [r for closed, r in self.waiting if self.sse_closed >= closed]
                self.waiting = [(closed, r) for closed, r in self.waiting if self.sse_closed < closed]
                for waiting in ready:
                    waiting.write(self.status(waiting))
                    waiting.finish()

            request.notifyFinish().addBoth(gone)
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b"not found"

    def status(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"sse_open": self.sse_open, "sse_closed": self.sse_closed}).encode()

    def render_POST(self, request):
        if request.path == b"/slow":
            return self.render_GET(request)
        request.setResponseCode(405)
        return b"not allowed"

    def render_PUT(self, request):
        digest = hashlib.sha256()
        size = 0
        while True:
            block = request.content.read(1 << 20)
            if not block:
                break
            size += len(block)
            digest.update(block)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"size": size, "sha256": digest.hexdigest()}).encode()


def main() -> None:
    site = Site(Upstream())
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    print(f"LISTENING {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    sys.exit(main())
