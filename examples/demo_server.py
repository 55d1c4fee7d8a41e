#!/usr/bin/env python3
"""A small MCP server to put behind mcpr (and to exercise it in tests).

It is built with the official MCP Python SDK (``mcp`` 2.x, where ``FastMCP``
is now ``mcp.server.mcpserver.MCPServer``) and served over the *streamable
HTTP* transport at ``/mcp``, with stateful sessions: ``initialize`` returns an
``Mcp-Session-Id`` header, later requests carry it, and ``DELETE /mcp`` ends
the session.

What it demonstrates, i.e. the kinds of traffic an MCP-aware proxy must carry:

* ``add(a, b)``      - a plain request/response tool call;
* ``count(n)``       - a tool that sends ``n`` ``notifications/progress``
                       messages on the POST's SSE response stream before the
                       result (the client must ask for progress by sending a
                       ``progressToken``);
* ``notify(message)``- returns at once, then ~0.2 s later sends a
                       ``notifications/resources/list_changed`` that is *not*
                       related to any request, so the server delivers it on the
                       session's standalone ``GET /mcp`` SSE stream;
* ``big(size)``      - returns a text of exactly ``size`` bytes (bulk tests);
* resource ``demo://greeting`` and prompt ``review(code)``;
* ``show_greeting(name)`` and its widget ``ui://widget/greeting.html`` - an
                       MCP App (ChatGPT apps, Claude connectors) written for
                       localhost: its Content Security Policy names
                       ``localhost`` domains in both the OpenAI and the Claude
                       shape, which mcpr rewrites for the public URL.

Run it::

    python examples/demo_server.py [--host 127.0.0.1] [--port 9000]

``--port 0`` picks a free port. Once the server accepts connections it prints
exactly one line to stdout, ``LISTENING http://<host>:<port>/mcp``; logs go to
stderr. SIGTERM or SIGINT shuts it down gracefully (exit status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings

log = logging.getLogger("demo_server")

server = MCPServer("demo-server", version="1.0", log_level="WARNING")


# --- tools -----------------------------------------------------------------


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
async def count(n: int, ctx: Context) -> str:
    """Count to n, reporting progress at every step."""
    for i in range(1, n + 1):
        await asyncio.sleep(0.05)
        # Sent as `notifications/progress` on this request's SSE response
        # stream (a no-op if the client did not send a progressToken).
        await ctx.report_progress(i, n, f"step {i}/{n}")
    return f"counted to {n}"


# Background tasks must be referenced somewhere, or they may be garbage
# collected before they finish.
_background_tasks: set[asyncio.Task[None]] = set()


@server.tool()
async def notify(message: str, ctx: Context) -> str:
    """Return now; shortly after, send a server-initiated notification.

    The notification is sent through `ctx.session` *without* a
    `related_request_id`, so the SDK routes it to the session's standalone
    channel - the `GET /mcp` SSE stream - rather than to this request's POST
    response (which is already finished by then anyway).
    """
    session = ctx.session

    async def notify_later() -> None:
        await asyncio.sleep(0.2)
        try:
            await session.send_resource_list_changed()
        except Exception:  # e.g. the client ended the session meanwhile
            log.warning("could not send resources/list_changed", exc_info=True)

    task = asyncio.create_task(notify_later())
    _background_tasks.add(task)
    task.add_done_callback(_background_tasks.discard)
    return f"will send notifications/resources/list_changed in 0.2s ({message})"


@server.tool(structured_output=False)
def big(size: int) -> str:
    """Return a text of exactly `size` bytes (a repeating ASCII pattern)."""
    pattern = "0123456789abcdefghijklmnopqrstuvwxyz\n"
    return (pattern * (size // len(pattern) + 1))[:size]


# --- resources and prompts -------------------------------------------------


@server.resource("demo://greeting", name="greeting", mime_type="text/plain")
def greeting() -> str:
    """A static greeting."""
    return "Hello from demo-server!"


@server.prompt()
def review(code: str) -> str:
    """Ask for a code review."""
    return f"Please review this code:\n\n{code}"


# --- a widget --------------------------------------------------------------

WIDGET_URI = "ui://widget/greeting.html"

# Rendered by the AI client in a sandboxed iframe; its assets would come from a
# local build server, which is why the CSP below names localhost.
GREETING_WIDGET = """<!doctype html>
<div id="greeting"></div>
<script type="module" src="http://localhost:5173/greeting.js"></script>
"""

# What a widget declares when written for a laptop: fine on this machine, wrong
# once the server is reached through a public URL (mcpr fixes it at the edge).
WIDGET_META = {
    "openai/widgetCSP": {
        "connect_domains": ["http://localhost:9000", "https://api.open-meteo.com"],
        "resource_domains": ["http://localhost:5173", "https://fonts.gstatic.com"],
    },
    "ui": {
        "csp": {
            "connectDomains": ["http://localhost:9000", "https://api.open-meteo.com"],
            "resourceDomains": ["http://localhost:5173", "https://fonts.gstatic.com"],
        },
        "prefersBorder": True,
    },
    "openai/widgetDescription": "A card that greets someone.",
}


@server.tool(meta={"openai/outputTemplate": WIDGET_URI, "ui": {"resourceUri": WIDGET_URI}})
def show_greeting(name: str) -> str:
    """Greet someone with a widget."""
    return f"Hello, {name}!"


@server.resource(WIDGET_URI, name="greeting-widget", mime_type="text/html+skybridge", meta=WIDGET_META)
def greeting_widget() -> str:
    """The greeting card's HTML."""
    return GREETING_WIDGET


# --- serving ---------------------------------------------------------------


def build_app(host: str):
    """The Starlette app serving MCP at /mcp (stateful sessions, SSE responses)."""
    # DNS-rebinding protection: only accept a Host (and, if present, Origin)
    # naming this machine. A reverse proxy such as mcpr forwards requests with
    # `Host: 127.0.0.1:<port>`, which is allowed here.
    loopback = ["127.0.0.1", "localhost", "[::1]"]
    if host not in loopback and host not in ("0.0.0.0", "::"):
        loopback.append(f"[{host}]" if ":" in host else host)
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{h}:*" for h in loopback],
        allowed_origins=[f"http://{h}:*" for h in loopback],
    )
    return server.streamable_http_app(
        streamable_http_path="/mcp",
        stateless_http=False,  # issue Mcp-Session-Id, keep per-session state
        json_response=False,  # answer POSTs with SSE streams (needed for progress)
        transport_security=security,
    )


async def serve(host: str, port: int) -> None:
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    bound_port = sock.getsockname()[1]

    config = uvicorn.Config(
        build_app(host),
        log_level="warning",
        # Open SSE streams are closed on shutdown; this bounds the wait anyway.
        timeout_graceful_shutdown=3,
    )
    uvicorn_server = uvicorn.Server(config)

    # While serving, uvicorn handles SIGINT/SIGTERM itself (graceful shutdown)
    # and afterwards re-raises the signal so that the handler installed before
    # it ran. Make that handler "just ask uvicorn to stop", so the final
    # re-raise is harmless and the process exits with status 0.
    def request_exit(signum: int, frame: object) -> None:
        uvicorn_server.should_exit = True

    signal.signal(signal.SIGINT, request_exit)
    signal.signal(signal.SIGTERM, request_exit)

    serving = asyncio.create_task(uvicorn_server.serve(sockets=[sock]))
    while not uvicorn_server.started:
        if serving.done():  # startup failed
            await serving
            raise SystemExit("server failed to start")
        await asyncio.sleep(0.01)

    shown_host = f"[{host}]" if ":" in host else host
    print(f"LISTENING http://{shown_host}:{bound_port}/mcp", flush=True)
    await serving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="port to listen on; 0 picks a free one (default: 9000)")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port))
    except OSError as exc:
        print(f"demo_server: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
