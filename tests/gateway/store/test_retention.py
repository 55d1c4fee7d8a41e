"""Retention: rows older than `retain` go, then the oldest requests while the file is over `max_size`."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from mcpr.gateway.store.retention import prune, used_bytes
from mcpr.gateway.store.schema import open_store
from mcpr.gateway.store.writer import RunInfo, SessionChange, StoreWriter, TunnelChange
from mcpr.proxy.capture import Listing
from tests.support.store import record

RUN = RunInfo("t", "http://127.0.0.1:1/mcp", ["tcp:0"])
DAY = 86400.0


class RetentionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.db = open_store(self.path)
        self.addCleanup(self.db.close)
        self.writer = StoreWriter(self.db, RUN, 0.0)

    def count(self, table: str) -> int:
        return self.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def test_by_age(self) -> None:
        old, new = 1 * DAY, 9 * DAY
        session = {"session_id": "old", "state": "active", "started": old, "last_activity": old}
        self.writer.write([
            SessionChange(old, session),
            record(old, session_id="old", mcp_method="tools/list", tool=None,
                   listings=(Listing("tools/list", None, {"tools": [{"name": "a"}]}),)),
            record(old, mcp_method="prompts/list", tool=None,
                   listings=(Listing("prompts/list", None, {"prompts": [{"name": "p"}]}),)),
            TunnelChange(old, {"state": "connected"}),
        ], old, 0)
        self.writer.write([record(new, mcp_method="tools/list", tool=None,
                                  listings=(Listing("tools/list", None, {"tools": [{"name": "b"}]}),)),
                           record(new, session_id="new")], new, 0)
        other_run = StoreWriter(self.db, RUN, old)
        other_run.heartbeat(old, 0)

        deleted = prune(self.db, now=10 * DAY, retain=7 * DAY, max_size=1 << 30, keep_run=self.writer.run_id)
        self.assertEqual(deleted, 2)
        self.assertEqual([s for s, in self.db.execute("SELECT started FROM requests")], [new, new])
        self.assertEqual(self.count("exchanges"), 2)
        self.assertEqual([s for s, in self.db.execute("SELECT id FROM sessions")], ["new"])
        self.assertEqual(self.count("tunnel_events"), 0)
        self.assertEqual([r for r, in self.db.execute("SELECT id FROM runs")], [self.writer.run_id],
                         "the running gateway's run stays, however old")
        # The old tools/list answer was replaced by a newer one and goes; the only prompts/list
        # answer is the latest of its method, and stays whatever its age.
        self.assertEqual(self.db.execute("SELECT method, result FROM listings ORDER BY id").fetchall(),
                         [("prompts/list", '{"prompts":[{"name":"p"}]}'), ("tools/list", '{"tools":[{"name":"b"}]}')])

    def test_by_size_keeps_the_newest_and_gives_the_space_back(self) -> None:
        body = os.urandom(30_000)  # incompressible, and SQLite does not compress anyway
        for batch in range(20):
            self.writer.write([record(float(batch * 10 + i), response_body=body) for i in range(10)], 0.0, 0)
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        before = os.path.getsize(self.path)
        self.assertGreater(before, 6_000_000)
        limit = 2_000_000
        deleted = prune(self.db, now=200.0, retain=7 * DAY, max_size=limit)
        self.assertGreater(deleted, 100)
        self.assertLessEqual(used_bytes(self.db), limit)
        started = [s for s, in self.db.execute("SELECT started FROM requests ORDER BY id")]
        self.assertEqual(started[-1], 199.0, "the newest request is kept")
        self.assertEqual(started, sorted(started))
        self.assertEqual(self.count("exchanges"), len(started))
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.assertLess(os.path.getsize(self.path), limit * 1.2, "freed pages went back to the file system")

    def test_nothing_to_do(self) -> None:
        self.writer.write([record(5.0)], 5.0, 0)
        self.assertEqual(prune(self.db, now=6.0, retain=DAY, max_size=1 << 30), 0)
        self.assertEqual(self.count("requests"), 1)
