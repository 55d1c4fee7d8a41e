"""A tunnel's pooled sockets, relay side, over in-memory transports: what is written into a socket,
how its gateway's answer reaches the sink, and what a hostile gateway's bytes cost it."""

from __future__ import annotations

import io

from twisted.internet import task
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mcpr.common.response_reader import HEAD_BUDGET
from mcpr.relay.tunnels.contract import TunnelRequest
from mcpr.relay.tunnels.guard import ControlBudget, Outbound
from mcpr.relay.tunnels.h2 import H2Tunnel
from mcpr.relay.tunnels.pool import PooledSocket, SocketPool

from .test_h2_tunnel import Sink

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"


class Counts:
    def __init__(self) -> None:
        self.sockets = 0
        self.requests = 0

    def pooled_sockets(self, delta: int) -> None:
        self.sockets += delta

    def pooled_request(self) -> None:
        self.requests += 1


def post(body: bytes = b'{"jsonrpc":"2.0","id":1,"method":"ping"}') -> TunnelRequest:
    headers = [(b"host", b"a.tunnel.test"), (b"content-type", b"application/json"), (b"x-forwarded-for", b"192.0.2.1")]
    return TunnelRequest(b"POST", b"/mcp?x=1", headers, io.BytesIO(body), len(body))


def put(body: bytes) -> TunnelRequest:
    return TunnelRequest(b"PUT", b"/f", [(b"host", b"a.tunnel.test")], io.BytesIO(body), len(body))


class PoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.counts = Counts()
        self.pool = SocketPool("a", 2, self.counts)

    def socket(self) -> tuple[PooledSocket, StringTransport]:
        socket = self.pool.adopt()
        assert socket is not None
        transport = StringTransport()
        socket.makeConnection(transport)
        return socket, transport

    def test_a_request_goes_out_as_http_1_1_and_its_answer_reaches_the_sink(self) -> None:
        socket, transport = self.socket()
        sink = Sink()
        stream = self.pool.open_stream(post(), sink)
        self.assertIsNotNone(stream)
        sent = transport.value()
        head, _, body = sent.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"POST /mcp?x=1 HTTP/1.1")
        self.assertEqual(lines[1], b"host: a.tunnel.test", "as the front made the headers: Host first")
        self.assertIn(b"x-forwarded-for: 192.0.2.1", lines)
        self.assertIn(b"content-length: 40", lines)
        self.assertNotIn(b"Connection: close", lines, "the socket is kept for the next request")
        self.assertEqual(body, b'{"jsonrpc":"2.0","id":1,"method":"ping"}')
        self.assertEqual(self.pool.busy, 1)
        socket.dataReceived(OK)
        self.assertEqual(sink.status, 200)
        self.assertIn((b"content-length", b"11"), sink.headers)
        self.assertEqual(bytes(sink.body), b'{"ok":true}')
        self.assertTrue(sink.ended)
        self.assertEqual((self.pool.busy, self.counts.requests, self.counts.sockets), (0, 1, 1))

    def test_the_socket_carries_the_next_request_once_idle(self) -> None:
        socket, transport = self.socket()
        first = Sink()
        self.pool.open_stream(post(), first)
        self.assertIsNone(self.pool.open_stream(post(), Sink()), "one exchange at a time per socket")
        socket.dataReceived(OK)
        transport.clear()
        second = Sink()
        self.assertIsNotNone(self.pool.open_stream(post(b"{}"), second))
        self.assertTrue(transport.value().startswith(b"POST /mcp?x=1 HTTP/1.1\r\n"))
        socket.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual((second.status, second.ended), (204, True))

    def test_a_closing_answer_takes_the_socket_out_of_the_pool(self) -> None:
        socket, transport = self.socket()
        self.pool.open_stream(post(), Sink())
        socket.dataReceived(OK.replace(b"Content-Length", b"Connection: close\r\nContent-Length"))
        self.assertTrue(transport.disconnecting)
        socket.connectionLost()
        self.assertEqual((len(self.pool), self.counts.sockets), (0, 0))
        self.assertIsNone(self.pool.open_stream(post(), Sink()))

    def test_a_head_beyond_the_budget_closes_the_socket_and_fails_only_its_request(self) -> None:
        other, other_transport = self.socket()
        hostile, hostile_transport = self.socket()  # the most recently idle: taken first
        victim, bystander = Sink(), Sink()
        self.pool.open_stream(post(), victim)
        self.pool.open_stream(post(), bystander)
        # Endless header lines, none too long for twisted.web's 16 KiB line limit.
        hostile.dataReceived(b"HTTP/1.1 200 OK\r\n")
        line = b"x-filler: " + b"a" * 1000 + b"\r\n"
        for _ in range(HEAD_BUDGET // len(line) + 2):
            if hostile_transport.disconnecting:
                break
            hostile.dataReceived(line)
        self.assertTrue(hostile_transport.disconnecting, "the socket was aborted")
        hostile.connectionLost()
        self.assertEqual(victim.failed, "pooled socket failed")
        self.assertIsNone(victim.status)
        other.dataReceived(OK)
        self.assertTrue(bystander.ended)
        self.assertFalse(other_transport.disconnecting)
        self.assertEqual(len(self.pool), 1)

    def test_bytes_while_no_request_is_asked_close_the_socket(self) -> None:
        socket, transport = self.socket()
        socket.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(self.pool.open_stream(post(), Sink()), "it is no longer offered")

    def test_cancelling_before_the_head_drops_the_socket(self) -> None:
        socket, transport = self.socket()
        sink = Sink()
        stream = self.pool.open_stream(post(), sink)
        assert stream is not None
        stream.cancel()
        self.assertTrue(transport.disconnecting)
        socket.connectionLost()
        self.assertEqual((self.pool.busy, len(self.pool)), (0, 0))
        self.assertIsNone(sink.failed, "the caller cancelled: the sink hears nothing more")

    def test_a_lost_socket_fails_its_request_after_the_head(self) -> None:
        socket, _ = self.socket()
        sink = Sink()
        self.pool.open_stream(post(), sink)
        socket.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        socket.connectionLost()
        self.assertEqual((sink.status, bytes(sink.body), sink.failed), (200, b"partial", "pooled socket lost"))
        self.assertEqual(self.pool.busy, 0)

    def test_a_chunked_answer_is_passed_on_unframed_and_the_socket_kept(self) -> None:
        socket, transport = self.socket()
        sink = Sink()
        self.pool.open_stream(post(), sink)
        socket.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"7\r\ndata: 1\r\n")
        self.assertEqual((sink.status, sink.headers), (200, [(b"content-type", b"text/event-stream")]))
        self.assertIs(sink.producer, socket, "the public side's backpressure pauses this socket")
        socket.dataReceived(b"0\r\n\r\n")
        self.assertEqual((bytes(sink.body), sink.ended, transport.disconnecting), (b"data: 1", True, False))
        self.assertIsNotNone(self.pool.open_stream(post(), Sink()), "idle again")

    def test_an_answer_read_until_close_ends_with_its_socket(self) -> None:
        socket, transport = self.socket()
        sink = Sink()
        self.pool.open_stream(post(), sink)
        socket.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        self.assertFalse(sink.ended)
        socket.connectionLost()
        self.assertEqual((bytes(sink.body), sink.ended, sink.failed), (b"all of it", True, None))
        self.assertEqual((len(self.pool), self.pool.busy), (0, 0))

    def test_bytes_past_the_end_of_an_answer_close_the_socket(self) -> None:
        socket, transport = self.socket()
        sink = Sink()
        self.pool.open_stream(post(), sink)
        socket.dataReceived(OK + b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertTrue(sink.ended, "the answer itself was whole")
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(self.pool.open_stream(post(), Sink()), "the socket is no longer offered")

    def test_a_malformed_answer_fails_its_request_and_closes_the_socket(self) -> None:
        socket, transport = self.socket()
        sink = Sink()
        self.pool.open_stream(post(), sink)
        socket.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        self.assertEqual((sink.status, sink.failed, transport.disconnecting), (None, "pooled socket failed", True))
        self.assertEqual(self.pool.busy, 0)

    def test_a_large_body_is_streamed_with_the_socket_as_its_consumer(self) -> None:
        socket, transport = self.socket()
        body = bytes(range(256)) * 1024  # 256 KiB: past the size written with the head
        clock = Clock()
        cooperator = task.Cooperator(scheduler=lambda work: clock.callLater(0, work), started=True)
        self.patch(task, "cooperate", cooperator.cooperate)
        sink = Sink()
        self.pool.open_stream(put(body), sink)
        self.assertIsNotNone(transport.producer, "the upload is the socket's producer")
        for _ in range(20):
            clock.advance(0)
        head, _, sent = transport.value().partition(b"\r\n\r\n")
        self.assertIn(b"content-length: 262144", head.split(b"\r\n"))
        self.assertEqual(sent, body)
        self.assertIsNone(transport.producer, "and unregistered once sent")
        socket.dataReceived(OK)
        self.assertTrue(sink.ended)
        self.assertFalse(transport.disconnecting)

    def test_an_answer_before_the_body_is_sent_ends_the_upload_and_the_socket(self) -> None:
        socket, transport = self.socket()
        body = b"x" * (1 << 20)
        sink = Sink()
        self.pool.open_stream(put(body), sink)
        socket.dataReceived(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual((sink.status, sink.ended), (413, True))
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.disconnecting, "half a body sent: the socket cannot carry another request")

    def test_the_public_side_pauses_and_resumes_the_socket(self) -> None:
        socket, transport = self.socket()
        sink = Sink()
        self.pool.open_stream(post(), sink)
        socket.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        sink.producer.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        socket.dataReceived(b"cd")
        self.assertTrue(sink.ended)
        self.assertEqual(transport.producerState, "producing", "an idle socket is never left paused")

    def test_a_cancel_after_its_exchange_leaves_the_next_one_alone(self) -> None:
        socket, transport = self.socket()
        first = self.pool.open_stream(post(), Sink())
        assert first is not None
        socket.dataReceived(OK)
        second = Sink()
        self.pool.open_stream(post(), second)
        first.cancel()
        self.assertFalse(transport.disconnecting)
        socket.dataReceived(OK)
        self.assertTrue(second.ended)

    def test_the_pool_holds_at_most_its_size_and_nothing_once_closed(self) -> None:
        (_, first), (_, second) = self.socket(), self.socket()
        self.assertIsNone(self.pool.adopt())
        self.pool.close()
        self.assertTrue(first.disconnecting and second.disconnecting)
        self.assertIsNone(self.pool.adopt())

    def test_the_key_is_compared_whole(self) -> None:
        key = self.pool.key.encode()
        self.assertTrue(self.pool.matches(key))
        self.assertFalse(self.pool.matches(key[:-1]))
        self.assertFalse(self.pool.matches(b""))
        self.assertNotEqual(SocketPool("a", 1).key, self.pool.key)


class TunnelTests(SynchronousTestCase):
    """An HTTP/2 tunnel with a pool: requests take an idle pooled socket first, its streams otherwise."""

    def test_streams_carry_what_the_pool_cannot(self) -> None:
        sent: list[bytes] = []
        tunnel = H2Tunnel("a", "owner", sent.append, lambda code, reason: None,
                          budget=ControlBudget(1000, Clock()), outbound=Outbound(1 << 20))
        tunnel.start()
        tunnel.pool = pool = SocketPool("a", 1)
        socket = pool.adopt()
        assert socket is not None
        transport = StringTransport()
        socket.makeConnection(transport)
        sent.clear()
        tunnel.open_stream(post(), Sink())
        self.assertTrue(transport.value(), "the first request took the pooled socket")
        self.assertEqual(sent, [], "and no stream")
        tunnel.open_stream(post(), Sink())
        self.assertTrue(sent, "the second one opened a stream")
        self.assertEqual(tunnel.in_flight, 2)
        tunnel.closed()
        self.assertTrue(transport.disconnecting, "the pool closes with its tunnel")


class GrowthTests(SynchronousTestCase):
    """A busy tunnel asks its gateway for more pooled sockets, doubling up to the pool's size, and
    asks again only once the gateway has opened what it was asked for."""

    def test_the_pool_grows_with_its_load(self) -> None:
        asked: list[int] = []
        pool = SocketPool("a", 16, ask=asked.append)
        self.assertEqual(pool.wanted, 4)

        def open_sockets(n: int) -> None:
            for _ in range(n):
                socket = pool.adopt()
                assert socket is not None
                socket.makeConnection(StringTransport())

        open_sockets(4)
        for _ in range(4):
            self.assertIsNotNone(pool.open_stream(post(), Sink()))
        self.assertEqual(asked, [], "no request waited yet")
        self.assertIsNone(pool.open_stream(post(), Sink()))
        self.assertEqual(asked, [8])
        self.assertIsNone(pool.open_stream(post(), Sink()))
        self.assertEqual(asked, [8], "not again before the gateway opened them")
        open_sockets(4)
        for _ in range(4):
            pool.open_stream(post(), Sink())
        pool.open_stream(post(), Sink())
        self.assertEqual(asked, [8, 16])
        open_sockets(8)
        for _ in range(8):
            pool.open_stream(post(), Sink())
        pool.open_stream(post(), Sink())
        self.assertEqual(asked, [8, 16], "never beyond its size")
        self.assertIsNone(pool.adopt())
