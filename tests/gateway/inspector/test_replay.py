"""Replay's sending side against a real loopback server: the answer whole, the answer cut at its
cap (and the connection with it), an answer that never comes, and no replay listener."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mcpr.gateway.inspector import replay
from mcpr.gateway.inspector.replay import Replay, ReplayError, Replayer

SSE = b'event: message\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\n\n'


class Upstream(Resource):
    """What the replay listener would answer: per path, an SSE answer, a flood, or nothing."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[bytes, bytes, list]] = []
        self.lost: Deferred[None] = Deferred()

    def render_POST(self, request: Request) -> object:
        self.received.append((request.uri, request.content.read(), list(request.requestHeaders.getAllRawHeaders())))
        if request.path == b"/sse":
            request.setHeader(b"content-type", b"text/event-stream")
            return SSE
        request.notifyFinish().addErrback(lambda _: self.lost.callback(None))
        if request.path == b"/flood":
            request.write(b"x" * 4096)  # more than the (patched) cap, and no end
        return NOT_DONE_YET


class ReplayerTests(TestCase):
    def setUp(self) -> None:
        self.upstream = Upstream()
        site = Site(self.upstream)
        site.noisy = False
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.origin = f"http://127.0.0.1:{self.port.getHost().port}"

    def replay(self, target: str) -> Replay:
        return Replay("POST", target, [["content-type", "application/json"], ["mcp-session-id", "s-1"]],
                      b'{"jsonrpc":"2.0","id":1,"method":"ping"}', [])

    async def test_the_answer_whole(self) -> None:
        answer = await Replayer(reactor, lambda: self.origin).send(self.replay("/sse?x=1"))
        self.assertEqual((answer.status, answer.body.data, answer.body.truncated), (200, SSE, False))
        self.assertEqual(answer.body.events[0]["json"], {"jsonrpc": "2.0", "id": 1, "result": {}})
        (uri, body, headers), = self.upstream.received
        self.assertEqual((uri, body), (b"/sse?x=1", b'{"jsonrpc":"2.0","id":1,"method":"ping"}'))
        self.assertIn((b"Mcp-Session-Id", [b"s-1"]), headers)

    async def test_an_answer_past_the_cap_is_cut_with_its_connection(self) -> None:
        self.patch(replay, "MAX_ANSWER", 1000)
        answer = await Replayer(reactor, lambda: self.origin).send(self.replay("/flood"))
        self.assertEqual((len(answer.body.data), answer.body.truncated), (1000, True))
        self.assertGreater(answer.body.size, 1000)
        await self.upstream.lost

    async def test_an_answer_that_never_comes(self) -> None:
        replayer = Replayer(reactor, lambda: self.origin, timeout=0.2)
        with self.assertRaises(ReplayError) as caught:
            await replayer.send(self.replay("/silent"))
        self.assertEqual((str(caught.exception), caught.exception.status), ("no whole answer within 0.2 s", 504))
        await self.upstream.lost

    async def test_no_replay_listener(self) -> None:
        with self.assertRaises(ReplayError) as caught:
            await Replayer(reactor, lambda: None).send(self.replay("/sse"))
        self.assertEqual(caught.exception.status, 503)
