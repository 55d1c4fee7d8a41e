"""Questions asked of the event store: the one read API of the query commands and the inspector.

Every function takes an open `sqlite3.Connection` (`schema.open_reader` for a
store a gateway is writing; any connection in tests) and returns plain
dataclasses whose `as_dict()` is JSON-ready, so that a command line and a web
page can show the same answers.  Nothing here writes, and every query is
bounded by a `limit` and served by an index, so that a page stays fast with
100,000 requests stored.

`Filters` select requests; the commands that aggregate (sessions, clients,
status, schema) aggregate the requests selected.  Requests are paged by id:
ids grow in the order requests ended, so "the next ones" are `after=` the
last id seen, and "older ones" are `before=` the first.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from fnmatch import fnmatchcase
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from mcpr.gateway.store.schema import SCHEMA_VERSION
from mcpr.proxy.events import timestamp
from mcpr.proxy.sessions import IDLE_TIMEOUT
from mcpr.proxy.sse import SSEParser



def failed_sql(p: str = "") -> str:
    """Whether a request (of table alias `p`) counts as failed; `writer._add_activity` has its Python twin.
    Without an alias, migration 2's partial index `requests_failed` is on exactly this text."""
    return f"({p}outcome != 'ok' OR coalesce({p}status, 0) >= 400 OR {p}error_code IS NOT NULL)"


def timeout_sql(p: str = "") -> str:
    """Whether a request timed out upstream (the gateway's 504, JSON-RPC -32001)."""
    return f"({p}outcome = 'upstream-timeout' OR {p}error_code = -32001)"


STATUSES = ("ok", "error", "timeout")
# A run that has not written for this long is no longer running (three missed heartbeats).
RUN_SILENCE = 90.0


class QueryError(Exception):
    """A question the store cannot answer as asked (an unknown or ambiguous session, say)."""


def _match(column: str, pattern: str, params: list[Any]) -> str:
    """Equality, or a glob when `pattern` holds one (`tools/*`)."""
    params.append(pattern)
    return f"{column} GLOB ?" if any(c in pattern for c in "*?[") else f"{column} = ?"


def _prefix(column: str, prefix: str, params: list[Any]) -> str:
    """`column` starts with `prefix`, as a range the column's index serves."""
    params += [prefix, prefix + "\U0010ffff"]
    return f"({column} >= ? AND {column} < ?)"


@dataclass(frozen=True)
class Filters:
    """Which requests: every field set must hold (`None` means any).

    `tool` and `method` (the MCP method) match exactly, or as a glob when they
    hold `*`, `?` or `[`; `session` is a prefix of the session id; `status` is
    `ok`, `error` (anything not ok: an HTTP error status, a JSON-RPC error, or
    an exchange that broke off) or `timeout` (the upstream did not answer in time).
    `session_id` is one whole session id: the inspector's grouping, which the
    `(session_id, id)` index serves in id order, where a prefix needs a sort.
    """

    since: float | None = None
    until: float | None = None
    tool: str | None = None
    method: str | None = None
    session: str | None = None
    status: str | None = None
    error_code: int | None = None
    via: str | None = None
    session_id: str | None = None

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in STATUSES:
            raise QueryError(f"status: expected one of {', '.join(STATUSES)}, got {self.status!r}")

    @property
    def about_requests(self) -> bool:
        """Whether anything beyond time and session is asked for."""
        return any(v is not None for v in (self.tool, self.method, self.status, self.error_code, self.via))

    def where(self, alias: str = "") -> tuple[str, list[Any]]:
        """The SQL condition on `requests` (as `alias`, if given) and its parameters."""
        p = f"{alias}." if alias else ""
        clauses: list[str] = []
        params: list[Any] = []
        if self.since is not None:
            clauses.append(f"{p}started >= ?")
            params.append(self.since)
        if self.until is not None:
            clauses.append(f"{p}started < ?")
            params.append(self.until)
        if self.tool is not None:
            clauses.append(_match(f"{p}tool", self.tool, params))
        if self.method is not None:
            clauses.append(_match(f"{p}mcp_method", self.method, params))
        if self.session is not None:
            clauses.append(_prefix(f"{p}session_id", self.session, params))
        if self.session_id is not None:
            clauses.append(f"{p}session_id = ?")
            params.append(self.session_id)
        if self.status is not None:
            clauses.append({"ok": f"NOT {failed_sql(p)}", "error": failed_sql(p), "timeout": timeout_sql(p)}[self.status])
        if self.error_code is not None:
            clauses.append(f"{p}error_code = ?")
            params.append(self.error_code)
        if self.via is not None:
            clauses.append(f"{p}via = ?")
            params.append(self.via)
        return " AND ".join(clauses) or "1", params

    def matches(self, row: RequestRow) -> bool:
        """Whether `row` is selected: `where`'s Python twin, for requests pushed live before anyone
        reads them back (globs as GLOB reads them, through `fnmatchcase`)."""
        def match(value: str | None, pattern: str | None) -> bool:
            if pattern is None:
                return True
            if value is None:
                return False
            return fnmatchcase(value, pattern) if any(c in pattern for c in "*?[") else value == pattern

        status = {None: True, "ok": not row.failed, "error": row.failed, "timeout": row.timed_out}[self.status]
        return (status and match(row.tool, self.tool) and match(row.mcp_method, self.method)
                and (self.session is None or (row.session_id is not None and row.session_id.startswith(self.session)))
                and (self.session_id is None or row.session_id == self.session_id)
                and (self.since is None or row.started >= self.since)
                and (self.until is None or row.started < self.until)
                and (self.error_code is None or row.error_code == self.error_code)
                and (self.via is None or row.via == self.via))


# -- requests


_REQUEST_FIELDS = ("id", "request_id", "started", "via", "method", "path", "route", "status", "outcome",
                   "session_id", "mcp_method", "tool", "resource", "prompt", "jsonrpc_id", "error_code",
                   "error_message", "latency_ms", "upstream_ms", "downstream_ms", "bytes_in", "bytes_out",
                   "client_name", "client_version", "listing_id")
_REQUEST_SELECT = ", ".join(_REQUEST_FIELDS)


@dataclass(frozen=True)
class RequestRow:
    """One request as listed: its line, its outcome, its timings and its JSON-RPC summary."""

    id: int
    request_id: str
    started: float
    via: str
    method: str
    path: str
    route: str
    status: int | None
    outcome: str
    session_id: str | None
    mcp_method: str | None
    tool: str | None
    resource: str | None
    prompt: str | None
    jsonrpc_id: Any
    error_code: int | None
    error_message: str | None
    latency_ms: float | None
    upstream_ms: float | None
    downstream_ms: float | None
    bytes_in: int
    bytes_out: int
    client_name: str | None
    client_version: str | None
    listing_id: int | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> RequestRow:
        values = list(row)
        values[14] = json.loads(values[14]) if values[14] is not None else None
        return cls(*values)

    @property
    def failed(self) -> bool:
        return self.outcome != "ok" or (self.status or 0) >= 400 or self.error_code is not None

    @property
    def timed_out(self) -> bool:
        """`timeout_sql`'s Python twin."""
        return self.outcome == "upstream-timeout" or self.error_code == -32001

    @property
    def target(self) -> str | None:
        """The tool, resource or prompt the request was about."""
        return self.tool or self.resource or self.prompt

    def as_dict(self) -> dict[str, Any]:
        """The shape of a `request` line of `--events`, plus `id` and `started` (seconds)."""
        return {"id": self.id, "ts": timestamp(self.started), **asdict(self)}


def requests(db: sqlite3.Connection, filters: Filters = Filters(), *, before: int | None = None,
             after: int | None = None, limit: int = 100) -> list[RequestRow]:
    """Requests matching `filters`, oldest first: the `limit` newest ones below id `before` (or of
    all), or, with `after`, the `limit` oldest ones above that id (to follow new ones)."""
    where, params = filters.where()
    if after is not None:
        rows = db.execute(f"SELECT {_REQUEST_SELECT} FROM requests WHERE id > ? AND {where} ORDER BY id LIMIT ?",
                          [after, *params, limit]).fetchall()
    else:
        bound = "id < ? AND " if before is not None else ""
        rows = db.execute(f"SELECT {_REQUEST_SELECT} FROM requests WHERE {bound}{where} ORDER BY id DESC LIMIT ?",
                          [*([before] if before is not None else []), *params, limit]).fetchall()
        rows.reverse()
    return [RequestRow.from_row(r) for r in rows]


def last_id(db: sqlite3.Connection) -> int:
    """The newest request's id (0 when there is none): where following starts."""
    return int(db.execute("SELECT coalesce(max(id), 0) FROM requests").fetchone()[0])


def slow(db: sqlite3.Connection, filters: Filters = Filters(), *, threshold_ms: float,
         limit: int = 20) -> list[RequestRow]:
    """The slowest requests at or above `threshold_ms`, slowest first.  Standalone SSE streams
    (`GET`, open as long as the session) are left out: their length is not slowness."""
    where, params = filters.where()
    rows = db.execute(f"SELECT {_REQUEST_SELECT} FROM requests WHERE latency_ms >= ? AND route != 'mcp-stream' "
                      f"AND {where} ORDER BY latency_ms DESC LIMIT ?", [threshold_ms, *params, limit]).fetchall()
    return [RequestRow.from_row(r) for r in rows]


@dataclass(frozen=True)
class Body:
    """A captured body: the bytes kept (redacted), and whether the cap cut it."""

    data: bytes
    size: int
    content_type: str | None

    @property
    def truncated(self) -> bool:
        return self.size > len(self.data)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    @property
    def json(self) -> Any:
        """The body's JSON value, when it was kept whole and is JSON; else None."""
        if self.truncated or not self.data:
            return None
        try:
            return json.loads(self.data)
        except ValueError:
            return None

    @property
    def events(self) -> list[dict[str, Any]] | None:
        """An SSE body's events, one by one (`data` parsed when it is JSON); None if not SSE."""
        if self.content_type is None or self.content_type.split(";", 1)[0].strip().lower() != "text/event-stream":
            return None
        out = []
        for event in SSEParser(max(len(self.data), 1)).feed(self.data):
            try:
                value: Any = json.loads(event.data) if event.data else None
            except ValueError:
                value = None
            out.append({"event": event.event, "id": event.id, "data": event.data, "json": value})
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "size": self.size, "kept": len(self.data), "truncated": self.truncated,
                "content_type": self.content_type, "json": self.json, "events": self.events}


@dataclass(frozen=True)
class RequestDetail:
    """Everything kept of one request: the row, the request line, headers, bodies."""

    request: RequestRow
    query: str
    request_headers: list[list[str]]
    response_headers: list[list[str]]
    request_body: Body
    response_body: Body

    @property
    def target(self) -> str:
        """The request line's target: the path and (redacted) query."""
        return self.request.path + (f"?{self.query}" if self.query else "")

    def as_dict(self) -> dict[str, Any]:
        return {**self.request.as_dict(), "target": self.target, "query": self.query,
                "request_headers": self.request_headers, "response_headers": self.response_headers,
                "request_body": self.request_body.as_dict(), "response_body": self.response_body.as_dict()}


def _content_type(headers: list[list[str]]) -> str | None:
    return next((value for name, value in headers if name == "content-type"), None)


def request_detail(db: sqlite3.Connection, request_id: int) -> RequestDetail | None:
    """One request with its exchange; None if no such id (or it was pruned)."""
    row = db.execute(f"SELECT {_REQUEST_SELECT} FROM requests WHERE id = ?", (request_id,)).fetchone()
    if row is None:
        return None
    request = RequestRow.from_row(row)
    exchange = db.execute("SELECT query, request_headers, response_headers, request_body, response_body "
                          "FROM exchanges WHERE id = ?", (request_id,)).fetchone()
    query, sent, got, sent_body, got_body = exchange if exchange is not None else ("", "[]", "[]", b"", b"")
    sent_headers, got_headers = json.loads(sent), json.loads(got)
    return RequestDetail(request, query, sent_headers, got_headers,
                         Body(bytes(sent_body), request.bytes_in, _content_type(sent_headers)),
                         Body(bytes(got_body), request.bytes_out, _content_type(got_headers)))


# -- sessions and clients


@dataclass(frozen=True)
class SessionRow:
    id: str
    first_seen: float
    last_activity: float
    ended: float | None
    state: str
    via: str | None
    client_name: str | None
    client_version: str | None
    server_name: str | None
    server_version: str | None
    protocol_version: str | None
    requests: int
    errors: int
    active: bool

    def as_dict(self) -> dict[str, Any]:
        return {"session_id": self.id, **{k: v for k, v in asdict(self).items() if k != "id"},
                "first_seen_ts": timestamp(self.first_seen), "last_activity_ts": timestamp(self.last_activity)}


_SESSION_FIELDS = ("id", "first_seen", "last_activity", "ended", "state", "via", "client_name", "client_version",
                   "server_name", "server_version", "protocol_version", "requests", "errors")
_SESSION_SELECT = ", ".join(f"s.{name}" for name in _SESSION_FIELDS)


def _session_rows(rows: Iterable[Sequence[Any]], now: float) -> list[SessionRow]:
    out = []
    for row in rows:
        values = dict(zip(_SESSION_FIELDS, row))
        out.append(SessionRow(**values, active=values["state"] == "active"
                              and values["last_activity"] >= now - IDLE_TIMEOUT))
    return out


def _session_where(filters: Filters, active: bool, now: float) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if filters.since is not None:
        clauses.append("s.last_activity >= ?")
        params.append(filters.since)
    if filters.until is not None:
        clauses.append("s.first_seen < ?")
        params.append(filters.until)
    if filters.session is not None:
        clauses.append(_prefix("s.id", filters.session, params))
    if filters.about_requests:
        where, more = Filters(tool=filters.tool, method=filters.method, status=filters.status,
                              error_code=filters.error_code, via=filters.via, since=filters.since,
                              until=filters.until).where("r")
        clauses.append(f"EXISTS (SELECT 1 FROM requests r WHERE r.session_id = s.id AND {where})")
        params += more
    if active:
        clauses.append("s.state = 'active' AND s.last_activity >= ?")
        params.append(now - IDLE_TIMEOUT)
    return " AND ".join(clauses) or "1", params


def sessions(db: sqlite3.Connection, filters: Filters = Filters(), *, now: float, active: bool = False,
             limit: int = 100) -> list[SessionRow]:
    """Sessions, the most recently active first: those active within `filters`' time span and, if
    the filters ask about requests, with at least one such request; `active` only those not ended
    nor idle for longer than the gateway's session timeout."""
    where, params = _session_where(filters, active, now)
    rows = db.execute(f"SELECT {_SESSION_SELECT} FROM sessions s WHERE {where} ORDER BY s.last_activity DESC "
                      "LIMIT ?", [*params, limit]).fetchall()
    return _session_rows(rows, now)


def session(db: sqlite3.Connection, prefix: str, *, now: float) -> SessionRow:
    """The one session whose id starts with `prefix`; `QueryError` if none or several do."""
    params: list[Any] = []
    rows = db.execute(f"SELECT {_SESSION_SELECT} FROM sessions s WHERE {_prefix('s.id', prefix, params)} LIMIT 6",
                      params).fetchall()
    if not rows:
        raise QueryError(f"no session starts with {prefix!r}")
    if len(rows) > 1:
        shown = ", ".join(r[0] for r in rows[:5])
        raise QueryError(f"{len(rows) if len(rows) < 6 else 'more than 5'} sessions start with {prefix!r} "
                         f"({shown}{', ...' if len(rows) > 5 else ''}): give more of the id")
    return _session_rows(rows, now)[0]


@dataclass(frozen=True)
class ClientRow:
    """One client (name and version, as its `initialize` said) and what it did."""

    client_name: str | None
    client_version: str | None
    sessions: int
    requests: int
    errors: int
    first_seen: float
    last_seen: float
    via: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "first_seen_ts": timestamp(self.first_seen), "last_seen_ts": timestamp(self.last_seen)}


def clients(db: sqlite3.Connection, filters: Filters = Filters(), *, limit: int = 100) -> list[ClientRow]:
    """The clients of the requests matching `filters`, the most recently seen first; a request
    that did not say (no session, or one from before this store) counts under its session's client."""
    where, params = filters.where("r")
    rows = db.execute(
        "SELECT coalesce(r.client_name, s.client_name) AS name, coalesce(r.client_version, s.client_version) AS v, "
        f"count(DISTINCT r.session_id), count(*), sum({failed_sql('r.')}), "
        "min(r.started), max(r.started), group_concat(DISTINCT r.via) "
        f"FROM requests r LEFT JOIN sessions s ON s.id = r.session_id WHERE {where} "
        "GROUP BY name, v ORDER BY max(r.started) DESC LIMIT ?", [*params, limit]).fetchall()
    return [ClientRow(name, version, n_sessions, n, int(errors or 0), first, last, sorted((via or "").split(",")))
            for name, version, n_sessions, n, errors, first, last, via in rows]


# -- status


@dataclass(frozen=True)
class RunRow:
    """One gateway process that wrote to the store."""

    id: int
    started: float
    last_seen: float
    stopped: float | None
    pid: int
    host: str
    version: str
    upstream: str
    listen: list[str]
    written: int
    dropped: int
    running: bool
    tunnel: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Traffic:
    """What the requests matching the filters add up to."""

    requests: int
    errors: int
    timeouts: int
    p50_ms: float | None
    p95_ms: float | None
    max_ms: float | None
    sessions: int
    first: float | None
    last: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Status:
    schema_version: int
    size_bytes: int
    stored_requests: int
    oldest: float | None
    active_sessions: int
    run: RunRow | None
    traffic: Traffic

    def as_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k not in ("run", "traffic")},
                "run": self.run.as_dict() if self.run else None, "traffic": self.traffic.as_dict()}


def _alive(pid: int, host: str) -> bool:
    """Whether process `pid` exists, when it is on this machine (else assume so)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _percentile(db: sqlite3.Connection, where: str, params: list[Any], count: int, fraction: float) -> float | None:
    if count == 0:
        return None
    offset = min(count - 1, int(count * fraction))
    row = db.execute(f"SELECT latency_ms FROM requests WHERE latency_ms IS NOT NULL AND {where} "
                     "ORDER BY latency_ms LIMIT 1 OFFSET ?", [*params, offset]).fetchone()
    return row[0] if row else None


def traffic(db: sqlite3.Connection, filters: Filters = Filters()) -> Traffic:
    """Counts and latency percentiles of the requests matching `filters` (SSE streams left out
    of the latencies, as in `slow`)."""
    where, params = filters.where()
    n, errors, timeouts, sessions_seen, first, last, highest = db.execute(
        f"SELECT count(*), sum({failed_sql()}), sum({timeout_sql()}), count(DISTINCT session_id), min(started), max(started), "
        f"max(CASE WHEN route != 'mcp-stream' THEN latency_ms END) FROM requests WHERE {where}", params).fetchone()
    timed = f"route != 'mcp-stream' AND {where}"
    answered = db.execute(f"SELECT count(*) FROM requests WHERE latency_ms IS NOT NULL AND {timed}",
                          params).fetchone()[0]
    return Traffic(n, int(errors or 0), int(timeouts or 0), _percentile(db, timed, params, answered, 0.5),
                   _percentile(db, timed, params, answered, 0.95), highest, sessions_seen, first, last)


def latest_run(db: sqlite3.Connection, *, now: float) -> RunRow | None:
    """The gateway that wrote last, whether it still runs, and its tunnel's last state."""
    row = db.execute("SELECT id, started, last_seen, stopped, pid, host, version, upstream, listen, written, dropped "
                     "FROM runs ORDER BY last_seen DESC, id DESC LIMIT 1").fetchone()
    if row is None:
        return None
    run_id, started, last_seen, stopped, pid, host, version, upstream, listen, written, dropped = row
    running = stopped is None and now - last_seen < RUN_SILENCE and _alive(pid, host)
    event = db.execute("SELECT ts, state, relay, detail FROM tunnel_events WHERE run_id = ? ORDER BY id DESC LIMIT 1",
                       (run_id,)).fetchone()
    url = db.execute("SELECT detail FROM tunnel_events WHERE run_id = ? AND state = 'connected' ORDER BY id DESC "
                     "LIMIT 1", (run_id,)).fetchone()
    tunnel = None if event is None else {"ts": event[0], "state": event[1], "relay": event[2],
                                         "url": json.loads(url[0]).get("url") if url else None,
                                         **json.loads(event[3])}
    return RunRow(run_id, started, last_seen, stopped, pid, host, version, upstream, json.loads(listen), written,
                  dropped, running, tunnel)


def status(db: sqlite3.Connection, filters: Filters = Filters(), *, now: float) -> Status:
    """The store, the gateway writing it, and the traffic matching `filters`."""
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    page = db.execute("PRAGMA page_size").fetchone()[0]
    stored, oldest = db.execute("SELECT count(*), min(started) FROM requests").fetchone()
    active = db.execute("SELECT count(*) FROM sessions WHERE state = 'active' AND last_activity >= ?",
                        (now - IDLE_TIMEOUT,)).fetchone()[0]
    return Status(SCHEMA_VERSION, pages * page, stored, oldest, active, latest_run(db, now=now), traffic(db, filters))


# -- schema: the `*/list` answers


# Where each list method puts its items, and the field that names an item.
LIST_ITEMS = {"tools/list": ("tools", "name"), "prompts/list": ("prompts", "name"),
              "resources/list": ("resources", "uri"), "resources/templates/list": ("resourceTemplates", "uriTemplate")}


def items_of(method: str, result: Any) -> dict[str, dict[str, Any]]:
    """The named items of a list answer, by name, in their order."""
    key, name = LIST_ITEMS.get(method, ("", ""))
    values = result.get(key) if isinstance(result, dict) else None
    if not isinstance(values, list):
        return {}
    return {str(item[name]): item for item in values if isinstance(item, dict) and name in item}


@dataclass(frozen=True)
class ListingRow:
    """One distinct answer to a list method (for one page of it), and how often it was given."""

    id: int
    method: str
    cursor: str
    first_seen: float
    last_seen: float
    seen: int
    first_request: int | None
    result: Any

    @property
    def items(self) -> dict[str, dict[str, Any]]:
        return items_of(self.method, self.result)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "first_seen_ts": timestamp(self.first_seen),
                "last_seen_ts": timestamp(self.last_seen), "names": list(self.items)}


_LISTING_FIELDS = ("id", "method", "cursor", "first_seen", "last_seen", "seen", "first_request", "result")


def _listing_where(filters: Filters) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if filters.method is not None:
        clauses.append(_match("method", filters.method, params))
    if filters.since is not None:
        clauses.append("last_seen >= ?")
        params.append(filters.since)
    if filters.until is not None:
        clauses.append("first_seen < ?")
        params.append(filters.until)
    if filters.session is not None or filters.status is not None or filters.error_code is not None \
            or filters.via is not None:
        where, more = Filters(session=filters.session, status=filters.status, error_code=filters.error_code,
                              via=filters.via).where()
        clauses.append(f"id IN (SELECT listing_id FROM requests WHERE listing_id IS NOT NULL AND {where})")
        params += more
    return " AND ".join(clauses) or "1", params


def listings(db: sqlite3.Connection, filters: Filters = Filters(), *, latest: bool = False,
             limit: int = 100) -> list[ListingRow]:
    """Distinct list answers matching `filters` (`method`, time, and the requests that got them),
    oldest first; `latest`: only the newest of those of each method and page."""
    where, params = _listing_where(filters)
    if latest:
        where, params = f"id IN (SELECT max(id) FROM listings WHERE {where} GROUP BY method, cursor)", params
    rows = db.execute(f"SELECT {', '.join(_LISTING_FIELDS)} FROM listings WHERE {where} ORDER BY id DESC LIMIT ?",
                      [*params, limit]).fetchall()
    out = []
    for row in reversed(rows):
        values = dict(zip(_LISTING_FIELDS, row))
        values["result"] = json.loads(values["result"])
        out.append(ListingRow(**values))
    return out


@dataclass(frozen=True)
class ItemChange:
    """How one item (a tool, prompt, resource) differs between two answers."""

    name: str
    fields: list[str]  # the item's top-level fields that changed
    properties_added: list[str] = field(default_factory=list)  # of a tool's input schema
    properties_removed: list[str] = field(default_factory=list)
    properties_changed: list[str] = field(default_factory=list)
    required_added: list[str] = field(default_factory=list)
    required_removed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SchemaChange:
    """What an answer changed against the previous answer of the same method and page."""

    method: str
    cursor: str
    ts: float
    listing_id: int
    previous_id: int | None
    added: list[str]
    removed: list[str]
    changed: list[ItemChange]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ts_iso": timestamp(self.ts)}


def schema_parts(schema: Any) -> tuple[dict[str, Any], set[str]]:
    schema = schema if isinstance(schema, dict) else {}
    properties = schema.get("properties")
    required = schema.get("required")
    return (properties if isinstance(properties, dict) else {},
            {r for r in required if isinstance(r, str)} if isinstance(required, list) else set())


def compare_items(name: str, before: dict[str, Any], after: dict[str, Any]) -> ItemChange | None:
    """The difference between two versions of an item, None if there is none."""
    fields = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if not fields:
        return None
    if "inputSchema" not in fields:
        return ItemChange(name, fields)
    old, old_required = schema_parts(before.get("inputSchema"))
    new, new_required = schema_parts(after.get("inputSchema"))
    return ItemChange(name, fields, sorted(new.keys() - old.keys()), sorted(old.keys() - new.keys()),
                      sorted(k for k in old.keys() & new.keys() if old[k] != new[k]),
                      sorted(new_required - old_required), sorted(old_required - new_required))


def schema_changes(db: sqlite3.Connection, filters: Filters = Filters(), *, limit: int = 100) -> list[SchemaChange]:
    """Each answer that differed from the previous one of its method and page, oldest first, with
    the items added, removed and changed (`filters.tool`: only changes of that item); the first
    answer of each method and page is all additions."""
    where, params = _listing_where(Filters(method=filters.method, session=filters.session, status=filters.status,
                                           error_code=filters.error_code, via=filters.via))
    rows = db.execute("SELECT id, method, cursor, first_seen, result FROM listings "
                      f"WHERE {where} ORDER BY id", params).fetchall()
    previous: dict[tuple[str, str], tuple[int, dict[str, dict[str, Any]]]] = {}
    changes = []
    for listing_id, method, cursor, first_seen, result in rows:
        items = items_of(method, json.loads(result))
        before_id, before = previous.get((method, cursor), (None, {}))
        previous[(method, cursor)] = (listing_id, items)
        keep = (lambda n: True) if filters.tool is None else (lambda n: n == filters.tool)
        added = [n for n in items if n not in before and keep(n)]
        removed = [n for n in before if n not in items and keep(n)]
        changed = [c for n in items if n in before and keep(n)
                   for c in [compare_items(n, before[n], items[n])] if c is not None]
        in_span = (filters.since is None or first_seen >= filters.since) and \
            (filters.until is None or first_seen < filters.until)
        if (added or removed or changed) and in_span:
            changes.append(SchemaChange(method, cursor, first_seen, listing_id, before_id, added, removed, changed))
    return changes[-limit:]
