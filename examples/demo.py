"""`make demo`: the example MCP server behind `twist mcpr`, one real client round trip, then serve.

Starts examples/demo_server.py (an MCP server built with the official SDK),
puts the gateway in front of it in direct HTTP mode, runs a full MCP session
through the gateway with the SDK client, and keeps both running until Ctrl-C
so you can point your own MCP client at the printed URL.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise SystemExit("no free port on 127.0.0.1")


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"process exited before saying {needle!r} (exit code {proc.wait()})")
        if needle in line:
            return line.strip()
    raise SystemExit(f"timed out waiting for {needle!r}")


def wait_in_file(path: Path, proc: subprocess.Popen, needle: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise SystemExit(f"the gateway exited ({proc.returncode}):\n{path.read_text(errors='replace')}")
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for the gateway to listen:\n{path.read_text(errors='replace')}")


def request_lines(text: str) -> list[str]:
    """The gateway's one-line-per-request console output, without the log prefix."""
    return [line.split("[mcpr#info] ", 1)[1] for line in text.splitlines() if "[mcpr#info] " in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3000, help="gateway port (default 3000, or a free one)")
    parser.add_argument("--once", action="store_true", help="exit after the round trip instead of serving")
    args = parser.parse_args()

    children: list[subprocess.Popen] = []

    def stop_all(*_: object) -> None:
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server = subprocess.Popen([sys.executable, str(HERE / "demo_server.py"), "--port", "0"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        children.append(server)
        mcp = wait_for_line(server, "LISTENING").split()[-1]
        print(f"MCP server (official SDK):  {mcp}")

        port = free_port(args.port)
        workdir = Path(tempfile.mkdtemp(prefix="mcpr-demo-"))
        log_path = workdir / "gateway.log"
        with log_path.open("w") as log:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "twisted", "--log-format=text", "mcpr", "--mcp", mcp,
                 "--listen", f"tcp:{port}:interface=127.0.0.1", "--events", str(workdir / "events.jsonl")],
                stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        children.append(gateway)
        wait_in_file(log_path, gateway, " -> " + mcp)
        url = f"http://127.0.0.1:{port}/mcp"
        print(f"mcpr gateway (direct mode): {url}\n")

        print("One MCP session through the gateway, with the SDK client:")
        session = subprocess.run([sys.executable, str(HERE / "mcp_session.py"), url], text=True,
                                 capture_output=True, timeout=60)
        for line in session.stdout.splitlines():
            print("  " + line)
        if session.returncode != 0:
            print(session.stderr, file=sys.stderr)
            raise SystemExit("the round trip failed")
        time.sleep(0.3)
        shown = request_lines(log_path.read_text(errors="replace"))
        print(f"\nWhat the gateway logged (JSON events in {workdir / 'events.jsonl'}):")
        for line in shown:
            print("  " + line)
        if args.once:
            return
        print(f"\nServing. Point your MCP client at {url}  (Ctrl-C to stop)\n")
        while gateway.poll() is None:
            time.sleep(0.5)
            lines = request_lines(log_path.read_text(errors="replace"))
            for line in lines[len(shown):]:
                print("  " + line)
            shown = lines
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        stop_all()


if __name__ == "__main__":
    main()
