"""The store's thread side: a batch of records becomes rows, in one transaction."""

from __future__ import annotations

import json
import os
import sqlite3

from twisted.trial.unittest import SynchronousTestCase

from mcpr.gateway.store import writer
from mcpr.gateway.store.schema import open_store
from mcpr.gateway.store.writer import RunInfo, SessionChange, StoreWriter, TunnelChange
from mcpr.proxy.capture import Listing
from tests.support.store import record

RUN = RunInfo("9.9", "http://127.0.0.1:9000/mcp", ["tcp:3000:interface=127.0.0.1"])


def tools(*names: str, extra: dict | None = None) -> dict:
    return {"tools": [{"name": n, "inputSchema": {"type": "object", "properties": {"a": {"type": "integer"}}},
                       **(extra or {})} for n in names]}


class WriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.db = open_store(":memory:")
        self.addCleanup(self.db.close)
        self.writer = StoreWriter(self.db, RUN, 500.0)

    def test_run_row(self) -> None:
        row = self.db.execute("SELECT started, last_seen, stopped, pid, version, upstream, listen, written, dropped "
                              "FROM runs").fetchone()
        self.assertEqual(row, (500.0, 500.0, None, os.getpid(), "9.9", RUN.upstream,
                               json.dumps(list(RUN.listen)), 0, 0))
        self.writer.write([record(), record()], 600.0, 3)
        self.writer.heartbeat(630.0, 4)
        self.assertEqual(self.db.execute("SELECT last_seen, written, dropped FROM runs").fetchone(), (630.0, 2, 4))

    def test_request_and_its_exchange_share_an_id(self) -> None:
        body = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","arguments":{"token":"t"}}}'
        r = record(2000.0, 12.5, upstream_ms=10.0, request_body=body, response_body=b'{"ok":true}',
                   request_headers={"authorization": "Bearer abc", "content-type": "application/json"},
                   query=b"api_key=k&x=1", jsonrpc_id=7, session_id="s-1", client_name="cli", client_version="2")
        self.writer.write([record(1999.0, captured=False), r], 2001.0, 0)
        rows = self.db.execute("SELECT id, tool, jsonrpc_id, latency_ms, upstream_ms, downstream_ms, bytes_in, "
                               "bytes_out, session_id FROM requests ORDER BY id").fetchall()
        self.assertEqual(rows[1], (2, "add", "7", 12.5, 10.0, 2.5, len(body), 11, "s-1"))
        (exchange,) = self.db.execute("SELECT id, query, request_headers, request_body, response_body "
                                      "FROM exchanges").fetchall()
        self.assertEqual(exchange[0], 2, "the uncaptured request has no exchange row")
        self.assertEqual(exchange[1], "api_key=[redacted]&x=1")
        self.assertIn(["authorization", "Bearer [redacted]"], json.loads(exchange[2]))
        self.assertIn(b'"token":"[redacted]"', exchange[3])
        self.assertEqual(exchange[4], b'{"ok":true}')

    def test_a_request_whose_rows_cannot_be_made_is_left_out_not_its_batch(self) -> None:
        """The rows are made in the store's thread (`commit`): one request that cannot be encoded
        there is counted, and the rest of its batch is written."""
        bad = record(session_id="s-1")
        bad.capture.request_headers = [(b"x-odd", [5])]  # type: ignore[union-attr, list-item]
        batch = self.writer.batch()
        for r in (record(session_id="s-1"), bad, record(session_id="s-1")):
            batch.add(r)
        written = self.writer.commit(batch, 2000.0, 2, rows=True)
        self.assertEqual((written.count, written.skipped), (2, 1))
        self.assertIn("AttributeError", written.why or "")
        assert written.rows is not None
        self.assertEqual([row[0] for row in written.rows], [1, 2])
        self.assertEqual(self.db.execute("SELECT count(*) FROM exchanges").fetchone()[0], 2)
        self.assertEqual(self.db.execute("SELECT written, dropped FROM runs").fetchone(), (2, 3))
        self.assertEqual(self.db.execute("SELECT requests FROM sessions WHERE id = 's-1'").fetchone(), (2,))

    def test_a_batch_larger_than_rows_at_once_keeps_its_ids_and_listings(self) -> None:
        n = writer.ROWS_AT_ONCE * 2 + 5
        listed = {writer.ROWS_AT_ONCE + 3, n - 1}
        batch = self.writer.batch()
        for i in range(n):
            answers = (Listing("tools/list", None, tools(f"t{i}")),) if i in listed else ()
            batch.add(record(1000.0 + i, session_id="s", mcp_method="tools/list" if answers else "tools/call",
                             listings=answers))
        written = self.writer.commit(batch, 3000.0, 0, rows=True)
        assert written.rows is not None
        self.assertEqual([row[0] for row in written.rows], list(range(1, n + 1)))
        by_id = dict(self.db.execute("SELECT id, listing_id FROM requests WHERE listing_id IS NOT NULL"))
        self.assertEqual(sorted(by_id), sorted(i + 1 for i in listed))
        self.assertEqual(by_id, dict(self.db.execute("SELECT first_request, id FROM listings")))
        self.assertEqual({row[0]: row[-1] for row in written.rows if row[-1] is not None}, by_id)
        self.assertEqual(self.db.execute("SELECT count(*) FROM exchanges").fetchone()[0], n)
        self.assertEqual(self.db.execute("SELECT requests, first_seen, last_activity FROM sessions").fetchone(),
                         (n, 1000.0, 1000.0 + n - 1 + 0.01))

    def test_rows_are_given_back_only_when_asked(self) -> None:
        batch = self.writer.batch()
        batch.add(record())
        self.assertIsNone(self.writer.commit(batch, 2000.0, 0).rows)

    def test_ids_follow_rows_written_by_another_writer(self) -> None:
        """Two gateways of one project share the file: each batch takes the ids after the last."""
        self.writer.write([record()], 1.0, 0)
        other = StoreWriter(self.db, RUN, 1.0)
        other.write([record(), record()], 2.0, 0)
        self.writer.write([record()], 3.0, 0)
        self.assertEqual([(i, run) for i, run in self.db.execute("SELECT id, run_id FROM requests ORDER BY id")],
                         [(1, 1), (2, 2), (3, 2), (4, 1)])
        self.assertEqual(self.db.execute("SELECT count(*) FROM exchanges").fetchone()[0], 4)

    def test_sessions_from_events_and_requests(self) -> None:
        started = {"session_id": "s-1", "state": "active", "client_name": "claude", "client_version": "1",
                   "server_name": "demo", "server_version": "2", "protocol_version": "2025-11-25",
                   "started": 100.0, "last_activity": 100.0}
        self.writer.write([
            SessionChange(100.0, started),
            record(100.0, session_id="s-1", mcp_method="initialize", tool=None),
            record(101.0, session_id="s-1", status=500),
            record(102.0, session_id="s-1", error_code=-32602),
            record(103.0, session_id="s-2", via="tunnel"),
        ], 104.0, 0)
        self.writer.write([record(110.0, 5.0, session_id="s-1"),
                           SessionChange(111.0, {**started, "state": "ended", "last_activity": 110.0})], 112.0, 0)
        rows = {r[0]: r[1:] for r in self.db.execute(
            "SELECT id, first_seen, last_activity, ended, state, via, client_name, server_name, protocol_version, "
            "requests, errors FROM sessions")}
        self.assertEqual(rows["s-1"], (100.0, 110.005, 111.0, "ended", "direct", "claude", "demo", "2025-11-25", 4, 2))
        self.assertEqual(rows["s-2"], (103.0, 103.01, None, "active", "tunnel", None, None, None, 1, 0))

    def test_each_distinct_list_answer_once(self) -> None:
        """Repeats count on the row; a change is a new row; going back to an earlier answer too."""
        first, second = tools("add"), tools("add", "shout")
        answers = [first, first, second, first]
        for i, answer in enumerate(answers):
            self.writer.write([record(float(i), mcp_method="tools/list", tool=None,
                                      listings=(Listing("tools/list", None, answer),))], float(i), 0)
        self.writer.write([record(9.0, mcp_method="tools/list", tool=None,
                                  listings=(Listing("tools/list", "page-2", first),))], 9.0, 0)
        rows = self.db.execute("SELECT id, method, cursor, seen, first_seen, last_seen, first_request, result "
                               "FROM listings ORDER BY id").fetchall()
        self.assertEqual([r[:7] for r in rows], [(1, "tools/list", "", 2, 0.0, 1.0, 1),
                                                 (2, "tools/list", "", 1, 2.0, 2.0, 3),
                                                 (3, "tools/list", "", 1, 3.0, 3.0, 4),
                                                 (4, "tools/list", "page-2", 1, 9.0, 9.0, 5)])
        self.assertEqual(json.loads(rows[1][7]), second)
        self.assertEqual([r for r, in self.db.execute("SELECT listing_id FROM requests ORDER BY id")],
                         [1, 1, 2, 3, 4])

    def test_tunnel_events(self) -> None:
        self.writer.write([TunnelChange(5.0, {"state": "connected", "relay": "http://relay", "url": "http://x.relay",
                                              "subdomain": "x"})], 5.0, 0)
        self.assertEqual(self.db.execute("SELECT ts, run_id, state, relay, detail FROM tunnel_events").fetchone(),
                         (5.0, 1, "connected", "http://relay", '{"url": "http://x.relay", "subdomain": "x"}'))

    def test_a_failed_batch_writes_nothing(self) -> None:
        bad = record()
        bad.jsonrpc_id = object()  # json.dumps(default=str) copes; a row that SQLite refuses does not
        bad.bytes_in = object()  # type: ignore[assignment]
        self.assertRaises(Exception, self.writer.write, [record(), bad], 1.0, 0)
        self.assertEqual(self.db.execute("SELECT count(*) FROM requests").fetchone()[0], 0)
        self.assertFalse(self.db.in_transaction)
        self.writer.write([record()], 2.0, 0)
        self.assertEqual(self.db.execute("SELECT count(*) FROM requests").fetchone()[0], 1)

    def test_a_batch_that_fails_in_a_later_statement_writes_nothing(self) -> None:
        """The rows go in with `OR FAIL` (no statement journal), which keeps the rows of the statements
        before the one that failed until the batch is rolled back, whole."""
        items = [record(1000.0 + i) for i in range(300)]  # 256 + 16 + ...: the last row in a later statement
        items[-1].method = None  # type: ignore[assignment]  # NOT NULL
        self.assertRaises(sqlite3.IntegrityError, self.writer.write, items, 1.0, 0)
        self.assertEqual(self.db.execute("SELECT count(*) FROM requests").fetchone()[0], 0)
        self.assertEqual(self.db.execute("SELECT written FROM runs").fetchone()[0], 0)
        self.assertFalse(self.db.in_transaction)

    def test_close_marks_the_run_stopped(self) -> None:
        path = self.mktemp()
        writer = StoreWriter(open_store(path), RUN, 500.0)
        writer.close(700.0, 2)
        db = open_store(path)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("SELECT last_seen, stopped, dropped FROM runs").fetchone(), (700.0, 700.0, 2))

    def test_a_large_batch_in_statements_of_several_sizes(self) -> None:
        """341 = 256 + 64 + 16 + 4 + 1: every statement size once, ids in order, each exchange with
        its request, the listing of the one that carried it."""
        items = [record(1000.0 + i, request_body=b'{"n":%d}' % i, tool=f"t{i}") for i in range(341)]
        items[300] = record(1300.0, mcp_method="tools/list", tool=None, request_body=b'{"n":300}',
                            listings=(Listing("tools/list", None, tools("add")),))
        self.writer.write(items, 2000.0, 0)
        rows = self.db.execute("SELECT r.id, r.tool, r.listing_id IS NOT NULL, e.request_body FROM requests r "
                               "JOIN exchanges e ON e.id = r.id ORDER BY r.id").fetchall()
        self.assertEqual(len(rows), 341)
        self.assertEqual([r[0] for r in rows], list(range(1, 342)))
        self.assertEqual([r[3] for r in rows], [b'{"n":%d}' % i for i in range(341)])
        self.assertEqual([r[1] for r in rows if r[1] is not None], [f"t{i}" for i in range(341) if i != 300])
        self.assertEqual([r[0] for r in rows if r[2]], [301])
