"""The `mcpr` console script maps the original spelling onto the twist plugins."""

import subprocess
import sys
from pathlib import Path

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mcpr import __version__
from mcpr.cli import twist_argv, usage


class CliTests(SynchronousTestCase):
    """The `mcpr` console script's argument mapping onto `twist`, and the plugins it relies on."""

    def test_gateway(self) -> None:
        """Without --relay the arguments go to the gateway's plugin."""
        self.assertEqual(twist_argv(["--mcp", "http://localhost:9000"]),
                         ["twist", "--log-format=text", "mcpr", "--mcp", "http://localhost:9000"])

    def test_relay(self) -> None:
        """--relay selects the relay's plugin and is not passed on."""
        self.assertEqual(twist_argv(["--relay", "--relay-domain", "d.example", "--port", "8080"]),
                         ["twist", "--log-format=text", "mcpr-relay", "--relay-domain", "d.example",
                          "--port", "8080"])

    def test_twist_options_pass_through(self) -> None:
        self.assertEqual(twist_argv(["--log-format", "json", "--mcp", "u", "--log-level=debug"]),
                         ["twist", "--log-format=json", "--log-level=debug", "mcpr", "--mcp", "u"])

    def test_help_names_this_command_and_both_daemons(self) -> None:
        """`mcpr --help` says `mcpr [--relay] [options]`, lists the gateway's options and points to the
        relay's; `mcpr --relay --help` lists the relay's."""
        gateway = usage(relay=False)
        self.assertTrue(gateway.startswith("Usage: mcpr [--relay] [options]\n"), gateway)
        self.assertIn("--relay-url=", gateway)
        self.assertIn("`mcpr --relay --help` lists", gateway)
        self.assertNotIn("python -m twisted", gateway)
        relay = usage(relay=True)
        self.assertTrue(relay.startswith("Usage: mcpr --relay [options]\n"), relay)
        self.assertIn("--relay-domain=", relay)
        self.assertIn("--static-token=", relay)

    def test_plugins_are_discoverable(self) -> None:
        names = {p.tapname for p in getPlugins(IServiceMaker)}
        for tapname in ("mcpr", "mcpr-relay"):
            self.assertIn(tapname, names)

    def test_console_script_runs_the_plugins(self) -> None:
        """The installed `mcpr` script really starts `twist`: the gateway's and the relay's option
        parsers answer (a wrong option is their one-line usage error, not a traceback)."""
        script = Path(sys.executable).parent / "mcpr"
        if not script.exists():
            raise SkipTest(f"no installed console script at {script}")
        version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
        self.assertEqual((version.returncode, version.stdout.strip()), (0, f"mcpr {__version__}"))
        for args, first in ((["--help"], "Usage: mcpr [--relay] [options]"),
                            (["--relay", "--help"], "Usage: mcpr --relay [options]")):
            shown = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=60)
            self.assertEqual((shown.returncode, shown.stdout.splitlines()[0]), (0, first), shown.stderr)
        relay = subprocess.run([str(script), "--relay", "--no-such-option"], capture_output=True, text=True,
                               timeout=60)
        self.assertNotEqual(relay.returncode, 0)
        self.assertIn("no-such-option", relay.stdout + relay.stderr)
        self.assertNotIn("Traceback", relay.stdout + relay.stderr)
