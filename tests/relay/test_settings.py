"""The relay's settings table: its sources and messages, `[[relay.tokens]]`, `twist mcpr-relay`'s options."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from mcpr.common.settings import ConfigError
from mcpr.relay.auth import StaticToken
from mcpr.relay.settings import RELAY_SETTINGS, load_relay
from mcpr.relay.tap import Options
from tests.support.settings import assert_options_cover


class RelaySettingsTests(SynchronousTestCase):
    """load_relay: defaults, legacy keys, static tokens and the error messages."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def write(self, text: str) -> Path:
        path = self.dir / "mcpr.toml"
        path.write_text('mode = "relay"\n' + text)
        return path

    def load(self, cli=None, env=None):
        return load_relay(cli or {}, env=env or {}, cwd=self.dir)

    def test_defaults(self) -> None:
        s = self.load({"domain": "T.Example."})
        self.assertEqual(s.domain, "t.example")
        self.assertEqual(s.listen, ("tcp:8080",))
        self.assertEqual(s.public_url, "https://*.t.example")
        self.assertEqual((s.max_in_flight, s.max_tunnels_per_token, s.drain_timeout), (256, 8, 30.0))
        self.assertEqual((s.tokens, s.auth_mode, s.warnings), ((), "open", ()))

    def test_names_and_registrations_defaults(self) -> None:
        s = self.load({"domain": "t.example"}, {"HOME": "/home/u"})
        self.assertEqual((s.max_tunnels_per_ip, s.max_tunnels, s.registration_rate, s.registration_burst),
                         (32, 10_000, 30, 30))
        self.assertEqual((s.reservation_grace, s.max_reservations), (600.0, 50_000))
        self.assertEqual(s.state_dir, Path("/home/u/.local/state/mcpr-relay"))

    def test_state_dir(self) -> None:
        def state_dir(cli: dict, env: dict) -> Path:
            return self.load({"domain": "t.example", **cli}, {"HOME": "/home/u", **env}).state_dir

        self.assertEqual(state_dir({}, {"STATE_DIRECTORY": "/var/lib/mcpr"}), Path("/var/lib/mcpr"))
        self.assertEqual(state_dir({}, {"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}), Path("/var/lib/a"))
        self.assertEqual(state_dir({}, {"XDG_STATE_HOME": "/x"}), Path("/x/mcpr-relay"))
        self.assertEqual(state_dir({}, {"XDG_STATE_HOME": "relative"}), Path("/home/u/.local/state/mcpr-relay"))
        self.assertEqual(state_dir({}, {"MCPR_STATE_DIR": "/srv/state", "STATE_DIRECTORY": "/var/lib/mcpr"}),
                         Path("/srv/state"))
        self.assertEqual(state_dir({"state_dir": "/cli"}, {"MCPR_STATE_DIR": "/srv/state"}), Path("/cli"))
        # The file's key beats systemd's default: STATE_DIRECTORY is where systemd made room, not an order.
        self.write('[relay]\nstate_dir = "/from/file"\n')
        self.assertEqual(state_dir({}, {"STATE_DIRECTORY": "/var/lib/mcpr"}), Path("/from/file"))

    def test_bad_limits_name_their_key(self) -> None:
        for key, value, message in [("max_tunnels_per_ip", "0", "expected a positive integer"),
                                    ("registration_rate", "-1", "expected a positive integer"),
                                    ("reservation_grace", "0", "expected a number of seconds between 0 and 86400")]:
            e = self.assertRaises(ConfigError, self.load, {"domain": "t.example", key: value})
            self.assertEqual(str(e), f"option --{key.replace('_', '-')}: {message}, got \"{value}\"")

    def test_legacy_domain_key(self) -> None:
        self.write('relay_domain = "old.example"\n')
        self.assertEqual(self.load().domain, "old.example")

    def test_sub_second_pings_refused(self) -> None:
        e = self.assertRaises(ConfigError, load_relay, {"domain": "t.example", "ping_interval": "0.5"},
                              env={}, cwd=Path(self.mktemp()))
        self.assertIn("option --ping-interval: expected at least 1 second", str(e))

    def test_error_names_key_and_file(self) -> None:
        path = self.write('[relay]\ndomain = "t.example"\nmax_in_flight = 0\n')
        e = self.assertRaises(ConfigError, self.load)
        self.assertEqual(str(e), f"{path}: key 'relay.max_in_flight': expected a positive integer, got 0")

    def test_missing_or_bad_domain(self) -> None:
        e = self.assertRaises(ConfigError, self.load)
        self.assertIn("no relay domain: pass --domain D", str(e))
        e = self.assertRaises(ConfigError, self.load, {"domain": "bad_name"})
        self.assertEqual(str(e), 'option --domain: expected a DNS name such as tunnel.example.com, got "bad_name"')
        self.write('[relay]\ndomain = "x y"\n')
        e = self.assertRaises(ConfigError, self.load)
        self.assertIn("key 'relay.domain': expected a DNS name such as tunnel.example.com, got \"x y\"", str(e))

    def test_gateway_file_refused(self) -> None:
        (self.dir / "mcpr.toml").write_text('mode = "gateway"\n')
        e = self.assertRaises(ConfigError, self.load, {"domain": "t.example"})
        self.assertIn("key 'mode': expected \"relay\"", str(e))

    def test_tokens_from_file_and_command_line(self) -> None:
        self.write('[relay]\ndomain = "t.example"\n[[relay.tokens]]\ntoken = "file-token"\nsubdomains = "a-*"\n')
        s = self.load({"static_tokens": ["cli-token:b,c"]})
        self.assertEqual(s.tokens, (StaticToken("file-token", ("a-*",)), StaticToken("cli-token", ("b", "c"))))
        self.assertEqual(s.auth_mode, "static")

    def test_bad_static_token_is_not_repeated(self) -> None:
        e = self.assertRaises(ConfigError, self.load, {"domain": "t.example", "static_tokens": ["s3cret"]})
        self.assertEqual(str(e), "option --static-token: expected TOKEN:PATTERN[,PATTERN]")

    def test_provider_secret_needs_provider(self) -> None:
        e = self.assertRaises(ConfigError, self.load, {"domain": "t.example"}, {"MCPR_AUTH_PROVIDER_SECRET": "x"})
        self.assertEqual(str(e), "--auth-provider-secret is set but --auth-provider is not")

    def test_static_tokens_hide_the_provider(self) -> None:
        s = self.load({"domain": "t.example", "static_tokens": ["t:a"], "auth_provider": "https://auth.example"})
        self.assertEqual(s.warnings, ("static tokens are configured, so --auth-provider is not consulted",))

    def test_public_url_needs_one_star(self) -> None:
        self.assertEqual(self.load({"domain": "t.example", "public_url": "http://*.t.example:8711"}).public_url,
                         "http://*.t.example:8711")
        e = self.assertRaises(ConfigError, self.load, {"domain": "t.example", "public_url": "https://t.example"})
        self.assertIn("public_url: expected a URL with one '*'", str(e))

    def test_cluster_settings_come_together(self) -> None:
        """--cluster needs a node URL and a secret; either without --cluster is a mistake; the
        secret and the Redis URL (which may hold a password) are never repeated in an error."""
        base = {"domain": "t.example"}
        secret = {"MCPR_CLUSTER_SECRET": "0123456789abcdef0123"}
        s = self.load({**base, "cluster": "redis://:pw@10.0.0.2:6380/3", "node_url": "http://10.0.0.5:7000/"}, secret)
        self.assertEqual((s.cluster, s.node_url, s.cluster_secret, s.cluster_ttl),
                         ("redis://:pw@10.0.0.2:6380/3", "http://10.0.0.5:7000", "0123456789abcdef0123", 15.0))
        self.write('[relay.cluster]\nredis = "redis://127.0.0.1"\nnode_url = "http://127.0.0.1:7001"\n'
                   'secret = "a-secret-of-16-chars"\nttl = 5\n')
        s = self.load(base)
        self.assertEqual((s.cluster, s.node_url, s.cluster_ttl), ("redis://127.0.0.1", "http://127.0.0.1:7001", 5.0))
        (self.dir / "mcpr.toml").unlink()

        cases = [
            ({"node_url": "http://10.0.0.5:7000"}, {}, "--node-url is set but --cluster is not"),
            ({}, secret, "--cluster-secret is set but --cluster is not"),
            ({"cluster": "redis://127.0.0.1"}, secret, "--cluster needs --node-url http://ADDR:PORT"),
            ({"cluster": "redis://127.0.0.1", "node_url": "http://10.0.0.5:7000"}, {},
             "--cluster needs --cluster-secret"),
            ({"cluster": "redis://127.0.0.1", "node_url": "http://10.0.0.5:7000"}, {"MCPR_CLUSTER_SECRET": "short"},
             "expected at least 16 visible ASCII characters"),
        ]
        for cli, env, message in cases:
            e = self.assertRaises(ConfigError, self.load, {**base, **cli}, env)
            self.assertIn(message, str(e))
            self.assertNotIn("short", str(e))
        for bad in ("http://8.8.8.8:7000", "http://node.internal:7000", "https://10.0.0.5:7000",
                    "http://10.0.0.5", "http://0.0.0.0:7000", "http://10.0.0.5:7000/path"):
            e = self.assertRaises(ConfigError, self.load, {**base, "cluster": "redis://127.0.0.1", "node_url": bad},
                                  secret)
            self.assertIn("expected http://ADDR:PORT with a loopback or private IP address", str(e))
        e = self.assertRaises(ConfigError, self.load, {**base, "cluster": "http://:hunter2@10.0.0.2"}, secret)
        self.assertIn("--cluster", str(e))
        self.assertNotIn("hunter2", str(e))


class OptionsTests(SynchronousTestCase):
    """`twist mcpr-relay`'s usage.Options, generated from the relay's settings table."""

    def setUp(self) -> None:
        self.config = Path(self.mktemp())
        self.config.write_text('mode = "relay"\n')
        self.patch(os, "environ", {})

    def options(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(["--config", str(self.config), *args])
        return options

    def test_original_spelling(self) -> None:
        """The Docker ENTRYPOINT is `twist ... mcpr-relay`, so the original mcpr's
        `--relay --port 8080 --relay-domain D` must be accepted there too."""
        settings = self.options("--relay", "--port", "8080", "--relay-domain", "tunnel.example.com")["settings"]
        self.assertEqual(settings.domain, "tunnel.example.com")
        self.assertEqual(settings.listen, ("tcp:8080",))

    def test_relay_flag_is_optional(self) -> None:
        self.assertEqual(self.options("--domain", "d.example")["settings"].domain, "d.example")

    def test_every_setting_with_help_is_an_option(self) -> None:
        assert_options_cover(self, Options, RELAY_SETTINGS)

    def test_repeated_options(self) -> None:
        o = self.options("--domain", "d.example", "--listen", "tcp:1", "--listen", "tcp:2",
                         "--static-token", "a:x", "--static-token", "b:y,z")
        self.assertEqual(o["settings"].listen, ("tcp:1", "tcp:2"))
        self.assertEqual(o["settings"].tokens, (StaticToken("a", ("x",)), StaticToken("b", ("y", "z"))))
        # SIGHUP rereads the file with the same command line.
        self.assertEqual(load_relay(**o["reload"]), o["settings"])

    def test_priority_cli_env_file(self) -> None:
        self.config.write_text('mode = "relay"\n[relay]\ndomain = "d.example"\nauth_provider = "https://file.example"\n')
        self.patch(os, "environ", {"MCPR_AUTH_PROVIDER": "https://env.example"})

        def provider(*args: str) -> str | None:
            return self.options(*args)["settings"].auth_provider

        self.assertEqual(provider("--auth-provider", "https://cli.example"), "https://cli.example")
        self.assertEqual(provider(), "https://env.example")
        self.patch(os, "environ", {})
        self.assertEqual(provider(), "https://file.example")
        self.config.write_text('mode = "relay"\n[relay]\ndomain = "d.example"\n')
        self.assertIsNone(provider())

    def test_port_with_listen_refused(self) -> None:
        """Unlike the gateway, the relay refuses `--port` beside `--listen` on the command line."""
        e = self.assertRaises(usage.UsageError, self.options, "--domain", "d.example", "--port", "80",
                              "--listen", "tcp:81")
        self.assertEqual(str(e), "--port and --listen both given (--port 80, --listen tcp:81): give only --listen "
                                 "(--port 80 is short for --listen tcp:80)")
        self.config.write_text('mode = "relay"\nport = 80\n')
        self.assertEqual(self.options("--domain", "d.example", "--listen", "tcp:81")["settings"].listen, ("tcp:81",))
