"""The inspector's twisted.web resource: the page, its JSON API, the live feed and replay.

Hostile by default, though it listens on loopback only: any web page the
user opens can make the browser send requests to `127.0.0.1:4040`, and a
rebinding DNS name can make them look same-origin.  So every request must
name a loopback host in `Host` (403 otherwise), a POST must be JSON from the
page's own origin (a cross-site form cannot send that without a preflight,
which is never granted), and captured text, which whoever called the MCP
server wrote, is only ever put in the page as text (see `static/inspector.js`;
the page's CSP allows no inline script).  Every parameter is checked, and a
bad one is a 400 with a one-line JSON error.

Every read of the store goes to the reader thread (`reader.StoreReader`).

The API (JSON; the list and the feed take the filters `tool`, `method`,
`status` = ok|error|timeout, `session` = a session id):

- `GET /api/info`: the gateway, its upstream and its store;
- `GET /api/requests?before=ID&limit=N`: the newest requests below `before`
  (a keyset cursor: the response's `older`), newest first, and `last_id`,
  the newest id when the first page was read, from which to follow;
- `GET /api/requests/ID`: one request's detail (headers, bodies, SSE events);
- `POST /api/requests/ID/replay` `{"body"?: str, "headers"?: [[name, value]]}`: replay it;
- `GET /api/sessions?limit=N`: sessions, the most recently active first;
- `GET /api/live?after=ID`: Server-Sent Events, one `request` event per new request.
"""

from __future__ import annotations

import ipaddress
import json
import sqlite3
from dataclasses import dataclass
from importlib import resources
from typing import Any, Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mcpr.common.failures import describe
from mcpr.common.web import is_json
from mcpr.gateway.inspector.feed import LiveFeed, request_json
from mcpr.gateway.inspector.replay import ReplayError, Replayer, prepare
from mcpr.gateway.store import queries
from mcpr.gateway.store.queries import Filters, QueryError, RequestRow

log = Logger()

Ask = Callable[[Callable[[sqlite3.Connection], Any]], Deferred[Any]]

MAX_LIMIT = 500
DEFAULT_LIMIT = 100
MAX_TEXT = 200  # a filter's value
FILTER_PARAMETERS = ("tool", "method", "status", "session")

PAGE_CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
            b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

# The page's files, by the path they are served at: the only files served.
STATIC = {
    b"/": ("index.html", b"text/html; charset=utf-8"),
    b"/static/inspector.js": ("inspector.js", b"text/javascript; charset=utf-8"),
    b"/static/inspector.css": ("inspector.css", b"text/css; charset=utf-8"),
}


def load_static() -> dict[bytes, tuple[bytes, bytes]]:
    """The page's files from the package (read once, at start: they are small and never change)."""
    folder = resources.files("mcpr.gateway.inspector") / "static"
    return {path: ((folder / name).read_bytes(), kind) for path, (name, kind) in STATIC.items()}


def loopback_host(value: bytes | None) -> bool:
    """Whether a `Host` header names this machine: `localhost`, `*.localhost`, 127.0.0.0/8 or
    `[::1]`, with any port."""
    if not value:
        return False
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        name, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return False
    else:
        name, colon, port = text.rpartition(":") if ":" in text else (text, "", "")
        if colon and not port.isdigit():
            return False
    name = name.rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class BadRequest(Exception):
    """A 400 (or the status given), said in one line."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ListQuery:
    filters: Filters
    before: int | None
    limit: int


def _args(request: Request) -> dict[bytes, list[bytes]]:
    return request.args or {}


def _one(request: Request, name: str) -> str | None:
    """The parameter `name`'s one value, checked to be text a filter may hold."""
    values = _args(request).get(name.encode(), [])
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"{name}: given {len(values)} times")
    try:
        text = values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{name}: not UTF-8") from None
    if not text or len(text) > MAX_TEXT or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise BadRequest(f"{name}: expected 1 to {MAX_TEXT} printable characters")
    return text


def _check_names(request: Request, allowed: tuple[str, ...]) -> None:
    for key in _args(request):
        name = key.decode("latin-1")
        if name not in allowed:
            raise BadRequest(f"unknown parameter {name!r} (expected {', '.join(allowed)})")


def _id(text: str | None, name: str, minimum: int = 1) -> int | None:
    """A request id (`minimum` 0: or none yet, for `after`)."""
    if text is None:
        return None
    if not text.isdigit() or len(text) > 18 or int(text) < minimum:
        raise BadRequest(f"{name}: expected a request id (an integer from {minimum}), got {text!r}")
    return int(text)


def parse_filters(request: Request, extra: tuple[str, ...]) -> tuple[Filters, dict[str, str | None]]:
    """The filters of the list and the feed, and the other parameters `extra` names."""
    allowed = FILTER_PARAMETERS + extra
    _check_names(request, allowed)
    values = {name: _one(request, name) for name in allowed}
    status = values["status"]
    if status is not None and status not in queries.STATUSES:
        raise BadRequest(f"status: expected one of {', '.join(queries.STATUSES)}, got {status!r}")
    try:
        filters = Filters(tool=values["tool"], method=values["method"], status=status,
                          session_id=values["session"])
    except QueryError as e:
        raise BadRequest(str(e)) from None
    return filters, {name: values[name] for name in extra}


def parse_limit(text: str | None) -> int:
    """A page's size: `limit`, 1 to MAX_LIMIT, DEFAULT_LIMIT when not given."""
    if text is None:
        return DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise BadRequest(f"limit: expected 1 to {MAX_LIMIT}, got {text!r}")
    return int(text)


def parse_list(request: Request) -> ListQuery:
    filters, extra = parse_filters(request, ("before", "limit"))
    return ListQuery(filters, _id(extra["before"], "before"), parse_limit(extra["limit"]))


def parse_replay(body: bytes) -> tuple[str | None, list[list[str]] | None]:
    """`{"body"?: str, "headers"?: [[name, value], ...]}`."""
    try:
        value = json.loads(body) if body.strip() else {}
    except ValueError:
        raise BadRequest("expected a JSON object: {\"body\"?: string, \"headers\"?: [[name, value], ...]}") from None
    if not isinstance(value, dict) or set(value) - {"body", "headers"}:
        raise BadRequest("expected a JSON object with only \"body\" (a string) and \"headers\" ([[name, value], ...])")
    text = value.get("body")
    if text is not None and not isinstance(text, str):
        raise BadRequest("body: expected a string")
    headers = value.get("headers")
    if headers is not None and not (isinstance(headers, list) and all(
            isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in headers)):
        raise BadRequest("headers: expected [[name, value], ...] (strings)")
    return text, headers


class InspectorResource(Resource):
    """Every path of the inspector's listener (see the module's docstring)."""

    isLeaf = True

    def __init__(self, reactor: Any, ask: Ask, feed: LiveFeed, replayer: Replayer,
                 info: Callable[[], dict[str, Any]], static: dict[bytes, tuple[bytes, bytes]] | None = None) -> None:
        super().__init__()
        self._reactor = reactor
        self._ask = ask
        self._feed = feed
        self._replayer = replayer
        self._info = info
        self._static = static if static is not None else load_static()

    def render(self, request: Request) -> Any:
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"cache-control", b"no-store")
        if not loopback_host(request.getHeader(b"host")):
            return self._error(request, 403, "the inspector answers only requests to a loopback host "
                                             "(localhost, 127.0.0.1, [::1])")
        path, method = request.path, request.method
        try:
            if path in self._static:
                self._allow(request, b"GET", b"HEAD")
                return self._file(request, *self._static[path])
            parts = path.decode("latin-1").split("/")[1:]  # "/api/requests/7" -> api, requests, 7
            if parts[:1] != ["api"]:
                raise BadRequest(f"no such page: {path.decode('latin-1')}", 404)
            return self._api(request, method, parts[1:])
        except BadRequest as e:
            return self._error(request, e.status, str(e))

    def _api(self, request: Request, method: bytes, parts: list[str]) -> Any:
        if parts == ["info"]:
            self._allow(request, b"GET")
            _check_names(request, ())
            return self._json(request, 200, self._info())
        if parts == ["requests"]:
            self._allow(request, b"GET")
            return self._later(request, self._list(parse_list(request)))
        if parts == ["sessions"]:
            self._allow(request, b"GET")
            _check_names(request, ("limit",))
            return self._later(request, self._sessions(parse_limit(_one(request, "limit"))))
        if parts == ["live"]:
            self._allow(request, b"GET")
            return self._live(request)
        if len(parts) in (2, 3) and parts[0] == "requests":
            request_id = _id(parts[1], "request id")
            assert request_id is not None
            if len(parts) == 2:
                self._allow(request, b"GET")
                _check_names(request, ())
                return self._later(request, self._detail(request_id))
            if parts[2] == "replay":
                self._allow(request, b"POST")
                self._same_origin(request)
                _check_names(request, ())
                content = request.content.read() if request.content is not None else b""
                body, headers = parse_replay(content)
                return self._later(request, self._replay(request_id, body, headers))
        raise BadRequest(f"no such API path: /api/{'/'.join(parts)}", 404)

    # -- checks

    def _allow(self, request: Request, *methods: bytes) -> None:
        if request.method not in methods:
            request.setHeader(b"allow", b", ".join(methods))
            raise BadRequest(f"{request.method.decode('latin-1')} not allowed here (only "
                             f"{', '.join(m.decode() for m in methods)})", 405)

    def _same_origin(self, request: Request) -> None:
        """A POST from the page itself: JSON (a cross-site form cannot send it without a preflight,
        which is never granted), and no other origin said to have sent it."""
        if not is_json(request.getHeader(b"content-type")):
            raise BadRequest("expected Content-Type: application/json", 415)
        host = (request.getHeader(b"host") or b"").decode("latin-1").lower()
        origin = request.getHeader(b"origin")
        if origin is not None and origin.decode("latin-1").lower() != f"http://{host}":
            raise BadRequest("refused: sent from another origin", 403)
        fetch_site = request.getHeader(b"sec-fetch-site")
        if fetch_site is not None and fetch_site not in (b"same-origin", b"none"):
            raise BadRequest("refused: sent from another site", 403)

    # -- answers

    def _file(self, request: Request, data: bytes, kind: bytes) -> bytes:
        request.setHeader(b"content-type", kind)
        if kind.startswith(b"text/html"):
            request.setHeader(b"content-security-policy", PAGE_CSP)
        request.setHeader(b"content-length", str(len(data)).encode())
        return data

    def _json(self, request: Request, status: int, value: Any) -> bytes:
        body = json.dumps(value, default=str).encode() + b"\n"
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", str(len(body)).encode())
        return body

    def _error(self, request: Request, status: int, message: str) -> bytes:
        return self._json(request, status, {"error": message})

    def _later(self, request: Request, answer: Awaitable[tuple[int, Any]]) -> Any:
        """Answer with what `answer` gives, once it does (a store read, a replay); not at all if the
        client left meanwhile."""
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        async def run() -> None:
            try:
                status, value = await answer
            except BadRequest as e:
                status, value = e.status, {"error": str(e)}
            except Exception as e:
                log.failure("inspector: {method} {path} failed", Failure(), method=request.method.decode(),
                            path=request.path.decode("latin-1"))
                status, value = 500, {"error": f"the inspector failed: {describe(e)}"}
            if not gone:
                request.write(self._json(request, status, value))
                request.finish()

        Deferred.fromCoroutine(run())
        return NOT_DONE_YET

    # -- the API

    async def _list(self, q: ListQuery) -> tuple[int, Any]:
        def question(db: sqlite3.Connection) -> tuple[int, list[RequestRow]]:
            # The first page is bounded by the newest id too: then every page is a search on the
            # primary key or an index, and the page knows where to follow from.
            bound = q.before if q.before is not None else queries.last_id(db) + 1
            return bound, queries.requests(db, q.filters, before=bound, limit=q.limit)

        bound, rows = await self._ask(question)
        return 200, {"requests": [request_json(r) for r in reversed(rows)],
                     "older": rows[0].id if len(rows) == q.limit else None,
                     "last_id": bound - 1 if q.before is None else None}

    async def _sessions(self, limit: int) -> tuple[int, Any]:
        now = self._reactor.seconds()
        rows = await self._ask(lambda db: queries.sessions(db, now=now, limit=limit))
        return 200, {"sessions": [s.as_dict() for s in rows]}

    async def _detail(self, request_id: int) -> tuple[int, Any]:
        detail = await self._ask(lambda db: queries.request_detail(db, request_id))
        if detail is None:
            raise BadRequest(f"no request {request_id} in the store (pruned, or never recorded)", 404)
        request = detail.request
        return 200, {**detail.as_dict(), "failed": request.failed, "timed_out": request.timed_out,
                     "replayable": request.method == "POST" and request.route == "mcp"}

    async def _replay(self, request_id: int, body: str | None, headers: list[list[str]] | None) -> tuple[int, Any]:
        detail = await self._ask(lambda db: queries.request_detail(db, request_id))
        if detail is None:
            raise BadRequest(f"no request {request_id} in the store (pruned, or never recorded)", 404)
        try:
            replay = prepare(detail, body=body, headers=headers)
        except ReplayError as e:
            raise BadRequest(str(e)) from None
        try:
            answer = await self._replayer.send(replay)
        except ReplayError as e:
            raise BadRequest(str(e), e.status) from None
        except Exception as e:
            raise BadRequest(f"the replay got no answer: {describe(e)}", 502) from None
        return 200, {"replay_of": request_id, "sent": replay.as_dict(), "answer": answer.as_dict()}

    def _live(self, request: Request) -> Any:
        filters, extra = parse_filters(request, ("after",))
        after = _id(extra["after"], "after", 0)
        last_event = request.getHeader(b"last-event-id")
        if last_event is not None:  # a reconnecting EventSource: from what it had last
            after = _id(last_event.decode("latin-1").strip(), "Last-Event-ID", 0)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"x-accel-buffering", b"no")
        request.write(b"retry: 2000\n\n")  # the headers now: the next event may be long in coming
        self._feed.subscribe(request, filters, after)
        return NOT_DONE_YET
