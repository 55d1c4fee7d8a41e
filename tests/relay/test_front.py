"""The relay's front in memory: Host routing, and requests forwarded into a tunnel."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mcpr.relay.front import split_host
from tests.support.memory_relay import Client, MemoryRelay, relay_settings

DOMAIN = "tunnel.example.com"


class HostTests(SynchronousTestCase):
    """split_host: which Host headers name a tunnel, the relay itself, or neither."""

    def test_cases(self) -> None:
        """Case, ports and a trailing dot are ignored; nested, invalid and foreign names route nowhere."""
        cases = {
            b"abc.tunnel.example.com": ("tunnel", "abc"),
            b"ABC.Tunnel.Example.COM:443": ("tunnel", "abc"),
            b"abc.tunnel.example.com.": ("tunnel", "abc"),
            b"tunnel.example.com": ("bare", None),
            b"tunnel.example.com:8080": ("bare", None),
            b"a.b.tunnel.example.com": ("other", None),
            b"-x.tunnel.example.com": ("other", None),
            b"x_y.tunnel.example.com": ("other", None),
            b"abctunnel.example.com": ("other", None),
            b"example.com": ("other", None),
            b"127.0.0.1:8080": ("other", None),
            b"[::1]:8080": ("other", None),
            b"": ("other", None),
            None: ("other", None),
            (b"a" * 64) + b".tunnel.example.com": ("other", None),
        }
        for host, expected in cases.items():
            self.assertEqual(split_host(host, DOMAIN), expected, host)

    @given(st.binary(max_size=80))
    def test_never_raises_and_only_valid_labels_route(self, host: bytes) -> None:
        kind, label = split_host(host, DOMAIN)
        if kind == "tunnel":
            self.assertRegex(label, r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class ForwardingTests(SynchronousTestCase):
    """The relay's front in memory: forwarding into a tunnel, its own answers, and its access log."""

    def setUp(self) -> None:
        self.relay = MemoryRelay(relay_settings(self, max_in_flight="1", headers_timeout="5"))
        self.tunnel = self.relay.tunnel("a")
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def access_log(self) -> list[str]:
        self.relay.stats.access_log.flush()
        return self.relay.access.getvalue().splitlines()

    def test_forwarded_and_reported_once(self) -> None:
        client = self.relay.request("a.tunnel.test", "/mcp?x=1")
        [stream] = self.tunnel.streams
        self.assertEqual((stream.request.method, stream.request.path), (b"GET", b"/mcp?x=1"))
        self.assertIn((b"x-forwarded-proto", b"http"), stream.request.headers)
        self.assertEqual(self.relay.stats.in_flight, 1)

        stream.respond(200, b"hello")

        self.assertTrue(client.value().startswith(b"HTTP/1.1 200 OK"))
        self.assertEqual(self.relay.stats.in_flight, 0)
        self.assertRegex(" ".join(self.access_log()), r"^a GET /mcp 200 5B \d+ms$")

    def test_client_gone_cancels_the_stream(self) -> None:
        client = self.relay.request("a.tunnel.test")
        [stream] = self.tunnel.streams
        client.leave()

        self.assertTrue(stream.cancelled)
        self.assertEqual(self.relay.stats.in_flight, 0)
        stream.sink.head(200, [])  # a late answer from the gateway goes nowhere
        stream.sink.end()
        self.assertEqual(self.access_log(), ["a GET / - 0B 0ms (client-gone)"])

    def test_relay_answers(self) -> None:
        """502 for an unknown tunnel, 503 past max-in-flight, 504 on a headers timeout, each logged once."""
        missing = self.relay.request("b.tunnel.test")
        self.assertIn(b"502 Bad Gateway", missing.value())
        self.assertTrue(missing.value().endswith(b"tunnel not found\n"))
        self.relay.request("a.tunnel.test", "/1")
        overloaded = self.relay.request("a.tunnel.test", "/2")
        self.assertTrue(overloaded.value().endswith(b"tunnel overloaded\n"))
        [stream] = self.tunnel.streams
        self.relay.clock.advance(5)
        self.assertTrue(stream.cancelled)
        self.assertEqual(self.relay.stats.in_flight, 0)
        self.assertEqual(self.access_log(), ["b GET / 502 17B 0ms", "a GET /2 503 18B 0ms", "a GET /1 504 23B 5000ms"])

    def test_health(self) -> None:
        """/healthz reports status, domain, tunnels and requests in flight."""
        client = self.relay.request("127.0.0.1", "/healthz")
        body = client.value().split(b"\r\n\r\n", 1)[1]
        health = json.loads(body)
        self.assertEqual((health["status"], health["domain"], health["tunnels"], health["in_flight"]),
                         ("ok", "tunnel.test", 1, 0))


class StatusPageTests(SynchronousTestCase):
    """The bare domain's status page tells gateways the URL to register at, as the relay is reached."""

    def page(self, host: str, *headers: str, **cli: str) -> str:
        relay = MemoryRelay(relay_settings(self, **cli))
        client = Client(relay.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000)))
        lines = "".join(f"{h}\r\n" for h in headers)
        client.channel.dataReceived(f"GET / HTTP/1.1\r\nHost: {host}\r\n{lines}\r\n".encode())
        response = client.value().decode()
        self.assertTrue(response.startswith("HTTP/1.1 200 "), response)
        return response.split("\r\n\r\n", 1)[1]

    def test_plain_http_relay_with_a_port(self) -> None:
        """No public URL configured: the request's scheme and Host, port included."""
        body = self.page("tunnel.test:8711")
        self.assertIn("<code>ws://tunnel.test:8711/_tunnel/register</code>", body)
        self.assertIn("<code>https://&lt;name&gt;.tunnel.test</code>", body)  # what registrations answer

    def test_configured_public_url(self) -> None:
        body = self.page("tunnel.test:8711", public_url="http://*.tunnel.test:8711")
        self.assertIn("<code>ws://tunnel.test:8711/_tunnel/register</code>", body)
        self.assertIn("<code>http://&lt;name&gt;.tunnel.test:8711</code>", body)
        body = self.page("tunnel.test:8080", public_url="https://*.tunnel.test")  # behind a TLS proxy
        self.assertIn("<code>wss://tunnel.test/_tunnel/register</code>", body)
        self.assertIn("<code>https://&lt;name&gt;.tunnel.test</code>", body)

    def test_a_trusted_proxy_says_how_it_was_reached(self) -> None:
        forwarded = ("X-Forwarded-Proto: https", "X-Forwarded-Host: tunnel.test")
        self.assertIn("<code>wss://tunnel.test/_tunnel/register</code>",
                      self.page("tunnel.test:8080", *forwarded, trusted_proxies="127.0.0.1"))
        self.assertIn("<code>ws://tunnel.test:8080/_tunnel/register</code>",
                      self.page("tunnel.test:8080", *forwarded))  # anyone else's claims are ignored
        body = self.page("tunnel.test", "X-Forwarded-Host: <b>", trusted_proxies="127.0.0.1")
        self.assertIn("<code>ws://&lt;b&gt;/_tunnel/register</code>", body)
