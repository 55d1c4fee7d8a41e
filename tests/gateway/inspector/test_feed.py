"""The live feed: rows the writer committed, pushed to each page that selected them; what a page
missed, from the store first; a page whose connection does not take its events, paused, then
dropped past its buffer, never buffered for ever."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from mcpr.gateway.inspector import feed as feed_module
from mcpr.gateway.inspector.feed import row_of_written
from mcpr.gateway.store import queries
from mcpr.gateway.store.queries import Filters
from mcpr.gateway.store.schema import open_store
from mcpr.gateway.store.writer import RunInfo, StoreWriter
from tests.support.inspector import inspector
from tests.support.store import record

RUN = RunInfo("9.9", "http://127.0.0.1:9/mcp", ["tcp:3000"])


class StreamRequest(DummyRequest):
    """A DummyRequest that keeps its push producer (DummyRequest drives only pull producers) and
    whose connection can be aborted."""

    def __init__(self) -> None:
        super().__init__([b""])
        self.producer: Any = None
        self.channel = DummyChannel()
        self.channel.transport = StringTransport()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def events(self) -> list[tuple[str, str | None, Any]]:
        """(event, id, data) of each event written."""
        out = []
        for block in b"".join(self.written).decode().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            if "event" in fields:
                out.append((fields["event"], fields.get("id"), json.loads(fields["data"])))
        return out


class FeedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.db = open_store(":memory:")
        self.addCleanup(self.db.close)
        self.writer = StoreWriter(self.db, RUN, 1000.0)
        _, self.feed = inspector(self.db)

    def rows(self, *records: Any) -> list[tuple[Any, ...]]:
        """A batch committed, and its rows as `EventStore` gives them to its watchers."""
        batch = self.writer.batch()
        for r in records:
            batch.add(r)
        rows = self.writer.commit(batch, 2000.0, 0, rows=True).rows
        assert rows is not None
        return rows

    def write(self, *records: Any) -> None:
        """A batch written, and the feed told, as `EventStore` tells its watchers."""
        self.feed.rows_written(self.rows(*records))

    def subscribe(self, filters: Filters = Filters(), after: int | None = None) -> StreamRequest:
        request = StreamRequest()
        self.feed.subscribe(request, filters, after)
        return request

    def test_a_written_row_is_the_row_read_back(self) -> None:
        rows = self.rows(record(1001.0, session_id="s", jsonrpc_id={"k": [1]}, error_code=-1), record(1002.0))
        self.assertEqual([row_of_written(row) for row in rows], sorted(queries.requests(self.db), key=lambda r: r.id))

    def test_new_rows_go_to_the_pages_that_selected_them(self) -> None:
        everything, errors, adds = self.subscribe(), self.subscribe(Filters(status="error")), \
            self.subscribe(Filters(tool="ad*"))
        self.write(record(1001.0, tool="add"), record(1002.0, tool="echo", status=500))
        self.assertEqual([(e, i, d["tool"]) for e, i, d in everything.events()],
                         [("request", "1", "add"), ("request", "2", "echo")])
        self.assertEqual([d["id"] for _, _, d in errors.events()], [2])
        self.assertTrue(errors.events()[0][2]["failed"])
        self.assertEqual([d["id"] for _, _, d in adds.events()], [1])

    def test_a_page_gets_what_it_missed_from_the_store_first_then_no_row_twice(self) -> None:
        self.write(record(1001.0), record(1002.0), record(1003.0))
        page = self.subscribe(after=1)
        self.write(record(1004.0))
        self.assertEqual([i for _, i, _ in page.events()], ["2", "3", "4"])
        fresh = self.subscribe()  # no id: only what comes next
        self.write(record(1005.0))
        self.assertEqual([i for _, i, _ in fresh.events()], ["5"])

    def test_rows_written_while_catching_up_wait_for_it(self) -> None:
        self.write(record(1001.0), record(1002.0))
        reading: list[Deferred[Any]] = []

        def backfill(filters: Filters, after: int | None, limit: int) -> Deferred[Any]:
            reading.append(Deferred())
            return reading[-1]

        self.feed._backfill = backfill  # the store's answer comes when the test says
        page = self.subscribe(after=0)
        self.write(record(1003.0))
        self.assertEqual(page.events(), [], "nothing before the rows it missed")
        (read,) = reading
        read.callback((0, queries.requests(self.db, after=0, limit=10)))
        self.assertEqual([i for _, i, _ in page.events()], ["1", "2", "3"], "row 3 once, after rows 1 and 2")

    def test_too_much_missed_is_a_gap_and_the_page_reloads(self) -> None:
        self.patch(feed_module, "BACKFILL", 2)
        self.write(record(1001.0), record(1002.0), record(1003.0))
        page = self.subscribe(after=0)
        self.assertEqual(page.events(), [("gap", None, {"after": 0})])
        self.assertEqual((page.finished, self.feed.subscribers), (1, []))

    def test_a_paused_page_buffers_then_is_dropped_past_its_buffer(self) -> None:
        self.patch(feed_module, "MAX_BUFFERED", 3)
        page = self.subscribe()
        page.producer.pauseProducing()
        self.write(record(1001.0), record(1002.0))
        self.assertEqual(page.events(), [])
        page.producer.resumeProducing()
        self.assertEqual([i for _, i, _ in page.events()], ["1", "2"], "in order, once it can take them")
        page.producer.pauseProducing()
        self.write(*(record(1003.0 + i) for i in range(3)))
        self.assertEqual((self.feed.subscribers, page.channel.transport.disconnecting), ([page.producer], False))
        self.write(record(1010.0))
        self.assertEqual(self.feed.subscribers, [], "dropped")
        self.assertTrue(page.channel.transport.disconnecting, "its connection aborted")
        self.assertEqual(len(page.events()), 2, "nothing more was written for it")

    def test_a_page_that_leaves_is_forgotten(self) -> None:
        page = self.subscribe()
        page.processingFailed(Failure(ConnectionError("gone")))
        self.assertEqual(self.feed.subscribers, [])
        self.write(record(1001.0))
        self.assertEqual(page.events(), [])

