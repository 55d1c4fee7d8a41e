"""Changing JSON in a response body while it streams through.

A JSON body is one value, so it is held until complete (up to a cap) and sent
once, with its new Content-Length.  An SSE body may stream for hours, so it is
rewritten event by event: each complete event whose data is JSON goes through
the transform and out at once; event ids, comments and every event the
transform leaves alone keep their exact bytes.  Past the cap, either rewriter
gives up and passes the rest through untouched, so memory stays bounded and
the client still gets the upstream's answer.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Protocol

from twisted.logger import Logger
from twisted.web.http_headers import Headers

from mcpr.proxy.jsonrpc import loads_or_none
from mcpr.proxy.sse import BOUNDARIES, SSEParser, event_end

log = Logger()

# Mutates a parsed JSON value in place; says whether it changed anything.
Transform = Callable[[Any], bool]
# Whether a body's bytes may hold anything the transform changes (False: it passes unparsed).
Screen = Callable[[bytes], bool]

DEFAULT_CAP = 8 << 20


class BodyRewriter(Protocol):
    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> None: ...


def dumps(value: Any) -> bytes:
    """Compact JSON; UTF-8 as is unless the value holds lone surrogates, which only escapes can carry."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


def rewrite_json(body: bytes | str, transform: Transform) -> bytes | None:
    """The rewritten body, or None when it is not JSON (or `null`) or the transform changed nothing."""
    value = loads_or_none(body)
    if value is None:
        return None
    try:
        changed = transform(value)
    except Exception:
        log.failure("rewriting a JSON body failed; passing it unchanged")
        return None
    if not changed:
        return None
    try:
        return dumps(value)
    except (ValueError, RecursionError):
        return None


class JsonRewriter:
    """Holds a JSON body, then writes it rewritten with its Content-Length.

    `headers` are the downstream response's, not yet sent, without a
    Content-Length: a body that outgrows the cap streams on chunked.
    """

    def __init__(self, transform: Transform, write: Callable[[bytes], None], headers: Headers,
                 cap: int = DEFAULT_CAP, screen: Screen | None = None) -> None:
        self._transform = transform
        self._screen = screen
        self._write = write
        self._headers = headers
        self._cap = cap
        self._chunks: list[bytes] = []
        self._size = 0
        self._passing = False

    def feed(self, chunk: bytes) -> None:
        if self._passing:
            self._write(chunk)
            return
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size > self._cap:
            log.warn("JSON response larger than {cap} bytes: passed through without rewriting", cap=self._cap)
            self._passing = True
            held, self._chunks = b"".join(self._chunks), []
            self._write(held)

    def finish(self) -> None:
        if self._passing:
            return
        body, self._chunks = b"".join(self._chunks), []
        out = None if self._screen is not None and not self._screen(body) else rewrite_json(body, self._transform)
        if out is None:
            out = body
        self._headers.setRawHeaders(b"content-length", [str(len(out)).encode()])
        if out:
            self._write(out)


class EventStreamRewriter:
    """Rewrites the JSON data of each SSE event as soon as the event is complete.

    The stream is cut into blocks at blank lines, as `SSEParser` cuts it, so
    that every byte is accounted for: comments and keep-alives, which the
    parser skips, go out as they came.  Each block's fields are read by the
    parser itself.
    """

    def __init__(self, transform: Transform, write: Callable[[bytes], None], cap: int = DEFAULT_CAP,
                 screen: Screen | None = None) -> None:
        self._transform = transform
        self._screen = screen
        self._write = write
        self._cap = cap
        self._held: list[bytes] = []  # bytes of the incomplete block: no boundary among them
        self._held_size = 0
        self._tail = b""
        self._passing = False

    def feed(self, chunk: bytes) -> None:
        if self._passing:
            self._write(chunk)
            return
        before = self._held_size
        self._held.append(chunk)
        self._held_size += len(chunk)
        # Join and search only when a boundary may have arrived: a large event
        # arriving in many chunks must not be copied or rescanned for each.
        seam = self._tail + chunk[:3]
        self._tail = (self._tail + chunk[-3:])[-3:]
        if any(b in chunk or b in seam for b in BOUNDARIES):
            data = b"".join(self._held)
            out, rest = self._blocks(data, max(0, before - 3))
            self._held, self._held_size = ([rest] if rest else []), len(rest)
            if out:
                self._write(b"".join(out))
        if self._held_size > self._cap:
            log.warn("SSE event larger than {cap} bytes: rest of the stream passed through without rewriting",
                     cap=self._cap)
            self._passing = True
            self.finish()

    def finish(self) -> None:
        """Send what is left of an incomplete last event, unchanged."""
        rest, self._held, self._held_size = b"".join(self._held), [], 0
        if rest:
            self._write(rest)

    def _blocks(self, data: bytes, start: int) -> tuple[list[bytes], bytes]:
        out: list[bytes] = []
        pos = 0
        while True:
            end, separator = event_end(data, start)
            if end < 0:
                return out, data[pos:]
            end += separator
            out.append(self._block(data[pos:end]))
            pos = start = end

    def _block(self, raw: bytes) -> bytes:
        if b'"result"' not in raw:
            return raw  # not an answer (a notification, a comment): nothing to parse
        if self._screen is not None and not self._screen(raw):
            return raw
        events = SSEParser().feed(raw)
        if not events or events[0].data.lstrip()[:1] not in ("{", "["):
            return raw
        out = rewrite_json(events[0].data, self._transform)
        return raw if out is None else replace_data(raw, out)


def replace_data(raw: bytes, data: bytes) -> bytes:
    """An event's bytes with its data lines replaced by one line of `data`; other lines kept in place."""
    lines = raw.splitlines(keepends=True)
    out: list[bytes] = []
    replaced = False
    for line in lines:
        content = line.rstrip(b"\r\n")
        if content == b"data" or content.startswith(b"data:"):
            if not replaced:
                out.append(b"data: " + data + (line[len(content):] or b"\n"))
                replaced = True
            continue
        out.append(line)
    return b"".join(out)
