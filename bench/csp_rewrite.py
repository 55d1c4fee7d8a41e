#!/usr/bin/env python3
"""What the widget CSP rewrite costs on a 1 MB `tools/list` answer, against json.loads + json.dumps.

    .venv/bin/python bench/csp_rewrite.py [--size BYTES] [--rounds N] [--json]

The document is a `tools/list` result of realistic tools (a paragraph of
description, an input schema, and OpenAI plus Claude widget metadata written
for localhost), repeated until the JSON-RPC answer is about --size bytes.
Each case goes through the code the proxy runs, fed in 64 KiB chunks as the
upstream socket would deliver them, with the public origin of a tunnel:

    baseline      json.dumps(json.loads(body)) of the same bytes
    json          JsonRewriter: hold the body, parse, rewrite every tool's _meta, serialize
    sse           EventStreamRewriter: the same answer as one SSE event
    json, no meta the same rewrite of tools without widget metadata (parse, walk, nothing to change)
    call, parsed  a `tools/call` answer of the same size, no metadata (half a text content, half
                  `structuredContent` records), parsed and walked, as every such answer on a
                  public tunnel was before 2026-12-03
    call, screened the same answer as the proxy passes it now: its bytes hold no metadata member
                  and no embedded resource (`csp.could_change`), so it is not parsed

Times are the median of --rounds runs in the same process, the cases taking
turns; the ratios to the baseline are the figures that carry across machines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable

from twisted.web.http_headers import Headers

from mcpr.proxy import jsonrpc
from mcpr.proxy.rewrite.csp import CspPolicy, CspRewriter, could_change
from mcpr.proxy.rewrite.plan import answers_transform
from mcpr.proxy.rewrite.streaming import EventStreamRewriter, JsonRewriter

PUBLIC = "https://abc123.tunnel.example.com"
CHUNK = 64 * 1024


def tool(i: int, meta: bool) -> dict:
    out = {
        "name": f"tool_{i}",
        "title": f"Tool number {i}",
        "description": ("Looks up the thing the user asked about and shows it in a widget. " * 8).strip(),
        "inputSchema": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "What to look up"},
                           "limit": {"type": "integer", "minimum": 1, "maximum": 50}},
            "required": ["query"],
        },
        "annotations": {"readOnlyHint": True},
    }
    if meta:
        out["_meta"] = {
            "openai/outputTemplate": f"ui://widget/tool-{i}.html",
            "openai/toolInvocation/invoking": "Looking it up",
            "openai/widgetAccessible": True,
            "openai/widgetCSP": {"connect_domains": ["http://localhost:8000", "https://api.example.com"],
                                 "resource_domains": ["http://localhost:4444", "https://*.oaistatic.com"]},
            "ui": {"resourceUri": f"ui://widget/tool-{i}.html",
                   "csp": {"connectDomains": ["http://127.0.0.1:8000"], "resourceDomains": ["http://[::1]:4444"]}},
        }
    return out


def document(size: int, meta: bool) -> bytes:
    tools: list[dict] = []
    body = b""
    while len(body) < size:
        tools.extend(tool(len(tools) + i, meta) for i in range(50))
        body = json.dumps({"jsonrpc": "2.0", "id": 7, "result": {"tools": tools}}).encode()
    return body


def call_answer(size: int) -> bytes:
    """A `tools/call` result of about `size` bytes: half a text content, half structured records."""
    text = "A line of what the tool found, as a server returns it. " * (size // 112 + 1)
    rows = [{"id": i, "name": f"row {i}", "tags": ["a", "b"], "score": i / 2, "ok": True} for i in range(size // 160)]
    return json.dumps({"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text": text}],
                                                              "structuredContent": {"rows": rows}}}).encode()


REQUEST = jsonrpc.parse(b'{"jsonrpc":"2.0","id":7,"method":"tools/list"}')
CALL = jsonrpc.parse(b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"t"}}')


def transform(request: jsonrpc.Batch = REQUEST):
    csp = CspRewriter(CspPolicy(), PUBLIC, "localhost")
    return answers_transform(request, csp, {})


def run_call(body: bytes, screened: bool) -> bytes:
    out: list[bytes] = []
    rewriter = JsonRewriter(transform(CALL), out.append, Headers(), screen=could_change if screened else None)
    for i in range(0, len(body), CHUNK):
        rewriter.feed(body[i:i + CHUNK])
    rewriter.finish()
    return b"".join(out)


def run_json(body: bytes) -> bytes:
    out: list[bytes] = []
    rewriter = JsonRewriter(transform(), out.append, Headers())
    for i in range(0, len(body), CHUNK):
        rewriter.feed(body[i:i + CHUNK])
    rewriter.finish()
    return b"".join(out)


def run_sse(stream: bytes) -> bytes:
    out: list[bytes] = []
    rewriter = EventStreamRewriter(transform(), out.append)
    for i in range(0, len(stream), CHUNK):
        rewriter.feed(stream[i:i + CHUNK])
    rewriter.finish()
    return b"".join(out)


def baseline(body: bytes) -> bytes:
    return json.dumps(json.loads(body)).encode()


def median_ms(cases: dict[str, tuple[Callable[[bytes], bytes], bytes]], rounds: int) -> dict[str, float]:
    """Each case's median time; the cases take turns, so a busy moment costs them all alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn, data in cases.values():
        fn(data)  # warm up
    for _ in range(rounds):
        for name, (fn, data) in cases.items():
            start = time.perf_counter()
            fn(data)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1 << 20)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()

    body = document(args.size, meta=True)
    plain = document(args.size, meta=False)
    stream = b"event: message\r\nid: 1\r\ndata: " + body + b"\r\n\r\n"
    rewritten = json.loads(run_json(body))
    meta = rewritten["result"]["tools"][0]["_meta"]
    assert meta["openai/widgetCSP"]["connect_domains"] == [PUBLIC, "https://api.example.com"], meta
    assert b'"openai/widgetDomain"' in run_sse(stream)
    answer = call_answer(args.size)
    assert run_call(answer, True) == run_call(answer, False) == answer

    cases = median_ms({
        "baseline (loads+dumps)": (baseline, body),
        "json rewrite": (run_json, body),
        "sse rewrite": (run_sse, stream),
        "json rewrite, no meta": (run_json, plain),
        "tools/call, parsed": (lambda b: run_call(b, False), answer),
        "tools/call, screened": (lambda b: run_call(b, True), answer),
    }, args.rounds)
    base = cases["baseline (loads+dumps)"]
    tools = len(rewritten["result"]["tools"])
    if args.json:
        print(json.dumps({"bytes": len(body), "tools": tools, "python": sys.version.split()[0],
                          "ms": cases, "ratio": {k: v / base for k, v in cases.items()}}))
        return
    print(f"tools/list answer: {len(body):,} bytes, {tools} tools with widget metadata; "
          f"median of {args.rounds} runs, Python {sys.version.split()[0]}")
    for name, ms in cases.items():
        print(f"  {name:24} {ms:8.2f} ms   {ms / base:5.2f} x baseline")


if __name__ == "__main__":
    main()
