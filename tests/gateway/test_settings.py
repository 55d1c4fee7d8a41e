"""The gateway's settings table: precedence of its sources, its keys and messages, `twist mcpr`'s options."""

import os
from pathlib import Path

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from mcpr.common.settings import ConfigError
from mcpr.gateway.settings import GATEWAY_SETTINGS, load_gateway
from mcpr.gateway.tap import Options
from tests.support.settings import assert_options_cover


class GatewaySettingsTests(SynchronousTestCase):
    """load_gateway: defaults, the priority of sources, legacy keys and the error messages."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def write(self, text: str, folder: Path | None = None) -> Path:
        path = (folder or self.dir) / "mcpr.toml"
        path.write_text(text)
        return path

    def load(self, cli=None, env=None, cwd=None, config=None):
        return load_gateway(cli or {}, env=env or {}, cwd=cwd or self.dir, config=config)

    def test_defaults(self) -> None:
        s = self.load({"mcp": "http://localhost:9000/mcp"})
        self.assertEqual(s.listen, ("tcp:3000:interface=127.0.0.1",))
        self.assertEqual(s.upstream_timeout, 30.0)
        self.assertEqual(s.max_request_body, 16 << 20)
        self.assertIsNone(s.relay_url)
        self.assertIsNone(s.config_path)

    def test_inspector(self) -> None:
        base = {"mcp": "http://localhost:9000/mcp"}
        s = self.load(base)
        self.assertEqual((s.inspector, s.sources.get("inspector")), ("tcp:4040:interface=127.0.0.1", None))
        self.assertIsNone(self.load({**base, "inspector": "off"}).inspector)
        self.assertIsNone(self.load(base, {"MCPR_INSPECTOR": "OFF"}).inspector)
        self.write('mcp = "http://x:1"\n[inspector]\nlisten = "tcp:4041:interface=127.0.0.1"\n')
        s = self.load()
        self.assertEqual((s.inspector, s.sources["inspector"]),
                         ("tcp:4041:interface=127.0.0.1", f"{self.dir / 'mcpr.toml'}: key 'inspector.listen'"))
        self.assertEqual(self.load({"inspector": "tcp:0"}).inspector, "tcp:0", "the command line wins")
        self.assertEqual(s.warnings, ())
        self.write('mcp = "http://x:1"\n[inspector]\nlisten = false\n')
        self.assertIsNone(self.load().inspector)
        self.write('mcp = "http://x:1"\n[inspector]\nlisten = 4040\n')
        with self.assertRaises(ConfigError) as caught:
            self.load()
        self.assertIn("key 'inspector.listen': expected an endpoint such as \"tcp:4040:interface=127.0.0.1\", or "
                      "\"off\", got 4040", str(caught.exception))

    def test_priority_cli_env_file_default(self) -> None:
        self.write('mcp = "http://file:1/mcp"\n[tunnel]\nrelay_url = "https://file.example"\nsubdomain = "f"\n')
        env = {"MCPR_RELAY_URL": "https://env.example", "MCPR_TUNNEL_SUBDOMAIN": "e"}
        s = self.load({"tunnel_subdomain": "c"}, env)
        self.assertEqual(s.mcp, "http://file:1/mcp")
        self.assertEqual(s.relay_url, "https://env.example")
        self.assertEqual(s.tunnel_subdomain, "c")

    def test_legacy_flat_keys(self) -> None:
        self.write('mcp = "http://x:1"\nrelay_url = "https://r.example"\ntunnel_token = "t"\n'
                   'tunnel_subdomain = "s"\n').chmod(0o600)  # it holds a token (tests/common/test_secret_files.py)
        s = self.load()
        self.assertEqual((s.relay_url, s.tunnel_token, s.tunnel_subdomain), ("https://r.example", "t", "s"))
        self.assertEqual(s.warnings, ())

    def test_relay_url_forms(self) -> None:
        """http, https, ws, wss and a bare HOST:PORT are all relay URLs: the scheme is always written
        out (a bare name means wss, as for the original mcpr; an IP or a local name means ws)."""
        forms = {
            "https://tunnel.example.com": "https://tunnel.example.com",
            "http://127.0.0.1:8711": "http://127.0.0.1:8711",
            "wss://tunnel.example.com/_tunnel/register": "wss://tunnel.example.com/_tunnel/register",
            "ws://127.0.0.1:8711": "ws://127.0.0.1:8711",
            "tunnel.example.com": "wss://tunnel.example.com",
            "tunnel.example.com:8443": "wss://tunnel.example.com:8443",
            "127.0.0.1:8711": "ws://127.0.0.1:8711",
            "[::1]:8711": "ws://[::1]:8711",
            "localhost:8711": "ws://localhost:8711",
            "relay.localhost:8711": "ws://relay.localhost:8711",
        }
        for given, url in forms.items():
            self.assertEqual(self.load({"mcp": "http://x:1", "relay_url": given}).relay_url, url, given)

    def test_bad_relay_url_is_one_line_naming_the_key(self) -> None:
        for bad in ("ftp://tunnel.example.com", "localhost:99999", "http://", "tunnel example", "https://r/?x=1"):
            e = self.assertRaises(ConfigError, self.load, {"mcp": "http://x:1"}, {"MCPR_RELAY_URL": bad})
            self.assertTrue(str(e).startswith(
                "environment variable MCPR_RELAY_URL: expected the relay's URL: "
                "https://HOST, http://HOST:PORT, wss://HOST, ws://HOST:PORT or HOST:PORT"), str(e))
            self.assertNotIn("\n", str(e))
        path = self.write('mcp = "http://x:1"\n[tunnel]\nrelay_url = "gopher://r"\n')
        e = self.assertRaises(ConfigError, self.load)
        self.assertTrue(str(e).startswith(f"{path}: key 'tunnel.relay_url': expected the relay's URL"), str(e))

    def test_error_names_key_and_file(self) -> None:
        path = self.write('port = "abc"\nmcp = "http://x:1"\n')
        e = self.assertRaises(ConfigError, self.load)
        self.assertEqual(str(e), f"{path}: key 'port': expected an integer 1-65535, got \"abc\"")

    def test_error_names_nested_key(self) -> None:
        path = self.write('mcp = "http://x:1"\n[csp]\nmode = "strict"\n')
        e = self.assertRaises(ConfigError, self.load)
        self.assertIn(f"{path}: key 'csp.mode': expected one of \"extend\", \"override\"", str(e))

    def test_error_names_option_and_env(self) -> None:
        e = self.assertRaises(ConfigError, self.load, {"mcp": "ftp://x"})
        self.assertIn("option --mcp: expected an http:// or https:// URL", str(e))
        e = self.assertRaises(ConfigError, self.load, {"mcp": "http://x:1"}, {"MCPR_RELAY_URL": "ftp://nope"})
        self.assertIn("environment variable MCPR_RELAY_URL", str(e))

    def test_unknown_keys_warn(self) -> None:
        # A file may also hold the relay's keys; a typo in the gateway's own still warns.
        path = self.write('mcp = "http://x:1"\nprot = 1\nmode = "gateway"\nrelay_domain = "d.example"\n'
                          '[relay]\ndomain = "d.example"\n[tunnel]\nrelayurl = "x"\n')
        s = self.load()
        self.assertEqual(s.warnings, (f"{path}: unknown key 'prot' (ignored)",
                                      f"{path}: unknown key 'tunnel.relayurl' (ignored)"))

    def test_relay_file_refused(self) -> None:
        self.write('mode = "relay"\nmcp = "http://x:1"\n')
        e = self.assertRaises(ConfigError, self.load)
        self.assertIn("mcpr-relay", str(e))

    def test_missing_mcp(self) -> None:
        e = self.assertRaises(ConfigError, self.load)
        self.assertIn("--mcp", str(e))

    def test_no_tunnel_wins(self) -> None:
        s = self.load({"mcp": "http://x:1", "no_tunnel": True}, {"MCPR_RELAY_URL": "https://r.example"})
        self.assertIsNone(s.relay_url)
        self.write('mcp = "http://x:1"\n[tunnel]\nenabled = false\nrelay_url = "https://r.example"\n')
        self.assertIsNone(self.load().relay_url)

    def test_store_path_and_where_it_came_from(self) -> None:
        """Its errors start with the setting that chose the file, as every start-up error does."""
        home = str(self.dir.resolve() / "state")
        mcp = {"mcp": "http://x:1"}
        default = self.load(mcp, {"XDG_STATE_HOME": home}).store
        self.assertRegex(str(default.path), rf"^{home}/mcpr/{self.dir.name}-[0-9a-f]{{8}}\.sqlite3$")
        self.assertEqual(default.origin, "the default store path (one per project under $XDG_STATE_HOME/mcpr/)")
        unit = self.load(mcp, {"STATE_DIRECTORY": "/var/lib/mcpr/demo", "XDG_STATE_HOME": home}).store
        self.assertEqual((unit.path, unit.origin), (Path("/var/lib/mcpr/demo/store.sqlite3"), "the default store "
                                                    "path under systemd ($STATE_DIRECTORY/store.sqlite3)"))
        env = self.load(mcp, {"MCPR_DB": "/srv/env.db"}).store
        self.assertEqual((env.path, env.origin), (Path("/srv/env.db"), "environment variable MCPR_DB"))
        cli = self.load({**mcp, "store_path": "here.db"}, {"MCPR_DB": "/srv/env.db"}).store
        self.assertEqual((cli.path, cli.origin), (self.dir.resolve() / "here.db", "option --db"))
        path = self.write('[store]\npath = "kept/store.db"\n')  # relative to the file
        in_file = self.load(mcp).store
        self.assertEqual((in_file.path, in_file.origin), (self.dir.resolve() / "kept" / "store.db",
                                                          f"{path}: key 'store.path'"))
        self.assertIsNone(self.load({**mcp, "no_store": True}).store)


class OptionsTests(SynchronousTestCase):
    """`twist mcpr`'s usage.Options, generated from the gateway's settings table."""

    def test_cli_options(self) -> None:
        cwd = Path(self.mktemp())
        cwd.mkdir()
        self.patch(Path, "cwd", classmethod(lambda cls: cwd))
        o = Options()
        o.parseOptions(["--mcp", "http://localhost:9000/mcp", "--listen", "tcp:1", "--listen", "tcp:2",
                        "--csp", "a.example", "--csp", "b.example", "--upstream-timeout", "2.5"])
        s = o["settings"]
        self.assertEqual(s.listen, ("tcp:1", "tcp:2"))
        self.assertEqual(s.csp_domains, ("a.example", "b.example"))
        self.assertEqual(s.upstream_timeout, 2.5)

    def test_every_setting_with_help_is_an_option(self) -> None:
        assert_options_cover(self, Options, GATEWAY_SETTINGS)

    def test_priority_cli_env_file(self) -> None:
        config = Path(self.mktemp())
        config.write_text('mcp = "http://x:1"\n[tunnel]\nrelay_url = "https://file.example"\n')
        self.patch(os, "environ", {"MCPR_RELAY_URL": "https://env.example"})

        def relay_url(*args: str) -> str | None:
            o = Options()
            o.parseOptions(["-c", str(config), *args])
            return o["settings"].relay_url

        self.assertEqual(relay_url("--relay-url", "https://cli.example"), "https://cli.example")
        self.assertEqual(relay_url(), "https://env.example")
        self.patch(os, "environ", {})
        self.assertEqual(relay_url(), "https://file.example")
        config.write_text('mcp = "http://x:1"\n')
        self.assertIsNone(relay_url())

    def test_port_with_listen_refused(self) -> None:
        """As the relay, the gateway refuses `--port` beside `--listen` on the command line (one of
        them would be ignored); a port in the file beside `--listen` is no contradiction."""
        config = Path(self.mktemp())
        config.write_text("")
        o = Options()
        e = self.assertRaises(usage.UsageError, o.parseOptions,
                              ["--mcp", "http://x:1", "--config", str(config), "--port", "4000", "--listen", "tcp:5000"])
        self.assertEqual(str(e), "--port and --listen both given (--port 4000, --listen tcp:5000): give only --listen "
                                 "(--port 4000 is short for --listen tcp:4000:interface=127.0.0.1)")
        config.write_text("port = 4000\n")
        o = Options()
        o.parseOptions(["--mcp", "http://x:1", "--config", str(config), "--listen", "tcp:5000"])
        self.assertEqual(o["settings"].listen, ("tcp:5000",))

    def test_bad_option_is_usage_error(self) -> None:
        o = Options()
        e = self.assertRaises(usage.UsageError, o.parseOptions, ["--mcp", "http://x:1", "--port", "0"])
        self.assertIn("option --port: expected an integer 1-65535, got \"0\"", str(e))
