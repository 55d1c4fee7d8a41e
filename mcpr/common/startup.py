"""How both daemons start under `twist`: a mistake is one line, and the log is text.

`twist` answers a `UsageError` from a plugin's options with the error and then
its whole usage text, about 50 lines, so that `systemctl status` and
`journalctl -n 20` show the usage and not the error; and an exception from
`makeService` or from starting the service tree is a traceback.  Neither tells
a user what to fix.  Here, every such mistake ends `twist` with one line on
standard error (`mcpr: <where>: <what>: <what to do>`) and exit status 64,
twist's own for a usage error.  Logging has not started at that point (twist
starts it once the tree has started), so standard error is the only place the
line can go.

`twist` also logs Twisted's JSON format (about 600 bytes a line) whenever its
log file is not a terminal: under systemd, in a pipe or a file.  Both daemons
are read by people first, so they log text unless `--log-format` says
otherwise, and `--log-format=text` (the Dockerfile's) gets the same cheaper text observer
(`mcpr.common.text_log`) as the default.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn, Sequence

from twisted.application.service import MultiService
from twisted.python import usage

from mcpr.common.settings import ConfigError
from mcpr.common.text_log import text_log_observer

# `twist`'s status for a usage error (sysexits.h EX_USAGE); systemd shows it as "64/USAGE".
EXIT_STATUS = os.EX_USAGE


def fail(program: str, message: str) -> NoReturn:
    """Print `program: message` on standard error and end the process with `EXIT_STATUS`."""
    sys.stderr.write(f"{program}: {message}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_STATUS)


@contextmanager
def one_line_errors(program: str) -> Iterator[None]:
    """A `ConfigError` raised inside (building the service tree: an endpoint, a file) ends `twist`
    with its one line."""
    try:
        yield
    except ConfigError as e:
        fail(program, str(e))


# The shortest abbreviation of `--log-format` that getopt (which `twist` parses with) accepts: a
# shorter one, `--log-f`, is ambiguous with `--log-file`.
_LOG_FORMAT = "--log-format"
_LOG_FORMAT_SHORTEST = len("--log-fo")


def log_format_given(argv: Sequence[str], plugin: str) -> bool:
    """Whether `twist`'s own `--log-format` is among its arguments before the plugin's name."""
    for arg in argv:
        if arg == plugin:
            return False
        name = arg.split("=", 1)[0]
        if len(name) >= _LOG_FORMAT_SHORTEST and _LOG_FORMAT.startswith(name):
            return True
    return False


class DaemonOptions(usage.Options):
    """The base of both daemons' options: parsed as a `twist` plugin (`parent` is then twist's
    own options), a usage or configuration error is one line and the exit, and the log is text
    unless `twist --log-format` was given.

    Parsed on their own (tests, tools), the options raise `UsageError` as any `usage.Options`.
    """

    # The plugin's name under `twist`, which starts its error lines.
    program = "mcpr"

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            hint = "" if isinstance(e, SettingError) else f" (`twist {self.program} --help` lists the options)"
            fail(self.program, f"{e}{hint}")
        if self.parent is not None:
            self._adjust_twist_log(self.parent)

    def stdout_taken(self) -> bool:
        """Whether the daemon writes its own output to standard output, which the log must then
        leave to it (the gateway's `--events -`)."""
        return False

    def _adjust_twist_log(self, twist: usage.Options) -> None:
        """Text logs by default, and off standard output when the daemon's output is there.

        `twist` keeps no record of whether `--log-format` was given (its default is stored the
        same way), hence the look at the command line it parsed, `sys.argv`."""
        if twist.get("logFormat") == "text" or not log_format_given(sys.argv[1:], twist.subCommand or self.program):
            twist["fileLogObserverFactory"] = text_log_observer
            twist["logFormat"] = "text"
        if self.stdout_taken() and twist.get("logFile") is sys.stdout:
            twist["logFile"] = sys.stderr


class SettingError(usage.UsageError):
    """A `ConfigError` found while parsing the options: its message names the option or key and
    says what is expected, so no pointer to `--help` follows it."""


def freeze_start_up_heap() -> None:
    """Leave what the daemon built to start out of every later garbage collection.

    CPython's full collection walks every object the collector tracks, and under load it runs
    about once a second: the objects of the requests in flight at each young collection count
    as long-lived, and a full collection follows once those reach a quarter of the long-lived
    heap.  Nearly all of that heap is the start-up's (modules, classes, the service tree: some
    70,000 objects), and it lives as long as the process.  Measured on the gateway at c64 (wrk,
    8 s, the bench's origin): eleven full collections took 0.45 s, 5.7 % of its CPU, and with the
    start-up heap frozen 0.05 s; req/s went up 9-17 % in two interleaved pairs.  Each such pause
    is also a stall of every stream the process carries.

    Frozen objects are never collected: garbage in a reference cycle among them stays.  At this
    point no connection exists yet, so only what start-up made is frozen; a reload that replaces
    part of it leaves at most that part behind once.
    """
    gc.collect()
    gc.freeze()


class Daemon(MultiService):
    """The root of a daemon's service tree: a `ConfigError` while it starts (a listener that
    cannot listen) ends `twist` with its one line.

    The services that started before are stopped first, as far as that goes without a running
    reactor: a worker thread left running (the relay's reservations store has one) would keep
    the process from exiting.  With `freeze_heap` (the daemon under `twist`, not a test's
    process), the tree's start ends with `freeze_start_up_heap`.
    """

    def __init__(self, program: str, *, freeze_heap: bool = False) -> None:
        super().__init__()
        self.program = program
        self.freeze_heap = freeze_heap

    def startService(self) -> None:
        try:
            super().startService()
        except ConfigError as e:
            for service in reversed(list(self)):
                if service.running:
                    service.stopService()
            fail(self.program, str(e))
        if self.freeze_heap:
            freeze_start_up_heap()
