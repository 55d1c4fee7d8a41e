"""What the proxy core hands a store: headers, the head of each body taken while it streams, list answers."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from mcpr.gateway.settings import load_gateway
from mcpr.gateway.tap import build_site
from mcpr.proxy.capture import BodyCapture
from mcpr.proxy.events import EventLog, RequestRecord
from mcpr.proxy.forward import Forwarder
from mcpr.proxy.resource import CLASSIFY_LIMIT, ProxyResource
from mcpr.proxy.routing import Upstream
from tests.proxy.test_resource import FakeUpstream
from tests.support.collect import Collect
from tests.support.loopback import TrackingSite, client_agent, listen, track


class Kept:
    """A `Recorder` that keeps what it is given, and fires `next` at each request."""

    def __init__(self, limit: int) -> None:
        self.capture_limit = limit
        self.records: list[RequestRecord] = []
        self.sessions: list[dict[str, Any]] = []
        self.next: Deferred[RequestRecord] = Deferred()

    def request(self, record: RequestRecord) -> None:
        self.records.append(record)
        d, self.next = self.next, Deferred()
        d.callback(record)

    def session(self, ts: float, session: dict[str, Any]) -> None:
        self.sessions.append(session)

    def health(self) -> dict[str, Any]:
        return {"kept": len(self.records)}


class BodyCaptureTests(TestCase):
    def test_keeps_the_head_only(self) -> None:
        capture = BodyCapture(5)
        for chunk in (b"ab", b"cdef", b"gh"):
            capture.feed(chunk)
        self.assertEqual((capture.data, capture.kept), (b"abcde", 5))
        off = BodyCapture(0)
        off.feed(b"x")
        self.assertEqual(off.data, b"")


class CaptureTests(TestCase):
    timeout = 20

    async def start(self, limit: int, mcp: str | None = None) -> None:
        self.upstream = FakeUpstream()
        up_port = await listen(self, TrackingSite(self.upstream))
        cwd = Path(self.mktemp())
        cwd.mkdir()
        settings = load_gateway({"mcp": mcp or f"http://127.0.0.1:{up_port}/mcp"}, env={}, cwd=cwd)
        forwarder = Forwarder(reactor, headers_timeout=settings.upstream_timeout)
        self.addCleanup(forwarder.close)
        self.kept = Kept(limit)
        self.resource = ProxyResource(reactor, Upstream.parse(settings.mcp), forwarder, EventLog(None),
                                      recorder=self.kept)
        self.port = await listen(self, track(build_site(self.resource, settings)))
        self.agent = client_agent(self)

    async def request(self, method: bytes, path: str, body: bytes | None = None, **headers: str):
        h = Headers({k.replace("_", "-").encode(): [v.encode()] for k, v in headers.items()})
        producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
        return await self.agent.request(method, f"http://127.0.0.1:{self.port}{path}".encode(), h, producer)

    async def test_sse_is_captured_while_it_streams(self) -> None:
        """Each event reaches the client as it comes; the capture keeps the first 40 bytes."""
        await self.start(40)
        response = await self.request(b"GET", "/mcp?x=1", accept="text/event-stream", authorization="Bearer t")
        collect = Collect()
        first = collect.next_chunk()
        response.deliverBody(collect)
        self.assertEqual(await first, b": open\n\n")
        stream = self.upstream.streams[0]
        sent = b": open\n\n"
        for i in range(4):
            event = f"id: {i}\ndata: {{\"n\": {i}}}\n\n".encode()
            arrived = collect.next_chunk()
            stream.write(event)
            self.assertEqual(await arrived, event, "held back by the capture")
            sent += event
        reported = self.kept.next
        stream.finish()
        await collect.done
        record = await reported
        capture = record.capture
        self.assertEqual(capture.response_body.data, sent[:40])
        self.assertEqual(record.bytes_out, len(sent))
        self.assertEqual(capture.query, b"x=1")
        self.assertIn((b"Authorization", [b"Bearer t"]), capture.request_headers)
        names = {name.lower() for name, _ in capture.response_headers}
        self.assertIn(b"content-type", names)

    async def test_large_request_body_head_from_the_spool(self) -> None:
        """A body too large to classify is streamed upstream from its spool file; the capture
        reads its head from there and the upstream still gets every byte."""
        await self.start(100)
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "x", "pad": "p" * CLASSIFY_LIMIT}).encode()
        response = await self.request(b"POST", "/upload", body, content_type="text/plain")
        seen = json.loads(await readBody(response))
        self.assertEqual(seen["length"], len(body))
        record = self.kept.records[-1]
        self.assertEqual(record.capture.request_body.data, body[:100])
        self.assertEqual(record.bytes_in, len(body))

    async def test_capture_off_keeps_headers_only(self) -> None:
        await self.start(0)
        body = json.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "add"}}).encode()
        await readBody(await self.request(b"POST", "/mcp", body, content_type="application/json"))
        capture = self.kept.records[-1].capture
        self.assertEqual((capture.request_body.data, capture.response_body.data), (b"", b""))
        self.assertTrue(capture.request_headers)

    async def test_list_answers_and_errors_are_captured(self) -> None:
        await self.start(1 << 16)
        body = json.dumps({"jsonrpc": "2.0", "id": 5, "method": "tools/list", "params": {"cursor": "p2"}}).encode()
        answer = await readBody(await self.request(b"POST", "/mcp", body, content_type="application/json"))
        capture = self.kept.records[-1].capture
        (listing,) = capture.listings
        self.assertEqual((listing.method, listing.cursor), ("tools/list", "p2"))
        self.assertEqual(listing.result, json.loads(answer)["result"])
        self.assertEqual(capture.response_body.data, answer)

    async def test_an_error_the_gateway_answers_is_captured(self) -> None:
        await self.start(1 << 16, mcp="http://127.0.0.1:1/mcp")
        body = json.dumps({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "add"}}).encode()
        answer = await readBody(await self.request(b"POST", "/mcp", body, content_type="application/json"))
        record = self.kept.records[-1]
        self.assertEqual(record.capture.response_body.data, answer)
        self.assertEqual(json.loads(answer)["error"]["code"], -32002)
        self.assertEqual(record.capture.request_body.data, body)

    async def test_sessions_and_health_reach_the_recorder(self) -> None:
        await self.start(16)
        init = json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                           "params": {"clientInfo": {"name": "probe", "version": "1"}}}).encode()
        await readBody(await self.request(b"POST", "/mcp", init, content_type="application/json"))
        self.assertEqual([(s["session_id"], s["state"], s["client_name"]) for s in self.kept.sessions],
                         [("sess-1", "active", "probe")])
        health = json.loads(await readBody(await self.request(b"GET", "/healthz")))
        self.assertEqual(health["store"], {"kept": 1})
