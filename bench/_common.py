"""What the benchmarks in bench/ share: HTTP/1.1 framing, a fast upstream, the load generator, child processes.

Imported by bench/proxy_overhead.py and bench/tunnel.py (each runs as a
script, so this file's folder is on sys.path).  The load generator and the
upstream run in their own processes: each script starts itself again with
`--role load` or `--role upstream` and calls `generate_load()` or
`serve_upstream()` from here.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import itertools
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HOST = "127.0.0.1"
MCP_PATH = "/mcp"
REQUEST_BODY = b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}'
RESULT_BODY = '{"jsonrpc":"2.0","id":%s,"result":{"content":[{"type":"text","text":"3"}],"isError":false}}'

STARTUP_TIMEOUT = 20.0
DRAIN_TIMEOUT = 5.0  # after the window, for answers still in flight


# ---------------------------------------------------------------------------
# HTTP/1.1 message framing shared by the upstream and the client (just enough:
# keep-alive, Content-Length, chunked answers for the client's sake).


@dataclass
class Head:
    start_line: bytes
    length: int | None = None
    chunked: bool = False
    close: bool = False


def parse_head(head: bytes) -> Head:
    lines = head.split(b"\r\n")
    parsed = Head(lines[0])
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            parsed.length = int(value)
        elif name == b"transfer-encoding":
            parsed.chunked = b"chunked" in value.lower()
        elif name == b"connection":
            parsed.close = b"close" in value.lower()
    if lines[0].endswith(b"HTTP/1.0") or lines[0].startswith(b"HTTP/1.0"):
        parsed.close = True  # good enough here: nobody speaks 1.0 keep-alive to us
    return parsed


def dechunk(buf: bytes, pos: int) -> tuple[bytes, int] | None:
    """A chunked body starting at `pos`: (body, end offset), or None if incomplete."""
    parts = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(buf[pos:eol].split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)  # no trailers: the CRLF right after "0\r\n"
            return None if end < 0 else (b"".join(parts), end + 4)
        if len(buf) < pos + size + 2:
            return None
        parts.append(buf[pos:pos + size])
        pos += size + 2


# ---------------------------------------------------------------------------
# The upstream: `--role upstream` prints its port, then serves until killed.


def answer(body: bytes) -> bytes:
    try:
        rid = json.dumps(json.loads(body)["id"], separators=(",", ":"))
    except (ValueError, KeyError, TypeError):
        rid = "null"
    payload = (RESULT_BODY % rid).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(payload), payload)


class UpstreamProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive framing for the benchmarks' upstreams; `respond` says what each request gets.

    A subclass answers more paths by overriding `respond`, and may take over a request whose body
    it wants to stream (`takes_body`) or the whole connection (`respond` returning False).
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = parse_head(buf[:end])
            if self.takes_body(head):
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
            body, buf = buf[start:stop], buf[stop:]
            if not self.respond(head, body):
                return  # the connection is the response's now (a stream)
            if head.close:
                self.transport.close()
                return
        self.buf = buf

    def takes_body(self, head: "Head") -> bool:
        """Whether this request's body is read by the subclass itself, as it arrives."""
        return False

    def respond(self, head: "Head", body: bytes) -> bool:
        if head.start_line.startswith(b"POST "):
            self.transport.write(answer(body))
        else:
            self.transport.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
        return True


def serve_upstream() -> None:
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(UpstreamProtocol, HOST, 0, backlog=1024))
    print(server.sockets[0].getsockname()[1], flush=True)
    loop.run_forever()


# ---------------------------------------------------------------------------
# The load generator: `--role load` prints "window-start", "window-end", then
# one JSON line with its figures.


class Load:
    def __init__(self, port: int, path: str, concurrency: int, host: str | None = None) -> None:
        host = host or f"{HOST}:{port}"
        self.head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Accept: application/json, text/event-stream\r\nContent-Length: ").encode()
        self.ids = itertools.count(1)
        self.latencies: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.measure_from = math.inf
        self.stop_at = math.inf
        self.connections: set[LoadConnection] = set()

    def request(self, rid: int) -> bytes:
        body = REQUEST_BODY % rid
        return b"%s%d\r\n\r\n%s" % (self.head, len(body), body)

    def completed(self, started: float, now: float, error: str | None) -> None:
        if error is not None:
            self.errors[error] += 1
        elif self.measure_from <= now < self.stop_at:
            self.latencies.append(now - started)


class LoadConnection(asyncio.Protocol):
    """One keep-alive connection sending the next request as soon as the answer is whole."""

    def __init__(self, load: Load, finished: asyncio.Future) -> None:
        self.load = load
        self.finished = finished
        self.buf = b""
        self.in_flight = False
        self.started = 0.0
        self.expect = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.load.connections.add(self)
        self._send()

    def _send(self) -> None:
        now = time.perf_counter()
        if now >= self.load.stop_at:
            self.transport.close()
            return
        rid = next(self.load.ids)
        self.expect = b'"id":%d' % rid
        self.buf = b""
        self.in_flight = True
        self.started = now
        self.transport.write(self.load.request(rid))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = parse_head(self.buf[:end])
        if head.chunked:
            got = dechunk(self.buf, end + 4)
            if got is None:
                return
            body, stop = got
        elif head.length is not None:
            stop = end + 4 + head.length
            if len(self.buf) < stop:
                return
            body = self.buf[end + 4:stop]
        else:  # a body delimited by closing the connection: not what we test
            self.load.completed(self.started, time.perf_counter(), "no-length")
            self.in_flight = False
            self.transport.close()
            return
        now = time.perf_counter()
        self.in_flight = False
        status = head.start_line[9:12]
        error = None
        if status != b"200":
            error = f"status-{status.decode('latin-1')}"
        elif self.expect not in body:
            error = "wrong-body"
        elif stop != len(self.buf):
            error = "extra-bytes"
        self.load.completed(self.started, now, error)
        if head.close or error == "extra-bytes":
            self.transport.close()
        else:
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.connections.discard(self)
        if self.in_flight:
            self.load.completed(self.started, time.perf_counter(), "disconnected")
            self.in_flight = False
        if not self.finished.done():
            self.finished.set_result(None)


async def _slot(load: Load, port: int) -> None:
    """Keeps one connection going until the end, reconnecting if the server closes it."""
    loop = asyncio.get_running_loop()
    while time.perf_counter() < load.stop_at:
        finished = loop.create_future()
        try:
            await loop.create_connection(lambda: LoadConnection(load, finished), HOST, port)
        except OSError:
            load.errors["connect"] += 1
            await asyncio.sleep(0.05)
            continue
        await finished


async def _generate(port: int, path: str, concurrency: int, warmup: float, duration: float,
                    host: str | None = None) -> dict:
    load = Load(port, path, concurrency, host)
    t0 = time.perf_counter()
    load.measure_from = t0 + warmup
    load.stop_at = load.measure_from + duration
    slots = [asyncio.ensure_future(_slot(load, port)) for _ in range(concurrency)]
    await asyncio.sleep(max(0.0, load.measure_from - time.perf_counter()))
    print("window-start", flush=True)
    cpu0 = time.process_time()
    await asyncio.sleep(max(0.0, load.stop_at - time.perf_counter()))
    cpu1 = time.process_time()
    print("window-end", flush=True)
    _, pending = await asyncio.wait(slots, timeout=DRAIN_TIMEOUT)
    for conn in list(load.connections):
        if conn.in_flight:
            load.errors["timeout"] += 1
            conn.in_flight = False
        conn.transport.abort()
    for task in pending:
        task.cancel()
    return summarize(load.latencies, duration) | {
        "errors": dict(load.errors),
        "client_cpu_s": round(cpu1 - cpu0, 4),
    }


def summarize(latencies: list[float], duration: float) -> dict:
    """Figures from latencies in seconds: req/s over `duration`, percentiles in ms."""
    ordered = sorted(latencies)
    n = len(ordered)

    def pct(p: float) -> float | None:
        return round(ordered[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))] * 1000, 4) if n else None

    return {
        "requests": n,
        "rps": round(n / duration, 1),
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": round(ordered[-1] * 1000, 4) if n else None,
        "mean_ms": round(sum(ordered) / n * 1000, 4) if n else None,
    }


def generate_load(port: int, path: str, concurrency: int, warmup: float, duration: float,
                  host: str | None = None) -> None:
    gc.disable()  # a bounded run; no collector pauses in the client's own latency
    result = asyncio.run(_generate(port, path, concurrency, warmup, duration, host))
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------
# Child processes, for the orchestrators.


def die_with_parent() -> None:
    """In the child: get SIGTERM if the benchmark itself dies (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Children:
    """Every process started, stopped (TERM, then KILL) on the way out whatever happens."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.exit_codes: dict[str, int | None] = {}

    def start(self, name: str, cmd: list[str], **kwargs: Any) -> subprocess.Popen:
        preexec = die_with_parent if sys.platform.startswith("linux") else None
        proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=preexec, **kwargs)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 5.0) -> int | None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for name, p in self.procs:
            if p is proc:
                self.exit_codes[name] = proc.returncode
        return proc.returncode

    def close(self) -> None:
        for _, proc in reversed(self.procs):
            self.stop(proc)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far, from /proc (None elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def readline(stream, deadline: float) -> str:
    """One line from a child's unbuffered stdout pipe, or TimeoutError at `deadline`.

    Unbuffered (bufsize=0) so that no line waits in a Python buffer where
    select() cannot see it."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no output from child process")
        ready, _, _ = select.select([stream], [], [], left)
        if ready:
            line = stream.readline()
            if not line:
                raise RuntimeError("child process ended early")
            return line.decode().strip()


def wait_for_log(proc: subprocess.Popen, log_path: Path, pattern: re.Pattern[str], what: str,
                 timeout: float = STARTUP_TIMEOUT) -> re.Match[str]:
    """The first match of `pattern` in a child's log file, or RuntimeError (with the log's tail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = pattern.search(log_path.read_text(errors="replace"))
        if match:
            return match
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
    raise RuntimeError(f"{what} did not start (exit code {proc.poll()}):\n{tail}")


# ---------------------------------------------------------------------------
# Reading logs, formatting figures.


def log_summary(path: Path, line_re: re.Pattern[str]) -> dict:
    """Request lines (`line_re`: status, optional outcome) by status and outcome, and the warnings,
    errors and tracebacks, in a log file."""
    statuses: collections.Counter[str] = collections.Counter()
    outcomes: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        m = line_re.search(line)
        if m:
            statuses[m.group(1)] += 1
            outcomes[m.group(2) or "ok"] += 1
        elif re.search(r"#(warn|error|critical)\]|Traceback|Unhandled", line):
            problems.append(line)
    return {"request_lines": sum(statuses.values()), "by_status": dict(statuses), "by_outcome": dict(outcomes),
            "problems": len(problems), "first_problems": problems[:5]}


GATEWAY_REQUEST_LINE = re.compile(r"\[mcpr#info\] \d\d:\d\d:\d\d \S+ (\S+) .*?(?: \(([\w-]+)\))?$")


def gateway_log_summary(path: Path) -> dict:
    """Request lines by status and outcome, and the warnings, errors and tracebacks, in the gateway's log."""
    return log_summary(path, GATEWAY_REQUEST_LINE)


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def share(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


@dataclass
class Cell:
    """One load cell: a path ("via") at a concurrency, with its latencies and CPU shares."""

    concurrency: int
    via: str
    client: str = "python"
    requests: int = 0
    rps: float = 0.0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    mean_ms: float | None = None
    errors: dict[str, int] = field(default_factory=dict)
    window_s: float = 0.0
    cpu: dict[str, float | None] = field(default_factory=dict)  # share of one core, per process

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def run_guarded(run: Callable[[Any], int], args: Any) -> int:
    """Run a benchmark so that SIGTERM and Ctrl-C unwind through its cleanup of child processes."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; child processes stopped", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1


def concurrencies(text: str) -> list[int]:
    """argparse type: a comma-separated list of positive integers."""
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values
