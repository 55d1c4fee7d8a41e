"""The settings engine: parsers, the CLI > environment > file > default merge, the errors that name
where a value came from, config-file discovery, and the `usage.Options` generated from a table."""

from __future__ import annotations

from pathlib import Path

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from mcpr.common.settings import (
    ConfigError,
    Setting,
    cli_values,
    find_config,
    listen_endpoints,
    listen_origin,
    load,
    options_from,
    parse_bool,
    parse_duration,
    parse_list,
    parse_ping_seconds,
    parse_port,
    parse_seconds,
    parse_size,
    parse_text,
)

TABLE: tuple[Setting, ...] = (
    Setting("port", parse_port, 1234, ("port",), help="A port."),
    Setting("name", parse_text, "default", ("server", "name"), legacy=(("server_name",),), env="TEST_NAME",
            option="called", help="A name.", aliases=(("also-called", "Alias of --called."),)),
    Setting("listen", parse_list(parse_text), (), ("listen",), repeatable=True, help="An endpoint (repeatable)."),
    Setting("quiet", parse_bool, False, ("quiet",), flag=True, help="Say less."),
    Setting("pin", parse_port, None, ("pin",), env="TEST_PIN", secret=True),
)


@options_from(TABLE)
class Options(usage.Options):
    optParameters = [["config", "c", None, "Config file."]]

    def postOptions(self) -> None:
        self["cli"] = cli_values(TABLE, self)


def parsed(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


class ParserTests(SynchronousTestCase):
    """The value parsers of the settings engine: sizes, ports, booleans, seconds, lists."""

    def test_sizes(self) -> None:
        self.assertEqual(parse_size("16MiB"), 16 << 20)
        self.assertEqual(parse_size("512k"), 512 << 10)
        self.assertEqual(parse_size(1000), 1000)
        for bad in ("0", "-1", "lots", 0, True):
            self.assertRaises(ValueError, parse_size, bad)

    def test_ports(self) -> None:
        self.assertEqual(parse_port(" 80 "), 80)
        self.assertEqual(parse_port(65535), 65535)
        for bad in (0, 65536, "abc", True, 1.5):
            e = self.assertRaises(ValueError, parse_port, bad)
            self.assertEqual(str(e), "expected an integer 1-65535")

    def test_booleans(self) -> None:
        for text, value in (("yes", True), ("ON", True), ("0", False), ("", False), (True, True)):
            self.assertIs(parse_bool(text), value)
        self.assertRaises(ValueError, parse_bool, "maybe")

    def test_seconds(self) -> None:
        self.assertEqual(parse_seconds("2.5"), 2.5)
        for bad in (0, -1, 86401, "soon", True):
            self.assertRaises(ValueError, parse_seconds, bad)
        e = self.assertRaises(ValueError, parse_ping_seconds, 0.5)
        self.assertIn("expected at least 1 second", str(e))

    def test_durations(self) -> None:
        self.assertEqual(parse_duration("7d"), 7 * 86400)
        self.assertEqual(parse_duration("500ms"), 0.5)
        self.assertEqual(parse_duration(" 1.5 H "), 5400)
        self.assertEqual(parse_duration("90"), 90)
        self.assertEqual(parse_duration(30), 30)
        for bad in ("0s", "-1d", "soon", "7 days", 0, True):
            e = self.assertRaises(ValueError, parse_duration, bad)
            self.assertIn("expected a positive duration", str(e))

    def test_lists(self) -> None:
        self.assertEqual(parse_list(parse_text)("a, b,,"), ("a", "b"))
        self.assertEqual(parse_list(parse_text)(["a,b"]), ("a,b",))
        self.assertRaises(ValueError, parse_list(parse_text), 3)


class MergeTests(SynchronousTestCase):
    """Merging command line, environment, file and defaults, and the errors that name where a value came from."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def write(self, text: str, folder: Path | None = None) -> Path:
        path = (folder or self.dir) / "mcpr.toml"
        path.write_text(text)
        return path

    def load(self, cli=None, env=None, cwd=None, config=None):
        return load(TABLE, cli or {}, env=env or {}, cwd=cwd or self.dir, config=config)

    def test_priority_cli_env_file_default(self) -> None:
        self.assertEqual(self.load()["name"], "default")
        self.write('[server]\nname = "file"\n')
        self.assertEqual(self.load()["name"], "file")
        self.assertEqual(self.load(env={"TEST_NAME": "env"})["name"], "env")
        self.assertEqual(self.load({"name": "cli"}, {"TEST_NAME": "env"})["name"], "cli")

    def test_missing_and_empty_sources_fall_through(self) -> None:
        self.write('server_name = "legacy"\n')
        self.assertEqual(self.load({"name": None}, {"TEST_NAME": ""})["name"], "legacy")
        self.write('server_name = "legacy"\n[server]\nname = "current"\n')
        self.assertEqual(self.load()["name"], "current")

    def test_error_names_key_and_file(self) -> None:
        path = self.write('port = "abc"\n')
        e = self.assertRaises(ConfigError, self.load)
        self.assertEqual(str(e), f"{path}: key 'port': expected an integer 1-65535, got \"abc\"")

    def test_error_names_nested_and_legacy_keys(self) -> None:
        path = self.write("[server]\nname = 3\n")
        e = self.assertRaises(ConfigError, self.load)
        self.assertEqual(str(e), f"{path}: key 'server.name': expected a non-empty string, got 3")
        path = self.write('server_name = ""\n')
        e = self.assertRaises(ConfigError, self.load)
        self.assertEqual(str(e), f"{path}: key 'server_name': expected a non-empty string, got \"\"")

    def test_error_names_option_and_env(self) -> None:
        e = self.assertRaises(ConfigError, self.load, {"name": " "})
        self.assertEqual(str(e), "option --called: expected a non-empty string, got \" \"")
        e = self.assertRaises(ConfigError, self.load, {}, {"TEST_NAME": " "})
        self.assertEqual(str(e), "environment variable TEST_NAME: expected a non-empty string, got \" \"")

    def test_secret_is_not_repeated(self) -> None:
        e = self.assertRaises(ConfigError, self.load, {}, {"TEST_PIN": "hunter2"})
        self.assertEqual(str(e), "environment variable TEST_PIN: expected an integer 1-65535")

    def test_unknown_keys_warn(self) -> None:
        path = self.write('prot = 1\nquiet = true\n[server]\nnmae = "x"\n[shared]\nanything = 1\n')
        loaded = self.load()
        self.assertEqual(loaded.warnings, (f"{path}: unknown key 'prot' (ignored)",
                                           f"{path}: unknown key 'server.nmae' (ignored)",
                                           f"{path}: unknown key 'shared.anything' (ignored)"))
        loaded = load(TABLE, {}, env={}, cwd=self.dir, known=[("shared",)])
        self.assertEqual(len(loaded.warnings), 2)

    def test_invalid_toml_names_file(self) -> None:
        path = self.write("port = \n")
        e = self.assertRaises(ConfigError, self.load)
        self.assertTrue(str(e).startswith(f"{path}: invalid TOML"))


class FindConfigTests(SynchronousTestCase):
    """Where the config file is found: --config, else the nearest mcpr.toml up from the working directory."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def test_found_in_parent_directory(self) -> None:
        (self.dir / "mcpr.toml").write_text("port = 1\n")
        child = self.dir / "a" / "b"
        child.mkdir(parents=True)
        self.assertEqual(find_config(None, child), self.dir / "mcpr.toml")
        self.assertEqual(load(TABLE, {}, env={}, cwd=child)["port"], 1)

    def test_none_found(self) -> None:
        self.assertIsNone(find_config(None, self.dir))

    def test_explicit_config_must_exist(self) -> None:
        e = self.assertRaises(ConfigError, find_config, str(self.dir / "missing.toml"), self.dir)
        self.assertIn("--config: no such file", str(e))


class TableTests(SynchronousTestCase):
    """A settings table's own rules: what a Setting must declare, its spelling, --port against --listen."""

    def test_cli_details_need_help(self) -> None:
        """Option names, flags and repetition are refused on a setting that has no help text."""
        self.assertRaises(ValueError, Setting, "x", parse_text, option="y")
        self.assertRaises(ValueError, Setting, "x", parse_bool, flag=True)
        self.assertRaises(ValueError, Setting, "x", parse_bool, help="X.", flag=True, repeatable=True)

    def test_spelling(self) -> None:
        """A setting's option spelling: its name with dashes, unless it gives its own."""
        self.assertEqual(Setting("max_in_flight", parse_port).spelling, "max-in-flight")
        self.assertEqual(TABLE[1].spelling, "called")

    def test_listen_endpoints(self) -> None:
        values = {"port": 80, "listen": ()}
        self.assertEqual(listen_endpoints(values, {}, "tcp:{port}"), ("tcp:80",))
        values = {"port": 80, "listen": ("unix:/s",)}
        cli = {"port": "80", "listen": ["unix:/s"]}
        e = self.assertRaises(ConfigError, listen_endpoints, values, cli, "tcp:{port}:interface=::1")
        self.assertEqual(str(e), "--port and --listen both given (--port 80, --listen unix:/s): give only --listen "
                                 "(--port 80 is short for --listen tcp:80:interface=::1)")
        # Only the command line counts: a port in the file beside --listen is not a contradiction.
        self.assertEqual(listen_endpoints(values, {"listen": ["unix:/s"]}, "tcp:{port}"), ("unix:/s",))

    def test_sources(self) -> None:
        """Where each value that is not the default came from, for errors found when it is used."""
        path = Path(self.mktemp())
        path.write_text('listen = ["tcp:1"]\n')
        loaded = load([Setting("listen", parse_list(parse_text), (), ("listen",)),
                       Setting("port", parse_port, 3000, ("port",), help="P.", env="X_PORT"),
                       Setting("events", parse_text, None, ("events",), help="E.")],
                      {"events": "-"}, config=str(path), env={"X_PORT": "4"})
        self.assertEqual(loaded.sources, {"listen": f"{path}: key 'listen'", "port": "environment variable X_PORT",
                                          "events": "option --events"})
        self.assertEqual(listen_origin(loaded.sources), f"{path}: key 'listen'")
        self.assertEqual(listen_origin({"port": "option --port"}), "option --port")
        self.assertEqual(listen_origin({}), "--port (the default)")


class GeneratedOptionsTests(SynchronousTestCase):
    """The usage.Options generated from a table: every option, its help, its values and their priority."""

    def test_every_cli_setting_is_an_option(self) -> None:
        usage_text = " ".join(str(Options()).split())
        for s in TABLE:
            if s.help is None:
                self.assertNotIn(f"--{s.spelling}", usage_text)
                continue
            self.assertIn(f"--{s.spelling} ", usage_text.replace("=", " "))
            self.assertIn(s.help, usage_text)
        self.assertIn("--also-called= Alias of --called.", usage_text)
        self.assertIn("-c, --config=", usage_text)

    def test_nothing_given_is_none(self) -> None:
        self.assertEqual(parsed()["cli"], {"port": None, "name": None, "listen": None, "quiet": None})

    def test_values_land_under_setting_names(self) -> None:
        cli = parsed("--port", "80", "--called", "n", "--listen", "a", "--listen", "b", "--quiet")["cli"]
        self.assertEqual(cli, {"port": "80", "name": "n", "listen": ["a", "b"], "quiet": True})
        self.assertEqual(parsed("--also-called", "m")["cli"]["name"], "m")

    def test_priority_through_the_command_line(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        config = folder / "mcpr.toml"
        config.write_text('[server]\nname = "file"\n')
        env = {"TEST_NAME": "env"}

        def name(*args: str, env: dict[str, str]) -> str:
            options = parsed("--config", str(config), *args)
            return load(TABLE, options["cli"], config=options["config"], env=env)["name"]

        self.assertEqual(name("--called", "cli", env=env), "cli")
        self.assertEqual(name(env=env), "env")
        self.assertEqual(name(env={}), "file")
        config.write_text("")
        self.assertEqual(name(env={}), "default")

    def test_unknown_option_is_a_usage_error(self) -> None:
        self.assertRaises(usage.UsageError, parsed, "--pin", "1")
