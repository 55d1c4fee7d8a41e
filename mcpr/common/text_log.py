"""Both daemons' text log: `twist`'s text lines at a fraction of their cost, and Autobahn's in
plain text.

A tunnel registration logs one line (a proxied request's access line goes to
`accesslog.LineWriter`, not through the logger), so the line's cost is paid per registration:
with Twisted's `textFileLogObserver` it was 7.5 % of the relay's py-spy samples
for a registration (docs/PERFORMANCE.md, session 8).  Two things made it dear, both kept out of
here:

- the time of every line formatted anew (`datetime`, time zone, `strftime`): `_Stamp` formats
  it once a second;
- the message formatted by Twisted's `formatWithCall`, a `string.Formatter` written in
  Python that also allows `{f()}`: `str.format_map`, in C, formats the same message the same
  way whenever the format calls nothing; anything else (a call, a missing key, a failure, a
  flattened event) goes to Twisted's own formatter, so every line is Twisted's line.
"""

from __future__ import annotations

from typing import IO

from twisted.logger import FileLogObserver, LogEvent, formatEventAsClassicLogText, formatTime


class _Stamp:
    """`formatTime` for the log's lines, computed once a second."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = ""

    def __call__(self, when: float | None) -> str:
        if when is None:
            return formatTime(when)
        second = int(when)
        if second != self._second:
            self._second, self._text = second, formatTime(second)
        return self._text


def _message(event: LogEvent) -> str | None:
    """The event's message as Twisted's formatter writes it, or None where only it can say."""
    text = event.get("log_format")
    if type(text) is not str or "log_failure" in event or "log_flattened" in event:
        return None
    try:
        return text.format_map(event)
    except Exception:  # `{f()}`, a missing key, a value that cannot be formatted: Twisted's words
        return None


def _system(event: LogEvent) -> str:
    system = event.get("log_system")
    if system is not None:
        return str(system)
    level = event.get("log_level")
    return f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"


def text_log_observer(out: IO[str]) -> FileLogObserver:
    """What `twisted.logger.textFileLogObserver` makes, the same lines, made cheaply."""
    stamp = _Stamp()

    def format_event(event: LogEvent) -> str | None:
        message = _message(event)
        if message is None:
            return formatEventAsClassicLogText(event, formatTime=stamp)
        if not message:
            return None
        line = f"{stamp(event.get('log_time'))} [{_system(event)}] {message}"
        return (line.replace("\n", "\n\t") if "\n" in line else line) + "\n"

    return FileLogObserver(out, format_event)


def plain_autobahn_log() -> None:
    """Autobahn styles the arguments of its own log lines with click's ANSI colours whenever
    click can be imported (the MCP SDK brings it into a development environment), and does so
    before the logger drops a debug line: some forty `click.style` calls per tunnel
    registration, 5 % of the relay's CPU for it, for escapes that do not belong in a log file
    or the journal anyway.  `autobahn.util._HAS_CLICK` is the switch it reads on every call
    (a private name, so tests/common/test_text_log.py checks that it still works)."""
    import autobahn.util

    autobahn.util._HAS_CLICK = False
