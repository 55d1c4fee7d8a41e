"""Checks shared by the daemons' settings tests: the generated `usage.Options` covers the table."""

from __future__ import annotations

from typing import Sequence

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from mcpr.common.settings import Setting, cli_values


def assert_options_cover(testcase: SynchronousTestCase, options: type[usage.Options],
                         table: Sequence[Setting]) -> None:
    """Every setting with help text is an option (and each of its aliases is one) whose value lands
    under the setting's name and nowhere else, with its help line in `--help`; the others are not
    options at all."""

    class Probe(options):  # type: ignore[misc, valid-type]
        def postOptions(self) -> None:
            self["cli"] = cli_values(table, self)

    help_text = " ".join(str(options()).split())
    for s in table:
        if s.help is None:
            testcase.assertNotIn(f"--{s.spelling}=", help_text, s.name)
            testcase.assertRaises(usage.UsageError, Probe().parseOptions, [f"--{s.spelling}", "given"])
            continue
        testcase.assertIn(s.help, help_text, s.name)
        for spelling in (s.spelling, *(alias for alias, _ in s.aliases)):
            probe = Probe()
            probe.parseOptions([f"--{spelling}"] if s.flag else [f"--{spelling}", "given"])
            expected = True if s.flag else ["given"] if s.repeatable else "given"
            given = {name: value for name, value in probe["cli"].items() if value is not None}
            testcase.assertEqual(given, {s.name: expected}, spelling)
