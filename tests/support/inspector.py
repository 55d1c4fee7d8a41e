"""An inspector over a store filled through the writer, for tests that need no gateway."""

from __future__ import annotations

import sqlite3
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from mcpr.gateway.inspector.feed import LiveFeed
from mcpr.gateway.inspector.replay import Answer, Replay, Replayer
from mcpr.gateway.inspector.web import InspectorResource
from mcpr.gateway.store import queries
from mcpr.gateway.store.queries import Body, Filters, RequestRow


def asking(db: sqlite3.Connection) -> Callable[[Callable[[sqlite3.Connection], Any]], Deferred[Any]]:
    """`StoreReader.ask` without its thread: the question runs at once (a failure fails the Deferred)."""
    def ask(question: Callable[[sqlite3.Connection], Any]) -> Deferred[Any]:
        try:
            return succeed(question(db))
        except Exception as e:
            d: Deferred[Any] = Deferred()
            d.errback(e)
            return d
    return ask


class RecordingReplayer(Replayer):
    """A replayer that keeps what it was asked to send and answers `answer`."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(Clock(), lambda: "http://127.0.0.1:1")
        self.sent: list[Replay] = []
        self.answer = answer

    async def send(self, replay: Replay) -> Answer:
        self.sent.append(replay)
        return self.answer


def inspector(db: sqlite3.Connection, replayer: Replayer | None = None) -> tuple[InspectorResource, LiveFeed]:
    ask = asking(db)

    def backfill(filters: Filters, after: int | None, limit: int) -> Deferred[tuple[int, list[RequestRow]]]:
        def question(db: sqlite3.Connection) -> tuple[int, list[RequestRow]]:
            start = queries.last_id(db) if after is None else after
            return start, queries.requests(db, filters, after=start, limit=limit)
        return ask(question)

    feed = LiveFeed(backfill)
    answer = Answer(200, [["content-type", "application/json"]],
                    Body(b'{"jsonrpc":"2.0","id":1,"result":{}}', 36, "application/json"))
    resource = InspectorResource(Clock(), ask, feed, replayer or RecordingReplayer(answer),
                                 lambda: {"upstream": "http://127.0.0.1:9/mcp", "gateway": "http://127.0.0.1:3000"})
    return resource, feed
