"""Start-up as users meet it, with real `twist` processes: every mistake is one line on standard
error and exit status 64 (never the usage text, never a traceback), and the log is text.

systemd shows the last lines of a unit's output (`systemctl status`, `journalctl -n 20`), so the
line must be all there is; it names the option or key, the value, why, and what to do.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.support.processes import Process, free_port, start_gateway, twist

MCP = "http://127.0.0.1:1/mcp"  # nothing listens there


# The event stores of the gateways these tests start (in ~/.local/state they would pile up there).
STATE_HOME = tempfile.TemporaryDirectory(prefix="mcpr-startup-state-")


def run(args: list[str], *, cwd: str | None = None, env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """A command that is expected to end by itself (the timeout fails the test if it hangs)."""
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "XDG_STATE_HOME": STATE_HOME.name, **(env or {})},
                          stdin=subprocess.DEVNULL, timeout=timeout)


def bare_twist(*args: str) -> list[str]:
    """`python -m twisted` without `--log-format`, as a user or a unit would type it."""
    return [sys.executable, "-m", "twisted", *args]


def unprivileged(args: list[str]) -> list[str]:
    """`args` run as a user without privileges: `nobody` through setpriv when the tests run as root."""
    if os.geteuid() != 0:
        return args
    if shutil.which("setpriv") is None:
        raise SkipTest("running as root without setpriv: cannot drop privileges")
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *args]


def shared_folder() -> Path:
    """A folder every user may read (trial's temporary folders are root's own when run as root)."""
    folder = Path(tempfile.mkdtemp(prefix="mcpr-startup-"))
    folder.chmod(0o755)
    return folder


class OneLineErrorTests(SynchronousTestCase):
    """Each mistake: exactly one line on stderr, nothing on stdout, exit status 64."""

    def assertOneLine(self, result: subprocess.CompletedProcess[str], line: str) -> None:
        self.assertEqual((result.returncode, result.stdout, result.stderr.splitlines()), (64, "", [line]),
                         result.stderr)

    def test_bad_option_values(self) -> None:
        """Under `twist` and under the `mcpr` console script, for both daemons."""
        self.assertOneLine(run(bare_twist("mcpr", "--port", "abc")),
                           'mcpr: option --port: expected an integer 1-65535, got "abc"')
        self.assertOneLine(run(bare_twist("mcpr-relay", "--domain", "bad!domain")),
                           'mcpr-relay: option --domain: expected a DNS name such as tunnel.example.com, '
                           'got "bad!domain"')
        script = Path(sys.executable).parent / "mcpr"
        if not script.exists():
            raise SkipTest(f"no installed console script at {script}")
        self.assertOneLine(run([str(script), "--port", "abc"]),
                           'mcpr: option --port: expected an integer 1-65535, got "abc"')
        self.assertOneLine(run([str(script), "--relay", "--relay-domain", "x.example", "--max-tunnels", "0"]),
                           'mcpr-relay: option --max-tunnels: expected a positive integer, got "0"')

    def test_unknown_option(self) -> None:
        self.assertOneLine(run(bare_twist("mcpr-relay", "--domian", "t.example")),
                           "mcpr-relay: option --domian not recognized (`twist mcpr-relay --help` lists the options)")

    def test_config_file_error(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        config = folder / "relay.toml"
        config.write_text('mode = "relay"\n[relay]\ndomain = "t.example"\nmax_in_flight = "many"\n')
        self.assertOneLine(run(bare_twist("mcpr-relay", "--config", str(config))),
                           f"mcpr-relay: {config}: key 'relay.max_in_flight': expected a positive integer, "
                           'got "many"')

    def test_port_with_listen(self) -> None:
        """Both daemons refuse the mix, naming both options."""
        self.assertOneLine(run(bare_twist("mcpr", "--mcp", MCP, "--port", "4000", "--listen", "tcp:4001")),
                           "mcpr: --port and --listen both given (--port 4000, --listen tcp:4001): give only "
                           "--listen (--port 4000 is short for --listen tcp:4000:interface=127.0.0.1)")
        self.assertOneLine(run(bare_twist("mcpr-relay", "--domain", "t.example", "--port", "80", "--listen", "tcp:81")),
                           "mcpr-relay: --port and --listen both given (--port 80, --listen tcp:81): give only "
                           "--listen (--port 80 is short for --listen tcp:80)")

    def test_bad_listen(self) -> None:
        self.assertOneLine(run(bare_twist("mcpr", "--mcp", MCP, "--listen", "tpc:3000")),
                           'mcpr: option --listen: cannot use endpoint "tpc:3000": Unknown endpoint type: '
                           "'tpc'; expected an endpoint such as tcp:8080 or tcp:8080:interface=127.0.0.1")
        folder = Path(self.mktemp())
        folder.mkdir()
        config = folder / "relay.toml"
        config.write_text('mode = "relay"\n[relay]\ndomain = "t.example"\nmetrics = "tcp:nine"\n')
        self.assertOneLine(run(bare_twist("mcpr-relay", "--config", str(config))),
                           f"mcpr-relay: {config}: key 'relay.metrics': cannot use endpoint \"tcp:nine\": invalid "
                           "literal for int() with base 10: 'nine'; expected an endpoint such as tcp:8080 or "
                           "tcp:8080:interface=127.0.0.1")

    def test_events_in_a_missing_folder(self) -> None:
        missing = Path(self.mktemp()).resolve() / "logs"
        self.assertOneLine(run(bare_twist("mcpr", "--mcp", MCP, "--port", str(free_port()),
                                          "--events", str(missing / "events.jsonl"))),
                           f"mcpr: option --events: cannot write {missing}/events.jsonl: No such file or "
                           f"directory: create {missing} first, or give a path in an existing folder")

    def test_store_in_a_folder_that_cannot_be_made(self) -> None:
        """A file where the store's folder would go, named by the option or the variable that chose it."""
        blocker = Path(self.mktemp()).resolve()
        blocker.write_text("not a folder")
        store = blocker / "state" / "store.sqlite3"
        fix = "choose a path in a folder this user can create and write, or --no-store to run without a store"
        self.assertOneLine(run(bare_twist("mcpr", "--mcp", MCP, "--port", str(free_port()), "--db", str(store))),
                           f"mcpr: option --db: cannot use the event store {store}: Not a directory "
                           f"({blocker}/state): {fix}")
        self.assertOneLine(run(bare_twist("mcpr", "--mcp", MCP, "--port", str(free_port())),
                               env={"MCPR_DB": str(store)}),
                           f"mcpr: environment variable MCPR_DB: cannot use the event store {store}: Not a "
                           f"directory ({blocker}/state): {fix}")

    def test_gateway_port_in_use_exits_at_once_and_closes_its_store(self) -> None:
        """The store has started by then; its thread must not keep the process alive, and the run it
        began is marked stopped."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        store = Path(self.mktemp()).resolve() / "store.sqlite3"
        self.assertOneLine(run(bare_twist("mcpr", "--mcp", MCP, "--listen", "tcp:0:interface=127.0.0.1", "--listen",
                                          f"tcp:{port}:interface=127.0.0.1", "--db", str(store)), timeout=20),
                           f"mcpr: option --listen: cannot listen on tcp:{port}:interface=127.0.0.1: Address already "
                           "in use: another process listens there (another gateway or relay?): stop it, or choose "
                           "another port")
        status = run([sys.executable, "-c", "from mcpr.cli import main; main()", "status", "--json", "--db", str(store)])
        self.assertEqual((status.returncode, status.stderr), (0, ""))
        run_row = json.loads(status.stdout)["run"]
        self.assertEqual((run_row["running"], run_row["stopped"] is not None), (False, True), run_row)

    def test_two_gateways_on_one_port(self) -> None:
        _, base = start_gateway(self, MCP)
        port = base.rsplit(":", 1)[1]
        self.assertOneLine(run(bare_twist("mcpr", "--mcp", MCP, "--port", port)),
                           f"mcpr: option --port: cannot listen on tcp:{port}:interface=127.0.0.1: Address already "
                           "in use: another process listens there (another gateway or relay?): stop it, or choose "
                           "another port")

    def test_relay_port_in_use_exits_at_once(self) -> None:
        """The reservations store's thread has started by then; it must not keep the process alive."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        folder = Path(self.mktemp())
        folder.mkdir()
        config = folder / "relay.toml"
        config.write_text(f'mode = "relay"\n[relay]\ndomain = "t.example"\n'
                          f'listen = ["tcp:0:interface=127.0.0.1", "tcp:{port}:interface=127.0.0.1"]\n')
        self.assertOneLine(run(bare_twist("mcpr-relay", "--config", str(config), "--state-dir", str(folder)),
                               timeout=20),
                           f"mcpr-relay: {config}: key 'relay.listen': cannot listen on tcp:{port}:"
                           "interface=127.0.0.1: Address already in use: another process listens there (another "
                           "gateway or relay?): stop it, or choose another port")

    def test_privileged_port_without_the_capability(self) -> None:
        """:443 as a user without CAP_NET_BIND_SERVICE (the unit grants it; a shell does not)."""
        start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        if start.exists() and int(start.read_text()) <= 443:
            raise SkipTest("any user may bind :443 here (net.ipv4.ip_unprivileged_port_start)")
        result = run(unprivileged(bare_twist("mcpr-relay", "--domain", "t.example", "--port", "443",
                                             "--state-dir", "/nonexistent")), cwd="/")
        self.assertOneLine(result, "mcpr-relay: option --port: cannot listen on tcp:443: Permission denied: ports "
                                   "below 1024 need root or CAP_NET_BIND_SERVICE: use a port from 1024 up, or start "
                                   "the relay with its systemd unit, which grants the capability")

    def test_token_cannot_be_saved(self) -> None:
        """A gateway with a relay and no token, in a folder it may not write (the `mcpr@` unit's
        read-only /etc/mcpr): it says to configure one."""
        folder = shared_folder()
        self.addCleanup(shutil.rmtree, folder)
        config = folder / "gw.toml"
        config.write_text(f'mcp = "{MCP}"\nport = {free_port()}\n[tunnel]\nrelay_url = "http://127.0.0.1:1"\n')
        config.chmod(0o644)
        if os.geteuid() != 0:
            folder.chmod(0o555)
            self.addCleanup(folder.chmod, 0o755)
        # What the unit gives it to write: its StateDirectory=, where the event store goes.
        state = shared_folder()
        self.addCleanup(shutil.rmtree, state)
        state.chmod(0o777)
        result = run(unprivileged(bare_twist("mcpr", "--config", str(config))), cwd="/",
                     env={"STATE_DIRECTORY": str(state)})
        self.assertOneLine(result, f"mcpr: [tunnel] token: none is configured, and a new one cannot be saved in "
                                   f"{config} (Permission denied): set token = \"mcpr_...\" under [tunnel] in "
                                   f"{config}, or MCPR_TUNNEL_TOKEN (a new one: python3 -c 'import secrets; "
                                   "print(\"mcpr_\" + secrets.token_hex(32))')")
        self.assertEqual([p.name for p in folder.iterdir()], ["gw.toml"])


class LogFormatTests(SynchronousTestCase):
    """Text logs whatever standard output is, JSON when asked for, and `--events -` alone on stdout."""

    def test_text_when_stdout_is_a_file(self) -> None:
        for name, args in [("gateway", bare_twist("mcpr", "--mcp", MCP, "--listen", "tcp:0:interface=127.0.0.1")),
                           ("relay", bare_twist("mcpr-relay", "--domain", "t.example", "--listen",
                                                "tcp:0:interface=127.0.0.1"))]:
            process = Process(self, args, name=name)
            line = process.wait_for("listening on" if name == "relay" else " -> ")
            self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[mcpr\.\w+\.tap#info\] mcpr ")

    def test_json_when_asked(self) -> None:
        for option in ("--log-format=json", "--log-fo=json"):
            process = Process(self, bare_twist(option, "mcpr", "--mcp", MCP, "--listen", "tcp:0:interface=127.0.0.1"),
                              name="gateway")
            event = json.loads(process.wait_for('"log_format": "mcpr {version}'))
            self.assertEqual(event["mcp"], MCP)

    def test_events_on_stdout_are_pure_ndjson(self) -> None:
        """The log (text) and the console line go to stderr; stdout holds events only."""
        folder = Path(self.mktemp())
        folder.mkdir()
        out, err = (folder / "stdout").open("wb"), (folder / "stderr").open("wb")
        self.addCleanup(out.close)
        self.addCleanup(err.close)
        process = subprocess.Popen(bare_twist("mcpr", "--mcp", MCP, "--listen", "tcp:0:interface=127.0.0.1",
                                              "--events", "-"), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "XDG_STATE_HOME": STATE_HOME.name})
        try:
            deadline = 200
            while " -> " not in (folder / "stderr").read_text() or not (folder / "stdout").read_text():
                deadline -= 1
                self.assertGreater(deadline, 0, (folder / "stderr").read_text())
                self.assertIsNone(process.poll(), (folder / "stderr").read_text())
                time.sleep(0.1)
        finally:
            process.terminate()
            process.wait(10)
        lines = (folder / "stdout").read_text().splitlines()
        self.assertTrue(lines)
        self.assertEqual({json.loads(line)["type"] for line in lines} - {"heartbeat", "session", "request"}, set())
        logged = (folder / "stderr").read_text()
        self.assertIn("[mcpr.gateway.tap#info] mcpr ", logged)
        self.assertIn("Main loop terminated.", logged)


class UpstreamWarningTests(SynchronousTestCase):
    def test_unreachable_mcp_is_said_at_start(self) -> None:
        process = Process(self, twist("mcpr", "--mcp", MCP, "--listen", "tcp:0:interface=127.0.0.1"), name="gateway")
        line = process.wait_for("is not reachable")
        self.assertIn(f"[mcpr.gateway.tap#warn] upstream {MCP} is not reachable (connection refused): requests "
                      "get 502 until it is (is the MCP server running, and is --mcp right?)", line)
