"""The daemons' text log: Twisted's own lines, made cheaply, and Autobahn's without colours."""

from __future__ import annotations

import io
from typing import IO, Callable

from twisted.logger import LogLevel, textFileLogObserver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mcpr.common.text_log import plain_autobahn_log, text_log_observer


def _lines(observer_factory: Callable[[IO[str]], Callable[[dict], None]], events: list[dict]) -> str:
    out = io.StringIO()
    observer = observer_factory(out)
    for event in events:
        observer(dict(event))
    return out.getvalue()


class TextLogTests(SynchronousTestCase):
    def assertSameLines(self, events: list[dict]) -> str:
        ours = _lines(text_log_observer, events)
        self.assertEqual(ours, _lines(textFileLogObserver, events))
        return ours

    def test_the_time_is_formatted_once_a_second(self) -> None:
        events = [{"log_format": "tunnel {name} registered", "name": n, "log_time": t, "log_system": "-",
                   "log_namespace": "mcpr"} for n, t in (("a", 1_800_000_000.1), ("b", 1_800_000_000.9),
                                                         ("c", 1_800_000_001.0), ("d", 1_799_999_999.5))]
        ours = self.assertSameLines(events)
        self.assertEqual(len(set(line.split(" ")[0] for line in ours.splitlines())), 3)

    def test_the_lines_twisted_writes(self) -> None:
        """What str.format_map formats and what only Twisted's formatter can: the same lines."""
        failure = Failure(ValueError("boom"))
        base = {"log_time": 1_800_000_000.5, "log_namespace": "mcpr.relay.metrics", "log_level": LogLevel.info}
        events = [
            base | {"log_format": "tunnel {subdomain} registered (token {hint}): {url}", "subdomain": "a",
                    "hint": "3a04", "url": "http://a.example"},
            base | {"log_format": "{n:,} at {ratio:.2f}, {{braces}}, {peer!r}", "n": 12345, "ratio": 0.5,
                    "peer": "tcp4:127.0.0.1"},
            base | {"log_format": "attribute {level.name} and item {d[k]}", "level": LogLevel.warn, "d": {"k": 1}},
            base | {"log_format": "two\nlines {x}", "x": "and\nthree"},
            base | {"log_format": "called {f()}", "f": lambda: "yes"},  # Twisted's call syntax
            base | {"log_format": "missing {nothing}"},  # Twisted's "Unable to format" line
            base | {"log_format": "failed: {why}", "why": "x", "log_failure": failure},
            base | {"log_format": ""},  # no line at all
            {"log_format": "no time, no level, no namespace"},
            base | {"log_format": "a system of its own", "log_system": "HTTPChannel,1,127.0.0.1"},
            base | {"log_format": "{x}", "x": object.__new__(_Unprintable)},
            base | {"log_format": b"bytes {x}", "x": 1},
        ]
        ours = self.assertSameLines(events)
        self.assertIn("called yes", ours)
        self.assertIn("Unable to format event", ours)
        self.assertIn("ValueError: boom", ours)
        self.assertIn("two\n\tlines and\n\tthree", ours)

    def test_no_format_no_line(self) -> None:
        self.assertEqual(self.assertSameLines([{"message": "legacy", "log_time": 1.0}]), "")


class _Unprintable:
    def __format__(self, spec: str) -> str:
        raise RuntimeError("cannot")

    def __repr__(self) -> str:
        return "<unprintable>"


class PlainAutobahnLogTests(SynchronousTestCase):
    def test_autobahn_styles_nothing(self) -> None:
        """The switch Autobahn reads on every call still turns its colours off (it is private)."""
        import autobahn.util

        self.patch(autobahn.util, "_HAS_CLICK", autobahn.util._HAS_CLICK)
        plain_autobahn_log()
        self.assertEqual(autobahn.util.hl("text", bold=True), "text")
        self.assertEqual(autobahn.util.hltype(PlainAutobahnLogTests),
                         f"<{__name__}.PlainAutobahnLogTests>")
