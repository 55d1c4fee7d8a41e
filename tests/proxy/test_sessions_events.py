"""Session table bounds and the shape of events and console lines."""

import io
import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mcpr.proxy.events import EventLog, RequestRecord, human_bytes
from mcpr.proxy.sessions import SessionTracker


class SessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.changes: list = []
        self.tracker = SessionTracker(self.clock, lambda s: self.changes.append((s.id, s.state)),
                                      max_sessions=2, idle_timeout=60)

    def test_lifecycle(self) -> None:
        s = self.tracker.started("a", {"clientInfo": {"name": "c", "version": "1"}},
                                 {"serverInfo": {"name": "s", "version": "2"}, "protocolVersion": "p"})
        self.assertEqual((s.client_name, s.client_version, s.server_name, s.protocol_version), ("c", "1", "s", "p"))
        self.clock.advance(5)
        self.assertEqual(self.tracker.touch("a").requests, 2)
        self.assertEqual(self.tracker.get("a").last_activity, 5)
        self.assertIsNone(self.tracker.touch("unknown"))
        self.tracker.ended("a")
        self.assertEqual(self.changes, [("a", "active"), ("a", "ended")])
        self.assertEqual(len(self.tracker), 0)

    def test_malformed_info_is_ignored(self) -> None:
        s = self.tracker.started("a", {"clientInfo": "x"}, ["not", "a", "dict"])
        self.assertEqual((s.client_name, s.server_name), (None, None))

    def test_idle_expiry_and_cap(self) -> None:
        self.tracker.started("a", {}, {})
        self.clock.advance(30)
        self.tracker.started("b", {}, {})
        self.clock.advance(31)
        self.tracker.expire()
        self.assertEqual(self.changes[-1], ("a", "expired"))
        self.tracker.started("c", {}, {})
        self.tracker.started("d", {}, {})
        self.assertEqual(self.changes[-2], ("b", "expired"))
        self.assertEqual(len(self.tracker), 2)


class EventTests(SynchronousTestCase):
    def test_json_lines(self) -> None:
        out = io.StringIO()
        log = EventLog(out)
        log.emit("request", 0.0, request_id="r", tool="add")
        log.emit("heartbeat", 1.5)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(lines[0], {"type": "request", "ts": "1970-01-01T00:00:00.000Z", "request_id": "r",
                                    "tool": "add"})
        self.assertEqual(lines[1]["ts"], "1970-01-01T00:00:01.500Z")

    def test_disabled_sink(self) -> None:
        log = EventLog.open(None)
        self.assertFalse(log.enabled)
        log.emit("request", 0.0)

    def test_console_line(self) -> None:
        r = RequestRecord("r", 100.0, "direct", "POST", "/mcp", "mcp", status=200, mcp_method="tools/call",
                          tool="add", headers_at=100.008, finished=100.0085, bytes_out=147)
        line = r.console_line()
        self.assertEqual(line.split(" ", 1)[1], "POST 200 147B 8ms 8ms↑ 0ms↓ tools/call add")
        event = r.as_event()
        self.assertEqual((event["latency_ms"], event["upstream_ms"]), (8.5, 8.0))

    def test_human_bytes(self) -> None:
        self.assertEqual([human_bytes(n) for n in (0, 1023, 1536, 5 << 20, 3 << 30)],
                         ["0B", "1023B", "1.5KB", "5.0MB", "3.0GB"])
