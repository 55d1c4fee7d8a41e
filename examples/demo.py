"""`make demo`: the whole product on loopback: relay, example MCP server, gateway with its tunnel.

Starts a relay for the domain `localhost`, the example MCP server built with
the official SDK (examples/demo_server.py), and the gateway in front of it
with a tunnel to the relay.  It prints the public URL, runs a full MCP
session through relay -> tunnel -> gateway -> server with the SDK client
(connecting to 127.0.0.1 with the `Host: <name>.localhost` the relay routes
on), and keeps everything running until Ctrl-C.  The gateway's token lives in
.demo/mcpr.toml, so the public URL stays the same from one demo to the next.
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKDIR = HERE.parent / ".demo"


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise SystemExit("no free port on 127.0.0.1")


def wait_for(path: Path, proc: subprocess.Popen, pattern: str, timeout: float = 30.0) -> re.Match:
    """The first match of `pattern` in a child's log file, waiting for it to appear."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        match = re.search(pattern, text)
        if match:
            return match
        if proc.poll() is not None:
            raise SystemExit(f"{path.name}: the process exited ({proc.returncode}):\n{text}")
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {pattern!r} in {path}:\n{path.read_text(errors='replace')}")


def request_lines(text: str, namespace: str) -> list[str]:
    """Console lines of one logger namespace, without the log prefix."""
    marker = f"[{namespace}#info] "
    return [line.split(marker, 1)[1] for line in text.splitlines() if marker in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3000, help="gateway's local port (default 3000, or a free one)")
    parser.add_argument("--relay-port", type=int, default=8080, help="relay port (default 8080, or a free one)")
    parser.add_argument("--once", action="store_true", help="exit after the round trip instead of serving")
    args = parser.parse_args()

    WORKDIR.mkdir(exist_ok=True)
    children: list[subprocess.Popen] = []

    def start(name: str, command: list[str]) -> tuple[subprocess.Popen, Path]:
        log_path = WORKDIR / f"{name}.log"
        with log_path.open("w") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=WORKDIR)
        children.append(child)
        return child, log_path

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        relay_port = free_port(args.relay_port)
        relay, relay_log = start("relay", [
            sys.executable, "-m", "twisted", "--log-format=text", "mcpr-relay", "--domain", "localhost",
            "--listen", f"tcp:{relay_port}:interface=127.0.0.1", "--public-url", f"http://*.localhost:{relay_port}"])
        wait_for(relay_log, relay, r"listening on")
        print(f"relay:           http://127.0.0.1:{relay_port}  (domain localhost, open auth)")

        server, server_log = start("server", [sys.executable, str(HERE / "demo_server.py"), "--port", "0"])
        mcp = wait_for(server_log, server, r"LISTENING (\S+)").group(1)
        print(f"MCP server:      {mcp}  (official SDK)")

        port = free_port(args.port)
        gateway, gateway_log = start("gateway", [
            sys.executable, "-m", "twisted", "--log-format=text", "mcpr", "--mcp", mcp,
            "--listen", f"tcp:{port}:interface=127.0.0.1", "--relay-url", f"http://127.0.0.1:{relay_port}",
            "--events", str(WORKDIR / "events.jsonl")])
        public = wait_for(gateway_log, gateway, r"Tunnel: (\S+)").group(1)
        host = public.split("://", 1)[1]
        print(f"gateway:         http://127.0.0.1:{port}/mcp  (direct mode)")
        print(f"Tunnel: {public}  (token kept in {WORKDIR / 'mcpr.toml'})\n")

        print(f"One MCP session through relay -> tunnel -> gateway -> server (Host: {host}):")
        session = subprocess.run(
            [sys.executable, str(HERE / "mcp_session.py"), f"http://127.0.0.1:{relay_port}/mcp",
             "--header", f"Host: {host}"], text=True, capture_output=True, timeout=60)
        for line in session.stdout.splitlines():
            print("  " + line)
        if session.returncode != 0:
            print(session.stderr, file=sys.stderr)
            raise SystemExit("the round trip failed")
        time.sleep(0.3)
        shown = request_lines(gateway_log.read_text(errors="replace"), "mcpr")
        print(f"\nWhat the gateway logged (JSON events in {WORKDIR / 'events.jsonl'}):")
        for line in shown:
            print("  " + line)
        if args.once:
            return
        print(f"\nServing. Point an MCP client at http://127.0.0.1:{port}/mcp, or at the relay with "
              f"Host: {host}  (Ctrl-C to stop)\n")
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
            lines = request_lines(gateway_log.read_text(errors="replace"), "mcpr")
            for line in lines[len(shown):]:
                print("  " + line)
            shown = lines
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()


if __name__ == "__main__":
    main()
