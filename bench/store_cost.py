#!/usr/bin/env python3
"""What the event store costs per request: the gateway with its store and with --no-store, in one run.

    .venv/bin/python bench/store_cost.py [--quick] [--json] [--rounds N] [--duration S] [--concurrency 1,16]

Two gateway processes in direct mode (no tunnel) in front of the same
upstream (nginx answering POST /mcp with a ~200-byte JSON-RPC result, as in
side_by_side.py; bench/_roles.py's asyncio origin without nginx): `store`,
with the default store (its own file, bodies captured up to 64 KiB), and
`no-store`, started with --no-store.  wrk sends the same small `tools/call`
POST as side_by_side.py's small-request phase.  Each round takes every
concurrency, and in each both gateways in turn, the order swapped every
round, so that drift of the machine hits both alike; every figure is the
median of the rounds.

    CPU/request  utime + stime of the gateway process (all its threads) and
                 of the store's writer process, its child, over the cell,
                 from /proc/PID/stat, divided by the requests wrk completed
    p50, p99     wrk's latency percentiles
    req/s        requests wrk completed per second

With --pin (on a machine of two CPUs or more), the gateways run on the
first CPU and wrk and the upstream on the others.  Two identical gateways
then differed by 1 % over ten rounds, against 4 % unpinned; but the store's
writer process then shares its gateway's CPU, which it would not on a
machine of several cores, and taking turns with it costs the reactor its
caches: pinned, the store cost 8-11 % where unpinned it cost 4-8 %
(2026-12-02, same hour).  So the default leaves placement to the scheduler.

The figures quoted are the ratios store / no-store of the same run
(absolute figures move with the machine): of the medians, and the median of
each round's own ratio, the verdict's figure, with its spread.  The store's own count is checked
at the end: every request must be in it (`mcpr status`), and none dropped,
or the CPU it did not spend on the dropped ones would flatter it.
Exit status: 0 when the run completed, 1 when it could not, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    HOST,
    MCP_PATH,
    REQUEST_BODY,
    WRK_SCRIPT,
    Children,
    clean_up,
    cpu_seconds,
    loadavg,
    median,
    one_post,
    positive_ints,
    ratio,
    run_guarded,
    run_wrk,
    wait_for_log,
    wrk_figures,
)
from side_by_side import GATEWAY_ANNOUNCE, INSTALL, _env, start_upstream

MODES = ("store", "no-store")
TARGET = 1.10  # issue 13: the store costs under 10 % of the gateway's CPU per request


class Run:
    """The upstream and the two gateways, started once; one wrk cell at a time."""

    def __init__(self, args: argparse.Namespace, children: Children, workdir: Path) -> None:
        self.args = args
        self.children = children
        self.workdir = workdir
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.store = workdir / "store.sqlite3"
        self.upstream = "nginx"

    def start(self) -> None:
        port, self.upstream = start_upstream(self.children, self.workdir, lambda text: print(text, file=sys.stderr))
        for mode in MODES:
            self._start_gateway(mode, port)
        for mode in MODES:
            status, body = one_post(self.ports[mode], None)
            if status != 200 or b'"result"' not in body:
                raise RuntimeError(f"a tools/call through the {mode} gateway failed: {status} {body[:300]!r}")

    def _start_gateway(self, mode: str, up_port: int) -> None:
        home = self.workdir / mode
        home.mkdir()
        log_path = self.workdir / f"gateway-{mode}.log"
        pin = ["taskset", "--cpu-list", str(self.args.gateway_cpu)] if self.args.gateway_cpu is not None else []
        cmd = [*pin, sys.executable, "-m", "twisted", "--log-format=text", "mcpr", "--mcp",
               f"http://{HOST}:{up_port}{MCP_PATH}", "--listen", f"tcp:0:interface={HOST}", "--no-tunnel"]
        cmd += ["--db", str(self.store)] if mode == "store" else ["--no-store"]
        with open(log_path, "wb") as log:
            proc = self.children.start(f"gateway-{mode}", cmd, cwd=home, env=_env(), stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        announce = wait_for_log(proc, log_path, GATEWAY_ANNOUNCE, f"the {mode} gateway")
        self.procs[mode], self.pids[mode], self.ports[mode] = proc, proc.pid, int(announce.group(2))

    def wrk(self, mode: str, concurrency: int, seconds: int) -> dict:
        script = self.workdir / "post.lua"
        if not script.exists():
            script.write_text(WRK_SCRIPT % {"body": REQUEST_BODY.decode()})
        return run_wrk(self.children, script, self.ports[mode], concurrency, seconds)[0]

    def cell(self, mode: str, concurrency: int, round_no: int) -> dict:
        warm = self.wrk(mode, concurrency, self.args.warmup)["requests"] if self.args.warmup else 0
        pid = self.pids[mode]
        before = cpu_seconds(pid)
        w = self.wrk(mode, concurrency, self.args.duration)
        after = cpu_seconds(pid)
        if before is None or after is None:
            raise RuntimeError(f"the {mode} gateway exited during the run")
        n = w["requests"]
        return {"mode": mode, "concurrency": concurrency, "round": round_no, **wrk_figures(w), "warmup_requests": warm,
                "cpu_us_per_request": round((after - before) / n * 1e6, 1) if n else None}

    def stored(self) -> dict:
        """`mcpr status` of the store, once the gateway has stopped (and so written all it had)."""
        self.children.stop(self.procs["store"])
        done = subprocess.run([sys.executable, "-c", "from mcpr.cli import main; main()", "status", "--json",
                               "--since", "1d", "--db", str(self.store)], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"mcpr status failed: {done.stderr.strip()}")
        status = json.loads(done.stdout)
        return {"requests": status["traffic"]["requests"], "written": status["run"]["written"],
                "dropped": status["run"]["dropped"], "size_bytes": status["size_bytes"]}


def summarize(cells: list[dict], concurrency: list[int]) -> dict:
    """Medians per mode and concurrency, and their ratios store / no-store."""
    out: dict[str, Any] = {}
    for c in concurrency:
        by_mode = {}
        for mode in MODES:
            mine = [x for x in cells if x["mode"] == mode and x["concurrency"] == c]
            by_mode[mode] = {key: median(x[key] for x in mine) for key in ("cpu_us_per_request", "p50_ms", "p99_ms",
                                                                           "rps")}
            by_mode[mode]["errors"] = sum(sum(x["errors"].values()) for x in mine)
        # Each round's store / no-store (their cells ran one after the other): the median, and the
        # spread, which says how much the machine moved under the run.
        paired = sorted(r for r in (ratio(a["cpu_us_per_request"], b["cpu_us_per_request"])
                                    for a in cells if a["mode"] == "store" and a["concurrency"] == c
                                    for b in cells if b["mode"] == "no-store" and b["concurrency"] == c
                                    and b["round"] == a["round"]) if r is not None)
        out[f"c{c}"] = {**by_mode, "ratio": {key: ratio(by_mode["store"][key], by_mode["no-store"][key])
                                             for key in ("cpu_us_per_request", "p50_ms", "p99_ms", "rps")},
                        "cpu_ratio_by_round": {"median": median(paired), "min": paired[0] if paired else None,
                                               "max": paired[-1] if paired else None}}
    return out


def report(summary: dict, stored: dict, sent: int, upstream: str, load: tuple[list[str] | None, list[str] | None],
           args: argparse.Namespace) -> str:
    lines = [f"The event store's cost per request: gateway with its store / with --no-store, same run "
             f"({args.rounds} round(s) of {args.duration} s per cell, median; upstream {upstream}; load average "
             f"{' '.join(load[0] or ['?'])} at the start, {' '.join(load[1] or ['?'])} at the end, "
             f"{os.cpu_count()} CPUs; "
             + (f"gateways pinned to CPU {args.gateway_cpu}, the load to the others)" if args.gateway_cpu is not None
                else "not pinned)"), "",
             f"{'':8}{'CPU µs/req':>22}  {'p50 ms':>18}  {'p99 ms':>18}  {'req/s':>18}",
             f"{'':8}" + "".join(f"{'store  no-store  x':>20}" for _ in range(4))]
    for cell, figures in summary.items():
        row = f"{cell:<8}"
        for key, spec in (("cpu_us_per_request", ".0f"), ("p50_ms", ".3f"), ("p99_ms", ".3f"), ("rps", ".0f")):
            store, bare, x = figures["store"][key], figures["no-store"][key], figures["ratio"][key]
            row += f"{format(store, spec) if store is not None else '-':>8}{format(bare, spec) if bare is not None else '-':>8}" \
                   f"{format(x, '.3f') if x is not None else '-':>6}"
        lines.append(row)
        by_round = figures["cpu_ratio_by_round"]
        if by_round["median"] is not None:
            lines.append(f"{'':8}CPU/request store / no-store round by round: median {by_round['median']:.3f}, "
                         f"{by_round['min']:.3f}-{by_round['max']:.3f}")
        if figures["store"]["errors"] or figures["no-store"]["errors"]:
            lines.append(f"{'':8}wrk errors: store {figures['store']['errors']}, no-store {figures['no-store']['errors']}")
    lines.append("")
    lines.append(f"the store holds {stored['requests']} requests; wrk and the first check completed {sent} "
                 f"({stored['written']} events written, {stored['dropped']} dropped, {stored['size_bytes'] >> 20} MiB)")
    worst = max((f["cpu_ratio_by_round"]["median"] or 0.0) for f in summary.values())
    verdict = "MET" if worst < TARGET else "MISSED"
    lines.append(f"target: the store under {round((TARGET - 1) * 100)} % of the gateway's CPU per request: "
                 f"{verdict} (the worst median of the rounds' ratios: {worst:.3f})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        print(f"wrk is not installed ({INSTALL['wrk']}): it drives the load", file=sys.stderr)
        return 1
    args.gateway_cpu = None
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if args.pin and len(cpus) >= 2 and shutil.which("taskset") is not None:
        args.gateway_cpu = cpus[0]
        os.sched_setaffinity(0, cpus[1:])  # wrk and the upstream, started from here, inherit it
    children = Children()
    workdir = Path(tempfile.mkdtemp(prefix="mcpr-bench-store-"))
    try:
        r = Run(args, children, workdir)
        load_start = loadavg()
        r.start()
        print(f"gateways: store :{r.ports['store']} (pid {r.pids['store']}), no-store :{r.ports['no-store']} "
              f"(pid {r.pids['no-store']})", file=sys.stderr)
        cells: list[dict] = []
        for round_no in range(args.rounds):
            order = MODES if round_no % 2 == 0 else MODES[::-1]
            for c in args.concurrency:
                for mode in order:
                    cells.append(r.cell(mode, c, round_no + 1))
        # Every request the store's gateway answered, warm-ups and the first check included, is stored.
        sent = 1 + sum(x["requests"] + x["warmup_requests"] for x in cells if x["mode"] == "store")
        stored = r.stored()
        summary = summarize(cells, args.concurrency)
        load = (load_start, loadavg())
        text = report(summary, stored, sent, r.upstream, load, args)
        if args.json:
            print(text, file=sys.stderr)
            print(json.dumps({"summary": summary, "stored": stored, "completed_by_store_gateway": sent, "loadavg": load,
                              "upstream": r.upstream, "args": vars(args), "cells": cells}, indent=1))
        else:
            print(text)
        return 0
    finally:
        clean_up(children, workdir, args.keep)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--quick", action="store_true", help="a smoke check: one round of 1 s cells at c16, no warm-up")
    parser.add_argument("--rounds", type=int, help="rounds (9; --quick 1)")
    parser.add_argument("--duration", type=int, help="measured seconds per cell (2; --quick 1)")
    parser.add_argument("--warmup", type=int, help="unmeasured seconds of load before each cell (1; --quick 0)")
    parser.add_argument("--concurrency", type=positive_ints, help="wrk connections per cell (1,16; --quick 16)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, the store)")
    parser.add_argument("--pin", action="store_true",
                        help="pin the gateways (and the store's writer) to one CPU and the load to the others")
    parser.add_argument("--json", action="store_true", help="all figures as JSON on stdout, the report on stderr")
    args = parser.parse_args()
    for name, full, quick in (("rounds", 9, 1), ("duration", 2, 1), ("warmup", 1, 0), ("concurrency", [1, 16], [16])):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if min(args.rounds, args.duration) < 1 or args.warmup < 0:
        parser.error("rounds and durations must be positive (--warmup may be 0)")
    return run_guarded(run, args)


if __name__ == "__main__":
    sys.exit(main())
