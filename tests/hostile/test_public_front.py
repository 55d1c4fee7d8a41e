"""Hostile public requests against the relay's HTTP front: the framing of the public connection is
the relay's own, whatever the request or the tunnel says.

The relay runs as a real process; the gateways are the test's own (legacy JSON
and HTTP/2), so the test controls what a tunnel answers.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import TestCase

from tests.support.h2_gateway import H2Gateway
from tests.support.legacy_gateway import LegacyGateway
from tests.support.processes import start_relay
from tests.support.public import exchange, raw

DOMAIN = "tunnel.test"


class LegacyFramingTests(TestCase):
    """S3: a legacy gateway's `content-length` never decides where the public response ends."""

    timeout = 30

    async def setUp(self) -> None:
        self.relay, self.port = start_relay(self, DOMAIN)
        self.gateway = LegacyGateway(self.port, "tok-legacy", "old")
        self.addCleanup(self.gateway.close)
        await self.gateway.connect()
        self.host = f"old.{DOMAIN}"

    async def test_a_longer_body_than_declared_cannot_answer_the_next_request(self) -> None:
        pipelined = (f"GET /one HTTP/1.1\r\nHost: {self.host}\r\n\r\n"
                     f"GET /two HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n").encode()
        client = await raw(self.port, pipelined)
        first = await self.gateway.requests.get()
        smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nhijack!"
        self.gateway.respond(first, 200, b"short" + smuggled, {"content-length": "5"})
        second = await self.gateway.requests.get()
        self.gateway.respond(second, 200, b"two", {"content-length": "3"})
        received = await client.closed
        self.assertNotIn(b"hijack!", received)
        self.assertNotIn(b"HTTP/1.1 200 OK\r\nContent-Length: 7", received)

    async def test_a_shorter_body_than_declared_is_an_abort(self) -> None:
        client = await raw(self.port, f"GET /s HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        request = await self.gateway.requests.get()
        self.gateway.respond(request, 200, b"abc", {"content-length": "10"})
        received = await client.closed  # the relay closes: the client knows the body is incomplete
        self.assertTrue(received.startswith(b"HTTP/1.1 200"), received[:100])

    async def test_contradictory_lengths_are_a_502(self) -> None:
        client = await raw(self.port, f"GET /c HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n".encode())
        request = await self.gateway.requests.get()
        self.gateway.respond(request, 200, b"abc", {"content-length": ["3", "4"]})
        self.assertTrue((await client.closed).startswith(b"HTTP/1.1 502"))


class RequestFramingTests(TestCase):
    """D8, D9, D10: ambiguous or oversized request framing gets the right status, and nothing
    reaches a tunnel."""

    timeout = 30

    async def setUp(self) -> None:
        self.relay, self.port = start_relay(self, DOMAIN)
        self.gateway = H2Gateway(self.port, "tok-front", "front")
        self.addCleanup(self.gateway.close)
        await self.gateway.connect()
        self.host = f"front.{DOMAIN}"

    async def status_of(self, request: bytes) -> bytes:
        response = await exchange(self.port, request)
        return response.split(b"\r\n", 1)[0]

    async def test_two_host_headers(self) -> None:
        line = await self.status_of(f"GET / HTTP/1.1\r\nHost: {self.host}\r\nHost: other.{DOMAIN}\r\n\r\n".encode())
        self.assertEqual(line, b"HTTP/1.1 400 Bad Request")
        self.assertEqual(self.gateway.requests.pending, [])

    async def test_two_transfer_encodings(self) -> None:
        line = await self.status_of(f"POST / HTTP/1.1\r\nHost: {self.host}\r\nTransfer-Encoding: chunked\r\n"
                                    f"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode())
        self.assertEqual(line, b"HTTP/1.1 400 Bad Request")
        self.assertEqual(self.gateway.requests.pending, [])

    async def test_absolute_form_is_routed_by_its_own_authority(self) -> None:
        """RFC 9112 §3.2.2: the target's authority wins over Host, so a request cannot name one
        tunnel in its target and reach another through Host."""
        line = await self.status_of(f"GET http://nowhere.{DOMAIN}/x HTTP/1.1\r\nHost: {self.host}\r\n"
                                    "Connection: close\r\n\r\n".encode())
        self.assertEqual(line, b"HTTP/1.1 502 Bad Gateway")
        self.assertEqual(self.gateway.requests.pending, [])

    async def test_a_long_request_line_is_414(self) -> None:
        line = await self.status_of(f"GET /{'a' * 20000} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        self.assertEqual(line, b"HTTP/1.1 414 URI Too Long")

    async def test_a_long_header_line_is_431(self) -> None:
        line = await self.status_of(f"GET / HTTP/1.1\r\nHost: {self.host}\r\nX-Big: {'b' * 20000}\r\n\r\n".encode())
        self.assertEqual(line, b"HTTP/1.1 431 Request Header Fields Too Large")

    async def test_public_forwarding_headers_are_replaced(self) -> None:
        """D2: the relay is the edge: what a public client claims in X-Forwarded-* or Forwarded
        does not reach the gateway."""
        client = await raw(self.port, (f"GET /f HTTP/1.1\r\nHost: {self.host}\r\nX-Forwarded-For: 6.6.6.6\r\n"
                                       "X-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n"
                                       "Forwarded: for=6.6.6.6;proto=https\r\nConnection: close\r\n\r\n").encode())
        stream = await self.gateway.requests.get()
        self.gateway.respond(stream, 204)
        await client.closed
        headers = stream.headers
        self.assertEqual(headers[b"x-forwarded-for"], b"127.0.0.1")
        self.assertEqual(headers[b"x-forwarded-host"], self.host.encode())
        self.assertEqual(headers[b"x-forwarded-proto"], b"http")
        self.assertNotIn(b"forwarded", headers)
        self.assertEqual(json.dumps(sorted(k.decode() for k in headers if b"6.6.6.6" in headers[k])), "[]")
