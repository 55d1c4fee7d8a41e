#!/usr/bin/env python3
"""What the tunnel costs: relay + tunnel + gateway, against the gateway alone and the upstream alone.

    .venv/bin/python bench/tunnel.py [--duration S] [--json]

What it measures, in one run, each figure beside its baselines from the same run
    1. Small requests: JSON-RPC `tools/call` POSTs sent back to back on N
       keep-alive connections (N = 1, 16, 64), as in bench/proxy_overhead.py,
       over three paths: *upstream* (straight to the upstream), *gateway*
       (to the gateway's own listener: direct mode) and *tunnel* (to the relay
       with `Host: bench.localhost:<port>`, so relay -> tunnel -> gateway ->
       upstream).  Requests per second, p50 / p90 / p99 latency, and what the
       relay and tunnel add: tunnel minus gateway, tunnel minus upstream.
    2. SSE: the upstream's GET /mcp stream sends an event every 1/rate s
       (200/s by default), each a JSON-RPC notification stamped with
       time.time_ns() just before the write.  A reader process takes
       time.time_ns() when the bytes arrive; per-event latency = arrival -
       stamp (one clock, one machine).  Read straight from the upstream,
       through the gateway and through the tunnel, one after the other, each
       stream on its own (no other load).
    3. Bulk: a 100 MiB download (GET /bulk?size=N, Content-Length, written
       with backpressure) and a 100 MiB upload (PUT /sink, Content-Length;
       the upstream counts the bytes and answers their number), straight to
       the upstream, through the gateway and through the tunnel, each one
       --bulk-repeat times (3).  MB/s (10^6 bytes per second, request sent
       to last byte / answer received) of the median transfer, with the
       slowest and the fastest, and the peak growth of the relay's and the
       gateway's resident memory (VmRSS sampled every 10 ms) over its value
       just before each transfer, the largest of the repeats.

    Targets: >= 1,000 req/s through the tunnel at concurrency 16; <= 1.5 ms
    added at p50 at concurrency 1 (tunnel vs gateway); <= 5 ms added at p99
    per SSE event (tunnel vs gateway); >= 200 MB/s each way through the
    tunnel; <= 30 MB RSS growth of the relay and of the gateway during the
    tunnel transfers.  MET / MISSED is printed for each.

How
    Every party is its own process on 127.0.0.1: the upstream (this file,
    `--role upstream`: one asyncio Protocol serving the POSTs, the SSE stream,
    /bulk and /sink); the relay (`python -m twisted --log-format=text
    mcpr-relay --domain localhost --listen tcp:<free port>:interface=127.0.0.1
    --public-url http://*.localhost:<port> --max-request-body 200MiB`); the
    gateway (`python -m twisted --log-format=text mcpr --mcp <upstream>/mcp
    --listen tcp:0:interface=127.0.0.1 --relay-url http://127.0.0.1:<port>
    --subdomain bench --max-request-body 200MiB`, from an empty temporary
    directory, with MCPR_TUNNEL_TOKEN=bench-token and no other MCPR_*
    variable, so it writes no token file).  The *gateway* path is that same
    gateway process's own listener, its tunnel idle meanwhile.  The clients
    are this file again: `--role load` (bench/_common.py's load generator,
    1 s warm-up then --duration s), `--role sse` and `--role bulk` (blocking
    sockets, the body counted, not kept).

    The CPU each process spends in each measured window is read from /proc
    and shown as a share of one core, with "other": whatever else the machine
    ran meanwhile (all busy CPU time in /proc/stat minus ours).  Absolute
    figures depend on the machine: relay, gateway, upstream and client share
    its cores.  The point is the comparison within one run.

    With --json the table goes to stderr and a JSON object with all figures
    to stdout.  Exit status: 0 when the run completed (whether or not the
    targets were met), 1 when it could not run, 130 on Ctrl-C.  All child
    processes are stopped on exit, Ctrl-C and errors included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from _common import (
    DRAIN_TIMEOUT,
    HOST,
    MCP_PATH,
    STARTUP_TIMEOUT,
    Cell,
    Children,
    Head,
    UpstreamProtocol,
    concurrencies,
    cpu_seconds,
    fmt,
    gateway_log_summary,
    generate_load,
    log_summary,
    parse_head,
    readline,
    run_guarded,
    share,
    summarize,
    wait_for_log,
)

DOMAIN = "localhost"
SUBDOMAIN = "bench"
TUNNEL_TOKEN = "bench-token"
MAX_BODY = "200MiB"

BULK_SIZE = 100 << 20
BULK_CHUNK = b"x" * (256 << 10)
SSE_EVENT = b'{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":{"t":%d,"n":%d}}}'
SSE_STAMP = re.compile(rb'"t":(\d+),"n":(\d+)')

TARGET_TUNNEL_RPS = 1000.0  # through the tunnel at concurrency 16
TARGET_ADDED_P50_MS = 1.5  # at concurrency 1, tunnel vs gateway
TARGET_SSE_ADDED_P99_MS = 5.0  # per event, tunnel vs gateway
TARGET_BULK_MBPS = 200.0  # each way through the tunnel
TARGET_RSS_MB = 30.0  # growth of the relay and of the gateway during the tunnel transfers

VIAS = ("upstream", "gateway", "tunnel")
BULK_TIMEOUT = 120.0
SSE_WARMUP = 0.5


# ---------------------------------------------------------------------------
# Bodies read as they come: Content-Length, chunked, or up to the close.


class BodyReader:
    """Counts (and, if asked, keeps) a body fed in pieces; `feed` returns what lies past its end."""

    def __init__(self, head: Head, keep: bool = False) -> None:
        self.length = head.length
        self.chunked = head.chunked
        self.keep = keep
        self.received = 0
        self.done = not self.chunked and self.length == 0
        self.pieces: list[bytes] = []
        self._pending = b""
        self._left = 0  # of the current chunk
        self._skip = 0  # CRLF after a chunk
        self._trailers = False

    def take(self) -> bytes:
        data, self.pieces = b"".join(self.pieces), []
        return data

    def _got(self, data: bytes) -> None:
        self.received += len(data)
        if self.keep:
            self.pieces.append(data)

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return data
        if not self.chunked:
            if self.length is None:  # up to the close
                self._got(data)
                return b""
            need = self.length - self.received
            self._got(data[:need] if len(data) > need else data)
            self.done = self.received >= self.length
            return data[need:] if len(data) > need else b""
        buf = self._pending + data if self._pending else data
        self._pending = b""
        pos = 0
        while pos < len(buf):
            if self._left:
                piece = buf[pos:pos + self._left]
                self._got(piece)
                self._left -= len(piece)
                pos += len(piece)
                if not self._left:
                    self._skip = 2
                continue
            if self._skip:
                n = min(self._skip, len(buf) - pos)
                self._skip -= n
                pos += n
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                self._pending = buf[pos:]
                return b""
            line, pos = buf[pos:eol], eol + 2
            if self._trailers:
                if not line:
                    self.done = True
                    return buf[pos:]
                continue
            size = int(line.split(b";", 1)[0], 16)
            if size:
                self._left = size
            else:
                self._trailers = True
        return b""


# ---------------------------------------------------------------------------
# The upstream: `--role upstream` prints its port, then serves until killed.


class TunnelUpstream(UpstreamProtocol):
    """POST: the small JSON-RPC answer; GET /mcp: stamped SSE events; GET /bulk?size=N; PUT /sink."""

    sse_interval = 1 / 200

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=1 << 20)
        self.buf = b""
        self.sink: BodyReader | None = None
        self.bulk_left = 0
        self.paused = False
        self.closed = False
        self.sse: asyncio.TimerHandle | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.sse is not None:
            self.sse.cancel()

    def data_received(self, data: bytes) -> None:
        if self.sink is not None:
            data = self.sink.feed(data)
            if not self.sink.done:
                return
            payload = b'{"size":%d}' % self.sink.received
            self.sink = None
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(payload), payload))
            if not data:
                return
        super().data_received(data)

    def takes_body(self, head: Head) -> bool:
        """PUT /sink: the body is counted as it arrives, never held."""
        if head.start_line.startswith(b"PUT "):
            self.sink = BodyReader(head)
            return True
        return False

    def respond(self, head: Head, body: bytes) -> bool:
        method, _, rest = head.start_line.partition(b" ")
        if method != b"GET":
            return super().respond(head, body)
        url = urlsplit(rest.rsplit(b" ", 1)[0].decode("latin-1"))
        if url.path == "/bulk":
            self._bulk(int(parse_qs(url.query).get("size", ["0"])[0]))
        elif url.path == MCP_PATH:
            self._sse()
            return False
        else:
            self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        return True

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
        loop = asyncio.get_running_loop()
        self.sse_n = 0
        self.sse_next = loop.time()
        self._tick()

    def _tick(self) -> None:
        if self.closed:
            return
        n = self.sse_n
        payload = b"id: %d\ndata: %s\n\n" % (n, SSE_EVENT % (time.time_ns(), n))
        self.transport.write(b"%x\r\n%s\r\n" % (len(payload), payload))
        self.sse_n += 1
        self.sse_next += self.sse_interval
        self.sse = asyncio.get_running_loop().call_at(self.sse_next, self._tick)


def serve_upstream(sse_rate: float) -> None:
    TunnelUpstream.sse_interval = 1 / sse_rate
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(TunnelUpstream, HOST, 0, backlog=1024))
    print(server.sockets[0].getsockname()[1], flush=True)
    loop.run_forever()


# ---------------------------------------------------------------------------
# The SSE reader: `--role sse` prints one JSON line with the per-event latencies' figures.


class _SSEReader(asyncio.Protocol):
    def __init__(self, request: bytes, measure_from: float, stop_at: float, done: asyncio.Future) -> None:
        self.request = request
        self.measure_from = measure_from
        self.stop_at = stop_at
        self.done = done
        self.buf = b""
        self.head: Head | None = None
        self.body: BodyReader | None = None
        self.events = b""
        self.latencies: list[float] = []
        self.seen = 0
        self.last_n: int | None = None
        self.lost = 0
        self.error: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        arrived = time.time_ns()
        now = time.perf_counter()
        if self.body is None:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head = parse_head(self.buf[:end])
            status = self.head.start_line[9:12]
            if status != b"200":
                self.error = f"status-{status.decode('latin-1')}"
                self.transport.close()
                return
            self.body = BodyReader(self.head, keep=True)
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
                self.seen += 1
                self.latencies.append((arrived - int(m.group(1))) / 1e9)
        if now >= self.stop_at:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _read_sse(port: int, host: str | None, warmup: float, duration: float) -> dict:
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
    lat = summarize(reader.latencies, duration)
    return {"events": lat["requests"], "rate": lat["rps"], "p50_ms": lat["p50_ms"], "p90_ms": lat["p90_ms"],
            "p99_ms": lat["p99_ms"], "max_ms": lat["max_ms"], "mean_ms": lat["mean_ms"], "lost": reader.lost,
            "error": reader.error}


# ---------------------------------------------------------------------------
# The bulk client: `--role bulk` moves one body and prints one JSON line.


def _read_head(sock: socket.socket) -> tuple[Head, bytes]:
    buf = b""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return parse_head(buf[:end]), buf[end + 4:]
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before the response head")
        buf += data


def _read_body(sock: socket.socket, head: Head, rest: bytes, keep: bool) -> BodyReader:
    body = BodyReader(head, keep=keep)
    body.feed(rest)
    if not body.chunked and not keep:  # the fast path: count into one buffer
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while not body.done:
            want = len(buf) if body.length is None else min(len(buf), body.length - body.received)
            n = sock.recv_into(view, want)
            if not n:
                break
            body.received += n
            body.done = body.length is not None and body.received >= body.length
        return body
    while not body.done:
        data = sock.recv(1 << 20)
        if not data:
            break
        body.feed(data)
    return body


def bulk_transfer(port: int, host: str | None, op: str, size: int) -> dict:
    host = host or f"{HOST}:{port}"
    sock = socket.create_connection((HOST, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    result: dict = {"op": op, "size": size, "status": None, "bytes": 0, "error": None}
    try:
        started = time.perf_counter()
        if op == "down":
            sock.sendall(f"GET /bulk?size={size} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head, rest = _read_head(sock)
            result["ttfb_ms"] = round((time.perf_counter() - started) * 1000, 3)
            body = _read_body(sock, head, rest, keep=False)
            result["bytes"] = body.received
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
            head, rest = _read_head(sock)
            answer_body = _read_body(sock, head, rest, keep=True).take()
            try:
                result["bytes"] = json.loads(answer_body)["size"]
            except (ValueError, KeyError, TypeError):
                result["error"] = f"answer: {answer_body[:200]!r}"
        seconds = time.perf_counter() - started
        result["status"] = int(head.start_line[9:12])
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
# The orchestrator.


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def machine_busy_seconds() -> float | None:
    """CPU seconds spent by the whole machine so far, all cores (Linux)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class PeakRSS:
    """Samples processes' VmRSS every `interval` s in a thread, until stopped."""

    def __init__(self, pids: dict[str, int], interval: float = 0.01) -> None:
        self.pids = pids
        self.start = {name: rss_kib(pid) for name, pid in pids.items()}
        self.peak = dict(self.start)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.samples += 1
            for name, pid in self.pids.items():
                kib = rss_kib(pid)
                if kib is not None and (self.peak[name] is None or kib > self.peak[name]):
                    self.peak[name] = kib

    def stop(self) -> dict[str, dict]:
        self._stop.set()
        self._thread.join()
        return {name: {"before_mb": _mb(self.start[name]), "peak_mb": _mb(self.peak[name]),
                       "growth_mb": _mb(self.peak[name] - self.start[name])
                       if None not in (self.peak[name], self.start[name]) else None}
                for name in self.pids}


def _mb(kib: int | None) -> float | None:
    return None if kib is None else round(kib * 1024 / 1e6, 1)




class Bench:
    def __init__(self, args: argparse.Namespace, children: Children, workdir: Path) -> None:
        self.args = args
        self.children = children
        self.workdir = workdir
        self.watched: dict[str, int] = {}  # process name -> pid, for CPU shares
        self.paths: dict[str, tuple[int, str | None]] = {}  # via -> (port, Host header)

    def _cpu(self) -> dict[str, float | None]:
        return {name: cpu_seconds(pid) for name, pid in self.watched.items()} | {
            "_machine": machine_busy_seconds(), "_self": time.process_time()}

    @staticmethod
    def _share(before: dict, after: dict, wall: float, client: float | None) -> dict[str, float | None]:
        delta = {k: (after[k] - before[k]) if before.get(k) is not None and after.get(k) is not None else None
                 for k in before}
        out = {k: (round(v / wall, 3) if v is not None and wall > 0 else None)
               for k, v in delta.items() if not k.startswith("_")}
        if client is not None:
            out["client"] = round(client / wall, 3)
        machine = delta.pop("_machine")
        if machine is not None and wall > 0:
            ours = sum(v for v in delta.values() if v is not None) + (client or 0.0)
            out["other"] = round(max(0.0, machine - ours) / wall, 3)
        return out

    def _client(self, role: str, via: str, *extra: str) -> list[str]:
        port, host = self.paths[via]
        cmd = [sys.executable, __file__, "--role", role, "--port", str(port), *extra]
        return cmd + (["--host", host] if host else [])

    def run_cell(self, concurrency: int, via: str) -> Cell:
        a = self.args
        cmd = self._client("load", via, "--concurrency", str(concurrency), "--warmup", str(a.warmup),
                           "--duration", str(a.duration))
        with open(self.workdir / f"load-{via}-{concurrency}.log", "wb") as err:
            proc = self.children.start("load", cmd, stdout=subprocess.PIPE, stderr=err, bufsize=0)
        try:
            deadline = time.monotonic() + a.warmup + a.duration + DRAIN_TIMEOUT + STARTUP_TIMEOUT
            while readline(proc.stdout, deadline) != "window-start":
                pass
            t0, cpu0 = time.monotonic(), self._cpu()
            while readline(proc.stdout, deadline) != "window-end":
                pass
            t1, cpu1 = time.monotonic(), self._cpu()
            result = json.loads(readline(proc.stdout, deadline))
        finally:
            self.children.stop(proc)
        cpu = self._share(cpu0, cpu1, t1 - t0, result.pop("client_cpu_s"))
        return Cell(concurrency, via, "python", window_s=a.duration, cpu=cpu, **result)

    def run_sse(self, via: str) -> dict:
        a = self.args
        cmd = self._client("sse", via, "--warmup", str(SSE_WARMUP), "--duration", str(a.duration))
        with open(self.workdir / f"sse-{via}.log", "wb") as err:
            proc = self.children.start("sse", cmd, stdout=subprocess.PIPE, stderr=err, bufsize=0)
        try:
            t0, cpu0 = time.monotonic(), self._cpu()
            line = readline(proc.stdout, time.monotonic() + SSE_WARMUP + a.duration + 2 * STARTUP_TIMEOUT)
            t1, cpu1 = time.monotonic(), self._cpu()
        finally:
            self.children.stop(proc)
        return {"via": via} | json.loads(line) | {"cpu": self._share(cpu0, cpu1, t1 - t0, None)}

    def run_bulk(self, op: str, via: str) -> dict:
        cmd = self._client("bulk", via, "--op", op, "--size", str(self.args.bulk_size))
        rss = PeakRSS({k: v for k, v in self.watched.items() if k in ("relay", "gateway")})
        with open(self.workdir / f"bulk-{op}-{via}.log", "wb") as err:
            t0, cpu0 = time.monotonic(), self._cpu()
            proc = self.children.start("bulk", cmd, stdout=subprocess.PIPE, stderr=err, bufsize=0)
        try:
            line = readline(proc.stdout, time.monotonic() + BULK_TIMEOUT)
            t1, cpu1 = time.monotonic(), self._cpu()
        finally:
            memory = rss.stop()
            self.children.stop(proc)
        cpu = self._share(cpu0, cpu1, t1 - t0, None)
        cpu.pop("other", None)  # includes the client, which is not watched here
        return {"via": via} | json.loads(line) | {"rss": memory, "rss_samples": rss.samples, "cpu": cpu}


def combine_bulk(runs: list[dict]) -> dict:
    """Repeated transfers of one kind: the median run's figures, the largest RSS growth of any run."""
    ok = [r for r in runs if not r["error"]]
    ranked = sorted(ok, key=lambda r: r["mbps"])
    median = dict(ranked[len(ranked) // 2]) if ranked else dict(runs[0])
    median["runs"] = [{k: r.get(k) for k in ("mbps", "seconds", "error")} | {
        "rss_growth_mb": {p: v.get("growth_mb") for p, v in r["rss"].items()}} for r in runs]
    median["mbps_min"] = ranked[0]["mbps"] if ranked else None
    median["mbps_max"] = ranked[-1]["mbps"] if ranked else None
    median["error"] = next((r["error"] for r in runs if r["error"]), None)
    for proc in median["rss"]:
        growth = [r["rss"][proc]["growth_mb"] for r in runs if r["rss"][proc]["growth_mb"] is not None]
        peaks = [r["rss"][proc]["peak_mb"] for r in runs if r["rss"][proc]["peak_mb"] is not None]
        median["rss"][proc] = dict(median["rss"][proc], growth_mb=max(growth, default=None),
                                   peak_mb=max(peaks, default=None))
    return median


def start_upstream(children: Children, workdir: Path, sse_rate: float) -> tuple[subprocess.Popen, int]:
    log = open(workdir / "upstream.log", "wb")
    proc = children.start("upstream", [sys.executable, __file__, "--role", "upstream", "--sse-rate", str(sse_rate)],
                          stdout=subprocess.PIPE, stderr=log, bufsize=0)
    port = int(readline(proc.stdout, time.monotonic() + STARTUP_TIMEOUT))
    return proc, port


RELAY_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
RELAY_REQUEST_LINE = re.compile(r"\[mcpr\.relay#info\] " + SUBDOMAIN + r" \S+ \S+ (\S+) \d+B \d+ms(?: \(([^)]+)\))?$")
GATEWAY_ANNOUNCE = re.compile(r"mcpr (\S+): http://127\.0\.0\.1:(\d+) -> ")
GATEWAY_TUNNEL = re.compile(r"Tunnel: (\S+)")


def _env(**extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MCPR_")} | extra


def start_relay(children: Children, workdir: Path) -> tuple[subprocess.Popen, int, Path]:
    log_path = workdir / "relay.log"
    for _ in range(3):  # the free port may be taken between the probe and the listen
        port = free_port()
        cmd = [sys.executable, "-m", "twisted", "--log-format=text", "mcpr-relay", "--domain", DOMAIN,
               "--listen", f"tcp:{port}:interface={HOST}", "--public-url", f"http://*.{DOMAIN}:{port}",
               "--max-request-body", MAX_BODY]
        with open(log_path, "wb") as log:
            proc = children.start("relay", cmd, cwd=workdir, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
        try:
            match = wait_for_log(proc, log_path, RELAY_LISTENING, "the relay")
        except RuntimeError:
            if proc.poll() is None:
                raise
            continue
        return proc, int(match.group(1)), log_path
    raise RuntimeError("the relay did not start: no free port for it")


def start_gateway(children: Children, workdir: Path, upstream_port: int,
                  relay_port: int) -> tuple[subprocess.Popen, int, str, str, Path]:
    home = workdir / "gateway"
    home.mkdir()
    log_path = workdir / "gateway.log"
    cmd = [sys.executable, "-m", "twisted", "--log-format=text", "mcpr",
           "--mcp", f"http://{HOST}:{upstream_port}{MCP_PATH}", "--listen", f"tcp:0:interface={HOST}",
           "--relay-url", f"http://{HOST}:{relay_port}", "--subdomain", SUBDOMAIN, "--max-request-body", MAX_BODY]
    with open(log_path, "wb") as log:
        proc = children.start("gateway", cmd, cwd=home, env=_env(MCPR_TUNNEL_TOKEN=TUNNEL_TOKEN), stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    announce = wait_for_log(proc, log_path, GATEWAY_ANNOUNCE, "the gateway")
    tunnel = wait_for_log(proc, log_path, GATEWAY_TUNNEL, "the gateway's tunnel")
    return proc, int(announce.group(2)), announce.group(1), tunnel.group(1), log_path


def smoke_test(port: int, host: str) -> None:
    """One tools/call through the tunnel before measuring anything: a clear error if the path is broken."""
    body = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}'
    with socket.create_connection((HOST, port), timeout=STARTUP_TIMEOUT) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Accept: application/json, text/event-stream\r\nContent-Length: %d\r\n\r\n%s"
                     % (MCP_PATH.encode(), host.encode(), len(body), body))
        head, rest = _read_head(sock)
        answer_body = _read_body(sock, head, rest, keep=True).take()
    if head.start_line[9:12] != b"200" or b'"id":7' not in answer_body:
        raise RuntimeError(f"a tools/call through the tunnel failed: {head.start_line!r} {answer_body[:300]!r}")


# ---------------------------------------------------------------------------
# Figures, targets, the table.


def col(value: float | None, spec: str) -> str:
    """`fmt`, with "-" padded to the width that `spec` starts with."""
    width = re.match(r"\d*", spec).group()
    return fmt(value, spec).rjust(int(width) if width else 0)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 4)


def compare_cells(cells: list[Cell]) -> dict:
    by = {(c.concurrency, c.via): c for c in cells}
    out = {}
    for conc in sorted({c.concurrency for c in cells}):
        up, gw, tu = (by.get((conc, v)) for v in VIAS)
        if tu is None:
            continue
        entry: dict = {}
        for name, base in (("gateway", gw), ("upstream", up)):
            if base is None:
                continue
            entry[f"rps_ratio_vs_{name}"] = _ratio(tu.rps, base.rps)
            entry[f"added_p50_ms_vs_{name}"] = _diff(tu.p50_ms, base.p50_ms)
            entry[f"added_p99_ms_vs_{name}"] = _diff(tu.p99_ms, base.p99_ms)
        for proc in ("relay", "gateway"):
            busy = tu.cpu.get(proc)
            entry[f"{proc}_cpu_us_per_request"] = round(busy / tu.rps * 1e6, 1) if busy and tu.rps else None
        if gw is not None and gw.cpu.get("gateway") and gw.rps:
            entry["gateway_cpu_us_per_request_direct"] = round(gw.cpu["gateway"] / gw.rps * 1e6, 1)
        out[conc] = entry
    return out


def check_targets(cells: list[Cell], comparison: dict, sse: list[dict], bulk: list[dict]) -> list[dict]:
    by = {(c.concurrency, c.via): c for c in cells}
    sse_by = {s["via"]: s for s in sse}
    bulk_by = {(b["op"], b["via"]): b for b in bulk}

    def target(name: str, measured: float | None, op: str, limit: float, unit: str) -> dict:
        ok = None if measured is None else (measured <= limit if op == "<=" else measured >= limit)
        return {"name": name, "measured": measured, "op": op, "limit": limit, "unit": unit, "ok": ok}

    out = []
    if (16, "tunnel") in by:
        out.append(target("tunnel throughput at concurrency 16", by[(16, "tunnel")].rps, ">=",
                          TARGET_TUNNEL_RPS, "req/s"))
    if 1 in comparison:
        out.append(target("added p50 at concurrency 1 (vs gateway)", comparison[1].get("added_p50_ms_vs_gateway"),
                          "<=", TARGET_ADDED_P50_MS, "ms"))
    if "tunnel" in sse_by and "gateway" in sse_by:
        out.append(target("added p99 per SSE event (vs gateway)",
                          _diff(sse_by["tunnel"]["p99_ms"], sse_by["gateway"]["p99_ms"]), "<=",
                          TARGET_SSE_ADDED_P99_MS, "ms"))
    for op, label in (("down", "download"), ("up", "upload")):
        b = bulk_by.get((op, "tunnel"))
        if b is not None:
            out.append(target(f"tunnel {label} {b['size'] / (1 << 20):g} MiB", None if b["error"] else b["mbps"],
                              ">=", TARGET_BULK_MBPS, "MB/s"))
    tunnel_bulk = [b for b in bulk if b["via"] == "tunnel"]
    for proc in ("relay", "gateway"):
        growth = [b["rss"][proc]["growth_mb"] for b in tunnel_bulk if b["rss"].get(proc, {}).get("growth_mb")
                  is not None]
        if growth:
            out.append(target(f"{proc} RSS growth, tunnel transfers", max(growth), "<=", TARGET_RSS_MB, "MB"))
    return out


def report(cells: list[Cell], comparison: dict, sse: list[dict], bulk: list[dict], targets: list[dict],
           meta: dict, logs: dict) -> str:
    out = [f"mcpr {meta['gateway_version']} tunnel cost: relay + tunnel + gateway vs gateway (direct mode) vs "
           f"upstream; {meta['cpus']} CPUs, Python {meta['python']}"]
    if cells:
        out += ["", f"1. Small requests: tools/call POSTs on keep-alive connections, {meta['duration_s']:g} s per "
                    f"cell after {meta['warmup_s']:g} s warm-up",
                f"{'conc':>4}  {'via':<9}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
                f"{'errors':>7}   CPU, share of one core: relay / gateway / upstream / client / other"]
        for c in cells:
            cpu = " / ".join(f"{share(c.cpu.get(k)):>4}" for k in ("relay", "gateway", "upstream", "client", "other"))
            out.append(f"{c.concurrency:>4}  {c.via:<9}{c.rps:>9,.0f}{col(c.p50_ms, '9.3f')}{col(c.p90_ms, '9.3f')}"
                       f"{col(c.p99_ms, '9.3f')}{col(c.max_ms, '9.2f')}{c.error_count:>7}   {cpu}")
        out += ["", f"{'conc':>4}  {'tunnel/gateway':>14}{'+p50 vs gw':>11}{'+p99 vs gw':>11}"
                    f"{'tunnel/upstream':>16}{'+p50 vs up':>11}{'+p99 vs up':>11}   CPU µs/req: relay, gateway "
                    f"(tunnel) / gateway (direct)"]
        for conc, cmp in comparison.items():
            out.append(f"{conc:>4}  {col(cmp.get('rps_ratio_vs_gateway'), '13.2f')}x"
                       f"{col(cmp.get('added_p50_ms_vs_gateway'), '11.3f')}"
                       f"{col(cmp.get('added_p99_ms_vs_gateway'), '11.3f')}"
                       f"{col(cmp.get('rps_ratio_vs_upstream'), '15.2f')}x"
                       f"{col(cmp.get('added_p50_ms_vs_upstream'), '11.3f')}"
                       f"{col(cmp.get('added_p99_ms_vs_upstream'), '11.3f')}   "
                       f"{fmt(cmp.get('relay_cpu_us_per_request'), '.0f')}, "
                       f"{fmt(cmp.get('gateway_cpu_us_per_request'), '.0f')} / "
                       f"{fmt(cmp.get('gateway_cpu_us_per_request_direct'), '.0f')}")
    if sse:
        out += ["", f"2. SSE: one GET /mcp stream at {meta['sse_rate']:g} events/s, latency = arrival - stamp, "
                    f"{meta['duration_s']:g} s after {SSE_WARMUP:g} s",
                f"{'via':<9}{'events':>7}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}{'lost':>6}   "
                f"CPU: relay / gateway / other"]
        for s in sse:
            cpu = " / ".join(f"{share(s['cpu'].get(k)):>4}" for k in ("relay", "gateway", "other"))
            out.append(f"{s['via']:<9}{s['events']:>7}{col(s['p50_ms'], '9.3f')}{col(s['p90_ms'], '9.3f')}"
                       f"{col(s['p99_ms'], '9.3f')}{col(s['max_ms'], '9.2f')}{s['lost']:>6}   {cpu}"
                       + (f"   error: {s['error']}" if s["error"] else ""))
        by = {s["via"]: s for s in sse}
        if "tunnel" in by and "gateway" in by:
            out.append(f"added by relay + tunnel: p50 {fmt(_diff(by['tunnel']['p50_ms'], by['gateway']['p50_ms']), '.3f')}"
                       f" ms, p99 {fmt(_diff(by['tunnel']['p99_ms'], by['gateway']['p99_ms']), '.3f')} ms")
    if bulk:
        out += ["", f"3. Bulk: {meta['bulk_size'] / (1 << 20):g} MiB bodies, {meta['bulk_repeat']} of each; MB/s of "
                    f"the median (slowest - fastest); RSS growth = peak during a transfer - RSS before it, "
                    f"largest of the repeats (MB = 10^6 bytes)",
                f"{'op':<6}{'via':<9}{'MB/s':>6}{'(min - max)':>14}{'seconds':>9}   RSS growth MB: relay / gateway"
                f"   peak RSS MB: relay / gateway   CPU: relay / gateway / upstream"]
        for b in bulk:
            rss = b["rss"]
            spread = f"({fmt(b.get('mbps_min'), '.0f')} - {fmt(b.get('mbps_max'), '.0f')})"
            out.append(f"{b['op']:<6}{b['via']:<9}{col(b.get('mbps'), '6.0f')}{spread:>14}"
                       f"{col(b.get('seconds'), '9.3f')}   "
                       f"{col(rss.get('relay', {}).get('growth_mb'), '13.1f')} / "
                       f"{col(rss.get('gateway', {}).get('growth_mb'), '7.1f')}   "
                       f"{col(rss.get('relay', {}).get('peak_mb'), '19.1f')} / "
                       f"{col(rss.get('gateway', {}).get('peak_mb'), '7.1f')}   "
                       + " / ".join(f"{share(b['cpu'].get(k)):>4}" for k in ("relay", "gateway", "upstream"))
                       + (f"   error: {b['error']}" if b["error"] else ""))
    out += ["", "Targets:"]
    for t in targets:
        verdict = "n/a" if t["ok"] is None else ("MET" if t["ok"] else "MISSED")
        spec = ",.0f" if t["unit"] in ("req/s", "MB/s") else (".1f" if t["unit"] == "MB" else ".3f")
        out.append(f"  {t['name']:<42} measured {fmt(t['measured'], spec):>7} {t['unit']:<5} target {t['op']} "
                   f"{t['limit']:,g} {t['unit']:<5} {verdict}")
    out.append("")
    for name, log in logs.items():
        out.append(f"{name.capitalize()} log (whole run, warm-ups included): {log['request_lines']} request lines, "
                   f"by status {log['by_status'] or '{}'}, by outcome {log['by_outcome'] or '{}'}, "
                   f"{log['problems']} warnings/errors; exit code on SIGTERM: {meta['exit_codes'].get(name)}")
        out += [f"  {p}" for p in log["first_problems"]]
    errors = sum(c.error_count for c in cells)
    if errors:
        out.append(f"Client-side errors: {errors} (see the errors column and the JSON output)")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    children = Children()
    workdir = Path(tempfile.mkdtemp(prefix="mcpr-bench-tunnel-"))
    try:
        upstream, up_port = start_upstream(children, workdir, args.sse_rate)
        relay, relay_port, relay_log = start_relay(children, workdir)
        gateway, gw_port, version, tunnel_url, gw_log = start_gateway(children, workdir, up_port, relay_port)
        host = f"{SUBDOMAIN}.{DOMAIN}:{relay_port}"
        smoke_test(relay_port, host)
        say(f"upstream :{up_port} (pid {upstream.pid}), relay :{relay_port} (pid {relay.pid}), gateway mcpr "
            f"{version} :{gw_port} (pid {gateway.pid}), tunnel {tunnel_url}")
        bench = Bench(args, children, workdir)
        bench.watched = {"relay": relay.pid, "gateway": gateway.pid, "upstream": upstream.pid}
        bench.paths = {"upstream": (up_port, None), "gateway": (gw_port, None), "tunnel": (relay_port, host)}

        cells: list[Cell] = []
        plan = [(c, via) for c in args.concurrency for via in args.vias] if "small" in args.phases else []
        for i, (conc, via) in enumerate(plan, 1):
            cell = bench.run_cell(conc, via)
            say(f"[{i}/{len(plan)}] concurrency {conc:>2} {via:<8}: {cell.rps:>8,.0f} req/s, "
                f"p50 {fmt(cell.p50_ms, '.3f')} ms, p99 {fmt(cell.p99_ms, '.3f')} ms, errors {cell.error_count}")
            cells.append(cell)

        sse: list[dict] = []
        for via in args.vias if "sse" in args.phases else ():
            s = bench.run_sse(via)
            say(f"SSE {via:<8}: {s['events']} events, p50 {fmt(s['p50_ms'], '.3f')} ms, "
                f"p99 {fmt(s['p99_ms'], '.3f')} ms, lost {s['lost']}" + (f", error {s['error']}" if s["error"] else ""))
            sse.append(s)

        bulk: list[dict] = []
        for op in args.bulk_ops if "bulk" in args.phases else ():
            for via in args.vias:
                runs = []
                for _ in range(args.bulk_repeat):
                    b = bench.run_bulk(op, via)
                    say(f"bulk {op:<4} {via:<8}: {fmt(b.get('mbps'), '.0f')} MB/s, RSS growth MB relay "
                        f"{fmt(b['rss'].get('relay', {}).get('growth_mb'), '.1f')} gateway "
                        f"{fmt(b['rss'].get('gateway', {}).get('growth_mb'), '.1f')}"
                        + (f", error {b['error']}" if b["error"] else ""))
                    runs.append(b)
                bulk.append(combine_bulk(runs))

        for name, proc in (("relay", relay), ("gateway", gateway)):
            if proc.poll() is not None:
                say(f"the {name} exited during the run (exit code {proc.returncode})")
        exit_codes = {"gateway": children.stop(gateway), "relay": children.stop(relay)}
        logs = {"relay": log_summary(relay_log, RELAY_REQUEST_LINE), "gateway": gateway_log_summary(gw_log)}
        comparison = compare_cells(cells)
        targets = check_targets(cells, comparison, sse, bulk)
        meta = {"gateway_version": version, "duration_s": args.duration, "warmup_s": args.warmup,
                "sse_rate": args.sse_rate, "bulk_size": args.bulk_size,
                "bulk_repeat": args.bulk_repeat, "cpus": os.cpu_count(),
                "python": sys.version.split()[0], "exit_codes": exit_codes, "tunnel_url": tunnel_url,
                "loadavg_at_end": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists()
                else None}
        table = report(cells, comparison, sse, bulk, targets, meta, logs)
        if args.json:
            say("\n" + table)
            print(json.dumps({"meta": meta, "cells": [asdict(c) | {"error_count": c.error_count} for c in cells],
                              "comparison": {str(k): v for k, v in comparison.items()}, "sse": sse, "bulk": bulk,
                              "targets": targets, "logs": logs}, indent=2))
        else:
            print("\n" + table)
        return 0
    finally:
        children.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _vias(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or set(values) - set(VIAS):
        raise argparse.ArgumentTypeError("a comma-separated list of: " + ", ".join(VIAS))
    return [v for v in VIAS if v in values]


def _bulk_ops(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or set(values) - {"down", "up"}:
        raise argparse.ArgumentTypeError("a comma-separated list of: down, up")
    return values


def _phases(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or set(values) - {"small", "sse", "bulk"}:
        raise argparse.ArgumentTypeError("a comma-separated list of: small, sse, bulk")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0,
                        help="measured seconds per small-request cell and per SSE stream (3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each cell (1)")
    parser.add_argument("--concurrency", type=concurrencies, default=[1, 16, 64],
                        help="connections per small-request cell, comma-separated (1,16,64)")
    parser.add_argument("--sse-rate", type=float, default=200.0, help="SSE events per second (200)")
    parser.add_argument("--bulk-size", type=int, default=BULK_SIZE, help="bytes per bulk transfer (100 MiB)")
    parser.add_argument("--bulk-repeat", type=int, default=3,
                        help="transfers of each kind; the median's MB/s and the largest RSS growth count (3)")
    parser.add_argument("--bulk-ops", type=_bulk_ops, default=["down", "up"],
                        help="bulk transfers, comma-separated (down,up)")
    parser.add_argument("--phases", type=_phases, default=["small", "sse", "bulk"],
                        help="what to measure, comma-separated (small,sse,bulk)")
    parser.add_argument("--vias", type=_vias, default=list(VIAS),
                        help="paths to measure, comma-separated (upstream,gateway,tunnel); fewer for profiling")
    parser.add_argument("--json", action="store_true", help="print a JSON object with all figures to stdout")
    parser.add_argument("--role", choices=("bench", "upstream", "load", "sse", "bulk"), default="bench",
                        help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--op", choices=("down", "up"), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "upstream":
        serve_upstream(args.sse_rate)
        return 0
    if args.role == "load":
        generate_load(args.port, MCP_PATH, args.concurrency[0], args.warmup, args.duration, args.host)
        return 0
    if args.role == "sse":
        print(json.dumps(asyncio.run(_read_sse(args.port, args.host, args.warmup, args.duration))), flush=True)
        return 0
    if args.role == "bulk":
        print(json.dumps(bulk_transfer(args.port, args.host, args.op, args.size)), flush=True)
        return 0
    if min(args.duration, args.sse_rate, args.bulk_size, args.bulk_repeat) <= 0 or args.warmup < 0:
        parser.error("--duration, --sse-rate, --bulk-size and --bulk-repeat must be positive, --warmup not negative")
    return run_guarded(run, args)


if __name__ == "__main__":
    sys.exit(main())
