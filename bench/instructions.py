#!/usr/bin/env python3
"""The gateway's instructions per small request, counted by callgrind: this tree against another.

    .venv/bin/python bench/instructions.py [--baseline TREE] [--requests N] [--connections K] [--json]

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

from _common import HOST, MCP_PATH, Children, clean_up, post_request, run_guarded, wait_for_log
from side_by_side import GATEWAY_ANNOUNCE, _env, start_upstream

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


def measure(name: str, tree: Path | None, up_port: int, children: Children, workdir: Path,
            args: argparse.Namespace) -> dict:
    home = workdir / name
    home.mkdir()
    log_path = workdir / f"{name}.log"
    out = workdir / f"callgrind.{name}"
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
           sys.executable, "-m", "twisted", "--log-format=text", "mcpr", "--mcp",
           f"http://{HOST}:{up_port}{MCP_PATH}", "--listen", f"tcp:0:interface={HOST}", "--no-tunnel"]
    env = _env(PYTHONPATH=str(tree)) if tree else _env()
    with open(log_path, "wb") as log:
        proc = children.start(name, cmd, cwd=home, env=env | {"XDG_STATE_HOME": str(workdir / f"{name}-state")},
                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    port = int(wait_for_log(proc, log_path, GATEWAY_ANNOUNCE, f"the gateway ({name})", timeout=300).group(2))
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
        up_port, upstream = start_upstream(children, workdir, lambda text: print(text, file=sys.stderr))
        results = [measure("gateway", None, up_port, children, workdir, args)]
        if args.baseline:
            results.append(measure("gateway-0", Path(args.baseline).resolve(), up_port, children, workdir, args))
    except RuntimeError as e:
        print(f"instructions: {e}", file=sys.stderr)
        return 1
    finally:
        clean_up(children, workdir, args.keep)
    if args.json:
        print(json.dumps({"upstream": upstream, "results": results}, indent=2))
        return 0
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
    parser.add_argument("--baseline", metavar="TREE", help="another checkout, measured the same way after this one")
    parser.add_argument("--requests", type=int, default=2000, help="measured requests (2000)")
    parser.add_argument("--warmup", type=int, default=300, help="unmeasured requests first (300)")
    parser.add_argument("--connections", type=int, default=8, help="kept-alive connections (8)")
    parser.add_argument("--keep", action="store_true", help="keep the logs and callgrind files")
    parser.add_argument("--json", action="store_true", help="the figures as JSON")
    args = parser.parse_args()
    if args.requests < 1 or args.connections < 1 or args.warmup < 0:
        parser.error("--requests and --connections must be positive, --warmup not negative")
    return run_guarded(run, args)


if __name__ == "__main__":
    sys.exit(main())
