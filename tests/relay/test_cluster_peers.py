"""Node-to-node forwarding on loopback: a PeerClient forwarding into a real InternalResource.

The holder's `forward` is played by the test, answering on the real
twisted.web request as a tunnel's response would be written; the sending
side's sink records what the PeerClient reports.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from mcpr.common.web import CappedSite
from mcpr.relay.cluster.peers import (
    EVICT_PATH,
    SECRET_HEADER,
    SUBDOMAIN_HEADER,
    InternalResource,
    PeerClient,
    internal_request,
    parse_secret,
)
from mcpr.relay.tunnels.contract import TunnelRequest
from tests.support.loopback import client_agent, listen, sleep, track
from tests.support.processes import free_port

SECRET = "cluster-secret-0123456789abcdef"
HOST = (b"host", b"a.tunnel.test")
MiB = 1 << 20


async def until(condition, timeout: float = 5.0) -> None:
    """Wait for `condition()` to hold, polling the reactor."""
    waited = 0.0
    while not condition():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await sleep(0.005)
        waited += 0.005


class Sink:
    """A ResponseSink that records what it hears; `pause` makes it a reader that stops at once."""

    def __init__(self, *, pause: bool = False, keep: bool = True) -> None:
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.received = 0
        self.outcome: str | None = None
        self.producer: IPushProducer | None = None
        self.calls: list[str] = []
        self.done: Deferred[None] = Deferred()
        self.on_head: Callable[[], None] = lambda: None
        self._pause = pause
        self._keep = keep

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.calls.append("head")
        self.status, self.headers = status, headers
        self.on_head()

    def data(self, chunk: bytes) -> None:
        self.calls.append("data")
        self.received += len(chunk)
        if self._keep:
            self.chunks.append(chunk)

    def end(self) -> None:
        self.calls.append("end")
        self.outcome = "end"
        self.done.callback(None)

    def fail(self, reason: str) -> None:
        self.calls.append("fail")
        self.outcome = reason
        self.done.callback(None)

    def register(self, producer: IPushProducer) -> None:
        self.producer = producer
        if self._pause:
            producer.pauseProducing()

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


@dataclass
class Arrival:
    """A forwarded request as the holder's tunnel would get it."""

    request: Request
    subdomain: str
    forwarded: TunnelRequest
    body: bytes
    gone: bool = False


@dataclass
class Node:
    """The holder: an InternalResource whose forward the test answers."""

    arrivals: list[Arrival] = field(default_factory=list)
    evictions: list[tuple[str, str]] = field(default_factory=list)

    def forward(self, request: Request, subdomain: str) -> object:
        forwarded = internal_request(request)
        body = forwarded.body.read() if forwarded.body is not None else b""
        arrival = Arrival(request, subdomain, forwarded, body)
        request.notifyFinish().addErrback(lambda _: setattr(arrival, "gone", True))
        self.arrivals.append(arrival)
        return NOT_DONE_YET

    def evict(self, subdomain: str, value: str) -> None:
        self.evictions.append((subdomain, value))

    taken: int = 0

    async def next(self) -> Arrival:
        """The next forwarded request, in order of arrival."""
        await until(lambda: len(self.arrivals) > self.taken)
        self.taken += 1
        return self.arrivals[self.taken - 1]


@implementer(IPushProducer)
class Source:
    """The holder's tunnel stream: writes `total` bytes as fast as the request lets it."""

    def __init__(self, request: Request, total: int, chunk: int = 64 * 1024) -> None:
        self.request = request
        self.total = total
        self.chunk = b"x" * chunk
        self.written = 0
        self.paused = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self.pump()

    def stopProducing(self) -> None:
        self.paused = True

    def pump(self) -> None:
        while not self.paused and self.written < self.total:
            self.written += len(self.chunk)
            self.request.write(self.chunk)
        if self.written >= self.total and not self.request.finished:
            self.request.unregisterProducer()
            self.request.finish()


def get(path: bytes = b"/mcp", *headers: tuple[bytes, bytes], method: bytes = b"GET") -> TunnelRequest:
    return TunnelRequest(method, path, [HOST, *headers])


class PeerTests(TestCase):
    """A PeerClient forwarding TunnelRequests into an InternalResource listening on 127.0.0.1."""

    async def start(self, *, max_per_node: int = 1024, secret: str = SECRET) -> None:
        self.node = Node()
        self.resource = InternalResource(SECRET, self.node.forward, self.node.evict)
        self.site = track(CappedSite(self.resource, max_request_body=64 * MiB))
        self.url = f"http://127.0.0.1:{await listen(self, self.site)}"
        self.client = PeerClient(reactor, secret, max_per_node=max_per_node)
        self.addCleanup(self.client.close)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] >= LogLevel.info]

    async def test_get_arrives_with_its_host_and_headers_without_the_hop_fields(self) -> None:
        await self.start()
        sink = Sink()
        request = get(b"/mcp?x=1", (b"accept", b"text/event-stream"),
                      (b"x-forwarded-for", b"203.0.113.7"), (b"x-forwarded-host", b"a.tunnel.test"),
                      (b"x-forwarded-proto", b"https"), (b"cookie", b"a=1"), (b"cookie", b"b=2"),
                      (SECRET_HEADER, b"a public client's guess"), (SUBDOMAIN_HEADER, b"other"))
        self.client.open_stream(self.url, "a", request, sink)

        arrival = await self.node.next()
        self.assertEqual(arrival.subdomain, "a")
        self.assertEqual(arrival.request.getHeader(b"host"), b"a.tunnel.test")
        self.assertEqual((arrival.forwarded.method, arrival.forwarded.path), (b"GET", b"/mcp?x=1"))
        self.assertEqual(arrival.forwarded.headers, [
            HOST, (b"accept", b"text/event-stream"), (b"x-forwarded-for", b"203.0.113.7"),
            (b"x-forwarded-host", b"a.tunnel.test"), (b"x-forwarded-proto", b"https"),
            (b"cookie", b"a=1"), (b"cookie", b"b=2")])
        self.assertEqual((arrival.body, arrival.forwarded.body_length), (b"", 0))

        arrival.request.setHeader(b"content-type", b"text/plain")
        arrival.request.setHeader(b"mcp-session-id", b"s1")
        arrival.request.write(b"hello")
        arrival.request.finish()
        await sink.done
        self.assertEqual((sink.status, sink.body, sink.outcome), (200, b"hello", "end"))
        self.assertIn((b"mcp-session-id", b"s1"), sink.headers)
        self.assertEqual(sink.calls[0], "head")
        names = {name for name, _ in sink.headers}
        self.assertTrue(names.isdisjoint({b"transfer-encoding", b"connection", b"content-length"}), names)
        self.assertEqual(names, {name.lower() for name in names})

    async def test_a_node_named_by_host_name(self) -> None:
        await self.start()
        sink = Sink()
        self.client.open_stream(self.url.replace("127.0.0.1", "localhost"), "a", get(), sink)
        arrival = await self.node.next()
        arrival.request.finish()
        await sink.done
        self.assertEqual((sink.status, sink.outcome), (200, "end"))

    async def test_post_bodies_from_a_spool_file_and_from_memory(self) -> None:
        await self.start()
        spooled = bytes(range(256)) * 1200  # 300 kB: twisted.web spools such a body to a file
        spool = tempfile.TemporaryFile()  # noqa: SIM115  (closed by the exchange, or at cleanup)
        self.addCleanup(spool.close)
        spool.write(spooled)  # left at its end, as after twisted.web wrote it
        small = b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}'
        for body, length in ((spool, len(spooled)), (io.BytesIO(small), len(small))):
            sink = Sink()
            request = TunnelRequest(b"POST", b"/mcp", [HOST, (b"content-type", b"application/json"),
                                                       (b"content-length", b"%d" % length)], body, length)
            self.client.open_stream(self.url, "a", request, sink)
            arrival = await self.node.next()
            self.assertEqual((arrival.forwarded.method, arrival.forwarded.body_length), (b"POST", length))
            self.assertEqual(arrival.body, spooled if body is spool else small)
            self.assertEqual(arrival.forwarded.headers, [HOST, (b"content-type", b"application/json")])

            arrival.request.setHeader(b"content-length", b"2")
            arrival.request.write(b"ok")
            arrival.request.finish()
            await sink.done
            self.assertEqual((sink.body, sink.outcome), (b"ok", "end"))
            self.assertIn((b"content-length", b"2"), sink.headers)

    async def test_a_body_can_be_sent_again(self) -> None:
        """A request turned away by one node ("not held here") goes to another from the same
        spool: sending it does not close the body, and the length is sent, not chunks."""
        await self.start()
        payload = bytes(range(256)) * 1200
        spool = tempfile.TemporaryFile()
        self.addCleanup(spool.close)
        spool.write(payload)
        request = TunnelRequest(b"POST", b"/mcp", [HOST], spool, len(payload))
        for attempt in range(2):
            sink = Sink()
            self.client.open_stream(self.url, "a", request, sink)
            arrival = await self.node.next()
            self.assertEqual(arrival.body, payload, f"attempt {attempt}")
            self.assertEqual(arrival.request.getHeader(b"content-length"), b"%d" % len(payload))
            arrival.request.finish()
            await sink.done
        self.assertFalse(spool.closed)

    async def test_head_keeps_the_length_it_describes(self) -> None:
        await self.start()
        sink = Sink()
        self.client.open_stream(self.url, "a", get(method=b"HEAD"), sink)
        arrival = await self.node.next()
        arrival.request.setHeader(b"content-length", b"42")
        arrival.request.finish()
        await sink.done
        self.assertEqual((sink.status, sink.calls), (200, ["head", "end"]))
        self.assertIn((b"content-length", b"42"), sink.headers)

    async def test_streamed_response_arrives_chunk_by_chunk(self) -> None:
        """Each SSE event reaches the sink before the next one is written, while the exchange is open."""
        await self.start()
        sink = Sink()
        self.client.open_stream(self.url, "a", get(b"/mcp", (b"accept", b"text/event-stream")), sink)
        arrival = await self.node.next()
        arrival.request.setHeader(b"content-type", b"text/event-stream")
        arrival.request.write(b"")
        await until(lambda: sink.status == 200)
        events = [b'event: message\ndata: {"n": %d}\n\n' % n for n in range(5)]
        for n, event in enumerate(events):
            arrival.request.write(event)
            await until(lambda count=n + 1: len(sink.chunks) == count)
            await sleep(0.02)
        self.assertEqual(sink.chunks, events)
        self.assertIsNone(sink.outcome)
        arrival.request.finish()
        await sink.done
        self.assertEqual(sink.outcome, "end")

    async def test_a_paused_sink_pauses_the_holder(self) -> None:
        """A public client that reads nothing stops the holder's tunnel stream (its producer is
        paused) once the sockets' buffers are full, long before the 32 MiB are written; reading
        again brings the rest."""
        await self.start()
        total = 32 * MiB
        sink = Sink(pause=True, keep=False)
        self.client.open_stream(self.url, "a", get(b"/large"), sink)
        arrival = await self.node.next()
        source = Source(arrival.request, total)
        arrival.request.setHeader(b"content-length", b"%d" % total)
        arrival.request.registerProducer(source, True)
        source.pump()

        await until(lambda: source.paused and sink.producer is not None)
        await sleep(0.5)  # unchecked, the whole body would cross loopback in a fraction of this
        self.assertTrue(source.paused)
        self.assertLess(source.written, 16 * MiB)
        self.assertLess(sink.received, 1 * MiB)

        assert sink.producer is not None
        sink.producer.resumeProducing()
        await sink.done
        self.assertEqual((sink.outcome, sink.received, source.written), ("end", total, total))
        self.assertGreater(source.pauses, 0)

    async def test_cancel_before_the_head(self) -> None:
        await self.start()
        sink = Sink()
        stream = self.client.open_stream(self.url, "a", get(), sink)
        arrival = await self.node.next()
        stream.cancel()
        await until(lambda: arrival.gone)
        await sleep(0.05)
        self.assertEqual(sink.calls, [])
        stream.cancel()  # twice is harmless

    async def test_cancel_after_the_head(self) -> None:
        await self.start(max_per_node=1)
        sink = Sink()
        stream = self.client.open_stream(self.url, "a", get(), sink)
        arrival = await self.node.next()
        arrival.request.write(b"first")
        await until(lambda: sink.chunks == [b"first"])
        stream.cancel()
        await until(lambda: arrival.gone)
        arrival.request.write(b"dropped")
        await sleep(0.05)
        self.assertEqual(sink.calls, ["head", "data"])

        # The cancelled stream gave its slot back, and its connection was not pooled half read.
        again = Sink()
        self.client.open_stream(self.url, "a", get(), again)
        arrival = await self.node.next()
        arrival.request.write(b"second")
        arrival.request.finish()
        await again.done
        self.assertEqual((again.body, again.outcome), (b"second", "end"))

    async def test_cancel_by_the_sink_as_it_gets_the_head(self) -> None:
        """As PublicResponse does with a head it cannot pass on: the body is never read."""
        await self.start()
        sink = Sink()
        stream = self.client.open_stream(self.url, "a", get(), sink)
        sink.on_head = stream.cancel
        arrival = await self.node.next()
        arrival.request.setHeader(b"content-length", b"%d" % MiB)
        arrival.request.write(b"x" * MiB)
        await until(lambda: arrival.gone)
        self.assertEqual((sink.calls, sink.producer), (["head"], None))

    async def test_cancel_while_connecting(self) -> None:
        await self.start()
        sink = Sink()
        self.client.open_stream(self.url, "a", get(), sink).cancel()
        await sleep(0.1)
        self.assertEqual((sink.calls, self.node.arrivals), ([], []))

    async def test_the_holder_breaking_off_fails_the_stream(self) -> None:
        await self.start()
        sink = Sink()
        self.client.open_stream(self.url, "a", get(), sink)
        arrival = await self.node.next()
        arrival.request.write(b"part")
        await until(lambda: sink.chunks == [b"part"])
        arrival.request.channel.transport.abortConnection()
        await sink.done
        self.assertEqual(sink.outcome, "cluster node connection lost")

        sink = Sink()
        self.client.open_stream(self.url, "a", get(), sink)
        arrival = await self.node.next()
        arrival.request.channel.transport.abortConnection()
        await sink.done
        self.assertEqual((sink.outcome, sink.calls), ("cluster node failed", ["fail"]))

    async def test_wrong_or_missing_secret_is_refused_before_forwarding(self) -> None:
        await self.start(secret="another-secret-0123456789")
        sink = Sink()
        self.client.open_stream(self.url, "a", get(), sink)
        await sink.done
        self.assertEqual((sink.status, sink.body, sink.outcome), (403, b"forbidden\n", "end"))

        await self.client.evict(self.url, "a", "1 http://x owner")  # logged, not raised
        self.assertIn("answered 403 forbidden", " ".join(self.lines()))

        agent = client_agent(self)
        response = await agent.request(b"GET", self.url.encode() + b"/mcp",
                                       Headers({b"host": [b"a.tunnel.test"], SUBDOMAIN_HEADER: [b"a"]}))
        self.assertEqual((response.code, await readBody(response)), (403, b"forbidden\n"))
        self.assertEqual((self.node.arrivals, self.node.evictions), ([], []))
        logged = repr(list(self.events))
        self.assertNotIn("another-secret", logged)
        self.assertNotIn(SECRET, logged)

    async def test_missing_or_invalid_subdomain_is_refused(self) -> None:
        await self.start()
        sink = Sink()
        self.client.open_stream(self.url, "Not_A_Label", get(), sink)
        await sink.done
        self.assertEqual((sink.status, sink.body), (400, b"invalid subdomain header\n"))

        agent = client_agent(self)
        response = await agent.request(b"GET", self.url.encode() + b"/mcp",
                                       Headers({SECRET_HEADER: [SECRET.encode()]}))
        self.assertEqual((response.code, await readBody(response)), (400, b"missing subdomain header\n"))
        self.assertEqual(self.node.arrivals, [])

    async def test_evict(self) -> None:
        await self.start()
        self.assertIsNone(await self.client.evict(self.url, "a", "7 http://10.0.0.5:7000 owner"))
        self.assertEqual(self.node.evictions, [("a", "7 http://10.0.0.5:7000 owner")])

        agent = client_agent(self)
        url = self.url.encode() + EVICT_PATH
        secret = {SECRET_HEADER: [SECRET.encode()]}
        for body in (b"{not json", b'{"subdomain": "Bad_", "value": "v"}', b'{"subdomain": "a"}', b"[]"):
            response = await agent.request(b"POST", url, Headers(secret), FileBodyProducer(io.BytesIO(body)))
            self.assertEqual(response.code, 400, body)
            await readBody(response)
        response = await agent.request(b"GET", url, Headers(secret))
        self.assertEqual(response.code, 405)
        await readBody(response)
        self.assertEqual(len(self.node.evictions), 1)

        # A public request for that path is forwarded like any other (it names its subdomain).
        sink = Sink()
        self.client.open_stream(self.url, "a", get(EVICT_PATH, method=b"POST"), sink)
        arrival = await self.node.next()
        self.assertEqual(arrival.forwarded.path, EVICT_PATH)
        arrival.request.finish()
        await sink.done

    async def test_node_down(self) -> None:
        """Refused connections fail the stream at once with the one-line reason, logged once per
        outage without a traceback; the node coming back is logged too."""
        await self.start()
        port = free_port()
        down = f"http://127.0.0.1:{port}"
        for _ in range(2):
            sink = Sink()
            self.client.open_stream(down, "a", get(), sink)
            await sink.done
            self.assertEqual((sink.calls, sink.outcome), (["fail"], "cluster node unreachable"))
        self.assertEqual([line for line in self.lines() if "unreachable" in line],
                         [f"cluster node {down} unreachable: connection refused"])
        self.assertFalse([e for e in self.events if "log_failure" in e])

        await self.client.evict(down, "a", "v")
        self.assertIn(f"could not tell cluster node {down} to evict a: connection refused", self.lines())

        site = track(CappedSite(self.resource, max_request_body=MiB))
        listening = await TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(site)
        self.addCleanup(listening.stopListening)
        sink = Sink()
        self.client.open_stream(down, "a", get(), sink)
        arrival = await self.node.next()
        arrival.request.finish()
        await sink.done
        self.assertEqual(sink.outcome, "end")
        self.assertIn(f"cluster node {down} is reachable again", self.lines())

    async def test_streams_per_node_are_capped(self) -> None:
        await self.start(max_per_node=2)
        first, second, third = Sink(), Sink(), Sink()
        self.client.open_stream(self.url, "a", get(), first)
        self.client.open_stream(self.url, "b", get(), second)
        held = [await self.node.next(), await self.node.next()]
        self.client.open_stream(self.url, "a", get(), third)
        self.assertEqual((third.calls, third.outcome), (["fail"], "cluster node busy"))

        other = Sink()  # another node has slots of its own
        self.client.open_stream(f"http://127.0.0.1:{free_port()}", "a", get(), other)
        await other.done
        self.assertEqual(other.outcome, "cluster node unreachable")

        held[0].request.finish()
        await first.done
        fourth = Sink()
        self.client.open_stream(self.url, "a", get(), fourth)
        arrival = await self.node.next()
        arrival.request.finish()
        held[1].request.finish()
        await fourth.done
        await second.done
        self.assertEqual((first.outcome, second.outcome, fourth.outcome), ("end", "end", "end"))


class SecretTests(SynchronousTestCase):
    def test_secret_rules(self) -> None:
        self.assertEqual(parse_secret(SECRET), SECRET)
        for bad in ("", "short", "with a space 0123456789", "tab\t0123456789abcdef", "é" * 20, None, 12):
            self.assertRaises(ValueError, parse_secret, bad)
        self.assertRaises(ValueError, PeerClient, reactor, "short")
        self.assertRaises(ValueError, InternalResource, "short", lambda r, s: None, lambda s, v: None)
