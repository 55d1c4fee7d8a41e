"""Hostile public clients against an HTTP/2 tunnel: none of them may hurt the tunnel or its other users.

The relay runs as a real process; the gateway is `H2Gateway`, driven by the
test, so the test sees exactly what reaches the tunnel.  Each case keeps a
bystander (an open stream of another user) and checks it is untouched.
"""

from __future__ import annotations

from h2.errors import ErrorCodes
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.trial.unittest import TestCase

from tests.support.bystander import Bystander
from tests.support.h2_gateway import H2Gateway
from tests.support.loopback import sleep
from tests.support.processes import start_relay
from tests.support.public import RawClient, exchange, raw, stalled_get

DOMAIN = "tunnel.test"
MiB = 1 << 20
CONNECTION_WINDOW = 8 * MiB


def head(method: str, target: str, host: str, extra: str = "Connection: close\r\n") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


class H2TunnelTestBase(TestCase):
    timeout = 60
    relay_args: tuple[str, ...] = ()

    async def setUp(self) -> None:
        self.relay, self.port = start_relay(self, DOMAIN, *self.relay_args)
        self.gateway = H2Gateway(self.port, "tok-hostile", "victim")
        self.addCleanup(self.gateway.close)
        await self.gateway.connect()
        self.host = f"victim.{DOMAIN}"

    async def bystander(self) -> tuple[RawClient, object]:
        """Another user's SSE stream, open for the whole attack: its first event has arrived."""
        client = await raw(self.port, head("GET", "/events", self.host, "Accept: text/event-stream\r\n"))
        stream = await self.gateway.requests.get()
        self.gateway.respond(stream, 200, headers=[(b"content-type", b"text/event-stream")], end=False)
        self.gateway.send(stream, b"data: first\n\n")
        await client.until(b"data: first")
        return client, stream

    async def bystander_still_served(self, client: RawClient, stream) -> None:
        self.assertFalse(stream.reset.called, "the bystander's stream was reset")
        self.gateway.send(stream, b"data: after\n\n")
        received = await client.until(b"data: after")
        self.assertIn(b"data: after", received)
        self.assertFalse(client.closed.called)

    async def normal_request(self, size: int = 64 * 1024) -> bytes:
        """A plain GET through the tunnel, answered with `size` bytes; returns the body received."""
        client = await raw(self.port, head("GET", "/normal", self.host, "Connection: close\r\n"))
        stream = await self.gateway.requests.get()
        self.assertEqual(stream.path, b"/normal")
        self.gateway.respond(stream, 200, headers=[(b"content-length", b"%d" % size)], end=False)
        self.gateway.send(stream, b"n" * size, end=True)
        response = await client.closed
        return response.split(b"\r\n\r\n", 1)[1]


class AbandonedDownloadTests(H2TunnelTestBase):
    async def test_abandoned_downloads_give_their_window_back(self) -> None:
        """S1: clients that stop reading a large download and leave must not keep the tunnel's
        connection window: after 50 of them (each held up to a stream window, 1 MiB, so 50 MiB
        would have leaked), the window is whole again and a normal request gets its whole body.

        h2 sends a connection WINDOW_UPDATE once half the window was acknowledged, so "whole"
        is seen from the gateway as more than half; the exact accounting is in
        tests/relay/test_h2_tunnel.py."""
        other = await Bystander(self.port, DOMAIN).start(self)
        bystander, bystander_stream = await self.bystander()
        await self.gateway.window_at_least(CONNECTION_WINDOW // 2)
        for batch in range(10):
            sockets, streams = [], []
            for _ in range(5):
                sockets.append(stalled_get(self.port, self.host, "/big"))
                streams.append(await self.gateway.requests.get())
            for stream in streams:
                self.gateway.respond(stream, 200, headers=[(b"content-type", b"application/octet-stream")],
                                     end=False)
                self.gateway.send(stream, b"x" * (2 * MiB))
            # Let the relay take what the stalled sockets make it hold (a full stream window each).
            for _ in range(40):
                if all(self.gateway.queued(s) <= MiB for s in streams):
                    break
                await sleep(0.05)
            await sleep(0.1)
            for sock in sockets:
                sock.close()
            await DeferredList([s.reset for s in streams])
        restored = self.gateway.window_at_least(CONNECTION_WINDOW // 2 + 1)
        restored.addTimeout(5, reactor)
        await restored.addErrback(lambda _: None)
        self.assertGreater(self.gateway.conn.outbound_flow_control_window, CONNECTION_WINDOW // 2)
        self.assertEqual(len(await self.normal_request(2 * CONNECTION_WINDOW)), 2 * CONNECTION_WINDOW)
        await self.bystander_still_served(bystander, bystander_stream)
        await other.unaffected()

    async def test_readers_that_stall_and_stay_cannot_starve_the_tunnel(self) -> None:
        """Clients that stop reading a large download but keep their connection open would each
        hold a stream window of the tunnel's connection window: twelve of them together must not
        stall everyone else's responses on the tunnel.  The relay cuts the greediest once stalled
        streams hold half the window."""
        other = await Bystander(self.port, DOMAIN).start(self)
        own, own_stream = await self.bystander()
        await self.gateway.window_at_least(CONNECTION_WINDOW // 2)
        sockets, streams = [], []
        for _ in range(12):
            sockets.append(stalled_get(self.port, self.host, "/big"))
            streams.append(await self.gateway.requests.get())
        self.addCleanup(lambda: [sock.close() for sock in sockets])
        for stream in streams:
            # More than the kernel's socket buffers take: each stalled reader ends up holding a
            # whole stream window at the relay.
            self.gateway.respond(stream, 200, headers=[(b"content-type", b"application/octet-stream")], end=False)
            self.gateway.send(stream, b"x" * (16 * MiB))
        cut = DeferredList([s.reset for s in streams], fireOnOneCallback=True)
        cut.addTimeout(20, reactor)
        await cut  # at least one of the stalled downloads was cut, with its connection
        self.assertEqual(len(await self.normal_request(2 * CONNECTION_WINDOW)), 2 * CONNECTION_WINDOW)
        self.assertIn("client stopped reading", self.relay.output())
        await self.bystander_still_served(own, own_stream)
        await other.unaffected()


class UnforwardableRequestTests(H2TunnelTestBase):
    async def test_odd_request_targets_are_refused_before_the_tunnel(self) -> None:
        """S2: requests that cannot become an HTTP/2 stream get an answer from the relay itself,
        never reach the gateway, and leave the tunnel (and other users' streams) working."""
        bystander = await Bystander(self.port, DOMAIN).start(self)
        own, own_stream = await self.bystander()
        cases = [
            (head("CONNECT", "example.com:443", self.host), b"405"),
            (head("CONNECT", self.host + ":443", self.host), b"405"),
            (head("TRACE", "/", self.host), b"405"),
            # Well-formed, but about the server as a whole: not forwardable (mcpr.common.web.request_target).
            (head("OPTIONS", "*", self.host), b"400"),
            (head("GET", "*", self.host), b"400"),
            (head("GET", "foo", self.host), b"400"),
            (head("GET", "example.com:80", self.host), b"400"),
            (head("GET", "ftp://example.com/", self.host), b"400"),
            (head("G:T", "/", self.host), b"400"),
            (head("G\x01T", "/", self.host), b"400"),
            (head("GET", "/a b", self.host), b"400"),
            (head("GET", "/\x7f", self.host), b"400"),
            (head("GET", "/\x80", self.host), b"400"),
            (head("GET", "/", self.host, "X-Bad\x01: v\r\n"), b"400"),
            (head("GET", "/", self.host, "X-Bad: v\x01\r\n"), b"400"),
            (head("GET", "/", self.host, "X-Bad: v\x00\r\n"), b"400"),
            (head("GET", "/", self.host, ":path: /x\r\n"), b"400"),
            (head("GET", "/", self.host, "Host: other\r\n"), b"400"),
        ]
        for request, status in cases:
            response = await exchange(self.port, request)
            self.assertTrue(response.startswith(b"HTTP/1.1 " + status), (request, response[:200]))
        self.assertEqual(self.gateway.requests.pending, [])
        self.assertEqual(len(await self.normal_request()), 64 * 1024)
        await self.bystander_still_served(own, own_stream)
        await bystander.unaffected()

    async def test_unusual_but_valid_methods_pass(self) -> None:
        """Methods HTTP allows (any token) are forwarded as they are: the gateway decides."""
        bystander = await Bystander(self.port, DOMAIN).start(self)
        for method in ("PATCH", "PROPFIND", "PURGE", "X-CUSTOM", "get", "M!#$%&'*+.^_`|~1"):
            client = await raw(self.port, head(method, "/m?q=1", self.host, "Connection: close\r\n"))
            stream = await self.gateway.requests.get()
            self.assertEqual((stream.method, stream.path), (method.encode(), b"/m?q=1"))
            self.gateway.respond(stream, 204)
            self.assertTrue((await client.closed).startswith(b"HTTP/1.1 204"))
        await bystander.unaffected()


class BadStatusTests(H2TunnelTestBase):
    async def test_a_gateway_status_outside_http_is_a_502_for_that_request_only(self) -> None:
        """D6: `:status` values that are not a final HTTP status never reach the public client."""
        other = await Bystander(self.port, DOMAIN).start(self)
        bystander, bystander_stream = await self.bystander()
        for status in (b"0", b"999", b"-1", b"abc", b"20", b"2000", b""):
            client = await raw(self.port, head("GET", "/s", self.host, "Connection: close\r\n"))
            stream = await self.gateway.requests.get()
            self.gateway.conn.send_headers(stream.id, [(b":status", status)], end_stream=True)
            self.gateway.flush()
            response = await client.closed
            self.assertTrue(response.startswith(b"HTTP/1.1 502"), (status, response[:100]))
        self.assertEqual(self.gateway.close_code, None)
        self.assertEqual(len(await self.normal_request()), 64 * 1024)
        await self.bystander_still_served(bystander, bystander_stream)
        await other.unaffected()

    async def test_informational_heads_are_skipped(self) -> None:
        """D6: 1xx heads are informational in HTTP/2: skipped, and the final head that follows is
        the response."""
        other = await Bystander(self.port, DOMAIN).start(self)
        client = await raw(self.port, head("GET", "/early", self.host))
        stream = await self.gateway.requests.get()
        self.gateway.conn.send_headers(stream.id, [(b":status", b"103"), (b"link", b"</a.css>; rel=preload")])
        self.gateway.respond(stream, 200, b"final", headers=[(b"content-length", b"5")])
        response = await client.closed
        self.assertTrue(response.startswith(b"HTTP/1.1 200"), response[:100])
        self.assertNotIn(b"103", response.split(b"\r\n", 1)[0])
        self.assertTrue(response.endswith(b"final"))
        await other.unaffected()


class RefusingGatewayTests(H2TunnelTestBase):
    """S6 (the relay's side): a gateway that holds fewer streams than the relay wants to open, or
    refuses some (REFUSED_STREAM), gets them queued and sent again; one that refuses a request
    again and again gets it answered 503; the tunnel never fails."""

    async def setUp(self) -> None:
        self.relay, self.port = start_relay(self, DOMAIN)
        self.gateway = H2Gateway(self.port, "tok-hostile", "victim", max_streams=2)
        self.addCleanup(self.gateway.close)
        await self.gateway.connect()
        self.host = f"victim.{DOMAIN}"

    async def test_refused_streams_are_sent_again(self) -> None:
        other = await Bystander(self.port, DOMAIN).start(self)
        clients = [await raw(self.port, head("GET", f"/r{i}", self.host)) for i in range(6)]
        first = await self.gateway.requests.get()
        second = await self.gateway.requests.get()
        self.assertEqual(self.gateway.requests.pending, [], "more streams than the gateway holds")
        self.gateway.conn.reset_stream(second.id, ErrorCodes.REFUSED_STREAM)
        self.gateway.flush()
        self.gateway.respond(first, 200, b"ok", headers=[(b"content-length", b"2")])
        paths = [first.path]
        while len(paths) < 6:
            stream = await self.gateway.requests.get()
            paths.append(stream.path)
            self.gateway.respond(stream, 200, b"ok", headers=[(b"content-length", b"2")])
        self.assertEqual(sorted(paths), sorted(f"/r{i}".encode() for i in range(6)))
        answers = [await c.closed for c in clients]
        self.assertTrue(all(a.startswith(b"HTTP/1.1 200") and a.endswith(b"ok") for a in answers))
        self.assertIsNone(self.gateway.close_code)
        await other.unaffected()

    async def test_refused_again_and_again_is_a_503(self) -> None:
        other = await Bystander(self.port, DOMAIN).start(self)
        client = await raw(self.port, head("GET", "/never", self.host))
        for _ in range(4):  # the request, and three more tries
            stream = await self.gateway.requests.get()
            self.assertEqual(stream.path, b"/never")
            self.gateway.conn.reset_stream(stream.id, ErrorCodes.REFUSED_STREAM)
            self.gateway.flush()
        response = await client.closed
        self.assertTrue(response.startswith(b"HTTP/1.1 503"), response[:200])
        self.assertIsNone(self.gateway.close_code)
        self.assertEqual(len(await self.normal_request()), 64 * 1024)
        await other.unaffected()
