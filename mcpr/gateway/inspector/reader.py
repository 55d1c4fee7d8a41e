"""The inspector's reads of the event store, on a thread of their own.

A page asks while the gateway writes: every query runs on one worker thread
(not the reactor; the store's writer is a process of its own, so reads and
writes never queue behind each other) over a read-only connection, which WAL lets read
while the writer commits.  The connection is opened on that thread at the
first question, so even opening the file never blocks the reactor.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mcpr.gateway.store.schema import open_reader

T = TypeVar("T")


def worker_pool(name: str) -> ThreadPool:
    """A pool of one worker thread, for SQLite work off the reactor, whose thread does not keep the
    process alive.

    A service tree that fails to start (a port in use) is stopped without a
    running reactor: a `stopService` waiting for its thread's last job then
    never returns, the pool is never stopped, and the process would hang after
    the one-line error instead of exiting.  A normal stop completes before the
    reactor ends, so a daemon thread cuts nothing short.
    """
    pool = ThreadPool(minthreads=1, maxthreads=1, name=name)
    pool.threadFactory = functools.partial(threading.Thread, daemon=True)  # type: ignore[assignment]
    return pool



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
