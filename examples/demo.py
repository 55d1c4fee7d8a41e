"""`make demo`: the whole product on loopback: relay, example MCP server, gateway with its tunnel.

Starts a relay for the domain `localhost`, the example MCP server built with
the official SDK (examples/demo_server.py), and the gateway in front of it
with a tunnel to the relay, named `demo`.  It prints the public URL, runs a
full MCP session through relay -> tunnel -> gateway -> server with the SDK
client (connecting to 127.0.0.1 with the `Host: demo.localhost:<port>` the
relay routes on), shows the widget's Content Security Policy as the server
declares it and as a client of the public URL gets it, and one of the
gateway's JSON events, and keeps everything running until Ctrl-C.

A tunnel URL on a local relay never counts as a public origin by itself, so
the demo writes it as `[csp] domain` in .demo/mcpr.toml (beside the gateway's
token, which keeps the name `demo` reserved for this checkout).  Only curl
and Chromium resolve `*.localhost` themselves; the last lines say how any
other client gets there.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import tomlkit

HERE = Path(__file__).resolve().parent
SUBDOMAIN = "demo"
WIDGET = "ui://widget/greeting.html"


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


# The gateway's console line per request: `21:23:11 POST 200 147B 8ms 8ms↑ 0ms↓ tools/call add`.
REQUEST_LINE = re.compile(r"^\d\d:\d\d:\d\d [A-Z]+ \d{3} .*$", re.MULTILINE)


def request_lines(text: str) -> list[str]:
    return REQUEST_LINE.findall(text)


def set_csp_domain(config: Path, origin: str) -> None:
    """`[csp] domain = origin` in the gateway's mcpr.toml, keeping what else it holds (its token)."""
    document = tomlkit.parse(config.read_text()) if config.exists() else tomlkit.document()
    csp = document.setdefault("csp", tomlkit.table())
    csp["domain"] = origin
    config.write_text(tomlkit.dumps(document))
    config.chmod(0o600)


def widget_csp(port: int, host: str) -> dict:
    """The widget resource's `_meta`, as an MCP client connecting to 127.0.0.1:port with `Host: host`
    reads it: initialize, resources/read, DELETE (plain JSON-RPC over HTTP; answers come as SSE)."""
    session: str | None = None

    def call(method: str, params: dict, id: int | None) -> dict | None:
        nonlocal session
        message = {"jsonrpc": "2.0", "method": method, "params": params, **({} if id is None else {"id": id})}
        headers = {"Host": host, "Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if session:
            headers["Mcp-Session-Id"] = session
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("POST", "/mcp", json.dumps(message), headers)
            response = connection.getresponse()
            session = response.getheader("mcp-session-id") or session
            body = response.read().decode()
        finally:
            connection.close()
        answers = [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:")] or \
            ([json.loads(body)] if body.strip() else [])
        return next((a for a in answers if a.get("id") == id), None) if id is not None else None

    call("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                        "clientInfo": {"name": "mcpr-demo", "version": "1"}}, 1)
    call("notifications/initialized", {}, None)
    answer = call("resources/read", {"uri": WIDGET}, 2)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("DELETE", "/mcp", headers={"Host": host, "Mcp-Session-Id": session or ""})
    connection.getresponse().read()
    connection.close()
    if not answer or "result" not in answer:
        raise SystemExit(f"resources/read {WIDGET} failed: {answer}")
    return answer["result"]["contents"][0].get("_meta", {})


def show_csp(declared: dict, seen: dict) -> None:
    before, after = declared.get("openai/widgetCSP", {}), seen.get("openai/widgetCSP", {})
    for key in ("connect_domains", "resource_domains"):
        print(f"  {key:<17} server: {', '.join(before.get(key, []))}")
        print(f"  {'':<17} client: {', '.join(after.get(key, []))}")
    print(f"  openai/widgetDomain      {seen.get('openai/widgetDomain')}   (Claude's ui.csp gets the same lists)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3000, help="gateway's local port (default 3000, or a free one)")
    parser.add_argument("--relay-port", type=int, default=8080, help="relay port (default 8080, or a free one)")
    parser.add_argument("--once", action="store_true", help="exit after the round trip instead of serving")
    parser.add_argument("--workdir", type=Path, default=HERE.parent / ".demo",
                        help="where the logs, events, the gateway's mcpr.toml and the relay's state go (.demo)")
    args = parser.parse_args()

    workdir = args.workdir.resolve()
    workdir.mkdir(exist_ok=True)
    children: list[subprocess.Popen] = []

    def start(name: str, command: list[str]) -> tuple[subprocess.Popen, Path]:
        log_path = workdir / f"{name}.log"
        with log_path.open("w") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        children.append(child)
        return child, log_path

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        relay_port = free_port(args.relay_port)
        relay, relay_log = start("relay", [
            sys.executable, "-m", "twisted", "--log-format=text", "mcpr-relay", "--domain", "localhost",
            "--listen", f"tcp:{relay_port}:interface=127.0.0.1", "--public-url", f"http://*.localhost:{relay_port}",
            "--state-dir", str(workdir / "relay-state")])
        wait_for(relay_log, relay, r"listening on")
        print(f"relay:           http://127.0.0.1:{relay_port}  (domain localhost, open auth)")

        server, server_log = start("server", [sys.executable, str(HERE / "demo_server.py"), "--port", "0"])
        mcp = wait_for(server_log, server, r"LISTENING (\S+)").group(1)
        print(f"MCP server:      {mcp}  (official SDK)")

        port = free_port(args.port)
        public = f"http://{SUBDOMAIN}.localhost:{relay_port}"
        config = workdir / "mcpr.toml"
        set_csp_domain(config, public)
        events = workdir / "events.jsonl"
        events.unlink(missing_ok=True)
        gateway, gateway_log = start("gateway", [
            sys.executable, "-m", "twisted", "--log-format=text", "mcpr", "--mcp", mcp,
            "--listen", f"tcp:{port}:interface=127.0.0.1", "--relay-url", f"http://127.0.0.1:{relay_port}",
            "--subdomain", SUBDOMAIN, "--events", str(events)])
        if wait_for(gateway_log, gateway, r"Tunnel: (\S+)").group(1) != public:
            raise SystemExit(f"the tunnel is not {public}:\n{gateway_log.read_text()}")
        host = public.split("://", 1)[1]
        print(f"gateway:         http://127.0.0.1:{port}/mcp  (direct mode)")
        print(f"Tunnel: {public}  (token and [csp] domain in {config})\n")

        print(f"One MCP session through relay -> tunnel -> gateway -> server (Host: {host}):")
        session = subprocess.run(
            [sys.executable, str(HERE / "mcp_session.py"), f"http://127.0.0.1:{relay_port}/mcp",
             "--header", f"Host: {host}"], text=True, capture_output=True, timeout=60)
        for line in session.stdout.splitlines():
            print("  " + line)
        if session.returncode != 0:
            print(session.stderr, file=sys.stderr)
            raise SystemExit("the round trip failed")

        upstream = mcp.split("://", 1)[1].split("/", 1)[0]
        declared = widget_csp(int(upstream.rsplit(":", 1)[1]), upstream)
        seen = widget_csp(relay_port, host)
        print(f"\nThe widget's CSP (resources/read {WIDGET}), as the server declares it and as a client of "
              f"the public URL gets it:")
        show_csp(declared, seen)

        time.sleep(0.3)
        shown = request_lines(gateway_log.read_text(errors="replace"))
        print("\nWhat the gateway logged, a line per request:")
        for line in shown:
            print("  " + line)
        read = [line for line in events.read_text().splitlines()
                if json.loads(line).get("resource") == WIDGET and json.loads(line).get("via") == "tunnel"]
        print(f"and one of its JSON events ({events}):\n  {read[-1] if read else '(none found)'}")
        if args.once:
            return
        print(f"""
Serving until Ctrl-C. MCP clients can use:
  http://127.0.0.1:{port}/mcp             the gateway, direct mode: any client
  {public}/mcp     through the relay and the tunnel: curl and Chromium resolve *.localhost
                                      themselves; Python, Node and anything else using the system's
                                      resolver need the name once in /etc/hosts:
      echo "127.0.0.1 {host.split(':')[0]}" | sudo tee -a /etc/hosts
  or, without /etc/hosts, connect to 127.0.0.1 and send the Host header, e.g.
      curl --resolve {host}:127.0.0.1 {public}/healthz
      curl -H 'Host: {host}' http://127.0.0.1:{relay_port}/healthz
""")
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
            lines = request_lines(gateway_log.read_text(errors="replace"))
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
