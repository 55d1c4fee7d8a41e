"""The inspector's reads of the event store, on a thread of their own.

A page asks while the gateway writes: every query runs on one worker thread
(not the reactor, not the store's writer thread, so reads and writes never
queue behind each other) over a read-only connection, which WAL lets read
while the writer commits.  The connection is opened on that thread at the
first question, so even opening the file never blocks the reactor.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Callable, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from mcpr.gateway.store.recorder import worker_pool
from mcpr.gateway.store.schema import open_reader

T = TypeVar("T")


class StoreReader(Service):
    """Runs `ask(question)` with `question(connection)` on the reader thread, while running."""

    def __init__(self, path: Path, reactor: Any) -> None:
        self._path = path
        self._reactor = reactor
        self._pool = worker_pool("mcpr-inspector")
        self._db: sqlite3.Connection | None = None

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await deferToThreadPool(self._reactor, self._pool, self._close)
        self._pool.stop()

    def ask(self, question: Callable[[sqlite3.Connection], T]) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, lambda: question(self._connection()))

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = open_reader(self._path)
        return self._db

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
