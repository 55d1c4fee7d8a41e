"""What the benchmarks (bench/side_by_side.py, store_cost.py, cluster.py) and the child-process
roles (bench/_roles.py) share.

HTTP/1.1 framing (just enough: keep-alive, Content-Length, chunked), child
processes that are stopped whatever happens, wrk runs and their figures, and
what /proc says about a process (CPU time, resident memory, its children).
Every script runs as a script, so this file's folder is on sys.path.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

HOST = "127.0.0.1"
MCP_PATH = "/mcp"

# The small request every load cell sends (wrk sends the same bytes each time), and the answer
# every upstream gives to it: a ~200-byte JSON-RPC result, as in issue 11's table.
REQUEST_BODY = (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add",'
                b'"arguments":{"a":1,"b":2}}}')
RESULT_BODY = (b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"1 + 2 = 3"}],'
               b'"structuredContent":{"sum":3,"a":1,"b":2},"isError":false,'
               b'"_meta":{"server":"bench-upstream","took_ms":0,"note":"a small tools/call answer"}}}')

STARTUP_TIMEOUT = 20.0


# ---------------------------------------------------------------------------
# HTTP/1.1 message framing.


@dataclass
class Head:
    start_line: bytes
    length: int | None = None
    chunked: bool = False
    close: bool = False

    @property
    def status(self) -> int:
        """A response's status code (0 if the line is not a status line)."""
        try:
            return int(self.start_line[9:12])
        except ValueError:
            return 0


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


class BodyReader:
    """Counts (and, if asked, keeps) a body fed in pieces; `feed` returns what lies past its end."""

    def __init__(self, head: Head, keep: bool = False, request: bool = False) -> None:
        self.length = head.length if head.length is not None or head.chunked or not request else 0
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


def read_head(sock: socket.socket) -> tuple[Head, bytes]:
    """A response head from a blocking socket, and the bytes read past it."""
    buf = b""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return parse_head(buf[:end]), buf[end + 4:]
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before the response head")
        buf += data


def read_body(sock: socket.socket, head: Head, rest: bytes, keep: bool) -> BodyReader:
    """The rest of a response body from a blocking socket, counted (and kept if asked)."""
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


def post_request(host: str, path: str = MCP_PATH, body: bytes = REQUEST_BODY) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Accept: application/json, text/event-stream\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), host.encode(), len(body), body))


def one_post(port: int, host: str | None, timeout: float = STARTUP_TIMEOUT) -> tuple[int, bytes]:
    """One small tools/call POST on a fresh connection: (status, body)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(post_request(host or f"{HOST}:{port}"))
        head, rest = read_head(sock)
        return head.status, read_body(sock, head, rest, keep=True).take()


# ---------------------------------------------------------------------------
# Child processes.


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
        self.stop_together([proc], timeout)
        return proc.returncode

    def stop_together(self, procs: list[subprocess.Popen], timeout: float = 5.0) -> None:
        """SIGTERM to all of `procs`, then each waited for (KILL after `timeout`): their shutdowns
        overlap instead of adding up (bench/cluster.py stops a whole cluster after every cell)."""
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for name, p in self.procs:
            if any(p is proc for proc in procs):
                self.exit_codes[name] = p.returncode
        self.procs = [(n, p) for n, p in self.procs if not any(p is proc for proc in procs)]

    def close(self) -> None:
        for _, proc in reversed(list(self.procs)):
            self.stop(proc)


def readline(stream: Any, deadline: float) -> str:
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


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start (exit code {proc.returncode})")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} is not listening on {HOST}:{port}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


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


def clean_up(children: Children, workdir: Path, keep: bool) -> None:
    """A session's end, however it ends: its processes stopped, its folder removed unless `--keep`."""
    children.close()
    if keep:
        print(f"logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------
# wrk, the load of every small-request cell.

# POSTs the small tools/call (or `%(body)s`) to the URL; at the end one WRKJSON line with its figures.
# A script may add a request() of its own (bench/cluster.py rotates the Host header with one).
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '%(body)s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,' ..
    '"write":%%d,"status":%%d,"timeout":%%d,"p50_us":%%f,"p90_us":%%f,"p99_us":%%f,"max_us":%%f,' ..
    '"mean_us":%%f}\\n', summary.requests, summary.duration, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
"""


def run_wrk(children: Children, script: Path, port: int, concurrency: int, seconds: int,
            host: str | None = None) -> tuple[dict, float]:
    """One wrk run (one thread, keep-alive) of `script` against MCP_PATH on `port`: the figures of
    its WRKJSON line, and wrk's own CPU seconds (from its rusage: what the load itself cost)."""
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s", "-s", str(script)]
    cmd += ["-H", f"Host: {host}"] if host else []
    cmd.append(f"http://{HOST}:{port}{MCP_PATH}")
    proc = children.start("wrk", cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()  # type: ignore[union-attr]  # to EOF: wrk has exited (or closed its output)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    children.stop(proc)
    text = out.decode(errors="replace")
    line = next((l for l in text.splitlines() if l.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result ({' '.join(cmd)}):\n{text}")
    return json.loads(line[len("WRKJSON "):]), usage.ru_utime + usage.ru_stime


def wrk_figures(w: dict) -> dict:
    """What every benchmark quotes of a wrk run: requests, req/s, p50, p99 and its errors (those seen)."""
    n, seconds = w["requests"], w["duration_us"] / 1e6
    return {"requests": n, "rps": round(n / seconds, 1) if seconds else 0.0,
            "p50_ms": round(w["p50_us"] / 1000, 4), "p99_ms": round(w["p99_us"] / 1000, 4),
            "errors": {k: w[k] for k in ("connect", "read", "write", "status", "timeout") if w[k]}}


# ---------------------------------------------------------------------------
# What /proc says (Linux).

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def _own_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads) and of its children that ended, or None
    if it is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else sum(int(f) for f in fields[11:15]) / CLK_TCK


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds of a process and every process below it (the gateway's store writer), so far,
    or None if it is gone."""
    return cpu_of([pid])


def cpu_of(pids: Iterable[int]) -> float | None:
    """CPU seconds of a group of processes (an nginx master and its workers) and of every process
    below them, None if none is there."""
    tree = {d for p in pids for d in descendants(p)}
    values = [v for v in (_own_cpu_seconds(p) for p in tree) if v is not None]
    return sum(values) if values else None


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from the parent ids in /proc."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children[int(fields[1])].append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_of(pids: Iterable[int]) -> int | None:
    values = [v for v in (rss_kib(p) for p in pids) if v is not None]
    return sum(values) if values else None


def machine_busy_seconds() -> float | None:
    """CPU seconds spent by the whole machine so far, all cores."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def listen_drops() -> int | None:
    """The machine's TcpExt ListenDrops so far: SYNs and handshakes dropped by full listen queues."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split(), values.split()))
            return int(table["ListenDrops"]) if "ListenDrops" in table else None
    return None


def loadavg() -> list[str] | None:
    try:
        return Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return None


class PeakRSS:
    """Samples the VmRSS of groups of processes every `interval` s in a thread, until stopped."""

    def __init__(self, groups: dict[str, list[int]], interval: float = 0.01) -> None:
        self.groups = groups
        self.start = {name: rss_of(pids) for name, pids in groups.items()}
        self.peak = dict(self.start)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.samples += 1
            for name, pids in self.groups.items():
                kib = rss_of(pids)
                if kib is not None and (self.peak[name] is None or kib > self.peak[name]):
                    self.peak[name] = kib

    def stop(self) -> dict[str, dict]:
        self._stop.set()
        self._thread.join()
        return {name: {"before_mib": mib(self.start[name]), "peak_mib": mib(self.peak[name]),
                       "growth_mib": mib(self.peak[name] - self.start[name])  # type: ignore[operator]
                       if None not in (self.peak[name], self.start[name]) else None}
                for name in self.groups}


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 2)


# ---------------------------------------------------------------------------
# Logs, figures.


def log_summary(path: Path, line_re: re.Pattern[str]) -> dict:
    """Request lines (`line_re`: status, optional outcome) by status and outcome, and the warnings,
    errors and tracebacks, in a log file."""
    statuses: collections.Counter[str] = collections.Counter()
    outcomes: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    kinds: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        m = line_re.search(line)
        if m:
            statuses[m.group(1)] += 1
            outcomes[m.group(2) or "ok"] += 1
        elif re.search(r"#(warn|error|critical)\]|Traceback|Unhandled", line):
            problems.append(line)
            kinds[re.sub(r"\d+", "N", line.split("] ", 1)[-1])[:100]] += 1
    return {"request_lines": sum(statuses.values()), "by_status": dict(statuses), "by_outcome": dict(outcomes),
            "problems": len(problems), "first_problems": problems[:5],
            "problem_kinds": dict(kinds.most_common(5))}


def percentile(ordered: list[float], p: float) -> float | None:
    n = len(ordered)
    return ordered[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))] if n else None


def median(values: Iterable[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def col(value: float | None, spec: str) -> str:
    """`fmt`, with "-" padded to the width that `spec` starts with."""
    m = re.match(r"\d*", spec)
    width = m.group() if m else ""
    return fmt(value, spec).rjust(int(width) if width else 0)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b; None without both, or when b <= 0 (an added latency that noise made negative has no ratio)."""
    return None if a is None or b is None or b <= 0 or a in (float("inf"), float("-inf")) else round(a / b, 3)


def positive_ints(text: str) -> list[int]:
    """An argparse type: a comma-separated list of positive integers (the bench's --concurrency)."""
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values
