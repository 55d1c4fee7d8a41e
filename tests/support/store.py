"""Records as the proxy core makes them, for tests of the event store that need no proxy."""

from __future__ import annotations

import itertools
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers

from mcpr.gateway.store.writer import Batch, StoreWriter, Written

from mcpr.proxy.capture import Capture, Listing
from mcpr.proxy.events import RequestRecord

_ids = itertools.count(1)


def record(started: float = 1000.0, latency_ms: float = 10.0, *, upstream_ms: float | None = None,
           request_body: bytes = b"", response_body: bytes = b"", capture: int = 64 << 10,
           request_headers: dict[str, str] | None = None, response_headers: dict[str, str] | None = None,
           query: bytes = b"", listings: tuple[Listing, ...] = (), **fields: Any) -> RequestRecord:
    """A finished request, a `tools/call` POST unless `fields` say otherwise, its bodies fed through a
    `Capture` as the proxy feeds them (`capture=0`: headers only; `captured=False`: no capture at
    all, as a proxy without a store makes)."""
    captured = fields.pop("captured", True)
    finished = started + latency_ms / 1000
    values: dict[str, Any] = dict(request_id=f"t-{next(_ids)}", started=started, via="direct", method="POST",
                                  path="/mcp", route="mcp", status=200, mcp_method="tools/call", tool="add",
                                  jsonrpc_id=1, bytes_in=len(request_body), bytes_out=len(response_body))
    values.update(fields)
    r = RequestRecord(**values)
    r.finished = finished
    r.headers_at = started + (upstream_ms if upstream_ms is not None else latency_ms / 2) / 1000
    if captured:
        sent = Headers({k.encode(): [v.encode()] for k, v in (request_headers or
                                                                {"content-type": "application/json"}).items()})
        c = Capture.begin(sent, b"/mcp" + (b"?" + query if query else b""), capture)
        c.take_request_body(request_body, None)
        c.response_body.feed(response_body)
        c.finish(Headers({k.encode(): [v.encode()] for k, v in (response_headers or
                                                                  {"content-type": "application/json"}).items()}))
        c.listings += listings
        r.capture = c
    return r


class Disk:
    """The store's thread, played by the test: each job waits until the test runs it."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, job: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((job, d))
        return d

    def run(self, count: int | None = None) -> None:
        """Run the waiting jobs in order, as the thread would: `count` of them, or until none is
        left (jobs that the finished ones led to included)."""
        while self.jobs and (count is None or count > 0):
            count = None if count is None else count - 1
            job, d = self.jobs.pop(0)
            try:
                result = job()
            except Exception as e:
                d.errback(e)
            else:
                d.callback(result)


class QueuedWriter:
    """`EventStore`'s writer process played in memory: each call is a job of `disk`, run by the test
    on `writer` (a `StoreWriter`, usually over `:memory:`)."""

    def __init__(self, writer: StoreWriter, disk: Disk) -> None:
        self.writer = writer
        self.disk = disk
        self.run_id = writer.run_id
        self.started = False

    def start(self) -> None:
        self.started = True

    def commit(self, batch: Batch, now: float, dropped: int, rows: bool) -> Deferred[Written]:
        return self.disk(lambda: self.writer.commit(batch, now, dropped, rows=rows))

    def heartbeat(self, now: float, dropped: int) -> Deferred[None]:
        return self.disk(lambda: self.writer.heartbeat(now, dropped))

    def prune(self, now: float, retain: float, max_size: int) -> Deferred[int]:
        return self.disk(lambda: self.writer.prune(now, retain, max_size))

    async def close(self, now: float, dropped: int) -> None:
        await self.disk(lambda: self.writer.close(now, dropped))

    def close_unstarted(self, batch: Batch | None, now: float, dropped: int) -> None:
        if batch is not None:
            self.writer.commit(batch, now, dropped)
        self.writer.close(now, dropped)
