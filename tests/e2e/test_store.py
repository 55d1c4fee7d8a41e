"""The event store end to end: real SDK sessions through a real gateway, directly and through a real
relay and tunnel, then every query command run as the user runs it, while the gateway runs."""

from __future__ import annotations

import io
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Callable

from twisted.trial.unittest import TestCase
from twisted.web.client import FileBodyProducer, readBody

from tests.e2e.test_tunnel import TunnelTestBase
from tests.support.loopback import sleep
from tests.support.processes import (
    MCPR,
    ROOT,
    Process,
    free_port,
    python,
    run_mcpr,
    run_session,
    start_gateway,
    start_upstream,
)


def ndjson(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


QUERIES = 50  # of a store the gateway is still writing: 50 x (a query + 0.1 s) is far above its 0.2 s batches


async def stored(testcase: TestCase, args: tuple[str, ...], enough: Callable[[list[dict]], bool], what: str, *,
                 cwd: Path | None = None, env: dict[str, str] | None = None) -> list[dict]:
    """The NDJSON answer of `mcpr ARGS` once it holds `what` the test waits for.

    A session's client is done when the gateway has answered its last
    request, but the record of that request reaches the file only with the
    writer thread's next batch, which nothing outside the gateway can see
    coming; so the query is asked again, a bounded number of times.
    """
    rows: list[dict] = []
    for _ in range(QUERIES):
        code, out, err = await run_mcpr(*args, cwd=cwd, env=env)
        testcase.assertEqual((code, err), (0, ""), f"mcpr {' '.join(args)}: {out}")
        rows = ndjson(out)
        if enough(rows):
            return rows
        await sleep(0.1)
    testcase.fail(f"{what}: not in the store after {QUERIES} times `mcpr {' '.join(args)}`; the last answer: {rows}")


class StoreThroughTheTunnelTests(TunnelTestBase):
    """One gateway serving a session directly and one through the tunnel; its store answers for both."""

    async def test_every_query_command_on_a_real_session(self) -> None:
        _, relay_port = self.start_relay()
        _, upstream = start_upstream(self)
        gateway, url, cwd = self.start_gateway(upstream, relay_port, "--subdomain", "stored")
        local = re.search(r"http://(127\.0\.0\.1:\d+)", gateway.wait_for(" -> ")).group(1)
        store_line = gateway.wait_for("event store: ")
        direct = await run_session(f"http://{local}/mcp")
        tunnelled = await run_session(f"http://127.0.0.1:{relay_port}/mcp", "--header", f"Host: {self.host(url)}")
        # A client that goes on with a session the server has ended: the one failed request.
        stale = await self.public(relay_port, url, "/mcp", b"POST", FileBodyProducer(io.BytesIO(json.dumps(
            {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "add", "arguments": {"a": 1, "b": 2}}}
        ).encode())), headers={"content-type": "application/json", "accept": "application/json, text/event-stream",
                               "mcp-session-id": tunnelled["session_id"]})
        self.assertEqual(stale.code, 404, await readBody(stale))
        # The default store: the one of the gateway started in this folder, with its XDG_STATE_HOME.
        env = {"XDG_STATE_HOME": gateway.state_home}
        path = store_line.split("event store: ", 1)[1].split(" ", 1)[0]
        self.assertTrue(path.startswith(gateway.state_home + "/mcpr/"), path)

        async def query(*args: str) -> str:
            code, out, err = await run_mcpr(*args, cwd=cwd, env=env)
            self.assertEqual((code, err), (0, ""), f"mcpr {' '.join(args)}: {out}")
            return out

        # A session's last requests are the DELETE that ends it and the GET stream that the DELETE
        # closes (which the gateway records after it); then comes the stale call: once all are stored,
        # every request is.
        rows = await stored(self, ("logs", "--json", "-n", "1000"),
                            lambda rows: sorted(r["route"] for r in rows if r["route"] != "mcp")
                            == ["mcp-stream", "mcp-stream", "session-delete", "session-delete"]
                            and any(r["status"] == 404 for r in rows),
                            "the DELETEs and GET streams of the two sessions, and the stale call", cwd=cwd, env=env)
        sessions = {direct["session_id"]: "direct", tunnelled["session_id"]: "tunnel"}
        self.assertEqual({(r["session_id"], r["via"]) for r in rows if r["session_id"]}, set(sessions.items()))
        *calls, failed = [r for r in rows if r["mcp_method"] == "tools/call"]
        self.assertEqual(sorted(r["tool"] for r in calls), sorted(["add", "count", "notify"] * 2))
        self.assertTrue(all(r["status"] == 200 and r["outcome"] == "ok" for r in calls), calls)
        self.assertEqual((failed["via"], failed["status"], failed["tool"], failed["error_code"], failed["session_id"]),
                         ("tunnel", 404, "add", -32600, tunnelled["session_id"]))

        async def ids(*args: str) -> list[int]:
            return [r["id"] for r in ndjson(await query("logs", "--json", "-n", "1000", *args))]

        everything = [r["id"] for r in rows]
        self.assertEqual(await ids("--status", "error"), [failed["id"]])
        self.assertEqual(await ids("--error-code", "-32600"), [failed["id"]])
        self.assertEqual(await ids("--error-code", "-32602"), [])
        self.assertEqual(await ids("--status", "ok"), [i for i in everything if i != failed["id"]])
        self.assertEqual(await ids("--status", "timeout"), [])
        self.assertEqual(await ids("--method", "resources/*"),
                         [r["id"] for r in rows if r["mcp_method"] == "resources/read"])
        self.assertEqual(len(await ids("--method", "resources/*")), 2)
        self.assertEqual(await ids("--session", direct["session_id"][:6]),
                         [r["id"] for r in rows if r["session_id"] == direct["session_id"]])
        self.assertEqual(await ids("--since", "1h"), everything)
        # The tunnelled session began after the direct one ended: since its first request, its own.
        begun = min(r["started"] for r in rows if r["via"] == "tunnel")
        since = datetime.fromtimestamp(begun - 0.001).isoformat(timespec="milliseconds")
        self.assertEqual(await ids("--since", since), [r["id"] for r in rows if r["via"] == "tunnel"])
        self.assertEqual(await ids("--since", "2099-01-01"), [])
        text = await query("logs", "--status", "error")
        self.assertIn("tools/call add error -32600: Session not found", text)

        table = await query("logs", "--via", "tunnel", "--tool", "add", "--status", "ok")
        self.assertEqual(len(table.splitlines()), 2, table)
        self.assertIn("tunnel  POST    200", table)
        self.assertIn(" tools/call add", table)

        slow = ndjson(await query("slow", "--threshold", "100ms", "--json"))
        self.assertIn("count", {r["tool"] for r in slow}, "count streams its progress for ~150 ms")
        self.assertTrue(all(r["latency_ms"] >= 100 for r in slow), slow)
        self.assertNotIn("mcp-stream", {r["route"] for r in slow})

        listed = ndjson(await query("sessions", "--json"))
        self.assertEqual({s["session_id"]: (s["via"], s["client_name"], s["server_name"], s["state"]) for s in listed},
                         {sid: (via, "mcp", "demo-server", "ended") for sid, via in sessions.items()})
        self.assertEqual(await query("sessions", "--active"), "no active session\n")
        one = await query("session", tunnelled["session_id"][:10])
        self.assertIn(f"session   {tunnelled['session_id']}", one)
        self.assertIn("server    demo-server 1.0, protocol", one)
        self.assertIn("via       tunnel", one)
        self.assertIn("tools/call count", one)

        (client,) = ndjson(await query("clients", "--json"))
        self.assertEqual((client["client_name"], client["sessions"], client["requests"], client["errors"],
                          sorted(client["via"])), ("mcp", 2, len(rows), 1, ["direct", "tunnel"]))

        (status,) = ndjson(await query("status", "--json"))
        run = status["run"]
        self.assertTrue(run["running"])
        self.assertEqual((run["upstream"], run["dropped"]), (upstream, 0))
        self.assertEqual((run["tunnel"]["state"], run["tunnel"]["url"]), ("connected", url))
        self.assertEqual((status["traffic"]["requests"], status["traffic"]["errors"]), (len(rows), 1))
        text = await query("status")
        self.assertIn("tunnel    connected at", text)
        self.assertIn(url, text)

        (listing,) = ndjson(await query("schema", "--json"))
        self.assertEqual(listing["method"], "tools/list")
        self.assertTrue({"add", "count", "notify"} <= set(listing["names"]))
        self.assertEqual(listing["seen"], 2, "both sessions were given the same answer")
        (change,) = ndjson(await query("schema", "--changes", "--json"))
        self.assertEqual(set(change["added"]), set(listing["names"]))

        # The detail the inspector will show: one request's exchange, redacted, with its SSE events.
        call = next(r for r in calls if r["tool"] == "count" and r["via"] == "tunnel")
        from mcpr.gateway.store.queries import request_detail
        from mcpr.gateway.store.schema import open_reader

        db = open_reader(Path(path))
        self.addCleanup(db.close)
        detail = request_detail(db, call["id"])
        self.assertEqual(detail.request_body.json["params"]["name"], "count")
        events = detail.response_body.events
        self.assertGreaterEqual(len(events), 4, "three progress notifications, then the result")
        self.assertEqual(events[-1]["json"]["id"], detail.request_body.json["id"])
        self.assertIn(["mcp-session-id", tunnelled["session_id"]], detail.request_headers)


class StoreTests(TestCase):
    """The gateway's store without a tunnel: following it live, and a server whose tools change."""

    timeout = 120

    async def test_logs_follow_sees_a_new_request(self) -> None:
        _, upstream = start_upstream(self)
        db = Path(self.mktemp()).resolve() / "store.sqlite3"
        _, base = start_gateway(self, upstream, "--db", str(db))
        await run_session(base + "/mcp", "--quick")
        follow = Process(self, python(*MCPR, "logs", "-f", "--json", "--db", str(db)), name="follow")
        await follow.line('"mcp_method":"initialize"')
        self.assertNotIn("resources/read", follow.output())
        await run_session(base + "/mcp")
        line = await follow.line('"mcp_method":"resources/read"')
        row = json.loads(line)
        self.assertEqual((row["type"], row["resource"], row["status"]), ("request", "demo://greeting", 200))

    async def test_schema_changes_when_the_server_changes_its_tools(self) -> None:
        port = free_port()
        first = Process(self, python(str(ROOT / "examples" / "demo_server.py"), "--port", str(port)), name="v1")
        upstream = first.wait_for("LISTENING").split()[-1]
        db = Path(self.mktemp()).resolve() / "store.sqlite3"
        _, base = start_gateway(self, upstream, "--db", str(db))
        await run_session(base + "/mcp", "--quick")
        first.stop()
        second = Process(self, python(str(ROOT / "tests" / "support" / "changed_server.py"), "--port", str(port)),
                         name="v2")
        second.wait_for("LISTENING")
        await run_session(base + "/mcp", "--quick")
        await run_session(base + "/mcp", "--quick")

        # The third session's answer is the second's: once it counts twice, every answer is stored.
        await stored(self, ("schema", "--json", "--db", str(db)), lambda rows: [r["seen"] for r in rows] == [2],
                     "the second server's tools/list, given twice")
        initial, change = ndjson((await run_mcpr("schema", "--changes", "--json", "--db", str(db)))[1])
        self.assertIn("notify", initial["added"])
        self.assertEqual((change["added"], change["removed"]), (["shout"], ["notify"]))
        (add,) = change["changed"]
        self.assertEqual((add["name"], add["properties_added"]), ("add", ["c"]))
        self.assertIn("description", add["fields"])
        code, text, _ = await run_mcpr("schema", "--changes", "--db", str(db))
        self.assertIn("  + shout\n  - notify\n  ~ add: description, inputSchema (+c)\n", text)
        code, text, _ = await run_mcpr("schema", "--db", str(db))
        self.assertIn("add(a, b, [c])", text)
        self.assertIn("given 2 time(s)", text)
