"""Reading JSON-RPC answers out of a response stream without holding it.

Events want each answer's error code and sessions want `initialize`'s result;
the body itself streams on untouched.  JSON bodies are kept only up to a cap
and SSE bodies are parsed event by event, so memory stays bounded for a
response of any size or duration.
"""

from __future__ import annotations

from typing import Any, Iterable

from mcpr.common.web import is_json
from mcpr.proxy import jsonrpc
from mcpr.proxy.sse import EventTooLarge, SSEParser


def is_event_stream(content_type: bytes | None) -> bool:
    return content_type is not None and content_type.split(b";", 1)[0].strip().lower() == b"text/event-stream"


class AnswerWatcher:
    """Collects the JSON-RPC responses in a body; gives up quietly past `limit` bytes."""

    def __init__(self, content_type: bytes | None, keep_results: Iterable[Any] = (), limit: int = 1 << 20):
        self._sse = SSEParser(limit) if is_event_stream(content_type) else None
        self._json = is_json(content_type) and self._sse is None
        self._buffer: list[bytes] = []
        self._size = 0
        self._limit = limit
        self._keep = set(jsonrpc.id_key(k) for k in keep_results)
        self.answers: list[jsonrpc.Message] = []
        self.gave_up = False
        self._unread: bytes | None = None

    @property
    def active(self) -> bool:
        return not self.gave_up and (self._sse is not None or self._json)

    def feed(self, data: bytes) -> None:
        if not self.active:
            return
        if self._sse is not None:
            try:
                events = self._sse.feed(data)
            except EventTooLarge:
                self.gave_up = True
                return
            for event in events:
                if event.data:
                    self._take(event.data)
            return
        self._size += len(data)
        if self._size > self._limit:
            self.gave_up = True
            self._buffer = []
            return
        self._buffer.append(data)

    def finish(self) -> list[jsonrpc.Message]:
        """The errors, and the results asked to be kept.  A JSON body that can hold neither is not
        parsed (most answers: a result nobody keeps), unless `answered` needs its ids."""
        if self._json and not self.gave_up and self._buffer:
            body = b"".join(self._buffer)
            self._buffer = []
            if self._keep or jsonrpc.may_hold(body, b'"error"'):  # an error is a member named so
                self._take(body)
            else:
                self._unread = body
        return self.answers

    def answered(self, ids: set[Any]) -> bool:
        """Whether every id in `ids` (`jsonrpc.id_key`) has its answer, once `finish` was called."""
        if self._unread is not None:
            self._take(self._unread)
            self._unread = None
        return ids <= {jsonrpc.id_key(a.id) for a in self.answers}

    def _take(self, text: str | bytes) -> None:
        batch = jsonrpc.parse_value(jsonrpc.loads_or_none(text))
        if batch is None:
            return
        for message in batch.messages:
            if message.kind in (jsonrpc.RESPONSE, jsonrpc.ERROR):
                if message.kind == jsonrpc.RESPONSE and jsonrpc.id_key(message.id) not in self._keep:
                    message = jsonrpc.Message(message.kind, message.id)
                self.answers.append(message)

