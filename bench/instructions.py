#!/usr/bin/env python3
"""Instructions per unit of work, counted by callgrind: the gateway's per small request, or the
relay's per tunnel registration; this tree against another.

    .venv/bin/python bench/instructions.py [--target gateway|registration] [--baseline TREE]
                                           [--requests N] [--connections K] [--json]

Why instructions: on this project's machine two identical gateways differ by
up to 25 % in CPU time per request from one wrk round to the next (a shared
VM), so a change worth 3 % cannot be seen in `side_by_side.py` without many
rounds.  callgrind counts the instructions a process runs, which is the same
for the same code and inputs whatever else the machine does.  It counts user
space only: system calls are one instruction each, so a change that saves
system calls (or spends more) shows in `side_by_side.py`'s CPU figures and not
here.  Use this to compare Python-level changes, and side_by_side.py for the
verdict.

Each gateway (direct mode, its event store on, as by default) runs under
`valgrind --tool=callgrind` in front of the same upstream as
side_by_side.py's small-request phase (nginx answering the tools/call POST
with a ~200-byte JSON-RPC result; bench/_roles.py's origin without nginx).
`--connections` keep-alive connections send the same POST as wrk does, one at
a time each: first `--warmup` requests (the gateway's caches fill, callgrind
translates the code it runs), then the counters are zeroed, then
`--requests` requests, then the counters are dumped.  The figure is the
dump's instruction total divided by the requests.  The store's writer process
is not under callgrind: its work per request is a separate process's.

With `--target registration` the relay runs under callgrind instead, set up as
side_by_side.py's idle phase sets it up (open registration, the per-address
caps lifted), and bench/_roles.py's idle client registers tunnels on it
`--connections` at a time: `--warmup` first, then, the counters zeroed,
`--requests` more (each the whole exchange: TCP accept, WebSocket upgrade,
the JSON hello and answer, the reservation written by the relay's SQLite
thread, which callgrind counts with the rest of the process, and the tunnel's
HTTP/2 start).  The figure is instructions per registration.

Exit status: 0 when the run completed, 1 when it could not, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import HOST, MCP_PATH, Children, clean_up, post_request, readline, run_guarded, wait_for_log
from side_by_side import GATEWAY_ANNOUNCE, RELAY_DOMAIN, RELAY_LISTENING, ROLES, _env, start_upstream

VALGRIND = "apt-get install -y valgrind"
_TOTALS = re.compile(r"^(?:summary|totals): (\d+)", re.M)
_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.I)


async def _one_connection(port: int, count: int) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    request = post_request(f"{HOST}:{port}")
    try:
        for _ in range(count):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"the gateway answered {head[:80]!r}")
            length = _LENGTH.search(head)
            if length is None:
                raise RuntimeError("an answer without Content-Length")
            await reader.readexactly(int(length.group(1)))
    finally:
        writer.close()


def send(port: int, requests: int, connections: int) -> None:
    """`requests` POSTs over `connections` kept-alive connections, one request at a time on each."""
    each, extra = divmod(requests, connections)

    async def all_of_them() -> None:
        await asyncio.gather(*(_one_connection(port, each + (i < extra)) for i in range(connections)))

    asyncio.run(all_of_them())


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=300)


def register(port: int, count: int, window: int, prefix: str, children: Children, workdir: Path) -> subprocess.Popen:
    """`count` tunnels registered by the idle client, `window` at a time; it keeps them open until
    the caller stops it."""
    cmd = [sys.executable, str(ROLES), "idle", "--port", str(port), "--count", str(count), "--window", str(window),
           "--prefix", prefix]
    with open(workdir / f"idle-{port}-{prefix}.log", "wb") as err:
        client = children.start(f"idle-{prefix}", cmd, stdout=subprocess.PIPE, stderr=err, bufsize=0)
    deadline = time.monotonic() + 60 + count  # callgrind runs the relay some 50 times slower
    while (line := readline(client.stdout, deadline)).startswith("progress"):
        pass
    result = json.loads(line)
    if result["registered"] != count:
        raise RuntimeError(f"{result['failed']} of {count} registrations failed: {result['failures']}")
    return client


def _start(name: str, tree: Path | None, children: Children, workdir: Path, daemon: list[str],
           announce: re.Pattern[str], group: int) -> tuple[subprocess.Popen, int]:
    home = workdir / name
    home.mkdir()
    log_path = workdir / f"{name}.log"
    out = workdir / f"callgrind.{name}"
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
           sys.executable, "-m", "twisted", "--log-format=text", *daemon]
    env = _env(PYTHONPATH=str(tree)) if tree else _env()
    with open(log_path, "wb") as log:
        proc = children.start(name, cmd, cwd=home, env=env | {"XDG_STATE_HOME": str(workdir / f"{name}-state")},
                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, int(wait_for_log(proc, log_path, announce, f"{daemon[0]} ({name})", timeout=300).group(group))


def measure(name: str, tree: Path | None, up_port: int, children: Children, workdir: Path,
            args: argparse.Namespace) -> dict:
    clients: list[subprocess.Popen] = []  # the idle clients holding the registered tunnels open
    if args.target == "registration":
        many = str(2 * (args.warmup + args.requests) + 100)
        proc, port = _start(name, tree, children, workdir, [
            "mcpr-relay", "--domain", RELAY_DOMAIN, "--listen", f"tcp:0:interface={HOST}",
            "--max-tunnels", many, "--max-tunnels-per-ip", many, "--max-connections-per-ip", many,
            "--registration-rate", str(int(many) * 60), "--registration-burst", many], RELAY_LISTENING, 1)
        # Each relay is fresh, so the same names serve both; the two batches differ by prefix.
        if args.warmup:
            clients.append(register(port, args.warmup, args.connections, "warm", children, workdir))
        callgrind_control("--zero", str(proc.pid))
        started = time.monotonic()
        clients.append(register(port, args.requests, args.connections, "counted", children, workdir))
    else:
        proc, port = _start(name, tree, children, workdir, [
            "mcpr", "--mcp", f"http://{HOST}:{up_port}{MCP_PATH}", "--listen", f"tcp:0:interface={HOST}",
            "--no-tunnel"], GATEWAY_ANNOUNCE, 2)
        send(port, args.warmup, args.connections)
        callgrind_control("--zero", str(proc.pid))
        started = time.monotonic()
        send(port, args.requests, args.connections)
    seconds = time.monotonic() - started
    for old in workdir.glob(f"callgrind.{name}*"):
        old.unlink()
    callgrind_control("--dump", str(proc.pid))
    dumps = sorted(workdir.glob(f"callgrind.{name}*"))
    totals = [int(m.group(1)) for d in dumps if (m := _TOTALS.search(d.read_text(errors="replace")))]
    children.stop(proc)
    children.stop_together(clients)
    if not totals:
        raise RuntimeError(f"no callgrind dump from {name} ({[d.name for d in dumps]})")
    instructions = max(totals)  # the dump of the measured window (the exit's own dump is removed above)
    return {"name": name, "tree": str(tree) if tree else "this tree", "requests": args.requests,
            "instructions_per_request": round(instructions / args.requests), "seconds": round(seconds, 1)}


def run(args: argparse.Namespace) -> int:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print(f"valgrind is not installed ({VALGRIND}): it counts the instructions", file=sys.stderr)
        return 1
    children = Children()
    workdir = Path(tempfile.mkdtemp(prefix="mcpr-instructions-"))
    try:
        if args.target == "registration":
            up_port, upstream = 0, "none"
        else:
            up_port, upstream = start_upstream(children, workdir, lambda text: print(text, file=sys.stderr))
        name = "gateway" if args.target == "gateway" else "relay"
        results = [measure(name, None, up_port, children, workdir, args)]
        if args.baseline:
            results.append(measure(f"{name}-0", Path(args.baseline).resolve(), up_port, children, workdir, args))
    except RuntimeError as e:
        print(f"instructions: {e}", file=sys.stderr)
        return 1
    finally:
        clean_up(children, workdir, args.keep)
    if args.json:
        print(json.dumps({"upstream": upstream, "results": results}, indent=2))
        return 0
    if args.target == "registration":
        print(f"Relay instructions per tunnel registration (callgrind; {args.requests} registrations, "
              f"{args.connections} at a time, after {args.warmup} unmeasured)")
    else:
        print(f"Gateway instructions per small request (callgrind; {args.requests} requests over "
              f"{args.connections} connections after {args.warmup} unmeasured; upstream {upstream})")
    for r in results:
        print(f"  {r['name']:<10} {r['instructions_per_request']:>12,}  ({r['tree']})")
    if len(results) == 2:
        after, before = (r["instructions_per_request"] for r in results)
        print(f"  after / before: {after / before:.3f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("gateway", "registration"), default="gateway",
                        help="what is counted: the gateway's small requests, or the relay's registrations (gateway)")
    parser.add_argument("--baseline", metavar="TREE", help="another checkout, measured the same way after this one")
    parser.add_argument("--requests", type=int, default=2000,
                        help="measured requests or registrations (2000)")
    parser.add_argument("--warmup", type=int, default=300, help="unmeasured ones first (300)")
    parser.add_argument("--connections", type=int, default=8,
                        help="kept-alive connections, or registrations under way at once (8)")
    parser.add_argument("--keep", action="store_true", help="keep the logs and callgrind files")
    parser.add_argument("--json", action="store_true", help="the figures as JSON")
    args = parser.parse_args()
    if args.requests < 1 or args.connections < 1 or args.warmup < 0:
        parser.error("--requests and --connections must be positive, --warmup not negative")
    return run_guarded(run, args)


if __name__ == "__main__":
    sys.exit(main())
