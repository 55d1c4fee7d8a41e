"""Records as the proxy core makes them, for tests of the event store that need no proxy."""

from __future__ import annotations

import itertools
from typing import Any

from twisted.web.http_headers import Headers

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
