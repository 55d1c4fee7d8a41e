"""The live feed: each request the store writes, pushed to the open pages as a Server-Sent Event.

The store tells the feed of every batch it committed (`EventStore.watch`),
with the rows as written, so a page learns of a request without anyone
polling the file, and the row it is told of can already be read back (its
detail, by id).  Each page is a `Subscriber` registered as the push producer
of its response: while its connection's buffer is full, Twisted pauses it and
its events wait in a bounded buffer; a page that lets `MAX_BUFFERED` events
pile up is dropped (its connection aborted), never buffered for ever.  Its
browser reconnects by itself with `Last-Event-ID`, and gets what it missed
from the store (`backfill`).
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from mcpr.gateway.store.queries import Filters, RequestRow

log = Logger()

MAX_BUFFERED = 256  # events a paused page may owe before it is dropped
BACKFILL = 500  # requests sent to a page that reconnects; more were missed: it reloads its list


def row_of_written(row: tuple[Any, ...]) -> RequestRow:
    """A `requests` row as the writer inserted it (`writer._REQUEST_COLUMNS`: `run_id` third) as
    the query API reads it back."""
    return RequestRow.from_row(row[:2] + row[3:])


def request_json(row: RequestRow) -> dict[str, Any]:
    """A request as the inspector's API and feed give it: `as_dict` plus what its filters test."""
    return {**row.as_dict(), "failed": row.failed, "timed_out": row.timed_out}


def sse_event(event: str, data: Any, event_id: int | None = None) -> bytes:
    """One event; JSON has no raw newline, so `data` is one line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@implementer(IPushProducer)
class Subscriber:
    """One open page: what it selected, and its events while the connection cannot take them."""

    def __init__(self, request: Request, filters: Filters, feed: LiveFeed, *, after: int | None,
                 limit: int | None = None) -> None:
        self.request = request
        self.filters = filters
        self.feed = feed
        # The newest id the page has (from its list or its last event); None: it has none yet,
        # and wants what comes after the newest the store has.
        self.last_sent = after if after is not None else 0
        self._limit = MAX_BUFFERED if limit is None else limit
        self._buffer: deque[bytes] = deque()
        self._paused = False
        self._backfilling = True  # live rows wait until what the page missed went first
        self._held: list[RequestRow] = []
        self.closed = False

    # -- from the feed

    def offer(self, row: RequestRow) -> None:
        if self.closed or row.id <= self.last_sent or not self.filters.matches(row):
            return
        if self._backfilling:
            self._held.append(row)
            if len(self._held) > self._limit:
                self.drop(f"a live page held {len(self._held)} new requests while catching up")
            return
        self._send_row(row)

    def backfilled(self, after: int, rows: list[RequestRow], complete: bool) -> None:
        """What the page missed (`rows` after id `after`, oldest first), then the rows that came
        meanwhile."""
        if self.closed:
            return
        self._backfilling = False
        self.last_sent = after
        if not complete:
            # Too much was missed to stream: the page reloads its list and subscribes after it.
            self._send(sse_event("gap", {"after": self.last_sent}))
            self.close()
            self.request.unregisterProducer()
            self.request.finish()
            return
        for row in [*rows, *self._held]:
            if row.id > self.last_sent:
                self._send_row(row)
        self._held = []

    def _send_row(self, row: RequestRow) -> None:
        self.last_sent = row.id
        self._send(sse_event("request", request_json(row), row.id))

    def _send(self, data: bytes) -> None:
        if self.closed:
            return
        if self._paused:
            if len(self._buffer) >= self._limit:
                self.drop(f"a live page fell {len(self._buffer)} events behind")
                return
            self._buffer.append(data)
            return
        self.request.write(data)

    def drop(self, why: str) -> None:
        """The page does not keep up: close its connection, keep nothing for it."""
        log.warn("inspector: {why}: disconnected (it reconnects and catches up from the store)", why=why)
        self.close()
        transport = getattr(self.request.channel, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._buffer.clear()
        self._held = []
        self.feed.remove(self)

    # -- IPushProducer: the connection's buffer

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        while self._buffer and not self._paused and not self.closed:
            self.request.write(self._buffer.popleft())

    def stopProducing(self) -> None:
        self.close()


# (filters, after, limit) -> (after, rows): the requests after id `after` matching `filters`, oldest
# first, at most `limit`; `after` None means the newest id stored, and is then that id.
Backfill = Callable[[Filters, "int | None", int], Deferred[tuple[int, list[RequestRow]]]]


class LiveFeed:
    """The pages open on the live feed, and the store's watcher that feeds them."""

    def __init__(self, backfill: Backfill) -> None:
        self._backfill = backfill
        self.subscribers: list[Subscriber] = []

    def rows_written(self, rows: list[tuple[Any, ...]]) -> None:
        """`EventStore.watch`'s callback: each new request to each page that selected it."""
        if not self.subscribers:
            return
        for row in map(row_of_written, rows):
            for subscriber in list(self.subscribers):
                subscriber.offer(row)

    def subscribe(self, request: Request, filters: Filters, after: int | None) -> Subscriber:
        """Stream to `request` the requests after id `after` that match `filters`: first those the
        store has (at most `BACKFILL`), then each new one."""
        subscriber = Subscriber(request, filters, self, after=after)
        self.subscribers.append(subscriber)
        request.registerProducer(subscriber, True)
        request.notifyFinish().addBoth(lambda _: subscriber.close())
        d = self._backfill(filters, after, BACKFILL + 1)

        def caught_up(result: tuple[int, list[RequestRow]]) -> None:
            start, rows = result
            subscriber.backfilled(start, rows, complete=len(rows) <= BACKFILL)

        def failed(failure: Failure) -> None:
            log.failure("inspector: reading the requests a live page missed failed", failure)
            if subscriber.closed:  # the page left meanwhile
                return
            subscriber.close()
            subscriber.request.unregisterProducer()
            subscriber.request.finish()

        d.addCallbacks(caught_up, failed)
        return subscriber

    def remove(self, subscriber: Subscriber) -> None:
        if subscriber in self.subscribers:
            self.subscribers.remove(subscriber)
