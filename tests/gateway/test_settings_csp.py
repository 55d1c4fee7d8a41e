"""`[csp]`, `[[csp.widget]]` and `widgets` settings: parsing, errors that name the key, paths."""

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mcpr.common.settings import ConfigError
from mcpr.gateway.settings import load_gateway
from mcpr.proxy.rewrite.csp import CspPolicy, WidgetRule


class CspSettingsTests(SynchronousTestCase):
    """The `[csp]` and widgets settings, from the file and the command line."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()

    def load(self, text: str = "", cli=None):
        (self.dir / "mcpr.toml").write_text('mcp = "http://localhost:9000/mcp"\n' + text)
        return load_gateway(cli or {}, env={}, cwd=self.dir)

    def test_policy_from_file_and_command_line(self) -> None:
        s = self.load('[csp]\nmode = "override"\ndomains = ["https://a.example.com"]\ndomain = "app.example.com"\n'
                      '[[csp.widget]]\nmatch = "ui://widget/map*"\ndomains = ["https://tiles.example.com"]\n'
                      'frame_domains = ["https://player.example.com"]\n'
                      '[[csp.widget]]\nmatch = "ui://widget/*"\nmode = "extend"\n'
                      'connect_domains = ["wss://live.example.com"]\n')
        self.assertEqual(s.csp, CspPolicy("override", ("https://a.example.com",), "https://app.example.com", (
            WidgetRule("ui://widget/map*", None, ("https://tiles.example.com",), ("https://tiles.example.com",),
                       ("https://player.example.com",)),
            WidgetRule("ui://widget/*", "extend", ("wss://live.example.com",), (), ()),
        )))
        self.assertEqual(s.warnings, ())
        s = self.load('[csp]\ndomains = ["https://a.example.com"]\n', {"csp_domains": ["https://cli.example.com"]})
        self.assertEqual(s.csp.domains, ("https://cli.example.com",))

    def test_domain_is_an_origin(self) -> None:
        for given, origin in (("https://app.example.com/", "https://app.example.com"),
                              ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
                              ("app.example.com", "https://app.example.com")):
            self.assertEqual(self.load(f'[csp]\ndomain = "{given}"\n').csp_domain, origin)
        for bad in ("https://app.example.com/mcp", "ftp://x", "https://x.example.com?a=1", "https://x:99999"):
            e = self.assertRaises(ConfigError, self.load, f'[csp]\ndomain = "{bad}"\n')
            self.assertIn("key 'csp.domain': expected an origin such as https://app.example.com", str(e))

    def test_domains_cannot_smuggle_directives(self) -> None:
        e = self.assertRaises(ConfigError, self.load, "", {"csp_domains": ["https://a.example.com; script-src *"]})
        self.assertIn("option --csp: expected a domain or origin", str(e))

    def test_widget_entry_errors_name_the_entry(self) -> None:
        path = self.dir / "mcpr.toml"
        for text, message in (
            ('[[csp.widget]]\ndomains = ["https://x"]\n', "key 'csp.widget[0].match': expected a glob"),
            ('[[csp.widget]]\nmatch = "*"\nmode = "strict"\n', "key 'csp.widget[0].mode': expected one of"),
            ('[[csp.widget]]\nmatch = "*"\n[[csp.widget]]\nmatch = "*"\nframe = ["x"]\n',
             "key 'csp.widget[1]': unknown key(s) frame"),
            ('[[csp.widget]]\nmatch = "*"\nconnect_domains = ["a b"]\n',
             "key 'csp.widget[0].connect_domains': expected a domain"),
            ("[csp]\nwidget = 3\n", "key 'csp.widget': expected [[csp.widget]] tables"),
        ):
            e = self.assertRaises(ConfigError, self.load, text)
            self.assertIn(f"{path}: {message}", str(e))

    def test_widgets_folder_relative_to_where_it_was_given(self) -> None:
        (self.dir / "dist").mkdir()
        self.assertEqual(self.load('widgets = "dist"\n').widgets, str(self.dir / "dist"))
        cwd = self.dir / "elsewhere"
        (cwd / "build").mkdir(parents=True)
        (self.dir / "mcpr.toml").write_text('mcp = "http://localhost:9000/mcp"\n')
        s = load_gateway({"widgets": "build"}, env={}, cwd=cwd)  # the file is found in the parent
        self.assertEqual(s.widgets, str(cwd / "build"))
        self.assertEqual(self.load("", {"widgets": "http://localhost:5173"}).widgets, "http://localhost:5173")

    def test_widgets_errors(self) -> None:
        e = self.assertRaises(ConfigError, self.load, 'widgets = "missing"\n')
        self.assertIn("key 'widgets': expected a widget dev server URL or a folder, no such folder", str(e))
        e = self.assertRaises(ConfigError, self.load, "", {"widgets": "http://"})
        self.assertIn("option --widgets: expected an http:// or https:// URL", str(e))
