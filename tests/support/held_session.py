#!/usr/bin/env python3
"""An MCP SDK client that calls one tool and keeps its session open until its standard input closes.

    python tests/support/held_session.py URL TOOL JSON-ARGUMENTS

Prints one JSON line `{"session_id": ..., "result": [text, ...]}` once the call is answered, then
waits; when standard input reaches its end, the client leaves the session (DELETE) and exits.
For tests that need a live session after a call: the inspector's replay of it.
"""

from __future__ import annotations

import json
import sys

import anyio
import httpx2
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client


class SessionId(httpx2.AsyncBaseTransport):
    """A pass-through transport that notes the `Mcp-Session-Id` the server gave."""

    def __init__(self) -> None:
        self.inner = httpx2.AsyncHTTPTransport()
        self.session_id: str | None = None

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self.inner.handle_async_request(request)
        self.session_id = response.headers.get("mcp-session-id") or self.session_id
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def main(url: str, tool: str, arguments: dict) -> None:
    tap = SessionId()
    async with httpx2.AsyncClient(transport=tap, timeout=httpx2.Timeout(30.0, read=300.0)) as http:
        transport = streamable_http_client(url, http_client=http, terminate_on_close=True)
        async with Client(transport, mode="legacy", read_timeout_seconds=20) as client:
            result = await client.call_tool(tool, arguments)
            texts = [getattr(part, "text", None) for part in result.content]
            print(json.dumps({"session_id": tap.session_id, "result": texts}), flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
