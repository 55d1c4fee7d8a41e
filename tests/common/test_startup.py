"""The start-up rules both daemons share under `twist` (the processes themselves: tests/e2e/test_startup.py)."""

from __future__ import annotations

import gc
import sys

from twisted.application.service import Service
from twisted.logger import jsonFileLogObserver, textFileLogObserver
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from mcpr.common.settings import ConfigError
from mcpr.common.startup import EXIT_STATUS, Daemon, DaemonOptions, SettingError, log_format_given
from mcpr.common.text_log import text_log_observer


class Probe(DaemonOptions):
    program = "probe"
    optParameters = [["value", None, None, "A value."]]

    def postOptions(self) -> None:
        if self["value"] == "bad":
            raise SettingError("option --value: expected good, got \"bad\"")

    def stdout_taken(self) -> bool:
        return self["value"] == "stdout"


class Twist(usage.Options):
    """Stands for twist's own options: a parent with one subcommand and its log keys."""

    subCommands = [["probe", None, Probe, "The probe."]]

    def __init__(self) -> None:
        super().__init__()
        self["fileLogObserverFactory"] = jsonFileLogObserver
        self["logFormat"] = "json"
        self["logFile"] = sys.stdout


class LogFormatGivenTests(SynchronousTestCase):
    def test_before_the_plugin_only(self) -> None:
        self.assertTrue(log_format_given(["--log-format=json", "mcpr"], "mcpr"))
        self.assertTrue(log_format_given(["--log-format", "json", "mcpr"], "mcpr"))
        self.assertTrue(log_format_given(["--log-fo=json", "mcpr-relay"], "mcpr-relay"))  # getopt's abbreviation
        self.assertFalse(log_format_given(["--log-f=x", "mcpr"], "mcpr"))  # ambiguous: getopt refuses it
        self.assertFalse(log_format_given(["--log-file=x", "--log-level=debug", "mcpr"], "mcpr"))
        self.assertFalse(log_format_given(["mcpr", "--log-format=json"], "mcpr"))


class DaemonOptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.written: list[str] = []
        self.patch(sys, "argv", ["twist", "probe"])
        self.patch(sys.stderr, "write", self.written.append)

    def test_alone_errors_are_usage_errors(self) -> None:
        """Parsed on their own (tests, tools), the options raise as any usage.Options."""
        self.assertRaises(SettingError, Probe().parseOptions, ["--value", "bad"])
        self.assertRaises(usage.UsageError, Probe().parseOptions, ["--other"])

    def test_under_twist_an_error_is_one_line_and_the_exit(self) -> None:
        e = self.assertRaises(SystemExit, Twist().parseOptions, ["probe", "--value", "bad"])
        self.assertEqual(e.code, EXIT_STATUS)
        self.assertEqual(self.written, ['probe: option --value: expected good, got "bad"\n'])

    def test_an_unknown_option_points_to_help(self) -> None:
        self.assertRaises(SystemExit, Twist().parseOptions, ["probe", "--other"])
        self.assertEqual(self.written, ["probe: option --other not recognized (`twist probe --help` lists the options)\n"])

    def test_text_log_unless_asked(self) -> None:
        twist = Twist()
        twist.parseOptions(["probe"])
        self.assertEqual((twist["fileLogObserverFactory"], twist["logFormat"]), (text_log_observer, "text"))
        self.assertIs(twist["logFile"], sys.stdout)
        self.patch(sys, "argv", ["twist", "--log-format=json", "probe"])
        twist = Twist()
        twist.parseOptions(["probe"])
        self.assertEqual((twist["fileLogObserverFactory"], twist["logFormat"]), (jsonFileLogObserver, "json"))
        self.patch(sys, "argv", ["twist", "--log-format=text", "probe"])  # the Dockerfile's: the same lines
        twist = Twist()
        twist["fileLogObserverFactory"], twist["logFormat"] = textFileLogObserver, "text"
        twist.parseOptions(["probe"])
        self.assertEqual((twist["fileLogObserverFactory"], twist["logFormat"]), (text_log_observer, "text"))

    def test_the_log_leaves_stdout_to_the_daemons_output(self) -> None:
        twist = Twist()
        twist.parseOptions(["probe", "--value", "stdout"])
        self.assertIs(twist["logFile"], sys.stderr)


class _Started(Service):
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def stopService(self) -> None:
        super().stopService()
        self.log.append("stopped")


class _Refusing(Service):
    def startService(self) -> None:
        super().startService()
        raise ConfigError("option --listen: cannot listen on tcp:1: Permission denied: ...")


class DaemonTests(SynchronousTestCase):
    def test_under_twist_the_start_up_heap_is_frozen(self) -> None:
        """Only with freeze_heap (as the taps pass under twist): a test's own process stays as it is."""
        self.addCleanup(gc.unfreeze)
        before = gc.get_freeze_count()
        Daemon("probe").startService()
        self.assertEqual(gc.get_freeze_count(), before)
        made_at_start = [[]]  # a container the collector tracks, made before the start
        self.assertTrue(any(o is made_at_start for o in gc.get_objects()))
        daemon = Daemon("probe", freeze_heap=True)
        daemon.startService()
        self.assertTrue(daemon.running)
        self.assertGreater(gc.get_freeze_count(), before)
        self.assertFalse(any(o is made_at_start for o in gc.get_objects()),
                         "frozen: out of the collector's generations")

    def test_a_config_error_at_start_stops_what_started_and_exits(self) -> None:
        written: list[str] = []
        self.patch(sys.stderr, "write", written.append)
        log: list[str] = []
        daemon = Daemon("probe")
        _Started(log).setServiceParent(daemon)
        _Refusing().setServiceParent(daemon)
        never = _Started(log)
        never.setServiceParent(daemon)
        e = self.assertRaises(SystemExit, daemon.startService)
        self.assertEqual(e.code, EXIT_STATUS)
        self.assertEqual(written, ["probe: option --listen: cannot listen on tcp:1: Permission denied: ...\n"])
        self.assertEqual(log, ["stopped"])  # the one that started, not the one that never did
        self.assertFalse(never.running)
