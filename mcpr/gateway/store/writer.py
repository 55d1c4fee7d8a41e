"""Batches of records turned into rows, and written in one transaction per batch.

Two halves.  `Batch.add`, on the reactor thread as each item is reported,
keeps a request as one `marshal`led blob of its row's values and its capture;
`commit`, on the store's own thread, makes the rows (redaction, JSON
encoding), gives the ids and writes them, with the `*/list` answers (hashed,
compared with the last one stored).

Why the rows are made in the store's thread (bench/store_cost.py, per-thread
CPU from /proc at c16; docs/PERFORMANCE.md "Event store"): made on the
reactor, they cost the reactor thread +11 % CPU per request, four times what
the same code costs alone.  A batch held a second of requests as ~30 small
objects each, which outlive hundreds of requests' own objects in the same
allocator pools, and every request ran slower for it.  As one blob each they
cost the reactor +1 %, and the store's thread, where they are made and freed
256 at a time, no more than they did on the reactor.  (Earlier, with a
batch five times a second and one statement per row, the opposite was
measured: the GIL handed over per row cost more than the rows; see `Insert`.)
SQLite lets the GIL go while it works, so that part runs beside the reactor.

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
import marshal
import operator
import os
import socket
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

from mcpr.gateway.store import redact
from mcpr.gateway.store.retention import prune
from mcpr.proxy.capture import Listing, RawHeaders
from mcpr.proxy.events import RequestRecord, elapsed_ms


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
    """What one committed batch became: the count of its items written, the id of its first
    request, the `requests` rows as inserted (`_REQUEST_COLUMNS`) when they were asked for (the inspector
    pushes them to its live page without reading them back), and the requests that could not be
    encoded, left out: their count and why the first could not."""

    count: int
    first: int
    rows: list[tuple[Any, ...]] | None = None
    skipped: int = 0
    why: str | None = None


@dataclass(frozen=True)
class RunInfo:
    """The gateway process writing, for `mcpr status`."""

    version: str
    upstream: str
    listen: Sequence[str]


_REQUEST_COLUMNS = ("id, request_id, run_id, started, via, method, path, route, status, outcome, session_id, "
                    "mcp_method, tool, resource, prompt, jsonrpc_id, error_code, error_message, latency_ms, "
                    "upstream_ms, downstream_ms, bytes_in, bytes_out, client_name, client_version, listing_id")
# Requests whose rows are made, then written, at a time in `StoreWriter.commit`: the rows of a
# whole batch (thousands under load, ~30 objects each) would all be alive at once, in the allocator
# the reactor thread shares; a statement's worth are.
ROWS_AT_ONCE = 256
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
    """What was reported since the last batch left, for `StoreWriter.commit`: each request as one
    blob (`_pack`), sessions and tunnel events as their rows (few, and never captured)."""

    run_id: int
    count: int = 0  # the items added
    packed: list[bytes] = field(default_factory=list)  # the requests, as `_pack` made them
    sessions: list[tuple[Any, ...]] = field(default_factory=list)
    tunnel: list[tuple[Any, ...]] = field(default_factory=list)

    def add(self, item: Item) -> None:
        """One item, kept until its batch is written (the reactor thread, once per report; see the
        module's docstring). An item that cannot be kept raises before anything changes."""
        if isinstance(item, RequestRecord):
            self.packed.append(_pack(item))
        elif isinstance(item, SessionChange):
            self.sessions.append(_session_row(item))
        else:
            fields = dict(item.fields)
            state, relay = fields.pop("state", "?"), fields.pop("relay", None)
            self.tunnel.append((item.ts, self.run_id, state, relay, json.dumps(fields, default=str)))
        self.count += 1


@dataclass
class _Rows:
    """A batch's requests as rows (the store's thread), made and written `ROWS_AT_ONCE` at a time
    (`next`): requests without their id (given in the transaction) nor their listing, exchanges
    and listings by the index of their request in the batch."""

    run_id: int
    requests: int = 0
    request_values: list[Any] = field(default_factory=list)  # per request: its index, then its row
    exchange_values: list[Any] = field(default_factory=list)  # per exchange: its request's index, its row
    listings: list[tuple[int, list[Listing], float]] = field(default_factory=list)  # (index, answers, ts)
    activity: dict[str, list[Any]] = field(default_factory=dict)
    skipped: int = 0
    why: str | None = None

    def add(self, blob: bytes) -> None:
        """One request's rows, redacted and encoded; one that cannot be is left out and counted, and
        the rest of its batch is written all the same."""
        # Everything that may fail comes before the first change: a request goes in whole or not at
        # all, and the flat lists stay aligned.
        try:
            fields, capture = marshal.loads(blob)
            row = _request_row(self.run_id, fields)
            exchange = _exchange_row(*capture[:5]) if capture is not None else None
            listings = [Listing(*answer) for answer in capture[5]] if capture is not None else []
        except Exception as e:
            self.skipped += 1
            self.why = self.why or f"{type(e).__name__}: {e}"
            return
        index = self.requests
        self.requests += 1
        self.request_values.append(index)
        self.request_values += row
        if exchange is not None:
            self.exchange_values.append(index)
            self.exchange_values += exchange
        if listings:
            self.listings.append((index, listings, row[_STARTED]))
        if row[_SESSION_ID]:
            _add_activity(self.activity, row, fields[_FINISHED])

    def inserted(self, first: int, listing_ids: dict[int, int]) -> list[tuple[Any, ...]]:
        """The `requests` rows as `StoreWriter.commit` inserted them (`_REQUEST_COLUMNS`, ids given)."""
        w, values = _INSERT_REQUEST.width, self.request_values
        return [(first + values[i], *values[i + 1:i + w], listing_ids.get(values[i]))
                for i in range(0, len(values), w)]

    def next(self) -> None:
        """The rows made so far are written: let them go (the counts and the sessions' rows stay)."""
        self.request_values.clear()
        self.exchange_values.clear()
        self.listings.clear()


class StoreWriter:
    """Owns the store's connection, used from one thread at a time (the store's)."""

    def __init__(self, db: sqlite3.Connection, run: RunInfo, now: float) -> None:
        self.db = db
        self.run_id = _inserted(db.execute(
            "INSERT INTO runs (started, last_seen, pid, host, version, upstream, listen) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (now, now, os.getpid(), socket.gethostname(), run.version, run.upstream, json.dumps(list(run.listen)))))

    @classmethod
    def attach(cls, db: sqlite3.Connection, run_id: int) -> StoreWriter:
        """A writer of a run already begun: the writer process's, whose run the gateway made when
        it opened the store (`EventStore.open`)."""
        writer = cls.__new__(cls)
        writer.db, writer.run_id = db, run_id
        return writer

    def batch(self) -> Batch:
        return Batch(self.run_id)

    def commit(self, batch: Batch, now: float, dropped: int, *, rows: bool = False) -> Written:
        """Make a batch's rows and write them with the run's counters, in one transaction (the
        store's thread); with `rows`, give back the `requests` rows as inserted."""
        made = _Rows(self.run_id)
        inserted: list[tuple[Any, ...]] | None = [] if rows else None
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            first = db.execute("SELECT coalesce(max(id), 0) + 1 FROM requests").fetchone()[0]
            for start in range(0, len(batch.packed), ROWS_AT_ONCE):
                for blob in batch.packed[start:start + ROWS_AT_ONCE]:
                    made.add(blob)
                _INSERT_REQUEST.run(db, first, made.request_values)
                _INSERT_EXCHANGE.run(db, first, made.exchange_values)
                listed = {index: self._listings(answers, first + index, ts) for index, answers, ts in made.listings}
                db.executemany("UPDATE requests SET listing_id = ? WHERE id = ?",
                               [(listing_id, first + index) for index, listing_id in listed.items()])
                if inserted is not None:
                    inserted += made.inserted(first, listed)
                made.next()
            count = batch.count - made.skipped
            db.executemany(_UPSERT_SESSION, batch.sessions)
            db.executemany("INSERT INTO tunnel_events (ts, run_id, state, relay, detail) VALUES (?, ?, ?, ?, ?)",
                           batch.tunnel)
            db.executemany(_UPSERT_ACTIVITY, [(sid, *values) for sid, values in made.activity.items()])
            db.execute("UPDATE runs SET last_seen = ?, written = written + ?, dropped = ? WHERE id = ?",
                       (now, count, dropped + made.skipped, self.run_id))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return Written(count, first, inserted, made.skipped, made.why)

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


# What a request's blob keeps of its record (`_pack`), in this order, as `_request_row` reads it.
_record_fields = operator.attrgetter(
    "request_id", "started", "via", "method", "path", "route", "status", "outcome", "session_id", "mcp_method", "tool",
    "resource", "prompt", "jsonrpc_id", "error_code", "error_message", "headers_at", "finished", "bytes_in",
    "bytes_out", "client_name", "client_version")
_FINISHED = 17


def _pack(r: RequestRecord) -> bytes:
    """A request as `_Rows.add` reads it: its record's fields and its capture, in one blob.

    `marshal` (in C) takes what a record holds (str, bytes, numbers, None, and the parsed JSON of
    the `*/list` answers) and refuses anything else here, on the reactor, as `Batch.add` says."""
    c = r.capture
    capture = None if c is None else (
        c.request_headers, c.response_headers, c.query, c.request_body.data, c.response_body.data,
        [(answer.method, answer.cursor, answer.result) for answer in c.listings] if c.listings else ())
    return marshal.dumps((_record_fields(r), capture))


def _request_row(run_id: int, fields: tuple[Any, ...]) -> tuple[Any, ...]:
    """The columns of `_REQUEST_COLUMNS` but the first (id) and the last (listing_id), from a
    record's `_record_fields`."""
    (request_id, started, via, method, path, route, status, outcome, session_id, mcp_method, tool, resource, prompt,
     jsonrpc_id, error_code, error_message, headers_at, finished, bytes_in, bytes_out, client_name,
     client_version) = fields
    return (request_id, run_id, started, via, method, path, route, status, outcome, session_id, mcp_method, tool,
            resource, prompt, _json_id(jsonrpc_id), error_code, error_message, elapsed_ms(started, finished),
            elapsed_ms(started, headers_at), elapsed_ms(headers_at, finished), bytes_in, bytes_out, client_name,
            client_version)


# Where `_request_row` puts what the store's thread reads back of a request.
_STARTED, _VIA, _STATUS, _OUTCOME, _SESSION_ID, _ERROR_CODE, _CLIENT_NAME, _CLIENT_VERSION = 2, 3, 7, 8, 9, 15, 22, 23


# One encoder for every row: `json.dumps` with any option builds a new one per call.
_encode_id = json.JSONEncoder(default=str).encode


def _json_id(value: Any) -> str | None:
    """A JSON-RPC id as JSON text: most are integers, whose text is their `str`."""
    if value is None:
        return None
    return str(value) if type(value) is int else _encode_id(value)


def _exchange_row(request_headers: RawHeaders, response_headers: RawHeaders, query: bytes, request_body: bytes,
                  response_body: bytes) -> tuple[Any, ...]:
    """The columns of an `exchanges` row but its id: redacted, encoded.

    The bodies as `bytearray`s, stored as the same BLOBs: the sqlite3 module binds a bytearray (as
    an int, a float or a str) at once, but for `bytes` first looks for an adapter, raising and
    clearing an exception per value, with the GIL held (25 `bytes` a row took 7.6 µs to bind, 25
    bytearrays 1.8)."""
    request_json, request_type = redact.headers_json(request_headers)
    response_json, response_type = redact.headers_json(response_headers)
    return (redact.form(query).decode("latin-1"), request_json, response_json,
            bytearray(redact.body(request_body, request_type)),
            bytearray(redact.body(response_body, response_type)))


def _add_activity(activity: dict[str, list[Any]], row: tuple[Any, ...], finished: float | None) -> None:
    """Fold one request (its `_request_row`) into its session's row for this batch: (first, last,
    via, client, version, requests, errors)."""
    started, session_id = row[_STARTED], row[_SESSION_ID]
    end = finished if finished is not None else started
    # Whether it counts as an error: the Python twin of `queries.failed_sql`.
    error = int(row[_OUTCOME] != "ok" or (row[_STATUS] or 0) >= 400 or row[_ERROR_CODE] is not None)
    current = activity.get(session_id)
    if current is None:
        activity[session_id] = [started, end, row[_VIA], row[_CLIENT_NAME], row[_CLIENT_VERSION], 1, error]
        return
    current[0], current[1] = min(current[0], started), max(current[1], end)
    current[3], current[4] = current[3] or row[_CLIENT_NAME], current[4] or row[_CLIENT_VERSION]
    current[5] += 1
    current[6] += error


def _session_row(change: SessionChange) -> tuple[Any, ...]:
    f = change.fields
    state = f.get("state") or "active"
    return (f["session_id"], f.get("started", change.ts), f.get("last_activity", change.ts),
            None if state == "active" else change.ts, state, f.get("client_name"), f.get("client_version"),
            f.get("server_name"), f.get("server_version"), f.get("protocol_version"))
