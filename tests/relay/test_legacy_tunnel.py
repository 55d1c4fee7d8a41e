"""The relay's end of a legacy JSON tunnel in memory: what a hostile or unlucky gateway sends fails
the request it is about, or closes this tunnel (1008), never more."""

from __future__ import annotations

import base64
import json
from io import BytesIO
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mcpr.relay.tunnels.contract import TunnelRequest
from mcpr.relay.tunnels.guard import ControlBudget, Outbound
from mcpr.relay.tunnels.legacy import LegacyTunnel
from tests.relay.test_h2_tunnel import Sink


class Legacy:
    def __init__(self, control_rate: int = 1000) -> None:
        self.clock = Clock()
        self.sent: list[dict] = []
        self.closes: list[tuple[int, str]] = []
        self.pauses = 0
        self.outbound = Outbound(1 << 20)
        self.tunnel = LegacyTunnel("old", "owner", lambda m: self.sent.append(json.loads(m)),
                                   lambda c, r: self.closes.append((c, r)), self._pause, self._resume,
                                   budget=ControlBudget(control_rate, self.clock), outbound=self.outbound)

    def _pause(self) -> None:
        self.pauses += 1

    def _resume(self) -> None:
        self.pauses -= 1

    def request(self, path: str = "/", body: bytes = b"") -> tuple[Sink, Any]:
        sink = Sink()
        stream = self.tunnel.open_stream(TunnelRequest(b"POST" if body else b"GET", path.encode(), [],
                                                       BytesIO(body) if body else None, len(body)), sink)
        return sink, stream

    def last_id(self) -> str:
        return [m for m in self.sent if m["kind"] == "request"][-1]["id"]

    def send(self, **message: Any) -> None:
        self.tunnel.message(json.dumps(message).encode(), False)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class StatusTests(SynchronousTestCase):
    """D6: only 200-599 become a head (the protocol has no informational responses); any other
    status is a 502 for its request, and the gateway is told to stop it."""

    def test_bad_statuses_fail_one_request(self) -> None:
        legacy = Legacy()
        for status in (0, 999, -1, 100, 101, 199, 600, "200", True, None, 2.5):
            for streaming in (True, False):
                sink, _ = legacy.request()
                rid = legacy.last_id()
                if streaming:
                    legacy.send(kind="response_head", id=rid, status=status, headers={})
                    legacy.send(kind="response_chunk", id=rid, data=b64(b"late"), last=True)  # tolerated
                else:
                    legacy.send(id=rid, status=status, headers={}, body=b64(b"informational body"))
                self.assertEqual((sink.status, sink.failed), (None, "the gateway sent an invalid status"),
                                 (status, streaming))
                self.assertEqual(legacy.sent[-1], {"kind": "cancel", "id": rid})
        self.assertEqual(legacy.closes, [])
        sink, _ = legacy.request()
        legacy.send(id=legacy.last_id(), status=200, headers={}, body=b64(b"ok"))
        self.assertEqual((sink.status, bytes(sink.body), sink.ended), (200, b"ok", True))


class FloodTests(SynchronousTestCase):
    """S5: messages that carry nothing (empty chunks, chunks for finished requests) draw on the
    socket's control budget; past it the tunnel is closed 1008."""

    def test_empty_chunks(self) -> None:
        legacy = Legacy()
        sink, _ = legacy.request()
        rid = legacy.last_id()
        legacy.send(kind="response_head", id=rid, status=200, headers={})
        for _ in range(1001):
            legacy.send(kind="response_chunk", id=rid, data=None, last=False)
        self.assertEqual(legacy.closes, [(1008, "protocol violation: flood of messages without data")])

    def test_within_budget_over_time(self) -> None:
        legacy = Legacy()
        sink, _ = legacy.request()
        rid = legacy.last_id()
        legacy.send(kind="response_head", id=rid, status=200, headers={})
        for _ in range(5):
            for _ in range(900):
                legacy.send(kind="response_chunk", id=rid, data="", last=False)
            legacy.clock.advance(1)
        legacy.send(kind="response_chunk", id=rid, data=b64(b"end"), last=True)
        self.assertEqual((legacy.closes, bytes(sink.body), sink.ended), ([], b"end", True))

    def test_data_is_not_a_flood(self) -> None:
        legacy = Legacy(control_rate=5)
        sink, _ = legacy.request()
        rid = legacy.last_id()
        legacy.send(kind="response_head", id=rid, status=200, headers={})
        for _ in range(100):
            legacy.send(kind="response_chunk", id=rid, data=b64(b"x"), last=False)
        self.assertEqual((legacy.closes, len(sink.body)), ([], 100))


class FailureTests(SynchronousTestCase):
    """D7: a bug while handling a message fails that message's request, logged."""

    def test_a_sink_that_raises(self) -> None:
        legacy = Legacy()
        bad, _ = legacy.request("/bad")
        bad_id = legacy.last_id()
        good, _ = legacy.request("/good")
        good_id = legacy.last_id()

        def explode(status: int, headers: Any) -> None:
            raise ValueError("sink bug")

        bad.head = explode  # type: ignore[method-assign]
        legacy.send(id=bad_id, status=200, headers={}, body=None)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(bad.failed, "tunnel error")
        self.assertEqual(legacy.sent[-1], {"kind": "cancel", "id": bad_id})
        legacy.send(id=good_id, status=201, headers={}, body=None)
        self.assertEqual((good.status, legacy.closes), (201, []))

    def test_an_error_after_pausing_resumes_the_socket(self) -> None:
        legacy = Legacy()
        sink, _ = legacy.request()
        rid = legacy.last_id()
        legacy.send(kind="response_head", id=rid, status=200, headers={})
        sink.producer.pauseProducing()
        self.assertEqual(legacy.pauses, 1)
        legacy.send(kind="response_error", id=rid, message="upstream broke")
        self.assertEqual((sink.failed, legacy.pauses), ("upstream broke", 0))


class BacklogTests(SynchronousTestCase):
    """D3: while the socket towards the gateway is backed up, requests wait in order."""

    def test_requests_wait_for_the_socket(self) -> None:
        legacy = Legacy()
        legacy.outbound.pauseProducing()
        first, _ = legacy.request("/1", b"a" * 1000)
        gone, gone_stream = legacy.request("/2")
        third, _ = legacy.request("/3")
        self.assertEqual(legacy.sent, [])
        self.assertEqual(legacy.tunnel.in_flight, 3)
        gone_stream.cancel()  # never sent, so nothing to cancel at the gateway
        legacy.outbound.resumeProducing()
        self.assertEqual([m["path"] for m in legacy.sent], ["/1", "/3"])
        self.assertEqual(base64.b64decode(legacy.sent[0]["body"]), b"a" * 1000)
