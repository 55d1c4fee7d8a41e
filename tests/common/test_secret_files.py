"""A config file that holds tokens and that others can read is warned about at start (D13)."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mcpr.common.settings import Setting, exposed_secrets, load, parse_text
from mcpr.gateway.settings import load_gateway
from mcpr.relay.settings import load_relay

TABLE = (
    Setting("name", parse_text, None, ("name",)),
    Setting("password", parse_text, None, ("server", "password"), legacy=(("password",),), secret=True),
)


class ExposedSecretsTests(SynchronousTestCase):
    def setUp(self) -> None:
        if os.name != "posix":
            self.skipTest("file modes are POSIX")
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def config(self, text: str, mode: int, name: str = "mcpr.toml") -> Path:
        path = self.dir / name
        path.write_text(text)
        path.chmod(mode)
        return path

    def warnings(self, text: str, mode: int) -> list[str]:
        self.config(text, mode)
        return [w for w in load(TABLE, {}, env={}, cwd=self.dir).warnings if "readable" in w]

    def test_a_secret_readable_by_others_or_the_group_is_warned_about(self) -> None:
        path = self.dir / "mcpr.toml"
        for mode, who in ((0o644, "group and others"), (0o604, "others"), (0o640, "its group")):
            self.assertEqual(self.warnings('[server]\npassword = "hunter2"\n', mode),
                             [f"{path} holds secrets (server.password) and is readable by {who} "
                              f"(mode {mode:04o}): chmod 600 {path}"])

    def test_legacy_keys_count_and_values_are_never_shown(self) -> None:
        [warning] = self.warnings('password = "hunter2"\n', 0o644)
        self.assertIn("(password)", warning)
        self.assertNotIn("hunter2", warning)

    def test_no_warning_when_private_or_when_no_secret_is_in_the_file(self) -> None:
        self.assertEqual(self.warnings('[server]\npassword = "hunter2"\n', 0o600), [])
        self.assertEqual(self.warnings('name = "public"\n', 0o644), [])

    def test_group_read_by_a_daemon_that_does_not_own_the_file_is_the_packaged_layout(self) -> None:
        """root:mcpr 0640 (the Debian package's relay.toml): the daemon reads through its group, and
        `chmod 600` would lock it out; only others' read access is wrong there, so 640 is the fix."""
        path = self.config('password = "x"\n', 0o640)
        document = {"password": "x"}
        others_uid = os.geteuid() + 1
        status = os.stat(path)
        fake = os.stat_result((status.st_mode, 0, 0, 1, others_uid, os.getegid(), 0, 0, 0, 0))
        self.patch(os, "stat", lambda p, *a, **k: fake if Path(p) == path else status)
        self.assertIsNone(exposed_secrets(path, document, [("password",)]))
        fake = os.stat_result((status.st_mode | 0o004, 0, 0, 1, others_uid, os.getegid(), 0, 0, 0, 0))
        self.assertEqual(exposed_secrets(path, document, [("password",)]),
                         f"{path} holds secrets (password) and is readable by others (mode 0644): chmod 640 {path}")

    def test_the_relay_warns_about_tokens_and_the_provider_secret(self) -> None:
        self.config('[relay]\ndomain = "t.example"\nauth_provider = "https://auth.example"\n'
                    'auth_provider_secret = "s"\n', 0o644)
        [warning] = [w for w in load_relay({}, env={}, cwd=self.dir).warnings if "readable" in w]
        self.assertIn("(relay.auth_provider_secret)", warning)
        self.config('[relay]\ndomain = "t.example"\n[[relay.tokens]]\ntoken = "t"\nsubdomains = ["a"]\n', 0o644)
        [warning] = [w for w in load_relay({}, env={}, cwd=self.dir).warnings if "readable" in w]
        self.assertIn("(relay.tokens)", warning)

    def test_the_gateway_warns_about_its_tunnel_token(self) -> None:
        self.config('mcp = "http://127.0.0.1:1/mcp"\n[tunnel]\ntoken = "t"\n', 0o644)
        [warning] = [w for w in load_gateway({}, env={}, cwd=self.dir).warnings if "readable" in w]
        self.assertIn("(tunnel.token)", warning)
        self.config('mcp = "http://127.0.0.1:1/mcp"\n[tunnel]\ntoken = "t"\n', 0o600)
        self.assertEqual([w for w in load_gateway({}, env={}, cwd=self.dir).warnings if "readable" in w], [])
