"""What a request leaves for the event store beyond its record: headers, the head of each body,
and the `*/list` answers it carried.

Bodies are taken while they stream, chunk by chunk, up to a cap per direction:
nothing is held back from the client and nothing past the cap is kept, so a
response of any size or duration costs at most `limit` bytes here.  The
proxy core only collects; redaction and encoding happen once per batch of
requests, in the event store (`mcpr.gateway.store`), not per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO, Any, Sequence

from twisted.web.http_headers import Headers

# Raw headers as twisted.web keeps them: (name, [values]).
RawHeaders = list[tuple[bytes, Sequence[bytes]]]

# The MCP methods whose answers the store keeps every distinct version of (`mcpr schema`).
LIST_METHODS = frozenset({"tools/list", "resources/list", "resources/templates/list", "prompts/list"})


class BodyCapture:
    """The first `limit` bytes of a body, kept as they pass; the rest is not kept."""

    __slots__ = ("limit", "kept", "_chunks")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = 0
        self._chunks: list[bytes] = []

    def feed(self, data: bytes) -> None:
        room = self.limit - self.kept
        if room <= 0:
            return
        piece = data if len(data) <= room else data[:room]
        self._chunks.append(piece)
        self.kept += len(piece)

    @property
    def data(self) -> bytes:
        return b"".join(self._chunks)


@dataclass
class Listing:
    """One `*/list` answer: the method, the page it answered (its `cursor` param) and the result."""

    method: str
    cursor: str | None
    result: Any


@dataclass
class Capture:
    """The parts of one exchange the store keeps, filled in as the request goes."""

    request_headers: RawHeaders
    query: bytes
    request_body: BodyCapture
    response_body: BodyCapture
    response_headers: RawHeaders = field(default_factory=list)
    listings: list[Listing] = field(default_factory=list)

    @classmethod
    def begin(cls, headers: Headers, uri: bytes, limit: int) -> Capture:
        """The request's side as it arrives: its headers and query now, its body once read."""
        return cls(list(headers.getAllRawHeaders()), uri.partition(b"?")[2], BodyCapture(limit), BodyCapture(limit))

    def take_request_body(self, data: bytes | None, spooled: IO[bytes] | None) -> None:
        """The request body's head: from the bytes read to classify it, else from the spool file
        twisted.web wrote it to (rewound: it is streamed upstream from its start)."""
        if not self.request_body.limit:
            return
        if data is not None:
            self.request_body.feed(data)
        elif spooled is not None:
            spooled.seek(0)
            self.request_body.feed(spooled.read(self.request_body.limit))
            spooled.seek(0)

    def finish(self, response_headers: Headers) -> None:
        self.response_headers = list(response_headers.getAllRawHeaders())
