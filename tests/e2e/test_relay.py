"""The relay as a real process, with gateways that speak the legacy JSON protocol."""

from __future__ import annotations

import io
import json
import signal

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from mcpr.relay.identity import open_subdomain
from tests.support.collect import Collect
from tests.support.legacy_gateway import Closed, LegacyGateway, body_of
from tests.support.loopback import client_agent
from tests.support.processes import start_relay

DOMAIN = "tunnel.test"


class RelayTestBase(TestCase):
    """A relay process per test, legacy gateways registered on it, and public requests to it."""

    timeout = 60
    relay_args: tuple[str, ...] = ()

    def setUp(self) -> None:
        self.relay, self.port = start_relay(self, DOMAIN, *self.relay_args)
        self.agent = client_agent(self)

    async def gateway(self, token: str | None = "tok-a", subdomain: str | None = None, **kw) -> LegacyGateway:
        gw = LegacyGateway(self.port, token, subdomain, **kw)
        self.addCleanup(lambda: Deferred.fromCoroutine(gw.close()))
        await gw.connect()
        return gw

    async def refused(self, token, subdomain=None, **kw) -> Closed:
        gw = LegacyGateway(self.port, token, subdomain, **kw)
        try:
            await gw.connect()
        except Closed as e:
            return e
        await gw.close()
        raise AssertionError("registration was accepted")

    async def get(self, host: str, path: str = "/", method: bytes = b"GET", body: bytes | None = None,
                  headers: dict | None = None):
        h = Headers({b"host": [host.encode()]})
        for k, v in (headers or {}).items():
            h.setRawHeaders(k.encode(), [v.encode()])
        producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
        return await self.agent.request(method, f"http://127.0.0.1:{self.port}{path}".encode(), h, producer)


class OpenModeTests(RelayTestBase):
    """A relay in open mode with tight limits: routing, streaming, limits, eviction and misbehaving tunnels."""

    relay_args = ("--headers-timeout", "1", "--max-request-body", "1KiB", "--max-in-flight", "2",
                  "--max-tunnels-per-token", "2", "--registration-timeout", "1", "--max-message-size", "64KiB")

    async def test_register_route_and_buffered_response(self) -> None:
        gw = await self.gateway("tok-a", "demo")
        self.assertEqual(gw.ack, {"subdomain": "demo", "url": f"https://demo.{DOMAIN}"})
        pending = Deferred.fromCoroutine(self.get(f"Demo.{DOMAIN}:443", "/mcp?x=1", b"POST", b'{"a":1}',
                                                  {"content-type": "application/json", "cookie": "a=1"}))
        request = await gw.requests.get()
        self.assertEqual((request["method"], request["path"]), ("POST", "/mcp?x=1"))
        self.assertEqual(body_of(request), b'{"a":1}')
        self.assertEqual(request["headers"]["host"], f"Demo.{DOMAIN}:443")
        self.assertEqual(request["headers"]["x-forwarded-proto"], "http")
        self.assertIn("127.0.0.1", request["headers"]["x-forwarded-for"])
        gw.respond(request, 201, b"created", {"content-type": "text/plain", "set-cookie": ["a=1", "b=2"]})
        response = await pending
        self.assertEqual(response.code, 201)
        self.assertEqual(await readBody(response), b"created")
        self.assertEqual(response.headers.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2"])
        # The relay logs the line before it sends the response's last byte (and flushes each line).
        self.assertRegex(self.relay.output(), r"demo POST /mcp 201 7B \d+ms")

    async def test_open_mode_default_subdomain_is_token_hash(self) -> None:
        gw = await self.gateway("tok-b", None)
        self.assertEqual(gw.ack["subdomain"], open_subdomain("tok-b"))

    async def test_hosts(self) -> None:
        """Unknown tunnels are 502, other hosts 404; the bare domain and an IP serve the relay's pages."""
        response = await self.get(f"nothere.{DOMAIN}")
        self.assertEqual((response.code, await readBody(response)), (502, b"tunnel not found\n"))
        response = await self.get("other.example")
        self.assertEqual(response.code, 404)
        await readBody(response)
        response = await self.get(f"a.b.{DOMAIN}")
        self.assertEqual(response.code, 404)
        await readBody(response)
        response = await self.get(DOMAIN, "/healthz")
        health = json.loads(await readBody(response))
        self.assertEqual((response.code, health["status"], health["tunnels"]), (200, "ok", 0))
        response = await self.get("127.0.0.1", "/healthz")
        self.assertEqual(response.code, 200)
        await readBody(response)
        response = await self.get(DOMAIN, "/")
        self.assertIn(b"mcpr relay", await readBody(response))

    async def test_streaming_chunks_arrive_as_sent_and_cancel_on_disconnect(self) -> None:
        gw = await self.gateway("tok-a", "sse")
        pending = Deferred.fromCoroutine(self.get(f"sse.{DOMAIN}", "/mcp", headers={"accept": "text/event-stream"}))
        request = await gw.requests.get()
        gw.head(request, 200, {"content-type": "text/event-stream"})
        response = await pending
        chunks = Collect()
        response.deliverBody(chunks)
        for i in range(3):
            arrived = chunks.next_chunk()
            gw.chunk(request, f"data: {i}\n\n".encode())
            self.assertEqual(await arrived, f"data: {i}\n\n".encode())
        chunks.transport.stopProducing()
        cancelled = await gw.cancels.get()
        self.assertEqual(cancelled, request["id"])
        gw.chunk(request, b"data: late\n\n")  # a race the relay must tolerate
        # The relay reads the socket in order: a request served after the late chunk proves it kept the tunnel.
        after = Deferred.fromCoroutine(self.get(f"sse.{DOMAIN}", "/after"))
        gw.respond(await gw.requests.get(), 200, b"still open")
        self.assertEqual(await readBody(await after), b"still open")
        self.assertFalse(gw.closed.called)

    async def test_tunnel_failure_mid_response_is_an_abort(self) -> None:
        gw = await self.gateway("tok-a", "abort")
        pending = Deferred.fromCoroutine(self.get(f"abort.{DOMAIN}"))
        request = await gw.requests.get()
        gw.head(request, 200, {"content-type": "text/plain"})
        response = await pending
        chunks = Collect()
        response.deliverBody(chunks)
        first = chunks.next_chunk()
        gw.chunk(request, b"partial")
        await first
        gw.send({"kind": "response_error", "id": request["id"], "message": "upstream died"})
        await chunks.done
        self.assertEqual(type(chunks.reason.value).__name__, "ResponseFailed")

    async def test_limits(self) -> None:
        """504 without a response head in time, 413 over the body cap, 503 past max-in-flight."""
        gw = await self.gateway("tok-a", "lim")
        # 504: no response head in time
        response = await self.get(f"lim.{DOMAIN}", "/slow")
        self.assertEqual((response.code, await readBody(response)), (504, b"tunnel headers timeout\n"))
        self.assertEqual((await gw.cancels.get()), (await gw.requests.get())["id"])
        # 413
        response = await self.get(f"lim.{DOMAIN}", "/up", b"POST", b"x" * 2000)
        self.assertEqual(response.code, 413)
        await readBody(response)
        # 503 past max_in_flight
        first = Deferred.fromCoroutine(self.get(f"lim.{DOMAIN}", "/1"))
        second = Deferred.fromCoroutine(self.get(f"lim.{DOMAIN}", "/2"))
        arrived = [await gw.requests.get(), await gw.requests.get()]
        response = await self.get(f"lim.{DOMAIN}", "/3")
        self.assertEqual((response.code, await readBody(response)), (503, b"tunnel overloaded\n"))
        for request in arrived:
            gw.respond(request, 200, request["path"][1:].encode())
        self.assertEqual(await readBody(await first), b"1")
        self.assertEqual(await readBody(await second), b"2")

    async def test_eviction_rules(self) -> None:
        old = await self.gateway("tok-a", "same")
        new = await self.gateway("tok-a", "same")
        code, reason = await old.closed
        self.assertEqual((code, reason), (4002, "evicted: another client registered with the same tunnel"))
        e = await self.refused("tok-other", "same")
        self.assertEqual((e.code, e.reason), (4003, "subdomain in use by another token"))
        self.assertFalse(new.closed.called)
        pending = Deferred.fromCoroutine(self.get(f"same.{DOMAIN}"))
        new.respond(await new.requests.get(), 200, b"new")
        self.assertEqual(await readBody(await pending), b"new")
        e = await self.refused("tok-a", "Bad_Name")
        self.assertEqual(e.code, 4004)
        await self.gateway("tok-a", "second")
        e = await self.refused("tok-a", "third")
        self.assertEqual((e.code, e.reason), (4008, "too many tunnels for this token"))

    async def test_registration_timeout_and_garbage(self) -> None:
        silent = LegacyGateway(self.port, None, hello=False)
        self.addCleanup(lambda: Deferred.fromCoroutine(silent.close()))
        connecting = Deferred.fromCoroutine(silent.connect())
        code, reason = await silent.closed
        self.assertEqual((code, reason), (1008, "registration timeout"))
        self.failureResultOf(connecting, Closed)
        good = await self.gateway("tok-a", "good")
        bad = await self.gateway("tok-c", "bad")
        bad.send_raw(b"\x00garbage", binary=True)
        code, _ = await bad.closed
        self.assertEqual(code, 1008)
        liar = await self.gateway("tok-d", "liar")
        liar.send({"id": "nope-99", "status": 200})
        code, reason = await liar.closed
        self.assertEqual(code, 1008)
        self.assertIn("unknown request id", reason)
        pending = Deferred.fromCoroutine(self.get(f"good.{DOMAIN}"))
        good.respond(await good.requests.get(), 200, b"still fine")
        self.assertEqual(await readBody(await pending), b"still fine")


    async def test_oversized_message_closes_only_that_tunnel(self) -> None:
        good = await self.gateway("tok-a", "calm")
        big = await self.gateway("tok-e", "loud")
        pending = Deferred.fromCoroutine(self.get(f"loud.{DOMAIN}"))
        request = await big.requests.get()
        big.respond(request, 200, b"x" * (100 << 10))  # one 133 KiB JSON message, over the 64 KiB cap
        code, _ = await big.closed
        self.assertEqual(code, 1009)
        response = await pending
        self.assertEqual(response.code, 502)
        await readBody(response)
        pending = Deferred.fromCoroutine(self.get(f"calm.{DOMAIN}"))
        good.respond(await good.requests.get(), 200, b"unaffected")
        self.assertEqual(await readBody(await pending), b"unaffected")


    async def test_flood_for_cancelled_requests_closes_the_tunnel(self) -> None:
        flood = await self.gateway("tok-f", "flood")
        calm = await self.gateway("tok-g", "calm2")
        pending = Deferred.fromCoroutine(self.get(f"flood.{DOMAIN}", "/slow"))
        request = await flood.requests.get()
        await gw_cancel(flood, pending)
        for _ in range(1500):
            flood.chunk(request, b"x")
        code, reason = await flood.closed
        self.assertEqual((code, reason), (1008, "protocol violation: flood of messages for finished requests"))
        pending = Deferred.fromCoroutine(self.get(f"calm2.{DOMAIN}"))
        calm.respond(await calm.requests.get(), 200, b"fine")
        self.assertEqual(await readBody(await pending), b"fine")


async def gw_cancel(gw: LegacyGateway, pending: Deferred) -> None:
    """Make the public client leave, and wait for the relay's cancel."""
    pending.addErrback(lambda failure: None)  # the cancelled request's own failure is expected
    pending.cancel()
    await gw.cancels.get()


class StaticModeTests(RelayTestBase):
    """A relay with static tokens: who may register which subdomain, and the offer/pick exchange."""

    relay_args = ("--static-token", "secret-1:alice,alice-*", "--static-token", "secret-2:bob")

    async def test_static_tokens(self) -> None:
        """Wrong tokens and names are refused, an allowed name is taken, a pick is offered; no token is logged."""
        e = await self.refused("wrong", "alice")
        self.assertEqual((e.code, e.reason), (4001, "invalid token"))
        e = await self.refused("secret-1", "bob")
        self.assertEqual((e.code, e.reason), (4001, "subdomain 'bob' not authorized for this token"))
        gw = await self.gateway("secret-1", "alice-dev")
        self.assertEqual(gw.ack["subdomain"], "alice-dev")
        picked = await self.gateway("secret-1", None, pick="alice")
        self.assertEqual(picked.offers, [["alice", "alice-*"]])
        self.assertEqual(picked.ack["subdomain"], "alice")
        self.assertNotIn("secret-1", self.relay.output())

    async def test_one_concrete_pattern_needs_no_answer_to_an_offer(self) -> None:
        """An original mcpr client that never answers offers, with a token for exactly `bob`: the
        relay registers `bob` itself, asked for or not, and forwards to it (the original relay's rule 2)."""
        for asked in (None, "bob", "robert"):
            gw = await self.gateway("secret-2", asked, answers_offers=False)
            self.assertEqual((gw.offers, gw.ack["subdomain"]), ([], "bob"), asked)
            self.assertEqual(gw.ack["url"], f"https://bob.{DOMAIN}")
            response = Deferred.fromCoroutine(self.get(f"bob.{DOMAIN}", "/ping"))
            request = await gw.requests.get()
            self.assertEqual(request["path"], "/ping")
            gw.respond(request, 200, b"pong")
            self.assertEqual((await response).code, 200)
            await gw.close()


class ProviderModeTests(TestCase):
    """A relay that asks an auth provider on loopback about each token."""

    timeout = 60

    async def test_auth_provider(self) -> None:
        """The provider is asked with the shared secret; its grant and its refusal reach the gateway."""
        calls = []

        class Verify(Resource):
            isLeaf = True

            def render_POST(self, request):
                body = json.loads(request.content.read())
                calls.append((request.getHeader(b"x-relay-secret"), body))
                request.setHeader(b"content-type", b"application/json")
                if body["token"] == "good":
                    return json.dumps({"subdomains": ["team-*"]}).encode()
                request.setResponseCode(401)
                return json.dumps({"error": "token expired"}).encode()

        root = Resource()
        api = Resource()
        root.putChild(b"api", api)
        api.putChild(b"verify", Verify())
        site = Site(root)
        site.noisy = False
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        relay, relay_port = start_relay(self, DOMAIN, "--auth-provider", f"http://127.0.0.1:{port.getHost().port}",
                                        env={"MCPR_AUTH_PROVIDER_SECRET": "s3"})
        gw = LegacyGateway(relay_port, "good", "team-x")
        self.addCleanup(lambda: Deferred.fromCoroutine(gw.close()))
        ack = await gw.connect()
        self.assertEqual(ack["subdomain"], "team-x")
        self.assertEqual(calls[0], (b"s3", {"token": "good", "subdomain": "team-x"}))
        bad = LegacyGateway(relay_port, "old", "team-y")
        try:
            await bad.connect()
            self.fail("accepted")
        except Closed as e:
            self.assertEqual((e.code, e.reason), (4001, "token expired"))
        relay.popen.send_signal(signal.SIGTERM)
