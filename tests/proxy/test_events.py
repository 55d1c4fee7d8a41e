"""The shape of events (JSON lines) and of the console line."""

import io
import json
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from mcpr.proxy.events import EventLog, RequestRecord, human_bytes


class EventTests(SynchronousTestCase):
    """EventLog's JSON lines and RequestRecord's console line."""

    def test_json_lines(self) -> None:
        """One JSON object per line, with its type and a UTC millisecond timestamp."""
        out = io.StringIO()
        log = EventLog(out)
        log.emit("request", 0.0, request_id="r", tool="add")
        log.emit("heartbeat", 1.5)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(lines[0], {"type": "request", "ts": "1970-01-01T00:00:00.000Z", "request_id": "r",
                                    "tool": "add"})
        self.assertEqual(lines[1]["ts"], "1970-01-01T00:00:01.500Z")

    def test_disabled_sink(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        log = EventLog.open(None)
        self.assertFalse(log.enabled)
        log.emit("request", 0.0)
        self.assertEqual(out.getvalue(), "")
        EventLog.open("-").emit("request", 0.0)  # the same event, to a sink that is on, does arrive
        self.assertEqual(json.loads(out.getvalue())["type"], "request")

    def test_closed_sink_writes_nothing_more(self) -> None:
        out = io.StringIO()
        log = EventLog(out)
        log.emit("request", 0.0)
        log.close()
        self.assertFalse(log.enabled)
        log.emit("request", 1.0)
        self.assertEqual(len(out.getvalue().splitlines()), 1)
        self.assertFalse(out.closed, "a sink the log did not open stays open")

    def test_console_line(self) -> None:
        """The console line's method, status, size and timings, and the same timings in the event."""
        r = RequestRecord("r", 100.0, "direct", "POST", "/mcp", "mcp", status=200, mcp_method="tools/call",
                          tool="add", headers_at=100.008, finished=100.0085, bytes_out=147)
        line = r.console_line()
        self.assertEqual(line.split(" ", 1)[1], "POST 200 147B 8ms 8ms↑ 0ms↓ tools/call add")
        event = r.as_event()
        self.assertEqual((event["latency_ms"], event["upstream_ms"]), (8.5, 8.0))

    def test_console_clock_is_the_local_time_of_each_start(self) -> None:
        """The clock text made once a second is the one `localtime` gives for every start in it."""
        for started in (100.2, 100.9, 101.0, 3600.5, 100.0):
            line = RequestRecord("r", started, "direct", "GET", "/", "passthrough").console_line()
            self.assertEqual(line.split(" ", 1)[0], time.strftime("%H:%M:%S", time.localtime(started)))

    def test_human_bytes(self) -> None:
        self.assertEqual([human_bytes(n) for n in (0, 1023, 1536, 5 << 20, 3 << 30)],
                         ["0B", "1023B", "1.5KB", "5.0MB", "3.0GB"])
        self.assertEqual([human_bytes(n, iec=True) for n in (0, 1023, 1536, 5 << 20, 3 << 30)],
                         ["0 B", "1023 B", "1.5 KiB", "5.0 MiB", "3.0 GiB"])
