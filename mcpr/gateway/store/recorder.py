"""The event store's reactor side: what the proxy and the tunnel report is queued, and written in batches
by a process of the store's own (`worker`).

Nothing here waits for the disk.  A report is kept at once in a batch (as one
blob: `Batch.add`), and `FLUSH_DELAY` after its first event the batch goes to
the store's writer process (`writer_process`), which makes its rows and
writes them; or
`BUSY_FLUSH_DELAY` after it under load (`EventStore._flush_at`).  The next
batch waits until that one is written, and as long after its own first
event.  The batch is bounded (`MAX_QUEUE` events, `MAX_QUEUE_BYTES` of
captured bodies): when the disk cannot keep up, what does not fit is dropped
and counted, never the request.  The count is in `/healthz`, in the store
itself for `mcpr status`, and in a log line at most every
`DROP_REPORT_INTERVAL` seconds.  A batch the disk refused (full, read-only),
or a record that cannot be encoded, is dropped and counted the same way.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Callable, Coroutine, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcpr.gateway.settings import StoreSettings
from mcpr.gateway.store.schema import StoreError, open_store
from mcpr.gateway.store.writer import Batch, Item, RunInfo, SessionChange, StoreWriter, TunnelChange, Written
from mcpr.gateway.store.writer_process import WriterProcess
from mcpr.proxy.events import RequestRecord

log = Logger()

# Called on the reactor thread with the `requests` rows of each batch once committed.
Watcher = Callable[[list[tuple[Any, ...]]], None]


class Writer(Protocol):
    """Where batches are written: `StoreWriter`'s calls, answered later (`WriterProcess`; tests play
    it in memory)."""

    run_id: int

    def start(self) -> None: ...

    def commit(self, batch: Batch, now: float, dropped: int, rows: bool) -> Deferred[Written]: ...

    def heartbeat(self, now: float, dropped: int) -> Deferred[None]: ...

    def prune(self, now: float, retain: float, max_size: int) -> Deferred[int]: ...

    def close(self, now: float, dropped: int) -> Coroutine[Any, Any, None]: ...

    def close_unstarted(self, batch: Batch | None, now: float, dropped: int) -> None: ...


# Seconds a report waits for others to share its commit: each commit writes every page it touched (the
# tables and their four indexes) whatever the number of rows, so fewer, larger batches cost less per
# request; a fifth of a second is still live for `mcpr logs -f`.
FLUSH_DELAY = 0.2
# Under load a batch waits longer: a commit cost the gateway ~4 ms of CPU beyond its rows (the writer
# thread's wake-ups and GIL hand-overs, pages rewritten), which at 2,500 requests/s and five commits a
# second was half of what the store cost per request (bench/store_cost.py; docs/PERFORMANCE.md).
BUSY_BATCH = 100  # items that make a batch wait until BUSY_FLUSH_DELAY (100 in FLUSH_DELAY: 500/s)
BUSY_FLUSH_DELAY = 1.0
FULL_BATCH = 4096  # items that go at once, however young the batch
MAX_QUEUE = 10_000  # events waiting for the disk, beside the batch being written
MAX_QUEUE_BYTES = 64 << 20  # captured bytes waiting for the disk
EVENT_OVERHEAD = 512  # bytes an event is counted for besides its captured bodies
DROP_REPORT_INTERVAL = 10.0
HEARTBEAT_INTERVAL = 30.0  # `mcpr status` says a gateway stopped answering after three missed
PRUNE_INTERVAL = 300.0


class EventStore(Service):
    """The gateway's `Recorder` (and the tunnel's event sink), over one SQLite file.

    `open` makes the file ready before the reactor runs, so that a store that
    cannot be used stops `twist` at start with one line, as a port that cannot
    be bound does.
    """

    def __init__(self, writer: Writer, settings: StoreSettings, clock: Any, *,
                 max_queue: int = MAX_QUEUE, max_queue_bytes: int = MAX_QUEUE_BYTES) -> None:
        self.settings = settings
        self._writer = writer
        self._clock = clock
        self._max_queue = max_queue
        self._max_bytes = max_queue_bytes
        self._batch = Batch(writer.run_id)  # what was reported since the last batch left
        self._pending_bytes = 0
        self._pending_since = 0.0  # when the first of `_batch` came
        self._flush_call: IDelayedCall | None = None
        self._begin_call: IDelayedCall | None = None
        self._writing: Deferred[None] | None = None
        self._closed = False
        self.written = 0
        self.dropped = 0
        self._unreported = 0
        self._report_call: IDelayedCall | None = None
        self._error: str | None = None
        self._last_prune = clock.seconds()
        self._heartbeat = LoopingCall(self._tick)
        self._heartbeat.clock = clock
        self._watchers: list[tuple[Watcher, Callable[[], bool]]] = []

    @classmethod
    def open(cls, settings: StoreSettings, run: RunInfo, reactor: Any, *, max_queue: int = MAX_QUEUE) -> EventStore:
        """The store of `settings`, its file created or migrated and this run begun in it, written by a
        process of its own started and stopped with this service; `StoreError`, one line that names
        the setting and says what to do, if the file cannot be used."""
        try:
            db = open_store(str(settings.path))
            try:
                run_id = StoreWriter(db, run, reactor.seconds()).run_id
            finally:
                db.close()
        except (sqlite3.Error, OSError, StoreError) as e:
            raise StoreError(f"{settings.origin}: cannot use the event store {settings.path}: {_why(e)}") from None
        return cls(WriterProcess(reactor, str(settings.path), run_id), settings, reactor, max_queue=max_queue)

    # -- the service

    def startService(self) -> None:
        """The writer starts with the reactor's first turn: a gateway whose start fails further on
        (a port in use) stops this service before the reactor runs, and a process asked to do
        anything then could never say it is done."""
        super().startService()
        self._begin_call = self._clock.callLater(0, self._begin)

    def _begin(self) -> None:
        self._begin_call = None
        self._writer.start()
        self._prune()
        self._heartbeat.start(HEARTBEAT_INTERVAL, now=False)

    def stopService(self) -> Deferred[None]:
        """Write what is queued, mark the run stopped, close the file, then let the writer end."""
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._closed = True
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self._begin_call is not None:
            # Stopped before the reactor ran: no writer has touched the file, so this one closes it.
            self._begin_call.cancel()
            self._begin_call = None
            self._close_unstarted()
            return
        if self._heartbeat.running:
            self._heartbeat.stop()
        if self._writing is not None:
            await self._writing
        if self._batch.count:
            await self._flush()
        dropped, now = self.dropped, self._clock.seconds()
        try:
            await self._writer.close(now, dropped)
        except Exception as e:
            log.error("store: could not close {path}: {why}", path=str(self.settings.path), why=str(e))
        if self._report_call is not None and self._report_call.active():
            self._report_call.cancel()
        self._report_dropped()

    def _close_unstarted(self) -> None:
        now, dropped = self._clock.seconds(), self.dropped
        try:
            self._writer.close_unstarted(self._batch if self._batch.count else None, now, dropped)
        except Exception as e:
            log.error("store: could not close {path}: {why}", path=str(self.settings.path), why=str(e))
        self._batch, self._pending_bytes = Batch(self._writer.run_id), 0

    # -- what the proxy and the tunnel report (the reactor thread)

    @property
    def capture_limit(self) -> int:
        return self.settings.capture

    def request(self, record: RequestRecord) -> None:
        capture = record.capture
        size = capture.request_body.kept + capture.response_body.kept if capture is not None else 0
        self._offer(record, EVENT_OVERHEAD + size)

    def session(self, ts: float, session: dict[str, Any]) -> None:
        self._offer(SessionChange(ts, session), EVENT_OVERHEAD)

    def emit(self, type: str, ts: float, **fields: Any) -> None:
        """The tunnel's events (`TunnelClient`'s event sink)."""
        if type == "tunnel":
            self._offer(TunnelChange(ts, fields), EVENT_OVERHEAD)

    def watch(self, watcher: Watcher, active: Callable[[], bool] = lambda: True) -> None:
        """Have `watcher` told of the requests of every batch written from now on while `active()`
        (asked as each batch leaves: the inspector's feed while a live page is open; the rows are
        made, in the writer, only then): the rows are readable by then, and the live page needs no
        polling of the file.  A reader that starts to watch should read what it missed once
        `settled`."""
        self._watchers.append((watcher, active))

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers = [w for w in self._watchers if w[0] != watcher]

    def settled(self) -> Deferred[None]:
        """Fires once the batch being written, if any, is: a batch that left while no watcher was
        active carries no rows to tell, so a reader that catches up from the file must read after it."""
        d: Deferred[None] = Deferred()
        if self._writing is None:
            d.callback(None)
            return d

        def settle(result: object) -> object:
            d.callback(None)
            return result

        self._writing.addBoth(settle)
        return d

    def health(self) -> dict[str, Any]:
        return {"path": str(self.settings.path), "written": self.written, "dropped": self.dropped,
                "queued": self._batch.count, "error": self._error}

    def _offer(self, item: Item, size: int) -> None:
        if self._closed:
            return
        if self._batch.count >= self._max_queue or self._pending_bytes + size > self._max_bytes:
            self._drop(1)
            return
        try:
            self._batch.add(item)
        except Exception:  # a record the store cannot encode is dropped and counted, never the request
            log.failure("store: cannot record a {item}", item=type(item).__name__)
            self._drop(1)
            return
        if self._batch.count == 1:
            self._pending_since = self._clock.seconds()
        self._pending_bytes += size
        if self._writing is not None:
            return
        if self._batch.count >= FULL_BATCH:
            if self._flush_call is not None:
                self._flush_call.cancel()
            self._flush()
        elif self._flush_call is None:
            self._flush_call = self._clock.callLater(FLUSH_DELAY, self._due)

    # -- writing

    def _flush_at(self) -> float:
        """When the batch is to go: `FLUSH_DELAY` after its first event, or `BUSY_FLUSH_DELAY` after
        it once it holds `BUSY_BATCH` items (a load under which commits are worth sharing; a second is
        still live for `mcpr logs -f`), or at once when it holds `FULL_BATCH`."""
        count = self._batch.count
        if count >= FULL_BATCH:
            return self._pending_since
        return self._pending_since + (BUSY_FLUSH_DELAY if count >= BUSY_BATCH else FLUSH_DELAY)

    def _due(self) -> None:
        """The batch goes now if it is old enough (`_flush_at`), else when it is."""
        self._flush_call = None
        wait = self._flush_at() - self._clock.seconds()
        if wait > 0:
            self._flush_call = self._clock.callLater(wait, self._due)
        else:
            self._flush()

    def _flush(self) -> Deferred[None]:
        self._flush_call = None
        batch, self._batch, self._pending_bytes = self._batch, Batch(self._writer.run_id), 0
        rows = any(active() for _, active in self._watchers)
        writing = self._writer.commit(batch, self._clock.seconds(), self.dropped, rows)
        self._writing = done = writing.addCallbacks(self._written, self._failed, errbackArgs=(batch.count,))
        return done

    def _written(self, written: Written) -> None:
        self._writing = None
        self.written += written.count
        if self._error is not None:
            log.info("store: writing to {path} again", path=str(self.settings.path))
            self._error = None
        if written.skipped:
            log.error("store: cannot record {count} request(s) ({why}); they are dropped", count=written.skipped,
                      why=written.why)
            self._drop(written.skipped)
        rows = written.rows
        if rows:
            for watcher, _ in list(self._watchers):
                try:
                    watcher(rows)
                except Exception:
                    log.failure("store: a watcher of new requests failed")
        self._next()

    def _failed(self, failure: Failure, count: int) -> None:
        self._writing = None
        why = str(failure.value) or repr(failure.value)
        if self._error is None:
            log.error("store: cannot write to {path} ({why}); events are dropped until it can",
                      path=str(self.settings.path), why=why)
        self._error = why
        self._drop(count)
        self._next()

    def _next(self) -> None:
        """After a batch, the next one goes when it would have had the disk been free (`_flush_at`
        after the first event that queued meanwhile): a batch that went as soon as the last was
        written would, under a steady load, hold the few requests of one write's duration, and the
        commit and the thread's wake-ups, not the rows, would be most of what the store costs."""
        if self._batch.count and not self._closed:
            self._due()

    def _drop(self, count: int) -> None:
        self.dropped += count
        self._unreported += count
        if self._report_call is None:
            self._report_dropped()

    def _report_dropped(self) -> None:
        """One line for the drops since the last one, then again `DROP_REPORT_INTERVAL` later
        while drops go on."""
        self._report_call = None
        if not self._unreported:
            return
        log.warn("store: {count} event(s) dropped, {total} since start: the disk does not keep up with "
                 "{path} (requests are not affected)", count=self._unreported, total=self.dropped,
                 path=str(self.settings.path))
        self._unreported = 0
        if not self._closed:
            self._report_call = self._clock.callLater(DROP_REPORT_INTERVAL, self._report_dropped)

    # -- housekeeping

    def _tick(self) -> None:
        """The heartbeat `mcpr status` reads, and retention every `PRUNE_INTERVAL`."""
        now, dropped = self._clock.seconds(), self.dropped
        self._writer.heartbeat(now, dropped).addErrback(self._housekeeping_failed)
        if now - self._last_prune >= PRUNE_INTERVAL:
            self._prune()

    def _prune(self) -> None:
        now = self._last_prune = self._clock.seconds()
        s = self.settings
        self._writer.prune(now, s.retain, s.max_size).addErrback(self._housekeeping_failed)

    def _housekeeping_failed(self, failure: Failure) -> None:
        log.error("store: housekeeping on {path} failed: {why}", path=str(self.settings.path),
                  why=str(failure.value) or repr(failure.value))


def _why(e: Exception) -> str:
    """Why the file cannot be used, and what to do: the second half of `EventStore.open`'s line."""
    if isinstance(e, StoreError):
        return str(e)
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        return (f"{e.strerror or e}{where}: choose a path in a folder this user can create and write, "
                "or --no-store to run without a store")
    return f"{e}: choose another path, or --no-store to run without a store"
