#!/usr/bin/env python3
"""The child processes of bench/side_by_side.py, one role each (`python bench/_roles.py ROLE ...`).

    origin   an asyncio HTTP/1.1 server: POST (any path) the small JSON-RPC
             result, or the same after `?sleep=S` seconds; GET /mcp and
             GET /_sse a stamped SSE stream; GET /bulk?size=N N bytes;
             PUT /sink counts the body and answers its size.  Behind the
             nginx upstream it serves what nginx cannot (the SSE stream, the
             slow answers, the upload sink); without nginx it is the upstream.
             Prints its port, then serves until killed.
    sse      reads one SSE stream and prints the per-event latencies' figures
    bulk     moves one body (down: GET /bulk, up: PUT /sink), prints MB/s
    burst    N simultaneous POSTs that each take S seconds upstream
    idle     registers N tunnels on a relay (the registration exchange of
             docs/protocol.md, subprotocol mcpr-tunnel.h2, then an idle
             HTTP/2 server end as a gateway's), keeps them open until killed

Each client role prints one JSON line with its figures (idle: progress lines first).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import re
import socket
import sys
import time
from urllib.parse import parse_qs, urlsplit

from _common import (
    HOST,
    MCP_PATH,
    REQUEST_BODY,
    RESULT_BODY,
    STARTUP_TIMEOUT,
    BodyReader,
    Head,
    parse_head,
    percentile,
    post_request,
    read_body,
    read_head,
)

BULK_CHUNK = b"x" * (256 << 10)
SSE_EVENT = b'{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":{"t":%d,"n":%d}}}'
SSE_STAMP = re.compile(rb'"t":(\d+),"n":(\d+)')


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 4)


# ---------------------------------------------------------------------------
# origin


def answer() -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(RESULT_BODY), RESULT_BODY)


class Origin(asyncio.Protocol):
    """HTTP/1.1 keep-alive framing and the routes above."""

    sse_interval = 1 / 200

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=1 << 20)
        self.buf = b""
        self.sink: BodyReader | None = None
        self.bulk_left = 0
        self.paused = False
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.sink is not None:
            data = self.sink.feed(data)
            if not self.sink.done:
                return
            payload = b'{"size":%d}' % self.sink.received
            self.sink = None
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(payload), payload))
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = parse_head(buf[:end])
            if head.start_line.startswith(b"PUT "):  # the sink: counted as it arrives, never held
                self.sink = BodyReader(head, request=True)
                self.buf = b""
                self.data_received(buf[end + 4:])
                return
            if head.chunked:
                self.transport.write(b"HTTP/1.1 411 Length Required\r\nContent-Length: 0\r\n"
                                     b"Connection: close\r\n\r\n")
                self.transport.close()
                return
            start = end + 4
            stop = start + (head.length or 0)
            if len(buf) < stop:
                break
            buf = buf[stop:]
            if not self.respond(head):
                return  # the connection is the response's now (a stream)
            if head.close:
                self.transport.close()
                return
        self.buf = buf

    def respond(self, head: Head) -> bool:
        method, _, rest = head.start_line.partition(b" ")
        url = urlsplit(rest.rsplit(b" ", 1)[0].decode("latin-1"))
        query = parse_qs(url.query)
        if method == b"POST":
            if "sleep" in query:
                self.timer = asyncio.get_running_loop().call_later(float(query["sleep"][0]), self._late_answer)
            else:
                self.transport.write(answer())
        elif method == b"GET" and url.path == "/bulk":
            self._bulk(int(query.get("size", ["0"])[0]))
        elif method == b"GET" and url.path in (MCP_PATH, "/_sse"):
            self._sse()
            return False
        else:
            self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        return True

    def _late_answer(self) -> None:
        self.timer = None
        if not self.closed:
            self.transport.write(answer())

    # GET /bulk: written as fast as the reader takes it
    def _bulk(self, size: int) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Length: %d\r\n\r\n" % size)
        self.bulk_left = size
        self._produce()

    def _produce(self) -> None:
        chunk = len(BULK_CHUNK)
        while self.bulk_left > 0 and not self.paused and not self.closed:
            n = min(chunk, self.bulk_left)
            self.bulk_left -= n
            self.transport.write(BULK_CHUNK if n == chunk else BULK_CHUNK[:n])

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._produce()

    # GET /mcp: an event every sse_interval, stamped just before its write
    def _sse(self) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
        self.sse_n = 0
        self.sse_next = asyncio.get_running_loop().time()
        self._tick()

    def _tick(self) -> None:
        if self.closed:
            return
        n = self.sse_n
        payload = b"id: %d\ndata: %s\n\n" % (n, SSE_EVENT % (time.time_ns(), n))
        self.transport.write(b"%x\r\n%s\r\n" % (len(payload), payload))
        self.sse_n += 1
        self.sse_next += self.sse_interval
        self.timer = asyncio.get_running_loop().call_at(self.sse_next, self._tick)


def serve_origin(sse_rate: float) -> None:
    Origin.sse_interval = 1 / sse_rate
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(Origin, HOST, 0, backlog=4096))
    print(server.sockets[0].getsockname()[1], flush=True)
    loop.run_forever()


# ---------------------------------------------------------------------------
# sse


class _SSEReader(asyncio.Protocol):
    def __init__(self, request: bytes, measure_from: float, stop_at: float, done: asyncio.Future) -> None:
        self.request = request
        self.measure_from = measure_from
        self.stop_at = stop_at
        self.done = done
        self.buf = b""
        self.body: BodyReader | None = None
        self.events = b""
        self.latencies: list[float] = []
        self.last_n: int | None = None
        self.lost = 0
        self.error: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        arrived = time.time_ns()
        now = time.perf_counter()
        if self.body is None:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = parse_head(self.buf[:end])
            if head.status != 200:
                self.error = f"status-{head.status}"
                self.transport.close()
                return
            self.body = BodyReader(head, keep=True)
            data, self.buf = self.buf[end + 4:], b""
        self.body.feed(data)
        self.events += self.body.take()
        while True:
            end = self.events.find(b"\n\n")
            if end < 0:
                break
            event, self.events = self.events[:end], self.events[end + 2:]
            m = SSE_STAMP.search(event)
            if m is None:
                continue
            n = int(m.group(2))
            if self.last_n is not None and n != self.last_n + 1:
                self.lost += max(0, n - self.last_n - 1)
            self.last_n = n
            if self.measure_from <= now < self.stop_at:
                self.latencies.append((arrived - int(m.group(1))) / 1e9)
        if now >= self.stop_at:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def read_sse(port: int, host: str | None, warmup: float, duration: float) -> dict:
    loop = asyncio.get_running_loop()
    request = (f"GET {MCP_PATH} HTTP/1.1\r\nHost: {host or f'{HOST}:{port}'}\r\nAccept: text/event-stream\r\n"
               f"Cache-Control: no-store\r\n\r\n").encode()
    t0 = time.perf_counter()
    done = loop.create_future()
    transport, reader = await loop.create_connection(
        lambda: _SSEReader(request, t0 + warmup, t0 + warmup + duration, done), HOST, port)
    try:
        await asyncio.wait_for(done, warmup + duration + STARTUP_TIMEOUT)
    except asyncio.TimeoutError:
        reader.error = reader.error or "timeout"
        transport.abort()
    ordered = sorted(reader.latencies)
    return {"events": len(ordered), "p50_ms": _ms(percentile(ordered, 50)), "p90_ms": _ms(percentile(ordered, 90)),
            "p99_ms": _ms(percentile(ordered, 99)), "max_ms": _ms(ordered[-1] if ordered else None),
            "lost": reader.lost, "error": reader.error}


# ---------------------------------------------------------------------------
# bulk


def bulk_transfer(port: int, host: str | None, op: str, size: int) -> dict:
    host = host or f"{HOST}:{port}"
    sock = socket.create_connection((HOST, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    result: dict = {"op": op, "size": size, "status": None, "bytes": 0, "error": None}
    try:
        started = time.perf_counter()
        if op == "down":
            sock.sendall(f"GET /bulk?size={size} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head, rest = read_head(sock)
            result["ttfb_ms"] = round((time.perf_counter() - started) * 1000, 3)
            result["bytes"] = read_body(sock, head, rest, keep=False).received
        else:
            sock.sendall(f"PUT /sink HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
                         f"Content-Length: {size}\r\n\r\n".encode())
            block = memoryview(b"\0" * (1 << 20))
            left = size
            while left > 0:
                n = min(left, len(block))
                sock.sendall(block[:n])
                left -= n
            result["sent_ms"] = round((time.perf_counter() - started) * 1000, 3)
            head, rest = read_head(sock)
            answer_body = read_body(sock, head, rest, keep=True).take()
            try:
                result["bytes"] = json.loads(answer_body)["size"]
            except (ValueError, KeyError, TypeError):
                result["error"] = f"answer: {answer_body[:200]!r}"
        seconds = time.perf_counter() - started
        result["status"] = head.status
        result["seconds"] = round(seconds, 4)
        result["mbps"] = round(result["bytes"] / seconds / 1e6, 1)
        if result["status"] != 200:
            result["error"] = f"status {result['status']}"
        elif result["bytes"] != size:
            result["error"] = result["error"] or f"{result['bytes']} bytes instead of {size}"
    except OSError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        sock.close()
    return result


# ---------------------------------------------------------------------------
# burst


async def _burst(port: int, host: str | None, n: int, sleep: float, timeout: float) -> dict:
    request = post_request(host or f"{HOST}:{port}", f"{MCP_PATH}?sleep={sleep:g}", REQUEST_BODY)
    t0 = time.perf_counter()
    results: list[dict] = []

    async def one() -> None:
        c0 = time.perf_counter()
        writer = None
        out: dict = {"status": None}
        results.append(out)
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            out["connect_s"] = time.perf_counter() - c0
            writer.write(request)
            raw = await reader.readuntil(b"\r\n\r\n")
            head = parse_head(raw[:-4])
            body = BodyReader(head)
            while not body.done:
                data = await reader.read(65536)
                if not data:
                    break
                body.feed(data)
            out["status"] = head.status
            out["done_s"] = time.perf_counter() - t0
            out["latency_s"] = time.perf_counter() - c0 - out["connect_s"]
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            out["error"] = type(e).__name__
        finally:
            if writer is not None:
                writer.close()

    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    statuses = collections.Counter(str(r["status"]) for r in results if r["status"] is not None)
    errors = collections.Counter(r.get("error", "timeout") for r in results if r["status"] is None)
    ok = [r for r in results if r["status"] == 200]
    done = sorted(r["done_s"] for r in results if "done_s" in r)
    latency = sorted(r["latency_s"] for r in ok)
    connects = sorted(r["connect_s"] for r in results if "connect_s" in r)
    return {"requests": n, "sleep_s": sleep, "ok": len(ok), "by_status": dict(statuses), "errors": dict(errors),
            "all_ok_s": round(done[-1], 4) if len(ok) == n and done else None,
            "last_answer_s": round(done[-1], 4) if done else None,
            "latency_p50_ms": _ms(percentile(latency, 50)), "latency_max_ms": _ms(latency[-1] if latency else None),
            "connect_max_ms": _ms(connects[-1] if connects else None),
            "slow_connects": sum(1 for c in connects if c >= 0.9)}  # the kernel's first SYN retry is after 1 s


# ---------------------------------------------------------------------------
# idle


def idle_tunnels(port: int, count: int, window: int, prefix: str) -> None:
    """Registers `count` tunnels, `window` at a time; prints progress, then one JSON line; keeps them open."""
    from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.settings import SettingCodes
    from twisted.internet import reactor

    state = {"started": 0, "registered": 0, "failed": 0, "closed_after": 0, "t0": time.perf_counter(),
             "reported": False}
    failures: collections.Counter[str] = collections.Counter()
    url = f"ws://{HOST}:{port}/_tunnel/register"

    class Idle(WebSocketClientProtocol):
        index = 0
        registered = False
        h2: H2Connection | None = None

        def onOpen(self) -> None:
            self.sendMessage(json.dumps({"token": f"{prefix}-token-{self.index}",
                                         "subdomain": f"{prefix}{self.index}"}).encode())

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            if isBinary:
                if self.h2 is not None:
                    self.h2.receive_data(payload)
                    out = self.h2.data_to_send()
                    if out:
                        self.sendMessage(out, isBinary=True)
                return
            message = json.loads(payload)
            if "url" not in message:
                failures[f"unexpected message: {str(message)[:60]}"] += 1
                self.sendClose(1000)
                return
            self.registered = True
            # The gateway's end of the tunnel: an HTTP/2 server with its settings (mcpr/gateway/h2_server.py).
            h2 = H2Connection(H2Configuration(client_side=False))
            h2.local_settings.update({SettingCodes.MAX_CONCURRENT_STREAMS: 1024,
                                      SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
            h2.initiate_connection()
            h2.increment_flow_control_window((8 << 20) - 65535)
            self.h2 = h2
            self.sendMessage(h2.data_to_send(), isBinary=True)
            state["registered"] += 1
            finished()

        def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
            if self.registered:
                state["closed_after"] += 1
            else:
                state["failed"] += 1
                failures[f"{code} {reason or ''}".strip()] += 1
                finished()

    class Factory(WebSocketClientFactory):
        def buildProtocol(self, addr):  # type: ignore[no-untyped-def]
            proto = super().buildProtocol(addr)
            proto.index = self.index  # type: ignore[attr-defined]
            return proto

    def start_one() -> None:
        i = state["started"]
        state["started"] += 1
        factory = Factory(url, protocols=["mcpr-tunnel.h2"])
        factory.index = i  # type: ignore[attr-defined]
        factory.protocol = Idle
        factory.setProtocolOptions(openHandshakeTimeout=60, closeHandshakeTimeout=5)
        connectWS(factory, timeout=60)

    def finished() -> None:
        done = state["registered"] + state["failed"]
        if done % 1000 == 0 or done == count:
            print(f"progress {state['registered']} {state['failed']}", flush=True)
        if state["started"] < count:
            start_one()
        elif done >= count and not state["reported"]:
            state["reported"] = True
            print(json.dumps({"requested": count, "registered": state["registered"], "failed": state["failed"],
                              "failures": dict(failures.most_common(5)),
                              "seconds": round(time.perf_counter() - state["t0"], 3),
                              "client_cpu_s": round(time.process_time(), 3)}), flush=True)

    for _ in range(min(window, count)):
        start_one()
    reactor.run()


# ---------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=("origin", "sse", "bulk", "burst", "idle"))
    parser.add_argument("--port", type=int)
    parser.add_argument("--host")
    parser.add_argument("--sse-rate", type=float, default=200.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--op", choices=("down", "up"))
    parser.add_argument("--size", type=int)
    parser.add_argument("--count", type=int)
    parser.add_argument("--sleep", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--prefix", default="idle")
    a = parser.parse_args()
    gc.disable() if a.role in ("sse", "burst") else None  # bounded runs; no collector pauses in the figures
    if a.role == "origin":
        serve_origin(a.sse_rate)
    elif a.role == "sse":
        print(json.dumps(asyncio.run(read_sse(a.port, a.host, a.warmup, a.duration))), flush=True)
    elif a.role == "bulk":
        print(json.dumps(bulk_transfer(a.port, a.host, a.op, a.size)), flush=True)
    elif a.role == "burst":
        print(json.dumps(asyncio.run(_burst(a.port, a.host, a.count, a.sleep, a.timeout))), flush=True)
    elif a.role == "idle":
        idle_tunnels(a.port, a.count, a.window, a.prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
