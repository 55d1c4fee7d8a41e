"""The store's thread side: batches of records turned into rows, one transaction per batch.

Everything here runs on the store's own thread, never on the reactor:
redaction, JSON encoding, hashing `*/list` answers, and SQLite itself.  The
reactor side (`recorder.py`) only hands over lists of the objects the proxy
made, which nobody changes once reported.

A batch is one `BEGIN IMMEDIATE ... COMMIT`: under load a batch holds
hundreds of requests, so the cost of a commit is shared, and `executemany`
keeps the per-row work in C.  Request ids are given here, inside the
transaction that holds the write lock, so that the row in `requests` and the
one in `exchanges` get the same id even when another gateway of the same
project writes to the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
from dataclasses import dataclass
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
    """What one batch wrote: the count of items, and the `requests` rows as inserted (in the order
    of `_REQUEST_COLUMNS`, ids given), which the inspector pushes to its live page without reading
    them back."""

    count: int
    requests: list[tuple[Any, ...]]


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
_INSERT_REQUEST = f"INSERT INTO requests ({_REQUEST_COLUMNS}) VALUES ({', '.join('?' * 26)})"
_INSERT_EXCHANGE = ("INSERT INTO exchanges (id, query, request_headers, response_headers, request_body, "
                    "response_body) VALUES (?, ?, ?, ?, ?, ?)")
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


class StoreWriter:
    """Owns the store's connection, used from one thread at a time (the store's)."""

    def __init__(self, db: sqlite3.Connection, run: RunInfo, now: float) -> None:
        self.db = db
        self.run_id = _inserted(db.execute(
            "INSERT INTO runs (started, last_seen, pid, host, version, upstream, listen) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (now, now, os.getpid(), socket.gethostname(), run.version, run.upstream, json.dumps(list(run.listen)))))

    def write(self, items: Sequence[Item], now: float, dropped: int) -> Written:
        """Write one batch and the run's counters."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            next_id = db.execute("SELECT coalesce(max(id), 0) + 1 FROM requests").fetchone()[0]
            requests, exchanges = [], []
            activity: dict[str, list[Any]] = {}
            for item in items:
                if isinstance(item, RequestRecord):
                    listing_id = self._listings(item.capture.listings, next_id, item.started) \
                        if item.capture is not None and item.capture.listings else None
                    requests.append(_request_row(next_id, self.run_id, item, listing_id))
                    if item.capture is not None:
                        exchanges.append(_exchange_row(next_id, item.capture))
                    if item.session_id:
                        _add_activity(activity, item)
                    next_id += 1
                elif isinstance(item, SessionChange):
                    db.execute(_UPSERT_SESSION, _session_row(item))
                else:
                    fields = dict(item.fields)
                    state, relay = fields.pop("state", "?"), fields.pop("relay", None)
                    db.execute("INSERT INTO tunnel_events (ts, run_id, state, relay, detail) VALUES (?, ?, ?, ?, ?)",
                               (item.ts, self.run_id, state, relay, json.dumps(fields, default=str)))
            db.executemany(_INSERT_REQUEST, requests)
            db.executemany(_INSERT_EXCHANGE, exchanges)
            db.executemany(_UPSERT_ACTIVITY, [(sid, *values) for sid, values in activity.items()])
            db.execute("UPDATE runs SET last_seen = ?, written = written + ?, dropped = ? WHERE id = ?",
                       (now, len(items), dropped, self.run_id))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return Written(len(items), requests)

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


def _request_row(row_id: int, run_id: int, r: RequestRecord, listing_id: int | None) -> tuple[Any, ...]:
    return (row_id, r.request_id, run_id, r.started, r.via, r.method, r.path, r.route, r.status, r.outcome,
            r.session_id, r.mcp_method, r.tool, r.resource, r.prompt,
            None if r.jsonrpc_id is None else json.dumps(r.jsonrpc_id, default=str),
            r.error_code, r.error_message, r.latency_ms, r.upstream_ms, r.downstream_ms, r.bytes_in, r.bytes_out,
            r.client_name, r.client_version, listing_id)


def _content_type(headers: list[list[str]]) -> str | None:
    return next((value for name, value in headers if name == "content-type"), None)


def _exchange_row(row_id: int, c: Capture) -> tuple[Any, ...]:
    request_headers, response_headers = redact.headers(c.request_headers), redact.headers(c.response_headers)
    return (row_id, redact.form(c.query).decode("latin-1"),
            json.dumps(request_headers, ensure_ascii=False), json.dumps(response_headers, ensure_ascii=False),
            redact.body(c.request_body.data, _content_type(request_headers)),
            redact.body(c.response_body.data, _content_type(response_headers)))


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
