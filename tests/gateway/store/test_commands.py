"""`mcpr logs|slow|sessions|session|clients|status|schema` on a store file: tables, NDJSON, one-line errors."""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mcpr import cli
from mcpr.gateway.store import commands
from mcpr.gateway.store.schema import SCHEMA_VERSION, open_store
from mcpr.gateway.store.writer import RunInfo, SessionChange, StoreWriter
from mcpr.proxy.capture import Listing
from tests.support.store import record

RUN = RunInfo("9.9", "http://127.0.0.1:9000/mcp", ["tcp:3000"])


class CommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp()).resolve()
        db = open_store(str(self.path))
        now = time.time()
        writer = StoreWriter(db, RUN, now - 60)
        session = {"session_id": "5e55104abc", "state": "active", "client_name": "claude", "client_version": "1.2",
                   "server_name": "demo", "server_version": "1", "protocol_version": "2025-11-25",
                   "started": now - 50, "last_activity": now - 50}
        listed = {"tools": [{"name": "add", "description": "Add two integers.\nMore.",
                             "inputSchema": {"properties": {"a": {}, "b": {}}, "required": ["a"]}}]}
        changed = {"tools": [{"name": "add", "description": "Add two integers.\nMore.",
                              "inputSchema": {"properties": {"a": {}, "b": {}, "c": {}}, "required": ["a"]}},
                             {"name": "shout"}]}
        writer.write([
            SessionChange(now - 50, session),
            record(now - 50, 4, session_id="5e55104abc", mcp_method="initialize", tool=None, client_name="claude",
                   client_version="1.2"),
            record(now - 49, 3, session_id="5e55104abc", mcp_method="tools/list", tool=None,
                   listings=(Listing("tools/list", None, listed),)),
            record(now - 48, 812, session_id="5e55104abc", tool="add"),
            record(now - 47, 20, session_id="5e55104abc", tool="add", error_code=-32602, error_message="bad a"),
            record(now - 46, 2, session_id="5e55ffff", mcp_method="tools/list", tool=None, via="tunnel",
                   listings=(Listing("tools/list", None, changed),)),
            record(now - 4 * 86400, 2, session_id="old"),
        ], now - 45, 0)
        writer.heartbeat(now - 1, 0)
        db.close()

    def run_command(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        try:
            code = commands.main(list(argv))
        except SystemExit as e:  # argparse's own errors
            code = int(e.code or 0)
        return code, out.getvalue(), err.getvalue()

    def ok(self, *argv: str) -> str:
        code, out, err = self.run_command(*argv, "--db", str(self.path))
        self.assertEqual((code, err), (0, ""), out)
        return out

    def ndjson(self, *argv: str) -> list[dict]:
        return [json.loads(line) for line in self.ok(*argv, "--json").splitlines()]

    def test_every_query_command_is_a_cli_command(self) -> None:
        choices = commands.parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
        self.assertEqual(tuple(choices), cli.QUERY_COMMANDS)

    def test_logs(self) -> None:
        lines = self.ok("logs", "--since", "1h").splitlines()
        self.assertEqual(lines[0].split(), ["ID", "TIME", "VIA", "HTTP", "ST", "TOTAL", "UP", "DOWN", "SESSION", "MCP"])
        self.assertEqual(len(lines), 6)
        self.assertRegex(lines[3], r"^\s+3  \d\d-\d\d \d\d:\d\d:\d\d  direct  POST    200   812\.0ms .* 5e55104a  "
                                   r"tools/call add$")
        self.assertTrue(lines[4].endswith("tools/call add error -32602: bad a"), lines[4])
        self.assertEqual([r["id"] for r in self.ndjson("logs", "-n", "2")], [5, 6])
        (row,) = self.ndjson("logs", "--status", "error")
        self.assertEqual((row["type"], row["tool"], row["error_code"]), ("request", "add", -32602))
        self.assertEqual([r["id"] for r in self.ndjson("logs", "--via", "tunnel")], [5])
        self.assertEqual([r["id"] for r in self.ndjson("logs", "--session", "5e55f")], [5])
        self.assertEqual([r["id"] for r in self.ndjson("logs", "--method", "initialize")], [1])
        self.assertEqual([r["id"] for r in self.ndjson("logs", "--tool", "add", "--error-code", "-32602")], [4])
        self.assertEqual([r["id"] for r in self.ndjson("logs", "--until", "1d")], [6])

    def test_slow(self) -> None:
        self.assertIn("812.0ms", self.ok("slow"))
        self.assertEqual([r["id"] for r in self.ndjson("slow", "--threshold", "10ms")], [3, 4])
        self.assertEqual(self.ok("slow", "--threshold", "2s"), "no request took 2.00s or more\n")

    def test_sessions_and_session(self) -> None:
        lines = self.ok("sessions", "--since", "1h").splitlines()
        self.assertEqual(lines[0].split()[:3], ["SESSION", "CLIENT", "SERVER"])
        self.assertIn("claude 1.2", lines[2])
        self.assertEqual([s["session_id"] for s in self.ndjson("sessions", "--active", "--tool", "add")],
                         ["5e55104abc"])
        out = self.ok("session", "5e551")
        self.assertIn("session   5e55104abc", out)
        self.assertIn("server    demo 1, protocol 2025-11-25", out)
        self.assertIn("requests  4, 1 failed", out)
        self.assertEqual(out.count("tools/call add"), 2)
        first, *rest = self.ndjson("session", "5e551", "--status", "error")
        self.assertEqual((first["type"], [r["id"] for r in rest]), ("session", [4]))
        code, out, err = self.run_command("session", "5e55", "--db", str(self.path))
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "mcpr session: 2 sessions start with '5e55' (5e55104abc, 5e55ffff): "
                              "give more of the id\n")

    def test_clients(self) -> None:
        out = self.ok("clients")
        self.assertRegex(out, r"claude\s+1\.2\s+1\s+4\s+1 ")
        self.assertEqual([(c["client_name"], c["requests"]) for c in self.ndjson("clients", "--via", "tunnel")],
                         [(None, 1)])

    def test_status(self) -> None:
        out = self.ok("status")
        self.assertIn(f"store     {self.path} (schema {SCHEMA_VERSION},", out)
        self.assertIn("gateway   running, pid", out)
        self.assertIn("events    7 written, 0 dropped", out)
        self.assertIn("last 1h   5 requests, 1 failed (0 timed out)", out, "the 4-day-old request is not in the hour")
        (status,) = self.ndjson("status", "--since", "7d")
        self.assertEqual((status["type"], status["traffic"]["requests"], status["run"]["version"]),
                         ("status", 6, "9.9"))

    def test_schema(self) -> None:
        out = self.ok("schema")
        self.assertIn("tools/list: 2 item(s); answer #2", out)
        self.assertIn("add(a, [b], [c])  Add two integers.", out)
        changes = self.ok("schema", "--changes").splitlines()
        self.assertIn("answer #1, the first seen", changes[0])
        self.assertEqual(changes[1], "  + add")
        self.assertIn("answer #2, was #1", changes[2])
        self.assertEqual(changes[3:], ["  + shout", "  ~ add: inputSchema (+c)"])
        (change,) = self.ndjson("schema", "--changes", "--tool", "shout")
        self.assertEqual((change["type"], change["added"]), ("schema_change", ["shout"]))
        self.assertEqual([listing["names"] for listing in self.ndjson("schema", "--session", "5e551")],
                         [["add"]])

    def assertOneLine(self, argv: tuple[str, ...], status: int, line: str) -> None:
        code, out, err = self.run_command(*argv)
        self.assertEqual((code, out, err), (status, "", line + "\n"), argv)

    def test_a_mistake_in_the_options_is_one_line_and_status_64(self) -> None:
        db = ("--db", str(self.path))
        expected_time = "expected a duration such as 10m or 7d, or a time such as 2026-12-01T10:30"
        for argv, line in (
            (("logs", *db, "--since", "yesterday"), f"mcpr logs: option --since: {expected_time}, got 'yesterday'"),
            (("sessions", *db, "--until", "3x"), f"mcpr sessions: option --until: {expected_time}, got '3x'"),
            (("logs", *db, "--status", "maybe"), "mcpr logs: option --status: expected ok, error or timeout, "
                                                 "got 'maybe'"),
            (("logs", *db, "--error-code", "x"), "mcpr logs: option --error-code: expected a JSON-RPC error code "
                                                 "such as -32602, got 'x'"),
            (("slow", *db, "--threshold", "fast"), "mcpr slow: option --threshold: expected a duration such as "
                                                   "500ms or 2s, got 'fast'"),
            (("logs", *db, "-n", "0"), "mcpr logs: option -n/--limit: expected a positive number, got '0'"),
            (("session", *db), "mcpr session: the following arguments are required: id"),
        ):
            self.assertOneLine(argv, 64, line)

    def test_a_store_that_cannot_answer_is_one_line_and_status_1(self) -> None:
        missing = Path(self.mktemp()).resolve() / "none.sqlite3"
        self.assertOneLine(("logs", "--db", str(missing)), 1,
                           f"mcpr logs: option --db: no event store at {missing}: no gateway has written one there "
                           "yet: start the gateway with this store first, or give --db the path of another")
        self.assertFalse(missing.exists(), "a query never creates the store")
        self.patch(os, "environ", {**os.environ, "MCPR_DB": "/nope/x.db"})
        self.assertOneLine(("logs",), 1,
                           "mcpr logs: environment variable MCPR_DB: no event store at /nope/x.db: no gateway has "
                           "written one there yet: start the gateway with this store first, or give --db the path "
                           "of another")
        text = Path(self.mktemp()).resolve()
        text.write_text("notes, not a store" * 100)
        self.assertOneLine(("status", "--db", str(text)), 1,
                           f"mcpr status: option --db: {text} is not an event store (file is not a database): give "
                           "--db the path of one")
        self.assertOneLine(("session", "--db", str(self.path), "f00"), 1, "mcpr session: no session starts with 'f00'")

    def test_the_default_store_not_there_yet(self) -> None:
        """No --db and no setting: the store of a gateway started in this folder, which none has been."""
        home, project = Path(self.mktemp()).resolve(), Path(self.mktemp()).resolve()
        project.mkdir()
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "MCPR_DB"} | {"XDG_STATE_HOME": str(home)})
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(project)
        code, out, err = self.run_command("clients")
        self.assertEqual((code, out, err.count("\n")), (1, "", 1), err)
        self.assertRegex(err, r"^mcpr clients: the default store path \(one per project under \$XDG_STATE_HOME/mcpr/\): "
                              rf"no event store at {re.escape(str(home))}/mcpr/{project.name}-[0-9a-f]{{8}}\.sqlite3: ")

    def test_store_found_as_the_gateway_finds_it(self) -> None:
        """No --db: the `[store] path` of the mcpr.toml given (relative to the file), as the gateway reads it."""
        project = self.path.parent / "project"
        project.mkdir()
        (project / "mcpr.toml").write_text(f'mcp = "http://x/mcp"\n[store]\npath = "../{self.path.name}"\n')
        code, out, err = self.run_command("logs", "--config", str(project / "mcpr.toml"), "--json")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(len(out.splitlines()), 6)
        (project / "mcpr.toml").write_text('mcp = "http://x/mcp"\n[store]\nenabled = false\n')
        self.assertOneLine(("logs", "--config", str(project / "mcpr.toml")), 64,
                           "mcpr logs: the gateway started here keeps no store ([store] enabled = false or "
                           "no_store); --db PATH reads one")
