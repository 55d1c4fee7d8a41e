#!/usr/bin/env python3
"""What the mcpr gateway costs a small MCP tool call: latency added, throughput kept.

    .venv/bin/python bench/proxy_overhead.py [--duration S] [--json]

What it measures
    The same load, small JSON-RPC `tools/call` POSTs sent back to back on N
    persistent keep-alive connections, is run twice for each concurrency
    (1 and 16 by default): *direct* against a fast upstream MCP stand-in, and
    *through the gateway* in front of that same upstream.  For each of the
    four cells it reports requests per second and the p50 / p99 latency of a
    whole request as the client sees it, then the gateway's cost: the
    throughput ratio gateway / direct and the latency it adds (gateway p50 -
    direct p50).  Those are checked against two targets: at most 0.5 ms added
    at p50 at concurrency 1, and at least 2,000 req/s at concurrency 16.

How
    Every party is its own process, all on 127.0.0.1:

    * the upstream: a minimal asyncio Protocol HTTP/1.1 server (keep-alive,
      Content-Length bodies) that answers any POST with a small JSON-RPC
      result echoing the request's id.  It was picked over uvicorn with a raw
      ASGI app (h11; httptools is not installed here) because, measured with
      this client, it answered about twice as fast at concurrency 1 (80 vs
      150 us) and served about five times the requests at 16 (60k vs 11k/s),
      so it is never the bottleneck;
    * the gateway: `python -m twisted --log-format=text mcpr --mcp ... --listen
      tcp:0:interface=127.0.0.1`, run from an empty temporary directory (so no
      mcpr.toml applies) and without MCPR_* variables; its port is read from
      its "mcpr <version>: http://127.0.0.1:<port> -> ..." log line and it is
      stopped with SIGTERM at the end.  Its log (one console line per request,
      as a user would see it) goes to a file that is checked for errors;
    * the load generator: this file again (`--role load`), an asyncio raw
      socket client that keeps N connections busy, sends the next request as
      soon as the previous answer is complete, checks each answer (status 200
      and the request's own id in the body) and records its latency.  Requests
      completing during a warm-up (1 s) are not counted; then it measures for
      --duration seconds.  `--client wrk` uses wrk instead, if installed
      (it checks only the status, sends one fixed id, and drops connections
      with requests in flight when it stops, which the gateway logs).

    The CPU time each process spends during the measured window is read from
    /proc (Linux), so the table also shows which process was busy: a gateway
    near 100 % of one core is the bottleneck, and the client and upstream must
    stay well below that for the figures to be the gateway's.  Absolute
    numbers depend on the machine (the gateway is a single Python process and
    shares the cores with the client and the upstream); the comparison direct
    vs gateway in the same run is the point.

    With --json the table goes to stderr and a JSON object with all figures to
    stdout.  Exit status: 0 when the run completed (whether or not the targets
    were met), 1 when it could not run, 130 on Ctrl-C.  All child processes
    are stopped on exit, Ctrl-C and errors included.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from _common import (
    DRAIN_TIMEOUT,
    HOST,
    MCP_PATH,
    REQUEST_BODY,
    STARTUP_TIMEOUT,
    Cell,
    Children,
    concurrencies,
    cpu_seconds,
    fmt,
    gateway_log_summary,
    generate_load,
    readline,
    run_guarded,
    serve_upstream,
    share,
    wait_for_log,
)

TARGET_ADDED_P50_MS = 0.5  # at concurrency 1
TARGET_RPS = 2000.0  # through the gateway at concurrency 16


def start_upstream(children: Children, workdir: Path) -> tuple[subprocess.Popen, int]:
    log = open(workdir / "upstream.log", "wb")
    proc = children.start("upstream", [sys.executable, __file__, "--role", "upstream"],
                          stdout=subprocess.PIPE, stderr=log, bufsize=0)
    port = int(readline(proc.stdout, time.monotonic() + STARTUP_TIMEOUT))
    return proc, port


ANNOUNCE = re.compile(r"mcpr (\S+): http://127\.0\.0\.1:(\d+) -> ")


def start_gateway(children: Children, workdir: Path, upstream_port: int) -> tuple[subprocess.Popen, int, str, Path]:
    log_path = workdir / "gateway.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPR_")}
    cmd = [sys.executable, "-m", "twisted", "--log-format=text", "mcpr",
           "--mcp", f"http://{HOST}:{upstream_port}{MCP_PATH}", "--listen", f"tcp:0:interface={HOST}"]
    with open(log_path, "wb") as log:
        proc = children.start("gateway", cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    match = wait_for_log(proc, log_path, ANNOUNCE, "the gateway")
    return proc, int(match.group(2)), match.group(1), log_path


WRK_SCRIPT = """
wrk.method = "POST"
wrk.path = "%(path)s"
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




class Bench:
    def __init__(self, args: argparse.Namespace, children: Children, workdir: Path) -> None:
        self.args = args
        self.children = children
        self.workdir = workdir
        self.watched: dict[str, int] = {}  # process name -> pid, for CPU shares

    def _cpu(self) -> dict[str, float | None]:
        return {name: cpu_seconds(pid) for name, pid in self.watched.items()}

    @staticmethod
    def _share(before: dict, after: dict, wall: float) -> dict[str, float | None]:
        return {k: (round((after[k] - before[k]) / wall, 3) if before.get(k) is not None
                    and after.get(k) is not None and wall > 0 else None) for k in before}

    def run_cell(self, port: int, concurrency: int, via: str) -> Cell:
        if self.args.client == "wrk":
            return self._run_wrk(port, concurrency, via)
        a = self.args
        cmd = [sys.executable, __file__, "--role", "load", "--port", str(port), "--concurrency",
               str(concurrency), "--warmup", str(a.warmup), "--duration", str(a.duration)]
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
        cpu = self._share(cpu0, cpu1, t1 - t0)
        cpu["client"] = round(result.pop("client_cpu_s") / (t1 - t0), 3)
        return Cell(concurrency, via, "python", window_s=a.duration, cpu=cpu, **result)

    def _run_wrk(self, port: int, concurrency: int, via: str) -> Cell:
        a = self.args
        script = self.workdir / "wrk.lua"
        script.write_text(WRK_SCRIPT % {"path": MCP_PATH, "body": (REQUEST_BODY % 1).decode()})
        url = f"http://{HOST}:{port}"

        def wrk(seconds: float) -> tuple[subprocess.Popen, list[str]]:
            cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
                   "-s", str(script), url]
            return self.children.start("wrk", cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT), cmd

        if a.warmup > 0:
            proc, _ = wrk(a.warmup)
            proc.communicate(timeout=a.warmup + STARTUP_TIMEOUT)
        proc, _ = wrk(a.duration)
        t0, cpu0 = time.monotonic(), self._cpu() | {"client": cpu_seconds(proc.pid)}
        # Sample the client's CPU just before it exits: poll until its time is up.
        time.sleep(max(1, round(a.duration)) - 0.05)
        t1, cpu1 = time.monotonic(), self._cpu() | {"client": cpu_seconds(proc.pid)}
        out, _ = proc.communicate(timeout=STARTUP_TIMEOUT)
        text = out.decode(errors="replace")
        line = next((l for l in text.splitlines() if l.startswith("WRKJSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk gave no result:\n{text}")
        w = json.loads(line[len("WRKJSON "):])
        seconds = w["duration_us"] / 1e6
        errors = {k: w[k] for k in ("connect", "read", "write", "status", "timeout") if w[k]}
        return Cell(concurrency, via, "wrk", requests=w["requests"], rps=round(w["requests"] / seconds, 1),
                    p50_ms=w["p50_us"] / 1000, p90_ms=w["p90_us"] / 1000, p99_ms=w["p99_us"] / 1000,
                    max_ms=w["max_us"] / 1000, mean_ms=round(w["mean_us"] / 1000, 4), errors=errors,
                    window_s=round(seconds, 3), cpu=self._share(cpu0, cpu1, t1 - t0))


def report(cells: list[Cell], comparison: dict, targets: list[dict], meta: dict, log: dict) -> str:
    out = [
        f"mcpr {meta['gateway_version']} proxy overhead: tools/call POSTs, keep-alive, "
        f"{meta['duration_s']:g} s per cell after {meta['warmup_s']:g} s warm-up, "
        f"{meta['client']} client, {meta['cpus']} CPUs, Python {meta['python']}",
        "",
        f"{'conc':>4}  {'via':<8}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        f"{'errors':>8}   CPU (share of one core): gateway / upstream / client",
    ]
    for c in cells:
        out.append(
            f"{c.concurrency:>4}  {c.via:<8}{c.rps:>9,.0f}{fmt(c.p50_ms, '9.3f')}{fmt(c.p90_ms, '9.3f')}"
            f"{fmt(c.p99_ms, '9.3f')}{fmt(c.max_ms, '9.2f')}{c.error_count:>8}   "
            f"{share(c.cpu.get('gateway')):>5} / {share(c.cpu.get('upstream')):>5} / {share(c.cpu.get('client')):>5}")
    out += ["", f"{'conc':>4}  {'gateway/direct req/s':>20}{'added p50 ms':>14}{'added p99 ms':>14}"
                f"{'gateway CPU µs/req':>20}"]
    for conc, cmp in comparison.items():
        out.append(f"{conc:>4}  {fmt(cmp['rps_ratio'], '19.2f')}x{fmt(cmp['added_p50_ms'], '14.3f')}"
                   f"{fmt(cmp['added_p99_ms'], '14.3f')}{fmt(cmp['gateway_cpu_us_per_request'], '20.0f')}")
    out += ["", "Targets:"]
    for t in targets:
        verdict = "n/a" if t["ok"] is None else ("MET" if t["ok"] else "MISSED")
        spec = ",.0f" if t["unit"] == "req/s" else ".3f"
        out.append(f"  {t['name']:<38} measured {fmt(t['measured'], spec):>7} {t['unit']:<6} target {t['op']} "
                   f"{t['limit']:,g} {t['unit']:<6} {verdict}")
    out += ["", f"Gateway log (whole run, warm-ups included): {log['request_lines']} request lines, "
                f"by status {log['by_status'] or '{}'}, by outcome {log['by_outcome'] or '{}'}, "
                f"{log['problems']} warnings/errors; exit code on SIGTERM: {meta['gateway_exit_code']}"]
    out += [f"  {p}" for p in log["first_problems"]]
    errors = sum(c.error_count for c in cells)
    if errors:
        out.append(f"Client-side errors: {errors} (see the errors column and the JSON output)")
    return "\n".join(out)


def compare(cells: list[Cell]) -> dict:
    by = {(c.concurrency, c.via): c for c in cells}
    result = {}
    for conc in sorted({c.concurrency for c in cells}):
        d, g = by.get((conc, "direct")), by.get((conc, "gateway"))
        if d is None or g is None:
            continue
        gw_cpu = g.cpu.get("gateway")
        result[conc] = {
            "rps_ratio": round(g.rps / d.rps, 4) if d.rps else None,
            "added_p50_ms": round(g.p50_ms - d.p50_ms, 4) if None not in (g.p50_ms, d.p50_ms) else None,
            "added_p99_ms": round(g.p99_ms - d.p99_ms, 4) if None not in (g.p99_ms, d.p99_ms) else None,
            "gateway_cpu_us_per_request": round(gw_cpu / g.rps * 1e6, 1) if gw_cpu and g.rps else None,
        }
    return result


def check_targets(cells: list[Cell], comparison: dict) -> list[dict]:
    by = {(c.concurrency, c.via): c for c in cells}
    added = comparison.get(1, {}).get("added_p50_ms")
    rps = by[(16, "gateway")].rps if (16, "gateway") in by else None
    return [
        {"name": "added p50 latency at concurrency 1", "measured": added, "op": "<=",
         "limit": TARGET_ADDED_P50_MS, "unit": "ms", "ok": None if added is None else added <= TARGET_ADDED_P50_MS},
        {"name": "gateway throughput at concurrency 16", "measured": rps, "op": ">=",
         "limit": TARGET_RPS, "unit": "req/s", "ok": None if rps is None else rps >= TARGET_RPS},
    ]


def run(args: argparse.Namespace) -> int:
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    children = Children()
    workdir = Path(tempfile.mkdtemp(prefix="mcpr-bench-"))
    try:
        upstream, up_port = start_upstream(children, workdir)
        gateway, gw_port, version, gw_log = start_gateway(children, workdir, up_port)
        say(f"upstream on :{up_port} (pid {upstream.pid}), gateway mcpr {version} on :{gw_port} "
            f"(pid {gateway.pid}); {args.client} client")
        bench = Bench(args, children, workdir)
        bench.watched = {"gateway": gateway.pid, "upstream": upstream.pid}
        cells = []
        plan = [(c, via) for c in args.concurrency for via in ("direct", "gateway")]
        for i, (conc, via) in enumerate(plan, 1):
            cell = bench.run_cell(up_port if via == "direct" else gw_port, conc, via)
            say(f"[{i}/{len(plan)}] concurrency {conc:>2} {via:<7}: {cell.rps:>8,.0f} req/s, "
                f"p50 {fmt(cell.p50_ms, '.3f')} ms, p99 {fmt(cell.p99_ms, '.3f')} ms, "
                f"errors {cell.error_count}")
            cells.append(cell)
        if gateway.poll() is not None:
            say(f"the gateway exited during the run (exit code {gateway.returncode})")
        exit_code = children.stop(gateway)
        log = gateway_log_summary(gw_log)
        comparison = compare(cells)
        targets = check_targets(cells, comparison)
        meta = {"gateway_version": version, "duration_s": args.duration, "warmup_s": args.warmup,
                "client": args.client, "cpus": os.cpu_count(), "python": sys.version.split()[0],
                "gateway_exit_code": exit_code,
                "gateway_command": "python -m twisted --log-format=text mcpr --mcp URL --listen ENDPOINT"}
        table = report(cells, comparison, targets, meta, log)
        if args.json:
            say("\n" + table)
            print(json.dumps({"meta": meta, "cells": [asdict(c) | {"error_count": c.error_count} for c in cells],
                              "comparison": {str(k): v for k, v in comparison.items()},
                              "targets": targets, "gateway_log": log}, indent=2))
        else:
            print("\n" + table)
        return 0
    finally:
        children.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell (5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each cell (1)")
    parser.add_argument("--concurrency", type=concurrencies, default=[1, 16],
                        help="connections per cell, comma-separated (1,16)")
    parser.add_argument("--client", choices=("python", "wrk"), default="python",
                        help="load generator: this script's asyncio client (default) or wrk")
    parser.add_argument("--json", action="store_true", help="print a JSON object with all figures to stdout")
    parser.add_argument("--role", choices=("bench", "upstream", "load"), default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=MCP_PATH, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "upstream":
        serve_upstream()
        return 0
    if args.role == "load":
        generate_load(args.port, args.path, args.concurrency[0], args.warmup, args.duration)
        return 0
    if args.duration <= 0 or args.warmup < 0:
        parser.error("--duration must be positive and --warmup not negative")
    if args.client == "wrk" and shutil.which("wrk") is None:
        parser.error("--client wrk: wrk is not installed")
    return run_guarded(run, args)


if __name__ == "__main__":
    sys.exit(main())
