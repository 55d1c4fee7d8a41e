"""mcpr: an MCP-aware proxy with a built-in tunnel, and the relay it connects to."""

__version__ = "0.1.0"
