"""The store's reactor side: reports are queued and written in batches; when the disk cannot keep
up, events are dropped and counted, never waited for."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mcpr.gateway.settings import StoreSettings
from mcpr.gateway.store import recorder
from mcpr.gateway.store.recorder import EventStore
from mcpr.gateway.store.schema import StoreError, open_store
from mcpr.gateway.store.writer import RunInfo, StoreWriter
from tests.support.store import Disk, QueuedWriter, record

RUN = RunInfo("t", "http://127.0.0.1:1/mcp", ["tcp:0"])


class RecorderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.db = open_store(":memory:")
        self.writer = StoreWriter(self.db, RUN, self.clock.seconds())
        self.disk = Disk()
        settings = StoreSettings(Path("/nowhere/store.sqlite3"), retain=600.0, max_size=1 << 30, capture=1024,
                                 origin="option --db")
        self.queued = QueuedWriter(self.writer, self.disk)
        self.store = EventStore(self.queued, settings, self.clock, max_queue=5, max_queue_bytes=10_000)
        self.store.startService()
        self.assertFalse(self.queued.started, "not before the reactor runs")
        self.clock.advance(0)  # the reactor's first turn: the writer starts, with a retention pass
        self.assertTrue(self.queued.started)
        self.assertEqual(len(self.disk.jobs), 1)
        self.disk.run()
        self.addCleanup(self.stop)

    def stop(self) -> None:
        if self.store.running:
            stopped = self.store.stopService()
            self.disk.run()
            self.successResultOf(stopped)

    def stored(self) -> int:
        return self.db.execute("SELECT count(*) FROM requests").fetchone()[0]

    def test_reports_share_a_batch(self) -> None:
        for _ in range(3):
            self.store.request(record())
        self.assertEqual(self.disk.jobs, [], "nothing goes to the thread at once")
        self.clock.advance(recorder.FLUSH_DELAY)
        self.assertEqual(len(self.disk.jobs), 1)
        self.disk.run()
        self.assertEqual((self.stored(), self.store.written), (3, 3))
        self.assertEqual(self.store.capture_limit, 1024)

    def test_one_batch_at_a_time_then_what_queued_meanwhile(self) -> None:
        self.store.request(record())
        self.clock.advance(recorder.FLUSH_DELAY)
        self.store.request(record())
        self.store.request(record())
        self.clock.advance(10)
        self.assertEqual(len(self.disk.jobs), 1, "the second batch waits for the first")
        self.disk.run(1)
        self.clock.advance(0)
        self.assertEqual(len(self.disk.jobs), 1, "and goes once the first is written, its events having waited")
        self.disk.run(1)
        self.assertEqual(self.stored(), 3)

    def test_a_batch_behind_a_quick_one_still_waits_for_company(self) -> None:
        """Under a steady load the batches stay FLUSH_DELAY apart, not one write's duration."""
        self.store.request(record())
        self.clock.advance(recorder.FLUSH_DELAY)
        self.clock.advance(0.01)
        self.store.request(record())  # queued while the disk writes the first
        self.disk.run(1)
        self.clock.advance(recorder.FLUSH_DELAY - 0.02)
        self.store.request(record())
        self.assertEqual(self.disk.jobs, [], "the second is not yet FLUSH_DELAY old")
        self.clock.advance(0.03)
        self.assertEqual(len(self.disk.jobs), 1)
        self.disk.run()
        self.assertEqual((self.stored(), self.store.written), (3, 3))

    def test_a_full_queue_drops_counts_and_says_so_at_most_every_interval(self) -> None:
        self.store.request(record())
        self.clock.advance(recorder.FLUSH_DELAY)  # the disk now holds this batch and does not finish it
        with capturedLogs() as events:
            for _ in range(8):
                self.store.request(record())
            self.assertEqual((self.store.dropped, self.store.health()["queued"]), (3, 5))
            for _ in range(4):
                self.store.request(record())
            self.clock.advance(recorder.DROP_REPORT_INTERVAL)
            self.store.request(record())
            self.clock.advance(recorder.DROP_REPORT_INTERVAL * 3)
        lines = [formatEvent(e) for e in events if "dropped" in formatEvent(e)]
        self.assertEqual(len(lines), 3, lines)
        self.assertIn("1 event(s) dropped, 1 since start", lines[0])
        self.assertIn("6 event(s) dropped, 7 since start", lines[1])
        self.assertIn("1 event(s) dropped, 8 since start", lines[2])
        self.assertIn("requests are not affected", lines[0])
        health = self.store.health()
        self.assertEqual((health["dropped"], health["queued"], health["path"]), (8, 5, "/nowhere/store.sqlite3"))
        self.disk.run()
        self.clock.advance(0)  # what queued behind the held batch has waited long enough
        self.disk.run()
        self.assertEqual(self.stored(), 6)
        self.assertEqual(self.db.execute("SELECT dropped FROM runs").fetchone()[0], 8,
                         "the count reaches the store, for mcpr status")

    def test_watchers_hear_of_each_batch_once_written(self) -> None:
        heard: list[list[int]] = []

        def broken(rows: list) -> None:
            raise RuntimeError("a watcher's bug")

        def watcher(rows: list) -> None:
            heard.append([row[0] for row in rows])

        self.store.watch(broken)
        self.store.watch(watcher)
        self.store.request(record())
        self.store.request(record())
        self.store.session(1000.0, {"session_id": "s", "state": "active"})
        self.clock.advance(recorder.FLUSH_DELAY)
        self.assertEqual(heard, [], "not before the batch is committed")
        with capturedLogs() as events:
            self.disk.run()
        self.assertEqual(heard, [[1, 2]])
        self.assertEqual([e["log_failure"].value.args[0] for e in events if "log_failure" in e], ["a watcher's bug"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.store.unwatch(watcher)
        self.store.unwatch(broken)
        self.store.request(record())
        self.clock.advance(recorder.FLUSH_DELAY)
        self.disk.run()
        self.assertEqual((heard, self.stored()), ([[1, 2]], 3))

    def test_rows_are_made_only_for_an_active_watcher_and_settled_waits_for_the_write(self) -> None:
        heard: list[list[int]] = []
        open_pages: list[str] = []
        self.store.watch(lambda rows: heard.append([row[0] for row in rows]), lambda: bool(open_pages))
        asked: list[bool] = []
        commit = self.store._writer.commit  # type: ignore[attr-defined]

        def spy(batch: object, now: float, dropped: int, rows: bool) -> Deferred[Any]:
            asked.append(rows)
            return commit(batch, now, dropped, rows)

        self.store._writer.commit = spy  # type: ignore[attr-defined]
        self.store.request(record())
        self.clock.advance(recorder.FLUSH_DELAY)  # leaves while no page is open
        open_pages.append("a page")
        settled = self.store.settled()
        self.assertNoResult(settled)
        self.disk.run()
        self.successResultOf(settled)
        self.successResultOf(self.store.settled())  # nothing in flight: at once
        self.store.request(record())
        self.clock.advance(recorder.FLUSH_DELAY)
        self.disk.run()
        self.assertEqual((asked, heard), ([False, True], [[2]]))

    def test_captured_bytes_bound_the_queue_too(self) -> None:
        big = record(response_body=b"x" * 1024, request_body=b"y" * 1024)
        for _ in range(5):
            self.store.request(big)
        self.assertEqual(self.store.dropped, 2, "three events of 2.5 KB fit in 10 KB, the next ones do not")

    def test_a_refused_batch_is_dropped_and_counted(self) -> None:
        self.store.request(record())
        self.clock.advance(recorder.FLUSH_DELAY)
        self.db.execute("CREATE TRIGGER refuse BEFORE INSERT ON requests BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        with capturedLogs() as events:
            self.disk.run()
        self.assertEqual(self.store.dropped, 1)
        self.assertEqual(self.store.health()["error"], "disk full")
        self.assertTrue(any("cannot write to /nowhere/store.sqlite3 (disk full)" in formatEvent(e) for e in events))
        self.db.execute("DROP TRIGGER refuse")
        with capturedLogs() as events:
            self.store.request(record())
            self.clock.advance(recorder.FLUSH_DELAY)
            self.disk.run()
        self.assertIsNone(self.store.health()["error"])
        self.assertTrue(any("writing to /nowhere/store.sqlite3 again" in formatEvent(e) for e in events))

    def test_sessions_and_tunnel_events(self) -> None:
        self.store.session(1000.0, {"session_id": "s", "state": "active"})
        self.store.emit("tunnel", 1000.0, state="connected", relay="http://r", url="http://x.r")
        self.store.emit("heartbeat", 1000.0, uptime_s=1)  # not the store's: ignored
        self.clock.advance(recorder.FLUSH_DELAY)
        self.disk.run()
        self.assertEqual(self.db.execute("SELECT id, state FROM sessions").fetchall(), [("s", "active")])
        self.assertEqual(self.db.execute("SELECT state FROM tunnel_events").fetchall(), [("connected",)])
        self.assertEqual(self.store.written, 2)

    def test_heartbeat_and_retention_run_on_the_thread(self) -> None:
        self.db.execute("UPDATE runs SET last_seen = 0")
        self.writer.write([record(1.0)], 1.0, 0)  # older than `retain`
        self.clock.advance(recorder.HEARTBEAT_INTERVAL)
        self.disk.run()
        self.assertEqual(self.db.execute("SELECT last_seen FROM runs").fetchone()[0], self.clock.seconds())
        self.assertEqual(self.stored(), 1, "retention is every PRUNE_INTERVAL, not every heartbeat")
        self.clock.advance(recorder.PRUNE_INTERVAL)
        self.disk.run()
        self.assertEqual(self.stored(), 0)

    def test_stop_writes_what_is_queued_then_closes(self) -> None:
        self.store.request(record())
        self.clock.advance(recorder.FLUSH_DELAY)
        self.store.request(record())  # queued behind the batch on the disk
        stopped = self.store.stopService()
        self.assertNoResult(stopped)
        self.disk.run(1)
        self.assertEqual(self.stored(), 1)
        self.disk.run(1)
        self.assertEqual(self.stored(), 2)
        self.store.request(record())  # too late: ignored, not counted
        self.disk.run()
        self.successResultOf(stopped)
        self.assertEqual(self.store.dropped, 0)
        self.assertRaises(Exception, self.db.execute, "SELECT 1")  # closed, the run marked stopped

    def test_open_refuses_a_store_it_cannot_use(self) -> None:
        blocker = Path(self.mktemp())
        blocker.write_text("a file where the store's folder would go")
        settings = StoreSettings(blocker / "store.sqlite3", 1.0, 1 << 20, 0, "option --db")
        e = self.assertRaises(StoreError, EventStore.open, settings, RUN, self.clock)
        self.assertEqual(str(e), f"option --db: cannot use the event store {blocker}/store.sqlite3: Not a directory "
                                 f"({blocker}): choose a path in a folder this user can create and write, or "
                                 "--no-store to run without a store")

    def test_stopped_before_the_reactor_ran_it_closes_the_file_itself(self) -> None:
        """As when a port in use stops the gateway's start: nothing may wait for the thread, which
        a reactor that never runs cannot hear from."""
        path = str(Path(self.mktemp()).resolve())
        db = open_store(path)
        writer = StoreWriter(db, RUN, self.clock.seconds())
        disk = Disk()
        store = EventStore(QueuedWriter(writer, disk), self.store.settings, self.clock)
        store.startService()
        store.session(1000.0, {"session_id": "s", "state": "active"})  # a service that started before
        stopped_at = self.clock.seconds()
        self.successResultOf(store.stopService())
        self.assertEqual(disk.jobs, [], "the thread was never asked")
        self.assertRaises(Exception, db.execute, "SELECT 1")  # closed
        self.clock.advance(recorder.HEARTBEAT_INTERVAL)
        self.assertEqual(disk.jobs, [], "nor is it later")
        again = open_store(path)
        self.addCleanup(again.close)
        self.assertEqual(again.execute("SELECT id FROM sessions").fetchall(), [("s",)])
        self.assertEqual(again.execute("SELECT stopped FROM runs").fetchone()[0], stopped_at)


class BusyBatchTests(SynchronousTestCase):
    """Under load a batch waits longer for company: a commit's cost beyond its rows is then shared by
    a second of requests, not a fifth; a light load is still written within `FLUSH_DELAY`."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.db = open_store(":memory:")
        self.addCleanup(self.db.close)
        self.disk = Disk()
        settings = StoreSettings(Path("/nowhere/store.sqlite3"), 600.0, 1 << 30, 0, "option --db")
        self.store = EventStore(QueuedWriter(StoreWriter(self.db, RUN, 0.0), self.disk), settings, self.clock)

    def report(self, count: int) -> None:
        for _ in range(count):
            self.store.request(record(capture=0))

    def test_a_busy_batch_waits_until_busy_flush_delay(self) -> None:
        self.report(recorder.BUSY_BATCH)
        self.clock.advance(recorder.FLUSH_DELAY)
        self.assertEqual(self.disk.jobs, [], "BUSY_BATCH items in FLUSH_DELAY: a busy batch")
        self.report(1)
        self.clock.advance(recorder.BUSY_FLUSH_DELAY - recorder.FLUSH_DELAY - 0.01)
        self.assertEqual(self.disk.jobs, [])
        self.clock.advance(0.01)
        self.assertEqual(len(self.disk.jobs), 1)
        self.disk.run()
        self.assertEqual(self.store.written, recorder.BUSY_BATCH + 1)

    def test_the_next_busy_batch_waits_as_long_after_its_first_event(self) -> None:
        self.report(recorder.BUSY_BATCH)
        self.clock.advance(recorder.BUSY_FLUSH_DELAY)
        self.report(recorder.BUSY_BATCH)  # queued while the disk writes the first
        self.clock.advance(0.5)
        self.disk.run(1)
        self.assertEqual(self.disk.jobs, [], "the second is half a second old")
        self.clock.advance(recorder.BUSY_FLUSH_DELAY - 0.5)
        self.assertEqual(len(self.disk.jobs), 1)

    def test_a_full_batch_goes_at_once(self) -> None:
        self.report(recorder.FULL_BATCH - 1)
        self.assertEqual(self.disk.jobs, [])
        self.report(1)
        self.assertEqual(len(self.disk.jobs), 1, "FULL_BATCH items go without waiting")
        self.report(recorder.FULL_BATCH)  # queued while the disk writes the first: goes once it is done
        self.disk.run(1)
        self.assertEqual(len(self.disk.jobs), 1)
        self.disk.run()
        self.assertEqual((self.store.written, self.store.dropped), (2 * recorder.FULL_BATCH, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [], "no timer left behind")

    def test_a_light_load_is_written_within_flush_delay(self) -> None:
        self.report(recorder.BUSY_BATCH - 1)
        self.clock.advance(recorder.FLUSH_DELAY)
        self.assertEqual(len(self.disk.jobs), 1)


class UnencodableRecordTests(SynchronousTestCase):
    def store(self) -> tuple[EventStore, Clock, Disk, sqlite3.Connection]:
        clock = Clock()
        db = open_store(":memory:")
        self.addCleanup(db.close)
        disk = Disk()
        settings = StoreSettings(Path("/nowhere/store.sqlite3"), 600.0, 1 << 30, 1024, "option --db")
        return EventStore(QueuedWriter(StoreWriter(db, RUN, 0.0), disk), settings, clock), clock, disk, db

    def test_a_record_that_cannot_be_encoded_is_dropped_not_the_request(self) -> None:
        store, clock, disk, db = self.store()
        bad = record()
        bad.capture.request_headers = [(b"x-odd", [object()])]  # type: ignore[union-attr, list-item]
        with capturedLogs() as events:
            store.request(bad)
        store.request(record())
        self.assertEqual((store.dropped, store.health()["queued"]), (1, 1))
        self.assertTrue(any("cannot record a RequestRecord" in formatEvent(e) for e in events))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        clock.advance(recorder.FLUSH_DELAY)
        disk.run()
        self.assertEqual(db.execute("SELECT count(*) FROM requests").fetchone()[0], 1)
        self.assertEqual(db.execute("SELECT count(*) FROM exchanges").fetchone()[0], 1)

    def test_a_record_that_the_writer_cannot_encode_is_dropped_and_counted(self) -> None:
        store, clock, disk, db = self.store()
        bad = record()
        bad.capture.response_headers = [(b"x-odd", [5])]  # type: ignore[union-attr, list-item]
        store.request(bad)
        store.request(record())
        self.assertEqual(store.dropped, 0, "kept as it came: its rows are made in the store's thread")
        clock.advance(recorder.FLUSH_DELAY)
        with capturedLogs() as events:
            disk.run()
        self.assertEqual((store.dropped, store.written), (1, 1))
        self.assertTrue(any("cannot record 1 request(s) (AttributeError" in formatEvent(e) for e in events))
        self.assertEqual(db.execute("SELECT count(*) FROM requests").fetchone()[0], 1)
