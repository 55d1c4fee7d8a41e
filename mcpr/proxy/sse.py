"""An incremental `text/event-stream` parser that tolerates any chunking.

Upstream chunks split events anywhere; the parser must give the same events
whatever the cuts, and its memory must stay bounded however long a stream runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# An event ends at a blank line, in any of the three line-ending styles.
BOUNDARIES = (b"\r\n\r\n", b"\n\n", b"\r\r")


@dataclass
class Event:
    data: str = ""
    event: str | None = None
    id: str | None = None
    raw: bytes = field(default=b"", repr=False)


class EventTooLarge(Exception):
    """A single event grew past the parser's cap."""


class SSEParser:
    """Feed bytes, get complete events back; `raw` keeps each event's exact bytes."""

    def __init__(self, max_event: int = 1 << 20) -> None:
        self._buffer = b""
        self._max = max_event

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer += chunk
        events: list[Event] = []
        while True:
            end, sep = event_end(self._buffer)
            if end < 0:
                break
            block = self._buffer[:end]
            raw = self._buffer[: end + sep]
            self._buffer = self._buffer[end + sep:]
            event = _parse_block(block)
            if event is not None:
                event.raw = raw
                events.append(event)
        if len(self._buffer) > self._max:
            self._buffer = b""
            raise EventTooLarge(f"event larger than {self._max} bytes")
        return events


def event_end(data: bytes, start: int = 0) -> tuple[int, int]:
    """Where the first event block at or after `start` ends and the length of the blank line
    that ends it; (-1, 0) while no block is complete.

    The parser and the SSE rewriter both cut streams here, so they agree on every block.
    """
    best, size = -1, 0
    for separator in BOUNDARIES:
        i = data.find(separator, start)
        if i >= 0 and (best < 0 or i < best):
            best, size = i, len(separator)
    return best, size


def _parse_block(block: bytes) -> Event | None:
    text = block.decode("utf-8", "replace")
    event = Event()
    data: list[str] = []
    seen = False
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        seen = True
        if name == "data":
            data.append(value)
        elif name == "event":
            event.event = value
        elif name == "id":
            event.id = value
    if not seen:
        return None
    event.data = "\n".join(data)
    return event
