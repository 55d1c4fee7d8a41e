"""100,000 stored requests: every query a page of the inspector makes is a search on the primary
key or an index, never a scan of `requests` (nor a sort of it), so a page costs the same with a
week of traffic as with a minute's.  Checked with SQLite's own plans, not with a clock.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from treq.testing import StubTreq

from mcpr.gateway.store.schema import open_store
from tests.support.inspector import inspector

ROWS = 100_000
SESSIONS = 500


def fill(db: sqlite3.Connection) -> None:
    """ROWS requests in one transaction: mostly good tools/calls, a few errors and timeouts, over
    SESSIONS sessions, each with its exchange."""
    tools = ("add", "count", "notify", "search", "fetch")
    methods = ("tools/call", "tools/call", "tools/call", "tools/list", "resources/read")

    def rows() -> Any:
        for i in range(1, ROWS + 1):
            status, outcome, code = (504, "upstream-timeout", -32001) if i % 997 == 0 else \
                (200, "ok", -32602) if i % 101 == 0 else (200, "ok", None)
            method = methods[i % len(methods)]
            yield (i, f"r-{i}", 1, 1000.0 + i, "direct", "POST", "/mcp", "mcp", status, outcome,
                   f"session-{i % SESSIONS:04d}", method, tools[i % len(tools)] if method == "tools/call" else None,
                   code, 10.0, 4.0, 6.0, 120, 240)

    db.execute("BEGIN")
    db.executemany("INSERT INTO requests (id, request_id, run_id, started, via, method, path, route, status, outcome, "
                   "session_id, mcp_method, tool, error_code, latency_ms, upstream_ms, downstream_ms, bytes_in, "
                   "bytes_out) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows())
    db.executemany("INSERT INTO exchanges (id, query, request_headers, response_headers, request_body, response_body) "
                   "VALUES (?, '', '[]', '[]', x'', x'')", ((i,) for i in range(1, ROWS + 1, 97)))
    db.executemany("INSERT INTO sessions (id, first_seen, last_activity, state, requests, errors) "
                   "VALUES (?, ?, ?, 'active', ?, 0)",
                   ((f"session-{s:04d}", 1000.0, 1000.0 + ROWS - SESSIONS + s, ROWS // SESSIONS)
                    for s in range(SESSIONS)))
    db.execute("COMMIT")
    db.execute("ANALYZE")


class PlanRecorder:
    """A connection that keeps the query plan of every statement the inspector runs on it."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.plans: list[tuple[str, list[str]]] = []

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        if sql.lstrip().upper().startswith("SELECT"):
            plan = [row[3] for row in self.db.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()]
            self.plans.append((" ".join(sql.split()), plan))
        return self.db.execute(sql, params)


class ScaleTests(SynchronousTestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.path = f"{cls.__name__}-{id(cls)}.sqlite3"
        cls.db = open_store(cls.path)
        fill(cls.db)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.db.close()

    def pages(self, *paths: str) -> list[tuple[str, list[str]]]:
        """The plans of what the inspector asked the store to serve `paths`."""
        recorder = PlanRecorder(self.db)
        resource, _ = inspector(recorder)  # type: ignore[arg-type]  # what `ask` hands a question
        treq = StubTreq(resource)
        for path in paths:
            response = self.successResultOf(treq.get("http://127.0.0.1:4040" + path))
            self.assertEqual(response.code, 200, (path, self.successResultOf(response.text())))
            self.successResultOf(response.content())
        return recorder.plans

    def assertIndexed(self, plans: list[tuple[str, list[str]]]) -> None:
        self.assertTrue(plans)
        for sql, plan in plans:
            text = " | ".join(plan)
            # A scan without an index reads the whole table (aliases too: `SCAN r`); one in an
            # index's order under a LIMIT reads as many rows as it returns.
            self.assertNotRegex(text, r"\bSCAN \w+(?! USING (COVERING )?INDEX)( |$|\|)", f"{sql}: {text}")
            self.assertNotIn("TEMP B-TREE", text, f"{sql}: {text}")

    def test_it_is_a_hundred_thousand(self) -> None:
        self.assertEqual(self.db.execute("SELECT count(*) FROM requests").fetchone()[0], ROWS)

    def test_the_list_with_each_filter_and_its_next_pages(self) -> None:
        plans = self.pages("/api/requests", "/api/requests?before=50000", "/api/requests?limit=500&before=99000",
                           "/api/requests?tool=add", "/api/requests?tool=add&before=500", "/api/requests?tool=se*",
                           "/api/requests?method=tools/list", "/api/requests?method=tools/*",
                           "/api/requests?status=error", "/api/requests?status=timeout&before=60000",
                           "/api/requests?status=ok", "/api/requests?session=session-0042",
                           "/api/requests?session=session-0042&before=90000",
                           "/api/requests?session=session-0042&tool=add&status=error")
        self.assertIndexed(plans)
        used = " ".join(" ".join(plan) for _, plan in plans)
        for index in ("requests_tool", "requests_method", "requests_failed", "requests_timeout", "requests_session",
                      "INTEGER PRIMARY KEY"):
            self.assertIn(index, used)

    def test_the_detail_and_the_sessions(self) -> None:
        self.assertIndexed(self.pages("/api/requests/77", "/api/requests/99988", "/api/sessions"))

    def test_following_new_requests(self) -> None:
        from mcpr.gateway.store import queries
        from mcpr.gateway.store.queries import Filters
        recorder = PlanRecorder(self.db)
        for filters in (Filters(), Filters(tool="add"), Filters(status="error"), Filters(session_id="session-0001")):
            queries.requests(recorder, filters, after=ROWS - 300, limit=501)  # type: ignore[arg-type]
        queries.last_id(recorder)  # type: ignore[arg-type]
        self.assertIndexed(recorder.plans)

    def test_the_plans_are_read_not_assumed(self) -> None:
        """The check above fails on a query that scans (this guards the guard)."""
        for sql in ("SELECT count(*) FROM requests WHERE bytes_in > 0",
                    "SELECT id FROM requests r WHERE r.bytes_in > 0 LIMIT 1",
                    "SELECT id FROM requests WHERE tool GLOB 'a*' ORDER BY id DESC LIMIT 1",
                    "SELECT id FROM requests WHERE session_id > 'a' ORDER BY started LIMIT 1"):
            recorder = PlanRecorder(self.db)
            recorder.execute(sql)
            self.assertRaises(self.failureException, self.assertIndexed, recorder.plans)
