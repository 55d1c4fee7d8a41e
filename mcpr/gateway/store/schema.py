"""The event store's file: opening it, its tables, and the migrations that bring an old file up to date.

One SQLite file per gateway, in WAL mode so that the query commands and the
inspector read it while the gateway writes (readers never wait for the writer,
nor it for them).  The schema is a list of migrations, applied in order and
each recorded in `migrations` (with `PRAGMA user_version` kept equal to the
last), so a file written by an older mcpr is upgraded on open and one written
by a newer mcpr is refused rather than misread.

The tables, and why they are apart:

- `requests`: one narrow row per request, everything listing and filtering
  needs, with an index per filter the inspector pages on (time, session, tool,
  method); ids grow with the order requests ended in, so paging and following
  go by id.
- `exchanges`: the same request's headers (redacted) and captured bodies, read
  only for one request's detail; kept out of `requests` so that scanning it
  does not wade through blobs.
- `sessions`: one row per `Mcp-Session-Id`, upserted from the session events
  and from each batch of requests (count, errors, last activity).
- `listings`: each answer to a `*/list` method that differs from the previous
  one for the same method and page (`mcpr schema --changes`).
- `tunnel_events`, `runs`: the tunnel's states, and one row per gateway run
  (pid, last heartbeat, how many events it wrote and dropped) for `mcpr status`.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

class StoreError(Exception):
    """The store cannot be used: missing, unreadable, or from another version of mcpr."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "requests, exchanges, sessions, listings, tunnel events and runs", (
        """CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            started REAL NOT NULL,
            last_seen REAL NOT NULL,
            stopped REAL,
            pid INTEGER NOT NULL,
            host TEXT NOT NULL,
            version TEXT NOT NULL,
            upstream TEXT NOT NULL,
            listen TEXT NOT NULL,
            written INTEGER NOT NULL DEFAULT 0,
            dropped INTEGER NOT NULL DEFAULT 0)""",
        """CREATE TABLE requests (
            id INTEGER PRIMARY KEY,
            request_id TEXT NOT NULL,
            run_id INTEGER,
            started REAL NOT NULL,
            via TEXT NOT NULL,
            method TEXT NOT NULL,
            path TEXT NOT NULL,
            route TEXT NOT NULL,
            status INTEGER,
            outcome TEXT NOT NULL,
            session_id TEXT,
            mcp_method TEXT,
            tool TEXT,
            resource TEXT,
            prompt TEXT,
            jsonrpc_id TEXT,
            error_code INTEGER,
            error_message TEXT,
            latency_ms REAL,
            upstream_ms REAL,
            downstream_ms REAL,
            bytes_in INTEGER NOT NULL,
            bytes_out INTEGER NOT NULL,
            client_name TEXT,
            client_version TEXT,
            listing_id INTEGER)""",
        "CREATE INDEX requests_started ON requests (started)",
        "CREATE INDEX requests_session ON requests (session_id, id)",
        "CREATE INDEX requests_tool ON requests (tool, id)",
        "CREATE INDEX requests_method ON requests (mcp_method, id)",
        """CREATE TABLE exchanges (
            id INTEGER PRIMARY KEY,
            query TEXT NOT NULL,
            request_headers TEXT NOT NULL,
            response_headers TEXT NOT NULL,
            request_body BLOB NOT NULL,
            response_body BLOB NOT NULL)""",
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            first_seen REAL NOT NULL,
            last_activity REAL NOT NULL,
            ended REAL,
            state TEXT NOT NULL,
            via TEXT,
            client_name TEXT,
            client_version TEXT,
            server_name TEXT,
            server_version TEXT,
            protocol_version TEXT,
            requests INTEGER NOT NULL DEFAULT 0,
            errors INTEGER NOT NULL DEFAULT 0)""",
        "CREATE INDEX sessions_activity ON sessions (last_activity)",
        """CREATE TABLE listings (
            id INTEGER PRIMARY KEY,
            method TEXT NOT NULL,
            cursor TEXT NOT NULL,
            digest TEXT NOT NULL,
            result TEXT NOT NULL,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            seen INTEGER NOT NULL,
            first_request INTEGER)""",
        "CREATE INDEX listings_page ON listings (method, cursor, id)",
        """CREATE TABLE tunnel_events (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            run_id INTEGER,
            state TEXT NOT NULL,
            relay TEXT,
            detail TEXT NOT NULL)""",
    )),
    # The inspector's status filter pages the newest failed (or timed-out) requests among 100,000
    # mostly good ones: partial indexes on exactly `queries.failed_sql()` and `timeout_sql()` let
    # SQLite walk only those rows, in id order.
    Migration(2, "partial indexes of failed and timed-out requests", (
        "CREATE INDEX requests_failed ON requests (id) "
        "WHERE (outcome != 'ok' OR coalesce(status, 0) >= 400 OR error_code IS NOT NULL)",
        "CREATE INDEX requests_timeout ON requests (id) "
        "WHERE (outcome = 'upstream-timeout' OR error_code = -32001)",
    )),
)

SCHEMA_VERSION = MIGRATIONS[-1].version


def _prepare(db: sqlite3.Connection) -> None:
    # WAL: readers (the query commands, the inspector) never block the writer nor wait for it.
    # synchronous=NORMAL: a commit survives the gateway being killed, and costs no fsync; a power
    # cut may lose the last commits, which for a debugging log is the right trade.
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")  # another gateway of the same project writing
    db.execute("PRAGMA journal_size_limit=67108864")  # the WAL is cut back to 64 MiB after a checkpoint


def open_store(path: str, *, migrations: Sequence[Migration] = MIGRATIONS) -> sqlite3.Connection:
    """The store at `path` (`:memory:` for tests), created or migrated to the latest schema,
    on a connection usable from the thread that opened it or any one thread after it."""
    if path != ":memory:":
        folder = os.path.dirname(path) or "."
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except FileExistsError:  # what makedirs says of a file where the folder should be
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), folder) from None
        # Bodies and headers are private even redacted: the file (and so its -wal and -shm, which
        # SQLite gives the file's mode) is made 0600 before SQLite creates it with the umask's.
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
            # Must precede the first table: space freed by retention can then be given back.
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        _prepare(db)
        migrate(db, migrations)
    except BaseException:
        db.close()
        raise
    return db


def applied_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Apply the migrations the file lacks, all in one transaction (a failed one leaves the file as
    it was); the versions applied."""
    latest = migrations[-1].version
    db.execute("BEGIN IMMEDIATE")  # one gateway migrates; another one starting waits, then sees it done
    try:
        current = applied_version(db)
        if current > latest:
            raise StoreError(f"the store was written by a newer mcpr (schema {current}; this one knows "
                             f"{latest}): upgrade mcpr, or point it at another file")
        db.execute("CREATE TABLE IF NOT EXISTS migrations ("
                   "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied REAL NOT NULL)")
        done = []
        for m in migrations:
            if m.version <= current:
                continue
            for statement in m.statements:
                db.execute(statement)
            db.execute("INSERT INTO migrations (version, name, applied) VALUES (?, ?, ?)",
                       (m.version, m.name, time.time()))
            db.execute(f"PRAGMA user_version={m.version:d}")
            done.append(m.version)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return done


def open_reader(path: Path) -> sqlite3.Connection:
    """A read-only connection for the query commands: never creates or migrates the file.

    Fails with a one-line `StoreError` when there is no store there or it is
    of another schema version than this mcpr reads.
    """
    if not path.exists():
        raise StoreError(f"no event store at {path}: no gateway has written one there yet: start the gateway "
                         "with this store first, or give --db the path of another")
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                         check_same_thread=False)
    try:
        db.execute("PRAGMA busy_timeout=5000")
        version = applied_version(db)
    except sqlite3.DatabaseError as e:
        db.close()
        raise StoreError(f"{path} is not an event store ({e}): give --db the path of one") from None
    if version != SCHEMA_VERSION:
        db.close()
        newer = version > SCHEMA_VERSION
        raise StoreError(f"{path}: schema {version}, this mcpr reads {SCHEMA_VERSION}: "
                         + ("upgrade mcpr" if newer else "start the gateway once to migrate it"))
    return db
