"""The session table: what a session records, idle expiry, and the cap."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mcpr.proxy.sessions import SessionTracker


class SessionTests(SynchronousTestCase):
    """SessionTracker, on a Clock so that idle expiry needs no waiting."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.changes: list = []
        self.tracker = SessionTracker(self.clock, lambda s: self.changes.append((s.id, s.state)),
                                      max_sessions=2, idle_timeout=60)

    def test_lifecycle(self) -> None:
        """A session's client and server info from initialize, its activity, its end."""
        s = self.tracker.started("a", {"clientInfo": {"name": "c", "version": "1"}},
                                 {"serverInfo": {"name": "s", "version": "2"}, "protocolVersion": "p"})
        self.assertEqual((s.client_name, s.client_version, s.server_name, s.protocol_version), ("c", "1", "s", "p"))
        self.clock.advance(5)
        self.assertEqual(self.tracker.touch("a").requests, 2)
        self.assertEqual(self.tracker.get("a").last_activity, 5)
        self.assertIsNone(self.tracker.touch("unknown"))
        self.tracker.ended("a")
        self.assertEqual(self.changes, [("a", "active"), ("a", "ended")])
        self.assertEqual(len(self.tracker), 0)

    def test_malformed_info_is_ignored(self) -> None:
        s = self.tracker.started("a", {"clientInfo": "x"}, ["not", "a", "dict"])
        self.assertEqual((s.client_name, s.server_name), (None, None))

    def test_idle_expiry_and_cap(self) -> None:
        self.tracker.started("a", {}, {})
        self.clock.advance(30)
        self.tracker.started("b", {}, {})
        self.clock.advance(31)
        self.tracker.expire()
        self.assertEqual(self.changes[-1], ("a", "expired"))
        self.tracker.started("c", {}, {})
        self.tracker.started("d", {}, {})
        self.assertEqual(self.changes[-2], ("b", "expired"))
        self.assertEqual(len(self.tracker), 2)
