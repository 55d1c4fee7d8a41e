"""The store's writer process, for real: a child `python -m mcpr.gateway.store.worker` on a real file."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import TestCase

from mcpr.gateway.settings import StoreSettings
from mcpr.gateway.store.recorder import EventStore
from mcpr.gateway.store.schema import StoreError, open_store
from mcpr.gateway.store.writer import Batch, RunInfo, StoreWriter
from mcpr.gateway.store.writer_process import WriterProcess
from tests.support.store import record

RUN = RunInfo("t", "http://127.0.0.1:1/mcp", ["tcp:0"])


class WriterProcessTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.path = str(Path(self.mktemp()).resolve() / "store.sqlite3")
        db = open_store(self.path)
        self.run_id = StoreWriter(db, RUN, 100.0).run_id
        db.close()
        self.writer = WriterProcess(reactor, self.path, self.run_id)

    def read(self, sql: str) -> list[tuple]:
        db = sqlite3.connect(self.path)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()

    def batch(self, n: int) -> Batch:
        batch = Batch(self.run_id)
        for i in range(n):
            batch.add(record(1000.0 + i, session_id="s"))
        return batch

    async def test_calls_are_answered_then_close_ends_it(self) -> None:
        self.writer.start()
        written = await self.writer.commit(self.batch(3), 2000.0, 1, True)
        self.assertEqual((written.count, written.first, written.skipped), (3, 1, 0))
        assert written.rows is not None
        self.assertEqual([row[0] for row in written.rows], [1, 2, 3])
        await self.writer.heartbeat(2001.0, 2)
        self.assertEqual(await self.writer.prune(2002.0, 10 ** 9, 1 << 40), 0)
        self.assertEqual(self.read("SELECT count(*) FROM exchanges"), [(3,)])
        self.assertEqual(self.read("SELECT typeof(resource), typeof(error_code) FROM requests"), [("null", "null")] * 3,
                         "its None adapter binds NULL")
        pid = self.writer.pid
        assert pid is not None
        await self.writer.close(2003.0, 2)
        self.assertIsNone(self.writer.pid, "the process ended")
        self.assertRaises(ProcessLookupError, os.kill, pid, 0)
        self.assertEqual(self.read("SELECT last_seen, stopped, written, dropped FROM runs"), [(2003.0, 2003.0, 3, 2)])

    async def test_a_killed_process_fails_its_calls_and_the_next_call_starts_another(self) -> None:
        self.writer.start()
        pid = self.writer.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        pending = self.writer.commit(self.batch(2), 2000.0, 0, False)
        with capturedLogs() as events:
            os.kill(pid, signal.SIGKILL)
            with self.assertRaises(StoreError) as caught:
                await pending
        self.assertIn("the store's writer process stopped", str(caught.exception))
        self.assertTrue(any("the next batch starts another" in formatEvent(e) for e in events))
        written = await self.writer.commit(self.batch(1), 2001.0, 2, False)
        self.assertEqual((written.count, self.writer.starts), (1, 2))
        self.assertNotEqual(self.writer.pid, pid)
        self.assertEqual(self.read("SELECT count(*) FROM requests"), [(1,)], "the killed one's batch is not there")
        os.kill(self.writer.pid, signal.SIGKILL)  # type: ignore[arg-type]
        for _ in range(100):  # until the reactor has seen it end
            if self.writer.pid is None:
                break
            await deferLater(reactor, 0.05)
        self.assertIsNone(self.writer.pid)
        await self.writer.close(2002.0, 2)  # a writer is started again to close the run
        self.assertEqual((self.writer.starts, self.read("SELECT stopped FROM runs")), (3, [(2002.0,)]))

    async def test_ctrl_c_reaches_the_gateway_not_its_writer(self) -> None:
        """SIGINT (a terminal's Ctrl-C) and SIGTERM go to the whole group: the writer stays for the
        gateway's last batch."""
        self.writer.start()
        await self.writer.heartbeat(2000.0, 0)  # running, its handlers set
        pid = self.writer.pid
        assert pid is not None
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        written = await self.writer.commit(self.batch(1), 2001.0, 0, False)
        self.assertEqual(written.count, 1)
        await self.writer.close(2002.0, 0)

    async def test_what_it_says_on_stderr_is_logged_and_its_calls_fail(self) -> None:
        os.unlink(self.path)
        os.mkdir(self.path)  # a folder where the file was: it cannot open the store
        with capturedLogs() as events:
            self.writer.start()
            with self.assertRaises(StoreError):
                await self.writer.heartbeat(2000.0, 0)
            await deferLater(reactor, 0.1)  # stderr may come after the exit
        said = [formatEvent(e) for e in events if "the writer process says" in formatEvent(e)]
        self.assertTrue(any(f"cannot open the event store {self.path}" in line for line in said), said)

    async def test_the_event_store_writes_through_it(self) -> None:
        settings = StoreSettings(Path(self.path), retain=600.0, max_size=1 << 30, capture=1024, origin="option --db")
        store = EventStore.open(settings, RUN, reactor)
        store.startService()
        await deferLater(reactor, 0)
        for i in range(5):
            store.request(record(1000.0 + i))
        await store.stopService()
        self.assertEqual(self.read("SELECT count(*) FROM requests"), [(5,)])
        self.assertEqual(self.read("SELECT written, stopped IS NOT NULL FROM runs ORDER BY id DESC LIMIT 1"), [(5, 1)])

    def test_stopped_before_the_reactor_turned_it_writes_without_a_process(self) -> None:
        """A gateway whose start fails further on stops its store before the reactor runs: what was
        queued and the run's end are written at once, and no writer process is started."""
        settings = StoreSettings(Path(self.path), retain=600.0, max_size=1 << 30, capture=1024, origin="option --db")
        store = EventStore.open(settings, RUN, reactor)
        store.startService()
        store.request(record(1000.0))
        self.successResultOf(store.stopService())
        self.assertEqual(store._writer.starts, 0)  # type: ignore[attr-defined]
        self.assertEqual(self.read("SELECT count(*) FROM requests"), [(1,)])
        self.assertEqual(self.read("SELECT stopped IS NOT NULL FROM runs ORDER BY id DESC LIMIT 1"), [(1,)])
