"""`twist mcpr-relay`: options and the service of the relay daemon."""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from mcpr import __version__
from mcpr.common.settings import ConfigError, cli_values, options_from
from mcpr.relay.service import RelayService
from mcpr.relay.settings import RELAY_SETTINGS, load_relay


@options_from(RELAY_SETTINGS)
class Options(usage.Options):
    """`twist mcpr-relay`'s options: the settings table's, plus `--config`, `--version` and the
    original mcpr's `--relay`."""

    synopsis = "--domain tunnel.example.com [--listen ENDPOINT ...] [options]"
    longdesc = (
        "Run the mcpr relay: gateways register tunnels at /_tunnel/register and are served at "
        "https://<name>.<domain>. Settings: command line, then MCPR_AUTH_PROVIDER* environment variables, "
        "then the config file ([relay] and [[relay.tokens]] tables), then defaults."
    )
    optFlags = [
        ["version", None, "Print the version and exit."],
        ["relay", None, "Accepted for compatibility (the original mcpr's `--relay`); does nothing."],
    ]
    optParameters = [
        ["config", "c", None, "Config file (default: ./mcpr.toml or the nearest parent's)."],
    ]

    def opt_version(self) -> None:
        print(f"mcpr {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        args = {"cli": cli_values(RELAY_SETTINGS, self), "config": self["config"]}
        try:
            self["settings"] = load_relay(**args)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self["reload"] = args


def makeService(options: usage.Options, reactor=None) -> IService:
    if reactor is None:
        from twisted.internet import reactor
    return RelayService(options["settings"], reactor, reload_args=options["reload"])
