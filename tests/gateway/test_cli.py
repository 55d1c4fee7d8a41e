"""The `mcpr` console script maps the original spelling onto the twist plugins."""

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from mcpr.cli import twist_argv


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

    def test_plugins_are_discoverable(self) -> None:
        names = {p.tapname for p in getPlugins(IServiceMaker)}
        for tapname in ("mcpr", "mcpr-relay"):
            self.assertIn(tapname, names)
