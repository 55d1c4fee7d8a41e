#!/usr/bin/env python3
"""The example MCP server (examples/demo_server.py) after a change to its tools, for `mcpr schema --changes`:
`add` takes an optional third integer, `notify` is gone and `shout` is new.  Same command line and
`LISTENING` line as the example."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import demo_server  # noqa: E402

demo_server.server.remove_tool("add")
demo_server.server.remove_tool("notify")


@demo_server.server.tool()
def add(a: int, b: int, c: int = 0) -> int:
    """Add two or three integers."""
    return a + b + c


@demo_server.server.tool()
def shout(text: str) -> str:
    """Say it louder."""
    return text.upper()


if __name__ == "__main__":
    demo_server.main()
