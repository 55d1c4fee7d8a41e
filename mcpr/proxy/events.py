"""Where records of what the proxy did go: JSON-lines events, the console line, and a store.

Events are the product's own output, written where `--events` says; they are
not Twisted log records, so tools can rely on their shape.  The console line
goes to the Twisted log, for the person watching the terminal.  A `Recorder`
(the gateway's event store) gets the records themselves, with what their
`Capture` took of the exchange.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any, Protocol

from twisted.logger import Logger

from mcpr.proxy.capture import Capture

log = Logger()


def timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


class EventLog:
    """Writes one JSON object per line; a closed or missing sink makes `emit` a no-op."""

    def __init__(self, stream: IO[str] | None, *, owns: bool = False) -> None:
        self._stream = stream
        self._owns = owns

    @classmethod
    def open(cls, spec: str | None) -> "EventLog":
        if spec is None:
            return cls(None)
        if spec == "-":
            return cls(sys.stdout)
        return cls(open(spec, "a", encoding="utf-8", buffering=1), owns=True)

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def emit(self, type: str, ts: float, **fields: Any) -> None:
        if self._stream is None:
            return
        record = {"type": type, "ts": timestamp(ts), **fields}
        try:
            self._stream.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            log.failure("events sink failed; further events are dropped")
            self._stream = None

    def close(self) -> None:
        if self._owns and self._stream is not None:
            self._stream.close()
        self._stream = None


class Recorder(Protocol):
    """Keeps what the proxy saw (the gateway's event store); called on the reactor thread, so every
    method returns at once and leaves the work to the recorder's own thread."""

    @property
    def capture_limit(self) -> int:
        """Bytes of each body, in each direction, that a request's `Capture` keeps (0: none)."""

    def request(self, record: RequestRecord) -> None:
        """A request is over; `record` is not changed afterwards."""

    def session(self, ts: float, session: dict[str, Any]) -> None:
        """A session started, ended or expired (`Session.as_event()`)."""

    def health(self) -> dict[str, Any]:
        """The recorder's part of `/healthz`."""


def elapsed_ms(start: float | None, end: float | None) -> float | None:
    """Milliseconds from `start` to `end`, to the microsecond, as events and the store give them."""
    if start is None or end is None:
        return None
    return round((end - start) * 1000, 3)


@dataclass
class RequestRecord:
    """What one proxied request did, filled in as it goes."""

    request_id: str
    started: float
    via: str
    method: str
    path: str
    route: str
    status: int | None = None
    session_id: str | None = None
    mcp_method: str | None = None
    tool: str | None = None
    resource: str | None = None
    prompt: str | None = None
    jsonrpc_id: Any = None
    error_code: int | None = None
    error_message: str | None = None
    headers_at: float | None = None
    finished: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    client_name: str | None = None
    client_version: str | None = None
    outcome: str = "ok"
    capture: Capture | None = None

    @property
    def latency_ms(self) -> float | None:
        return elapsed_ms(self.started, self.finished)

    @property
    def upstream_ms(self) -> float | None:
        return elapsed_ms(self.started, self.headers_at)

    @property
    def downstream_ms(self) -> float | None:
        return elapsed_ms(self.headers_at, self.finished)

    def as_event(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "session_id": self.session_id,
            "via": self.via,
            "method": self.method,
            "path": self.path,
            "route": self.route,
            "status": self.status,
            "mcp_method": self.mcp_method,
            "jsonrpc_id": self.jsonrpc_id,
            "tool": self.tool,
            "resource": self.resource,
            "prompt": self.prompt,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "latency_ms": self.latency_ms,
            "upstream_ms": self.upstream_ms,
            "downstream_ms": self.downstream_ms,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "client_name": self.client_name,
            "client_version": self.client_version,
            "outcome": self.outcome,
        }

    def console_line(self) -> str:
        """`21:23:11 POST 200 147B 8ms 8ms↑ 0ms↓ tools/call add`."""
        started, headers_at, finished = self.started, self.headers_at, self.finished
        parts = [
            _clock(started),
            self.method,
            str(self.status if self.status is not None else "-"),
            human_bytes(self.bytes_out),
            _span_text(started, finished),
            _span_text(started, headers_at) + "↑",
            _span_text(headers_at, finished) + "↓",
        ]
        if self.mcp_method:
            parts.append(self.mcp_method)
            target = self.tool or self.resource or self.prompt
            if target:
                parts.append(target)
        else:
            parts.append(self.path)
        if self.error_code is not None:
            parts.append(f"error {self.error_code}")
        if self.outcome != "ok":
            parts.append(f"({self.outcome})")
        return " ".join(parts)


# The console line's clock, made once a second rather than once a line (`localtime` and `strftime`
# were a quarter of the line's cost): the last whole second and its text.
_last_clock: tuple[int, str] = (-1, "")


def _clock(seconds: float) -> str:
    global _last_clock
    whole = int(seconds)
    if whole != _last_clock[0]:
        _last_clock = (whole, time.strftime("%H:%M:%S", time.localtime(whole)))
    return _last_clock[1]


def _span_text(start: float | None, end: float | None) -> str:
    """`elapsed_ms` as the console line shows it: `8ms`, or `-`."""
    ms = elapsed_ms(start, end)
    return "-" if ms is None else "%.0fms" % ms


def human_bytes(n: int, *, iec: bool = False) -> str:
    """`2.1KB` for the console line; with `iec`, `2.1 KiB` (the query commands' tables)."""
    units, sep = (("B", "KiB", "MiB", "GiB"), " ") if iec else (("B", "KB", "MB", "GB"), "")
    if n < 1024:
        return f"{n}{sep}{units[0]}"
    value = n / 1024
    for unit in units[1:3]:
        if value < 1024:
            return f"{value:.1f}{sep}{unit}"
        value /= 1024
    return f"{value:.1f}{sep}{units[3]}"
