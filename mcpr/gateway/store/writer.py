"""Batches of records turned into rows, and written in one transaction per batch.

Two halves.  `Batch.add` makes an item's rows (redaction, JSON encoding) on
the reactor thread as it is reported; `commit` runs on the store's own
thread and does what needs the file: SQLite, ids, and the `*/list` answers
(hashed, compared with the last one stored).  Making the rows in the store's
thread did not take that work off the reactor, since the GIL lets one thread
run Python at a time: it only added the two threads handing the GIL over,
which cost the gateway more CPU than the rows did (bench/store_cost.py); and
made per report, the rows cost the reactor tens of microseconds after each
response rather than milliseconds at every batch.
SQLite lets the GIL go while it works, so the thread's half does run beside
the reactor.

A batch is one `BEGIN IMMEDIATE ... COMMIT`: under load a batch holds
hundreds of requests, so the cost of a commit is shared, and each table's
rows go in a few multi-row `INSERT`s (see `Insert`).  Request ids are given
in `commit`, inside the transaction that holds the write lock, so that the
row in `requests` and the one in `exchanges` get the same id even when
another gateway of the same project writes to the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

from mcpr.gateway.store import redact
from mcpr.gateway.store.retention import prune
from mcpr.proxy.capture import Capture, Listing
from mcpr.proxy.events import RequestRecord


@dataclass(frozen=True)
class SessionChange:
    ts: float
    fields: dict[str, Any]


@dataclass(frozen=True)
class TunnelChange:
    ts: float
    fields: dict[str, Any]


Item = Union[RequestRecord, SessionChange, TunnelChange]


@dataclass(frozen=True)
class Written:
    """What one committed batch became: the count of its items, the id of its first request, and
    the listing row of each request (by index in the batch) that carried a `*/list` answer. With the
    batch, that gives the `requests` rows as inserted (`Batch.request_rows`), which the inspector
    pushes to its live page without reading them back."""

    count: int
    first: int
    listing_ids: dict[int, int]


@dataclass(frozen=True)
class RunInfo:
    """The gateway process writing, for `mcpr status`."""

    version: str
    upstream: str
    listen: Sequence[str]


def failed(record: RequestRecord) -> bool:
    """Whether a request counts as an error (the Python twin of `queries.failed_sql`)."""
    return record.outcome != "ok" or (record.status or 0) >= 400 or record.error_code is not None


_REQUEST_COLUMNS = ("id, request_id, run_id, started, via, method, path, route, status, outcome, session_id, "
                    "mcp_method, tool, resource, prompt, jsonrpc_id, error_code, error_message, latency_ms, "
                    "upstream_ms, downstream_ms, bytes_in, bytes_out, client_name, client_version, listing_id")
# The host parameters one statement may have: SQLite's default limit, 999 before 3.32.
_MAX_PARAMETERS = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999


class Insert:
    """An `INSERT ... VALUES ` of many rows to a statement, their values given flat.

    Not `executemany`: the sqlite3 module lets the GIL go around every step of
    a statement, one per row there, and under load the reactor thread is
    waiting for it; the two threads then handed the GIL back and forth twice
    a row, and those switches cost the gateway more CPU than the rows did.
    The values are one flat list, made as the rows were, so that the store's
    thread does no Python per row (what it does holds the GIL too).  A batch
    goes in statements of a few fixed sizes (256, 64, 16, 4 and 1 rows), so
    that the prepared statements SQLite keeps are few.

    `OR FAIL`, not the default `OR ABORT`: to undo just the one statement an
    aborted multi-row `INSERT` needs a statement journal, which SQLite keeps
    in a temporary file past 64 KiB, and a batch's rows wrote as many pages
    to it as to the WAL (strace: 13,503 `pwrite`s for 10,000 requests, 8,215
    with `OR FAIL`).  On a failed statement `StoreWriter.commit` rolls the
    whole batch back, so keeping its first rows until then changes nothing.
    """

    def __init__(self, head: str, row: str) -> None:
        self.width = row.count("?") - 1  # the values a row takes (?1 is the batch's own)
        self.sizes = [n for n in (256, 64, 16, 4, 1) if n * self.width + 1 <= _MAX_PARAMETERS]
        self.sql = {n: head + ", ".join([row] * n) for n in self.sizes}

    def run(self, db: sqlite3.Connection, first: int, values: list[Any]) -> None:
        """The rows of `values`, whose ids are `first` plus each row's first value."""
        w, rows, done = self.width, len(values) // self.width, 0
        for n in self.sizes:
            while rows - done >= n:
                db.execute(self.sql[n], [first, *values[done * w:(done + n) * w]])
                done += n


# Each row's id is the batch's first (?1, given in the transaction) plus the row's index in the batch,
# its first value; a request's listing_id is set after, for the few that carried a `*/list` answer.
_INSERT_REQUEST = Insert(f"INSERT OR FAIL INTO requests ({_REQUEST_COLUMNS}) VALUES ", "(?1 + ?" + ", ?" * 24 + ", NULL)")
_INSERT_EXCHANGE = Insert("INSERT OR FAIL INTO exchanges (id, query, request_headers, response_headers, request_body, "
                          "response_body) VALUES ", "(?1 + ?, ?, ?, ?, ?, ?)")
# A batch's requests of one session: counts add up, times widen, what is known is kept.
_UPSERT_ACTIVITY = """
    INSERT INTO sessions (id, first_seen, last_activity, state, via, client_name, client_version, requests, errors)
    VALUES (?, ?, ?, 'active', ?, ?, ?, ?, ?)
    ON CONFLICT (id) DO UPDATE SET
        first_seen = min(first_seen, excluded.first_seen),
        last_activity = max(last_activity, excluded.last_activity),
        via = coalesce(via, excluded.via),
        client_name = coalesce(client_name, excluded.client_name),
        client_version = coalesce(client_version, excluded.client_version),
        requests = requests + excluded.requests,
        errors = errors + excluded.errors"""
# A session event (started, ended, expired): its state and what the session table knew.
_UPSERT_SESSION = """
    INSERT INTO sessions (id, first_seen, last_activity, ended, state, client_name, client_version,
                          server_name, server_version, protocol_version)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (id) DO UPDATE SET
        first_seen = min(first_seen, excluded.first_seen),
        last_activity = max(last_activity, excluded.last_activity),
        ended = excluded.ended,
        state = excluded.state,
        client_name = coalesce(excluded.client_name, client_name),
        client_version = coalesce(excluded.client_version, client_version),
        server_name = coalesce(excluded.server_name, server_name),
        server_version = coalesce(excluded.server_version, server_version),
        protocol_version = coalesce(excluded.protocol_version, protocol_version)"""


@dataclass
class Batch:
    """The rows of the items reported since the last batch left, made as each is reported, for
    `StoreWriter.commit`: requests without their id (given in the transaction) nor their listing,
    exchanges and listings by the index of their request in the batch."""

    run_id: int
    count: int = 0  # the items added
    requests: int = 0
    request_values: list[Any] = field(default_factory=list)  # per request: its index, then its row
    exchange_values: list[Any] = field(default_factory=list)  # per exchange: its request's index, its row
    listings: list[tuple[int, list[Listing], float]] = field(default_factory=list)  # (index, answers, ts)
    sessions: list[tuple[Any, ...]] = field(default_factory=list)
    tunnel: list[tuple[Any, ...]] = field(default_factory=list)
    activity: dict[str, list[Any]] = field(default_factory=dict)

    def add(self, item: Item) -> None:
        """One item's rows, redacted and encoded; no SQLite here, so it runs on the reactor thread
        (see the module's docstring), once per report."""
        # Everything that may fail comes before the first change: an item either goes in whole or
        # not at all, and the flat lists stay aligned.
        if isinstance(item, RequestRecord):
            row = _request_row(self.run_id, item)
            exchange = _exchange_row(item.capture) if item.capture is not None else None
            index = self.requests
            self.requests += 1
            self.request_values.append(index)
            self.request_values += row
            if exchange is not None:
                self.exchange_values.append(index)
                self.exchange_values += exchange
            if item.capture is not None and item.capture.listings:
                self.listings.append((index, item.capture.listings, item.started))
            if item.session_id:
                _add_activity(self.activity, item)
        elif isinstance(item, SessionChange):
            self.sessions.append(_session_row(item))
        else:
            fields = dict(item.fields)
            state, relay = fields.pop("state", "?"), fields.pop("relay", None)
            self.tunnel.append((item.ts, self.run_id, state, relay, json.dumps(fields, default=str)))
        self.count += 1

    def request_rows(self, written: Written) -> list[tuple[Any, ...]]:
        """The `requests` rows as `StoreWriter.commit` inserted them (`_REQUEST_COLUMNS`, ids
        given); made on the reactor thread, and only for someone watching."""
        w, values = _INSERT_REQUEST.width, self.request_values
        return [(written.first + values[i], *values[i + 1:i + w], written.listing_ids.get(values[i]))
                for i in range(0, len(values), w)]


class StoreWriter:
    """Owns the store's connection, used from one thread at a time (the store's)."""

    def __init__(self, db: sqlite3.Connection, run: RunInfo, now: float) -> None:
        self.db = db
        self.run_id = _inserted(db.execute(
            "INSERT INTO runs (started, last_seen, pid, host, version, upstream, listen) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (now, now, os.getpid(), socket.gethostname(), run.version, run.upstream, json.dumps(list(run.listen)))))

    def batch(self) -> Batch:
        return Batch(self.run_id)

    def commit(self, batch: Batch, now: float, dropped: int) -> Written:
        """Write one prepared batch and the run's counters, in one transaction (the store's thread)."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            first = db.execute("SELECT coalesce(max(id), 0) + 1 FROM requests").fetchone()[0]
            _INSERT_REQUEST.run(db, first, batch.request_values)
            _INSERT_EXCHANGE.run(db, first, batch.exchange_values)
            listing_ids = {index: self._listings(listings, first + index, ts) for index, listings, ts in batch.listings}
            db.executemany("UPDATE requests SET listing_id = ? WHERE id = ?",
                           [(listing_id, first + index) for index, listing_id in listing_ids.items()])
            db.executemany(_UPSERT_SESSION, batch.sessions)
            db.executemany("INSERT INTO tunnel_events (ts, run_id, state, relay, detail) VALUES (?, ?, ?, ?, ?)",
                           batch.tunnel)
            db.executemany(_UPSERT_ACTIVITY, [(sid, *values) for sid, values in batch.activity.items()])
            db.execute("UPDATE runs SET last_seen = ?, written = written + ?, dropped = ? WHERE id = ?",
                       (now, batch.count, dropped, self.run_id))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return Written(batch.count, first, listing_ids)

    def write(self, items: Sequence[Item], now: float, dropped: int) -> Written:
        """A batch of `items` made and committed in one go, on one thread: for a store that is not
        being served (tests, tools)."""
        batch = self.batch()
        for item in items:
            batch.add(item)
        return self.commit(batch, now, dropped)

    def heartbeat(self, now: float, dropped: int) -> None:
        """The run is alive (for `mcpr status`), with its drop count."""
        self.db.execute("UPDATE runs SET last_seen = ?, dropped = ? WHERE id = ?", (now, dropped, self.run_id))

    def prune(self, now: float, retain: float, max_size: int) -> int:
        return prune(self.db, now=now, retain=retain, max_size=max_size, keep_run=self.run_id)

    def close(self, now: float, dropped: int) -> None:
        self.db.execute("UPDATE runs SET last_seen = ?, stopped = ?, dropped = ? WHERE id = ?",
                        (now, now, dropped, self.run_id))
        self.db.close()

    def _listings(self, listings: list[Listing], request_id: int, ts: float) -> int:
        """Record each answer that differs from the last one of its method and page; the row
        the request's (first) answer is."""
        ids = [self._listing(listing, request_id, ts) for listing in listings]
        return ids[0]

    def _listing(self, listing: Listing, request_id: int, ts: float) -> int:
        text = json.dumps(listing.result, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        digest = hashlib.sha256(text.encode()).hexdigest()
        cursor = listing.cursor or ""
        last = self.db.execute("SELECT id, digest FROM listings WHERE method = ? AND cursor = ? ORDER BY id DESC "
                               "LIMIT 1", (listing.method, cursor)).fetchone()
        if last is not None and last[1] == digest:
            self.db.execute("UPDATE listings SET last_seen = ?, seen = seen + 1 WHERE id = ?", (ts, last[0]))
            return int(last[0])
        return _inserted(self.db.execute(
            "INSERT INTO listings (method, cursor, digest, result, first_seen, last_seen, seen, first_request) "
            "VALUES (?, ?, ?, ?, ?, ?, 1, ?)", (listing.method, cursor, digest, text, ts, ts, request_id)))


def _inserted(cursor: sqlite3.Cursor) -> int:
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def _request_row(run_id: int, r: RequestRecord) -> tuple[Any, ...]:
    """The columns of `_REQUEST_COLUMNS` but the first (id) and the last (listing_id)."""
    return (r.request_id, run_id, r.started, r.via, r.method, r.path, r.route, r.status, r.outcome,
            r.session_id, r.mcp_method, r.tool, r.resource, r.prompt,
            _json_id(r.jsonrpc_id),
            r.error_code, r.error_message, r.latency_ms, r.upstream_ms, r.downstream_ms, r.bytes_in, r.bytes_out,
            r.client_name, r.client_version)


# One encoder for every row: `json.dumps` with any option builds a new one per call.
_encode_id = json.JSONEncoder(default=str).encode


def _json_id(value: Any) -> str | None:
    """A JSON-RPC id as JSON text: most are integers, whose text is their `str`."""
    if value is None:
        return None
    return str(value) if type(value) is int else _encode_id(value)


def _exchange_row(c: Capture) -> tuple[Any, ...]:
    """The columns of an `exchanges` row but its id: redacted, encoded.

    The bodies as `bytearray`s, stored as the same BLOBs: the sqlite3 module binds a bytearray (as
    an int, a float or a str) at once, but for `bytes` first looks for an adapter, raising and
    clearing an exception per value, in the store's thread with the GIL held (25 `bytes` a row
    took 7.6 µs to bind, 25 bytearrays 1.8)."""
    request_headers, request_type = redact.headers_json(c.request_headers)
    response_headers, response_type = redact.headers_json(c.response_headers)
    return (redact.form(c.query).decode("latin-1"), request_headers, response_headers,
            bytearray(redact.body(c.request_body.data, request_type)),
            bytearray(redact.body(c.response_body.data, response_type)))


def _add_activity(activity: dict[str, list[Any]], r: RequestRecord) -> None:
    """Fold one request into its session's row for this batch: (first, last, via, client, version,
    requests, errors)."""
    assert r.session_id is not None
    end = r.finished if r.finished is not None else r.started
    row = activity.get(r.session_id)
    if row is None:
        activity[r.session_id] = [r.started, end, r.via, r.client_name, r.client_version, 1, int(failed(r))]
        return
    row[0], row[1] = min(row[0], r.started), max(row[1], end)
    row[3], row[4] = row[3] or r.client_name, row[4] or r.client_version
    row[5] += 1
    row[6] += int(failed(r))


def _session_row(change: SessionChange) -> tuple[Any, ...]:
    f = change.fields
    state = f.get("state") or "active"
    return (f["session_id"], f.get("started", change.ts), f.get("last_activity", change.ts),
            None if state == "active" else change.ts, state, f.get("client_name"), f.get("client_version"),
            f.get("server_name"), f.get("server_version"), f.get("protocol_version"))
