#!/usr/bin/env python3
"""The relay cluster (issue 14): the forwarded hop, and 1, 2, 3 relay processes on one port, in one run.

    .venv/bin/python bench/cluster.py [--quick] [--json] [--phases hop,scale] [--rounds N] [--duration S]

Every relay is a cluster node (`--cluster redis://...`, access log off) on a
redis-server of the bench's own; the gateways (--no-store) are in front of the
same upstream as side_by_side.py's small phase (nginx answering POST /mcp
with a ~200-byte JSON-RPC result), and wrk POSTs the same small tools/call.

    hop    two nodes, A and B, each on a public port of its own, and one
           gateway registered on A.  wrk against A (the owner: it serves the
           request from its own tunnel) and against B (not the owner: it
           forwards every request to A over A's internal listener), at c1 and
           c16, A and B in turn in every round, the order swapped every round.
           Figures: req/s, p50, p99 and the CPU µs per request of relay A,
           relay B and the gateway, quoted as B / A.
    scale  k = 1, 2, 3 relay processes sharing one public port (SO_REUSEPORT:
           `--listen reuseport:...`) and T gateways (6), each on a subdomain
           of its own, connecting to that port: the kernel spreads the tunnels
           and wrk's connections over the nodes, so with k > 1 most requests
           reach a node that does not hold their tunnel and are forwarded
           (the share is measured, from the nodes' forwarded counters).  wrk
           (c64) rotates the Host header over the T names.  Figures: total
           req/s and the CPU µs per request of all the relays together (and of
           all the gateways), quoted as ratios to k = 1.  Every cell starts a
           Redis, relays and gateways of its own (where the tunnels land
           changes from cell to cell, as from restart to restart), and the k
           values take turns in every round, starting one further along each
           round.

CPU is utime + stime from /proc/PID/stat over the measured cell (after an
unmeasured warm-up), divided by the requests wrk completed.  Every figure is
the median of the rounds; the ratios are of those medians, and the median of
each round's own ratio, with its spread.  Exit status: 0 when the run
completed, 1 when it could not, 130 on Ctrl-C.
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
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    HOST,
    MCP_PATH,
    REQUEST_BODY,
    WRK_SCRIPT,
    Children,
    clean_up,
    col,
    cpu_of,
    fmt,
    free_port,
    loadavg,
    median,
    one_post,
    positive_ints,
    ratio,
    run_guarded,
    run_wrk,
    wait_for_log,
    wait_for_port,
    wrk_figures,
)
from side_by_side import (
    DOMAIN,
    GATEWAY_TUNNEL,
    INSTALL,
    RELAY_LISTENING,
    _choices,
    _env,
    start_upstream,
)

PHASES = ("hop", "scale")
TARGETS = ("owner", "forwarded")  # the hop phase's two setups: wrk against A, against B
SECRET = "bench-cluster-secret-of-this-run"  # the nodes' shared secret (>= 16 characters)
INTERNAL_LISTENER = re.compile(r"internal listener on ")
METRICS_LISTENING = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
FORWARDED_OUT = 'mcpr_relay_cluster_forwarded_total{direction="out"}'
TUNNELS_CONNECTED = "mcpr_relay_tunnels_connected"

# The scale phase's load: WRK_SCRIPT's POST, each request to the next of the tunnels' names in turn
# (the requests are formatted once per name, in init, so rotating costs wrk no more than -H does).
ROTATE_SCRIPT = WRK_SCRIPT + """
hosts = {%(hosts)s}
prepared = {}
turn = 0
init = function(args)
  for i, host in ipairs(hosts) do
    wrk.headers["Host"] = host
    prepared[i] = wrk.format()
  end
end
request = function()
  turn = turn %% #prepared + 1
  return prepared[turn]
end
"""


@dataclass
class Node:
    """A running relay node: its process, its public port and where its metrics are."""

    name: str
    proc: subprocess.Popen
    port: int
    metrics_port: int

    def metrics(self) -> dict[str, float]:
        """The node's Prometheus samples, by name with labels (`FORWARDED_OUT`)."""
        with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        samples = (line.rpartition(" ") for line in text.splitlines() if line and not line.startswith("#"))
        return {name: float(value) for name, _, value in samples}


class Cluster:
    """One Redis and the relay nodes and gateways on it: one setup, stopped as a whole."""

    def __init__(self, children: Children, workdir: Path, upstream_port: int, label: str) -> None:
        self.children = children
        self.workdir = workdir
        self.upstream_port = upstream_port
        self.label = label  # in the log files' names: every cell of the scale phase has its own
        self.procs: list[subprocess.Popen] = []
        self.nodes: list[Node] = []
        self.gateways: dict[str, subprocess.Popen] = {}
        self.redis_port = free_port()
        with open(self._log("redis"), "wb") as log:
            self.redis = self._start("redis", ["redis-server", "--port", str(self.redis_port), "--bind", HOST,
                                               "--save", "", "--appendonly", "no"], stdout=log)
        wait_for_port(self.redis_port, self.redis, "redis-server")

    def _log(self, name: str) -> Path:
        return self.workdir / f"{self.label}-{name}.log"

    def _start(self, name: str, cmd: list[str], **kwargs: Any) -> subprocess.Popen:
        proc = self.children.start(f"{self.label}-{name}", cmd, cwd=self.workdir, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, **kwargs)
        self.procs.append(proc)
        return proc

    def add_node(self, name: str, listen: str) -> Node:
        """A relay node with its public listener on `listen` (an endpoint string), its internal
        listener on a port of its own and its metrics on another."""
        log_path = self._log(name)
        cmd = [sys.executable, "-m", "twisted", "--log-format=text", "mcpr-relay", "--domain", DOMAIN,
               "--listen", listen, "--public-url", f"http://*.{DOMAIN}",
               "--cluster", f"redis://{HOST}:{self.redis_port}/0", "--node-url", f"http://{HOST}:{free_port()}",
               "--metrics", f"tcp:0:interface={HOST}", "--access-log", "off",
               "--state-dir", str(self.workdir / f"{self.label}-{name}")]  # not ~/.local/state: the last run's names
        with open(log_path, "wb") as log:
            proc = self._start(name, cmd, env=_env(MCPR_CLUSTER_SECRET=SECRET), stdout=log)
        port = int(wait_for_log(proc, log_path, RELAY_LISTENING, f"relay {name}").group(1))
        wait_for_log(proc, log_path, INTERNAL_LISTENER, f"relay {name}'s internal listener")
        node = Node(name, proc, port,
                    int(wait_for_log(proc, log_path, METRICS_LISTENING, f"relay {name}'s metrics").group(1)))
        self.nodes.append(node)
        return node

    def add_gateway(self, name: str, relay_port: int) -> None:
        """A gateway (no store, no inspector) with the tunnel `name`, registered through `relay_port`."""
        cmd = [sys.executable, "-m", "twisted", "--log-format=text", "mcpr",
               "--mcp", f"http://{HOST}:{self.upstream_port}{MCP_PATH}", "--listen", f"tcp:0:interface={HOST}",
               "--relay-url", f"http://{HOST}:{relay_port}", "--subdomain", name, "--no-store", "--inspector", "off"]
        with open(self._log(name), "wb") as log:
            self.gateways[name] = self._start(name, cmd, stdout=log, env=_env(
                MCPR_TUNNEL_TOKEN=f"bench-cluster-token-{name}", XDG_STATE_HOME=str(self.workdir)))

    def wait_for_tunnels(self) -> None:
        for name, proc in self.gateways.items():
            wait_for_log(proc, self._log(name), GATEWAY_TUNNEL, f"the gateway {name}'s tunnel")

    def check(self, port: int, name: str) -> None:
        status, body = one_post(port, f"{name}.{DOMAIN}:{port}")
        if status != 200 or b'"result"' not in body:
            raise RuntimeError(f"a tools/call to {name} through :{port} failed: {status} {body[:300]!r}")

    def pids(self) -> dict[str, list[int]]:
        """The processes each figure is charged to: every node on its own, and the gateways."""
        return {node.name: [node.proc.pid] for node in self.nodes} | {
            "gateways": [p.pid for p in self.gateways.values()]}

    def forwarded(self) -> float:
        return sum(node.metrics().get(FORWARDED_OUT, 0.0) for node in self.nodes)

    def stop(self) -> None:
        """Relays and gateways at once, then Redis: the relays release their names on the way out."""
        self.children.stop_together([p for p in self.procs if p is not self.redis])
        self.children.stop(self.redis)


def measure(cluster: Cluster, children: Children, script: Path, port: int, concurrency: int,
            args: argparse.Namespace, host: str | None = None) -> dict:
    """One measured wrk run after its warm-up: wrk's figures, the CPU µs per request of each
    process group, and the share of the requests that a node forwarded to another."""
    if args.warmup:
        run_wrk(children, script, port, concurrency, args.warmup, host)
    groups = cluster.pids()
    forwarded = cluster.forwarded()  # the metrics' own requests fall outside the CPU window
    before = {g: cpu_of(pids) for g, pids in groups.items()}
    w, _ = run_wrk(children, script, port, concurrency, args.duration, host)
    after = {g: cpu_of(pids) for g, pids in groups.items()}
    forwarded = cluster.forwarded() - forwarded
    figures = wrk_figures(w)
    n = figures["requests"]
    per_request = {g: round((after[g] - before[g]) / n * 1e6, 1)  # type: ignore[operator]
                   if n and before[g] is not None and after[g] is not None else None for g in groups}
    relays = [v for g, v in per_request.items() if g != "gateways"]
    return figures | {"cpu_us_per_request": per_request,
                      "relays_cpu_us_per_request": round(sum(relays), 1) if None not in relays else None,  # type: ignore[arg-type]
                      "forwarded_share": round(forwarded / n, 3) if n else None}


def paired(cells: list[dict], key: str, part: str, base: Any, other: Any) -> dict:
    """Each round's `other` / `base` of `key` (their cells ran in the same round): median and spread."""
    values = sorted(v for v in (ratio(o[key], b[key]) for b in cells if b[part] == base for o in cells
                                if o[part] == other and o["round"] == b["round"]
                                and o.get("concurrency") == b.get("concurrency")) if v is not None)
    return {"median": median(values), "min": values[0] if values else None, "max": values[-1] if values else None}


# ---------------------------------------------------------------------------
# The phases.


def phase_hop(children: Children, workdir: Path, upstream_port: int, args: argparse.Namespace) -> list[dict]:
    """One cluster for the whole phase: A and B only differ in which one wrk talks to, so the two
    targets share every process and the rounds can alternate them cell by cell."""
    cluster = Cluster(children, workdir, upstream_port, "hop")
    try:
        a = cluster.add_node("relay-a", f"tcp:0:interface={HOST}")
        b = cluster.add_node("relay-b", f"tcp:0:interface={HOST}")
        cluster.add_gateway("bench", a.port)
        cluster.wait_for_tunnels()
        ports = {"owner": a.port, "forwarded": b.port}
        for port in ports.values():
            cluster.check(port, "bench")
        script = workdir / "post.lua"
        script.write_text(WRK_SCRIPT % {"body": REQUEST_BODY.decode()})
        say(f"hop: relay A :{a.port} (pid {a.proc.pid}) holds the tunnel; relay B :{b.port} (pid {b.proc.pid}) "
            f"forwards to it; gateway pid {cluster.gateways['bench'].pid}")
        cells = []
        for r in range(args.rounds):
            for c in args.concurrency:
                for target in (TARGETS if r % 2 == 0 else TARGETS[::-1]):
                    port = ports[target]
                    cell = {"round": r + 1, "target": target, "concurrency": c} | measure(
                        cluster, children, script, port, c, args, f"bench.{DOMAIN}:{port}")
                    cells.append(cell)
                    say(f"[hop {r + 1}/{args.rounds}] c{c:<3} {target:<9} {cell['rps']:>8,.0f} req/s  "
                        f"p50 {cell['p50_ms']:.3f} ms  relays {fmt(cell['relays_cpu_us_per_request'], '.0f')} µs/req  "
                        f"forwarded {fmt(cell['forwarded_share'], '.2f')}")
        return cells
    finally:
        cluster.stop()


def scale_cell(children: Children, workdir: Path, upstream_port: int, args: argparse.Namespace, k: int,
               round_no: int) -> dict:
    """k nodes and the tunnels, started for this cell alone: a k's processes cannot be kept while
    another k is measured (they share the port), and a fresh spread of the tunnels per cell keeps
    one lucky or unlucky placement from deciding a k's figures."""
    cluster = Cluster(children, workdir, upstream_port, f"scale-k{k}-r{round_no}")
    try:
        port = free_port()
        for i in range(k):
            cluster.add_node(f"relay-{i + 1}", f"reuseport:{port}:interface={HOST}")
        names = [f"t{i + 1}" for i in range(args.tunnels)]
        for name in names:
            cluster.add_gateway(name, port)
        cluster.wait_for_tunnels()
        for name in names:
            cluster.check(port, name)
        script = workdir / f"rotate-{port}.lua"
        script.write_text(ROTATE_SCRIPT % {"body": REQUEST_BODY.decode(),
                                           "hosts": ", ".join(f'"{n}.{DOMAIN}:{port}"' for n in names)})
        placement = [int(node.metrics().get(TUNNELS_CONNECTED, 0)) for node in cluster.nodes]
        cell = {"round": round_no, "k": k, "tunnels_per_node": placement} | measure(
            cluster, children, script, port, args.scale_concurrency, args)
        cell["gateways_cpu_us_per_request"] = cell["cpu_us_per_request"]["gateways"]
        return cell
    finally:
        cluster.stop()


def phase_scale(children: Children, workdir: Path, upstream_port: int, args: argparse.Namespace) -> list[dict]:
    cells = []
    for r in range(args.rounds):
        turn = r % len(args.nodes)
        for k in args.nodes[turn:] + args.nodes[:turn]:
            cell = scale_cell(children, workdir, upstream_port, args, k, r + 1)
            cells.append(cell)
            say(f"[scale {r + 1}/{args.rounds}] k={k} tunnels per node {cell['tunnels_per_node']}  "
                f"{cell['rps']:>8,.0f} req/s  relays {fmt(cell['relays_cpu_us_per_request'], '.0f')} µs/req  "
                f"forwarded {fmt(cell['forwarded_share'], '.2f')}")
    return cells


# ---------------------------------------------------------------------------
# Summary and report.

FIGURES = ("rps", "p50_ms", "p99_ms", "relays_cpu_us_per_request")


def summarize_hop(cells: list[dict], concurrency: list[int]) -> dict:
    out: dict[str, Any] = {}
    for c in concurrency:
        mine = [x for x in cells if x["concurrency"] == c]
        by_target: dict[str, Any] = {}
        for target in TARGETS:
            these = [x for x in mine if x["target"] == target]
            by_target[target] = {key: median(x[key] for x in these) for key in FIGURES + ("forwarded_share",)}
            by_target[target]["cpu_us_per_request"] = {
                g: median(x["cpu_us_per_request"][g] for x in these) for g in ("relay-a", "relay-b", "gateways")}
            by_target[target]["errors"] = sum(sum(x["errors"].values()) for x in these)
        own, fwd = by_target["owner"], by_target["forwarded"]
        out[f"c{c}"] = by_target | {
            "ratio": {key: ratio(fwd[key], own[key]) for key in FIGURES}
            | {"gateway_cpu_us_per_request": ratio(fwd["cpu_us_per_request"]["gateways"],
                                                   own["cpu_us_per_request"]["gateways"])},
            "ratio_by_round": {key: paired(mine, key, "target", "owner", "forwarded")
                               for key in ("rps", "relays_cpu_us_per_request")}}
    return out


def summarize_scale(cells: list[dict], nodes: list[int]) -> dict:
    out: dict[str, Any] = {}
    base = nodes[0]
    for k in nodes:
        these = [x for x in cells if x["k"] == k]
        out[f"k{k}"] = {key: median(x[key] for x in these) for key in
                        ("rps", "p50_ms", "p99_ms", "relays_cpu_us_per_request", "gateways_cpu_us_per_request",
                         "forwarded_share")}
        out[f"k{k}"]["errors"] = sum(sum(x["errors"].values()) for x in these)
        out[f"k{k}"]["tunnels_per_node"] = [x["tunnels_per_node"] for x in these]
    for k in nodes:
        out[f"k{k}"]["ratio"] = {key: ratio(out[f"k{k}"][key], out[f"k{base}"][key]) for key in
                                 ("rps", "relays_cpu_us_per_request", "gateways_cpu_us_per_request")}
        out[f"k{k}"]["ratio_by_round"] = {key: paired(cells, key, "k", base, k)
                                          for key in ("rps", "relays_cpu_us_per_request")}
    return out


def _spread(r: dict) -> str:
    return "-" if r["median"] is None else f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})"


def report(hop: dict, scale: dict, args: argparse.Namespace, upstream: str,
           load: tuple[list[str] | None, list[str] | None]) -> str:
    lines = [(f"The relay cluster (issue 14), same run: {args.rounds} round(s) of {args.duration} s per cell after "
              f"{args.warmup} s unmeasured, medians; upstream {upstream}; relays with --access-log off, gateways "
              f"with --no-store; load average {' '.join(load[0] or ['?'])} at the start, "
              f"{' '.join(load[1] or ['?'])} at the end, {os.cpu_count()} CPUs")]
    if hop:
        lines.append("")
        lines.append("Hop: relay A holds the tunnel; wrk against A (owner) and against B (forwarded: B -> A's internal "
                     "listener -> A's tunnel -> the gateway); B / A")
        lines.append(f"{'':6}{'target':<10}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'CPU µs/request: relay A':>25}"
                     f"{'relay B':>9}{'gateway':>9}{'relays':>9}{'forwarded':>11}{'errors':>8}")
        for cell, f in hop.items():
            for target in TARGETS:
                t = f[target]
                cpu = t["cpu_us_per_request"]
                lines.append(f"{cell:<6}{target:<10}{col(t['rps'], '8.0f')}{col(t['p50_ms'], '9.3f')}"
                             f"{col(t['p99_ms'], '9.3f')}{col(cpu['relay-a'], '25.0f')}{col(cpu['relay-b'], '9.0f')}"
                             f"{col(cpu['gateways'], '9.0f')}{col(t['relays_cpu_us_per_request'], '9.0f')}"
                             f"{col(t['forwarded_share'], '11.2f')}{t['errors']:>8}")
            x = f["ratio"]
            lines.append(f"{'':6}{'B / A':<10}{col(x['rps'], '8.3f')}{col(x['p50_ms'], '9.3f')}{col(x['p99_ms'], '9.3f')}"
                         f"   relays {fmt(x['relays_cpu_us_per_request'], '.3f')}, gateway "
                         f"{fmt(x['gateway_cpu_us_per_request'], '.3f')}; round by round: req/s "
                         f"{_spread(f['ratio_by_round']['rps'])}, relays' CPU/request "
                         f"{_spread(f['ratio_by_round']['relays_cpu_us_per_request'])}")
    if scale:
        base = args.nodes[0]
        lines.append("")
        lines.append(f"Scale: k relay processes on one public port (SO_REUSEPORT), {args.tunnels} tunnels (a gateway "
                     f"each) spread over them by the kernel, as are wrk's {args.scale_concurrency} connections; wrk "
                     f"rotates Host over the tunnels, so with k > 1 most requests reach a node without their tunnel "
                     f"and are forwarded (the share measured, from the nodes' counters); every cell restarts Redis, "
                     f"relays and gateways, the k values in turn in every round; x k={base}: ratio to k={base}")
        lines.append(f"{'k':<4}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'CPU µs/request: relays':>24}{'gateways':>10}"
                     f"{'forwarded':>11}{'errors':>8}{'req/s x k=' + str(base):>14}{'relays x k=' + str(base):>15}")
        for cell, f in scale.items():
            x = f["ratio"]
            lines.append(f"{cell[1:]:<4}{col(f['rps'], '8.0f')}{col(f['p50_ms'], '9.3f')}{col(f['p99_ms'], '9.3f')}"
                         f"{col(f['relays_cpu_us_per_request'], '24.0f')}{col(f['gateways_cpu_us_per_request'], '10.0f')}"
                         f"{col(f['forwarded_share'], '11.2f')}{f['errors']:>8}{col(x['rps'], '14.3f')}"
                         f"{col(x['relays_cpu_us_per_request'], '15.3f')}")
        for cell, f in scale.items():
            by_round = f["ratio_by_round"]
            lines.append(f"k={cell[1:]}: tunnels per node, each round: "
                         + ", ".join("/".join(map(str, p)) for p in f["tunnels_per_node"])
                         + ("" if cell == f"k{base}" else f"; x k={base} round by round: req/s "
                            f"{_spread(by_round['rps'])}, relays' CPU/request "
                            f"{_spread(by_round['relays_cpu_us_per_request'])}"))
    return "\n".join(lines)


def say(text: str) -> None:
    """Progress, on stderr: stdout is the report's (or the JSON's)."""
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    for tool, why in (("wrk", INSTALL["wrk"]), ("redis-server", "install: apt-get install redis-server")):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed ({why}): the cluster bench needs it", file=sys.stderr)
            return 1
    children = Children()
    workdir = Path(tempfile.mkdtemp(prefix="mcpr-bench-cluster-"))
    try:
        load_start = loadavg()
        upstream_port, upstream = start_upstream(children, workdir, say)
        started = time.monotonic()
        hop_cells = phase_hop(children, workdir, upstream_port, args) if "hop" in args.phases else []
        seconds = {"hop": round(time.monotonic() - started, 1)}
        scale_cells = phase_scale(children, workdir, upstream_port, args) if "scale" in args.phases else []
        seconds["scale"] = round(time.monotonic() - started - seconds["hop"], 1)
        load = (load_start, loadavg())
        hop = summarize_hop(hop_cells, args.concurrency) if hop_cells else {}
        scale = summarize_scale(scale_cells, args.nodes) if scale_cells else {}
        text = report(hop, scale, args, upstream, load)
        if args.json:
            say("\n" + text)
            print(json.dumps({"hop": hop, "scale": scale, "loadavg": load, "upstream": upstream, "seconds": seconds,
                              "args": vars(args), "cells": {"hop": hop_cells, "scale": scale_cells}}, indent=1))
        else:
            print("\n" + text)
        return 0
    finally:
        clean_up(children, workdir, args.keep)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--quick", action="store_true", help="a smoke check: 2 rounds of 1 s cells, no warm-up")
    parser.add_argument("--phases", type=_choices(PHASES), default=list(PHASES), help="comma-separated, of: hop, scale (both)")
    parser.add_argument("--rounds", type=int, help="rounds of each phase (5; --quick 2)")
    parser.add_argument("--duration", type=int, help="measured seconds per cell (5; --quick 1)")
    parser.add_argument("--warmup", type=int, help="unmeasured seconds of load before each cell (1; --quick 0)")
    parser.add_argument("--concurrency", type=positive_ints, default=[1, 16],
                        help="hop: wrk connections per cell (1,16)")
    parser.add_argument("--nodes", type=positive_ints, default=[1, 2, 3],
                        help="scale: relay processes per cell (1,2,3; the first is the ratios' base)")
    parser.add_argument("--tunnels", type=int, default=6, help="scale: tunnels, a gateway each (6)")
    parser.add_argument("--scale-concurrency", type=int, default=64, help="scale: wrk connections (64)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (every process's log)")
    parser.add_argument("--json", action="store_true", help="all figures as JSON on stdout, the report on stderr")
    args = parser.parse_args()
    for name, full, quick in (("rounds", 5, 2), ("duration", 5, 1), ("warmup", 1, 0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if min(args.rounds, args.duration, args.tunnels, args.scale_concurrency) < 1 or args.warmup < 0:
        parser.error("counts and durations must be positive (--warmup may be 0)")
    return run_guarded(run, args)


if __name__ == "__main__":
    sys.exit(main())
