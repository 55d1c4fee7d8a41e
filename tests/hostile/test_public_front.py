"""Hostile public requests against the relay's HTTP front: the framing of the public connection is
the relay's own, whatever the request or the tunnel says.

The relay runs as a real process; the gateways are the test's own (legacy JSON
and HTTP/2), so the test controls what a tunnel answers.  Every case keeps a
`Bystander` (another user's tunnel, with an open SSE stream) and checks it is
unaffected.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support.bystander import Bystander
from tests.support.h2_gateway import H2Gateway
from tests.support.legacy_gateway import LegacyGateway
from tests.support.processes import ROOT, Process, python, start_relay, twist
from tests.support.public import exchange, raw

DOMAIN = "tunnel.test"


def parse(response: bytes) -> tuple[bytes, dict[bytes, list[bytes]], bytes]:
    """(status line, headers by lower-case name, body) of one raw HTTP/1.1 response."""
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers, body


class FrontTestBase(TestCase):
    timeout = 30
    relay_args: tuple[str, ...] = ()

    async def setUp(self) -> None:
        self.relay, self.port = start_relay(self, DOMAIN, *self.relay_args)
        self.bystander = await Bystander(self.port, DOMAIN).start(self)


class LegacyFramingTests(FrontTestBase):
    """S3: a legacy gateway's `content-length` never decides where the public response ends."""

    async def setUp(self) -> None:
        await super().setUp()
        self.gateway = LegacyGateway(self.port, "tok-legacy", "old")
        self.addCleanup(self.gateway.close)
        await self.gateway.connect()
        self.host = f"old.{DOMAIN}"

    async def answer(self, status: int, body: bytes, headers: dict, method: str = "GET") -> bytes:
        client = await raw(self.port, f"{method} /r HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n"
                           .encode())
        self.gateway.respond(await self.gateway.requests.get(), status, body, headers)
        return await client.closed

    async def test_a_longer_body_than_declared_cannot_answer_the_next_request(self) -> None:
        pipelined = (f"GET /one HTTP/1.1\r\nHost: {self.host}\r\n\r\n"
                     f"GET /two HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n").encode()
        client = await raw(self.port, pipelined)
        first = await self.gateway.requests.get()
        smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nhijack!"
        self.gateway.respond(first, 200, b"short" + smuggled, {"content-length": "5"})
        received = await client.closed  # the declared 5 bytes, then the relay closes
        self.assertNotIn(b"hijack!", received)
        self.assertNotIn(b"HTTP/1.1 200 OK\r\nContent-Length: 7", received)
        status, headers, body = parse(received)
        self.assertEqual((status, headers[b"content-length"], body), (b"HTTP/1.1 200 OK", [b"5"], b"short"))
        self.assertEqual(self.gateway.requests.pending, [])  # /two never went anywhere
        await self.bystander.unaffected()

    async def test_a_shorter_body_than_declared_is_not_a_clean_end(self) -> None:
        client = await raw(self.port, f"GET /s HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        request = await self.gateway.requests.get()
        self.gateway.respond(request, 200, b"abc", {"content-length": "10"})
        received = await client.closed  # closed with 3 of the 10 bytes: the client knows it is cut short
        status, headers, body = parse(received)
        self.assertEqual((status, headers[b"content-length"], body), (b"HTTP/1.1 200 OK", [b"10"], b"abc"))
        await self.bystander.unaffected()

    async def test_bad_lengths_are_a_502(self) -> None:
        for lengths in (["3", "4"], "3, 4", "abc", "-3", "+3", "0x3", "", "99999999999999999999"):
            received = await self.answer(200, b"abc", {"content-length": lengths})
            self.assertTrue(received.startswith(b"HTTP/1.1 502"), (lengths, received[:100]))
            self.assertNotIn(b"abc", parse(received)[2])
        received = await self.answer(200, b"abc", {"content-length": ["3", "3"]})  # RFC 9110 §8.6: one length
        self.assertEqual(parse(received)[1][b"content-length"], [b"3"])
        await self.bystander.unaffected()

    async def test_a_non_final_status_is_a_502(self) -> None:
        """D6 (legacy part): a 1xx "response", even with a body, is not a response."""
        for status in (100, 101, 103, 199):
            received = await self.answer(status, b"HTTP/1.1 200 OK\r\n\r\nsmuggled", {})
            self.assertTrue(received.startswith(b"HTTP/1.1 502"), (status, received[:100]))
            self.assertNotIn(b"smuggled", received)
        await self.bystander.unaffected()

    async def test_the_gateway_does_not_choose_the_transfer_coding(self) -> None:
        received = await self.answer(200, b"5\r\nhello\r\n0\r\n\r\n",
                                     {"transfer-encoding": "chunked", "connection": "x-hop", "x-hop": "1"})
        status, headers, body = parse(received)
        self.assertEqual(headers[b"transfer-encoding"], [b"chunked"])  # the relay's own chunking
        self.assertNotIn(b"x-hop", headers)
        self.assertIn(b"5\r\nhello\r\n0\r\n\r\n", body)  # the gateway's bytes are data, chunked again
        await self.bystander.unaffected()

    async def test_no_body_for_head_204_and_304(self) -> None:
        received = await self.answer(200, b"body of a HEAD", {"content-length": "14"}, method="HEAD")
        self.assertEqual(parse(received)[1][b"content-length"], [b"14"])
        self.assertEqual(parse(received)[2], b"")
        received = await self.answer(204, b"body of a 204", {"content-length": "13"})
        self.assertNotIn(b"content-length", parse(received)[1])
        self.assertEqual(parse(received)[2], b"")
        received = await self.answer(304, b"body of a 304", {})
        self.assertEqual(parse(received)[2], b"")
        await self.bystander.unaffected()

    async def test_one_date_and_one_server(self) -> None:
        """Issue 12: the upstream's Date and Server replace the relay's instead of doubling them."""
        received = await self.answer(200, b"x", {"date": "Mon, 01 Jan 2024 00:00:00 GMT", "server": "upstream/1"})
        headers = parse(received)[1]
        self.assertEqual(headers[b"date"], [b"Mon, 01 Jan 2024 00:00:00 GMT"])
        self.assertEqual(headers[b"server"], [b"upstream/1"])
        headers = parse(await self.answer(200, b"x", {}))[1]
        self.assertEqual((len(headers[b"date"]), len(headers[b"server"])), (1, 1))
        await self.bystander.unaffected()

    async def test_malformed_header_fields_are_a_502(self) -> None:
        for headers in ({"bad name": "x"}, {"x-ok": "a\r\nSet-Cookie: evil=1"}, {"": "x"}):
            received = await self.answer(200, b"x", headers)
            self.assertTrue(received.startswith(b"HTTP/1.1 502"), (headers, received[:100]))
            self.assertNotIn(b"evil", received)
        await self.bystander.unaffected()


class H2FramingTests(FrontTestBase):
    """S3 for HTTP/2 tunnels: the same rules whatever the tunnel's wire protocol."""

    async def setUp(self) -> None:
        await super().setUp()
        self.gateway = H2Gateway(self.port, "tok-h2-framing", "modern")
        self.addCleanup(self.gateway.close)
        await self.gateway.connect()
        self.host = f"modern.{DOMAIN}"

    async def answer(self, status: int, body: bytes, headers: list, method: str = "GET") -> bytes:
        client = await raw(self.port, f"{method} /r HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n"
                           .encode())
        self.gateway.respond(await self.gateway.requests.get(), status, body, headers)
        return await client.closed

    async def test_no_body_for_head_and_204(self) -> None:
        received = await self.answer(200, b"", [(b"content-length", b"14")], method="HEAD")
        self.assertEqual((parse(received)[1][b"content-length"], parse(received)[2]), ([b"14"], b""))
        received = await self.answer(204, b"body of a 204", [(b"content-length", b"13")])
        self.assertNotIn(b"content-length", parse(received)[1])
        self.assertEqual(parse(received)[2], b"")
        await self.bystander.unaffected()

    async def test_one_date_and_one_server(self) -> None:
        headers = parse(await self.answer(200, b"x", [(b"date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
                                                      (b"server", b"upstream/1")]))[1]
        self.assertEqual((headers[b"date"], headers[b"server"]), ([b"Mon, 01 Jan 2024 00:00:00 GMT"],
                                                                  [b"upstream/1"]))
        await self.bystander.unaffected()


class RequestFramingTests(FrontTestBase):
    """D8, D9, D10: ambiguous or oversized request framing gets the right status, and nothing
    reaches a tunnel."""

    async def setUp(self) -> None:
        await super().setUp()
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
        await self.bystander.unaffected()

    async def test_ambiguous_body_lengths(self) -> None:
        start = f"POST / HTTP/1.1\r\nHost: {self.host}\r\n"
        for framing in ("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
                        "Transfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello",
                        "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
                        "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"):
            line = await self.status_of((start + framing).encode())
            self.assertEqual(line, b"HTTP/1.1 400 Bad Request", framing)
        self.assertEqual(self.gateway.requests.pending, [])
        await self.bystander.unaffected()

    async def test_absolute_form_is_routed_by_its_own_authority(self) -> None:
        """RFC 9112 §3.2.2: the target's authority wins over Host, so a request cannot name one
        tunnel in its target and reach another through Host."""
        line = await self.status_of(f"GET http://nowhere.{DOMAIN}/x HTTP/1.1\r\nHost: {self.host}\r\n"
                                    "Connection: close\r\n\r\n".encode())
        self.assertEqual(line, b"HTTP/1.1 502 Bad Gateway")
        self.assertEqual(self.gateway.requests.pending, [])
        client = await raw(self.port, f"GET http://{self.host}/y?z HTTP/1.1\r\nHost: nowhere.{DOMAIN}\r\n"
                           "Connection: close\r\n\r\n".encode())
        stream = await self.gateway.requests.get()
        self.assertEqual((stream.path, stream.headers[b":authority"]), (b"/y?z", self.host.encode()))
        self.gateway.respond(stream, 204)
        await client.closed
        await self.bystander.unaffected()

    async def test_a_long_request_line_is_414(self) -> None:
        line = await self.status_of(f"GET /{'a' * 20000} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        self.assertEqual(line, b"HTTP/1.1 414 URI Too Long")
        await self.bystander.unaffected()

    async def test_a_long_header_line_is_431(self) -> None:
        line = await self.status_of(f"GET / HTTP/1.1\r\nHost: {self.host}\r\nX-Big: {'b' * 20000}\r\n\r\n".encode())
        self.assertEqual(line, b"HTTP/1.1 431 Request Header Fields Too Large")
        many = "".join(f"X-{i}: {'v' * 1000}\r\n" for i in range(20))
        line = await self.status_of(f"GET / HTTP/1.1\r\nHost: {self.host}\r\n{many}\r\n".encode())
        self.assertEqual(line, b"HTTP/1.1 431 Request Header Fields Too Large")
        await self.bystander.unaffected()


class LingeringCloseTests(FrontTestBase):
    """D13: a client that writes its whole oversized body before reading gets the 413, not a reset."""

    relay_args = ("--max-request-body", "64KiB")

    def send_all_then_read(self, request: bytes) -> bytes:
        """What a simple blocking client does: sendall, then read to the end (in a thread)."""
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.settimeout(20)
            sock.sendall(request)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            return received

    async def test_the_413_arrives_after_a_whole_body_was_written(self) -> None:
        for framing, body in ((b"Content-Length: %d\r\n" % (8 << 20), b"x" * (8 << 20)),
                              (b"Transfer-Encoding: chunked\r\n", b"%x\r\n%s\r\n0\r\n\r\n" % (1 << 20, b"y" * (1 << 20)))):
            request = (f"POST /up HTTP/1.1\r\nHost: nowhere.{DOMAIN}\r\n".encode() + framing
                       + b"Content-Type: application/json\r\n\r\n" + body)
            received = await deferToThread(self.send_all_then_read, request)
            status, headers, answer = parse(received)
            self.assertEqual(status, b"HTTP/1.1 413 Request Entity Too Large")
            self.assertEqual(json.loads(answer)["error"]["code"], -32600)
        await self.bystander.unaffected()


class ForwardingHeaderTests(FrontTestBase):
    """D2: the relay is the edge; only a trusted proxy in front of it may speak for the client."""

    relay_args = ("--trusted-proxy", "127.0.0.2")

    async def setUp(self) -> None:
        await super().setUp()
        self.gateway = H2Gateway(self.port, "tok-xff", "xff")
        self.addCleanup(self.gateway.close)
        await self.gateway.connect()
        self.host = f"xff.{DOMAIN}"

    async def forwarded(self, extra: str, source: str | None = None) -> dict[bytes, bytes]:
        client = await raw(self.port, f"GET /f HTTP/1.1\r\nHost: {self.host}\r\n{extra}Connection: close\r\n\r\n"
                           .encode(), source)
        stream = await self.gateway.requests.get()
        self.gateway.respond(stream, 204)
        await client.closed
        return stream.headers

    claims = ("X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n"
              "X-Forwarded-Port: 1\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6;proto=https\r\n")

    async def test_public_forwarding_headers_are_replaced(self) -> None:
        headers = await self.forwarded(self.claims)
        self.assertEqual(headers[b"x-forwarded-for"], b"127.0.0.1")
        self.assertEqual(headers[b"x-forwarded-host"], self.host.encode())
        self.assertEqual(headers[b"x-forwarded-proto"], b"http")
        for name in (b"forwarded", b"x-forwarded-port", b"x-real-ip"):
            self.assertNotIn(name, headers)
        self.assertEqual(json.dumps(sorted(k.decode() for k in headers if b"6.6.6.6" in headers[k])), "[]")
        await self.bystander.unaffected()

    async def test_a_trusted_proxy_keeps_and_extends_them(self) -> None:
        headers = await self.forwarded(self.claims, source="127.0.0.2")
        self.assertEqual(headers[b"x-forwarded-for"], b"6.6.6.6, 127.0.0.2")
        self.assertEqual(headers[b"x-forwarded-host"], b"evil.example")
        self.assertEqual(headers[b"x-forwarded-proto"], b"https")
        self.assertEqual(headers[b"forwarded"], b"for=6.6.6.6;proto=https, for=127.0.0.2")
        self.assertEqual(headers[b"x-real-ip"], b"6.6.6.6")
        await self.bystander.unaffected()

    async def test_connection_cannot_strip_host(self) -> None:
        headers = await self.forwarded("Connection: host, x-forwarded-for\r\n")
        self.assertEqual((headers[b":authority"], headers[b"x-forwarded-for"]), (self.host.encode(), b"127.0.0.1"))
        await self.bystander.unaffected()


class EndToEndForwardingTests(TestCase):
    """D2 end to end: public client → relay → real gateway → upstream, which sees the client as the
    relay saw it, whatever the client claimed (the gateway keeps the relay's Host and Proto)."""

    timeout = 60

    async def test_the_upstream_sees_what_the_relay_saw(self) -> None:
        relay, port = start_relay(self, DOMAIN)
        bystander = await Bystander(port, DOMAIN).start(self)
        bulk = Process(self, python(str(ROOT / "tests" / "support" / "bulk_server.py")), name="bulk")
        bulk_port = int(bulk.wait_for("LISTENING").split()[-1])
        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        gateway = Process(self, twist("mcpr", "--mcp", f"http://127.0.0.1:{bulk_port}/mcp", "--listen",
                                      "tcp:0:interface=127.0.0.1", "--relay-url", f"http://127.0.0.1:{port}",
                                      "--subdomain", "e2e"), name="gateway", cwd=str(cwd))
        gateway.wait_for("Tunnel: ")
        received = await exchange(port, (f"GET /headers HTTP/1.0\r\nHost: e2e.{DOMAIN}\r\n"
                                         f"{ForwardingHeaderTests.claims}\r\n").encode())
        seen = json.loads(parse(received)[2])
        self.assertEqual(seen["x-forwarded-for"], ["127.0.0.1, 127.0.0.1"])  # the client, then the relay
        self.assertEqual(seen["x-forwarded-host"], [f"e2e.{DOMAIN}"])
        self.assertEqual(seen["x-forwarded-proto"], ["http"])
        for name in ("forwarded", "x-forwarded-port", "x-real-ip"):
            self.assertNotIn(name, seen)
        await bystander.unaffected()
