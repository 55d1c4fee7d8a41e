"""Who last held each subdomain, kept on disk so that a relay restart does not free every name (S4).

The registry (`registry.py`) decides who may take a name, from memory; this
store only lets that memory survive a restart, even a `kill -9`.  It holds one
row per name, `(subdomain, owner, expires)`: `expires` is NULL while a tunnel
holds the name (the relay cannot write at the moment it dies), else the time
the reservation for its last owner ends.  Loading turns every NULL into
"reserved from now for the grace period": their owners could not reconnect
while the relay was down.

SQLite calls never run on the reactor thread: every call goes to one worker
thread of the store's own, in order.  Changes are coalesced per name while a
write is under way, so a slow disk costs at most one pending value per name,
never a growing queue, and a burst of registrations is one transaction.  A
failed write is logged and retried later; it never stops the relay, which
keeps deciding from memory.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any, Callable, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

log = Logger()

T = TypeVar("T")
Runner = Callable[[Callable[[], T]], "Deferred[T]"]

FILE_NAME = "reservations.sqlite3"
SCHEMA_VERSION = 1
# After a failed write, the pending changes are tried again this much later (not at once: a
# full or read-only disk would otherwise be retried in a busy loop).
RETRY_DELAY = 10.0

# A row as the registry receives it: (subdomain, owner, expires).
Row = tuple[str, str, float]
# A pending change: (owner, expires or None while held), or None to delete the row.
Change = tuple[str, float | None] | None


class ReservationStore(Service):
    """The reservations table of one relay, in `<state_dir>/reservations.sqlite3`.

    `run` executes a function on the store's thread and returns a Deferred of
    its result; `in_thread` builds the real one (tests pass runners of their
    own, which run calls at once or when the test says).
    """

    def __init__(self, path: str, clock: IReactorTime, run: Runner[Any], pool: ThreadPool | None = None) -> None:
        self.path = path
        self._clock = clock
        self._run = run
        self._pool = pool
        self._loading: Deferred[None] | None = None  # fires once a load has ended, however
        self._db: sqlite3.Connection | None = None
        self._pending: dict[str, Change] = {}
        self._writing: Deferred[None] | None = None
        self._retry: IDelayedCall | None = None
        self._failing = False
        self._closed = False
        self._disabled = False  # the file could not be loaded: changes are dropped

    @classmethod
    def in_thread(cls, state_dir: Path, reactor: Any) -> ReservationStore:
        """The store of `state_dir`, run on a thread pool of one thread, started and stopped
        with this service."""
        pool = ThreadPool(minthreads=1, maxthreads=1, name="mcpr-reservations")
        return cls(str(state_dir / FILE_NAME), reactor, _pool_runner(reactor, pool), pool)

    def startService(self) -> None:
        super().startService()
        if self._pool is not None:
            self._pool.start()

    def stopService(self) -> Deferred[None]:
        """Write what is pending, close the file, then stop the thread."""
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._closed = True  # no more changes, and no more retries: one last attempt below
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._loading is not None:
            await self._loading
        if self._writing is not None:
            await self._writing
        if self._pending and self._db is not None:
            await self._flush()
        if self._db is not None:
            db, self._db = self._db, None
            await self._run(db.close)
        if self._pool is not None:
            self._pool.stop()

    # -- loading (once, at start)

    def load(self, now: float, grace: float) -> Deferred[list[Row]]:
        """Open (or create) the file and return its reservations, soonest to expire first:
        expired rows are deleted, and names a tunnel held when the relay stopped are
        reserved for their owner until `now + grace`.  Fails if the file cannot be used;
        the store then stays disabled (every change is dropped)."""
        self._loading = Deferred()
        return self._run(lambda: self._open_and_load(now, grace)).addCallbacks(
            self._opened, self._unusable).addBoth(self._loaded)

    def _unusable(self, failure: Failure) -> Failure:
        self._disabled = True
        self._pending.clear()
        return failure

    def _loaded(self, result: T) -> T:
        assert self._loading is not None
        self._loading.callback(None)
        return result

    def _open_and_load(self, now: float, grace: float) -> tuple[sqlite3.Connection, list[Row]]:
        if self.path != ":memory:":
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            # WAL with synchronous=NORMAL: a committed write survives the relay being killed
            # (not a power cut, which costs at most the last writes), and writes stay cheap.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"unknown schema version {version}")
            with db:
                db.execute("BEGIN")
                db.execute("CREATE TABLE IF NOT EXISTS reservations ("
                           "subdomain TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL)")
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                db.execute("DELETE FROM reservations WHERE expires <= ?", (now,))
                db.execute("UPDATE reservations SET expires = ? WHERE expires IS NULL", (now + grace,))
            rows = db.execute("SELECT subdomain, owner, expires FROM reservations ORDER BY expires").fetchall()
        except BaseException:
            db.close()
            raise
        return db, [(str(s), str(o), float(e)) for s, o, e in rows]

    def _opened(self, result: tuple[sqlite3.Connection, list[Row]]) -> list[Row]:
        self._db, rows = result
        if self._pending:
            self._flush()
        return rows

    # -- changes (from the registry, on the reactor thread)

    def held(self, subdomain: str, owner: str) -> None:
        """A tunnel of `owner` holds `subdomain` now."""
        self._change(subdomain, (owner, None))

    def reserved(self, subdomain: str, owner: str, expires: float) -> None:
        """`subdomain` is reserved for `owner` until `expires` (its tunnel dropped)."""
        self._change(subdomain, (owner, expires))

    def forgotten(self, subdomain: str) -> None:
        """Nobody holds or reserves `subdomain` any more."""
        self._change(subdomain, None)

    def _change(self, subdomain: str, change: Change) -> None:
        if self._closed or self._disabled:
            return
        self._pending[subdomain] = change
        if self._db is not None and self._writing is None and self._retry is None:
            self._flush()

    def _flush(self) -> Deferred[None]:
        assert self._db is not None
        batch, self._pending = self._pending, {}
        db = self._db
        self._writing = writing = self._run(lambda: _write(db, batch))
        writing.addCallbacks(self._written, self._failed, errbackArgs=(batch,))
        return writing

    def _written(self, _: None) -> None:
        self._writing = None
        if self._failing:
            self._failing = False
            log.info("reservations: writing to {path} again", path=self.path)
        if self._pending and not self._closed:
            self._flush()

    def _failed(self, failure: Failure, batch: dict[str, Change]) -> None:
        self._writing = None
        if not self._failing:
            self._failing = True
            log.error("reservations: cannot write {path} ({why}); names stay reserved in memory, "
                      "retrying every {delay:.0f} s", path=self.path, why=str(failure.value), delay=RETRY_DELAY)
        for subdomain, change in batch.items():
            self._pending.setdefault(subdomain, change)  # a newer change wins over the failed one
        if not self._closed:
            self._retry = self._clock.callLater(RETRY_DELAY, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        if self._pending and self._db is not None and self._writing is None:
            self._flush()


def _write(db: sqlite3.Connection, batch: dict[str, Change]) -> None:
    """One transaction per batch, each statement run over its rows in C (`executemany`): the batch
    holds one change per name, so deletions and upserts of different names commute."""
    gone = [(subdomain,) for subdomain, change in batch.items() if change is None]
    kept = [(subdomain, *change) for subdomain, change in batch.items() if change is not None]
    with db:
        db.execute("BEGIN")
        if gone:
            db.executemany("DELETE FROM reservations WHERE subdomain = ?", gone)
        if kept:
            db.executemany("INSERT OR REPLACE INTO reservations (subdomain, owner, expires) VALUES (?, ?, ?)", kept)


def _pool_runner(reactor: IReactorFromThreads, pool: ThreadPool) -> Runner[Any]:
    def run(f: Callable[[], T]) -> Deferred[T]:
        return deferToThreadPool(reactor, pool, f)

    return run
