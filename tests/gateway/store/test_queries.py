"""The read API the query commands and the inspector share, on a store filled through the writer."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from mcpr.gateway.store import queries
from mcpr.gateway.store.queries import Filters, QueryError
from mcpr.gateway.store.schema import open_store
from mcpr.gateway.store.writer import RunInfo, SessionChange, StoreWriter, TunnelChange
from mcpr.proxy.capture import Listing
from tests.support.store import record

RUN = RunInfo("9.9", "http://127.0.0.1:9000/mcp", ["tcp:3000"])
NOW = 10_000.0


def tool(name: str, **properties: dict) -> dict:
    return {"name": name, "description": f"{name} things",
            "inputSchema": {"type": "object", "properties": properties, "required": sorted(properties)[:1]}}


class QueryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.db = open_store(":memory:")
        self.addCleanup(self.db.close)
        self.writer = StoreWriter(self.db, RUN, NOW - 500)
        session = {"session_id": "abc123", "state": "active", "client_name": "claude", "client_version": "1.2",
                   "server_name": "demo", "server_version": "1", "protocol_version": "2025-11-25",
                   "started": NOW - 400, "last_activity": NOW - 400}
        v1 = {"tools": [tool("add", a={"type": "integer"}, b={"type": "integer"}), tool("echo", text={})]}
        v2 = {"tools": [tool("add", a={"type": "integer"}, b={"type": "number"}, c={"type": "integer"}),
                        tool("shout", text={})]}
        self.writer.write([
            SessionChange(NOW - 400, session),
            record(NOW - 400, 5, session_id="abc123", mcp_method="initialize", tool=None, client_name="claude",
                   client_version="1.2"),
            record(NOW - 399, 8, session_id="abc123", mcp_method="tools/list", tool=None,
                   listings=(Listing("tools/list", None, v1),)),
            record(NOW - 398, 700, session_id="abc123", tool="add"),
            record(NOW - 397, 30, session_id="abc123", tool="echo", error_code=-32602, error_message="bad args"),
            record(NOW - 300, 30_000, session_id="abd999", tool="add", status=504, outcome="upstream-timeout",
                   error_code=-32001, via="tunnel"),
            record(NOW - 200, 90_000, session_id="abc123", route="mcp-stream", method="GET", mcp_method=None,
                   tool=None),
            TunnelChange(NOW - 350, {"state": "connected", "relay": "http://relay", "url": "http://x.relay"}),
        ], NOW - 200, 0)
        self.writer.write([
            record(NOW - 100, 9, session_id="zzz", mcp_method="tools/list", tool=None, via="tunnel",
                   listings=(Listing("tools/list", None, v2),)),
            record(NOW - 50, 12, session_id="zzz", mcp_method="tools/list", tool=None, via="tunnel",
                   listings=(Listing("tools/list", None, v2),)),
            SessionChange(NOW - 40, {**session, "state": "ended", "last_activity": NOW - 200}),
        ], NOW - 40, 2)

    def ids(self, rows) -> list[int]:
        return [r.id for r in rows]

    def test_filters(self) -> None:
        def ids(**f) -> list[int]:
            return self.ids(queries.requests(self.db, Filters(**f)))

        self.assertEqual(ids(), [1, 2, 3, 4, 5, 6, 7, 8])
        self.assertEqual(ids(tool="add"), [3, 5])
        self.assertEqual(ids(tool="e*"), [4])
        self.assertEqual(ids(method="tools/*"), [2, 3, 4, 5, 7, 8])
        self.assertEqual(ids(session="abc"), [1, 2, 3, 4, 6])
        self.assertEqual(ids(session="abd"), [5])
        self.assertEqual(ids(status="error"), [4, 5])
        self.assertEqual(ids(status="timeout"), [5])
        self.assertEqual(ids(status="ok"), [1, 2, 3, 6, 7, 8])
        self.assertEqual(ids(error_code=-32602), [4])
        self.assertEqual(ids(via="tunnel"), [5, 7, 8])
        self.assertEqual(ids(since=NOW - 300, until=NOW - 100), [5, 6])
        self.assertRaises(QueryError, Filters, status="maybe")

    def test_matches_is_where_in_python(self) -> None:
        """The live feed selects with `matches` what a page's list selects with `where`."""
        every = queries.requests(self.db, limit=1000)
        for filters in (Filters(), Filters(tool="add"), Filters(tool="e*"), Filters(tool="[ae]*"), Filters(method="tools/*"),
                        Filters(method="tools/list"), Filters(status="ok"), Filters(status="error"),
                        Filters(status="timeout"), Filters(session="ab"), Filters(session_id="abc123"),
                        Filters(session_id="abc"), Filters(via="tunnel"), Filters(error_code=-32602),
                        Filters(since=NOW - 300, until=NOW - 100), Filters(tool="add", status="error")):
            self.assertEqual([r.id for r in every if filters.matches(r)],
                             self.ids(queries.requests(self.db, filters, limit=1000)), filters)

    def test_session_id_is_one_whole_session(self) -> None:
        self.assertEqual(self.ids(queries.requests(self.db, Filters(session_id="abc123"))), [1, 2, 3, 4, 6])
        self.assertEqual(queries.requests(self.db, Filters(session_id="abc")), [])

    def test_paging_by_id(self) -> None:
        self.assertEqual(self.ids(queries.requests(self.db, limit=3)), [6, 7, 8])
        self.assertEqual(self.ids(queries.requests(self.db, before=6, limit=3)), [3, 4, 5])
        self.assertEqual(self.ids(queries.requests(self.db, after=2, limit=3)), [3, 4, 5])
        self.assertEqual(self.ids(queries.requests(self.db, Filters(tool="add"), after=3)), [5])
        self.assertEqual(queries.last_id(self.db), 8)

    def test_row_as_dict_has_the_events_shape(self) -> None:
        (row,) = queries.requests(self.db, Filters(tool="echo"))
        d = row.as_dict()
        self.assertEqual((d["id"], d["tool"], d["error_code"], d["jsonrpc_id"], d["session_id"]),
                         (4, "echo", -32602, 1, "abc123"))
        self.assertEqual(d["ts"], "1970-01-01T02:40:03.000Z")
        self.assertTrue(row.failed)
        json.dumps(d)

    def test_slow(self) -> None:
        self.assertEqual([(r.id, r.latency_ms) for r in queries.slow(self.db, threshold_ms=500)],
                         [(5, 30_000.0), (3, 700.0)], "slowest first; the SSE stream is not slow")
        self.assertEqual(self.ids(queries.slow(self.db, Filters(via="direct"), threshold_ms=500)), [3])

    def test_detail(self) -> None:
        self.writer.write([record(NOW, 1, request_body=b'{"jsonrpc":"2.0","id":1,"method":"tools/call"}',
                                  response_body=b'event: message\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\n\n'
                                                b'data: not json\n\n',
                                  response_headers={"content-type": "text/event-stream"}, query=b"k=v"),
                           record(NOW, 1, response_body=b'{"cut": "off', capture=5, captured=True)], NOW, 0)
        detail = queries.request_detail(self.db, 9)
        self.assertEqual(detail.target, "/mcp?k=v")
        self.assertEqual(detail.request_body.json["method"], "tools/call")
        self.assertEqual([(e["event"], e["json"]) for e in detail.response_body.events],
                         [("message", {"jsonrpc": "2.0", "id": 1, "result": {}}), (None, None)])
        self.assertIsNone(detail.response_body.json)
        self.assertIn(["content-type", "text/event-stream"], detail.response_headers)
        cut = queries.request_detail(self.db, 10).response_body
        self.assertEqual((cut.data, cut.size, cut.truncated, cut.json, cut.events), (b'{"cut', 12, True, None, None))
        json.dumps(detail.as_dict())
        self.assertIsNone(queries.request_detail(self.db, 99))
        uncaptured = queries.request_detail(self.db, 1)
        self.assertEqual(uncaptured.request_headers, [["content-type", "application/json"]])

    def test_sessions(self) -> None:
        rows = queries.sessions(self.db, now=NOW)
        self.assertEqual([(s.id, s.requests, s.errors, s.state, s.active) for s in rows],
                         [("zzz", 2, 0, "active", True), ("abc123", 5, 1, "ended", False),
                          ("abd999", 1, 1, "active", True)], "the SSE stream kept abc123 busy until it ended")
        self.assertEqual([s.id for s in queries.sessions(self.db, now=NOW, active=True)], ["zzz", "abd999"])
        self.assertEqual([s.id for s in queries.sessions(self.db, Filters(tool="echo"), now=NOW)], ["abc123"])
        self.assertEqual([s.id for s in queries.sessions(self.db, Filters(status="timeout"), now=NOW)], ["abd999"])
        self.assertEqual([s.id for s in queries.sessions(self.db, Filters(since=NOW - 150), now=NOW)],
                         ["zzz", "abc123"])
        later = NOW + 7 * 3600
        self.assertEqual(queries.sessions(self.db, now=later, active=True), [], "idle past the timeout")
        abc = queries.session(self.db, "abc", now=NOW)
        self.assertEqual((abc.client_name, abc.server_name, abc.protocol_version, abc.ended),
                         ("claude", "demo", "2025-11-25", NOW - 40))
        e = self.assertRaises(QueryError, queries.session, self.db, "ab", now=NOW)
        self.assertIn("2 sessions start with 'ab' (abc123, abd999)", str(e))
        self.assertRaises(QueryError, queries.session, self.db, "nope", now=NOW)

    def test_clients(self) -> None:
        rows = queries.clients(self.db)
        got = {(c.client_name, c.client_version): (c.sessions, c.requests, c.errors, c.via) for c in rows}
        self.assertEqual(got[("claude", "1.2")], (1, 5, 1, ["direct"]),
                         "requests that did not say count under their session's client")
        self.assertEqual(got[(None, None)], (2, 3, 1, ["tunnel"]))
        self.assertEqual([c.requests for c in queries.clients(self.db, Filters(via="tunnel"))], [3])

    def test_status(self) -> None:
        st = queries.status(self.db, now=NOW)
        self.assertEqual((st.stored_requests, st.oldest, st.active_sessions), (8, NOW - 400, 2))
        run = st.run
        self.assertEqual((run.version, run.written, run.dropped, run.running), ("9.9", 11, 2, True))
        self.assertEqual((run.tunnel["state"], run.tunnel["url"]), ("connected", "http://x.relay"))
        t = st.traffic
        self.assertEqual((t.requests, t.errors, t.timeouts, t.sessions), (8, 2, 1, 3))
        self.assertEqual((t.p50_ms, t.max_ms), (12.0, 30_000.0))
        self.assertFalse(queries.status(self.db, now=NOW + 1000).run.running, "no heartbeat for too long")
        self.assertEqual(queries.traffic(self.db, Filters(tool="add")).requests, 2)
        json.dumps(st.as_dict())

    def test_listings(self) -> None:
        rows = queries.listings(self.db)
        self.assertEqual([(r.id, r.seen, list(r.items)) for r in rows], [(1, 1, ["add", "echo"]),
                                                                         (2, 2, ["add", "shout"])])
        self.assertEqual([r.id for r in queries.listings(self.db, latest=True)], [2])
        self.assertEqual([r.id for r in queries.listings(self.db, Filters(session="abc"))], [1])
        self.assertEqual([r.id for r in queries.listings(self.db, Filters(via="tunnel"))], [2])
        self.assertEqual(queries.listings(self.db, Filters(method="prompts/list")), [])

    def test_schema_changes(self) -> None:
        first, second = queries.schema_changes(self.db)
        self.assertEqual((first.added, first.removed, first.previous_id), (["add", "echo"], [], None))
        self.assertEqual((second.added, second.removed, second.previous_id), (["shout"], ["echo"], 1))
        (add,) = second.changed
        self.assertEqual((add.name, add.fields), ("add", ["inputSchema"]))
        self.assertEqual((add.properties_added, add.properties_removed, add.properties_changed),
                         (["c"], [], ["b"]))
        (only,) = queries.schema_changes(self.db, Filters(tool="shout"))
        self.assertEqual(only.added, ["shout"])
        self.assertEqual([c.listing_id for c in queries.schema_changes(self.db, Filters(since=NOW - 150))], [2])
        json.dumps(second.as_dict())

    def test_compare_items(self) -> None:
        before = {"name": "t", "description": "old", "inputSchema": {"properties": {"a": {}}, "required": ["a"]}}
        after = {"name": "t", "description": "new", "inputSchema": {"properties": {"a": {}, "b": {}},
                                                                     "required": ["b"]}}
        change = queries.compare_items("t", before, after)
        self.assertEqual((change.fields, change.properties_added, change.required_added, change.required_removed),
                         (["description", "inputSchema"], ["b"], ["b"], ["a"]))
        self.assertIsNone(queries.compare_items("t", before, dict(before)))
        self.assertEqual(queries.items_of("resources/list", {"resources": [{"uri": "u://1"}, "junk"]}),
                         {"u://1": {"uri": "u://1"}})
