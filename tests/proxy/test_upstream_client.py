"""The gateway's upstream client in memory: what it writes, how it reads each framing, when it
reuses a connection, and what a broken, slow or hostile upstream gets."""

from __future__ import annotations

import io

from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, readBody
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from mcpr.proxy.upstream_client import UpstreamBroke, UpstreamClient, UpstreamClosed

URL = b"http://127.0.0.1:9000/mcp"


class Transport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


@implementer(IStreamClientEndpoint)
class Endpoints:
    """Every connect succeeds at once on a new in-memory transport, or waits when `hold` is set."""

    def __init__(self) -> None:
        self.connections: list[tuple[Transport, Protocol]] = []
        self.hold = False
        self.waiting: list[Deferred] = []
        self.uris: list[bytes] = []

    def __call__(self, uri):
        self.uris.append(uri.toBytes())
        return self

    def connect(self, factory):
        if self.hold:
            d = Deferred()
            self.waiting.append(d)
            return d
        protocol = factory.buildProtocol(None)
        transport = Transport()
        protocol.makeConnection(transport)
        self.connections.append((transport, protocol))
        return succeed(protocol)


class Body(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason=None) -> None:
        self.reason = reason


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoints = Endpoints()
        self.client = UpstreamClient(self.clock, idle_timeout=4.0, max_idle_per_origin=2, endpoint=self.endpoints)

    def send(self, method=b"POST", body=b'{"jsonrpc":"2.0"}', headers=None, url=URL) -> Deferred:
        return self.client.request(method, url, headers or [(b"accept", b"application/json")], body)

    def connection(self, index=-1) -> tuple[Transport, Protocol]:
        return self.endpoints.connections[index]

    def answer(self, data: bytes, index=-1) -> None:
        self.connection(index)[1].dataReceived(data)

    def read(self, d: Deferred) -> tuple[object, Body]:
        response = self.successResultOf(d)
        body = Body()
        response.deliverBody(body)
        return response, body

    def lose(self, index=-1, reason=ConnectionDone) -> None:
        self.connection(index)[1].connectionLost(Failure(reason()))

    # -- what goes out

    def test_the_head_and_a_small_body_in_one_write_host_first(self) -> None:
        self.send(headers=[(b"accept", b"application/json"), (b"x-two", b"a"), (b"x-two", b"b")])
        transport, _ = self.connection()
        self.assertEqual(transport.value(),
                         b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:9000\r\naccept: application/json\r\n"
                         b"x-two: a\r\nx-two: b\r\nContent-Length: 17\r\n\r\n" + b'{"jsonrpc":"2.0"}')

    def test_a_post_without_body_says_so_a_get_does_not_the_callers_host_wins(self) -> None:
        self.send(body=None)
        self.assertIn(b"\r\nContent-Length: 0\r\n\r\n", self.connection()[0].value())
        self.send(method=b"GET", body=None, headers=[(b"x-a", b"1"), (b"host", b"example.test")],
                  url=b"http://[::1]/mcp?x=1")
        self.assertEqual(self.connection()[0].value(), b"GET /mcp?x=1 HTTP/1.1\r\nHost: example.test\r\nx-a: 1\r\n\r\n")

    def test_host_as_the_url_names_it(self) -> None:
        for url, host in ((b"http://[::1]/a", b"[::1]"), (b"https://h.test/a", b"h.test"),
                          (b"https://h.test:8443/a", b"h.test:8443")):
            self.send(method=b"GET", body=None, url=url)
            self.assertIn(b"\r\nHost: %s\r\n" % host, self.connection()[0].value())

    def test_a_url_with_a_space_or_control_byte_is_refused_before_anything_is_sent(self) -> None:
        for url in (b"http://127.0.0.1/a b", b"http://127.0.0.1/a\r\nX-Injected: 1"):
            self.assertRaises(ValueError, self.send, url=url)
        self.assertEqual(self.endpoints.connections, [])

    def test_a_spool_file_streams_with_its_length(self) -> None:
        spool = io.BytesIO(b"x" * 200_000)
        cooperator = task.Cooperator(scheduler=lambda f: self.clock.callLater(0, f), started=True)
        self.patch(task, "cooperate", cooperator.cooperate)
        self.send(body=spool)
        transport, _ = self.connection()
        self.assertIn(b"\r\nContent-Length: 200000\r\n\r\n", transport.value())
        self.assertIsNotNone(transport.producer)
        while self.clock.getDelayedCalls():
            self.clock.advance(0)
        self.assertTrue(transport.value().endswith(b"\r\n\r\n" + b"x" * 200_000))
        self.assertIsNone(transport.producer)

    def test_an_answer_before_the_upload_ends_stops_it_and_the_connection_closes(self) -> None:
        d = self.send(body=io.BytesIO(b"x" * 200_000))
        transport, _ = self.connection()
        self.assertIsNotNone(transport.producer)
        self.answer(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        response, _ = self.read(d)
        self.assertEqual(response.code, 413)
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.disconnecting)

    # -- what comes back

    def test_a_length_framed_answer_and_the_connection_reused(self) -> None:
        first = self.send()
        self.answer(b"HTTP/1.1 200 Whatever\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhel")
        response, body = self.read(first)
        self.assertEqual((response.code, response.phrase, response.length), (200, b"OK", 5))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.answer(b"lo")
        self.assertEqual(b"".join(body.chunks), b"hello")
        self.assertIsInstance(body.reason.value, ResponseDone)
        transport, _ = self.connection()
        transport.clear()
        self.send()
        self.assertEqual(len(self.endpoints.connections), 1)
        self.assertTrue(transport.value().startswith(b"POST /mcp"))

    def test_a_chunked_answer_unframed_and_reused(self) -> None:
        d = self.send()
        self.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        response, body = self.read(d)
        self.assertEqual((b"".join(body.chunks), response.length), (b"abcde", UNKNOWN_LENGTH))
        self.assertIsInstance(body.reason.value, ResponseDone)
        self.send()
        self.assertEqual(len(self.endpoints.connections), 1)

    def test_an_answer_read_until_close_ends_as_twisted_says_and_is_not_reused(self) -> None:
        d = self.send()
        self.answer(b"HTTP/1.1 200 OK\r\n\r\nstream")
        _, body = self.read(d)
        self.lose()
        self.assertEqual(b"".join(body.chunks), b"stream")
        self.assertIsInstance(body.reason.value, PotentialDataLoss)
        self.send()
        self.assertEqual(len(self.endpoints.connections), 2)

    def test_connection_close_or_http_1_0_is_not_reused(self) -> None:
        for answer in (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                       b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"):
            d = self.send()
            self.answer(answer)
            self.read(d)
            self.assertTrue(self.connection()[0].disconnecting)
        self.send()
        self.assertEqual(len(self.endpoints.connections), 3)

    def test_a_head_answer_with_a_length_awaits_no_body(self) -> None:
        d = self.send(method=b"HEAD", body=None)
        self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        response, body = self.read(d)
        self.assertEqual(response.length, 1000)
        self.assertIsInstance(body.reason.value, ResponseDone)
        self.send()
        self.assertEqual(len(self.endpoints.connections), 1)

    def test_bytes_past_the_end_close_the_connection_the_answer_stands(self) -> None:
        d = self.send()
        self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
        _, body = self.read(d)
        self.assertEqual((b"".join(body.chunks), type(body.reason.value)), (b"ok", ResponseDone))
        self.assertTrue(self.connection()[0].disconnecting)

    def test_bytes_while_idle_close_the_connection(self) -> None:
        d = self.send()
        self.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.read(d)
        self.answer(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(self.connection()[0].aborted)
        self.send()
        self.assertEqual(len(self.endpoints.connections), 2)

    def test_an_answer_that_is_not_http_fails_the_request_and_aborts(self) -> None:
        d = self.send()
        self.answer(b"SSH-2.0-OpenSSH\r\n\r\n")
        self.assertIn("not HTTP/1.1", str(self.failureResultOf(d, UpstreamBroke).value))
        self.assertTrue(self.connection()[0].aborted)

    def test_broken_framing_mid_body_is_not_a_clean_end(self) -> None:
        d = self.send()
        self.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\nzz\r\n")
        _, body = self.read(d)
        self.assertEqual(b"".join(body.chunks), b"ab")
        self.assertIsInstance(body.reason.value, UpstreamBroke)
        self.assertTrue(self.connection()[0].aborted)

    def test_closed_mid_body_is_not_a_clean_end(self) -> None:
        d = self.send()
        self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        _, body = self.read(d)
        self.lose(reason=ConnectionLost)
        self.assertIn("before the answer's end", str(body.reason.value))

    def test_closed_before_the_head_fails_a_post_on_a_reused_connection_too(self) -> None:
        d = self.send()
        self.lose()
        self.failureResultOf(d, UpstreamClosed)
        d = self.send()
        self.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.read(d)
        d = self.send()  # on the kept connection, which the upstream then closes: not sent again
        self.lose()
        self.failureResultOf(d, UpstreamClosed)
        self.assertEqual(len(self.endpoints.connections), 2)

    def test_lost_before_the_head_otherwise_fails_with_the_cause(self) -> None:
        d = self.send()
        self.lose(reason=ConnectionLost)
        self.failureResultOf(d, ConnectionLost)

    def test_a_get_the_upstream_dropped_on_a_reused_connection_goes_once_on_a_fresh_one(self) -> None:
        d = self.send(method=b"GET", body=None)
        self.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.read(d)
        d = self.send(method=b"GET", body=None)
        self.lose()
        self.assertNoResult(d)
        self.assertEqual(len(self.endpoints.connections), 2)
        self.assertTrue(self.connection()[0].value().startswith(b"GET /mcp HTTP/1.1\r\n"))
        self.lose()  # a fresh one: not again
        self.failureResultOf(d, UpstreamClosed)
        self.assertEqual(len(self.endpoints.connections), 2)

    # -- cancelling, flow control

    def test_cancelled_before_the_head_aborts_and_reads_nothing_more(self) -> None:
        d = self.send()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        transport, _ = self.connection()
        self.assertTrue(transport.aborted)
        self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.lose()
        self.send()
        self.assertEqual(len(self.endpoints.connections), 2)

    def test_cancelled_while_connecting_fails_with_cancelled(self) -> None:
        self.endpoints.hold = True
        d = self.send()
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def test_a_failed_connect_fails_the_request_with_its_reason(self) -> None:
        self.endpoints.hold = True
        d = self.send()
        self.endpoints.waiting[0].errback(ConnectionLost("refused, say"))
        self.failureResultOf(d, ConnectionLost)

    def test_body_bytes_before_the_reader_wait_paused(self) -> None:
        d = self.send()
        self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
        transport, _ = self.connection()
        self.assertEqual(transport.producerState, "paused")
        response, body = self.read(d)
        self.assertEqual((body.chunks, transport.producerState), ([b"abc"], "producing"))
        self.answer(b"def")
        self.assertIsInstance(body.reason.value, ResponseDone)

    def test_an_answer_over_before_its_reader_comes_is_delivered_whole(self) -> None:
        d = self.send()
        self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
        self.assertEqual(self.connection()[0].producerState, "producing")  # idle again, reading
        response, body = self.read(d)
        self.assertEqual((body.chunks, type(body.reason.value)), ([b"abc"], ResponseDone))

    def test_the_reader_pauses_the_connection_and_a_stale_pause_reaches_no_later_exchange(self) -> None:
        d = self.send()
        self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        _, body = self.read(d)
        transport, _ = self.connection()
        body.transport.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        body.transport.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        body.transport.pauseProducing()
        self.answer(b"cd")  # the last read before the pause applied
        self.assertEqual(transport.producerState, "producing")  # idle again: never left paused
        later = self.send()
        body.transport.pauseProducing()  # the finished exchange's
        self.assertEqual(transport.producerState, "producing")
        self.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.successResultOf(later)

    def test_a_reader_that_stops_closes_the_connection_and_hears_of_the_end(self) -> None:
        d = self.send(method=b"GET", body=None)
        self.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n")
        _, body = self.read(d)
        body.transport.stopProducing()
        transport, _ = self.connection()
        self.assertTrue(transport.aborted)
        self.answer(b"data: 2\n\n")
        self.assertEqual(body.chunks, [b"data: 1\n\n"])
        self.assertIsNone(body.reason)
        self.lose(reason=ConnectionLost)
        self.assertIsInstance(body.reason.value, ConnectionLost)

    def test_read_body_of_an_answer(self) -> None:
        d = self.send(method=b"GET", body=None)
        self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        self.assertEqual(self.successResultOf(readBody(self.successResultOf(d))), b"hi")

    # -- the pool

    def test_idle_connections_close_after_the_idle_timeout_on_one_timer(self) -> None:
        for _ in range(3):
            d = self.send()
            self.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
            self.read(d)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(4)
        self.assertTrue(self.connection()[0].disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.send()
        self.assertEqual(len(self.endpoints.connections), 2)

    def test_a_connection_past_its_idle_time_is_not_taken(self) -> None:
        d = self.send()
        self.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.read(d)
        self.clock.rightNow += 5  # the timer has not run yet
        self.send()
        self.assertTrue(self.connection(0)[0].disconnecting)
        self.assertEqual(len(self.endpoints.connections), 2)

    def test_at_most_max_idle_kept_per_origin(self) -> None:
        pending = [self.send() for _ in range(3)]
        for index in range(3):
            self.answer(b"HTTP/1.1 204 No Content\r\n\r\n", index)
        for d in pending:
            self.read(d)
        self.assertEqual([t.disconnecting for t, _ in self.endpoints.connections], [False, False, True])

    def test_close_aborts_every_connection_and_fires_once_all_are_lost(self) -> None:
        d = self.send()
        self.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.read(d)
        busy = [self.send(), self.send()]
        closed = self.client.close()
        self.assertEqual([t.aborted for t, _ in self.endpoints.connections], [True, True])
        self.lose(0)
        self.assertNoResult(closed)
        self.lose(1)
        self.successResultOf(closed)
        for d in busy:
            self.failureResultOf(d, UpstreamClosed)
