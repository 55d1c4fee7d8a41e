"""The `mcpr` command: the original mcpr's command lines, run by `twist`, and the store's query commands.

`mcpr --mcp URL ...` is `twist mcpr --mcp URL ...`, and `mcpr --relay ...` is
`twist mcpr-relay ...`; options are the plugins' own, so there is one CLI to
document and test.  Logs are text unless `--log-format` says otherwise.
`mcpr logs ...` (or any other name in `QUERY_COMMANDS`) asks the gateway's
event store instead, with no reactor: `mcpr.gateway.store.commands`, imported
only then, so that starting a daemon does not pay for it.
"""

from __future__ import annotations

import runpy
import sys

# First arguments that are questions to the event store: the subcommands of mcpr.gateway.store.commands.
QUERY_COMMANDS = ("logs", "slow", "sessions", "session", "clients", "status", "schema")

# `twist` options that may precede the plugin's, in either spelling.
_TWIST_OPTIONS = ("--log-format", "--log-level", "--log-file", "--reactor")


def twist_argv(argv: list[str]) -> list[str]:
    """The `twist` command line for an `mcpr` command line (without the program name)."""
    plugin = "mcpr"
    twist_args: list[str] = []
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--relay":
            plugin = "mcpr-relay"
        elif arg.split("=", 1)[0] in _TWIST_OPTIONS:
            twist_args.append(arg if "=" in arg else f"{arg}={next(args, '')}")
        else:
            rest.append(arg)
    if not any(a.startswith("--log-format") for a in twist_args):
        twist_args.insert(0, "--log-format=text")
    return ["twist", *twist_args, plugin, *rest]


def usage(relay: bool) -> str:
    """`mcpr --help`: this command's own usage line (twist's would name `python -m twisted` and the
    plugin), then the options of the plugin it runs, found as twist finds it."""
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    plugin = "mcpr-relay" if relay else "mcpr"
    maker = next(m for m in getPlugins(IServiceMaker) if m.tapname == plugin)
    if relay:
        head = ["Usage: mcpr --relay [options]", "",
                "Runs the relay, as `twist mcpr-relay [options]` does."]
    else:
        head = ["Usage: mcpr [--relay] [options]", "",
                "Runs the gateway, as `twist mcpr [options]` does; with --relay, the relay",
                "(`twist mcpr-relay`), whose options `mcpr --relay --help` lists."]
    head += ["twist's --log-format (text unless given), --log-level, --log-file and --reactor are", "taken too.", ""]
    return "\n".join(head) + "\n" + maker.options().getUsage()


def main() -> None:
    """A query command, or `python -m twisted` (the documented way to run `twist`) on the translated
    command line."""
    if len(sys.argv) > 1 and sys.argv[1] in QUERY_COMMANDS:
        from mcpr.gateway.store.commands import main as query

        sys.exit(query(sys.argv[1:]))
    if "--help" in sys.argv[1:]:
        print(usage("--relay" in sys.argv[1:]), end="")
        sys.exit(0)
    sys.argv[:] = twist_argv(sys.argv[1:])
    runpy.run_module("twisted", run_name="__main__", alter_sys=True)
