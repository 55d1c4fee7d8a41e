"""One line per request (the relay's access log, the gateway's console line), written cheaply.

These lines are output, like twisted.web's own access log (`HTTPFactory.log`
writes its `logFile` directly), not diagnostics: sent through twisted.logger
each would be formatted as an event, given its own timestamp and written and
flushed on its own, about 10 % of a proxied request's CPU.  Here a line is a
string appended to a buffer; the buffer goes out in one write and one flush
at the end of the reactor turn, so a burst of requests costs one system call
and a quiet one appears at once.
"""

from __future__ import annotations

import time
from typing import IO

from twisted.internet.interfaces import IDelayedCall, IReactorTime


def timestamp(seconds: float) -> str:
    """`2026-12-01T21:28:01+0000`, the shape of twist's text log, in UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(seconds))


class LineWriter:
    """Buffers lines for `stream` and writes them out once per reactor turn (and on `close`)."""

    def __init__(self, stream: IO[str] | None, clock: IReactorTime, *, stamped: bool = False) -> None:
        self._stream = stream
        self._clock = clock
        self._stamped = stamped
        self._lines: list[str] = []
        self._flush_call: IDelayedCall | None = None
        self._second = -1
        self._stamp = ""

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def write(self, line: str) -> None:
        if self._stream is None:
            return
        if self._stamped:
            now = int(self._clock.seconds())
            if now != self._second:  # one strftime a second, not one a line
                self._second, self._stamp = now, timestamp(now) + " "
            line = self._stamp + line
        self._lines.append(line)
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        lines, self._lines = self._lines, []
        if lines and self._stream is not None:
            try:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # a closed or broken stdout must not break serving
                self._stream = None

    def close(self) -> None:
        """Write what is buffered (service stop)."""
        self.flush()
