"""The store's file: created in WAL mode and private, migrated in one transaction, refused when too new."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mcpr.gateway.store.schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Migration,
    StoreError,
    applied_version,
    open_reader,
    open_store,
)
from mcpr.gateway.store.writer import RunInfo, StoreWriter
from tests.support.store import record

RUN = RunInfo("test", "http://127.0.0.1:1/mcp", ["tcp:0"])


class SchemaTests(SynchronousTestCase):
    def path(self) -> Path:
        return Path(self.mktemp()) / "state" / "store.sqlite3"

    def test_new_file(self) -> None:
        path = self.path()
        db = open_store(str(path))
        self.addCleanup(db.close)
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(db.execute("PRAGMA auto_vacuum").fetchone()[0], 2, "incremental: retention gives space back")
        self.assertEqual(applied_version(db), SCHEMA_VERSION)
        self.assertEqual([v for v, in db.execute("SELECT version FROM migrations")], [m.version for m in MIGRATIONS])
        tables = {name for name, in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.assertTrue({"requests", "exchanges", "sessions", "listings", "tunnel_events", "runs"} <= tables)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(path.parent.stat().st_mode), 0o700)

    def test_in_memory(self) -> None:
        db = open_store(":memory:")
        self.addCleanup(db.close)
        self.assertEqual(applied_version(db), SCHEMA_VERSION)

    def test_reopening_applies_nothing(self) -> None:
        path = str(self.path())
        open_store(path).close()
        db = open_store(path)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("SELECT count(*) FROM migrations").fetchone()[0], len(MIGRATIONS))

    def test_old_file_is_migrated_and_keeps_its_rows(self) -> None:
        """A file written by this schema, opened by an mcpr that has one more migration: the
        migration runs once, is recorded, and the rows written before are still there."""
        path = str(self.path())
        db = open_store(path)
        writer = StoreWriter(db, RUN, 1000.0)
        writer.write([record(tool="old")], 1001.0, 0)
        db.close()
        later = (*MIGRATIONS, Migration(SCHEMA_VERSION + 1, "a column for later", (
            "ALTER TABLE requests ADD COLUMN note TEXT",
            "UPDATE requests SET note = 'migrated'")))
        db = open_store(path, migrations=later)
        self.addCleanup(db.close)
        self.assertEqual(applied_version(db), SCHEMA_VERSION + 1)
        self.assertEqual(db.execute("SELECT tool, note FROM requests").fetchall(), [("old", "migrated")])
        self.assertEqual(db.execute("SELECT version, name FROM migrations ORDER BY version DESC LIMIT 1").fetchone(),
                         (SCHEMA_VERSION + 1, "a column for later"))

    def test_failed_migration_leaves_the_file_as_it_was(self) -> None:
        path = str(self.path())
        open_store(path).close()
        broken = (*MIGRATIONS, Migration(SCHEMA_VERSION + 1, "fine", ("CREATE TABLE extra (x)",)),
                  Migration(SCHEMA_VERSION + 2, "broken", ("NOT SQL",)))
        self.assertRaises(sqlite3.OperationalError, open_store, path, migrations=broken)
        db = sqlite3.connect(path)
        self.addCleanup(db.close)
        self.assertEqual(applied_version(db), SCHEMA_VERSION)
        self.assertIsNone(db.execute("SELECT name FROM sqlite_master WHERE name = 'extra'").fetchone())

    def test_newer_file_is_refused(self) -> None:
        path = str(self.path())
        later = (*MIGRATIONS, Migration(SCHEMA_VERSION + 1, "from the future", ("CREATE TABLE extra (x)",)))
        open_store(path, migrations=later).close()
        e = self.assertRaises(StoreError, open_store, path)
        self.assertIn("written by a newer mcpr", str(e))
        e = self.assertRaises(StoreError, open_reader, Path(path))
        self.assertIn(f"schema {SCHEMA_VERSION + 1}, this mcpr reads {SCHEMA_VERSION}: upgrade mcpr", str(e))

    def test_reader_never_creates_nor_migrates(self) -> None:
        path = self.path()
        e = self.assertRaises(StoreError, open_reader, path)
        self.assertIn(f"no event store at {path}", str(e))
        self.assertFalse(path.exists())
        path.parent.mkdir(parents=True)
        path.write_bytes(b"not sqlite at all, but long enough to have a header" * 100)
        e = self.assertRaises(StoreError, open_reader, path)
        self.assertIn("not an event store", str(e))

    def test_reader_sees_what_the_writer_commits_meanwhile(self) -> None:
        """WAL: a reader open while the gateway writes sees each new commit, and cannot write."""
        path = self.path()
        db = open_store(str(path))
        self.addCleanup(db.close)
        writer = StoreWriter(db, RUN, 1000.0)
        reader = open_reader(path)
        self.addCleanup(reader.close)
        self.assertEqual(reader.execute("SELECT count(*) FROM requests").fetchone()[0], 0)
        writer.write([record(), record()], 1001.0, 0)
        self.assertEqual(reader.execute("SELECT count(*) FROM requests").fetchone()[0], 2)
        self.assertRaises(sqlite3.OperationalError, reader.execute, "DELETE FROM requests")
        self.assertTrue(os.path.exists(f"{path}-wal"))
