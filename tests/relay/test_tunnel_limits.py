"""The settings that bound one gateway socket: `control_frame_rate` and `gateway_backlog`, and the
token bucket behind the first."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mcpr.common.settings import ConfigError
from mcpr.relay.settings import load_relay
from mcpr.relay.tunnels.guard import ControlBudget


class SettingsTests(SynchronousTestCase):
    def load(self, cli: dict | None = None, toml: str = "") -> object:
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "mcpr.toml").write_text('mode = "relay"\n[relay]\ndomain = "t.example"\n' + toml)
        return load_relay(cli or {}, env={}, cwd=directory)

    def test_defaults_and_sources(self) -> None:
        s = self.load()
        self.assertEqual((s.control_frame_rate, s.gateway_backlog), (1000, 1 << 20))
        s = self.load(toml='control_frame_rate = 50\ngateway_backlog = "64KiB"\n')
        self.assertEqual((s.control_frame_rate, s.gateway_backlog), (50, 64 << 10))
        s = self.load({"control_frame_rate": "7", "gateway_backlog": "2MiB"})
        self.assertEqual((s.control_frame_rate, s.gateway_backlog), (7, 2 << 20))

    def test_bad_values_name_the_key(self) -> None:
        e = self.assertRaises(ConfigError, self.load, toml="control_frame_rate = 0\n")
        self.assertIn("key 'relay.control_frame_rate': expected a positive integer, got 0", str(e))
        e = self.assertRaises(ConfigError, self.load, {"gateway_backlog": "lots"})
        self.assertIn("option --gateway-backlog: expected a positive size", str(e))


class BudgetTests(SynchronousTestCase):
    def test_rate_and_burst(self) -> None:
        clock = Clock()
        budget = ControlBudget(10, clock)
        self.assertTrue(budget.spend(10))  # a burst of one second's worth
        self.assertFalse(budget.spend())
        clock.advance(0.5)
        self.assertTrue(budget.spend(4))  # 5 earned back, less the overdraft
        clock.advance(100)
        self.assertTrue(budget.spend(10))  # savings never exceed one second's worth
        self.assertFalse(budget.spend())
