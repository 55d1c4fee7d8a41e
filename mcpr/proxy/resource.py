"""The proxy core: one twisted.web resource that serves every request the same way.

Direct HTTP and the tunnel both hand their requests to this resource, so
routing, sessions, events and error answers cannot differ between them; only
`site.via` tells them apart in the events.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import IO, Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mcpr.common.accesslog import LineWriter
from mcpr.common.failures import describe
from mcpr.common.web import body_length, is_json
from mcpr.proxy import headers as hdrs
from mcpr.proxy import jsonrpc
from mcpr.proxy.answers import AnswerWatcher
from mcpr.proxy.capture import LIST_METHODS, Capture, Listing
from mcpr.proxy.events import EventLog, Recorder, RequestRecord
from mcpr.proxy.forward import BodyPipe, Forwarder, UpstreamError, request_body
from mcpr.proxy.rewrite.csp import CspPolicy
from mcpr.proxy.rewrite.plan import Plan, plan
from mcpr.proxy.routing import Kind, Route, Upstream, route
from mcpr.proxy.sessions import Session, SessionTracker
from mcpr.proxy.upstream_client import Body
from mcpr.proxy.widgets import WidgetDevServer, WidgetFolder, WidgetSource, listing, local_html

log = Logger()

# JSON-RPC error codes the gateway answers with (server-error range).
UPSTREAM_UNAVAILABLE = -32002
UPSTREAM_TIMEOUT = -32001

# POST bodies up to this size are parsed to classify them; a larger JSON body
# is still sent to the MCP endpoint, streamed from the spool file.
CLASSIFY_LIMIT = 1 << 20


class _Exchange:
    """The cancellable parts of one request in flight, and whether its client left.

    `gone` is set by the request's `notifyFinish()` errback, registered
    before anything else runs, so every step reads the client's state here.
    """

    pending: Deferred | None = None
    pipe: BodyPipe | None = None
    gone = False

    def client_left(self, _reason: Failure) -> None:
        self.gone = True
        if self.pipe is not None:
            self.pipe.stop()
        elif self.pending is not None:
            self.pending.cancel()


class ProxyResource(Resource):
    isLeaf = True

    def __init__(
        self,
        reactor: Any,  # IReactorTCP and IReactorTime
        upstream: Upstream,
        forwarder: Forwarder,
        events: EventLog,
        *,
        sessions: SessionTracker | None = None,
        csp: CspPolicy | None = None,
        widgets: WidgetSource | None = None,
        console: LineWriter | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        # The human line per request (DESIGN: `21:23:11 POST 200 147B 8ms ...`); none by default.
        self.console = console if console is not None else LineWriter(None, reactor)
        self.upstream = upstream
        self.forwarder = forwarder
        self.events = events
        # The event store, which gets every record with its capture; None: nothing is captured.
        self.recorder = recorder
        self.sessions = sessions or SessionTracker(reactor, self._session_changed)
        self.csp = csp or CspPolicy()  # replaced as a whole on reload
        self.widgets = widgets
        # The tunnel's URL, set by the tunnel once it registered; `[csp].domain` wins over it.
        self.public_origin: str | None = self.csp.domain
        self.started = reactor.seconds()
        self.in_flight = 0
        self.requests_total = 0
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(3).hex()

    # -- twisted.web

    def render(self, request: Request) -> Any:
        exchange = _Exchange()
        request.notifyFinish().addErrback(exchange.client_left)
        if request.path == b"/healthz" and request.method in (b"GET", b"HEAD"):
            Deferred.fromCoroutine(self._health(request, exchange))
        else:
            Deferred.fromCoroutine(self._proxy(request, exchange))
        return NOT_DONE_YET

    def origin_for(self, request: Request) -> str | None:
        """The public origin a request came through, for widget CSP.

        `[csp].domain` if configured, else the tunnel's URL for a request that
        came through the tunnel.  A direct request has none: its client reached
        this machine, so the upstream's localhost domains still work for it.
        """
        if self.csp.domain:
            return self.csp.domain
        return self.public_origin if _via(request) == "tunnel" else None

    # -- proxying

    async def _proxy(self, request: Request, exchange: _Exchange) -> None:
        now = self._reactor.seconds()
        self.in_flight += 1
        self.requests_total += 1
        record = RequestRecord(
            request_id=f"{self._id_prefix}-{next(self._ids)}",
            started=now,
            via=_via(request),
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            route="",
        )
        if self.recorder is not None:
            record.capture = Capture.begin(request.requestHeaders, request.uri, self.recorder.capture_limit)
        try:
            await self._exchange(request, record, exchange)
        except Exception:
            log.failure("proxying {method} {path} failed", method=record.method, path=record.path)
            record.outcome = "error"
            if not request.startedWriting and not exchange.gone:
                self._answer_error(request, record, None, 500, -32603, "internal proxy error")
            else:
                _abort(request)
        finally:
            self.in_flight -= 1
            record.finished = self._reactor.seconds()
            if record.capture is not None:
                record.capture.finish(request.responseHeaders)
            self._report(record)

    async def _exchange(self, request: Request, record: RequestRecord, exchange: _Exchange) -> None:
        """Classify, answer here or send upstream, plan the rewrite once, pipe the body, conclude."""
        classified = self._classify(request, record)
        if classified is None:
            await self._serve_widget(request, record, exchange)
            return
        rt, body = classified
        reading = None
        if self.widgets is not None and rt.rpc is not None:
            reading = Deferred.fromCoroutine(local_html(rt.rpc, self.widgets))  # read while upstream answers
        response = await self._send(request, record, exchange, rt, body)
        if response is None:
            return
        htmls = await reading if reading is not None else {}
        if exchange.gone:
            response.deliverBody(Protocol())
            record.outcome = "client-gone"
            return
        changes = plan(rt, request, response, origin=self.origin_for(request), htmls=htmls, csp=self.csp,
                       upstream=self.upstream)
        answers = await self._pipe(request, record, exchange, rt, response, changes)
        if answers is not None:
            self._conclude(rt, record, response, answers)

    def _classify(self, request: Request, record: RequestRecord) -> tuple[Route, Body] | None:
        """Where the request goes and its body, with the record filled in from them.

        None for a request the gateway answers itself: a widget asset from the
        folder, or the `GET /widgets` listing.
        """
        data, content, record.bytes_in = _read_body(request)
        if record.capture is not None:
            record.capture.take_request_body(data, content)
        rt = route(request.method, request.uri, request.requestHeaders, data, self.upstream,
                   widgets=self.widgets is not None)
        if rt.kind is Kind.PASSTHROUGH and data is None and _looks_json(request):
            # Too large to parse, but JSON: MCP traffic as far as we can tell.
            rt = Route(Kind.MCP_POST, self.upstream.mcp_url(request.uri))
        record.route = rt.kind.value
        self._describe(record, rt)
        if rt.kind is Kind.WIDGET:
            if not isinstance(self.widgets, WidgetDevServer) or request.path == b"/widgets":
                return None
            rt = Route(Kind.WIDGET, self.widgets.url_for(rt.url))
        session_id = _header(request, b"mcp-session-id")
        if session_id:
            record.session_id = session_id
            session = self.sessions.touch(session_id)
            if session is not None:
                record.client_name, record.client_version = session.client_name, session.client_version
        return rt, request_body(data, content)

    async def _send(self, request: Request, record: RequestRecord, exchange: _Exchange, rt: Route,
                    body: Body) -> IResponse | None:
        """The upstream's response, its body still to come.

        None when there is nothing to pipe: the client left first, or the
        upstream failed and the client got a JSON-RPC (or plain) error for it.
        """
        headers = hdrs.upstream_request_headers(
            request.requestHeaders,
            client_ip=_client_ip(request),
            host=request.getHeader(b"host"),
            proto=b"https" if request.isSecure() else b"http",
        )
        exchange.pending = self.forwarder.send(request.method, rt.url, headers, body)
        try:
            response = await exchange.pending
        except CancelledError:
            record.outcome = "client-gone"
            return None
        except UpstreamError as e:
            record.outcome = "upstream-timeout" if e.status == 504 else "upstream-unavailable"
            if not exchange.gone:
                code = UPSTREAM_TIMEOUT if e.status == 504 else UPSTREAM_UNAVAILABLE
                self._answer_error(request, record, rt, e.status, code, self._upstream_message(e))
            return None
        finally:
            exchange.pending = None
        record.headers_at = self._reactor.seconds()
        record.status = response.code
        answer_session = response.headers.getRawHeaders(b"mcp-session-id", [None])[0]
        if answer_session and not record.session_id:
            record.session_id = answer_session.decode("latin-1")
        return response

    async def _pipe(self, request: Request, record: RequestRecord, exchange: _Exchange, rt: Route,
                    response: IResponse, changes: Plan) -> list[jsonrpc.Message] | None:
        """Stream the response to the client as `changes` says; the JSON-RPC answers read on the way.

        None when the exchange broke off: the upstream mid-body, or the client
        before it had every answer it asked for.
        """
        request.setResponseCode(response.code, response.phrase)
        request.responseHeaders = hdrs.downstream_response_headers(response.headers)
        changes.rewrite_headers(request.responseHeaders)
        watcher = self._watcher(rt, response)
        done: Deferred[None] = Deferred()
        capture = record.capture.response_body if record.capture is not None else None

        def write(chunk: bytes) -> None:
            record.bytes_out += len(chunk)
            if watcher is not None:
                watcher.feed(chunk)
            if capture is not None:
                capture.feed(chunk)
            request.write(chunk)

        rewriter = changes.rewriter(write, request.responseHeaders)
        if changes.event_stream:
            request.write(b"")  # send the headers now: an SSE stream may stay quiet for long
        exchange.pipe = BodyPipe(write if rewriter is None else rewriter.feed,
                                 lambda p: request.registerProducer(p, True), request.unregisterProducer, done)
        response.deliverBody(exchange.pipe)
        try:
            await done
        except Exception as e:
            record.outcome = "upstream-broke"
            log.warn("upstream broke off the response to {method} {path}: {why}",
                     method=record.method, path=record.path, why=str(e))
            _abort(request)
            return None
        if rewriter is not None:
            rewriter.finish()
        answers = watcher.finish() if watcher is not None else []
        if not exchange.gone:
            request.finish()
        elif rt.kind is not Kind.MCP_STREAM and not _answered(rt, watcher):
            # An SDK client closes a POST's SSE stream once it has its answer,
            # and a GET stream ends when the client leaves: both are normal.
            record.outcome = "client-gone"
            return None
        return answers

    async def _serve_widget(self, request: Request, record: RequestRecord, exchange: _Exchange) -> None:
        """A widget asset from the folder, or the `GET /widgets` listing: answered here."""
        assert self.widgets is not None
        served: bytes | int
        if request.path == b"/widgets":
            body = listing(self.widgets)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", str(len(body)).encode())
            served = body if request.method == b"GET" else b""
        else:
            assert isinstance(self.widgets, WidgetFolder)  # a dev server's assets go through `_send`
            served = self.widgets.render(request)
        if served is NOT_DONE_YET:
            try:
                await request.notifyFinish()
            except Exception:
                record.outcome = "client-gone"
        elif not exchange.gone:
            request.write(served)
            request.finish()
        record.status = request.code
        record.bytes_out = request.sentLength

    def _watcher(self, rt: Route, response: IResponse) -> AnswerWatcher | None:
        if rt.kind is not Kind.MCP_POST or rt.rpc is None or not rt.rpc.requests:
            return None
        # Results are kept for `initialize` (the session table), and for the `*/list` methods when a
        # store keeps every distinct answer.
        kept = _KEPT_FOR_STORE if self.recorder is not None else _KEPT
        keep = [m.id for m in rt.rpc.requests if m.method in kept]
        content_type = response.headers.getRawHeaders(b"content-type", [None])[0]
        return AnswerWatcher(content_type, keep)

    def _describe(self, record: RequestRecord, rt: Route) -> None:
        if rt.rpc is None:
            return
        first = rt.rpc.first
        record.mcp_method = rt.rpc.method_summary() or first.kind
        record.jsonrpc_id = first.id if not rt.rpc.batch else [m.id for m in rt.rpc.requests]
        target = first.target
        field = jsonrpc.TARGET_FIELD.get(first.method or "")
        if target and field:
            setattr(record, field, target)
        if first.kind == jsonrpc.ERROR:
            record.error_code, record.error_message = first.error_code, first.error_message

    def _conclude(self, rt: Route, record: RequestRecord, response: IResponse,
                  answers: list[jsonrpc.Message]) -> None:
        """What the answers tell the record and the session table; a DELETE the upstream took ends its session."""
        if rt.kind is Kind.SESSION_DELETE and 200 <= response.code < 300 and record.session_id:
            self.sessions.ended(record.session_id)
        if not answers:
            return
        assert rt.rpc is not None  # answers are only read for JSON-RPC requests
        for answer in answers:
            if answer.kind == jsonrpc.ERROR and record.error_code is None:
                record.error_code, record.error_message = answer.error_code, answer.error_message
        if record.capture is not None:
            record.capture.listings += _listings(rt.rpc, answers)
        initialize = next((m for m in rt.rpc.requests if m.method == "initialize"), None)
        session_id = response.headers.getRawHeaders(b"mcp-session-id", [None])[0]
        if initialize is None or not session_id:
            return
        result = next((a.result for a in answers if a.kind == jsonrpc.RESPONSE and a.id == initialize.id),
                      None)
        if result is not None:
            session = self.sessions.started(session_id.decode("latin-1"), initialize.params, result)
            record.client_name, record.client_version = session.client_name, session.client_version

    def _upstream_message(self, e: UpstreamError) -> str:
        what = "timed out" if e.status == 504 else "unavailable"
        return f"upstream {what}: {e.url.decode('latin-1')}: {e.reason}"

    def _answer_error(self, request: Request, record: RequestRecord, rt: Route | None,
                      status: int, code: int, message: str) -> None:
        record.status = status
        record.error_code, record.error_message = code, message
        request.setResponseCode(status)
        if rt is not None and rt.rpc is not None:
            body = jsonrpc.error_body(rt.rpc, code, message)
            request.setHeader(b"content-type", b"application/json")
        else:
            body = f"{status} {message}\n".encode()
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"content-length", str(len(body)).encode())
        request.write(body)
        record.bytes_out += len(body)
        if record.capture is not None:
            record.capture.response_body.feed(body)
        request.finish()

    # -- reporting

    def _report(self, record: RequestRecord) -> None:
        if self.events.enabled:
            self.events.emit("request", record.started, **record.as_event())
        if self.console.enabled:
            self.console.write(record.console_line())
        if self.recorder is not None:
            self.recorder.request(record)

    def report_too_large(self, request: Request, method: bytes, path: bytes) -> None:
        now = self._reactor.seconds()
        record = RequestRecord(
            request_id=f"{self._id_prefix}-{next(self._ids)}",
            started=now,
            via=_via(request),
            method=method.decode("latin-1"),
            path=path.split(b"?", 1)[0].decode("latin-1"),
            route="refused",
            status=413,
            finished=now,
            outcome="too-large",
        )
        self.requests_total += 1
        self._report(record)

    def _session_changed(self, session: Session) -> None:
        now, fields = self._reactor.seconds(), session.as_event()
        self.events.emit("session", now, **fields)
        if self.recorder is not None:
            self.recorder.session(now, fields)

    def heartbeat(self) -> None:
        self.sessions.expire()
        self.events.emit(
            "heartbeat",
            self._reactor.seconds(),
            uptime_s=round(self._reactor.seconds() - self.started, 3),
            sessions_active=len(self.sessions),
            requests_total=self.requests_total,
            in_flight=self.in_flight,
            upstream=self.upstream.url,
        )

    # -- health

    async def _health(self, request: Request, exchange: _Exchange) -> None:
        """`ok`, or `degraded` with the reason while the upstream does not accept connections.

        200 either way: the gateway itself works (a liveness check that restarted it would not
        bring the upstream back); monitors read `status`."""
        reachable, error, ms = await self.probe_upstream()
        health: dict[str, Any] = {"status": "ok"}
        if not reachable:
            health = {"status": "degraded", "reason": f"upstream {self.upstream.url} unreachable: {error}"}
        body = json.dumps(
            {
                **health,
                "upstream": {"url": self.upstream.url, "reachable": reachable, "error": error,
                             "connect_ms": ms},
                "sessions": len(self.sessions),
                "in_flight": self.in_flight,
                "uptime_s": round(self._reactor.seconds() - self.started, 3),
                "store": self.recorder.health() if self.recorder is not None else None,
            }
        ).encode()
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", str(len(body)).encode())
        if not exchange.gone:
            request.write(body)
            request.finish()

    async def probe_upstream(self, timeout: float = 2.0) -> tuple[bool, str | None, float | None]:
        """Whether the upstream accepts TCP connections, without sending it a request."""
        start = self._reactor.seconds()
        endpoint = HostnameEndpoint(self._reactor, self.upstream.host, self.upstream.port, timeout=timeout)
        try:
            proto = await endpoint.connect(_PROBE)
        except Exception as e:
            return False, describe(e), None
        proto.transport.loseConnection()  # type: ignore[attr-defined]  # a connected Protocol has one
        return True, None, round((self._reactor.seconds() - start) * 1000, 3)


_PROBE = Factory.forProtocol(Protocol)
_PROBE.noisy = False


def _via(request: Request) -> str:
    return getattr(getattr(request.channel, "site", None), "via", "direct")


def _read_body(request: Request) -> tuple[bytes | None, IO[bytes] | None, int]:
    """(bytes, None, size) if small enough to classify, else (None, the spool file to stream, size)."""
    content = request.content
    size = body_length(content)
    if size > CLASSIFY_LIMIT:
        return None, content, size
    return (content.read() if content is not None else b""), None, size


def _looks_json(request: Request) -> bool:
    return request.method == b"POST" and any(
        is_json(t) for t in request.requestHeaders.getRawHeaders(b"content-type", ())
    )


_KEPT = frozenset({"initialize"})
_KEPT_FOR_STORE = LIST_METHODS | _KEPT


def _listings(rpc: jsonrpc.Batch, answers: list[jsonrpc.Message]) -> list[Listing]:
    """The `*/list` requests of `rpc` that got a result among `answers`."""
    if not any(m.method in LIST_METHODS for m in rpc.requests):  # most requests: no answer to index
        return []
    results = {jsonrpc.id_key(a.id): a.result for a in answers if a.kind == jsonrpc.RESPONSE}
    found = []
    for m in rpc.requests:
        key = jsonrpc.id_key(m.id)
        if m.method in LIST_METHODS and results.get(key) is not None:
            cursor = m.params.get("cursor") if isinstance(m.params, dict) else None
            found.append(Listing(m.method, cursor if isinstance(cursor, str) else None, results[key]))
    return found


def _answered(rt: Route, watcher: AnswerWatcher | None) -> bool:
    """Whether every request of the route's body has its answer among what `watcher` read."""
    wanted = {jsonrpc.id_key(m.id) for m in rt.rpc.requests} if rt.rpc is not None else {None}
    return watcher.answered(wanted) if watcher is not None else not wanted


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if value else None


def _client_ip(request: Request) -> str | None:
    peer = request.getClientAddress()
    return getattr(peer, "host", None)


def _abort(request: Request) -> None:
    """End a started response so the client sees it broke off, not a clean end."""
    channel = request.channel
    if channel is None:
        return
    reset_stream = getattr(channel, "abortConnection", None)
    if reset_stream is not None:
        reset_stream()  # an HTTP/2 stream (the tunnel): RST_STREAM, the connection lives on
        return
    transport = getattr(channel, "transport", None)
    if transport is not None:
        transport.abortConnection()
