"""The import rule of the package map (docs/architecture.md), checked on every run.

gateway → proxy → common, relay → common: the two daemons never import each
other, the proxy core knows neither daemon, and `common` imports nothing else
of mcpr; the `mcpr` command (cli) imports the gateway's query commands.  A forbidden import fails here, naming the file and the line.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parents[1] / "mcpr"

# What each layer may import from mcpr (besides itself); "mcpr" is the top-level package (its version).
ALLOWED = {
    "common": set(),
    "proxy": {"common"},
    "gateway": {"proxy", "common", "mcpr"},
    "relay": {"common", "mcpr"},
    "cli": {"gateway"},  # the event store's query commands
    "mcpr": set(),
}


def layer_of(module: str) -> str:
    """`mcpr.relay.tunnels.h2` -> "relay"; `mcpr` (the package itself) -> "mcpr"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mcpr"


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def mcpr_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported mcpr module) for every import in the file, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "mcpr"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "mcpr":
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "relative import"))
    return found


def violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = layer_of(module_name(path))
        for line, imported in mcpr_imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if imported == "relative import":
                problems.append(f"{where}: relative import (write the absolute mcpr.* name)")
                continue
            target = layer_of(imported)
            if target != layer and target not in ALLOWED[layer]:
                problems.append(f"{where}: {layer} must not import {imported}")
    return problems


class LayeringTests(SynchronousTestCase):
    """The import walker, and that mcpr's imports go one way."""

    def test_imports_go_one_way(self) -> None:
        self.assertEqual(violations(), [])

    def test_the_check_sees_a_forbidden_import(self) -> None:
        """The walker itself: a relay module importing the gateway is caught, with its line."""
        probe = Path(self.mktemp())
        probe.write_text("import os\n\ndef f():\n    from mcpr.gateway.tunnel import TunnelClient\n")
        self.assertEqual(mcpr_imports(probe), [(4, "mcpr.gateway.tunnel")])
        self.assertEqual(layer_of("mcpr.relay.tunnels.h2"), "relay")
        self.assertNotIn(layer_of("mcpr.gateway.tunnel"), ALLOWED["relay"])
