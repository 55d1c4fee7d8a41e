#!/usr/bin/env python3
"""Run one complete MCP session against a streamable-HTTP endpoint and report it.

Uses the official MCP Python SDK client (``mcp`` 2.x: ``mcp.client.Client`` on
top of ``mcp.client.streamable_http.streamable_http_client``, which speaks HTTP
through ``httpx2``). Written against ``examples/demo_server.py``, typically
with mcpr in between::

    python examples/mcp_session.py URL [--json] [--header NAME:VALUE ...] [--quick] [--timeout S]

The full session (default):

1. ``initialize``         - server name/version, protocol version, Mcp-Session-Id
2. ``tools/list``
3. ``tools/call add(2,3)``
4. ``tools/call count(3)`` with a progress callback: every
   ``notifications/progress`` must arrive (on the POST's SSE stream) before
   the result
5. ``resources/read demo://greeting``
6. ``prompts/get review``
7. ``tools/call notify``  - the server then sends a notification unrelated to
   any request; it must arrive on the standalone ``GET`` SSE stream, which the
   SDK client opens by itself right after ``initialize``
8. close                  - the SDK client sends ``DELETE`` with the
   ``Mcp-Session-Id``

``--quick`` does only steps 1, 3 and 8. (Note that the SDK client follows the
first successful ``tools/call`` of a tool it has not listed yet with a
``tools/list``, to validate structured output against the tool's schema; so
even ``--quick`` sends a ``tools/list``.)

Besides the SDK's own callbacks, the script watches the HTTP exchanges
(a pass-through httpx2 transport, ``WireTap``) so that it can tell *which* HTTP
stream carried each message, when it arrived, and whether the DELETE was sent.

Output: one line per step, or with ``--json`` a single JSON object. Exit status
0 on success; otherwise 1 with the reason on stderr. The whole run is bounded
by ``--timeout`` (default 30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import mcp_types as types
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

NOTIFY_WAIT_S = 5.0  # how long to wait for the GET-stream notification
GET_STREAM_WAIT_S = 5.0  # how long to wait for the GET stream to be open


class SessionFailed(Exception):
    """A step of the session did not go as expected."""


# --- observing the HTTP exchanges ------------------------------------------


@dataclass
class Exchange:
    """One HTTP request/response, and the JSON-RPC messages seen in its body."""

    http_method: str
    rpc_method: str | None  # JSON-RPC method of a POSTed message, if any
    rpc_id: Any
    sent_session_id: str | None
    status: int | None = None
    content_type: str = ""
    session_id: str | None = None  # Mcp-Session-Id response header
    # (ms since start, kind, JSON-RPC id): kind is a notification/request method,
    # "result" or "error"; from SSE response bodies only.
    frames: list[tuple[float, str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.http_method,
            "rpc": self.rpc_method,
            "status": self.status,
            "content_type": self.content_type.split(";")[0],
            "frames": [kind for _, kind, _ in self.frames],
        }


class _SSEFrameParser:
    """Incrementally split an SSE body into events and report their JSON-RPC kind."""

    def __init__(self, on_frame):
        self._on_frame = on_frame
        self._buffer = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if not sep:
                return
            self._buffer = rest
            line = line.rstrip(b"\r")
            if not line:
                self._dispatch()
            elif line.startswith(b"data:"):
                self._data.append(line[5:].removeprefix(b" "))

    def _dispatch(self) -> None:
        data, self._data = b"\n".join(self._data), []
        if not data:
            return  # e.g. a priming event, or a comment/keep-alive
        try:
            message = json.loads(data)
        except ValueError:
            self._on_frame("unparsable", None)
            return
        if "method" in message:
            self._on_frame(message["method"], message.get("id"))
        elif "error" in message:
            self._on_frame("error", message.get("id"))
        else:
            self._on_frame("result", message.get("id"))


class _TappedStream(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, parser: _SSEFrameParser):
        self._inner = inner
        self._parser = parser

    async def __aiter__(self):
        async for chunk in self._inner:
            self._parser.feed(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class WireTap(httpx2.AsyncBaseTransport):
    """A pass-through httpx2 transport that records every exchange."""

    def __init__(self, clock: Clock):
        self._inner = httpx2.AsyncHTTPTransport()  # plain HTTP/1.1 (and https)
        self._clock = clock
        self.exchanges: list[Exchange] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        rpc_method, rpc_id = None, None
        if request.method == "POST":
            try:
                body = json.loads(request.content)
                rpc_method, rpc_id = body.get("method"), body.get("id")
                if rpc_method is None:
                    rpc_method = "(response)"
            except (ValueError, AttributeError, httpx2.RequestNotRead):
                pass
        exchange = Exchange(request.method, rpc_method, rpc_id, request.headers.get("mcp-session-id"))
        self.exchanges.append(exchange)

        response = await self._inner.handle_async_request(request)
        exchange.status = response.status_code
        exchange.content_type = response.headers.get("content-type", "")
        exchange.session_id = response.headers.get("mcp-session-id")
        if not exchange.content_type.startswith("text/event-stream"):
            return response

        def on_frame(kind: str, rpc_id: Any) -> None:
            exchange.frames.append((self._clock.ms(), kind, rpc_id))

        return httpx2.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_TappedStream(response.stream, _SSEFrameParser(on_frame)),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()

    # queries

    def get_streams(self) -> list[Exchange]:
        """The standalone GET SSE streams (opened by the SDK after initialize)."""
        return [e for e in self.exchanges if e.http_method == "GET" and e.content_type.startswith("text/event-stream")]

    def post_for(self, rpc_method: str) -> Exchange | None:
        return next((e for e in reversed(self.exchanges) if e.rpc_method == rpc_method), None)


class Clock:
    def __init__(self) -> None:
        self._t0 = time.monotonic()

    def ms(self) -> float:
        return round((time.monotonic() - self._t0) * 1000, 1)


# --- the session -----------------------------------------------------------


def _text_of(result: types.CallToolResult) -> str:
    return "".join(block.text for block in result.content if isinstance(block, types.TextContent))


async def _call_tool(client: Client, name: str, arguments: dict[str, Any], **kwargs: Any) -> types.CallToolResult:
    result = await client.call_tool(name, arguments, **kwargs)
    if result.is_error:
        raise SessionFailed(f"tools/call {name} returned an error: {_text_of(result)}")
    return result


async def run_session(url: str, headers: dict[str, str], quick: bool, report: dict[str, Any]) -> None:
    """Run the session, filling `report` as it goes (so a failure still shows progress)."""
    clock = Clock()
    tap = WireTap(clock)
    seen = SeenNotifications(clock)
    http_client = httpx2.AsyncClient(
        headers=headers,  # sent on every request: POSTs, the GET stream and the DELETE
        transport=tap,
        timeout=httpx2.Timeout(30.0, read=300.0),  # the SDK's defaults
    )
    report["mode"] = "quick" if quick else "full"
    # Every key is present in the report, even when its step is skipped (--quick) or not reached.
    for key in ("server_name", "server_version", "protocol_version", "session_id", "tools", "add_result",
                "count_result", "count_result_ms", "progress_before_result", "progress_streamed", "resource_text",
                "prompt_messages", "get_stream_opened", "get_stream_notification", "get_stream_notification_delay_ms",
                "deleted", "delete_status"):
        report.setdefault(key, None)
    for key in ("progress_events", "count_wire_events", "notifications"):
        report.setdefault(key, [])
    try:
        await _run_session(url, http_client, tap, clock, seen, quick, report)
    finally:
        report["http"] = [e.summary() for e in tap.exchanges]  # on failure too


async def _run_session(
    url: str,
    http_client: httpx2.AsyncClient,
    tap: WireTap,
    clock: Clock,
    seen: SeenNotifications,
    quick: bool,
    report: dict[str, Any],
) -> None:
    async with http_client:
        transport = streamable_http_client(url, http_client=http_client, terminate_on_close=True)
        # mode="legacy": use the initialize handshake and a stateful session.
        # The default ("auto") first probes `server/discover` and, against a
        # 2026-07-28-capable server such as MCPServer, then uses the session-less
        # per-request protocol instead (no Mcp-Session-Id, no GET stream).
        client = Client(transport, mode="legacy", message_handler=seen.on_message, read_timeout_seconds=20)
        async with client:  # 1. initialize
            await initialize_step(client, tap, report)
            if not quick:
                await tools_list_step(client, report)
            await add_step(client, report)
            if not quick:
                await count_step(client, tap, clock, report)
                await resource_step(client, report)
                await prompt_step(client, report)
                await get_stream_step(client, tap, clock, seen, report)
        # 8. leaving `async with client` closed the session: DELETE /mcp
        finish(report, tap, seen)


class SeenNotifications:
    """What the SDK's message handler received: every server notification."""

    def __init__(self, clock: Clock):
        self._clock = clock
        self.items: list[tuple[float, str]] = []  # (ms, method)
        self.changed = anyio.Event()
        self.transport_errors: list[str] = []

    async def on_message(self, message: Any) -> None:
        if isinstance(message, Exception):  # transport-level trouble is reported here too
            self.transport_errors.append(repr(message))
            return
        self.items.append((self._clock.ms(), message.method))
        self.changed.set()
        self.changed = anyio.Event()


async def initialize_step(client: Client, tap: WireTap, report: dict[str, Any]) -> None:
    info = client.server_info
    report["server_name"] = info.name if info else None
    report["server_version"] = info.version if info else None
    report["protocol_version"] = client.protocol_version
    init = tap.post_for("initialize")
    report["session_id"] = init.session_id if init else None
    if not report["session_id"]:
        raise SessionFailed("initialize: no Mcp-Session-Id in the response (stateless server?)")
    step(report, "initialize", f"{report['server_name']} {report['server_version']} "
         f"(session {report['session_id'][:8]}…, protocol {report['protocol_version']})")


async def tools_list_step(client: Client, report: dict[str, Any]) -> None:
    tools = await client.list_tools()
    report["tools"] = sorted(tool.name for tool in tools.tools)
    step(report, "tools/list", ", ".join(report["tools"]))


async def add_step(client: Client, report: dict[str, Any]) -> None:
    result = await _call_tool(client, "add", {"a": 2, "b": 3})
    structured = result.structured_content
    value = structured.get("result") if isinstance(structured, dict) else None
    if value is None:
        text = _text_of(result).strip()
        value = int(text) if text.lstrip("-").isdigit() else text
    report["add_result"] = value
    if value != 5:
        raise SessionFailed(f"tools/call add(2,3) returned {value!r}, expected 5")
    step(report, "tools/call add(2,3)", str(value))


async def count_step(client: Client, tap: WireTap, clock: Clock, report: dict[str, Any]) -> None:
    progress_events: list[dict[str, Any]] = []
    report["progress_events"] = progress_events

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        progress_events.append({"progress": progress, "total": total, "message": message, "ms": clock.ms()})

    result = await _call_tool(client, "count", {"n": 3}, progress_callback=on_progress)
    result_ms = clock.ms()
    report["count_result"] = _text_of(result)
    report["count_result_ms"] = result_ms

    # What arrived on that POST's SSE response stream, in order.
    post = tap.post_for("tools/call")  # the latest tools/call: this one
    wire = [(ms, kind) for ms, kind, _ in post.frames] if post else []
    report["count_wire_events"] = [{"kind": kind, "ms": ms} for ms, kind in wire]
    kinds = [kind for _, kind in wire]
    wire_ok = kinds == ["notifications/progress"] * 3 + ["result"]
    callbacks_ok = len(progress_events) == 3 and all(e["ms"] <= result_ms for e in progress_events)
    report["progress_before_result"] = wire_ok and callbacks_ok
    # Streamed rather than buffered by an intermediary: the server sleeps 50 ms
    # per step, so the first progress message comes ~100 ms before the result.
    report["progress_streamed"] = wire_ok and (wire[-1][0] - wire[0][0]) >= 50
    if not report["progress_before_result"]:
        raise SessionFailed(f"tools/call count(3): progress did not all arrive before the result "
                            f"(wire: {kinds}, progress callbacks: {len(progress_events)})")
    steps = ", ".join(f"{e['progress']:g}/{e['total']:g}" for e in progress_events)
    streamed = "" if report["progress_streamed"] else ", but all at once: buffered?"
    step(report, "tools/call count(3)", f"{report['count_result']} (progress {steps} before the result{streamed})")


async def resource_step(client: Client, report: dict[str, Any]) -> None:
    resource = await client.read_resource("demo://greeting")
    report["resource_text"] = "".join(c.text for c in resource.contents if isinstance(c, types.TextResourceContents))
    step(report, "resources/read demo://greeting", repr(report["resource_text"]))


async def prompt_step(client: Client, report: dict[str, Any]) -> None:
    prompt = await client.get_prompt("review", {"code": "print('hi')"})
    report["prompt_messages"] = [
        {"role": m.role, "text": m.content.text if isinstance(m.content, types.TextContent) else None}
        for m in prompt.messages
    ]
    if not report["prompt_messages"]:
        raise SessionFailed("prompts/get review returned no messages")
    first = report["prompt_messages"][0]
    step(report, "prompts/get review", f"{len(prompt.messages)} message(s), {first['role']}: {first['text']!r}")


async def get_stream_step(
    client: Client, tap: WireTap, clock: Clock, seen: SeenNotifications, report: dict[str, Any]
) -> None:
    # The SDK client opens the standalone GET stream by itself once it has sent
    # `notifications/initialized`; make sure it is up, or the server would have
    # nowhere to deliver the notification (without an event store it is dropped).
    with anyio.move_on_after(GET_STREAM_WAIT_S):
        while not tap.get_streams():
            await anyio.sleep(0.01)
    report["get_stream_opened"] = bool(tap.get_streams())
    if not report["get_stream_opened"]:
        raise SessionFailed("the SDK client did not open the GET SSE stream")

    report["get_stream_notification"] = None
    sent_ms = clock.ms()
    already_seen = len(seen.items)
    await _call_tool(client, "notify", {"message": "hello"})
    # Wait for a notification that the message handler got *and* that the
    # wire tap saw on the GET stream (not on a POST response).
    with anyio.move_on_after(NOTIFY_WAIT_S):
        while True:
            on_get = {kind for g in tap.get_streams() for ms, kind, _ in g.frames if ms >= sent_ms}
            found = [(ms, method) for ms, method in seen.items[already_seen:] if method in on_get]
            if found:
                ms, method = found[0]
                report["get_stream_notification"] = method
                report["get_stream_notification_delay_ms"] = round(ms - sent_ms, 1)
                break
            await seen.changed.wait()
    if report["get_stream_notification"] is None:
        raise SessionFailed(f"no server notification arrived on the GET stream within {NOTIFY_WAIT_S:g}s")
    step(report, "GET stream", f"{report['get_stream_notification']} "
         f"({report['get_stream_notification_delay_ms']:.0f} ms after calling notify)")


def step(report: dict[str, Any], name: str, outcome: str) -> None:
    report.setdefault("steps", []).append(f"{name} -> {outcome}")


def finish(report: dict[str, Any], tap: WireTap, seen: SeenNotifications) -> None:
    deletes = [e for e in tap.exchanges if e.http_method == "DELETE"]
    delete = deletes[-1] if deletes else None
    report["deleted"] = bool(
        delete is not None and delete.sent_session_id == report.get("session_id") and delete.status in (200, 204)
    )
    report["delete_status"] = delete.status if delete else None
    on_get = {kind for g in tap.get_streams() for _, kind, _ in g.frames}
    report["notifications"] = [
        {"method": method, "ms": ms, "stream": "GET" if method in on_get else "POST"} for ms, method in seen.items
    ]
    if seen.transport_errors:
        report["transport_errors"] = seen.transport_errors
    if delete is None:
        raise SessionFailed("closing the session did not send DELETE")
    step(report, "DELETE", f"{delete.status} (session {'terminated' if report['deleted'] else 'NOT terminated'})")
    if not report["deleted"]:
        raise SessionFailed(f"DELETE answered {delete.status}")


# --- command line ----------------------------------------------------------


def describe_failure(exc: BaseException, timeout: float, report: dict[str, Any]) -> str:
    """A one-line reason for a failed run."""
    # The SDK runs its transport in task groups: unwrap (nested) exception groups.
    while isinstance(exc, BaseExceptionGroup):
        exc = next((e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)), exc.exceptions[0])
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s"
    elif isinstance(exc, SessionFailed):
        reason = str(exc)
    elif isinstance(exc, MCPError):
        reason = f"MCP error {exc.code}: {exc}"
    elif isinstance(exc, httpx2.HTTPError):
        reason = f"HTTP failure: {type(exc).__name__}: {exc or 'no details'}"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    failed = [h for h in report.get("http", []) if h["status"] is None or h["status"] >= 400]
    if failed:
        last = failed[-1]
        what = " ".join(x for x in (last["method"], last["rpc"]) if x)
        got = f"HTTP {last['status']}" if last["status"] is not None else "no response"
        reason += f" ({got} for {what})"
    return reason


def parse_headers(values: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for value in values:
        name, sep, content = value.partition(":")
        if not sep or not name.strip():
            raise SystemExit(f"mcp_session: --header wants NAME:VALUE, got {value!r}")
        headers[name.strip()] = content.strip()
    return headers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the MCP endpoint, e.g. http://127.0.0.1:9000/mcp")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a transcript")
    parser.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                        help="extra HTTP header for every request (repeatable), e.g. 'Host: sub.localhost'")
    parser.add_argument("--quick", action="store_true", help="only initialize and tools/call add(2,3)")
    parser.add_argument("--timeout", type=float, default=30.0, help="give up after this many seconds (default 30)")
    args = parser.parse_args()
    headers = parse_headers(args.header)

    report: dict[str, Any] = {"url": args.url}
    started = time.monotonic()
    error: str | None = None

    async def run() -> None:
        with anyio.fail_after(args.timeout):
            await run_session(args.url, headers, args.quick, report)

    try:
        anyio.run(run)
    except BaseException as exc:  # noqa: BLE001 - report anything, incl. the SDK's exception groups
        if isinstance(exc, KeyboardInterrupt):
            raise
        error = describe_failure(exc, args.timeout, report)

    report["elapsed_s"] = round(time.monotonic() - started, 3)
    report["ok"] = error is None
    report["error"] = error
    if args.json:
        print(json.dumps(report))
    else:
        for line in report.get("steps", []):
            print(line)
        if error is None:
            print(f"ok ({report['mode']} session in {report['elapsed_s']:.2f}s)")
    if error is not None:
        print(f"mcp_session: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
