"""End to end: the official MCP SDK client and server, with `twist mcpr` between them, as real processes."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
from pathlib import Path

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from tests.support.loopback import client_agent
from tests.support.processes import run_session, start_gateway, start_upstream


class GatewayEndToEndTests(TestCase):
    """`twist mcpr` between the SDK client and server: a whole session, its events, and start-up failures."""

    timeout = 120

    async def test_full_sdk_session_through_gateway(self) -> None:
        _, upstream = start_upstream(self)
        events_path = Path(self.mktemp()).resolve()
        gateway, base = start_gateway(self, upstream, "--events", str(events_path))
        result = await run_session(base + "/mcp")

        self.assertEqual(result["server_name"], "demo-server")
        self.assertIn("count", result["tools"])
        self.assertEqual(result["add_result"], 5)
        self.assertTrue(result["progress_before_result"])
        self.assertTrue(result["progress_streamed"], "progress notifications were buffered")
        self.assertEqual(len(result["progress_events"]), 3)
        self.assertIn("Hello", result["resource_text"])
        self.assertTrue(result["prompt_messages"])
        self.assertEqual(result["get_stream_notification"], "notifications/resources/list_changed")
        self.assertTrue(result["deleted"])

        events = [json.loads(line) for line in events_path.read_text().splitlines()]
        session_id = result["session_id"]
        requests = [e for e in events if e["type"] == "request"]
        by_method = {}
        for e in requests:
            by_method.setdefault(e["mcp_method"] or e["method"], []).append(e)
        self.assertEqual(by_method["initialize"][0]["status"], 200)
        self.assertEqual(by_method["initialize"][0]["session_id"], session_id)
        tools = {e["tool"] for e in by_method["tools/call"]}
        self.assertTrue({"add", "count", "notify"} <= tools, tools)
        self.assertEqual(by_method["resources/read"][0]["resource"], "demo://greeting")
        self.assertEqual(by_method["prompts/get"][0]["prompt"], "review")
        for e in requests:
            self.assertEqual(e["via"], "direct")
            self.assertEqual(e["session_id"], session_id)
            self.assertGreaterEqual(e["latency_ms"], e["upstream_ms"])
            self.assertGreater(e["latency_ms"], 0)
        count = next(e for e in by_method["tools/call"] if e["tool"] == "count")
        self.assertGreater(count["downstream_ms"], 100, "progress streamed over ~150 ms")
        self.assertEqual(count["client_name"], "mcp")
        stream = [e for e in requests if e["route"] == "mcp-stream"]
        self.assertTrue(stream and stream[0]["status"] == 200)
        delete = [e for e in requests if e["route"] == "session-delete"]
        self.assertEqual(delete[0]["status"], 200)
        sessions = [(e["state"], e["server_name"]) for e in events if e["type"] == "session"]
        self.assertEqual(sessions, [("active", "demo-server"), ("ended", "demo-server")])
        self.assertTrue(any(e["type"] == "heartbeat" for e in events))
        self.assertIn("tools/call add", gateway.output())

    async def test_upstream_stopped_gives_jsonrpc_502(self) -> None:
        server, upstream = start_upstream(self)
        _, base = start_gateway(self, upstream)
        await run_session(base + "/mcp", "--quick")
        server.stop()
        agent = client_agent(self)
        body = json.dumps({"jsonrpc": "2.0", "id": 42, "method": "tools/list"}).encode()
        response = await agent.request(
            b"POST", (base + "/mcp").encode(),
            Headers({b"content-type": [b"application/json"],
                     b"accept": [b"application/json, text/event-stream"]}),
            FileBodyProducer(io.BytesIO(body)))
        self.assertEqual(response.code, 502)
        answer = json.loads(await readBody(response))
        self.assertEqual(answer["id"], 42)
        self.assertEqual(answer["jsonrpc"], "2.0")
        self.assertIn("connection refused", answer["error"]["message"])

    async def test_config_error_names_key_and_file(self) -> None:
        cwd = Path(self.mktemp())
        cwd.mkdir()
        (cwd / "mcpr.toml").write_text('mcp = "http://127.0.0.1:1/mcp"\nport = "abc"\n')
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "twisted", "mcpr"], path=str(cwd), env=dict(os.environ))
        self.assertNotEqual(code, 0)
        self.assertIn("mcpr.toml: key 'port': expected an integer 1-65535, got \"abc\"", (out + err).decode())

    async def test_port_in_use_stops_at_start(self) -> None:
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        state = Path(self.mktemp()).resolve()  # its event store opens before the port fails
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "twisted", "mcpr", "--mcp", "http://127.0.0.1:1/mcp", "--listen",
                             f"tcp:{port}:interface=127.0.0.1"], env={**os.environ, "XDG_STATE_HOME": str(state)})
        self.assertEqual((code, out), (64, b""))
        self.assertEqual(err.decode().splitlines(),
                         [f"mcpr: option --listen: cannot listen on tcp:{port}:interface=127.0.0.1: Address already "
                          "in use: another process listens there (another gateway or relay?): stop it, or choose "
                          "another port"])
