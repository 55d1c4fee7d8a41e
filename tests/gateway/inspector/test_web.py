"""The inspector's resource through twisted.web in memory (treq's StubTreq): the page, the JSON
API over a store the writer filled, the checks every request passes, and replay's request."""

from __future__ import annotations

import json
import re

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from mcpr.gateway.inspector import replay
from mcpr.gateway.store.schema import open_store
from mcpr.gateway.store.writer import RunInfo, SessionChange, StoreWriter
from tests.support.inspector import RecordingReplayer, inspector
from tests.support.store import record

RUN = RunInfo("9.9", "http://127.0.0.1:9/mcp", ["tcp:3000"])
CALL = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}'
SSE = (b'event: message\ndata: {"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"3"}]}}\n\n')


class InspectorWebTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.db = open_store(":memory:")
        self.addCleanup(self.db.close)
        writer = StoreWriter(self.db, RUN, 1000.0)
        writer.write([
            SessionChange(1000.0, {"session_id": "s-1", "state": "active", "client_name": "claude",
                                   "started": 1000.0, "last_activity": 1000.0}),
            record(1001.0, session_id="s-1", tool="add", request_body=CALL, response_body=SSE,
                   request_headers={"content-type": "application/json", "authorization": "Bearer sekrit",
                                    "mcp-session-id": "s-1", "accept-encoding": "gzip"},
                   response_headers={"content-type": "text/event-stream"}),
            record(1002.0, session_id="s-1", tool="echo", error_code=-32602, error_message="bad"),
            record(1003.0, session_id="s-2", mcp_method="tools/list", tool=None),
            record(1004.0, session_id="s-2", method="GET", route="mcp-stream", mcp_method=None, tool=None),
        ], 1005.0, 0)
        self.resource, self.feed = inspector(self.db)
        self.treq = StubTreq(self.resource)

    def get(self, path: str, **kwargs: object) -> tuple[int, dict]:
        response = self.successResultOf(self.treq.get("http://127.0.0.1:4040" + path, **kwargs))
        return response.code, json.loads(self.successResultOf(response.content()))

    def post(self, path: str, body: bytes = b"{}", headers: dict | None = None) -> tuple[int, dict]:
        response = self.successResultOf(self.treq.post(
            "http://127.0.0.1:4040" + path, data=body,
            headers=headers if headers is not None else {"content-type": "application/json"}))
        return response.code, json.loads(self.successResultOf(response.content()))

    # -- what every request passes

    def test_only_loopback_hosts(self) -> None:
        for host in ("127.0.0.1:4040", "localhost:4040", "LOCALHOST", "app.localhost:4040", "127.8.9.1", "[::1]:4040",
                     "localhost."):
            code, _ = self.get("/api/info", headers={"host": host})
            self.assertEqual(code, 200, host)
        for host in ("evil.example:4040", "127.0.0.1.evil.example", "localhost.evil.example", "[::2]:4040",
                     "10.0.0.1:4040", "127.0.0.1:40x", "[::1", "0.0.0.0:4040", ""):
            code, body = self.get("/api/info", headers={"host": host})
            self.assertEqual(code, 403, host)
            self.assertIn("loopback host", body["error"])

    def test_the_page_and_its_files(self) -> None:
        response = self.successResultOf(self.treq.get("http://127.0.0.1:4040/"))
        self.assertEqual(response.code, 200)
        page = self.successResultOf(response.content())
        self.assertIn(b'<script src="/static/inspector.js" defer></script>', page)
        self.assertIn(b"script-src 'self'", response.headers.getRawHeaders(b"content-security-policy")[0])
        self.assertEqual(response.headers.getRawHeaders(b"x-frame-options"), [b"DENY"])
        script = self.successResultOf(self.treq.get("http://127.0.0.1:4040/static/inspector.js"))
        self.assertEqual(script.headers.getRawHeaders(b"content-type"), [b"text/javascript; charset=utf-8"])
        code = self.successResultOf(script.content()).decode()
        self.assertIsNone(re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write", code),
                          "captured text reaches the page only as text")
        for path in ("/static/../setup.cfg", "/static/nothing.js", "/index.html", "/api/nothing"):
            code, body = self.get(path)
            self.assertEqual(code, 404, path)
            self.assertIn("no such", body["error"])

    def test_bad_parameters_are_400_in_one_line(self) -> None:
        for query, error in [("?limit=0", "limit: expected 1 to 500"), ("?limit=x", "limit: expected 1 to 500"),
                             ("?limit=501", "limit: expected 1 to 500"), ("?status=bad", "status: expected one of"),
                             ("?before=-1", "before: expected a request id"), ("?before=1e3", "before: expected"),
                             ("?tool=a&tool=b", "tool: given 2 times"), ("?sort=id", "unknown parameter 'sort'"),
                             ("?tool=" + "x" * 201, "tool: expected 1 to 200"), ("?tool=%0a", "tool: expected"),
                             ("?tool=%ff", "tool: not UTF-8")]:
            code, body = self.get("/api/requests" + query)
            self.assertEqual(code, 400, query)
            self.assertIn(error, body["error"])
            self.assertNotIn("\n", body["error"])
        for query in ("?limit=0", "?limit=501", "?limit=x"):
            code, body = self.get("/api/sessions" + query)
            self.assertEqual((code, body["error"]), (400, f"limit: expected 1 to 500, got {query[7:]!r}"))
        self.assertEqual(self.get("/api/requests/abc")[0], 400)
        self.assertEqual(self.get("/api/requests/99")[0], 404)
        self.assertEqual(self.get("/api/info?x=1")[0], 400)
        code, body = self.post("/api/requests")
        self.assertEqual((code, body["error"]), (405, "POST not allowed here (only GET)"))

    # -- the list, sessions, detail

    def test_list_is_newest_first_with_a_cursor_and_filters(self) -> None:
        code, page = self.get("/api/requests?limit=3")
        self.assertEqual(code, 200)
        self.assertEqual([r["id"] for r in page["requests"]], [4, 3, 2])
        self.assertEqual((page["older"], page["last_id"]), (2, 4))
        _, older = self.get("/api/requests?limit=3&before=2")
        self.assertEqual(([r["id"] for r in older["requests"]], older["older"], older["last_id"]), ([1], None, None))
        self.assertEqual([r["id"] for r in self.get("/api/requests?status=error")[1]["requests"]], [2])
        self.assertTrue(self.get("/api/requests?status=error")[1]["requests"][0]["failed"])
        self.assertEqual([r["id"] for r in self.get("/api/requests?tool=a*")[1]["requests"]], [1])
        self.assertEqual([r["id"] for r in self.get("/api/requests?method=tools/list")[1]["requests"]], [3])
        self.assertEqual([r["id"] for r in self.get("/api/requests?session=s-1")[1]["requests"]], [2, 1])
        self.assertEqual(self.get("/api/requests?session=s-")[1]["requests"], [], "a whole session id, not a prefix")

    def test_sessions(self) -> None:
        _, body = self.get("/api/sessions")
        self.assertEqual([(s["session_id"], s["requests"]) for s in body["sessions"]], [("s-2", 2), ("s-1", 2)])
        self.assertEqual(body["sessions"][1]["client_name"], "claude")

    def test_detail_has_the_request_the_answer_events_and_redacted_headers(self) -> None:
        code, d = self.get("/api/requests/1")
        self.assertEqual(code, 200)
        self.assertEqual(d["request_body"]["json"]["params"]["arguments"], {"a": 1, "b": 2})
        (event,) = d["response_body"]["events"]
        self.assertEqual(event["json"]["result"]["content"][0]["text"], "3")
        self.assertIn(["authorization", "Bearer [redacted]"], d["request_headers"])
        self.assertNotIn("sekrit", json.dumps(d))
        self.assertEqual((d["replayable"], d["upstream_ms"], d["downstream_ms"]), (True, 5.0, 5.0))
        self.assertFalse(self.get("/api/requests/4")[1]["replayable"])

    # -- replay

    def test_replay_sends_the_captured_request_without_redacted_or_hop_headers(self) -> None:
        code, body = self.post("/api/requests/1/replay")
        self.assertEqual(code, 200, body)
        sent = body["sent"]
        self.assertEqual((sent["method"], sent["target"], sent["body"]), ("POST", "/mcp", CALL.decode()))
        self.assertEqual(sent["headers"], [["content-type", "application/json"], ["mcp-session-id", "s-1"]])
        self.assertEqual(sent["left_out"], ["authorization"])
        self.assertEqual((body["replay_of"], body["answer"]["status"]), (1, 200))
        self.assertEqual(body["answer"]["body"]["json"], {"jsonrpc": "2.0", "id": 1, "result": {}})

    def test_replay_edited(self) -> None:
        replayer = RecordingReplayer(self.resource._replayer.answer)  # type: ignore[attr-defined]
        self.resource._replayer = replayer
        edited = json.dumps({"body": '{"jsonrpc":"2.0","id":8,"method":"tools/call"}',
                             "headers": [["Mcp-Session-Id", "s-9"], ["Authorization", "Bearer new"]]}).encode()
        code, body = self.post("/api/requests/1/replay", edited)
        self.assertEqual(code, 200, body)
        (sent,) = replayer.sent
        self.assertEqual((sent.body, sent.headers), (b'{"jsonrpc":"2.0","id":8,"method":"tools/call"}',
                                                      [["mcp-session-id", "s-9"], ["authorization", "Bearer new"]]))

    def test_replay_refusals(self) -> None:
        for body, error in [(b"[1]", "expected a JSON object with only"), (b"{", "expected a JSON object"),
                            (b'{"body": 1}', "body: expected a string"), (b'{"x": 1}', "expected a JSON object"),
                            (b'{"headers": [["a"]]}', "headers: expected"),
                            (b'{"headers": [["bad name", "v"]]}', "not a header name"),
                            (b'{"headers": [["x", "a\\r\\nb: c"]]}', "not a header name"),
                            (json.dumps({"body": "x" * (replay.MAX_BODY + 1)}).encode(), "a replay sends at most")]:
            code, answer = self.post("/api/requests/1/replay", body)
            self.assertEqual(code, 400, body[:40])
            self.assertIn(error, answer["error"])
        code, answer = self.post("/api/requests/4/replay")
        self.assertEqual((code, answer["error"]), (400, "only JSON-RPC POSTs to the MCP endpoint can be replayed, "
                                                        "not GET /mcp (mcp-stream)"))
        self.assertEqual(self.post("/api/requests/99/replay")[0], 404)

    def test_replay_refuses_other_origins_and_forms(self) -> None:
        code, body = self.post("/api/requests/1/replay", headers={"content-type": "text/plain"})
        self.assertEqual((code, body["error"]), (415, "expected Content-Type: application/json"))
        code, body = self.post("/api/requests/1/replay", headers={"content-type": "application/json",
                                                                  "origin": "http://evil.example"})
        self.assertEqual((code, body["error"]), (403, "refused: sent from another origin"))
        code, body = self.post("/api/requests/1/replay", headers={"content-type": "application/json",
                                                                  "sec-fetch-site": "cross-site"})
        self.assertEqual((code, body["error"]), (403, "refused: sent from another site"))
        code, _ = self.post("/api/requests/1/replay", headers={"content-type": "application/json",
                                                               "origin": "http://127.0.0.1:4040",
                                                               "sec-fetch-site": "same-origin"})
        self.assertEqual(code, 200)
